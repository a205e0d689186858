"""Rootless mounting: a read-only FUSE server for a composefs image (pyfuse3, on trio).

The kernel mounts EROFS only for root. This server shows an ordinary user the tree that
`pycfs mount` as root shows (EROFS image as overlayfs's lower layer, objects/ as its
data-only layer), read from the stored inodes rather than the reader's logical tree,
because that is what overlayfs presents: native chr 0:0 entries (whiteouts and the
epoch-1 stubs) are hidden, escaped whiteouts appear as the empty regular files they are
stored as, `trusted.overlay.overlay.*` shows unescaped, other `trusted.overlay.*` is
hidden. Inode numbers come from nids, so hardlinks share one.

File content is read from the repository's objects: each open opens the object once,
read-only and beneath objects/, and checks it is a regular file of the size the image
records (and, in a repository with fs-verity, its kernel-measured digest, as overlayfs's
verity=require does); otherwise that open fails with EIO and the server logs one line.
Everything is immutable, so the kernel caches entries, attributes and pages forever, and
modes are enforced by the kernel (`default_permissions`).
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3
import trio
from pycfs.host import syscalls
from pycfs.host.erofs import format as F
from pycfs.host.erofs.reader import (
    ImageFormatError,
    ImageReader,
    RawInode,
    overlay_xattrs,
    read_image,
)
from pycfs.host.errors import PycfsError, user_message
from pycfs.host.fsverity import digest_bytes
from pycfs.host.mount import privileged
from pycfs.host.repository import Repository

log = logging.getLogger("pycfs.fuse")
FuseError = pyfuse3.FUSEError

# The image never changes: let the kernel keep entries and attributes for a year.
CACHE_TIMEOUT = 365 * 86400.0
# How long `pycfs mount` waits for the daemonised server to answer the kernel's INIT.
READY_TIMEOUT = 60.0
# Files up to this size are handed to the kernel's page cache whole on first open, in one
# notification instead of a READ round trip per 128 KiB readahead window (measured on the
# bench image: 30% less CPU for reading every file than with 128 KiB).
PUSH_LIMIT = 1024 * 1024
FUSERMOUNT_TIMEOUT = 30.0

_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class FuseMountError(PycfsError):
    """The FUSE mount could not be made or removed."""


@dataclass
class ServedImage:
    """What the server needs, gathered (and checked) before anything is mounted."""

    image_id: bytes
    reader: ImageReader
    objects_fd: int  # the repository's objects/, open for the server's lifetime
    verity_alg: int | None  # fs-verity algorithm id when the repository has fs-verity


def load_image(repo: Repository, image_id: bytes) -> ServedImage:
    """Read and check the image: its bytes must hash to its name and parse completely."""
    data = repo.read_object(image_id)
    if digest_bytes(data, repo.alg) != image_id:
        raise FuseMountError(f"image {image_id.hex()} is corrupt: its fs-verity digest differs from its name "
                             "(run `pycfs fsck`)")
    try:
        read_image(data)  # walks every inode, dirent and xattr: damage shows now, not mid-serve
    except ImageFormatError as e:
        raise FuseMountError(f"image {image_id.hex()} is not a valid composefs image: {e}") from None
    objects_fd = os.open(repo.path / "objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return ServedImage(image_id, ImageReader(data), objects_fd, repo.hash_alg_id if repo.secure else None)


# ---------------------------------------------------------------------------------------
# The tree as overlayfs shows it


class _Node:
    """One stored inode, decoded once and kept (the image is immutable)."""

    __slots__ = ("attr", "entries", "index", "internal", "raw", "xattrs")

    def __init__(self, raw: RawInode, attr: pyfuse3.EntryAttributes) -> None:
        self.raw = raw
        self.attr = attr
        self.xattrs, self.internal = overlay_xattrs(raw.xattrs)
        self.entries: list[tuple[bytes, int]] | None = None  # directories: visible (name, nid)
        self.index: dict[bytes, int] | None = None


def _is_whiteout(raw: RawInode) -> bool:
    return stat.S_ISCHR(raw.mode) and raw.i_u == 0


class ImageTree:
    """Inodes by FUSE inode number: the root is pyfuse3.ROOT_INODE, every other nid maps to
    nid + 2 (so no nid lands on the root's number)."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.root_nid = reader.sb.root_nid
        self._nodes: dict[int, _Node] = {}
        self._names: dict[int, tuple[int, bytes]] = {}  # nid -> (parent nid, a name), for log lines

    def ino(self, nid: int) -> int:
        return pyfuse3.ROOT_INODE if nid == self.root_nid else nid + 2

    def nid(self, ino: int) -> int:
        return self.root_nid if ino == pyfuse3.ROOT_INODE else ino - 2

    def node(self, nid: int) -> _Node:
        node = self._nodes.get(nid)
        if node is None:
            raw = self.reader.inode(nid)
            node = self._nodes[nid] = _Node(raw, self._attributes(nid, raw))
        return node

    def _attributes(self, nid: int, raw: RawInode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.ino(nid)
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = raw.mode
        a.st_nlink = raw.nlink
        a.st_uid = raw.uid
        a.st_gid = raw.gid
        a.st_rdev = raw.i_u if stat.S_ISCHR(raw.mode) or stat.S_ISBLK(raw.mode) else 0
        a.st_size = raw.size
        a.st_blksize = F.BLOCK_SIZE
        a.st_blocks = (raw.size + 511) // 512
        ns = raw.mtime * 1_000_000_000 + raw.mtime_nsec
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    def entries(self, nid: int) -> list[tuple[bytes, int]]:
        """Visible entries of a directory, in image (byte) order; overlayfs hides whiteouts."""
        node = self.node(nid)
        if node.entries is None:
            if not stat.S_ISDIR(node.raw.mode):
                raise FuseError(errno.ENOTDIR)
            visible = []
            for name, child, ftype in self.reader.dirents(node.raw):
                if name in (b".", b".."):
                    continue
                if ftype == F.FT_CHRDEV and _is_whiteout(self.node(child).raw):
                    continue
                visible.append((name, child))
                self._names.setdefault(child, (nid, name))
            node.entries = visible
            node.index = dict(visible)
        return node.entries

    def lookup(self, nid: int, name: bytes) -> int | None:
        self.entries(nid)
        index = self.node(nid).index
        assert index is not None
        return index.get(name)

    def parent(self, nid: int) -> int:
        return self._names.get(nid, (self.root_nid, b""))[0]

    def path(self, nid: int) -> str:
        """A name of the inode, for messages (the first one seen for hardlinks)."""
        parts = []
        while nid != self.root_nid and nid in self._names:
            nid, name = self._names[nid]
            parts.append(name)
        return "/" + os.fsdecode(b"/".join(reversed(parts)))


class _ObjectProblem(Exception):
    """The object behind a file cannot be served; str() says why."""


# ---------------------------------------------------------------------------------------
# The request handlers


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _guarded(fn: _Handler) -> _Handler:
    """pyfuse3 stops serving on any exception but FUSEError: turn the unexpected into EIO."""

    async def handler(self: ComposefsOperations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FuseError:
            raise
        except Exception as e:  # one bad request must not end the mount
            log.error("%s failed: %s", fn.__name__, e)
            raise FuseError(errno.EIO) from None

    handler.__name__ = fn.__name__
    return cast(_Handler, handler)


class ComposefsOperations(pyfuse3.Operations):
    """Read-only request handlers over an `ImageTree` and the repository's objects."""

    enable_acl = True  # the kernel enforces POSIX ACLs stored in the image, as for EROFS

    def __init__(self, image: ServedImage, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.image = image
        self.tree = ImageTree(image.reader)
        self._on_ready = on_ready
        self._open: dict[int, int | bytes | None] = {}  # fh -> object fd, inline bytes, None (zeros)
        self._sizes: dict[int, int] = {}  # fh -> file size (zero-filled files)
        self._next_fh = 1
        self._reported: set[int] = set()  # nids whose broken object was logged already
        self._pushed: set[int] = set()  # nids whose content notify_store gave the kernel
        self._pushing = True
        # EROFS lists trusted.* only to CAP_SYS_ADMIN of the initial namespace (getxattr is
        # refused by the VFS); a server in a user namespace has no such caller
        self._trusted_for_root = privileged()

    def init(self) -> None:
        # Called once the kernel's INIT is answered: the mount works from here on.
        if self._on_ready is not None:
            self._on_ready()

    def _node(self, ino: int) -> _Node:
        return self.tree.node(self.tree.nid(ino))

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        nid = self.tree.nid(parent_inode)
        if name == b".":
            return self.tree.node(nid).attr
        if name == b"..":
            return self.tree.node(self.tree.parent(nid)).attr
        child = self.tree.lookup(nid, name)
        if child is None:
            return _NEGATIVE
        return self.tree.node(child).attr

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._node(inode).attr

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.raw.mode):
            raise FuseError(errno.EINVAL)
        return self.image.reader.data_of(node.raw)

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.tree.entries(self.tree.nid(inode))  # ENOTDIR for non-directories
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.tree.entries(self.tree.nid(fh))
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not pyfuse3.readdir_reply(token, name, self.tree.node(child).attr, i + 1):
                break

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise FuseError(errno.EROFS)
        nid = self.tree.nid(inode)
        node = self.tree.node(nid)
        if not stat.S_ISREG(node.raw.mode):
            raise FuseError(errno.EINVAL)
        content = self._content(nid, node)
        if self._pushing and 0 < node.raw.size <= PUSH_LIMIT and nid not in self._pushed:
            self._push(inode, content, node.raw.size)
            self._pushed.add(nid)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = content
        self._sizes[fh] = node.raw.size
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _push(self, inode: int, content: int | bytes | None, size: int) -> None:
        """Put a small file's bytes in the kernel's page cache before its open returns: the
        reads that follow need no round trip to this process."""
        data = os.pread(content, size, 0) if isinstance(content, int) else content
        if data and len(data) == size:
            try:
                pyfuse3.notify_store(inode, 0, data)
            except OSError:
                self._pushing = False  # a kernel without it: the reads come as requests

    def _content(self, nid: int, node: _Node) -> int | bytes | None:
        raw = node.raw
        if raw.datalayout != F.DATALAYOUT_CHUNK_BASED:
            return self.image.reader.data_of(raw)
        redirect = node.internal.get(_REDIRECT)
        if raw.size == 0 or not redirect:
            return None  # no backing object: overlayfs shows the EROFS file's holes
        try:
            return self._open_object(redirect.lstrip(b"/"), raw.size, node.internal.get(_METACOPY))
        except _ObjectProblem as e:
            if nid not in self._reported:
                self._reported.add(nid)
                log.error("%s: object %s %s; reading it gives EIO", self.tree.path(nid), os.fsdecode(redirect), e)
            raise FuseError(errno.EIO) from None

    def _open_object(self, relpath: bytes, size: int, metacopy: bytes | None) -> int:
        try:
            # O_NONBLOCK: a FIFO planted in objects/ must not hang the server
            fd = syscalls.openat2(self.image.objects_fd, relpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise _ObjectProblem("is missing") from None
        except OSError as e:
            raise _ObjectProblem(f"cannot be opened ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _ObjectProblem("is not a regular file")
            if st.st_size != size:
                raise _ObjectProblem(f"has {st.st_size} bytes, the image says {size}")
            if self.image.verity_alg is not None and metacopy:
                want = F.OverlayMetacopy.unpack(metacopy).digest
                got = syscalls.fsverity_measure(fd, self.image.verity_alg)
                if got != want:
                    raise _ObjectProblem("has no fs-verity" if got is None else "has the wrong fs-verity digest")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        content = self._open[fh]
        if isinstance(content, int):
            try:
                return os.pread(content, size, off)
            except OSError as e:
                log.error("reading an object failed: %s", e.strerror)
                raise FuseError(errno.EIO) from None
        if content is None:
            return bytes(max(0, min(size, self._sizes[fh] - off)))
        return content[off:off + size]

    async def release(self, fh: int) -> None:
        content = self._open.pop(fh, None)
        self._sizes.pop(fh, None)
        if isinstance(content, int):
            os.close(content)

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self._node(inode).xattrs[name]
        except KeyError:
            raise FuseError(pyfuse3.ENOATTR) from None

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = list(self._node(inode).xattrs)
        if ctx.uid != 0 or not self._trusted_for_root:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = F.BLOCK_SIZE
        s.f_blocks = len(self.image.reader.data) // F.BLOCK_SIZE
        s.f_bfree = s.f_bavail = s.f_ffree = s.f_favail = 0
        s.f_files = len(self.image.reader.data) // 32  # an upper bound: nids are 32-byte slots
        s.f_namemax = 255
        return s


_NEGATIVE = pyfuse3.EntryAttributes()
_NEGATIVE.st_ino = 0  # cached as "no such entry" for entry_timeout
_NEGATIVE.entry_timeout = CACHE_TIMEOUT


# ---------------------------------------------------------------------------------------
# Mounting, serving, daemonising


@contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """libfuse and fusermount3 explain failures on fd 2: catch that text for one error line."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield lambda: (buf.seek(0), buf.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _mount(ops: ComposefsOperations, mountpoint: str) -> None:
    options = {"default_permissions", "ro", "fsname=composefs", "subtype=pycfs"}
    with _stderr_captured() as captured:
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError:
            why = captured().strip() or "libfuse gave no reason"
            if "/dev/fuse" in why or ("fusermount" in why and "not found" in why):
                why += " (FUSE needs /dev/fuse open to you and fusermount3, from Debian's fuse3)"
            raise FuseMountError(f"FUSE mount at {mountpoint} failed: {why}") from None


async def _serve_until_unmounted() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        # The handlers never wait (all their work is synchronous), so more tasks would only
        # hand pyfuse3's read lock around: one task used about 20% less CPU per request.
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    # SIGTERM/SIGINT/SIGHUP: leave the main loop so the mount is removed on the way out.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def serve(image: ServedImage, mountpoint: str, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve in this process until unmounted or signalled; then unmount."""
    ops = ComposefsOperations(image, on_ready)
    _mount(ops, mountpoint)
    try:
        trio.run(_serve_until_unmounted)
    finally:
        pyfuse3.close(unmount=True)


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pycfs mount: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _log_to_syslog() -> None:
    # A daemon has no terminal; the journal (through /dev/log) keeps its lines where there is one.
    if os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pycfs-mount[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def serve_daemon(image: ServedImage, mountpoint: str) -> int:
    """Fork a server that mounts and serves in the background; return its pid once the mount
    answers, or raise with the reason it could not be made."""
    mountpoint = os.path.abspath(mountpoint)  # the server leaves the working directory
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's outcome is checked through the pipe
        os.close(r)
        _daemon_child(image, mountpoint, w)
    os.close(w)
    try:
        answer = _read_answer(r, pid)
    finally:
        os.close(r)
    if answer == "ready":
        return pid
    os.waitpid(pid, 0)
    raise FuseMountError(answer)


def _read_answer(r: int, pid: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGTERM)
            return f"the FUSE server did not answer within {READY_TIMEOUT:.0f} s"
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace").strip()
    return text or "the FUSE server exited before the mount was ready"


class _Answer:
    """The pipe `pycfs mount` waits on: "ready" or one error line, sent once."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, text: str) -> None:
        if self.fd is None:
            log.error("%s", text)  # after the mount was ready: only the log can tell
            return
        try:
            os.write(self.fd, text.encode())
        except OSError:
            pass  # the caller is gone; the mount serves anyway
        os.close(self.fd)
        self.fd = None


def _daemon_child(image: ServedImage, mountpoint: str, w: int) -> None:  # pragma: no cover
    answer = _Answer(w)
    status = 1
    try:
        os.setsid()
        os.chdir("/")  # hold no directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        _log_to_syslog()

        def ready() -> None:
            answer.send("ready")
            os.dup2(devnull, 2)  # the caller returns now; nothing may keep its stderr open

        serve(image, mountpoint, ready)
        status = 0
    except BaseException as e:  # reported to the waiting parent, in one line
        answer.send(user_message(e))
    finally:
        os._exit(status)


def fuse_unmount(mountpoint: str) -> None:
    """Unmount a FUSE mount as its (unprivileged) owner, also when its server was killed."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise FuseMountError("fusermount3 is not installed (Debian package fuse3): cannot unmount as a user")
    try:
        p = subprocess.run([tool, "-u", mountpoint], capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FuseMountError(f"unmounting {mountpoint}: fusermount3 did not finish within "
                             f"{FUSERMOUNT_TIMEOUT:.0f} s") from None
    if p.returncode != 0:
        why = p.stderr.decode(errors="replace").strip().splitlines()
        raise FuseMountError(f"unmounting {mountpoint} failed: {why[-1] if why else f'status {p.returncode}'}")
