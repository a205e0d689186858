"""`pycfs oci pull containers-storage:` begins its first layer before trio is imported
(pycfs.host.oci.headstart): the forked workers are written store requests of the first
files, the import goes on from there, and a failure met that early is reported in its place,
with nothing committed."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pycfs.host.fsck import fsck
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes

from storage_trees import FakeStore

REF = "containers-storage:localhost/img:latest"
FILES = 1500  # ~3 chunks of tar-split entries, 6 batches of files at the usual open-file limit


def _content(i: int) -> bytes:
    return (b"%05d" % i) * (20 + i % 50)  # 100-345 bytes: each an object, each its own


@pytest.fixture
def fake(tmp_path) -> FakeStore:
    fake = FakeStore(tmp_path / "storage")
    base = fake.add_layer({"d": None, **{f"d/f{i:04d}": _content(i) for i in range(FILES)}})
    top = fake.add_layer({"e": None, "e/big": bytes(range(256)) * 40}, parent=base)
    fake.add_image([base, top], ["localhost/img:latest"])
    return fake


# Runs the CLI, recording each request written to a forked worker before the event loop
# (method, fds, whether trio was loaded) and the workers the pool spawned after all. (A pull
# that took no early answer would hang: its chunks would wait for those files for good.)
SPY = r"""
import json, sys
from pycfs.host import childoutput
from pycfs.host.workers import fork
from pycfs.tools.cli import main

seen = {"early": [], "spawned": 0}
real_send, real_spawn = fork.send_early, childoutput.spawn_on_socket

def sending(worker, request_id, method, params, fds=()):
    seen["early"].append([method, len(fds), "trio" in sys.modules])
    return real_send(worker, request_id, method, params, fds)

async def spawning(argv, *args):
    seen["spawned"] += "pycfs.host.workers" in argv
    return await real_spawn(argv, *args)

fork.send_early, childoutput.spawn_on_socket = sending, spawning
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def _pull(tmp_path: Path, fake: FakeStore, jobs: int = 2, open_files: int | None = None
          ) -> tuple[subprocess.CompletedProcess, dict]:
    repo = tmp_path / "repo"
    if not repo.exists():
        Repository.init(repo).close()
    record = tmp_path / "seen.json"
    argv = ["--repo", str(repo), "oci", "pull", "--storage-root", str(fake.root), "--jobs", str(jobs),
            "--progress=none", REF, "img"]
    limit = None if open_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files,) * 2)
    p = subprocess.run([sys.executable, "-c", SPY, str(record), *argv], capture_output=True, text=True, cwd="/",
                       timeout=120, preexec_fn=limit)
    return p, json.loads(record.read_text())


def _layer(repo: Path, diff_id: str) -> bytes | None:
    with Repository.open(repo, writable=False) as r:
        if r.has_stream(f"oci-layer-{diff_id}") is None:
            return None
        return b"".join(iter_stream_bytes(r, r.open_stream(f"oci-layer-{diff_id}")))


def test_the_first_files_go_to_the_forked_workers_before_trio(tmp_path, fake):
    """Both forked workers are written store requests of the first layer's first files before
    trio is imported, the pool spawns no worker, and the layers come back byte for byte."""
    p, seen = _pull(tmp_path, fake)
    assert p.returncode == 0, p.stderr
    early = seen["early"]
    assert len(early) >= 4 and all(method == "store" and fds > 0 and not trio for method, fds, trio in early)
    assert sum(fds for _, fds, _ in early) > FILES // 2
    assert seen["spawned"] == 0
    for layer in fake.layers:
        assert _layer(tmp_path / "repo", layer.diff_id) == layer.tar


def test_early_files_stay_within_half_the_open_file_limit(tmp_path, fake):
    """Fds written to the workers before the pool reads anything are in flight until each
    worker reads its request, and the kernel refuses more in flight than the open-file
    limit: at 1024 (batches of 128 files) the head start sends 4 batches in all, whatever
    the number of workers."""
    p, seen = _pull(tmp_path, fake, jobs=8, open_files=1024)
    assert p.returncode == 0, p.stderr
    sent = [fds for _, fds, _ in seen["early"]]
    assert len(sent) == 4 and max(sent) == 128 and sum(sent) > 500
    for layer in fake.layers:
        assert _layer(tmp_path / "repo", layer.diff_id) == layer.tar


def test_a_tar_split_failing_after_the_first_files_were_sent_commits_nothing(tmp_path, fake):
    """The tar-split breaks in the second chunk, which the head start reads after sending
    the first chunk's files: the pull fails on that line (not on a layer cut short there),
    commits no stream, and the repository checks clean; repaired, the pull completes."""
    base = fake.layers[0]
    path = fake.layers_dir / f"{base.id}.tar-split.gz"
    good = path.read_bytes()
    lines = gzip.decompress(good).split(b"\n")
    lines[1500] = b'{"type": 1, "name": "d/f0700", "size": "not a number"}'
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    p, seen = _pull(tmp_path, fake)
    assert p.returncode == 1
    assert seen["early"] and seen["spawned"] == 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "tar-split.gz: line 1501: " in err[0] and "invalid size" in err[0], p.stderr
    assert not list((tmp_path / "repo/streams").glob("oci-layer-*"))
    with Repository.open(tmp_path / "repo") as r:
        assert fsck(r).ok
    path.write_bytes(good)
    p, _ = _pull(tmp_path, fake)
    assert p.returncode == 0, p.stderr
    assert _layer(tmp_path / "repo", base.diff_id) == base.tar


def test_a_fifo_among_the_first_files_is_refused_unopened(tmp_path, fake):
    """A fifo where the first batch has a file: the head start leaves that batch to the
    import, which refuses it, one line naming the file, at once; nothing committed."""
    diff = fake.root / "overlay" / fake.layers[0].id / "diff"
    (diff / "d/f0003").unlink()
    os.mkfifo(diff / "d/f0003")
    p, _ = _pull(tmp_path, fake)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"pycfs: error: d/f0003 (layer {fake.layers[0].id[:12]}, {diff}) is a fifo, not a regular file"]
    assert not list((tmp_path / "repo/streams").glob("oci-layer-*"))


def test_a_file_changed_among_the_first_files_fails_its_early_request(tmp_path, fake):
    """A same-size change to a file the head start sends: the forked worker refuses it on
    the tar-split's checksum, the pull fails naming it, nothing is committed."""
    diff = fake.root / "overlay" / fake.layers[0].id / "diff"
    (diff / "d/f0005").write_bytes(_content(5)[::-1])
    p, seen = _pull(tmp_path, fake)
    assert p.returncode == 1 and seen["early"]
    assert p.stderr.strip().splitlines() == [
        f"pycfs: error: cannot store d/f0005 (layer {fake.layers[0].id[:12]}, {diff}): its content does not match "
        "the layer's tar-split checksum (CRC-64)"]
    assert not list((tmp_path / "repo/streams").glob("oci-layer-*"))


# As SPY, but right after the head start another pull of the same image into the same
# repository runs to its end: the layer begun early is stored by then, as when two pulls race.
RACE = r"""
import subprocess, sys
from pycfs.host.oci import headstart
from pycfs.tools.cli import main

real_head_start = headstart.head_start

def racing(*args):
    head = real_head_start(*args)
    with open(sys.argv[1], "w") as f:
        f.write(str(sum(b.request_id is not None for b in head.early)))
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", *sys.argv[2:]], check=True, timeout=100,
                   stdout=subprocess.DEVNULL)
    return head

headstart.head_start = racing
sys.exit(main(sys.argv[2:]))
"""


def test_a_layer_begun_early_and_stored_meanwhile_by_another_pull(tmp_path, fake):
    """The head start writes the forked workers the first layer's first files; another pull
    stores that layer before this one looks at its layers again: this one finds it stored,
    leaves the early answers unclaimed (their objects are the same files, stored twice over),
    and completes; the repository checks clean, every layer byte for byte."""
    repo = tmp_path / "repo"
    Repository.init(repo).close()
    argv = ["--repo", str(repo), "oci", "pull", "--storage-root", str(fake.root), "--jobs", "2",
            "--progress=none", "--json", REF, "img"]
    record = tmp_path / "early"
    p = subprocess.run([sys.executable, "-c", RACE, str(record), *argv], capture_output=True, text=True, cwd="/",
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(record.read_text()) >= 2  # store requests written to the forked workers early
    result = json.loads(p.stdout)
    assert result["stats"]["layers_already_present"] == 2, result  # (both stored by the other pull)
    for layer in fake.layers:
        assert _layer(repo, layer.diff_id) == layer.tar
    with Repository.open(repo) as r:
        assert fsck(r).ok
