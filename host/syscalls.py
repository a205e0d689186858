"""Linux syscalls the stdlib lacks, in one place, raising OSError with the errno.

openat2 (beneath-root resolution) and the open-file limit (from `pycfs.protocol.confined`,
the leaf the helper shares), opening only a regular file beneath a directory, FICLONE,
fs-verity enable/measure, linkat with AT_EMPTY_PATH, renameat2, syncfs, mount, and the
mount API (fsopen, fsconfig, fsmount, move_mount) that builds detached mounts a service
can hand to its client as an fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

# Shared with the helper, which imports nothing from host/: they live in the leaf module.
from pycfs.protocol.confined import (  # noqa: F401  (re-exported: this is the host's home of syscalls)
    RESOLVE_BENEATH,
    RESOLVE_CONFINED,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    openat2,
    raise_open_file_limit,
)
from pycfs.protocol.confined import libc as _libc

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE = 1

FICLONE = 0x40049409
FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686

FS_VERITY_HASH_ALG_SHA256 = 1
FS_VERITY_HASH_ALG_SHA512 = 2

# Errors meaning "this filesystem/kernel cannot do it", as opposed to real failures.
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})
CROSS_DEVICE_ERRNOS = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS})


def _raise(what: str, path: str | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


class NotRegularFile(Exception):
    """What `open_regular` found is no regular file (``mode``: its st_mode); nothing was opened."""

    def __init__(self, mode: int) -> None:
        super().__init__(f"not a regular file (mode {mode:#o})")
        self.mode = mode

    @property
    def kind(self) -> str:
        """What it is, for a message ("a fifo", "a symlink", ...)."""
        return _KINDS.get(stat.S_IFMT(self.mode), f"of type {stat.S_IFMT(self.mode):o}")


_KINDS = {stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


def open_regular(dirfd: int, path: bytes, *, follow: bool = False,
                 resolve: int = RESOLVE_CONFINED) -> tuple[int, os.stat_result]:
    """Open path beneath dirfd read-only only if it is a regular file: (fd, its fstat).

    An O_PATH probe first, and fstat on it: a fifo would block a real open forever and a
    device's open has side effects, so nothing but a regular file is ever opened
    (NotRegularFile). The real open goes through the probe's own /proc/self/fd link (the
    same inode, no second path walk to race with) and checks permission; the probe's
    fstat stands for the opened file (a syscall less per file). ``follow``: a last
    component that is a symlink is followed (within ``resolve``'s bounds). OSError from
    either open."""
    probe = openat2(dirfd, path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0, resolve)
    try:
        st = os.fstat(probe)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(st.st_mode)
        return os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), st
    finally:
        os.close(probe)


def ficlone(dst_fd: int, src_fd: int) -> None:
    """Make dst share src's extents (reflink). OSError EXDEV/EOPNOTSUPP when impossible."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def fsverity_enable(fd: int, hash_alg: int) -> None:
    """FS_IOC_ENABLE_VERITY with 4096-byte blocks and no salt; fd must be read-only."""
    arg = struct.pack("<IIIIQIIQ88x", 1, hash_alg, 4096, 0, 0, 0, 0, 0)
    fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)


def fsverity_measure(fd: int, hash_alg: int) -> bytes | None:
    """Kernel-measured fs-verity digest, or None when the file has no verity or the fs has none."""
    size = 32 if hash_alg == FS_VERITY_HASH_ALG_SHA256 else 64
    buf = bytearray(struct.pack("<HH", hash_alg, size) + bytes(size))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno == errno.ENODATA or e.errno in UNSUPPORTED_ERRNOS:
            return None
        raise
    alg, got = struct.unpack_from("<HH", buf)
    if alg != hash_alg or got != size:
        raise OSError(errno.EINVAL, f"fs-verity measured with algorithm {alg}, wanted {hash_alg}")
    return bytes(buf[4 : 4 + size])


_empty_path_link = True  # cleared once linkat(AT_EMPTY_PATH) says it needs a capability


def link_fd(fd: int, dst_dirfd: int, name: str) -> None:
    """Give the file open at fd (e.g. an O_TMPFILE) a name. EEXIST propagates.

    linkat(AT_EMPTY_PATH) works for any user on the file they opened since Linux 6.10, and
    needs CAP_DAC_READ_SEARCH before (ENOENT without it); the /proc/self/fd route works for
    any user on an O_TMPFILE, but walks procfs on every call (about 3 µs an object more).
    """
    global _empty_path_link
    if _empty_path_link:
        if _libc.linkat(fd, b"", dst_dirfd, os.fsencode(name), AT_EMPTY_PATH) == 0:
            return
        if ctypes.get_errno() != errno.ENOENT:
            _raise("linkat", name)
        _empty_path_link = False
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dst_dirfd, follow_symlinks=True)


def renameat2_noreplace(src_dirfd: int, src: str, dst_dirfd: int, dst: str) -> None:
    """rename without replacing an existing destination (EEXIST then)."""
    if _libc.renameat2(src_dirfd, os.fsencode(src), dst_dirfd, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        _raise("renameat2", dst)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd: one barrier instead of an fsync per object."""
    if _libc.syncfs(fd) != 0:
        _raise("syncfs")


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE) of the whole file: its dirty pages start going
    to disk now, without waiting for them, so that a later syncfs has less left to write.
    Advisory: where the filesystem cannot, syncfs writes them all the same (errors ignored)."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc malloc_trim(0), every arena):
    what large buffers and threads freed stays mapped otherwise, and Python's own small
    objects are not placed in it. Advisory: a libc without it does nothing."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


MS_RDONLY = 0x1
MS_NODEV = 0x4
MS_NOSUID = 0x2
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    """mount(2); OSError carries the errno (the kernel log has the details)."""
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, options.encode() or None)
    if rc != 0:
        _raise(f"mount {fstype} on {target}", source)


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise("umount", target)


# The mount API: syscall numbers from the unified table (the same on every architecture).
_SYS_move_mount = 429
_SYS_fsopen = 430
_SYS_fsconfig = 431
_SYS_fsmount = 432

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_FDCWD = -100


def _fs_log(fsfd: int) -> str:
    """The messages the filesystem left in its context (e.g. "overlayfs: failed to
    resolve ..."): what the errno alone does not say."""
    lines = []
    while True:
        try:
            msg = os.read(fsfd, 1024)
        except OSError:  # ENODATA: no more messages
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").removeprefix("e ").removeprefix("w ").removeprefix("i "))
    return "; ".join(lines)


def fsopen(fstype: str) -> int:
    """A new filesystem context (close-on-exec); OSError ENODEV when the kernel lacks fstype."""
    fd = _libc.syscall(_SYS_fsopen, fstype.encode(), FSOPEN_CLOEXEC)
    if fd < 0:
        _raise(f"fsopen {fstype}")
    return fd


def _fs_error(fsfd: int, what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {_fs_log(fsfd) or os.strerror(err)}")


def fsconfig(fsfd: int, key: str, value: str | None = None) -> None:
    """Set a flag (value None) or a string option; OSError with the kernel's own message."""
    cmd, raw = (FSCONFIG_SET_FLAG, None) if value is None else (FSCONFIG_SET_STRING, os.fsencode(value))
    if _libc.syscall(_SYS_fsconfig, fsfd, cmd, key.encode(), raw, 0) != 0:
        raise _fs_error(fsfd, key if value is None else f"{key}={value}")


def fsconfig_create(fsfd: int) -> None:
    """Create the superblock from the options set; OSError with the kernel's own message."""
    if _libc.syscall(_SYS_fsconfig, fsfd, FSCONFIG_CMD_CREATE, None, None, 0) != 0:
        raise _fs_error(fsfd, "creating the filesystem")


def fsmount(fsfd: int, attrs: int = 0) -> int:
    """A detached mount (fd, close-on-exec) of the created context; it vanishes when the
    last fd closes unless move_mount attaches it."""
    fd = _libc.syscall(_SYS_fsmount, fsfd, FSMOUNT_CLOEXEC, attrs)
    if fd < 0:
        _raise("fsmount")
    return fd


def detached_mount(fstype: str, options: list[tuple[str, str | None]], attrs: int = 0) -> int:
    """fsopen, fsconfig each (key, value or None for a flag), create, fsmount: the fd of a
    mount attached nowhere (yet)."""
    ctx = fsopen(fstype)
    try:
        for key, value in options:
            fsconfig(ctx, key, value)
        fsconfig_create(ctx)
        return fsmount(ctx, attrs)
    finally:
        os.close(ctx)


def move_mount_fd(mount_fd: int, target: str | int) -> None:
    """Attach the detached mount at mount_fd onto the directory target (a path, or an fd of
    the directory: no path is looked up then)."""
    if isinstance(target, int):
        rc = _libc.syscall(_SYS_move_mount, mount_fd, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
    else:
        rc = _libc.syscall(_SYS_move_mount, mount_fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
    if rc != 0:
        _raise("move_mount", str(target))
