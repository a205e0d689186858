"""A hostile or damaged containers-storage: each case ends the pull in one line naming the
layer and the path, within seconds, with nothing committed and the storage locks let go."""

from __future__ import annotations

import io
import os
import tarfile
import time

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
