"""The request loop: requests from /dev/fuse, replies to it, one at a time."""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from pycfs.host.fuse.image import CACHE_TIMEOUT, FuseError
from pycfs.host.fuse.operations import MAX_READ, ComposefsOperations, FileRange, ObjectProblem
from pycfs.host.fuse.splice import Splicer
from pycfs.protocol import fuse

if TYPE_CHECKING:
    from pycfs.host.fuse.readahead import Pusher

log = logging.getLogger("pycfs.fuse")

# A request's buffer: the kernel refuses reads of /dev/fuse smaller than max_write + headers;
# names and xattr values are far smaller.
REQUEST_BUFFER = 132 * 1024

Payload: TypeAlias = bytes | bytearray | memoryview | FileRange


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
        self._refusals: set[int] = set()  # nodes a reply to was refused by the kernel (logged)
        self._splicer = Splicer()
        self._buf = bytearray(REQUEST_BUFFER)
        self._view = memoryview(self._buf)
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
        while self.serve_one():
            pass

    def serve_one(self, timeout: float | None = None) -> bool:
        """Answer one request, waiting for it at most `timeout` seconds when given; False once
        the file system is unmounted."""
        if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
            return True
        try:
            n = os.readv(self.fd, [self._buf])
        except OSError as e:
            if e.errno == errno.ENOENT:  # the request was interrupted before it was read
                return True
            if e.errno == errno.ENODEV:
                return False
            raise
        _, opcode, unique, nodeid, uid, _, _, _, _ = _IN_HEADER.unpack_from(self._buf)
        self.answer(opcode, unique, nodeid, uid, self._view[_IN_HEADER.size:n])
        return True

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
            if e.errno == errno.EINVAL:  # the kernel refused the reply: that request fails, not the server
                self._refused(opcode, unique, nodeid)
                error = -errno.EIO
            elif e.errno != errno.ENOENT:  # ENOENT: the caller was interrupted and left
                raise
        if self._then is not None and error == 0:
            self._then()  # after the reply: the caller is not kept waiting for it

    def _refused(self, opcode: int, unique: int, nodeid: int) -> None:
        """The kernel refused a reply (EINVAL): it failed the request with EIO, or, if it
        never took the reply for that request's, this EIO ends it. One line per node."""
        if nodeid not in self._refusals:
            self._refusals.add(nodeid)
            log.error("%s: the kernel refused the reply to request %d; it gets EIO",
                      self.ops.tree.path(self.ops.tree.nid(nodeid)), opcode)
        try:
            os.writev(self.fd, [fuse.reply_header(unique, -errno.EIO, 0)])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):  # the kernel had ended it already
                raise

    def _ready(self) -> None:
        if self._on_ready is not None:
            self._on_ready()
        if self._pusher is not None:  # after the caller is answered: the process inherits no pipe to it
            self._pusher.start()

    def close(self) -> None:
        if self._pusher is not None:
            self._pusher.stop(self.serve_one)
        self._splicer.close()

    def _send_range(self, unique: int, r: FileRange) -> bool:
        """Send a READ's object bytes; False when the object let us down (logged)."""
        header = fuse.reply_header(unique, 0, r.length)
        try:
            self._splicer.send(self.fd, header, r.fd, r.offset, r.length)
            return True
        except ObjectProblem as e:
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
        self._then = self._ready  # the mount works once this is answered
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
_IN_HEADER = fuse.InHeader.FORMAT
_READ_IN = fuse.ReadIn.FORMAT


# a cacheable "no such entry": node id 0, valid for the cache timeout
_NEGATIVE = fuse.EntryOut(0, 0, CACHE_TIMEOUT, CACHE_TIMEOUT).pack() + bytes(fuse.Attr.FORMAT.size)
