"""A containers-storage re-pull with nothing to import (pycfs.host.oci.repull) does and prints
what the full pull does, sees a changed image and a damaged repository as the full pull does,
and starts without the event loop, the object workers, the helper client or rich."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pycfs.host import repository, syscalls
from pycfs.host.oci import repull
from pycfs.host.oci.pull import PullOptions, pull
from pycfs.host.progress import PullProgress
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_CONFIG
from pycfs.tools.cli import main

from storage_trees import FakeStore
from test_storage_locks import WRITER, _try_write

REF = "containers-storage:localhost/img:latest"
BIG = bytes(range(256)) * 40


class Pulled:
    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        self.fake = FakeStore(root / "storage")
        self.base = self.fake.add_layer({"etc": None, "etc/big": BIG, "etc/small": b"small"})
        self.top = self.fake.add_layer({"usr": None, "usr/big": BIG[::-1], "usr/other": BIG + b"!"}, parent=self.base)
        self.fake.add_image([self.base, self.top], ["localhost/img:latest"])

    def argv(self, *extra: str) -> list[str]:
        return ["--repo", str(self.repo), "oci", "pull", "--storage-root", str(self.fake.root), *extra, REF, "img"]

    def retag(self, layers, config_extra: dict) -> dict:
        """Move the name to a new image of `layers` (as `podman build` or `podman pull` would)."""
        for image in self.fake.images:
            image["names"] = []
        return self.fake.add_image(layers, ["localhost/img:latest"], config_extra)

    def objects(self, repo: Path, diff_id: str) -> list[Path]:
        with Repository.open(repo, writable=False) as r:
            return [r.object_path(i) for i in r.open_stream(f"oci-layer-{diff_id}").object_refs]


@pytest.fixture
def pulled(tmp_path, capsys) -> Pulled:
    p = Pulled(tmp_path)
    assert main(["--repo", str(p.repo), "init"]) == 0
    assert main(p.argv("--progress=none")) == 0
    capsys.readouterr()
    return p


@pytest.fixture
def spy(monkeypatch) -> list:
    """What each pull's no-op path returned (None: it left the pull to the full path)."""
    results: list = []
    real = repull.pull_if_stored

    def spying(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(repull, "pull_if_stored", spying)
    return results


def _run(capsys, argv: list[str]) -> tuple[str, str]:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return out, err


def _steady(text: str) -> str:
    """Output without what differs between any two runs: durations and times."""
    text = re.sub(r"took \d+\.\d+s", "took Xs", text)
    return re.sub(r'"(time|seconds)": -?[0-9.e-]+', r'"\1": X', text)


@pytest.mark.parametrize("mode", [[], ["--progress=json"], ["--json"]])
def test_no_op_repull_prints_what_the_full_pull_prints(pulled, capsys, monkeypatch, spy, mode):
    fast = _run(capsys, pulled.argv(*mode))
    assert spy[-1] is not None and spy[-1].stats.layers_already_present == 2
    monkeypatch.setattr(repull, "pull_if_stored", lambda *args: None)  # the full pull, as before
    full = _run(capsys, pulled.argv(*mode))
    assert [_steady(t) for t in fast] == [_steady(t) for t in full]
    if not mode:
        assert "layer 2/2" in fast[1] and "2 already present" in fast[1] and "tagged img" in fast[0]


def test_no_op_repull_writes_nothing(pulled, capsys, spy):
    def tree() -> dict:
        return {str(p.relative_to(pulled.repo)): os.readlink(p) if p.is_symlink() else p.stat().st_mtime_ns
                for p in pulled.repo.rglob("*")}

    before = tree()
    _run(capsys, pulled.argv())
    assert spy[-1] is not None
    assert tree() == before


def test_repull_sees_a_changed_config(pulled, capsys, spy):
    """Same layers, new config: the new config and manifest streams are written and the tag moves."""
    new = pulled.retag([pulled.base, pulled.top], {"config": {"Labels": {"v": "2"}}})
    out, _ = _run(capsys, pulled.argv())
    assert spy[-1] is not None
    assert f"manifest {new['manifest_digest']}" in out
    out, _ = _run(capsys, ["--repo", str(pulled.repo), "oci", "images", "--json"])
    (image,) = json.loads(out)["images"]
    assert image["manifest"] == new["manifest_digest"] and image["layers"] == 2


def test_repull_sees_a_new_layer(pulled, capsys, spy):
    layer = pulled.fake.add_layer({"opt": None, "opt/new": BIG * 2}, parent=pulled.top)
    new = pulled.retag([pulled.base, pulled.top, layer], {})
    out, err = _run(capsys, pulled.argv())
    assert spy == [None]
    assert "layers: 1 imported, 2 already present" in err and f"manifest {new['manifest_digest']}" in out


def _delete_object(p: Pulled, repo: Path) -> None:
    max(p.objects(repo, p.top.diff_id), key=lambda o: o.stat().st_size).unlink()


def _truncate_layer_stream(p: Pulled, repo: Path) -> None:
    os.truncate((repo / f"streams/oci-layer-{p.top.diff_id}").resolve(), 60)


def _delete_layer_link(p: Pulled, repo: Path) -> None:
    (repo / f"streams/oci-layer-{p.top.diff_id}").unlink()


def _image_object(repo: Path) -> Path:
    (name,) = [n for n in os.listdir(repo / "images") if n != "refs"]
    return (repo / "images" / name).resolve()


# damage -> whether the no-op path still takes the pull (False: it leaves it to the full pull)
DAMAGES = {
    "layer-object-deleted": (_delete_object, False),
    "layer-stream-truncated": (_truncate_layer_stream, False),
    "layer-stream-link-deleted": (_delete_layer_link, False),
    "image-deleted": (lambda p, repo: _image_object(repo).unlink(), True),
    "image-truncated": (lambda p, repo: os.truncate(_image_object(repo), 4096), True),
}


def _contents(repo: Path) -> dict:
    return {str(p.relative_to(repo)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in repo.rglob("*") if not p.is_dir() or p.is_symlink()}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_repull_repairs_what_the_full_pull_repairs(pulled, capsys, monkeypatch, spy, damage):
    """The same damage in two copies of the repository, one re-pulled as now, the other by the
    full pull: the same repository after, byte for byte."""
    out, _ = _run(capsys, ["--repo", str(pulled.repo), "oci", "images", "--json"])
    expected = json.loads(out)["images"]
    other = pulled.repo.with_name("other")
    shutil.copytree(pulled.repo, other, symlinks=True)
    make, fast = DAMAGES[damage]
    for repo in (pulled.repo, other):
        make(pulled, repo)
    _, err = _run(capsys, pulled.argv())
    assert (spy[-1] is not None) == fast
    assert ("building the composefs image" in err) == fast
    assert ("layers: 1 imported, 1 already present" in err) == (not fast)
    out, _ = _run(capsys, ["--repo", str(pulled.repo), "oci", "images", "--json"])
    assert json.loads(out)["images"] == expected

    monkeypatch.setattr(repull, "pull_if_stored", lambda *args: None)
    _run(capsys, pulled.argv()[:1] + [str(other)] + pulled.argv()[2:])
    assert _contents(pulled.repo) == _contents(other)
    # Repaired, not just re-recorded: a damaged object the pull wrote again was replaced.
    assert _damaged_objects(pulled.repo) == []


def _damaged_objects(repo_path: Path) -> list[str]:
    repo = Repository.open(str(repo_path))
    return [f"{d.name}/{f.name}" for d in (repo_path / "objects").iterdir() if d.is_dir()
            for f in d.iterdir() if not repo.object_intact(bytes.fromhex(d.name + f.name))]


@pytest.fixture
def syncs(monkeypatch) -> list:
    calls: list = []
    real = syscalls.syncfs
    monkeypatch.setattr(syscalls, "syncfs", lambda fd: calls.append(fd) or real(fd))
    return calls


def test_no_op_repull_syncs_nothing_a_rebuilt_image_is_synced(pulled, capsys, syncs):
    _run(capsys, pulled.argv())
    assert syncs == []
    _image_object(pulled.repo).unlink()
    _, err = _run(capsys, pulled.argv())
    assert "building the composefs image" in err
    assert len(syncs) == 1  # before the config stream that names the new image counts as written


def test_an_unchanged_stream_skips_the_sync_only_with_nothing_new(tmp_path, syncs):
    with Repository.init(tmp_path / "repo") as r:
        def write(refs_durable: bool) -> None:
            w = r.new_stream(CONTENT_OCI_CONFIG)
            w.write_external(r.ensure_object(b"{}"), 2)
            r.write_stream(w, "s", refs_durable=refs_durable)

        write(True)  # new: synced
        write(False)  # the caller does not vouch for its refs: synced
        write(True)  # unchanged, nothing committed since the last sync: not synced
        assert len(syncs) == 2
        r.ensure_object(b"new")
        write(True)  # something committed since: synced
        assert len(syncs) == 3
        (r.path / "streams/s").unlink()
        write(True)  # the link is gone: made again, after a sync
        assert len(syncs) == 4 and r.has_stream("s") is not None


@pytest.mark.parametrize("bytes_per_lookup", [0, 10**9])  # every directory looked up / every one listed
def test_has_objects_agrees_with_has_object(tmp_path, monkeypatch, bytes_per_lookup):
    monkeypatch.setattr(repository, "LISTING_BYTES_PER_LOOKUP", bytes_per_lookup)
    with Repository.init(tmp_path / "repo") as r:
        ids = [r.ensure_object(b"%d" % i) for i in range(300)]
        assert r.has_objects(ids) and r.has_objects([])
        assert not r.has_objects([*ids, digest_bytes(b"never stored", r.alg)])
        r.object_path(ids[7]).unlink()  # its directory stays, with others in it
        assert not r.has_objects(ids) and r.has_objects(ids[:7] + ids[8:])
        assert [r.has_object(i) for i in ids] == [i != ids[7] for i in ids]


class Events(PullProgress):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def layers(self, layers):
        self.seen.append("layers")

    def layer_done(self, diff_id, already_present):
        self.seen.append("layer_done")

    def phase(self, name):
        self.seen.append(name)


def test_repull_leaves_waiting_for_podman_to_the_full_pull(pulled):
    lock = pulled.fake.root / "overlay-images/images.lock"
    lock.write_bytes(b"")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(lock), "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "holding"
        events = Events()
        with Repository.open(pulled.repo) as r:
            assert repull.pull_if_stored(r, REF, "img", PullOptions(str(pulled.fake.root), progress=events)) is None
        assert events.seen == []  # nothing reported: the full pull reports it all
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)
    with Repository.open(pulled.repo) as r:
        events = Events()
        result = repull.pull_if_stored(r, REF, "img", PullOptions(str(pulled.fake.root), progress=events))
    assert result is not None and events.seen == ["layers", "layer_done", "layer_done", "streams"]


def test_a_layer_to_import_keeps_podman_out_until_the_full_pull_is_done(pulled):
    """The locks of the look that found work go to the full pull: `podman rmi` cannot come in
    between (tests/integration/test_cstorage_pull.py has it with podman)."""
    lock = pulled.fake.root / "overlay-layers/layers.lock"
    _delete_layer_link(pulled, pulled.repo)
    with Repository.open(pulled.repo) as r:
        options = PullOptions(str(pulled.fake.root), helper="never")
        assert repull.pull_if_stored(r, REF, "img", options) is None
        assert options.storage_locks is not None and _try_write(lock) == "busy"
        result = trio.run(pull, r, REF, "img", options)
        assert result.stats.layers - result.stats.layers_already_present == 1
        assert _try_write(lock) == "got"
        # Unless the helper is to start first: `podman unshare` needs podman's write locks.
        _delete_layer_link(pulled, pulled.repo)
        options = PullOptions(str(pulled.fake.root), helper="always")
        assert repull.pull_if_stored(r, REF, "img", options) is None
        assert options.storage_locks is None and _try_write(lock) == "got"


def test_verify_diffid_and_oci_layouts_take_the_full_pull(pulled, tmp_path):
    with Repository.open(pulled.repo) as r:
        assert repull.pull_if_stored(r, REF, "img", PullOptions(str(pulled.fake.root), verify_diffid=True)) is None
        assert repull.pull_if_stored(r, f"oci:{tmp_path}", "img", PullOptions()) is None


# Runs the CLI with stderr on a terminal (rich's mode), then lists the heavy modules it loaded.
HEAVY = r"""
import sys
from pycfs.tools.cli import main
code = main(sys.argv[1:])
heavy = ("trio", "rich", "pycfs.host.workers", "pycfs.host.helperclient", "pycfs.host.oci.cstorage",
         "pycfs.host.erofs.writer", "pycfs.host.oci.merge", "pycfs.host.tree")
print(code, sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy), file=sys.stdout)
"""


def _heavy_modules(argv: list[str]) -> tuple[str, list[str]]:
    main_fd, term = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-c", HEAVY, *argv], stdout=subprocess.PIPE, stderr=term, text=True,
                           cwd="/", timeout=120)
    finally:
        os.close(term)
        os.close(main_fd)
    code, _, listed = p.stdout.strip().splitlines()[-1].partition(" ")
    return code, sorted(set(re.findall(r"'([\w.]+)'", listed)))


# Runs the CLI, recording whether the object workers were forked while the main thread ran
# alone with trio not loaded yet, how many, and how many the pool spawned after all.
SPY_ON_WORKERS = r"""
import json, sys, threading
from pycfs.host import childoutput
from pycfs.host.workers import fork
from pycfs.tools.cli import main

seen = {"forked": [], "spawned": 0}
real_fork, real_spawn = fork.fork_workers, childoutput.spawn_on_socket

def forking(*args, **kwargs):
    workers = real_fork(*args, **kwargs)
    seen["forked"].append([len(workers), threading.active_count(), "trio" in sys.modules])
    return workers

async def spawning(argv, *args):  # (the pool imports it, with trio, only after the fork)
    seen["spawned"] += "pycfs.host.workers" in argv
    return await real_spawn(argv, *args)

fork.fork_workers, childoutput.spawn_on_socket = forking, spawning
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def test_a_pull_with_a_layer_to_import_forks_its_workers_before_trio(pulled, tmp_path):
    """The object workers of a pull with a layer to import are forked before trio is loaded
    (as the main thread runs alone), and the pool takes them: it spawns none. The layer
    comes back whole."""
    before = _contents(pulled.repo)
    _delete_layer_link(pulled, pulled.repo)
    record = tmp_path / "seen.json"
    p = subprocess.run([sys.executable, "-c", SPY_ON_WORKERS, str(record), *pulled.argv("--jobs", "2")],
                       capture_output=True, text=True, cwd="/", timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(record.read_text()) == {"forked": [[2, 1, False]], "spawned": 0}
    assert _contents(pulled.repo) == before


def test_no_op_repull_loads_no_event_loop_workers_helper_or_rich(pulled):
    code, heavy = _heavy_modules(pulled.argv())
    assert code == "0" and heavy == []
    # The same command with a layer to import loads them: the check above can fail.
    _delete_layer_link(pulled, pulled.repo)
    code, heavy = _heavy_modules(pulled.argv())
    assert code == "0"
    assert {"trio", "pycfs.host.workers", "pycfs.host.helperclient", "pycfs.host.oci.cstorage", "rich",
            "pycfs.host.oci.merge", "pycfs.host.tree"} <= {
        m.split(".")[0] if m.startswith(("trio", "rich")) else m for m in heavy}
    shutil.rmtree(pulled.repo)
