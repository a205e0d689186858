"""c/storage-compatible read locks (pycfs.host.storage.locks) against POSIX record-lock writers.

The "writer" is another process using fcntl F_SETLK(W) with F_WRLCK on the whole file, which
is what Go containers/storage does; an flock(2) lock would not interact at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import pytest
import trio

from pycfs.host.storage.locks import LockTimeout, ReadLocks, is_write_locked, open_lock_file

# Tries a POSIX write lock without waiting; prints "got" or "busy". With "hold", keeps it
# until stdin closes after printing "holding".
WRITER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
flock = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
try:
    fcntl.fcntl(fd, fcntl.F_SETLK, flock)
except OSError:
    print("busy", flush=True)
    sys.exit(0)
if sys.argv[2] == "hold":
    print("holding", flush=True)
    sys.stdin.read()
else:
    print("got", flush=True)
"""


def _try_write(path) -> str:
    return subprocess.run([sys.executable, "-c", WRITER, str(path), "try"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture
def lock_files(tmp_path):
    (tmp_path / "overlay-images").mkdir()
    (tmp_path / "overlay-layers").mkdir()
    for p in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
        (tmp_path / p).write_bytes(b"")
    return [tmp_path / "overlay-images/images.lock", tmp_path / "overlay-layers/layers.lock"]


def test_read_locks_exclude_posix_writers(lock_files):
    locks = ReadLocks(lock_files)
    assert locks.try_acquire()
    try:
        assert [_try_write(p) for p in lock_files] == ["busy", "busy"]
        # A second reader (ours or another) is fine.
        other = ReadLocks(lock_files)
        assert other.try_acquire()
        other.release()
        # Closing another fd of the same file must not drop an OFD lock (it would a POSIX one).
        os.close(open_lock_file(lock_files[0]))
        assert _try_write(lock_files[0]) == "busy"
    finally:
        locks.release()
    assert [_try_write(p) for p in lock_files] == ["got", "got"]


def test_acquire_waits_for_a_writer_and_takes_all_or_nothing(lock_files):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(lock_files[1]), "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "holding"
        fd = open_lock_file(lock_files[1])
        assert is_write_locked(fd)
        locks = ReadLocks(lock_files)
        assert not locks.try_acquire()
        assert not locks.held
        # Nothing half-held: the images lock is free for a writer meanwhile.
        assert _try_write(lock_files[0]) == "got"
        waits = []

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(locks.acquire, lambda: waits.append(time.monotonic()))
                await trio.sleep(0.3)
                assert not locks.held and len(waits) == 1
                writer.stdin.close()  # the writer finishes
                writer.wait()

        trio.run(main)
        assert locks.held
        locks.release()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def test_acquire_gives_up_on_a_writer_that_holds_on(lock_files):
    """A podman hung with the layers lock held: one error naming the lock file after the
    limit, nothing held (before: the pull waited for good)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(lock_files[1]), "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "holding"
        locks = ReadLocks(lock_files)
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"^containers-storage lock {lock_files[1]} stayed write-locked for 1 s "
                                              r"\(a podman process is writing, or hangs"):
            trio.run(partial(locks.acquire, limit=1.0))
        assert 1 <= time.monotonic() - started < 6
        assert not locks.held
        assert _try_write(lock_files[0]) == "got"
    finally:
        writer.kill()
        writer.wait()


def test_lock_files_created_like_c_storage(tmp_path):
    path = tmp_path / "layers.lock"
    fd = open_lock_file(path)
    os.close(fd)
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_read_only_store_locks(tmp_path):
    path = tmp_path / "layers.lock"
    path.write_bytes(b"")
    path.chmod(0o444)
    locks = ReadLocks([(path, True)])
    assert locks.try_acquire()
    locks.release()
    with pytest.raises(Exception, match="cannot open lock file"):
        ReadLocks([(tmp_path / "missing.lock", True)]).try_acquire()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("read_only", [False, True])
def test_a_lock_file_that_is_a_symlink_or_fifo_is_refused_creating_nothing(tmp_path, read_only):
    """A dangling symlink as the lock file: opened with O_CREAT it made a file where it
    pointed (as root, for a root pull of a user's store); a fifo in a read-only store
    blocked the pull for good."""
    from pycfs.host.errors import PycfsError

    link = tmp_path / "layers.lock"
    link.symlink_to(tmp_path / "CREATED_BY_PULL")
    with pytest.raises(PycfsError, match=f"^cannot open lock file {link}: it is a symlink"):
        open_lock_file(link, read_only)
    assert not (tmp_path / "CREATED_BY_PULL").exists()
    fifo = tmp_path / "images.lock"
    os.mkfifo(fifo)
    with pytest.raises(PycfsError, match=f"^lock file {fifo} is not a regular file: the store is damaged"):
        open_lock_file(fifo, read_only)
