"""Read a filesystem tree from a directory the way C `mkcomposefs DIR IMAGE` does (C spec 5).

* lstat every entry (symlinks are not followed), permission bits, uid, gid, mtime;
* xattrs of every entry including symlinks (`--skip-xattrs`, `--user-xattrs` filter them);
* regular files of 1..64 bytes are inlined, larger ones become `External` with their fs-verity
  digest (and, with a digest store, are copied to `STORE/XX/rest`); empty files are empty;
* hardlinks are NOT detected: every name is its own inode (C behaviour);
* `--use-epoch` zeroes every mtime; `--skip-devices` drops char/block devices (whiteouts too).

The source may change under the walk, and nothing outside it may be read: every entry is
reached from its directory's open fd, opened O_NOFOLLOW | O_NONBLOCK as what the listing's
d_type (or, where that is not a directory or regular file, an lstat) says it is, and what
the entry is made of (stat, xattrs, content, symlink target, listing) is read from that fd.
An entry that is something else when opened is described as what it then is; one that
differs from what lstat found is one error, "PATH changed while being read", and so is a
file whose size or mtime moved while it was copied or hashed: an image's size is always
that of the bytes whose digest it holds. Symlinks, devices, fifos and sockets are opened
O_PATH only (their xattrs through its /proc/self/fd link): only a regular file or a
directory is ever read.

The directory walk is sequential (it is metadata-bound); it holds one fd per level. The
fs-verity digests run on the object worker processes (pycfs.host.workers, `threads` of them:
the project's one way to hash in parallel), which open the files by name again and hash
them only while they are the inode, size and mtime the walk saw (`fsverity.identity`). With
a digest store the walk copies each file (reflinked where possible) into a temporary file in
the store, from the fd it opened, and that copy is what is hashed and renamed to its digest,
so a store object's content is always what its name says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as _stat
import sys
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
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


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


# A regular file over INLINE_MAX bytes, hashed after the walk: its leaf, its path, its source
# (the file itself, or its private copy in the store) of this many bytes, and the walk's
# `identity` of the file, which the hashing checks (None for a copy: nobody changes it).
# Plain tuples: one per file, and the walk is metadata-bound.
_Pending = tuple[Leaf, str, str, int, Identity | None]
_NO_DIGEST_YET = Inline(b"")


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


def _open(dir_fd: int | None, name: str, flags: int, fmt: int, st: os.stat_result | None,
          path: str) -> tuple[int, os.stat_result] | None:
    """Open the entry as a file of type ``fmt``: (fd, its fstat). ``st``: what lstat found,
    which it must still be ("changed while being read" otherwise); None: the listing's
    d_type said so, and an entry no longer of that type is None (the caller lstats it)."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in _SWAPPED:
            raise
        if st is None:
            return None
        raise _changed(path) from None
    fst = os.fstat(fd)
    if _stat.S_IFMT(fst.st_mode) != fmt or (st is not None and (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino)):
        os.close(fd)
        if st is None:
            return None
        raise _changed(path)
    return fd, fst


# A directory being walked: its fd, node, path with a trailing "/", and the entries not yet
# read, last first: their names, and what d_type says each is (_DIR, _FILE, or 0: another
# type or unknown). Two flat lists: a tuple per entry costs the walk a tenth in gc passes.
_Frame = tuple[int, Directory, str, list[str], list[int]]
_DIR, _FILE = 1, 2


def _open_directory(dir_fd: int | None, name: str, st: os.stat_result | None, path: str,
                    opts: ScanOptions) -> _Frame | None:
    opened = _open(dir_fd, name, _OPEN_DIR, _stat.S_IFDIR, st, path)
    if opened is None:
        return None
    fd, fst = opened
    try:
        node = Directory(_stat_of(fst, _read_xattrs(fd, path, opts), opts))
        names: list[str] = []
        kinds: list[int] = []
        try:
            with os.scandir(fd) as listing:
                for e in listing:
                    names.append(e.name)
                    kinds.append(_DIR if e.is_dir(follow_symlinks=False) else
                                 _FILE if e.is_file(follow_symlinks=False) else 0)
        except OSError as e:
            raise ScanError(f"cannot read directory {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    names.reverse()  # popped from the end: listing order
    kinds.reverse()
    return fd, node, path if path.endswith("/") else path + "/", names, kinds


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
        top_frame = _open_directory(None, top, st, top, opts)
    except OSError as e:
        raise ScanError(f"cannot read directory {top}: {e.strerror}") from None
    assert top_frame is not None  # (with st, a mismatch raises)
    frames = [top_frame]
    try:
        while frames:
            dir_fd, d, prefix, names, kinds = frames[-1]
            if not names:
                os.close(dir_fd)
                frames.pop()
                continue
            name = names.pop()
            path = prefix + name
            try:
                frame = _add_entry(dir_fd, d, name, kinds.pop(), path, opts, pending, copies)
            except OSError as e:
                raise ScanError(f"cannot read {path}: {e.strerror}") from None
            if frame is not None:
                frames.append(frame)
    finally:
        for frame in frames:
            os.close(frame[0])
    return FileSystem(top_frame[1]), pending


def _add_entry(dir_fd: int, d: Directory, name: str, kind: int, path: str, opts: ScanOptions,
               pending: list[_Pending], copies: set[str]) -> _Frame | None:
    """Add one directory entry (regular files > 64 bytes go to `pending`); a directory's
    frame to walk next."""
    bname = name.encode(_FS_ENCODING, _FS_ERRORS)
    # A directory or regular file by the listing's d_type is opened as that straight away
    # and described from its fstat; anything else, or what is not that by the time it is
    # opened, is lstat'ed first, then opened as what lstat found.
    if kind == _DIR:
        frame = _open_directory(dir_fd, name, None, path, opts)
        if frame is not None:
            d.entries[bname] = frame[1]
            return frame
    elif kind == _FILE:
        leaf = _regular(dir_fd, name, None, path, opts, pending, copies)
        if leaf is not None:
            d.entries[bname] = leaf
            return None
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    fmt = _stat.S_IFMT(st.st_mode)
    if opts.skip_devices and fmt in (_stat.S_IFCHR, _stat.S_IFBLK):
        return None
    if fmt == _stat.S_IFDIR:
        frame = _open_directory(dir_fd, name, st, path, opts)
        assert frame is not None  # (with st, a mismatch raises)
        d.entries[bname] = frame[1]
        return frame
    if fmt == _stat.S_IFREG:
        leaf = _regular(dir_fd, name, st, path, opts, pending, copies)
        assert leaf is not None
        d.entries[bname] = leaf
    elif fmt in (_stat.S_IFLNK, _stat.S_IFCHR, _stat.S_IFBLK, _stat.S_IFIFO, _stat.S_IFSOCK):
        d.entries[bname] = _special(dir_fd, name, st, path, opts)
    else:
        raise ScanError(f"{path}: unsupported file type 0o{fmt:o}")
    return None


def _regular(dir_fd: int, name: str, st: os.stat_result | None, path: str, opts: ScanOptions,
             pending: list[_Pending], copies: set[str]) -> Leaf | None:
    opened = _open(dir_fd, name, _OPEN_FILE, _stat.S_IFREG, st, path)
    if opened is None:
        return None
    fd, fst = opened
    try:
        stt = _stat_of(fst, _read_xattrs(fd, path, opts), opts)
        size = fst.st_size
        if size <= INLINE_MAX:
            data = os.pread(fd, INLINE_MAX + 1, 0)
            if len(data) > INLINE_MAX:
                raise _changed(path)
            return Leaf(stt, Inline(data))
        leaf = Leaf(stt, _NO_DIGEST_YET)
        if opts.digest_store is None:
            pending.append((leaf, path, path, size, (fst.st_dev, fst.st_ino, size, fst.st_mtime_ns)))
        else:
            tmp, size = _copy_into_store(opts.digest_store, fd, fst, path, copies)
            pending.append((leaf, path, tmp, size, None))
        return leaf
    finally:
        os.close(fd)


def _special(dir_fd: int, name: str, st: os.stat_result, path: str, opts: ScanOptions) -> Leaf:
    """A symlink, device, fifo or socket: never opened for reading."""
    fmt = _stat.S_IFMT(st.st_mode)
    if fmt == _stat.S_IFLNK or not opts.skip_xattrs:
        opened = _open(dir_fd, name, _OPEN_PATH, fmt, st, path)
        assert opened is not None  # (with st, a mismatch raises)
        fd, st = opened
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
    for (_leaf, path, source, _size, _expect), digest in zip(pending, digests):
        try:
            _place_in_store(store, source, digest)
        except OSError as e:
            raise ScanError(f"cannot store {path} in {store}: {e.strerror}") from None
        copies.discard(source)


async def scan_directory_async(top: str, opts: ScanOptions) -> FileSystem:
    from pycfs.host.workers.pool import digest_files

    store = opts.digest_store
    copies: set[str] = set()  # copies made in the store and not named by their digest yet
    try:
        fs, pending = await trio.to_thread.run_sync(_walk, top, opts, copies)
        expect = None if store is not None else [p[4] for p in pending if p[4] is not None]
        got = await digest_files([p[2] for p in pending], "sha256", opts.threads or None, expect=expect)
        digests: list[bytes] = []
        for p, digest in zip(pending, got):
            if isinstance(digest, OSError):
                if digest.errno == CHANGED:
                    raise _changed(p[1])
                raise ScanError(f"cannot read {p[1]}: {digest.strerror}")
            digests.append(digest)
        if store is not None:
            await trio.to_thread.run_sync(_place_all, store, pending, digests, copies)
        for (leaf, _path, _source, size, _expect), digest in zip(pending, digests):
            leaf.content = External(digest, size)
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
