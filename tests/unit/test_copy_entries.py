"""`oci copy` in process: FinalizeImage builds the image from the entries PutLayer parsed
while it wrote each layer, reading no layer stream back, and the image is the source's;
layers move side by side, and one that fails stops the rest and commits no image."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import trio
from pycfs.host.errors import PycfsError
from pycfs.host.oci import copy as copy_module
from pycfs.host.oci import merge as merge_module
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.tools.cli import main

import imagebuild
from fdcount import enough_fds, open_fd_count  # noqa: F401 (a fixture)


def test_copy_builds_the_image_without_reading_layers_back(tmp_path, capsys, monkeypatch) -> None:
    built = imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path / "layout")
    src, dest = tmp_path / "src", tmp_path / "dest"
    for repo in (src, dest):
        assert main(["--repo", str(repo), "init"]) == 0
    assert main(["--repo", str(src), "oci", "pull", f"oci:{built.path}", "img"]) == 0
    read_back = []
    real_iter = merge_module.iter_layer_entries
    monkeypatch.setattr(merge_module, "iter_layer_entries", lambda reader: read_back.append(reader) or real_iter(reader))
    capsys.readouterr()
    assert main(["--repo", str(dest), "oci", "copy", "img", "--from", str(src), "--name", "img", "--json"]) == 0
    assert read_back == []

    def images(repo) -> dict:
        capsys.readouterr()
        assert main(["--repo", str(repo), "oci", "inspect", "img"]) == 0
        return json.loads(capsys.readouterr().out)["images"]

    assert images(dest) == images(src) and images(src)


def _pulled(tmp_path, name: str = "src"):
    built = imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path / "layout")
    src = tmp_path / name
    assert main(["--repo", str(src), "init"]) == 0
    assert main(["--repo", str(src), "oci", "pull", f"oci:{built.path}", "img"]) == 0
    return built, src


def test_layers_move_side_by_side_and_streams_are_the_sources(tmp_path, monkeypatch) -> None:
    """With two lanes, two layers are in flight at once (each on its own connections to the
    same services and handles), and every layer stream is byte for byte the source's."""
    built, src = _pulled(tmp_path)
    dest = tmp_path / "dest"
    Repository.init(dest).close()
    monkeypatch.setattr(copy_module, "layers_at_once", lambda: 2)
    in_flight, peak = 0, 0
    real_copy_layer = copy_module.copy_layer

    async def counting(*args, **kwargs):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real_copy_layer(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(copy_module, "copy_layer", counting)
    result = trio.run(copy_module.copy, str(src), None, str(dest), "img", "img", True)
    assert peak == 2
    assert [entry["diff_id"] for entry in result.layers] == built.diff_ids
    assert all(entry["copied"] for entry in result.layers)
    for diff_id, entry in zip(built.diff_ids, result.layers):
        with Repository.open(src, writable=False) as s, Repository.open(dest, writable=False) as d:
            assert entry["layer_verity"] == s.has_stream(f"oci-layer-{diff_id}").hex()
            source_bytes = b"".join(iter_stream_bytes(s, s.open_stream(f"oci-layer-{diff_id}")))
            assert b"".join(iter_stream_bytes(d, d.open_stream(f"oci-layer-{diff_id}"))) == source_bytes
            assert hashlib.sha256(source_bytes).hexdigest() == diff_id.removeprefix("sha256:")


def test_a_failing_layer_stops_its_siblings_tags_nothing_and_leaks_no_fd(tmp_path, monkeypatch) -> None:
    """One layer's object is gone from the source: its stream comes short, the destination
    refuses it by digest, the error names the missing object (the in-process source says why
    the stream ended), the layer beside it is cancelled, no image is tagged, and the
    copy leaves no fd open; the same copy from an intact source then finishes the job."""
    built, src = _pulled(tmp_path)
    dest = tmp_path / "dest"
    Repository.init(dest).close()
    monkeypatch.setattr(copy_module, "layers_at_once", lambda: 3)
    with Repository.open(src) as repo:
        victim = repo.open_stream(f"oci-layer-{built.diff_ids[0]}").object_refs[0].hex()
    gone = src / "objects" / victim[:2] / victim[2:]
    kept = gone.read_bytes()
    gone.unlink()
    before = open_fd_count()
    with pytest.raises(PycfsError, match=rf"^oci copy img: layer {re.escape(built.diff_ids[0])} from {re.escape(str(src))}: "
                       rf"object {victim} of layer stream [0-9a-f]{{64}} is missing: the source is damaged; "):
        trio.run(copy_module.copy, str(src), None, str(dest), "img", "img", False)
    assert open_fd_count() == before
    with Repository.open(dest, writable=False) as d:
        assert d.has_stream(f"oci-layer-{built.diff_ids[0]}") is None
    assert main(["--repo", str(dest), "oci", "inspect", "img"]) == 1
    gone.write_bytes(kept)
    result = trio.run(copy_module.copy, str(src), None, str(dest), "img", "img", False)
    assert [entry["diff_id"] for entry in result.layers] == built.diff_ids


def test_a_layer_named_twice_moves_once(tmp_path, monkeypatch) -> None:
    """An image may list one diff_id twice: it is copied once (not by two lanes at once,
    which the progress display, keyed by diff_id, could not follow) and fills both places."""
    spec = imagebuild.multilayer_image()
    spec.layers = [spec.layers[0], spec.layers[1], spec.layers[0]]
    built = imagebuild.build_layout(spec, tmp_path / "layout")
    assert built.diff_ids[0] == built.diff_ids[2] != built.diff_ids[1]
    src, dest = tmp_path / "src", tmp_path / "dest"
    assert main(["--repo", str(src), "init"]) == 0
    assert main(["--repo", str(src), "oci", "pull", f"oci:{built.path}", "img"]) == 0
    Repository.init(dest).close()
    monkeypatch.setattr(copy_module, "layers_at_once", lambda: 3)
    copied: list[str] = []
    real_copy_layer = copy_module.copy_layer

    async def recording(src_end, dst_end, diff_id, *args, **kwargs):
        copied.append(diff_id)
        return await real_copy_layer(src_end, dst_end, diff_id, *args, **kwargs)

    shown: dict[str, bool] = {}

    class Progress:
        def layer_started(self, diff_id: str) -> None:
            assert diff_id not in shown
            shown[diff_id] = True

        def layer_done(self, diff_id: str, already_present: bool) -> None:
            shown.pop(diff_id)

    monkeypatch.setattr(copy_module, "copy_layer", recording)
    result = trio.run(copy_module.copy, str(src), None, str(dest), "img", "img", True, Progress())
    assert sorted(copied) == sorted(set(built.diff_ids)) and not shown
    assert [entry["diff_id"] for entry in result.layers] == built.diff_ids
    assert result.layers[0]["layer_verity"] == result.layers[2]["layer_verity"] is not None
    with Repository.open(src, writable=False) as s:
        assert result.layers[0]["layer_verity"] == s.has_stream(f"oci-layer-{built.diff_ids[0]}").hex()


def test_putlayer_batches_fit_the_usual_open_file_limit():
    """At a soft limit of 1024, three layers put at once through one pool (each building a
    batch besides those in flight) stay under the limit: 252-file batches did not."""
    import resource
    from types import SimpleNamespace

    from pycfs.host.varlink.transfer import batch_files
    from pycfs.host.workers.pool import WorkerPool

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        files = batch_files()
        in_flight = WorkerPool.batches_in_flight(SimpleNamespace(jobs=2), files + 1, per_worker=4)  # type: ignore[arg-type]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert files >= 64
    assert in_flight * (files + 1) + 3 * files < 1024 - 64  # room for the rest (sockets, dirfds, repository)


def test_the_destinations_workers_are_forked_and_none_is_left_behind(tmp_path, capsys, monkeypatch) -> None:
    """`oci copy` forks the destination's object workers before trio starts and its pool
    takes them: no worker is spawned, and the objects are stored. A copy that moves nothing
    leaves none of them running or unreaped."""
    import os

    from pycfs.host.oci import copy as copy_module
    from pycfs.host.workers import fork
    from pycfs.host.workers.batching import default_jobs
    from pycfs.host.workers.pool import WorkerPool

    built, src = _pulled(tmp_path)
    dest = tmp_path / "dest"
    assert main(["--repo", str(dest), "init"]) == 0
    spawned = []
    real_spawn = WorkerPool._spawn

    async def recording(self):
        spawned.append(self)
        return await real_spawn(self)

    monkeypatch.setattr(WorkerPool, "_spawn", recording)
    # The command runs in pytest's process, where threads of earlier work (trio's idle cache)
    # may still run: fork's own rule about them is tested in test_forked_workers.py.
    monkeypatch.setattr(fork, "_alone", lambda: True)
    forked_pids: list[int] = []

    def forking(*args, **kwargs):
        workers = fork.fork_workers(*args, **kwargs)
        forked_pids.extend(w.proc.pid for w in workers)
        return workers

    monkeypatch.setattr(copy_module, "fork_workers", forking)
    capsys.readouterr()
    argv = ["--repo", str(dest), "oci", "copy", "img", "--from", str(src), "--name", "img", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert spawned == []
    assert result["objects_reflinked"] + result["objects_copied"] > 0
    assert [entry["diff_id"] for entry in result["layers"]] == built.diff_ids

    def no_children() -> bool:
        """Every worker forked so far is gone and reaped (waitpid knows none of them)."""
        for pid in forked_pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            return False
        return True

    assert len(forked_pids) == default_jobs() and no_children()
    assert main(argv) == 0  # every layer present: the forked workers are not used
    assert not any(entry["copied"] for entry in json.loads(capsys.readouterr().out)["layers"])
    assert spawned == [] and len(forked_pids) == 2 * default_jobs() and no_children()


def test_copy_on_a_terminal_forks_while_the_main_thread_is_alone(tmp_path) -> None:
    """The real command, its progress on a terminal: the destination's workers are forked
    while the main thread is the process's only one (before rich's refresh thread and trio),
    and the copy's result is the source image."""
    import sys

    from procs import SPY_ON_FORK, run_with_stderr_on_terminal
    from pycfs.host.workers.batching import default_jobs

    built, src = _pulled(tmp_path)
    dest = tmp_path / "dest"
    assert main(["--repo", str(dest), "init"]) == 0
    record = tmp_path / "fork.json"
    rc, out, shown = run_with_stderr_on_terminal(
        [sys.executable, "-c", SPY_ON_FORK, "pycfs.host.oci.copy", str(record), "--repo", str(dest), "oci", "copy",
         "img", "--from", str(src), "--name", "img"])
    assert rc == 0, shown.decode(errors="replace")
    assert json.loads(record.read_text()) == {"threads": ["_MainThread"], "forked": default_jobs()}
    assert b"\x1b[?25l" in shown  # rich's live display ran there, after the fork
    assert out.decode().splitlines()[0].startswith(f"manifest {built.manifest_digest} ")


@pytest.mark.parametrize("mode", ["plain", "json", "none"])
def test_copy_reports_progress_as_asked(tmp_path, capsys, mode) -> None:
    """`--progress` as for `oci pull`: a line per layer, a JSON event per start and end, or
    nothing; with --json the events default to JSON lines and stdout stays the result."""
    _, src = _pulled(tmp_path)
    dest = tmp_path / "dest"
    assert main(["--repo", str(dest), "init"]) == 0
    capsys.readouterr()
    argv = ["--repo", str(dest), "oci", "copy", "img", "--from", str(src), "--json"]
    assert main(argv + ([] if mode == "json" else ["--progress", mode])) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    diff_ids = [layer["diff_id"] for layer in result["layers"]]
    assert len(diff_ids) > 1
    lines = captured.err.splitlines()
    if mode == "json":
        events = [json.loads(line) for line in lines]
        assert sorted((e["event"], e["diff_id"]) for e in events) == sorted(
            (event, d) for d in diff_ids for event in ("layer_started", "layer_done"))
        assert all(e["already_present"] is False for e in events if e["event"] == "layer_done")
    elif mode == "plain":
        assert sorted(lines) == sorted(f"{d[7:19]}: copied" for d in diff_ids)
    else:
        assert lines == []
