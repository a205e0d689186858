"""In-memory filesystem tree: what a composefs image describes.

The model (spec 3.7) is shared by every producer and consumer of images: dumpfiles, directory
scans, OCI layer stacks, ostree commits, the EROFS writer and reader.

* A `Directory` owns its entries: a dict from name (bytes, no `/`, no NUL) to an inode.
  Iteration order of the dict does not matter; `Directory.sorted_entries()` gives the
  byte-sorted order every writer uses.
* A `Leaf` is every non-directory: a `Stat` plus one content kind (`Inline`, `External`,
  `ExternalNoVerity`, `Sparse`, `Symlink`, `CharDevice`, `BlockDevice`, `Fifo`, `Socket`).
  A hardlink is the *same* `Leaf` object reachable through several names.
* `Stat.mode` holds only the permission bits (07777); the file type comes from the kind.
* `Leaf.nlink` is normally `None`, meaning "number of names referencing the leaf". The C
  dumpfile parser keeps the NLINK column verbatim instead (a C quirk the images encode), and
  sets it explicitly.
* A character device with rdev 0 is an overlayfs whiteout.
"""

from __future__ import annotations

import contextlib
import gc
import stat as _stat
from dataclasses import dataclass, field
from collections.abc import Iterator

S_IFMT = 0o170000


@dataclass(slots=True)
class Stat:
    """Metadata shared by every inode kind."""

    mode: int = 0  # permission bits only (st_mode & 0o7777)
    uid: int = 0
    gid: int = 0
    mtime_sec: int = 0  # signed seconds
    mtime_nsec: int = 0
    # Insertion order is kept (readers report xattrs in image order); writers sort as they need.
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def copy(self) -> Stat:
        return Stat(self.mode, self.uid, self.gid, self.mtime_sec, self.mtime_nsec, dict(self.xattrs))


class SharedStats:
    """Hands out one Stat for equal metadata, for the leaves of a big tree: the files of a
    layer mostly share mode, owner and mtime (a package's files, an image built with one
    timestamp), and a Stat with its xattrs dict and ints costs about 240 bytes a file.

    Whoever takes a shared Stat must not change it in place (replacing its xattrs with the
    same filtered dict for every holder, as OCI normalisation does, is fine). The table
    keeps the last `limit` distinct Stats; when full it starts afresh, so an image whose
    files all differ costs no more than a bounded table."""

    __slots__ = ("_limit", "_stats")

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._stats: dict[tuple, Stat] = {}

    def get(self, mode: int, uid: int, gid: int, mtime_sec: int, mtime_nsec: int,
            xattrs: tuple[tuple[bytes, bytes], ...] = ()) -> Stat:
        """The Stat of these fields (xattrs as (name, value) pairs in the order kept)."""
        key = (mode, uid, gid, mtime_sec, mtime_nsec, xattrs)
        stat = self._stats.get(key)
        if stat is None:
            if len(self._stats) >= self._limit:
                self._stats.clear()
            stat = self._stats[key] = Stat(mode, uid, gid, mtime_sec, mtime_nsec, dict(xattrs))
        return stat


# ---------------------------------------------------------------------------- leaf kinds


@dataclass(frozen=True, slots=True)
class Inline:
    """Regular file whose bytes live in the image."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def object_path(object_id: bytes) -> bytes:
    """The object store path `XX/rest` (hex) for an object id."""
    h = object_id.hex().encode()
    return h[:2] + b"/" + h[2:]


@dataclass(frozen=True, slots=True)
class External:
    """Regular file backed by an object whose fs-verity digest is `id`.

    `payload` is the backing path relative to the object store; None means the usual
    `XX/rest` path of `id`. An empty payload (possible in C dumpfiles) means "digest only,
    no redirect".
    """

    id: bytes
    size: int
    payload: bytes | None = None

    @property
    def backing_path(self) -> bytes:
        return object_path(self.id) if self.payload is None else self.payload


@dataclass(frozen=True, slots=True)
class ExternalNoVerity:
    """Regular file backed by the object at `payload` with no known fs-verity digest."""

    payload: bytes
    size: int

    @property
    def backing_path(self) -> bytes:
        return self.payload


@dataclass(frozen=True, slots=True)
class Sparse:
    """Regular file with a size but neither content nor backing object."""

    size: int


@dataclass(frozen=True, slots=True)
class Symlink:
    target: bytes

    @property
    def size(self) -> int:
        return len(self.target)


# `dump_size` of the special kinds: the SIZE column of a C dumpfile. The image stores size 0,
# but C writes an extended inode when it is above 2^32-1, so the writer needs it; it is no
# part of the file's identity (not compared).


@dataclass(frozen=True, slots=True)
class CharDevice:
    rdev: int  # glibc dev_t encoding; 0 = overlayfs whiteout
    dump_size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BlockDevice:
    rdev: int
    dump_size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Fifo:
    dump_size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Socket:
    dump_size: int = field(default=0, compare=False)


RegularContent = Inline | External | ExternalNoVerity | Sparse
LeafContent = Inline | External | ExternalNoVerity | Sparse | Symlink | CharDevice | BlockDevice | Fifo | Socket

# file type bits (S_IFMT) of each leaf kind
TYPE_BITS = {
    Inline: _stat.S_IFREG,
    External: _stat.S_IFREG,
    ExternalNoVerity: _stat.S_IFREG,
    Sparse: _stat.S_IFREG,
    Symlink: _stat.S_IFLNK,
    CharDevice: _stat.S_IFCHR,
    BlockDevice: _stat.S_IFBLK,
    Fifo: _stat.S_IFIFO,
    Socket: _stat.S_IFSOCK,
}


class Leaf:
    """A non-directory inode; shared by all of its hardlinked names."""

    __slots__ = ("content", "nlink", "stat")

    def __init__(self, stat: Stat, content: LeafContent, nlink: int | None = None) -> None:
        self.stat = stat
        self.content = content
        self.nlink = nlink

    @property
    def type_bits(self) -> int:
        return TYPE_BITS[type(self.content)]

    @property
    def st_mode(self) -> int:
        return self.type_bits | (self.stat.mode & 0o7777)

    @property
    def size(self) -> int:
        c = self.content
        return getattr(c, "size", 0)

    @property
    def rdev(self) -> int:
        c = self.content
        return c.rdev if isinstance(c, (CharDevice, BlockDevice)) else 0

    def is_whiteout(self) -> bool:
        return isinstance(self.content, CharDevice) and self.content.rdev == 0

    def __repr__(self) -> str:
        return f"Leaf({self.content!r}, mode={self.st_mode:o})"


class Directory:
    """A directory inode and its entries."""

    __slots__ = ("entries", "stat")

    def __init__(self, stat: Stat | None = None, entries: dict[bytes, Inode] | None = None) -> None:
        self.stat = stat if stat is not None else Stat()
        self.entries: dict[bytes, Inode] = entries if entries is not None else {}

    type_bits = _stat.S_IFDIR

    @property
    def st_mode(self) -> int:
        return _stat.S_IFDIR | (self.stat.mode & 0o7777)

    def sorted_entries(self) -> list[tuple[bytes, Inode]]:
        """Entries in byte order of their names (the order of every on-disk format)."""
        return sorted(self.entries.items())

    def nlink(self) -> int:
        """2 + number of child directories (a directory under two names counts once)."""
        return 2 + len({id(c) for c in self.entries.values() if isinstance(c, Directory)})

    def lookup(self, path: bytes) -> Inode | None:
        """Inode at `path` ("/a/b" or "a/b", relative to this directory), or None."""
        node: Inode = self
        for comp in path.split(b"/"):
            if not comp:
                continue
            if not isinstance(node, Directory):
                return None
            child = node.entries.get(comp)
            if child is None:
                return None
            node = child
        return node

    def walk(self, prefix: bytes = b"/") -> Iterator[tuple[bytes, Inode]]:
        """Depth-first, byte-sorted (path, inode) pairs, starting with this directory itself.

        A directory reachable through several names is descended into only once.
        """
        seen: set[int] = {id(self)}
        yield prefix, self
        # iterative pre-order walk: a stack of (path, iterator) keeps deep trees off the C stack
        iters = [(prefix, iter(self.sorted_entries()))]
        while iters:
            base, it = iters[-1]
            for name, child in it:
                path = base + name if base.endswith(b"/") else base + b"/" + name
                yield path, child
                if isinstance(child, Directory) and id(child) not in seen:
                    seen.add(id(child))
                    iters.append((path, iter(child.sorted_entries())))
                    break
            else:
                iters.pop()

    def __repr__(self) -> str:
        return f"Directory({len(self.entries)} entries, mode={self.st_mode:o})"


Inode = Directory | Leaf


@dataclass
class FileSystem:
    """A whole tree: the root directory, plus optional hardlink ordering facts.

    `primary_links` maps `id(inode)` to the (directory, name) that is the inode's "real" name.
    The C tools number a hardlinked inode where its real name (the non-`@` dumpfile line) is
    met; without an entry the first name in a depth-first byte-sorted walk is used (for a
    directory, which C lets a dumpfile hardlink, the first name in breadth-first order).
    """

    root: Directory = field(default_factory=Directory)
    primary_links: dict[int, tuple[Directory, bytes]] = field(default_factory=dict)

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        return self.root.walk()

    def link_counts(self) -> dict[int, int]:
        """Number of directory entries referencing each leaf (keyed by id(leaf))."""
        counts: dict[int, int] = {}
        for _path, node in self.root.walk():
            if isinstance(node, Leaf):
                counts[id(node)] = counts.get(id(node), 0) + 1
        return counts

    def is_primary(self, leaf: Leaf, parent: Directory, name: bytes) -> bool | None:
        """True/False if a primary name is recorded for `leaf` (and still valid), else None."""
        rec = self.primary_links.get(id(leaf))
        if rec is None:
            return None
        pdir, pname = rec
        if pdir.entries.get(pname) is not leaf:
            return None
        return pdir is parent and pname == name


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Building or serialising a big tree makes hundreds of thousands of objects and no
    garbage cycles; meanwhile the cyclic collector would rescan them over and over (a third
    of a 200,000-entry image build)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # freeze + unfreeze moves everything made meanwhile into the oldest generation
        # without a scan and zeroes the young generation's count: re-enabled, the collector
        # does not start with a pass over all of it (1.4 s for 200,000 entries)
        gc.freeze()
        gc.unfreeze()
        if was:
            gc.enable()
