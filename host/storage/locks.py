"""Read locks that exclude containers/storage writers (`podman rmi`, `podman pull`).

Go containers/storage locks `<driver>-layers/layers.lock` and `<driver>-images/images.lock`
with POSIX record locks over the whole file (fcntl F_SETLKW, F_RDLCK/F_WRLCK). We take
open-file-description (OFD) read locks on the same range: the kernel makes OFD and POSIX
locks conflict with each other, and an OFD lock, unlike a POSIX one, is not dropped when
some other fd of ours for that file is closed. (flock(2) would not exclude podman at all.)

Several lock files are taken all-or-nothing with non-blocking attempts: podman takes them
in its own order while blocking in the kernel, so waiting on one while holding another
could deadlock against it; backing off cannot.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from pycfs.host.errors import PycfsError

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# native alignment, padded to its 8-byte alignment (32 bytes on 64-bit Linux).
_FLOCK = struct.Struct("@hhqqi4x")
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
POLL_INTERVAL = 0.01  # what c/storage's own retry loop uses
# How long `acquire` waits by default: podman holds a write lock for one change to the
# store (seconds, a large pull's commit minutes); longer is a podman hung or stopped.
LOCK_LIMIT = 600.0


class LockTimeout(PycfsError):
    pass


def _flock(l_type: int) -> bytes:
    # l_pid must be 0 for OFD locks; whole file (start 0, len 0).
    return _FLOCK.pack(l_type, os.SEEK_SET, 0, 0, 0)


def try_read_lock(fd: int) -> bool:
    """Take a shared OFD lock on the whole file without waiting; False if a writer holds it."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_write_locked(fd: int) -> bool:
    """Whether some process holds a write lock that would stop our read lock."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_RDLCK))
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


def open_lock_file(path: Path, read_only: bool = False) -> int:
    """Open a lock file like c/storage does: O_RDWR|O_CREAT 0644, or O_RDONLY for a read-only store.

    A store we may read but not write (another user's, a read-only mount) falls back to O_RDONLY;
    a read lock needs no more."""
    attempts = [os.O_RDONLY] if read_only else [os.O_RDWR | os.O_CREAT, os.O_RDONLY]
    for n, flags in enumerate(attempts, 1):
        try:
            # no symlink followed (O_CREAT through a dangling one would make a file wherever
            # it points, as root for a root pull), no wait on a fifo put there
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if n < len(attempts) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                continue
            why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise PycfsError(f"cannot open lock file {path}: {why} (the store is damaged: podman's own lock "
                             "files are regular files)") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PycfsError(f"lock file {path} is not a regular file: the store is damaged (podman's own lock "
                             "files are regular files)")
        return fd
    raise AssertionError("unreachable")


class ReadLocks:
    """Shared locks on several c/storage lock files, held together until release().

    `paths` items are a path, or (path, read_only) for a store we may only read
    (an additional image store): its lock file is opened O_RDONLY, as c/storage does.
    """

    def __init__(self, paths: list[Path | tuple[Path, bool]]) -> None:
        self.paths = [(p, False) if isinstance(p, Path) else (Path(p[0]), bool(p[1])) for p in paths]
        self._fds: list[int] = []
        self._busy: Path | None = None  # the lock file a writer held at the last attempt

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def try_acquire(self) -> bool:
        """All locks or none, without waiting."""
        fds: list[int] = []
        try:
            for path, read_only in self.paths:
                fd = open_lock_file(path, read_only)
                fds.append(fd)
                if not try_read_lock(fd):
                    self._busy = path
                    for f in fds:
                        os.close(f)
                    return False
        except BaseException:
            for f in fds:
                os.close(f)
            raise
        self._fds = fds
        return True

    async def acquire(self, on_wait: Callable[[], None] | None = None, limit: float | None = None) -> None:
        """Wait (cancellably) until every lock is ours, at most ``limit`` seconds (LOCK_LIMIT
        by default), else LockTimeout naming the lock file; `on_wait()` is called once if we
        have to wait."""
        # trio only here: a re-pull that finds the locks free (`try_acquire`) runs without it.
        import trio

        limit = LOCK_LIMIT if limit is None else limit
        waited = False
        with trio.move_on_after(limit) as waiting:
            while not self.try_acquire():
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                await trio.sleep(POLL_INTERVAL)
        if waiting.cancelled_caught:
            raise LockTimeout(f"containers-storage lock {self._busy} stayed write-locked for {limit:.0f} s "
                              "(a podman process is writing, or hangs: `lslocks` names it); try again when it is done")

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the only fd of an OFD lock releases it

    async def __aenter__(self) -> ReadLocks:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
