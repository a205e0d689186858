"""Read a filesystem tree from a directory the way C `mkcomposefs DIR IMAGE` does (C spec 5).

* lstat every entry (symlinks are not followed), permission bits, uid, gid, mtime;
* xattrs of every entry including symlinks (`--skip-xattrs`, `--user-xattrs` filter them);
* regular files of 1..64 bytes are inlined, larger ones become `External` with their fs-verity
  digest (and, with a digest store, are copied to `STORE/XX/rest`); empty files are empty;
* hardlinks are NOT detected: every name is its own inode (C behaviour);
* `--use-epoch` zeroes every mtime; `--skip-devices` drops char/block devices (whiteouts too).

The directory walk is sequential (it is metadata-bound). The fs-verity digests run on the
object worker processes (pycfs.host.workers, `threads` of them: the project's one way to hash
in parallel). With a digest store each file is first copied (reflinked where possible) into a
temporary file in the store, and that copy is what is hashed and renamed to its digest, so a
file changing under the scan can never give a store object whose content differs from its name.
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


def _read_xattrs(path: str, opts: ScanOptions) -> dict[bytes, bytes]:
    if opts.skip_xattrs:
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise ScanError(f"cannot list xattrs of {path}: {e.strerror}") from None
    out: dict[bytes, bytes] = {}
    for name in names:
        if opts.user_xattrs and not name.startswith("user."):
            continue
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
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


def _walk(top: str, opts: ScanOptions) -> tuple[FileSystem, list[tuple[Leaf, str, int]]]:
    """Build the tree; returns it plus the regular files still needing a digest."""
    try:
        st = os.lstat(top)
    except OSError as e:
        raise ScanError(f"cannot stat {top}: {e.strerror}") from None
    if not _stat.S_ISDIR(st.st_mode):
        raise ScanError(f"{top} is not a directory")
    root = Directory(_stat_of(st, _read_xattrs(top, opts), opts))
    pending: list[tuple[Leaf, str, int]] = []
    stack: list[tuple[str, Directory]] = [(top, root)]
    while stack:
        dpath, d = stack.pop()
        try:
            names = os.listdir(os.fsencode(dpath))
        except OSError as e:
            raise ScanError(f"cannot read directory {dpath}: {e.strerror}") from None
        for bname in names:
            path = os.path.join(dpath, os.fsdecode(bname))
            try:
                _add_entry(d, bname, path, opts, pending, stack)
            except OSError as e:
                raise ScanError(f"cannot read {path}: {e.strerror}") from None
    return FileSystem(root), pending


def _add_entry(d: Directory, bname: bytes, path: str, opts: ScanOptions,
               pending: list[tuple[Leaf, str, int]], stack: list[tuple[str, Directory]]) -> None:
    """lstat one directory entry and add it (regular files > 64 bytes go to `pending`)."""
    cst = os.lstat(path)
    fmt = _stat.S_IFMT(cst.st_mode)
    if opts.skip_devices and fmt in (_stat.S_IFCHR, _stat.S_IFBLK):
        return
    stt = _stat_of(cst, _read_xattrs(path, opts), opts)
    if fmt == _stat.S_IFDIR:
        child = Directory(stt)
        d.entries[bname] = child
        stack.append((path, child))
        return
    if fmt == _stat.S_IFREG:
        if cst.st_size <= INLINE_MAX:
            with open(path, "rb") as f:
                data = f.read(INLINE_MAX + 1)
            if len(data) > INLINE_MAX:
                raise ScanError(f"{path} grew while being read")
            leaf = Leaf(stt, Inline(data))
        else:
            # digest filled in later by a worker thread
            leaf = Leaf(stt, Inline(b""))
            pending.append((leaf, path, cst.st_size))
    elif fmt == _stat.S_IFLNK:
        leaf = Leaf(stt, Symlink(os.readlink(os.fsencode(path))))
    elif fmt == _stat.S_IFCHR:
        leaf = Leaf(stt, CharDevice(cst.st_rdev))
    elif fmt == _stat.S_IFBLK:
        leaf = Leaf(stt, BlockDevice(cst.st_rdev))
    elif fmt == _stat.S_IFIFO:
        leaf = Leaf(stt, Fifo())
    elif fmt == _stat.S_IFSOCK:
        leaf = Leaf(stt, Socket())
    else:
        raise ScanError(f"{path}: unsupported file type 0o{fmt:o}")
    d.entries[bname] = leaf


def _copy_into_store(store: str, path: str) -> str:
    """A private copy of path in the store (reflinked where possible, like C): its tmp name."""
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not _stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        tmp_fd, tmp_path = tempfile.mkstemp(prefix=".tmp", dir=store)
        try:
            try:
                syscalls.ficlone(tmp_fd, src)
            except OSError:
                offset, size = 0, os.fstat(src).st_size
                while offset < size:
                    n = os.copy_file_range(src, tmp_fd, size - offset, offset, offset)
                    if n == 0:
                        break
                    offset += n
            os.fchmod(tmp_fd, 0o644)
        except BaseException:
            os.close(tmp_fd)
            os.unlink(tmp_path)
            raise
        os.close(tmp_fd)
        return tmp_path
    finally:
        os.close(src)


def _place_in_store(store: str, tmp_path: str, digest: bytes) -> None:
    """Name the hashed copy STORE/XX/rest (fs-verity enabled where the filesystem has it)."""
    dest = os.path.join(store, os.fsdecode(object_path(digest)))
    if os.path.exists(dest):
        os.unlink(tmp_path)
        return
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.fsverity_enable(fd, FS_VERITY_HASH_ALG_SHA256)
    except OSError:
        pass  # C ignores this too: the kernel or filesystem may lack fs-verity
    finally:
        os.close(fd)
    os.rename(tmp_path, dest)


async def scan_directory_async(top: str, opts: ScanOptions) -> FileSystem:
    from pycfs.host.workers.pool import digest_files

    fs, pending = await trio.to_thread.run_sync(_walk, top, opts)
    store = opts.digest_store
    sources = [path for _, path, _ in pending]
    if store is None:
        hashed = sources
    else:
        hashed = []
        try:
            for path in sources:
                try:
                    hashed.append(await trio.to_thread.run_sync(_copy_into_store, store, path))
                except OSError as e:
                    raise ScanError(f"cannot read {path}: {e.strerror}") from None
            digests = await digest_files(hashed, "sha256", opts.threads or None)
        except BaseException:
            for tmp in hashed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
    if store is None:
        digests = await digest_files(hashed, "sha256", opts.threads or None)
    failed = next(((path, d) for path, d in zip(sources, digests) if isinstance(d, OSError)), None)
    if failed is not None:
        if store is not None:
            for tmp in hashed:
                os.unlink(tmp)
        raise ScanError(f"cannot read {failed[0]}: {failed[1].strerror}")
    for (leaf, _path, size), tmp, digest in zip(pending, hashed, digests):
        assert isinstance(digest, bytes)
        if store is not None:
            await trio.to_thread.run_sync(_place_in_store, store, tmp, digest)
        leaf.content = External(digest, size)
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
