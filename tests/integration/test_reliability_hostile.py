"""A hostile or damaged containers-storage: each case ends the pull in one line naming the
layer and the path, within seconds, with nothing committed and the storage locks let go."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository

PULL_BOUND = 30.0  # seconds; a hang is what these tests catch (the pull itself takes ~1 s)


def fifo_tar() -> bytes:
    """A layer with a regular file and a fifo whose header carries a size field: Go's tar
    reader (podman import) reads no data for a fifo, so it imports, and the tar-split entry
    keeps the size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, info in (("etc", tarfile.DIRTYPE), ("run", tarfile.DIRTYPE)):
            t = tarfile.TarInfo(name)
            t.type, t.mode = info, 0o755
            tf.addfile(t)
        data = b"regular content, long enough to be an object " * 4
        t = tarfile.TarInfo("etc/big")
        t.size, t.mode = len(data), 0o644
        tf.addfile(t, io.BytesIO(data))
        t = tarfile.TarInfo("run/pipe")
        t.type, t.mode, t.size = tarfile.FIFOTYPE, 0o644, 1000
        tf.addfile(t)  # a header only: no data follows it
    return buf.getvalue()


def one_error_line(stderr: bytes) -> str:
    """The one error line (progress lines may come before it), no traceback."""
    lines = stderr.decode().strip().splitlines()
    errors = [line for line in lines if line.startswith("pycfs: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr.decode(), lines
    return errors[0]


def test_fifo_with_a_size_fails_in_one_line_and_lets_the_storage_go(podman_user):
    user = podman_user
    ref = "localhost/pycfs-hostile-fifo:latest"
    tmp = user.tmpdir("fifo-")
    tar = tmp / "fifo.tar"
    tar.write_bytes(fifo_tar())
    os.chown(tar, user.uid, user.gid)
    user.podman("import", tar, ref)
    upper = user.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", ref).stdout.decode()
    layer = os.path.basename(os.path.dirname(upper.strip()))
    repo = tmp / "repo"
    user.pycfs("--repo", repo, "init")
    started = time.monotonic()
    result = user.run([user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull",
                       f"containers-storage:{ref}"], check=False, timeout=PULL_BOUND)
    assert time.monotonic() - started < PULL_BOUND
    assert result.returncode == 1, result
    line = one_error_line(result.stderr)
    assert "run/pipe" in line and layer[:12] in line and "fifo" in line, line
    assert not list((repo / "streams").glob("oci-layer-*"))
    # The storage locks were let go: podman can write to the store at once.
    user.run(["podman", "tag", ref, ref + "-again"], timeout=PULL_BOUND)
    user.podman("rmi", ref, ref + "-again")


def test_reflinked_object_is_what_its_name_says_when_the_source_is_rewritten(reflink_dir, monkeypatch):
    """On a reflink filesystem: the source is rewritten in place (same size) after the first
    read of the store. The stored object must digest to its name (the digest was once read
    from the source and the clone taken after)."""
    repo = Repository.init(reflink_dir / "rewrite-repo")
    path = reflink_dir / "rewrite-src"
    old, new = os.urandom(3 << 20), os.urandom(3 << 20)
    path.write_bytes(old)
    real, done = os.preadv, []

    def preadv(fd, buffers, offset, *rest):
        n = real(fd, buffers, offset, *rest)
        if not done:
            done.append(True)
            with open(path, "r+b") as f:
                f.write(new)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = repo.store_object_from_fd(fd)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert done and result.how == "reflinked"
    stored = repo.read_object(result.object_id)
    assert digest_bytes(stored) == result.object_id and stored == old


# ---- a matrix of edits to a copy of a real store ---------------------------------------

MATRIX_FILES = {"srv/a": 5000, "srv/b": 5000, "srv/c": 7000}


def _replace(make):
    def edit(diff: Path, layer: str) -> None:
        target = diff / "srv/a"
        target.unlink()
        make(target, diff)
    return edit


def _bind(path: Path, diff: Path) -> None:
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def _same_size(diff: Path, layer: str) -> None:
    data = bytearray((diff / "srv/a").read_bytes())
    data[100] ^= 0xFF
    (diff / "srv/a").write_bytes(bytes(data))


# Where the attacks point: outside the store. strace shows whether anything there was opened.
CANARY = "OUTSIDE-CANARY"


def _outside(diff: Path) -> Path:
    return diff.parents[3] / CANARY  # beside the store copy, not in it


def _layer_dir_symlink(diff: Path, layer: str) -> None:
    moved = _outside(diff)
    diff.rename(moved)
    diff.symlink_to(moved)


def _symlink_out(target: Path, diff: Path) -> None:
    outside = _outside(diff)
    outside.write_bytes(b"secret" * 1000)
    target.symlink_to(outside)


def _truncated_tar_split(diff: Path, layer: str) -> None:
    path = diff.parent.parent.parent / "overlay-layers" / f"{layer}.tar-split.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _layers_json_outside(diff: Path, layer: str) -> None:
    path = diff.parent.parent.parent / "overlay-layers" / "layers.json"
    path.write_text(path.read_text().replace(f'"id":"{layer}"', '"id":"../../../../etc"'))


HOSTILE = {
    "fifo": (_replace(lambda p, d: os.mkfifo(p)), "srv/a", "is a fifo"),
    "socket": (_replace(_bind), "srv/a", "is a socket"),
    "char device": (_replace(lambda p, d: os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 5))), "srv/a",
                    "is a character device"),
    "directory": (_replace(lambda p, d: p.mkdir()), "srv/a", "is a directory"),
    "symlink": (_replace(_symlink_out), "srv/a", "symlink"),
    "hardlink to another file": (_replace(lambda p, d: os.link(d / "srv/b", p)), "srv/a", "tar-split checksum"),
    "same-size change": (_same_size, "srv/a", "tar-split checksum"),
    "missing file": (_replace(lambda p, d: None), "srv/a", "is missing from the layer directory"),
    "layer dir a symlink": (_layer_dir_symlink, "/diff", "symlink"),
    "truncated tar-split": (_truncated_tar_split, ".tar-split.gz", "truncated"),
    "layers.json outside the root": (_layers_json_outside, "", ""),
}


@pytest.fixture(scope="module")
def real_store(podman_user, tmp_path_factory):
    """A small real store made by rootless podman (its own graph root), and its layer id."""
    user = podman_user
    base = user.tmpdir("hostile-store-")
    tar = base / "img.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("srv",):
            t = tarfile.TarInfo(name)
            t.type, t.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(t)
        for name, size in MATRIX_FILES.items():
            t = tarfile.TarInfo(name)
            t.size, t.mode = size, 0o644
            tf.addfile(t, io.BytesIO(bytes([sum(name.encode()) % 256]) * size))
    tar.write_bytes(buf.getvalue())
    os.chown(tar, user.uid, user.gid)
    root = base / "root"
    runroot = Path(tempfile.mkdtemp(prefix="hs-", dir=f"/run/user/{user.uid}"))  # podman wants it short
    os.chown(runroot, user.uid, user.gid)
    user.podman("--root", root, "--runroot", runroot, "--storage-driver", "overlay", "import", tar, "localhost/hostile:1")
    layers = json.loads((root / "overlay-layers" / "layers.json").read_text())
    (layer,) = [entry["id"] for entry in layers]
    yield root, layer
    user.run(["podman", "--root", root, "--runroot", runroot, "unshare", "rm", "-rf", root, runroot], check=False)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_store_edit_fails_in_one_line(real_store, tmp_path, case):
    """As root (who could open anything: the worst case), on an edited copy of the store."""
    source, layer = real_store
    store = tmp_path / "store"
    subprocess.run(["cp", "-a", source, store], check=True)
    edit, where, what = HOSTILE[case]
    edit(store / "overlay" / layer / "diff", layer)
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", repo, "init"], check=True)
    started = time.monotonic()
    trace = tmp_path / "strace.txt"
    # -y shows the file behind every fd a call returns: nothing opened may lie outside the store.
    result = subprocess.run(["strace", "-f", "-qq", "-y", "-o", trace, "-e", "trace=open,openat,openat2",
                             "-e", "status=successful",
                             sys.executable, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", "--helper", "never",
                             "--progress=none", "--storage-root", store, "containers-storage:localhost/hostile:1"],
                            capture_output=True, timeout=PULL_BOUND)
    assert time.monotonic() - started < PULL_BOUND
    opened = [line.rsplit(" = ", 1)[-1] for line in trace.read_text().splitlines() if " = " in line]
    assert opened and not [o for o in opened if CANARY in o], [o for o in opened if CANARY in o]
    assert result.returncode == 1, result
    line = one_error_line(result.stderr)
    assert where in line and what in line, line
    if case != "layers.json outside the root":
        assert layer[:12] in line, line
    assert not list((repo / "streams").glob("oci-layer-*")) and not list((repo / "images").glob("*"))
