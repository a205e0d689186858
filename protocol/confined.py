"""The Linux calls both pycfs processes need, in a dependency-free leaf: openat2 confined
beneath a directory, and the open-file limit. The helper (`pycfs.helper`) imports nothing
from host/; `pycfs.host.syscalls` re-exports these for the host."""

from __future__ import annotations

import ctypes
import errno
import os
import resource

libc = ctypes.CDLL(None, use_errno=True)  # the C library, errno kept (host/syscalls.py uses it too)
libc.syscall.restype = ctypes.c_long

# openat2(2) is syscall 437 on every architecture (allocated after the unified table).
_SYS_openat2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# What every open of container-storage content uses: stay beneath the directory fd,
# follow no symlink of any kind.
RESOLVE_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# The open_how of each (flags, mode, resolve) used, passed by reference: read-only to the
# kernel, so one per combination serves every call and thread (building and sizing the
# structure was a third of a call's cost; a layer's copy opens every one of its files).
_HOWS: dict[tuple[int, int, int], object] = {}
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = RESOLVE_CONFINED) -> int:
    """openat2(2); returns the new fd. Retries on EAGAIN/EINTR as the man page advises."""
    raw = path if type(path) is bytes else os.fsencode(path)
    if b"\0" in raw:
        raise OSError(errno.EINVAL, "path contains NUL", os.fsdecode(raw))
    how = _HOWS.get((flags, mode, resolve))
    if how is None:
        how = _HOWS[(flags, mode, resolve)] = ctypes.byref(_OpenHow(flags | os.O_CLOEXEC, mode, resolve))
    for _ in range(64):
        fd = libc.syscall(_SYS_openat2, dirfd, raw, how, _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, f"openat2: {os.strerror(err)}", os.fsdecode(raw))
    raise OSError(errno.EAGAIN, "openat2: kept racing with renames", os.fsdecode(raw))


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: a pull keeps batches of fds in flight to its
    workers (and the helper hands fds back), and the soft default (often 1024) would cap
    how many batches run at once long before the hard limit would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
