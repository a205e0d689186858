"""Read a filesystem tree from a directory the way C `mkcomposefs DIR IMAGE` does (C spec 5).

* lstat every entry (symlinks are not followed), permission bits, uid, gid, mtime;
* xattrs of every entry including symlinks (`--skip-xattrs`, `--user-xattrs` filter them);
* regular files of 1..64 bytes are inlined, larger ones become `External` with their fs-verity
  digest (and, with a digest store, are copied to `STORE/XX/rest`); empty files are empty;
* hardlinks are NOT detected: every name is its own inode (C behaviour);
* `--use-epoch` zeroes every mtime; `--skip-devices` drops char/block devices (whiteouts too).

The source may change under the walk, and nothing outside it may be read: every entry is
reached from its directory's open fd (O_NOFOLLOW, O_NONBLOCK), and what the entry is made of
(stat, xattrs, content, symlink target, listing) is read from the fd opened, which must be
the inode lstat found. An entry replaced meanwhile (by a symlink to elsewhere, a fifo,
another file) is one error, "PATH changed while being read"; so is a file whose size or
ctime moved while it was copied or hashed: an image's size is always that of the bytes
whose digest it holds. Symlinks, devices, fifos and sockets are opened O_PATH only (their
xattrs through its /proc/self/fd link); only a regular file or directory is ever read.

The directory walk is sequential (it is metadata-bound); it holds one fd per level. The
fs-verity digests run on the object worker processes (pycfs.host.workers, `threads` of them:
the project's one way to hash in parallel), which open the files by name again and hash
them only while they are the inode, size and ctime the walk saw (`fsverity.identity`). With
a digest store the walk copies each file (reflinked where possible) into a temporary file in
the store, from the fd it checked, and that copy is what is hashed and renamed to its digest,
so a store object's content is always what its name says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as _stat
import tempfile
from dataclasses import dataclass

import trio

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import CHANGED, CHANGED_MESSAGE, Identity, identity
from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Socket,
    Stat,
    Symlink,
    object_path,
)

INLINE_MAX = 64  # LCFS_RECOMMENDED_INLINE_CONTENT_MAX
FS_VERITY_HASH_ALG_SHA256 = 1

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = _OPEN_FILE | os.O_DIRECTORY
_OPEN_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# An entry lstat'ed a moment ago that an open finds a symlink (O_NOFOLLOW), no directory
# (O_DIRECTORY), gone, or a socket: another took its name.
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ENXIO})


@dataclass
class ScanOptions:
    digest_store: str | None = None
    use_epoch: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False
    threads: int = 0  # 0 = number of CPUs


class ScanError(PycfsError):
    pass


def _changed(path: str) -> ScanError:
    return ScanError(f"{path} {CHANGED_MESSAGE}")


@dataclass
class _Pending:
    """A regular file over INLINE_MAX bytes, hashed after the walk: ``source`` (the file
    itself, or its private copy in the store) holds ``size`` bytes; ``expect``: the walk's
    `identity` of the file, which the hashing checks (None for a copy: nobody changes it)."""
    leaf: Leaf
    path: str
    source: str
    size: int
    expect: Identity | None


def _read_xattrs(target: int | str, path: str, opts: ScanOptions) -> dict[bytes, bytes]:
    """The xattrs of an open fd, or of the inode an O_PATH fd's /proc/self/fd link leads to."""
    if opts.skip_xattrs:
        return {}
    try:
        names = os.listxattr(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise ScanError(f"cannot list xattrs of {path}: {e.strerror}") from None
    out: dict[bytes, bytes] = {}
    for name in names:
        if opts.user_xattrs and not name.startswith("user."):
            continue
        try:
            out[os.fsencode(name)] = os.getxattr(target, name)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed since listxattr
                continue
            raise ScanError(f"cannot read xattr {name} of {path}: {e.strerror}") from None
    return out


def _stat_of(st: os.stat_result, xattrs: dict[bytes, bytes], opts: ScanOptions) -> Stat:
    if opts.use_epoch:
        sec, nsec = 0, 0
    else:
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    return Stat(st.st_mode & 0o7777, st.st_uid, st.st_gid, sec, nsec, xattrs)


def _open(dir_fd: int | None, name: str, flags: int, st: os.stat_result, path: str) -> tuple[int, os.stat_result]:
    """Open the entry that lstat described as ``st``: (fd, its fstat), the same inode."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _SWAPPED:
            raise _changed(path) from None
        raise
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino, _stat.S_IFMT(fst.st_mode)) != (st.st_dev, st.st_ino, _stat.S_IFMT(st.st_mode)):
        os.close(fd)
        raise _changed(path)
    return fd, fst


# A directory being walked: its fd, node, path and the names not yet read.
_Frame = tuple[int, Directory, str, list[str]]


def _open_directory(dir_fd: int | None, name: str, st: os.stat_result, path: str,
                    opts: ScanOptions) -> _Frame:
    fd, fst = _open(dir_fd, name, _OPEN_DIR, st, path)
    try:
        node = Directory(_stat_of(fst, _read_xattrs(fd, path, opts), opts))
        try:
            names = os.listdir(fd)
        except OSError as e:
            raise ScanError(f"cannot read directory {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    names.reverse()  # popped from the end: listing order
    return fd, node, path, names


def _walk(top: str, opts: ScanOptions, copies: set[str]) -> tuple[FileSystem, list[_Pending]]:
    """Build the tree; returns it plus the regular files still needing a digest. With a
    digest store, each such file's copy in it is named in ``copies`` as it is made."""
    try:
        st = os.lstat(top)
    except OSError as e:
        raise ScanError(f"cannot stat {top}: {e.strerror}") from None
    if not _stat.S_ISDIR(st.st_mode):
        raise ScanError(f"{top} is not a directory")
    pending: list[_Pending] = []
    try:
        frames = [_open_directory(None, top, st, top, opts)]
    except OSError as e:
        raise ScanError(f"cannot read directory {top}: {e.strerror}") from None
    root = frames[0][1]
    try:
        while frames:
            dir_fd, d, dpath, names = frames[-1]
            if not names:
                os.close(dir_fd)
                frames.pop()
                continue
            name = names.pop()
            path = os.path.join(dpath, name)
            try:
                frame = _add_entry(dir_fd, d, name, path, opts, pending, copies)
            except OSError as e:
                raise ScanError(f"cannot read {path}: {e.strerror}") from None
            if frame is not None:
                frames.append(frame)
    finally:
        for frame in frames:
            os.close(frame[0])
    return FileSystem(root), pending


def _add_entry(dir_fd: int, d: Directory, name: str, path: str, opts: ScanOptions,
               pending: list[_Pending], copies: set[str]) -> _Frame | None:
    """Add one directory entry (regular files > 64 bytes go to `pending`); a directory's
    frame to walk next."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    fmt = _stat.S_IFMT(st.st_mode)
    if opts.skip_devices and fmt in (_stat.S_IFCHR, _stat.S_IFBLK):
        return None
    bname = os.fsencode(name)
    if fmt == _stat.S_IFDIR:
        frame = _open_directory(dir_fd, name, st, path, opts)
        d.entries[bname] = frame[1]
        return frame
    if fmt == _stat.S_IFREG:
        d.entries[bname] = _regular(dir_fd, name, st, path, opts, pending, copies)
    elif fmt in (_stat.S_IFLNK, _stat.S_IFCHR, _stat.S_IFBLK, _stat.S_IFIFO, _stat.S_IFSOCK):
        d.entries[bname] = _special(dir_fd, name, st, path, opts)
    else:
        raise ScanError(f"{path}: unsupported file type 0o{fmt:o}")
    return None


def _regular(dir_fd: int, name: str, st: os.stat_result, path: str, opts: ScanOptions,
             pending: list[_Pending], copies: set[str]) -> Leaf:
    fd, fst = _open(dir_fd, name, _OPEN_FILE, st, path)
    try:
        stt = _stat_of(fst, _read_xattrs(fd, path, opts), opts)
        if fst.st_size <= INLINE_MAX:
            data = os.pread(fd, INLINE_MAX + 1, 0)
            if len(data) > INLINE_MAX:
                raise _changed(path)
            return Leaf(stt, Inline(data))
        leaf = Leaf(stt, Inline(b""))  # its digest comes from the workers
        if opts.digest_store is None:
            pending.append(_Pending(leaf, path, path, fst.st_size, identity(fst)))
        else:
            tmp, size = _copy_into_store(opts.digest_store, fd, fst, path, copies)
            pending.append(_Pending(leaf, path, tmp, size, None))
        return leaf
    finally:
        os.close(fd)


def _special(dir_fd: int, name: str, st: os.stat_result, path: str, opts: ScanOptions) -> Leaf:
    """A symlink, device, fifo or socket: never opened for reading."""
    fmt = _stat.S_IFMT(st.st_mode)
    if fmt == _stat.S_IFLNK or not opts.skip_xattrs:
        fd, st = _open(dir_fd, name, _OPEN_PATH, st, path)
        try:
            xattrs = _read_xattrs(f"/proc/self/fd/{fd}", path, opts)
            target = os.readlink(b"", dir_fd=fd) if fmt == _stat.S_IFLNK else b""
        finally:
            os.close(fd)
    else:
        xattrs = {}
    stt = _stat_of(st, xattrs, opts)
    if fmt == _stat.S_IFLNK:
        return Leaf(stt, Symlink(target))
    if fmt == _stat.S_IFCHR:
        return Leaf(stt, CharDevice(st.st_rdev))
    if fmt == _stat.S_IFBLK:
        return Leaf(stt, BlockDevice(st.st_rdev))
    return Leaf(stt, Fifo() if fmt == _stat.S_IFIFO else Socket())


def _copy_into_store(store: str, src: int, st: os.stat_result, path: str, copies: set[str]) -> tuple[str, int]:
    """A private copy of the file open at src (fstat ``st``) in the store (reflinked where
    possible, like C): its tmp name (in ``copies``) and size."""
    tmp_fd, tmp_path = tempfile.mkstemp(prefix=".tmp", dir=store)
    copies.add(tmp_path)
    try:
        try:
            syscalls.ficlone(tmp_fd, src)
        except OSError:
            offset = 0
            while offset < st.st_size:
                n = os.copy_file_range(src, tmp_fd, st.st_size - offset, offset, offset)
                if n == 0:
                    break
                offset += n
        if identity(os.fstat(src)) != identity(st):  # a copy_file_range copy may mix versions
            raise _changed(path)
        os.fchmod(tmp_fd, 0o644)
        return tmp_path, os.fstat(tmp_fd).st_size
    finally:
        os.close(tmp_fd)


def _place_in_store(store: str, tmp_path: str, digest: bytes) -> None:
    """Name the hashed copy STORE/XX/rest (fs-verity enabled where the filesystem has it)."""
    dest = os.path.join(store, os.fsdecode(object_path(digest)))
    if os.path.exists(dest):
        os.unlink(tmp_path)
        return
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except FileExistsError:
        raise ScanError(f"cannot store objects in {parent}: it is not a directory") from None
    fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.fsverity_enable(fd, FS_VERITY_HASH_ALG_SHA256)
    except OSError:
        pass  # C ignores this too: the kernel or filesystem may lack fs-verity
    finally:
        os.close(fd)
    os.rename(tmp_path, dest)


def _place_all(store: str, pending: list[_Pending], digests: list[bytes], copies: set[str]) -> None:
    for p, digest in zip(pending, digests):
        try:
            _place_in_store(store, p.source, digest)
        except OSError as e:
            raise ScanError(f"cannot store {p.path} in {store}: {e.strerror}") from None
        copies.discard(p.source)


async def scan_directory_async(top: str, opts: ScanOptions) -> FileSystem:
    from pycfs.host.workers.pool import digest_files

    store = opts.digest_store
    copies: set[str] = set()  # copies made in the store and not named by their digest yet
    try:
        fs, pending = await trio.to_thread.run_sync(_walk, top, opts, copies)
        expect = None if store is not None else [p.expect for p in pending if p.expect is not None]
        got = await digest_files([p.source for p in pending], "sha256", opts.threads or None, expect=expect)
        digests: list[bytes] = []
        for p, digest in zip(pending, got):
            if isinstance(digest, OSError):
                if digest.errno == CHANGED:
                    raise _changed(p.path)
                raise ScanError(f"cannot read {p.path}: {digest.strerror}")
            digests.append(digest)
        if store is not None:
            await trio.to_thread.run_sync(_place_all, store, pending, digests, copies)
        for p, digest in zip(pending, digests):
            p.leaf.content = External(digest, p.size)
    finally:
        for tmp in copies:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return fs


def scan_directory(top: str, opts: ScanOptions | None = None) -> FileSystem:
    """Synchronous entry point (runs its own trio loop)."""
    opts = opts or ScanOptions()
    if opts.skip_xattrs and opts.user_xattrs:
        raise ScanError("--skip-xattrs and --user-xattrs cannot be combined (Invalid argument)")
    if opts.threads < 0:
        raise ScanError(f"Invalid threads count {opts.threads}")
    if opts.digest_store is not None:
        os.makedirs(opts.digest_store, mode=0o755, exist_ok=True)
    return trio.run(scan_directory_async, top, opts)
