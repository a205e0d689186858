"""Rootless mounting: a read-only FUSE server for a composefs image, speaking the kernel's
FUSE protocol (pycfs.protocol.fuse) on /dev/fuse itself.

The kernel mounts EROFS only for root. This server shows an ordinary user the tree that
`pycfs mount` as root shows (EROFS image as overlayfs's lower layer, objects/ as its
data-only layer), read from the stored inodes rather than the reader's logical tree,
because that is what overlayfs presents: native chr 0:0 entries (whiteouts and the
epoch-1 stubs) are hidden, escaped whiteouts appear as the empty regular files they are
stored as, `trusted.overlay.overlay.*` shows unescaped, other `trusted.overlay.*` is
hidden. Inode numbers come from nids, so hardlinks share one.

File content is read from the repository's objects: the first read of a file opens its
object, read-only and beneath objects/, and checks it is a regular file of the size the
image records (and, in a repository with fs-verity, its kernel-measured digest, as
overlayfs's verity=require does); otherwise reading that file fails with EIO and the
server logs one line. Everything is immutable, so the kernel caches entries, attributes,
symlinks, directory listings and pages forever, opens files and directories without
asking (OPEN answered ENOSYS), and enforces modes itself (`default_permissions`).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import logging
import logging.handlers
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from queue import Empty, Full, Queue
from dataclasses import dataclass
from typing import Any, NamedTuple

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
from pycfs.host.tree import Directory, FileSystem, Inode
from pycfs.protocol import fuse

log = logging.getLogger("pycfs.fuse")

# The image never changes: let the kernel keep entries and attributes for a year (seconds).
CACHE_TIMEOUT = 365 * 86400
# How long `pycfs mount` waits for the daemonised server to answer the kernel's INIT.
READY_TIMEOUT = 60.0
FUSERMOUNT_TIMEOUT = 30.0
# How often the server looks whether its mount is still there (see _watch).
WATCH_INTERVAL = 2.0
# The largest READ the kernel may send (max_pages): 1 MiB, the kernel's default ceiling.
MAX_READ = 1 << 20
# A request's buffer: the kernel refuses reads of /dev/fuse smaller than max_write + headers;
# names and xattr values are far smaller.
REQUEST_BUFFER = 132 * 1024
# Object fds kept open after a read, for the reads of the same file that follow.
OPEN_OBJECTS = 64
# Read-ahead done by the server (FUSE_NOTIFY_STORE puts bytes in the kernel's page cache, so
# the reads that follow need no round trip): a read of a file gets the next PUSH_AHEAD of it;
# a walk reading files in order gets the next PUSH_FILES files it will meet, PUSH_BYTES in
# all, at most PUSH_FILE_LIMIT of each. Measured on the bench image: see README.
PUSH_AHEAD = 8 << 20
PUSH_FILES = 64
PUSH_BYTES = 8 << 20
PUSH_FILE_LIMIT = 1 << 20
PUSH_QUEUE = 256
PUSH_NICE = 10
# The pipe file bytes travel through to /dev/fuse: 1 MiB, the default most a user may ask for.
PIPE_SIZE = 1 << 20
# Smaller replies and pushes are read and written (two calls) rather than spliced (three).
SPLICE_FROM = 16 * 1024

_ACL_PREFIX = b"system.posix_acl_"
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"


class FuseMountError(PycfsError):
    """The FUSE mount could not be made or removed."""


@dataclass
class ServedImage:
    """What the server needs, gathered (and checked) before anything is mounted."""

    image_id: bytes
    reader: ImageReader
    objects_fd: int  # the repository's objects/, open for the server's lifetime
    verity_alg: int | None  # fs-verity algorithm id when the repository has fs-verity
    # whether any inode has a POSIX ACL: only then must the kernel ask for them (FUSE's kernel
    # side caches no ACL, so every permission check of a non-owner would be a GETXATTR)
    acls: bool


def load_image(repo: Repository, image_id: bytes) -> ServedImage:
    """Read and check the image: its bytes must hash to its name and parse completely."""
    data = repo.read_object(image_id)
    if digest_bytes(data, repo.alg) != image_id:
        raise FuseMountError(f"image {image_id.hex()} is corrupt: its fs-verity digest differs from its name "
                             "(run `pycfs fsck`)")
    try:
        tree = read_image(data).fs  # walks every inode, dirent and xattr: damage shows now, not mid-serve
    except ImageFormatError as e:
        raise FuseMountError(f"image {image_id.hex()} is not a valid composefs image: {e}") from None
    objects_fd = os.open(repo.path / "objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return ServedImage(image_id, ImageReader(data), objects_fd, repo.hash_alg_id if repo.secure else None,
                       _has_acls(tree))


def _has_acls(fs: FileSystem) -> bool:
    stack: list[Inode] = [fs.root]
    while stack:
        inode = stack.pop()
        if any(name.startswith(_ACL_PREFIX) for name in inode.stat.xattrs):
            return True
        if isinstance(inode, Directory):
            stack.extend(inode.entries.values())
    return False


# ---------------------------------------------------------------------------------------
# The tree as overlayfs shows it


class _Node:
    """One stored inode, decoded once and kept with its replies packed (the image is immutable)."""

    __slots__ = ("_xattrs", "attr_reply", "content", "dtype", "entries", "entry", "index", "ino", "raw")

    def __init__(self, nodeid: int, raw: RawInode) -> None:
        self.raw = raw
        self.ino = nodeid
        sec, nsec = divmod(raw.mtime * 1_000_000_000 + raw.mtime_nsec, 1_000_000_000)
        rdev = raw.i_u if stat.S_ISCHR(raw.mode) or stat.S_ISBLK(raw.mode) else 0
        # packed straight from the fields (listing a directory makes one per entry)
        attr = _ATTR.pack(nodeid, raw.size, (raw.size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, raw.mode,
                          raw.nlink, raw.uid, raw.gid, rdev, F.BLOCK_SIZE, 0)
        self.entry = _ENTRY.pack(nodeid, 0, CACHE_TIMEOUT, CACHE_TIMEOUT, 0, 0) + attr
        self.attr_reply = _ATTR_OUT + attr
        self.dtype = stat.S_IFMT(raw.mode) >> 12  # the d_type of its directory entries
        self._xattrs: tuple[dict[bytes, bytes], dict[bytes, bytes]] | None = None
        self.entries: list[tuple[bytes, int]] | None = None  # directories: visible (name, nid)
        self.index: dict[bytes, int] | None = None
        self.content: bytes | None = None  # inline files: their bytes, once read

    @property
    def xattrs(self) -> dict[bytes, bytes]:
        """The xattrs overlayfs shows."""
        if self._xattrs is None:
            self._xattrs = overlay_xattrs(self.raw.xattrs)
        return self._xattrs[0]

    @property
    def internal(self) -> dict[bytes, bytes]:
        """overlayfs's own: redirect, metacopy."""
        if self._xattrs is None:
            self._xattrs = overlay_xattrs(self.raw.xattrs)
        return self._xattrs[1]


_ATTR = fuse.Attr.FORMAT
_ENTRY = fuse.EntryOut.FORMAT
_ATTR_OUT = fuse.AttrOut(CACHE_TIMEOUT).pack()


def _is_whiteout(raw: RawInode) -> bool:
    return stat.S_ISCHR(raw.mode) and raw.i_u == 0


class ImageTree:
    """Inodes by FUSE node id: the root is fuse.ROOT_ID, every other nid maps to nid + 2 (so
    no nid lands on the root's number)."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.root_nid = reader.sb.root_nid
        self._nodes: dict[int, _Node] = {}
        self._names: dict[int, tuple[int, bytes]] = {}  # nid -> (parent nid, a name), for log lines
        self.position: dict[int, tuple[int, int]] = {}  # nid -> (parent nid, index among its entries)

    def ino(self, nid: int) -> int:
        return fuse.ROOT_ID if nid == self.root_nid else nid + 2

    def nid(self, ino: int) -> int:
        return self.root_nid if ino == fuse.ROOT_ID else ino - 2

    def node(self, nid: int) -> _Node:
        node = self._nodes.get(nid)
        if node is None:
            node = self._nodes[nid] = _Node(self.ino(nid), self.reader.inode(nid))
        return node

    def entries(self, nid: int) -> list[tuple[bytes, int]]:
        """Visible entries of a directory, in image (byte) order; overlayfs hides whiteouts."""
        node = self.node(nid)
        if node.entries is None:
            if not stat.S_ISDIR(node.raw.mode):
                raise FuseError(errno.ENOTDIR)
            visible: list[tuple[bytes, int]] = []
            for name, child, ftype in self.reader.dirents(node.raw):
                if name in (b".", b".."):
                    continue
                if ftype == F.FT_CHRDEV and _is_whiteout(self.node(child).raw):
                    continue
                self._names.setdefault(child, (nid, name))
                self.position.setdefault(child, (nid, len(visible)))
                visible.append((name, child))
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


class FuseError(Exception):
    """A request's answer is this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


class _ObjectProblem(Exception):
    """The object behind a file cannot be served; str() says why."""


# ---------------------------------------------------------------------------------------
# The requests, answered in Python terms


class ComposefsOperations:
    """Read-only answers over an `ImageTree` and the repository's objects, by node id."""

    def __init__(self, image: ServedImage) -> None:
        self.image = image
        self.tree = ImageTree(image.reader)
        self._fds: OrderedDict[int, int] = OrderedDict()  # nid -> its checked object, most recent last
        self._reported: set[int] = set()  # nids whose broken object was logged already
        # EROFS lists trusted.* only to CAP_SYS_ADMIN of the initial namespace (getxattr is
        # refused by the VFS); a server in a user namespace has no such caller
        self._trusted_for_root = privileged()

    def _node(self, ino: int) -> _Node:
        return self.tree.node(self.tree.nid(ino))

    def lookup(self, parent_ino: int, name: bytes) -> _Node | None:
        nid = self.tree.nid(parent_ino)
        if name == b".":
            return self.tree.node(nid)
        if name == b"..":
            return self.tree.node(self.tree.parent(nid))
        child = self.tree.lookup(nid, name)
        return None if child is None else self.tree.node(child)

    def getattr(self, ino: int) -> _Node:
        return self._node(ino)

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.raw.mode):
            raise FuseError(errno.EINVAL)
        return self.image.reader.data_of(node.raw)

    def readdir(self, ino: int, offset: int) -> Iterator[tuple[int, bytes, _Node]]:
        """(offset of the next entry, name, node) from the entry at `offset` on."""
        entries = self.tree.entries(self.tree.nid(ino))
        for i in range(offset, len(entries)):
            name, child = entries[i]
            yield i + 1, name, self.tree.node(child)

    def read(self, ino: int, off: int, size: int) -> bytes | FileRange:
        """Up to `size` bytes at `off`: the bytes, or where in an object they are."""
        nid = self.tree.nid(ino)
        node = self.tree.node(nid)
        raw = node.raw
        if not stat.S_ISREG(raw.mode):
            raise FuseError(errno.EINVAL)
        want = max(0, min(size, raw.size - off, MAX_READ))
        if raw.datalayout != F.DATALAYOUT_CHUNK_BASED:
            if node.content is None:
                node.content = self.image.reader.data_of(raw)
            return node.content[off:off + want]
        redirect = node.internal.get(_REDIRECT)
        if not redirect:
            return bytes(want)  # no backing object: overlayfs shows the EROFS file's holes
        if want == 0:
            return b""
        try:
            return FileRange(nid, self._object(nid, node, redirect), off, want)
        except _ObjectProblem as e:
            self.unreadable(nid, str(e))
            raise FuseError(errno.EIO) from None

    def unreadable(self, nid: int, why: str) -> None:
        """The object behind nid cannot be served: one line per file."""
        if nid in self._reported:
            return
        self._reported.add(nid)
        redirect = self.tree.node(nid).internal.get(_REDIRECT, b"")
        log.error("%s: object %s %s; reading it gives EIO", self.tree.path(nid), os.fsdecode(redirect), why)

    def _object(self, nid: int, node: _Node, redirect: bytes) -> int:
        """The object behind a file, opened and checked once while it stays among the recent."""
        fd = self._fds.get(nid)
        if fd is not None:
            self._fds.move_to_end(nid)
            return fd
        fd = self._open_object(redirect.lstrip(b"/"), node.raw.size, node.internal.get(_METACOPY))
        self._fds[nid] = fd
        if len(self._fds) > OPEN_OBJECTS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

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

    def getxattr(self, ino: int, name: bytes) -> bytes:
        try:
            return self._node(ino).xattrs[name]
        except KeyError:
            raise FuseError(errno.ENODATA) from None

    def listxattr(self, ino: int, uid: int) -> list[bytes]:
        names = list(self._node(ino).xattrs)
        if uid != 0 or not self._trusted_for_root:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    def statfs(self) -> fuse.Kstatfs:
        blocks = len(self.image.reader.data) // F.BLOCK_SIZE
        # files: an upper bound, nids are 32-byte slots
        return fuse.Kstatfs(blocks, 0, 0, len(self.image.reader.data) // 32, 0, F.BLOCK_SIZE, 255, F.BLOCK_SIZE)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ---------------------------------------------------------------------------------------
# The protocol: requests from /dev/fuse, replies to it


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise _ObjectProblem(f"cannot be read ({e.strerror})") from None
    if len(data) != length:
        raise _ObjectProblem("is shorter than the image says")
    return data


class FileRange(NamedTuple):
    """A READ's answer that is bytes of an object: sent by splice, not read into Python."""

    nid: int
    fd: int
    offset: int
    length: int


Payload = bytes | bytearray | memoryview | FileRange


class Splicer:
    """Sends a message whose body is bytes of a file: the header written into a pipe, the
    file's pages spliced behind it, the pipe spliced to the output. The kernel copies the
    bytes once (page cache to page cache) where pread + write would copy them twice."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe: smaller messages
        # a page for the header, one more for a start that is not page-aligned
        self.limit = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ) - 8192

    def send(self, out: int, header: bytes, fd: int, offset: int, length: int) -> None:
        """Write header + `length` bytes of fd at offset to out, as one write. _ObjectProblem
        when fd has fewer bytes there or cannot be read (nothing is written then); OSError
        from out passes on."""
        if length < SPLICE_FROM or length > self.limit:
            os.writev(out, [header, _pread_exactly(fd, length, offset)])
            return
        os.write(self.w, header)
        try:
            moved = 0
            while moved < length:
                try:
                    n = os.splice(fd, self.w, length - moved, offset_src=offset + moved)
                except OSError as e:
                    raise _ObjectProblem(f"cannot be read ({e.strerror})") from None
                if n == 0:  # a short message would shrink the file in the kernel's cache
                    raise _ObjectProblem("is shorter than the image says")
                moved += n
            total = len(header) + length
            while total:
                total -= os.splice(self.r, out, total)
        except BaseException:
            self._drain()
            raise

    def _drain(self) -> None:
        try:
            while os.read(self.r, PIPE_SIZE):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _xattr_reply(value: bytes, body: memoryview) -> bytes:
    """GETXATTR/LISTXATTR: size 0 asks only for the length; a smaller buffer is ERANGE."""
    size = fuse.GetxattrIn.unpack_from(body).size
    if size == 0:
        return fuse.GetxattrOut(len(value)).pack()
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value


class FuseServer:
    """Answers the kernel's requests on one /dev/fuse connection, one at a time.

    Every request is answered synchronously from memory or one pread, so a single thread
    with blocking reads and writes is the fastest way through: no event loop between the
    kernel and the answer."""

    def __init__(self, ops: ComposefsOperations, fd: int, on_ready: Callable[[], None] | None = None,
                 pusher: Pusher | None = None) -> None:
        self.ops = ops
        self.fd = fd
        self._on_ready = on_ready
        self._pusher = pusher
        self._then: Callable[[], None] | None = None  # what the handler wants done once it is answered
        self._splicer = Splicer()
        self._handlers: dict[int, Callable[[int, int, memoryview], Payload]] = {
            fuse.LOOKUP: self._lookup, fuse.GETATTR: self._getattr, fuse.READLINK: self._readlink,
            fuse.READ: self._read, fuse.READDIRPLUS: self._readdirplus, fuse.GETXATTR: self._getxattr,
            fuse.LISTXATTR: self._listxattr, fuse.STATFS: self._statfs, fuse.INIT: self._init,
            fuse.DESTROY: lambda *_: b"",
            # ENOSYS once and the kernel opens files and directories without asking again,
            # keeps their pages and caches directory listings (nothing here changes)
            fuse.OPEN: self._enosys, fuse.OPENDIR: self._enosys,
        }

    def serve(self) -> None:
        """Answer requests until the file system is unmounted (the kernel's ENODEV)."""
        buf = bytearray(REQUEST_BUFFER)
        view = memoryview(buf)
        header = fuse.InHeader.FORMAT
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before it was read
                    continue
                if e.errno == errno.ENODEV:
                    return
                raise
            _, opcode, unique, nodeid, uid, _, _, _, _ = header.unpack_from(buf)
            self.answer(opcode, unique, nodeid, uid, view[header.size:n])

    def answer(self, opcode: int, unique: int, nodeid: int, uid: int, body: memoryview) -> None:
        if opcode in fuse.NO_REPLY:
            return  # nodes live as long as the server: nothing to forget
        handler = self._handlers.get(opcode, self._enosys)
        self._then = None
        try:
            payload = handler(nodeid, uid, body)
            error = 0
        except FuseError as e:
            payload, error = b"", -e.errno
        except Exception as e:  # one bad request must not end the mount
            log.error("request %d on node %d failed: %s", opcode, nodeid, e)
            payload, error = b"", -errno.EIO
        try:
            if isinstance(payload, FileRange) and not self._send_range(unique, payload):
                payload, error = b"", -errno.EIO
            if not isinstance(payload, FileRange):
                os.writev(self.fd, [fuse.reply_header(unique, error, len(payload)), payload])
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the caller was interrupted and left
                raise
        if self._then is not None and error == 0:
            self._then()  # after the reply: the caller is not kept waiting for it

    def close(self) -> None:
        self._splicer.close()

    def _send_range(self, unique: int, r: FileRange) -> bool:
        """Send a READ's object bytes; False when the object let us down (logged)."""
        header = fuse.reply_header(unique, 0, r.length)
        try:
            self._splicer.send(self.fd, header, r.fd, r.offset, r.length)
            return True
        except _ObjectProblem as e:
            self.ops.unreadable(r.nid, str(e))
            return False

    def _enosys(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        raise FuseError(errno.ENOSYS)

    def _init(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        init = fuse.InitIn.unpack_from(body)
        if init.major != fuse.KERNEL_VERSION:
            log.error("the kernel speaks FUSE %d.%d; this server speaks %d", init.major, init.minor,
                      fuse.KERNEL_VERSION)
            raise FuseError(errno.EPROTO)
        want = (fuse.ASYNC_READ | fuse.BIG_WRITES | fuse.DO_READDIRPLUS | fuse.NO_OPEN_SUPPORT | fuse.PARALLEL_DIROPS
                | fuse.MAX_PAGES | fuse.CACHE_SYMLINKS | fuse.NO_OPENDIR_SUPPORT)
        if self.ops.image.acls:  # the kernel enforces them, as for EROFS
            want |= fuse.POSIX_ACL
        self._then = self._on_ready  # the mount works once this is answered
        return fuse.InitOut(fuse.KERNEL_VERSION, min(init.minor, fuse.KERNEL_MINOR_VERSION), init.max_readahead,
                            init.flags & want, max_background=16, congestion_threshold=12, max_write=4096,
                            time_gran=1, max_pages=MAX_READ // 4096).pack()

    def _lookup(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        node = self.ops.lookup(nodeid, bytes(body[:-1]))
        return _NEGATIVE if node is None else node.entry

    def _getattr(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        return self.ops.getattr(nodeid).attr_reply

    def _readlink(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        return self.ops.readlink(nodeid)

    def _read(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        _, offset, size, _, _, _, _ = _READ_IN.unpack_from(body)
        data = self.ops.read(nodeid, offset, size)
        if self._pusher is not None:
            end = offset + (data.length if isinstance(data, FileRange) else len(data))
            self._then = functools.partial(self._pusher.after_read, nodeid, offset, end)
        return data

    def _readdirplus(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        args = fuse.ReadIn.unpack_from(body)
        out, used = [], 0
        for next_off, name, node in self.ops.readdir(nodeid, args.offset):
            record = fuse.dirent_record(node.entry + _DIRENT.pack(node.ino, next_off, len(name), node.dtype), name)
            if used + len(record) > args.size:
                break
            out.append(record)
            used += len(record)
        return b"".join(out)

    def _getxattr(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        name = bytes(body[fuse.GetxattrIn.FORMAT.size:-1])
        return _xattr_reply(self.ops.getxattr(nodeid, name), body)

    def _listxattr(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        return _xattr_reply(b"".join(n + b"\0" for n in self.ops.listxattr(nodeid, uid)), body)

    def _statfs(self, nodeid: int, uid: int, body: memoryview) -> Payload:
        return self.ops.statfs().pack()


_DIRENT = fuse.Dirent.FORMAT
_READ_IN = fuse.ReadIn.FORMAT
_STORE_HEADER = fuse.OutHeader.FORMAT.size + fuse.NotifyStoreOut.FORMAT.size


_Job = tuple[int, _Node, int, int, tuple[int, int] | None]  # nid, node, start, end, (parent nid, index)


class _Walk(NamedTuple):
    """Push what a walk of the tree meets after this entry."""

    parent: int
    at: int  # the entry's index among the parent's


class Pusher:
    """The server's read-ahead: what a reader will want next goes into the kernel's page cache
    through FUSE_NOTIFY_STORE, from a thread of its own.

    Its own thread, because a store waits for the page locks of reads still pending in the
    kernel, and only the request loop answers those: the loop hands work over and never waits
    for it (when the queue is full, that read-ahead is dropped). What is pushed is decided by
    the reads the loop answers: a read past the start of a file gets the next PUSH_AHEAD of it;
    the first read of a file that comes after the previously first-read file in a walk of the
    tree (later in its directory, or in a later directory of the same parent: reading in
    order, as `cp -r`, `tar` or `find | xargs cat` do) gets the next PUSH_FILES files (at
    most PUSH_BYTES) that walk meets, less those the reader reaches first. Stores the kernel
    refuses (an inode it forgot) and objects that cannot be opened are skipped: the reads
    that follow, if any, say why."""

    def __init__(self, ops: ComposefsOperations, fd: int) -> None:
        self.ops = ops
        self.fd = fd
        self.jobs: Queue[_Job | _Walk | None] = Queue(PUSH_QUEUE)
        self._ahead: dict[int, int] = {}  # nid -> where the queued part of it ends
        self._last_first: tuple[int, int] | None = None  # (parent nid, index) of the latest first read
        self._reached: dict[int, int] = {}  # parent nid -> the index of the latest first read in it
        self._read_to: dict[int, int] = {}  # nid -> the furthest a READ of it reached
        self._thread = threading.Thread(target=self._run, name="pycfs-fuse-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        while True:  # what is still queued is of no use now
            try:
                self.jobs.get_nowait()
                self.jobs.task_done()
            except Empty:
                break
        self.jobs.put(None)
        # bounded: a store may wait on a read the stopped loop no longer answers
        self._thread.join(READY_TIMEOUT)

    def after_read(self, ino: int, offset: int, end: int) -> None:
        """The loop answered a read of `ino` from `offset` to `end`: queue what follows."""
        tree = self.ops.tree
        nid = tree.nid(ino)
        node = tree.node(nid)
        if self._read_to.get(nid, 0) < end:
            self._read_to[nid] = end
        if end < node.raw.size:
            self._queue(nid, node, max(end, self._ahead.get(nid, 0)), min(node.raw.size, end + PUSH_AHEAD))
        position = tree.position.get(nid)
        if offset != 0 or position is None:
            return
        previous, self._last_first = self._last_first, position
        self._reached[position[0]] = position[1]
        if previous is not None and self._in_order(previous, position):
            try:  # which files follow is worked out by the pusher, off the loop's way
                self.jobs.put_nowait(_Walk(*position))
            except Full:
                pass

    def _in_order(self, previous: tuple[int, int], current: tuple[int, int]) -> bool:
        """Is `current` after `previous` in a walk of the tree: later in the same directory, or
        in a directory after previous's among their parent's entries?"""
        if previous[0] == current[0]:
            return previous[1] < current[1]
        here, there = self.ops.tree.position.get(previous[0]), self.ops.tree.position.get(current[0])
        return here is not None and there is not None and here[0] == there[0] and here[1] < there[1]

    def _files_after(self, parent: int, index: int) -> Iterator[tuple[int, tuple[int, int]]]:
        """(nid, (parent nid, index)) of the regular files a walk meets after the entry at
        index: the rest of the directory, then the files of the directories after it."""
        tree = self.ops.tree
        while True:
            entries = tree.entries(parent)
            for i in range(index + 1, len(entries)):
                child = entries[i][1]
                if stat.S_ISREG(tree.node(child).raw.mode):
                    yield child, (parent, i)
            up = tree.position.get(parent)
            if up is None:
                return
            grandparent, at = up
            siblings = tree.entries(grandparent)
            after = next((i for i in range(at + 1, len(siblings)) if stat.S_ISDIR(tree.node(siblings[i][1]).raw.mode)),
                         None)
            if after is None:
                return
            parent, index = siblings[after][1], -1

    def _queue(self, nid: int, node: _Node, start: int, end: int) -> None:
        if start >= end:
            return
        try:
            self.jobs.put_nowait((nid, node, start, end, None))
        except Full:
            return
        self._ahead[nid] = end

    def _run(self) -> None:
        # behind the request loop and the readers when the CPUs are busy: read-ahead only
        # helps while it does not slow what it is for
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUSH_NICE)
        splicer = Splicer()
        try:
            while (job := self.jobs.get()) is not None:
                try:
                    if isinstance(job, _Walk):
                        self._walk(splicer, job)
                    else:
                        self._push_one(splicer, *job)
                except OSError:  # /dev/fuse is gone: the mount is
                    return
                finally:
                    self.jobs.task_done()
        finally:
            splicer.close()

    def _walk(self, splicer: Splicer, walk: _Walk) -> None:
        """Push the start of the next PUSH_FILES files (PUSH_BYTES) a walk meets after the
        entry at walk.at of walk.parent, less those pushed already."""
        budget = PUSH_BYTES
        for count, (nid, position) in enumerate(self._files_after(walk.parent, walk.at)):
            if count == PUSH_FILES or budget <= 0:
                return
            node = self.ops.tree.node(nid)
            start, end = self._ahead.get(nid, 0), min(node.raw.size, PUSH_FILE_LIMIT)
            if start < end:  # of a big file, its start: the rest follows its reads
                budget -= end - start
                self._ahead[nid] = end
                self._push_one(splicer, nid, node, start, end, position)

    def _push_one(self, splicer: Splicer, nid: int, node: _Node, start: int, end: int,
                  position: tuple[int, int] | None) -> None:
        """Push one range unless the reader got there first; OSError only when /dev/fuse fails."""
        if position is not None and self._reached.get(position[0], -1) >= position[1]:
            return
        try:
            self._push(splicer, nid, node, start, end)
        except _ObjectProblem:
            pass
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted
                raise
            # ENOENT: the kernel no longer has the inode; anything else: the reads will say
        except Exception as e:  # read-ahead is an optimisation: it must not stop for one file
            log.error("%s: read-ahead failed: %s", self.ops.tree.path(nid), e)

    def _push(self, splicer: Splicer, nid: int, node: _Node, start: int, end: int) -> None:
        ino = self.ops.tree.ino(nid)
        raw = node.raw
        if raw.datalayout != F.DATALAYOUT_CHUNK_BASED:
            if node.content is None:
                node.content = self.ops.image.reader.data_of(raw)
            data = node.content[start:end]
            os.writev(self.fd, [_store_header(ino, start, len(data)), data])
            return
        redirect = node.internal.get(_REDIRECT)
        if not redirect:
            return  # zeros: the kernel's own reads are as cheap
        fd = self.ops._open_object(redirect.lstrip(b"/"), raw.size, node.internal.get(_METACOPY))
        try:
            for offset in range(start, end, splicer.limit):
                length = min(splicer.limit, end - offset)
                if self._read_to.get(nid, 0) >= offset + length:
                    continue  # the reader got there first
                splicer.send(self.fd, _store_header(ino, offset, length), fd, offset, length)
        finally:
            os.close(fd)


def _store_header(ino: int, offset: int, length: int) -> bytes:
    return _OUT_HEADER.pack(_STORE_HEADER + length, fuse.NOTIFY_STORE, 0) + _STORE_OUT.pack(ino, offset, length, 0)


_OUT_HEADER = fuse.OutHeader.FORMAT
_STORE_OUT = fuse.NotifyStoreOut.FORMAT


# a cacheable "no such entry": node id 0, valid for the cache timeout
_NEGATIVE = fuse.EntryOut(0, 0, CACHE_TIMEOUT, CACHE_TIMEOUT).pack() + bytes(fuse.Attr.FORMAT.size)


# ---------------------------------------------------------------------------------------
# Mounting, serving, daemonising


class _Stop(BaseException):
    """A termination signal: leave the request loop so the mount is removed on the way out
    (a BaseException, so that no request's error handling takes it for a failed request)."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stop


class _Gone(BaseException):
    """The mount is no longer in the server's mount namespace."""


def _mount_device(mountpoint: bytes) -> bytes | None:
    """major:minor of the (topmost) pycfs FUSE mount at mountpoint, from this namespace's
    mountinfo (read there: a stat of the mount point would ask the server itself)."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            where = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if where == mountpoint and fields[fields.index(b"-") + 1] == b"fuse.pycfs":
                found = fields[2]
    return found


def _watch(device: bytes) -> Callable[[int, Any], None]:
    """A SIGALRM handler that ends serving once no mount of `device` is left here.

    Unmounting removes the mount from the caller's namespace only: a namespace made while it
    was mounted (a rootless podman's pause process, `unshare -m`) keeps a copy, the kernel
    keeps the connection for it, and the server would wait for requests forever."""

    def check(signum: int, frame: Any) -> None:
        with open("/proc/self/mountinfo", "rb") as f:
            if not any(line.split()[2] == device for line in f):
                raise _Gone

    return check


def _mount(mountpoint: str) -> tuple[int, bool]:
    """Open a FUSE connection mounted at mountpoint: (its /dev/fuse fd, whether fusermount3 made it).

    Root (also root of a user namespace that owns its mount namespace) mounts directly; an
    ordinary user through the set-uid fusermount3, which hands back the fd."""
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions"
        try:
            syscalls.mount("composefs", mountpoint, "fuse.pycfs",
                           syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV, options)
            return fd, False
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM:
                raise FuseMountError(f"FUSE mount at {mountpoint} failed: {e.strerror}") from None
    return _mount_through_fusermount(mountpoint), True


def _fusermount() -> str:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise FuseMountError("fusermount3 is not installed (Debian package fuse3): a user cannot mount FUSE without it")
    return tool


def _mount_through_fusermount(mountpoint: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        try:
            proc = subprocess.Popen(  # argv[0] is the name its messages start with
                ["fusermount3", "-o", "ro,default_permissions,fsname=composefs,subtype=pycfs", "--", mountpoint],
                executable=_fusermount(), env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}, pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:
            raise FuseMountError(f"FUSE mount at {mountpoint} failed: fusermount3: {e.strerror}") from None
        theirs.close()  # fusermount3 holds the other end: it closes when it exits
        ours.settimeout(FUSERMOUNT_TIMEOUT)
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            _, err = proc.communicate(timeout=FUSERMOUNT_TIMEOUT)
        except (TimeoutError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            for fd in fds:
                os.close(fd)
            raise FuseMountError(f"FUSE mount at {mountpoint}: fusermount3 did not answer within "
                                 f"{FUSERMOUNT_TIMEOUT:.0f} s") from None
    if proc.returncode != 0 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"fusermount3 exited with status {proc.returncode}"
        if "/dev/fuse" in why:
            why += " (FUSE needs /dev/fuse open to you and fusermount3, from Debian's fuse3)"
        raise FuseMountError(f"FUSE mount at {mountpoint} failed: {why}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def _unmount_quietly(mountpoint: str, through_fusermount: bool) -> None:
    """On the way out after a signal: detach the mount (nothing may be left answering ENOTCONN)."""
    try:
        if through_fusermount:
            subprocess.run([_fusermount(), "-u", "-q", "-z", "--", mountpoint], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
        else:
            syscalls.umount(mountpoint, syscalls.MNT_DETACH)
    except (OSError, subprocess.TimeoutExpired, FuseMountError) as e:
        log.error("unmounting %s failed: %s", mountpoint, e)


def serve(image: ServedImage, mountpoint: str, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve in this process until unmounted or signalled; then unmount."""
    where = os.fsencode(os.path.realpath(mountpoint))  # before: afterwards it would ask this server
    fd, through_fusermount = _mount(mountpoint)
    ops = ComposefsOperations(image)
    pusher = Pusher(ops, fd)
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    device = _mount_device(where)
    if device is not None:
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _watch(device))
        signal.setitimer(signal.ITIMER_REAL, WATCH_INTERVAL, WATCH_INTERVAL)
    mounted = True
    server = FuseServer(ops, fd, on_ready, pusher)
    # what is loaded now lives as long as the server: keep the collector from walking it
    gc.freeze()
    try:
        pusher.start()
        server.serve()
        mounted = False  # served until the kernel said the mount is gone
    except _Stop:
        pass
    except _Gone:
        mounted = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if mounted:
            _unmount_quietly(mountpoint, through_fusermount)
        pusher.stop()
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(fd)
        ops.close()


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
