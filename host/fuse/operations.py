"""The requests a read-only server answers, in Python terms, over an `ImageTree` and the
repository's objects by node id."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

from pycfs.host import syscalls
from pycfs.host.erofs import format as F
from pycfs.host.fuse.image import FuseError, ImageTree, Node, ServedImage
from pycfs.host.mount import privileged
from pycfs.protocol import fuse
from pycfs.protocol.text import printable

log = logging.getLogger("pycfs.fuse")

# The largest READ the kernel may send (max_pages): 1 MiB, the kernel's default ceiling.
MAX_READ = 1 << 20
# Object fds kept open after a read, for the reads of the same file that follow.
OPEN_OBJECTS = 64
# The longest symlink target the kernel takes in a READLINK reply (a page, less its NUL); it
# refuses a longer reply (EINVAL), and Linux makes no longer symlink.
MAX_SYMLINK = 4095
# Objects are opened beneath objects/, following no symlink and crossing no mount: a mount
# point below objects/ (the server's own, even) is never walked into.
OBJECT_RESOLVE = syscalls.RESOLVE_CONFINED | syscalls.RESOLVE_NO_XDEV

METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"


class ObjectProblem(Exception):
    """The object behind a file cannot be served; str() says why."""



class ComposefsOperations:
    """Read-only answers over an `ImageTree` and the repository's objects, by node id."""

    def __init__(self, image: ServedImage) -> None:
        self.image = image
        self.tree = ImageTree(image.reader)
        self._fds: OrderedDict[int, int] = OrderedDict()  # nid -> its checked object, most recent last
        self._reported: set[int] = set()  # nids whose broken object (or symlink) was logged already
        # EROFS lists trusted.* only to CAP_SYS_ADMIN of the initial namespace (getxattr is
        # refused by the VFS); a server in a user namespace has no such caller
        self._trusted_for_root = privileged()

    def _node(self, ino: int) -> Node:
        return self.tree.node(self.tree.nid(ino))

    def lookup(self, parent_ino: int, name: bytes) -> Node | None:
        nid = self.tree.nid(parent_ino)
        if name == b".":
            return self.tree.node(nid)
        if name == b"..":
            return self.tree.node(self.tree.parent(nid))
        child = self.tree.lookup(nid, name)
        return None if child is None else self.tree.node(child)

    def getattr(self, ino: int) -> Node:
        return self._node(ino)

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.raw.mode):
            raise FuseError(errno.EINVAL)
        if node.raw.size > MAX_SYMLINK:
            nid = self.tree.nid(ino)
            if nid not in self._reported:
                self._reported.add(nid)
                log.error("%s: symlink target of %d bytes, longer than Linux allows (%d); reading it gives EIO",
                          self.tree.path(nid), node.raw.size, MAX_SYMLINK)
            raise FuseError(errno.EIO)
        return self.image.reader.data_of(node.raw)

    def readdir(self, ino: int, offset: int) -> Iterator[tuple[int, bytes, Node]]:
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
        redirect = node.internal.get(REDIRECT)
        if not redirect:
            return bytes(want)  # no backing object: overlayfs shows the EROFS file's holes
        if want == 0:
            return b""
        try:
            return FileRange(nid, self._object(nid, node, redirect), off, want)
        except ObjectProblem as e:
            self.unreadable(nid, str(e))
            raise FuseError(errno.EIO) from None

    def unreadable(self, nid: int, why: str) -> None:
        """The object behind nid cannot be served: one line per file."""
        if nid in self._reported:
            return
        self._reported.add(nid)
        redirect = self.tree.node(nid).internal.get(REDIRECT, b"")
        log.error("%s: object %s %s; reading it gives EIO", self.tree.path(nid), printable(os.fsdecode(redirect)), why)

    def _object(self, nid: int, node: Node, redirect: bytes) -> int:
        """The object behind a file, opened and checked once while it stays among the recent."""
        fd = self._fds.get(nid)
        if fd is not None:
            self._fds.move_to_end(nid)
            return fd
        fd = self.open_object(redirect.lstrip(b"/"), node.raw.size, node.internal.get(METACOPY))
        self._fds[nid] = fd
        if len(self._fds) > OPEN_OBJECTS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def open_object(self, relpath: bytes, size: int, metacopy: bytes | None) -> int:
        """The object, open read-only, if it is a regular file of `size` bytes (with the
        digest in `metacopy` where the repository has fs-verity); ObjectProblem otherwise.
        Nothing else is opened: a device's open has side effects, a fifo's blocks."""
        want = b""
        if self.image.verity_alg is not None:
            try:
                want = F.OverlayMetacopy.unpack(metacopy).digest if metacopy else b""
            except F.FormatError as e:
                raise ObjectProblem(f"has a damaged digest in the image ({e})") from None
            if not want:  # as overlayfs's verity=require: an entry without a digest is refused
                raise ObjectProblem("has no fs-verity digest in the image, which this repository requires")
        try:
            fd, st = syscalls.open_regular(self.image.objects_fd, relpath, resolve=OBJECT_RESOLVE)
        except FileNotFoundError:
            raise ObjectProblem("is missing") from None
        except syscalls.NotRegularFile as e:
            raise ObjectProblem(f"is not a regular file but {e.kind}") from None
        except OSError as e:
            raise ObjectProblem(f"cannot be opened ({e.strerror})") from None
        try:
            if st.st_size != size:
                raise ObjectProblem(f"has {st.st_size} bytes, the image says {size}")
            if self.image.verity_alg is not None:
                got = syscalls.fsverity_measure(fd, self.image.verity_alg)
                if got != want:
                    raise ObjectProblem("has no fs-verity" if got is None else "has the wrong fs-verity digest")
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


def pread_exactly(fd: int, length: int, offset: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise ObjectProblem(f"cannot be read ({e.strerror})") from None
    if len(data) != length:
        raise ObjectProblem("is shorter than the image says")
    return data


class FileRange(NamedTuple):
    """A READ's answer that is bytes of an object: sent by splice, not read into Python."""

    nid: int
    fd: int
    offset: int
    length: int


Payload = bytes | bytearray | memoryview | FileRange
