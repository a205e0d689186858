"""The image as overlayfs shows it: inodes by FUSE node id, their replies packed once."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from pycfs.host.erofs import format as F
from pycfs.host.erofs.reader import ImageFormatError, ImageReader, RawInode, check_image, overlay_xattrs
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository
from pycfs.protocol import fuse
from pycfs.protocol.text import printable

# The image never changes: let the kernel keep entries and attributes for a year (seconds).
CACHE_TIMEOUT = 365 * 86400

_ACL_PREFIX = b"system.posix_acl_"


class FuseMountError(PycfsError):
    """The FUSE mount could not be made or removed."""


class FuseError(Exception):
    """A request's answer is this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


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
    # The repository's directory fd, a duplicate of the opener's: it carries the opener's
    # shared lock (flock), so gc waits while the image is served rather than remove its
    # objects (the opener closes its own fd once the server has this one).
    lock_fd: int = -1


def load_image(repo: Repository, image_id: bytes) -> ServedImage:
    """Read and check the image: its bytes must hash to its name and parse completely."""
    data = repo.image_bytes(image_id)
    if digest_bytes(data, repo.alg) != image_id:
        raise FuseMountError(f"image {image_id.hex()} is corrupt: its fs-verity digest differs from its name "
                             "(run `pycfs fsck`)")
    try:  # every inode, dirent and xattr checked: damage shows now, not mid-serve
        xattr_names = check_image(data)
    except ImageFormatError as e:
        raise FuseMountError(f"image {image_id.hex()} is not a valid composefs image: {e}") from None
    try:  # objects are opened beneath this directory, which is no link to elsewhere
        objects_fd = os.open(repo.path / "objects", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise FuseMountError(f"{repo.path / 'objects'}: {e.strerror}: the repository is damaged "
                             "(run `pycfs fsck`)") from None
    return ServedImage(image_id, ImageReader(data), objects_fd, repo.hash_alg_id if repo.secure else None,
                       _has_acls(xattr_names), os.dup(repo.dirfd))


def _has_acls(xattr_names: frozenset[bytes]) -> bool:
    """Whether any of an image's xattrs (`check_image`'s names) is a POSIX ACL."""
    return any(name.startswith(_ACL_PREFIX) for name in xattr_names)


class Node:
    """One stored inode, decoded once and kept with its replies packed (the image is immutable)."""

    __slots__ = ("_xattrs", "content", "dtype", "entries", "entry", "index", "ino", "raw")

    def __init__(self, nodeid: int, raw: RawInode) -> None:
        self.raw = raw
        self.ino = nodeid
        sec, nsec = divmod(raw.mtime * 1_000_000_000 + raw.mtime_nsec, 1_000_000_000)
        rdev = raw.i_u if stat.S_ISCHR(raw.mode) or stat.S_ISBLK(raw.mode) else 0
        # packed straight from the fields (listing a directory makes one per entry)
        attr = _ATTR.pack(nodeid, raw.size, (raw.size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, raw.mode,
                          raw.nlink, raw.uid, raw.gid, rdev, F.BLOCK_SIZE, 0)
        self.entry = _ENTRY.pack(nodeid, 0, CACHE_TIMEOUT, CACHE_TIMEOUT, 0, 0) + attr
        self.dtype = stat.S_IFMT(raw.mode) >> 12  # the d_type of its directory entries
        self._xattrs: tuple[dict[bytes, bytes], dict[bytes, bytes]] | None = None
        self.entries: list[tuple[bytes, int]] | None = None  # directories: visible (name, nid)
        self.index: dict[bytes, int] | None = None
        self.content: bytes | None = None  # inline files: their bytes, once read

    @property
    def attr_reply(self) -> bytes:
        """GETATTR's reply (rare: the kernel keeps attributes for good), made from the entry's."""
        return _ATTR_OUT + self.entry[_ENTRY.size:]

    @property
    def xattrs(self) -> dict[bytes, bytes]:
        """The xattrs overlayfs shows (never to be changed: it may be shared)."""
        return (self._xattrs or self._decode())[0]

    @property
    def internal(self) -> dict[bytes, bytes]:
        """overlayfs's own: redirect, metacopy."""
        return (self._xattrs or self._decode())[1]

    def _decode(self) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        # most inodes have none: they share one pair; the stored list is dropped once decoded
        self._xattrs = overlay_xattrs(self.raw.xattrs) if self.raw.xattrs else _NO_XATTRS
        self.raw.xattrs = ()
        return self._xattrs


_ATTR = fuse.Attr.FORMAT
_ENTRY = fuse.EntryOut.FORMAT
_ATTR_OUT = fuse.AttrOut(CACHE_TIMEOUT).pack()
_NO_XATTRS: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})


def is_whiteout(raw: RawInode) -> bool:
    return stat.S_ISCHR(raw.mode) and raw.i_u == 0


class ImageTree:
    """Inodes by FUSE node id: the root is fuse.ROOT_ID, every other nid maps to nid + 2 (so
    no nid lands on the root's number)."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.root_nid = reader.sb.root_nid
        self._nodes: dict[int, Node] = {}
        self._names: dict[int, tuple[int, bytes]] = {}  # nid -> (parent nid, a name), for log lines
        self.position: dict[int, tuple[int, int]] = {}  # nid -> (parent nid, index among its entries)

    def ino(self, nid: int) -> int:
        return fuse.ROOT_ID if nid == self.root_nid else nid + 2

    def nid(self, ino: int) -> int:
        return self.root_nid if ino == fuse.ROOT_ID else ino - 2

    def node(self, nid: int) -> Node:
        node = self._nodes.get(nid)
        if node is None:
            node = self._nodes[nid] = Node(self.ino(nid), self.reader.inode(nid))
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
                if ftype == F.FT_CHRDEV and is_whiteout(self.node(child).raw):
                    continue
                self._names.setdefault(child, (nid, name))
                self.position.setdefault(child, (nid, len(visible)))
                visible.append((name, child))
            node.entries = visible
            node.index = dict(visible)
        return node.entries

    def load(self) -> None:
        """Decode every inode the tree shows, with its xattrs, now: a server that starts
        serving (and forks its read-ahead) with the whole tree decoded answers a walk without
        decoding on the way, and its read-ahead process needs no copy of its own."""
        stack = [self.root_nid]
        seen = {self.root_nid}  # a directory with two names (C's quirk) is walked once
        while stack:
            for _, child in self.entries(stack.pop()):
                node = self.node(child)
                node.xattrs  # noqa: B018 (decoded now, kept on the node)
                if stat.S_ISDIR(node.raw.mode) and child not in seen:
                    seen.add(child)
                    stack.append(child)

    def lookup(self, nid: int, name: bytes) -> int | None:
        self.entries(nid)
        index = self.node(nid).index
        assert index is not None
        return index.get(name)

    def parent(self, nid: int) -> int:
        return self._names.get(nid, (self.root_nid, b""))[0]

    def path(self, nid: int) -> str:
        """A name of the inode for messages (the first one seen for hardlinks), printable: a
        name's newline or escape sequence cannot split or forge a log line."""
        parts = []
        while nid != self.root_nid and nid in self._names:
            nid, name = self._names[nid]
            parts.append(name)
        return printable("/" + os.fsdecode(b"/".join(reversed(parts))))
