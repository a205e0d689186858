"""EROFS composefs image writer (spec 5).

`write_image(fs, version)` (`image_buffer`: the same as a bytearray, without a copy;
`write_image_to`: the same in pieces, to a sink, never whole in memory):
* versions 0 and 1 ("epoch 1") are byte-identical to C mkcomposefs 1.0.8;
* version 2 is the legacy composefs-rs layout.

`choose_version(fs, min_version, max_version)` applies the C tool's rule (raise to the
maximum only when the tree holds a whiteout).

The writer is two-pass: `_collect_*` turn the tree into a flat list of small `_Ino` records
in inode order (each referring to one interned tuple of its xattrs), `_Xattrs` (the shared
table) and `_prepare_data_*` fix every size and layout, then `_layout_and_emit` assigns nids
and block addresses and writes the metadata blocks, then the data blocks, in order
(directory blocks are built once every nid is known). Memory grows by well under 1 KiB an
entry (tests/unit/test_erofs_memory.py).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import stat as _stat
import struct
from array import array
from binascii import hexlify
from collections import Counter, deque
from typing import NoReturn, Protocol

from pycfs.host.errors import PycfsError
from pycfs.host.erofs import format as F
from pycfs.host.syscalls import release_free_heap
from pycfs.host.tree import (
    S_IFMT as _S_IFMT,
    object_path,
    BlockDevice,
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    FileSystem,
    Inline,
    Leaf,
    Sparse,
    Stat,
    Symlink,
    TYPE_BITS,
    gc_paused,
)
from pycfs.protocol.text import shown

MAX_CHUNKS = 1024  # C refuses files needing more chunk indexes ("File too large")
MAX_SHARED_PER_INODE = 128

OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
XATTR_METACOPY = b"trusted.overlay.metacopy"
XATTR_REDIRECT = b"trusted.overlay.redirect"
XATTR_OPAQUE = b"trusted.overlay.opaque"
XATTR_ESC_WHITEOUT = b"trusted.overlay.overlay.whiteout"
XATTR_ESC_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
XATTR_ESC_OPAQUE = b"trusted.overlay.overlay.opaque"
XATTR_USER_WHITEOUT = b"user.overlay.whiteout"
XATTR_USER_WHITEOUTS = b"user.overlay.whiteouts"
XATTR_USER_OPAQUE = b"user.overlay.opaque"
XATTR_SELINUX = b"security.selinux"
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

WHITEOUT_STUB_NAMES = [b"%02x" % i for i in range(256)]


class ImageError(PycfsError):
    """The tree cannot be written as an image."""


# Prefix matching order: longest/most specific indexes first (6 -> 0); lustre (5) is only
# used by the V2 writer.
_PREFIX_ORDER_EPOCH1 = (6, 4, 3, 2, 1)
_PREFIX_ORDER_V2 = (6, 5, 4, 3, 2, 1)


@functools.lru_cache(maxsize=4096)  # a few distinct names on thousands of inodes
def _split_xattr_name(key: bytes, order: tuple[int, ...]) -> tuple[int, bytes]:
    for idx in order:
        p = F.XATTR_PREFIXES[idx]
        if key.startswith(p):
            return idx, key[len(p):]
    return 0, key


def choose_version(fs: FileSystem, min_version: int = 0, max_version: int = 1) -> int:
    """C mkcomposefs: use `min_version` unless the tree has a whiteout (chr 0:0)."""
    if not 0 <= min_version <= 1 or not 0 <= max_version <= 1:
        raise ImageError("cannot write file: Invalid argument (format versions are 0 and 1)")
    max_version = max(min_version, max_version)
    if max_version > min_version and _has_whiteout(fs.root):
        return max_version
    return min_version


def _has_whiteout(root: Directory) -> bool:
    return any(isinstance(n, Leaf) and n.is_whiteout() for _p, n in root.walk())


class _Ino:
    """One inode of the image (hardlinked names share one); a directory's is a `_DirIno`."""

    __slots__ = (
        "blocks",
        "extended",
        "i_u",
        "inline",
        "layout",
        "mode",
        "nblocks",
        "nlink",
        "node",
        "size",
        "xattr_size",
        "xattrs",
    )

    def __init__(self, node) -> None:
        # Defaults are shared objects (small ints, empty bytes and tuples): hundreds of
        # thousands of records, so nothing is allocated per record that it may not need.
        # The inode number is the record's position, and its nid is kept by number in an
        # array (an int object would cost 32 bytes a record); uid, gid and mtime are the node's.
        self.node = node
        self.mode = self.nlink = 0
        self.layout = 0
        self.extended = False
        # the inode's own and composefs xattrs, sorted as written, one interned tuple for all
        # inodes that have the same; those derived from a file's content (metacopy, redirect)
        # are not in it but made when needed (`_Xattrs.items`)
        self.xattrs: _Items = ()
        self.xattr_size = 0
        self.inline = b""
        self.blocks = b""
        self.nblocks = 0
        self.i_u = 0
        self.size = 0


class _DirIno(_Ino):
    """A directory's inode: its number, parent and entries too (the slots a file's record
    goes without: hundreds of thousands of files)."""

    __slots__ = ("children", "names", "num", "parent")

    def __init__(self, node, parent: _DirIno | None = None, num: int = 0) -> None:
        super().__init__(node)
        self.num = num
        self.parent = parent if parent is not None else self
        # the entries' names in byte order and their inodes' numbers (a list and an array:
        # a list of pairs costs 64 bytes an entry, an inode number as an int object 32)
        self.names: list[bytes] = []
        self.children: array[int] = array("I")


_Items = tuple[tuple[bytes, bytes], ...]


# The file type in a directory entry, from a field every record has (each slot costs 8
# bytes on hundreds of thousands of records): _FTYPES[mode & S_IFMT].
_FTYPES = F.FILE_TYPES


class ImageSink(Protocol):
    """Where `write_image_to` puts an image: `start` once with its size (the tree has been
    accepted by then), then `write` its bytes in order, in pieces of up to about a MiB
    (a piece is the sink's to keep)."""

    def start(self, size: int) -> None: ...

    def write(self, piece: bytearray) -> None: ...


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0

    def start(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, piece: bytearray) -> None:
        self.data[self.pos:self.pos + len(piece)] = piece
        self.pos += len(piece)


def write_image(fs: FileSystem, version: int = 0) -> bytes:
    """Serialise `fs` as a composefs EROFS image of format `version` (0, 1 or 2)."""
    return bytes(image_buffer(fs, version))


def image_buffer(fs: FileSystem, version: int = 0) -> bytearray:
    """`write_image` without the final copy to `bytes`, which doubles the peak memory of a
    big image: for callers that only write or hash it."""
    sink = _Buffer()
    write_image_to(fs, version, sink)
    return sink.data


def write_image_to(fs: FileSystem, version: int, sink: ImageSink) -> None:
    """`write_image` into `sink`, in pieces: the whole image is never in memory."""
    if version not in (0, 1, 2):
        raise ImageError(f"cannot write file: Invalid argument (format version {version})")
    # The records below grow the heap by ~200 bytes an inode: what was freed before (a
    # pull's import: 20 MiB at 200,000 files) goes back to the system first, not atop them.
    release_free_heap()
    with gc_paused():
        _write_image(fs, version, sink)


def _write_image(fs: FileSystem, version: int, sink: ImageSink) -> None:
    inos = _collect_v2(fs) if version == 2 else _collect_epoch1(fs, version)
    try:
        _check_limits(inos, v2=version == 2)
        xattrs = _Xattrs(inos, v2=version == 2)
        if version == 2:
            for ino in inos:
                _prepare_data_v2(ino)
            min_sec = min_nsec = 0
        else:
            min_sec, min_nsec = min((i.node.stat.mtime_sec, i.node.stat.mtime_nsec) for i in inos)
            _prepare_data_epoch1(inos, min_sec, min_nsec)
        _layout_and_emit(inos, xattrs, version, min_sec, min_nsec, sink)
    finally:
        # a parent link makes a cycle (the root's is itself): cut, the records go by reference counting
        # instead of waiting for a full collection (1.5 s at exit for 200,000 inodes)
        for ino in inos:
            if type(ino) is _DirIno:
                ino.parent = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------- pass 1: collect


def _escape_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    if OVERLAY_PREFIX not in b"\0".join(xattrs):
        return dict(xattrs)  # the usual case, without a loop in Python
    out: dict[bytes, bytes] = {}
    for k, v in xattrs.items():
        if k.startswith(OVERLAY_PREFIX):
            k = OVERLAY_ESCAPED_PREFIX + k[len(OVERLAY_PREFIX):]
        out[k] = v
    return out


class _XattrSets:
    """Interned xattr tuples: an image has a few distinct sets (labels, capabilities) on
    hundreds of thousands of inodes, so each inode refers to one shared tuple."""

    def __init__(self, v2: bool) -> None:
        self.v2 = v2
        self.made: dict[_Items, _Items] = {}  # a Stat's items as given -> as written
        self._all: dict[_Items, _Items] = {}

    def own(self, xattrs: dict[bytes, bytes]) -> _Items:
        """A Stat's xattrs, escaped, in the order written (epoch 1: by name; format 2: by
        name before escaping)."""
        key = tuple(xattrs.items())
        items = self.made.get(key)
        if items is None:
            if self.v2:
                items = tuple(_escape_xattrs(dict(sorted(xattrs.items()))).items())
            else:
                items = tuple(sorted(_escape_xattrs(xattrs).items()))
            items = self.made[key] = self._all.setdefault(items, items)
        return items

    def plus(self, items: _Items, added: dict[bytes, bytes]) -> _Items:
        """Epoch 1: `items` with `added` set (replacing any value of the same name)."""
        merged = dict(items)
        merged.update(added)
        out = tuple(sorted(merged.items()))
        return self._all.setdefault(out, out)


_WHITEOUT_XATTRS = {XATTR_ESC_WHITEOUT: b"", XATTR_USER_WHITEOUT: b""}
_WHITEOUT_DIR_XATTRS = ({XATTR_ESC_WHITEOUTS: b"", XATTR_USER_WHITEOUTS: b""},  # version 0
                        {XATTR_ESC_WHITEOUTS: b"", XATTR_USER_WHITEOUTS: b"", XATTR_ESC_OPAQUE: b"x",
                         XATTR_USER_OPAQUE: b"x"})
_ROOT_XATTRS = {XATTR_OPAQUE: b"y"}


def _canonical_occurrences(fs: FileSystem) -> tuple[dict[int, int], dict[int, tuple[int, bytes]]]:
    """Link counts of the leaves with several names (the others have one) and, for those,
    the (id(dir), name) where the inode is numbered: the recorded primary name, else the
    first depth-first occurrence."""
    counts: dict[int, int] = {}
    seen: set[Leaf] = set()  # the leaves themselves, hashed by identity: no id int for each
    seen_dirs = {id(fs.root)}
    stack = [fs.root]
    while stack:
        d = stack.pop()
        for child in d.entries.values():
            if isinstance(child, Leaf):
                if child in seen:
                    k = id(child)
                    counts[k] = counts.get(k, 1) + 1
                else:
                    seen.add(child)
            elif id(child) not in seen_dirs:
                seen_dirs.add(id(child))
                stack.append(child)
    del seen
    canon: dict[int, tuple[int, bytes]] = {}
    unnamed: set[int] = set()
    for k in counts:
        rec = fs.primary_links.get(k)
        if rec is not None and id(rec[0].entries.get(rec[1])) == k:
            canon[k] = (id(rec[0]), rec[1])
        else:
            unnamed.add(k)
    if unnamed:  # a walk of the whole tree: not for a dumpfile's, which names every inode
        canon.update(_dfs_first(fs.root, unnamed))
    return counts, canon


def _dfs_first(root: Directory, wanted: set[int]) -> dict[int, tuple[int, bytes]]:
    found: dict[int, tuple[int, bytes]] = {}
    seen = {id(root)}
    iters = [(root, iter(root.sorted_entries()))]
    while iters:
        d, it = iters[-1]
        for name, child in it:
            k = id(child)
            if isinstance(child, Leaf):
                if k in wanted and k not in found:
                    found[k] = (id(d), name)
            elif k not in seen:
                seen.add(k)
                iters.append((child, iter(child.sorted_entries())))
                break
        else:
            iters.pop()
    return found


def _is_dir_home(fs: FileSystem, d: Directory, parent: Directory, name: bytes) -> bool:
    """A directory hardlinked by a C dumpfile gets its inode (and its `..`) at its own line;
    otherwise at its first name in breadth-first order."""
    rec = fs.primary_links.get(id(d))
    if rec is None or rec[0].entries.get(rec[1]) is not d:
        return True
    return rec[0] is parent and rec[1] == name


def _collect_epoch1(fs: FileSystem, version: int) -> list[_Ino]:
    """BFS inode numbering (C lcfs_compute_tree) plus the composefs transformations."""
    root = fs.root
    counts, canon = _canonical_occurrences(fs)
    rst = root.stat

    stub_xattrs = {XATTR_SELINUX: rst.xattrs[XATTR_SELINUX]} if XATTR_SELINUX in rst.xattrs else {}
    stubs: dict[bytes, Leaf] = {}
    for name in WHITEOUT_STUB_NAMES:
        if name not in root.entries:
            stubs[name] = Leaf(
                Stat(0o644, rst.uid, rst.gid, rst.mtime_sec, rst.mtime_nsec, dict(stub_xattrs)),
                CharDevice(0), 1,
            )
    stub_ids = {id(s) for s in stubs.values()}

    # The records are made and filled in one breadth-first pass: mode, link count and own
    # xattrs as each is made (a directory's when it is numbered, its link count once its
    # entries are), whiteouts escaped. Metacopy and redirect: `_Xattrs.items`.
    sets = _XattrSets(v2=False)
    own_sets, own_get = sets.own, sets.made.get  # (the usual case without a call)
    wh_parents: list[_DirIno] = []
    modes: dict[int, int] = {}  # one int object per distinct mode
    type_bits = TYPE_BITS
    root_ino = _DirIno(root)
    inos: list[_Ino] = [root_ino]
    by_id: dict[int, int] = {id(root): 0}  # inode numbers of directories and hardlinked files
    late: list[tuple[_DirIno, int, int]] = []  # (dir ino, child position, leaf id)
    queue: deque[_DirIno] = deque([root_ino])
    while queue:
        dino = queue.popleft()
        d: Directory = dino.node
        st = d.stat
        if xa := st.xattrs:
            dino.xattrs = own_get(tuple(xa.items())) or own_sets(xa)
        dino.mode = modes.setdefault(m := _stat.S_IFDIR | (st.mode & 0o7777), m)
        entries = d.entries
        if dino is root_ino and stubs:
            entries = dict(entries)
            entries.update(stubs)
        dino.names = names = sorted(entries)
        children = dino.children
        subdirs = 0  # whose home is here: the directory's link count
        for name in names:
            child = entries[name]
            k = id(child)
            if type(child) is Directory:
                num = by_id.get(k)
                if num is None and _is_dir_home(fs, child, d, name):
                    by_id[k] = num = len(inos)
                    cdir = _DirIno(child, dino, num)
                    inos.append(cdir)
                    queue.append(cdir)
                    subdirs += 1
            elif (n := counts.get(k)) is not None and canon.get(k) != (id(d), name):
                num = by_id.get(k)  # numbered at its canonical name, maybe not yet
            else:
                num = len(inos)
                cino = _Ino(child)
                inos.append(cino)
                st = child.stat
                if xa := st.xattrs:
                    cino.xattrs = own_get(tuple(xa.items())) or own_sets(xa)
                c = child.content
                tc = type(c)
                if n is not None:  # hardlinked, at its canonical name
                    by_id[k] = num
                cino.nlink = child.nlink if child.nlink is not None else n or 1
                if tc is CharDevice and c.rdev == 0 and k not in stub_ids:
                    # a whiteout: escaped to a regular file; only the directory of its own
                    # name is marked, not one holding a hardlink to it
                    cino.mode = _stat.S_IFREG | (st.mode & 0o7777)
                    cino.xattrs = sets.plus(cino.xattrs, _WHITEOUT_XATTRS)
                    wh_parents.append(dino)
                else:
                    cino.mode = modes.setdefault(m := type_bits[tc] | (st.mode & 0o7777), m)
            if num is None:
                # canonical name is deeper in the BFS: fill in once it has a number
                late.append((dino, len(children), k))
                num = 0
            children.append(num)
        # 2 + the subdirectories whose home is here (hardlinked names do not count)
        dino.nlink = 2 + subdirs
    for dino, pos, k in late:
        dino.children[pos] = by_id[k]

    for wdir in wh_parents:
        wdir.xattrs = sets.plus(wdir.xattrs, _WHITEOUT_DIR_XATTRS[version >= 1])
    root_ino.xattrs = sets.plus(root_ino.xattrs, _ROOT_XATTRS)
    return inos


def _dir_nlink(ino: _DirIno, inos: list[_Ino]) -> int:
    """2 + the subdirectories whose home is this directory (hardlinked names do not count)."""
    return 2 + len({c for c in ino.children if type(d := inos[c]) is _DirIno and d.parent is ino and d is not ino})


_METACOPY_PREFIX = {32: F.OverlayMetacopy(digest_algo=1, digest=bytes(32)).pack()[:4],
                    64: F.OverlayMetacopy(digest_algo=2, digest=bytes(64)).pack()[:4]}


def _metacopy(digest: bytes) -> bytes:
    """`trusted.overlay.metacopy` of a file with this fs-verity digest (the header is the same
    for every digest of one length)."""
    prefix = _METACOPY_PREFIX.get(len(digest))
    if prefix is None:
        _verity_algo(digest)  # raises
    return prefix + digest  # type: ignore[operator]


def _verity_algo(digest: bytes) -> int:
    if len(digest) == 32:
        return 1
    if len(digest) == 64:
        return 2
    raise ImageError(f"fs-verity digest of {len(digest)} bytes is neither sha256 nor sha512")


def _collect_v2(fs: FileSystem) -> list[_Ino]:
    """composefs-rs format 2: depth-first pre-order, no stubs, whiteouts stay chr 0:0."""
    counts: dict[int, int] = {}
    inos: list[_Ino] = []
    by_id: dict[int, int] = {}  # inode numbers

    def new_ino(ino: _Ino) -> int:
        num = by_id[id(ino.node)] = len(inos)
        inos.append(ino)
        return num

    root_ino = _DirIno(fs.root)
    new_ino(root_ino)
    iters = [(root_ino, iter(fs.root.sorted_entries()))]
    while iters:
        dino, it = iters[-1]
        for name, child in it:
            k = id(child)
            if isinstance(child, Leaf):
                counts[k] = counts.get(k, 0) + 1
            num = by_id.get(k)
            dino.names.append(name)
            if num is None:
                if isinstance(child, Directory):
                    cdir = _DirIno(child, dino, len(inos))
                    dino.children.append(new_ino(cdir))
                    iters.append((cdir, iter(child.sorted_entries())))
                    break
                dino.children.append(new_ino(_Ino(child)))
            else:
                dino.children.append(num)
        else:
            iters.pop()

    sets = _XattrSets(v2=True)
    for ino in inos:
        node = ino.node
        st = node.stat
        ino.mode = node.st_mode
        if st.xattrs:
            ino.xattrs = sets.own(st.xattrs)  # metacopy and redirect go first: `_Xattrs.items`
        if type(ino) is _DirIno:
            ino.nlink = _dir_nlink(ino, inos)
        else:
            ino.nlink = node.nlink if node.nlink is not None else counts.get(id(node), 1)
    return inos


def _prepare_data_v2(ino: _Ino) -> None:
    node = ino.node
    ino.extended = True
    if isinstance(node, Directory):
        _prepare_data_epoch1([ino], node.stat.mtime_sec, node.stat.mtime_nsec)
        ino.extended = True
        return
    c = node.content
    if isinstance(c, (Inline, Symlink)):
        data = c.data if isinstance(c, Inline) else c.target
        if data and F.ExtendedInode.SIZE + ino.xattr_size + len(data) > F.BLOCK_SIZE:
            raise ImageError(f"format 2 stores file data inline only: {len(data)} bytes do not fit one block")
        ino.size = len(data)
        ino.inline = data
        ino.layout = F.DATALAYOUT_FLAT_INLINE if data else F.DATALAYOUT_FLAT_PLAIN
    elif isinstance(c, (External, ExternalNoVerity, Sparse)):
        ino.size = c.size
        ino.layout = F.DATALAYOUT_CHUNK_BASED
        ino.i_u = 31  # the chunk format
        ino.inline = b"\xff\xff\xff\xff" if isinstance(c, External) else b""
    elif isinstance(c, (CharDevice, BlockDevice)):
        ino.layout = F.DATALAYOUT_FLAT_PLAIN
        ino.i_u = c.rdev & 0xFFFFFFFF
    else:
        ino.layout = F.DATALAYOUT_FLAT_PLAIN


def _check_limits(inos: list[_Ino], v2: bool) -> None:
    """Reject what EROFS cannot store, with a message instead of a struct.error."""
    u32 = 1 << 32
    lo63, hi63 = -(1 << 63), 1 << 63
    checked: set[int] = set()  # xattr tuples are shared
    for index, ino in enumerate(inos):
        node = ino.node
        st = node.stat
        if not (0 <= st.uid < u32 and 0 <= st.gid < u32 and 0 <= ino.nlink < u32
                and (v2 or 0 <= st.mtime_nsec < u32) and lo63 <= st.mtime_sec < hi63):
            _refuse_inode(inos, index, v2)
        tc = None
        if type(node) is Leaf:
            c = node.content
            tc = type(c)
            if tc is Symlink and not 0 < len(c.target) < 4096:
                raise ImageError(f"{_what(inos, index)}: symlink target of {len(c.target)} bytes (1..4095 allowed)")
        elif type(ino) is _DirIno and ino.names:
            names = ino.names
            joined = b"".join(names)
            if b"/" in joined or b"\0" in joined or not 0 < min(map(len, names)) <= max(map(len, names)) <= 255:
                bad = next(n for n in names if not 0 < len(n) <= 255 or b"/" in n or b"\0" in n)
                raise ImageError(f"invalid file name {shown(bad)} in {_what(inos, index)} (1..255 bytes, no '/' or NUL)")
        if ino.xattrs and id(ino.xattrs) not in checked:
            checked.add(id(ino.xattrs))
            for k, v in ino.xattrs:
                if len(k) > 255 + 24 or len(v) > 0xFFFF:
                    _refuse_xattr(inos, index, k, len(v))
        if (tc is External or tc is ExternalNoVerity) and (payload := c.payload) and len(payload) >= 0xFFFF:
            _refuse_xattr(inos, index, XATTR_REDIRECT, 1 + len(payload))  # the redirect is "/" + payload


def _refuse_xattr(inos: list[_Ino], index: int, name: bytes, value_len: int) -> NoReturn:
    raise ImageError(f"{_what(inos, index)}: xattr {name[:40]!r} too long (name {len(name)}, value {value_len} bytes)")


def _what(inos: list[_Ino], index: int) -> str:
    """The path of inode `index` (its first name), for an error message: one pass over the
    directories, made only when an image is refused."""
    up: dict[int, tuple[int, bytes]] = {}
    for dino in inos:
        if type(dino) is _DirIno:
            for name, child in zip(dino.names, dino.children):
                if child != dino.num:
                    up.setdefault(child, (dino.num, name))
    parts: list[bytes] = []
    while index in up and len(parts) < 4096:  # bounded: a cycle is the writer's bug, not a hang
        index, name = up[index]
        parts.append(name)
    return shown((b"/" + b"/".join(reversed(parts))).decode("utf-8", "surrogateescape"))


def _refuse_inode(inos: list[_Ino], index: int, v2: bool) -> NoReturn:
    ino = inos[index]
    st = ino.node.stat
    if not (0 <= st.uid < 1 << 32 and 0 <= st.gid < 1 << 32):
        raise ImageError(f"{_what(inos, index)}: uid/gid {st.uid}/{st.gid} do not fit 32 bits")
    if not 0 <= ino.nlink < 1 << 32:
        raise ImageError(f"{_what(inos, index)}: nlink {ino.nlink} out of range")
    raise ImageError(f"{_what(inos, index)}: mtime {st.mtime_sec}.{0 if v2 else st.mtime_nsec} out of range")


# ---------------------------------------------------------------------------- xattrs


_CONTENT_XATTR_KINDS = frozenset((External, ExternalNoVerity, Sparse))


def _content_xattrs(node) -> list[tuple[bytes, bytes]]:
    """The metacopy and redirect xattrs of a regular file backed by an object. They differ
    from file to file, so they are made when needed rather than kept for every inode."""
    if type(node) is not Leaf:
        return []
    c = node.content
    tc = type(c)
    if tc is External:
        backing = c.backing_path  # a property: hex and slices per call
        mc = [(XATTR_METACOPY, _metacopy(c.id))]
        return [*mc, (XATTR_REDIRECT, b"/" + backing)] if backing else mc
    if tc is ExternalNoVerity:
        return [(XATTR_METACOPY, b""), (XATTR_REDIRECT, b"/" + c.payload)] if c.payload else [(XATTR_METACOPY, b"")]
    if tc is Sparse:
        return [(XATTR_METACOPY, b"")]
    return []


def _object_id_of(path: bytes) -> bytes | None:
    """The id whose `XX/rest` path this is, if it is one."""
    if len(path) < 3 or path[2:3] != b"/":
        return None
    try:
        object_id = bytes.fromhex((path[:2] + path[3:]).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return object_id if object_path(object_id) == path else None


def _repeated_content_xattrs(inos: list[_Ino]) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """The metacopy and redirect (name, value) pairs found on more than one inode (files of
    the same content): found from the ids and payloads, without making every value. And
    the ids that may have such a pair (repeated, or spelt by a payload): a file of another
    id shares neither of its pairs."""
    ids: list[bytes] = []  # metacopy digests
    payloads: Counter[bytes] = Counter()  # redirect paths given as payloads
    empty_metacopy = 0
    for ino in inos:
        node = ino.node
        if type(node) is not Leaf:
            continue
        c = node.content
        tc = type(c)
        if tc is External:
            ids.append(c.id)
            if c.payload:
                payloads[c.payload] += 1
        elif tc is ExternalNoVerity or tc is Sparse:
            empty_metacopy += 1
            if tc is ExternalNoVerity and c.payload:
                payloads[c.payload] += 1
    found = [(XATTR_METACOPY, b"")] if empty_metacopy > 1 else []
    ids.sort()  # in place: a set of every id would cost far more
    repeated = {a for a, b in itertools.pairwise(ids) if a == b}
    del ids
    found += [(XATTR_METACOPY, _metacopy(i)) for i in repeated]
    # A file without a payload is redirected to its id's XX/rest path, which other such
    # files of that id have, or a payload may spell: count those files' paths too.
    wanted = repeated | {i for path in payloads if (i := _object_id_of(path)) is not None}
    if wanted:
        for ino in inos:
            node = ino.node
            if type(node) is Leaf and type(c := node.content) is External and c.payload is None and c.id in wanted:
                payloads[object_path(c.id)] += 1
    found += [(XATTR_REDIRECT, b"/" + path) for path, n in payloads.items() if n > 1]
    return found, wanted


class _Xattrs:
    """The shared xattr table and each inode's xattr block.

    Pairs used by several inodes go to the table. Epoch 1 (C): table in descending (name,
    value length, value) order. V2 (composefs-rs): ascending (name index, suffix, value),
    and the lustre. prefix index is used. Building sets every inode's `xattr_size`."""

    def __init__(self, inos: list[_Ino], v2: bool) -> None:
        self.v2 = v2
        self.order = _PREFIX_ORDER_V2 if v2 else _PREFIX_ORDER_EPOCH1
        # counted per distinct tuple, then per pair
        sets = Counter(ino.xattrs for ino in inos if ino.xattrs)
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for items, n in sets.items():
            for kv in items:
                counts[kv] += n
        repeated, self._maybe_shared = _repeated_content_xattrs(inos)
        shared = [kv for kv, n in counts.items() if n > 1] + repeated
        if v2:
            shared.sort(key=lambda kv: (*_split_xattr_name(kv[0], self.order), kv[1]))
        else:
            shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
        # A handful of distinct names on thousands of inodes: (prefix index, suffix, filter
        # bit) once per name.
        self.names: dict[bytes, tuple[int, bytes, int]] = {}
        # offsets within the table; the table's start is added at emit
        self.offsets: dict[tuple[bytes, bytes], int] = {}
        off = 0
        for kv in shared:
            _idx, suffix, _bit = self.name_info(kv[0])
            self.offsets[kv] = off
            off += F.xattr_entry_size(len(suffix), len(kv[1]))
        self.table = [(*self.names[k][:2], v) for k, v in shared]
        self.has_acl = not v2 and any(k in ACL_XATTRS for items in sets for k, _v in items)
        # Each inode's key for `block`, in inode order: for a plain file (`_PlainBlock`),
        # its template's, id(own xattrs) * 2 + (digest of 64 bytes); for an inode with its
        # own xattrs alone, ~id(them) (one block for all that share them); else None.
        self.keys: list[int | None] = []
        add_key = self.keys.append
        self.fixed: dict[int | None, bytearray] = {}  # own xattrs alone: key -> packed block
        # plain files' blocks by key: a template, or None (laid out)
        self.templates: dict[int | None, _PlainBlock | None] = {}
        # by key: the key itself (one int object for all the inodes of a key, not one
        # each: 32 bytes an inode) and the block's size
        sizes: dict[int, tuple[int, int]] = {}
        maybe_shared, digest_lengths = self._maybe_shared, _METACOPY_PREFIX
        for ino in inos:
            node = ino.node
            key = None
            if type(node) is Leaf and (tc := type(c := node.content)) in _CONTENT_XATTR_KINDS:
                if tc is External and c.payload is None and c.id not in maybe_shared \
                        and len(c.id) in digest_lengths:
                    known = sizes.get(id(ino.xattrs) << 1 | (len(c.id) == 64))
                    if known is None:
                        key = id(ino.xattrs) << 1 | (len(c.id) == 64)
                        known = sizes[key] = (key, self.layout(self.items(ino))[0])
                    key, ino.xattr_size = known
                else:
                    ino.xattr_size = self.layout(self.items(ino))[0]
            elif ino.xattrs:
                known = sizes.get(~id(ino.xattrs))
                if known is None:
                    key = ~id(ino.xattrs)
                    known = sizes[key] = (key, self.layout(ino.xattrs)[0])
                key, ino.xattr_size = known
            add_key(key)

    def name_info(self, k: bytes) -> tuple[int, bytes, int]:
        info = self.names.get(k)
        if info is None:
            idx, suffix = _split_xattr_name(k, self.order)
            if len(suffix) > 255:
                raise ImageError(f"xattr name {k[:40]!r}... longer than EROFS allows")
            info = self.names[k] = (idx, suffix, 1 << F.xattr_name_filter_bit(idx, suffix))
        return info

    def items(self, ino: _Ino) -> _Items | list[tuple[bytes, bytes]]:
        """Every xattr of an inode, in the order written."""
        extra = _content_xattrs(ino.node)
        if not extra:
            return ino.xattrs
        if self.v2:
            return [*extra, *ino.xattrs]
        return sorted([*ino.xattrs, *extra])

    def layout(self, items) -> tuple[int, int, list[int], list[tuple[int, bytes, bytes]]]:
        """(block size, name filter, table offsets referred to, (index, suffix, value) of the
        xattrs stored in the inode)."""
        offsets = self.offsets
        names = self.names
        entry_size = F.XattrEntry.SIZE + 3  # + padding to 4, masked off below
        filt = 0
        refs: list[int] = []
        local: list[tuple[int, bytes, bytes]] = []
        size = F.XattrIbodyHeader.SIZE
        for kv in items:
            k, v = kv
            idx, suffix, bit = names.get(k) or self.name_info(k)
            ref = offsets.get(kv) if offsets else None
            if ref is not None and len(refs) < MAX_SHARED_PER_INODE:
                refs.append(ref)
                size += 4
            else:
                local.append((idx, suffix, v))
                size += (entry_size + len(suffix) + len(v)) & ~3
            filt |= bit
        return size, (~filt) & 0xFFFFFFFF, refs, local

    def block(self, ino: _Ino, key: int | None, table_base: int) -> bytes | bytearray:
        """The packed xattr block of an inode whose `keys` entry is key (shared ids relative
        to the image start)."""
        if key is not None and key < 0:  # its own xattrs alone
            packed = self.fixed.get(key)
            if packed is None:
                packed = self.fixed[key] = self._pack(*self.layout(ino.xattrs), table_base)
            return packed
        if key is not None:
            if key not in self.templates:
                self.templates[key] = _PlainBlock.of(self, ino, table_base)
            plain = self.templates[key]
            if plain is not None:
                return plain.block(ino.node.content.id)
        return self._pack(*self.layout(self.items(ino)), table_base)

    @staticmethod
    def _pack(size: int, filt: int, refs: list[int], local: list[tuple[int, bytes, bytes]],
              table_base: int) -> bytearray:
        buf = bytearray(size)
        F.XattrIbodyHeader.FMT.pack_into(buf, 0, filt, len(refs))
        off = F.XattrIbodyHeader.SIZE
        for rel in refs:
            F.BLOCKMAP_ENTRY.pack_into(buf, off, (table_base + rel) // 4)
            off += 4
        pack_xe = F.XattrEntry.FMT.pack_into
        for idx, suffix, value in local:
            pack_xe(buf, off, len(suffix), idx, len(value))
            off += 4
            end = off + len(suffix) + len(value)
            buf[off:end] = suffix + value
            off = (end + 3) & ~3
        return buf


class _PlainBlock:
    """The xattr block of a plain file: backed by the object at its id's own path, with
    neither its metacopy (the digest) nor its redirect (the path) shared (most files of an
    image). The files of one set of xattrs of their own have the same block but for the
    digest and its path, at the same offsets: a template with those put in, instead of a
    block laid out and packed for each file (a fifth of a 200,000-file image build)."""

    def __init__(self, head: bytes, middle: bytes, tail: bytes) -> None:
        self._head, self._middle, self._tail = head, middle, tail

    @classmethod
    def of(cls, xattrs: _Xattrs, ino: _Ino, table_base: int) -> _PlainBlock | None:
        """The template of the plain file `ino`'s block, made from that block (None if its
        two values do not come in the order they are put in)."""
        digest = ino.node.content.id
        size, filt, refs, local = xattrs.layout(xattrs.items(ino))
        packed = bytes(xattrs._pack(size, filt, refs, local, table_base))
        values: dict[tuple[int, bytes], tuple[int, int]] = {}  # name -> (offset, length) of its value
        off = F.XattrIbodyHeader.SIZE + 4 * len(refs)
        for idx, suffix, value in local:
            values[(idx, suffix)] = (off + F.XattrEntry.SIZE + len(suffix), len(value))
            off += F.xattr_entry_size(len(suffix), len(value))
        metacopy = values.get(xattrs.name_info(XATTR_METACOPY)[:2])
        redirect = values.get(xattrs.name_info(XATTR_REDIRECT)[:2])
        if metacopy is None or redirect is None:
            return None
        digest_at = metacopy[0] + metacopy[1] - len(digest)  # the digest ends the metacopy value
        path_at, path_end = redirect[0] + 1, redirect[0] + redirect[1]  # the path follows its "/"
        if digest_at + len(digest) > path_at:
            return None
        plain = cls(packed[:digest_at], packed[digest_at + len(digest):path_at], packed[path_end:])
        return plain if plain.block(digest) == packed else None

    def block(self, digest: bytes) -> bytes:
        path = hexlify(digest)  # object_path(digest), without a call to it
        return b"".join((self._head, digest, self._middle, path[:2], b"/", path[2:], self._tail))


# ---------------------------------------------------------------------------- data


@functools.cache  # bounded: at most a block's worth of sizes
def _zeros(n: int) -> bytes:
    return bytes(n)


@functools.cache  # bounded: at most MAX_CHUNKS counts
def _null_indexes(count: int) -> bytes:
    return b"\xff" * (4 * count)


_NULL_INDEX = _null_indexes(1)


def _chunk_bits(size: int) -> int:
    bits = (size - 1).bit_length() if size > 1 else 1
    return min(max(bits, F.BLOCK_BITS), 43)


def _split_tail(data_len: int) -> tuple[int, int]:
    nblocks, tail = divmod(data_len, F.BLOCK_SIZE)
    if tail > F.BLOCK_SIZE // 2:
        nblocks += 1
        tail = 0
    return nblocks, tail


def _prepare_data_epoch1(inos: list[_Ino], min_sec: int, min_nsec: int) -> None:
    """Each inode's data layout, size, inline part and data blocks (epoch 1), and whether
    it needs an extended inode (one whose times are not the image's, or a field too wide)."""
    # One loop over hundreds of thousands of records: constants are locals.
    B, BITS = F.BLOCK_SIZE, F.BLOCK_BITS
    CHUNK, INLINE, PLAIN = F.DATALAYOUT_CHUNK_BASED, F.DATALAYOUT_FLAT_INLINE, F.DATALAYOUT_FLAT_PLAIN
    IFMT, IFREG = _S_IFMT, _stat.S_IFREG
    null_index = _NULL_INDEX
    for ino in inos:
        node = ino.node
        is_symlink = False
        wide = False  # a special file whose dumpfile SIZE does not fit 32 bits (C: extended inode)
        if type(ino) is _DirIno:
            _prepare_dir(ino)
        else:
            c = node.content
            tc = type(c)
            if tc is External or tc is ExternalNoVerity or tc is Sparse:  # most files: first
                size = c.size
                ino.size = size
                ino.layout = CHUNK
                if 0 < size <= 1 << 43:
                    # one chunk, of the file's size rounded up to a power of two (a block at least)
                    bits = (size - 1).bit_length()
                    ino.i_u = bits - BITS if bits > BITS else 0
                    ino.inline = null_index
                else:
                    bits = _chunk_bits(size)
                    count = -(-size // (1 << bits))
                    if count > MAX_CHUNKS:
                        raise ImageError("cannot write file: File too large")
                    ino.inline = _null_indexes(count)
                    ino.i_u = bits - BITS  # the chunk format; the first block's high bits join it at layout
                    if 4 * count + ino.xattr_size % 32 > B:
                        # the indexes get a block of their own, which C fills with null
                        # indexes to the end (promoted)
                        ino.blocks = b"\xff" * B
                        ino.nblocks = 1
                        ino.inline = b""
            elif tc is Inline or (tc is CharDevice and ino.mode & IFMT == IFREG):
                data = c.data if tc is Inline else b""
                ino.size = len(data)
                nblocks, tail = _split_tail(len(data))
                ino.nblocks = nblocks
                if nblocks:
                    ino.blocks = data[: nblocks * B]
                ino.inline = data[nblocks * B:] if tail else b""
                ino.layout = INLINE if tail else PLAIN
            elif tc is Symlink:
                ino.size = len(c.target)
                ino.layout = INLINE
                ino.inline = c.target
                is_symlink = True  # inline or promoted, decided below
            elif tc is CharDevice or tc is BlockDevice:
                ino.layout = PLAIN
                ino.i_u = c.rdev & 0xFFFFFFFF
                wide = c.dump_size > 0xFFFFFFFF
            else:  # fifo, socket
                ino.layout = PLAIN
                wide = c.dump_size > 0xFFFFFFFF
        st = node.stat
        extended = ino.extended = wide or not (
            st.mtime_sec == min_sec and st.mtime_nsec == min_nsec and ino.nlink <= 0xFFFF
            and st.uid <= 0xFFFF and st.gid <= 0xFFFF and ino.size <= 0xFFFFFFFF
        )
        if is_symlink and (64 if extended else 32) + ino.xattr_size + ino.size >= B:
            # long symlink target: one data block instead of an inline tail (promoted)
            ino.layout = PLAIN
            ino.blocks = ino.inline
            ino.nblocks = 1
            ino.inline = b""


def _prepare_dir(ino: _DirIno) -> None:
    """A directory's size from its names alone (its bytes are built once nids are known)."""
    B = F.BLOCK_SIZE
    names = ino.names
    for name, target in ((b".", ino.num), (b"..", ino.parent.num)):
        at = bisect.bisect_left(names, name)
        names.insert(at, name)
        ino.children.insert(at, target)
    full = 0
    cur = 0
    for n in names:
        cost = F.Dirent.SIZE + len(n)
        if cur + cost > B:
            full += 1
            cur = 0
        cur += cost
    if cur > B // 2:
        full += 1
        cur = 0
    ino.nblocks = full
    ino.size = full * B + cur
    ino.inline = _zeros(cur)  # placeholder of the right length
    ino.layout = F.DATALAYOUT_FLAT_INLINE if cur else F.DATALAYOUT_FLAT_PLAIN


# ---------------------------------------------------------------------------- layout + emit


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _layout_and_emit(inos: list[_Ino], xattrs: _Xattrs, version: int, min_sec: int, min_nsec: int,
                     sink: ImageSink) -> None:
    # Per-inode loops over hundreds of thousands of records: constants are locals.
    B = F.BLOCK_SIZE
    CHUNK, INLINE = F.DATALAYOUT_CHUNK_BASED, F.DATALAYOUT_FLAT_INLINE
    IFMT, IFLNK, DIR = _S_IFMT, _stat.S_IFLNK, _DirIno
    v2 = version == 2
    with_blocks: list[_Ino] = []  # the inodes that have data blocks, in inode order
    nids: array[int] = array("Q")  # by inode number
    add_nid = nids.append
    pos = F.INODE_TABLE_OFFSET
    for ino in inos:
        pos = (pos + 31) & ~31
        meta = (64 if ino.extended else 32) + ino.xattr_size  # F.ExtendedInode / F.CompactInode
        layout = ino.layout
        tail = len(ino.inline)
        nblocks = ino.nblocks
        if nblocks:
            with_blocks.append(ino)
        if layout == CHUNK:
            if nblocks:  # promoted: the indexes in a block of their own
                pos = _align(pos, B)
            elif (start := pos + meta) % B and B - start % B < tail:
                pos += _align(B - start % B, 32)
        elif ino.mode & IFMT == IFLNK and (nblocks or not v2):
            if nblocks:  # promoted: the target in a block of its own
                if pos // B != (pos + meta + ino.size - 1) // B:
                    pos = _align(pos, B)
            elif layout == INLINE and pos % B + meta + ino.size % B > B:
                pos = _align(pos, B)
        elif layout == INLINE:
            start = pos + meta
            if v2:
                # (exclusive end: a tail ending exactly on a boundary also moves)
                if (start - 1) // B != (start + ino.size % B) // B:
                    pos = _align(pos + B - (start - 1) % B, 32)
            elif start % B and B - start % B < tail:
                pos += _align(B - start % B, 32)
        add_nid(pos >> 5)
        pos += meta + tail
    inodes_end = _align(pos, 32)
    if v2:
        # composefs-rs: i_ino is the nid, shared xattr ids are absolute offsets / 4
        xattr_blkaddr = 0
    else:
        xattr_blkaddr = inodes_end // B
    table_base = inodes_end - xattr_blkaddr * B
    pos = inodes_end
    table_parts = []
    for idx, suffix, value in xattrs.table:
        e = F.XattrEntry(len(suffix), idx, len(value)).pack() + suffix + value
        e += bytes(-len(e) % 4)
        table_parts.append(e)
        pos += len(e)
    table = b"".join(table_parts)
    first_data_block = blk = _align(pos, B) // B
    # i_u of an inode with data blocks is its first block (chunk-based: the block's high
    # bits join the chunk format there); the others' i_u (chunk format, rdev, 0) is set
    for ino in with_blocks:
        first = blk
        blk += ino.nblocks
        if ino.layout == CHUNK:
            ino.i_u = (first & 0xFFFF0000) | ino.i_u
        else:
            ino.i_u = first
    total_blocks = max(blk, 1)
    if total_blocks * B > F.MAX_IMAGE_SIZE:  # before a byte goes out: no image fsck would call invalid
        raise ImageError(f"the format-{version} EROFS image would be {total_blocks * B} bytes, past composefs's "
                         f"{F.MAX_IMAGE_SIZE >> 30} GiB limit ({len(inos)} inodes): the image has too many files "
                         "or too large xattrs for composefs")
    sink.start(total_blocks * B)

    # The metadata blocks (header, superblock, inodes with their xattrs and inline data,
    # shared xattrs) are filled in a window that is written out as it passes a piece's
    # size: inodes are laid out in order. Then the data blocks, also in inode order.
    window = bytearray(F.INODE_TABLE_OFFSET)
    base = 0  # image offset of window[0]
    F.ComposefsHeader(flags=F.COMPOSEFS_FLAGS_HAS_ACL if xattrs.has_acl else 0,
                      composefs_version=version).pack_into(window, 0)
    F.Superblock(
        root_nid=nids[0], inos=len(inos), build_time=min_sec & 0xFFFFFFFFFFFFFFFF,
        build_time_nsec=min_nsec, blocks=total_blocks, xattr_blkaddr=xattr_blkaddr,
    ).pack_into(window, F.SUPERBLOCK_OFFSET)

    pack_c = F.CompactInode.FMT.pack_into
    pack_e = F.ExtendedInode.FMT.pack_into
    keys, block, fixed, templates, piece_size = xattrs.keys, xattrs.block, xattrs.fixed, xattrs.templates, _PIECE
    window_len = len(window)
    for at, ino in enumerate(inos):
        off = nids[at] << 5
        if off - base >= piece_size:
            done = min(off - base, window_len)
            sink.write(window[:done])
            del window[:done]
            base += done
            window_len -= done
        xattr_size = ino.xattr_size
        extended = ino.extended
        inline = ino.inline
        off -= base
        end = off + (64 if extended else 32) + xattr_size + len(inline)
        if end > window_len:
            window += bytes(max(end - window_len, piece_size >> 4))
            window_len = len(window)
        fmt = (ino.layout << 1) | extended  # F.make_inode_format
        icount = 0 if not xattr_size else 1 + (xattr_size - 12) // 4
        st = ino.node.stat
        mode = ino.mode
        if extended:
            # composefs-rs: i_ino is the nid, mtime without nanoseconds
            pack_e(window, off, fmt, icount, mode & 0xFFFF, ino.size, ino.i_u, nids[at] if v2 else at,
                   st.uid, st.gid, st.mtime_sec & 0xFFFFFFFFFFFFFFFF, 0 if v2 else st.mtime_nsec, ino.nlink)
            off += 64
        else:
            pack_c(window, off, fmt, icount, mode & 0xFFFF, ino.nlink, ino.size, ino.i_u,
                   nids[at] if v2 else at, st.uid, st.gid)
            off += 32
        if xattr_size:
            # most inodes' blocks are fixed or from a template, made by `block` for the
            # first inode of each key
            key = keys[at]
            xblock: bytes | bytearray | None = fixed.get(key)
            if xblock is None:
                plain = templates.get(key)
                xblock = plain.block(ino.node.content.id) if plain is not None else block(ino, key, table_base)
            window[off:off + xattr_size] = xblock
            off += xattr_size
        if type(ino) is DIR:
            tail_bytes = _dir_data(ino, True, nids, inos)
            window[off:off + len(tail_bytes)] = tail_bytes
        elif inline:
            window[off:off + len(inline)] = inline
    meta_end = first_data_block * B - base
    if meta_end > len(window):
        window += bytes(meta_end - len(window))
    window[inodes_end - base:inodes_end - base + len(table)] = table
    sink.write(window[:meta_end])
    del window

    piece = bytearray()
    blk = first_data_block
    for ino in with_blocks:
        # a directory's full blocks are packed here, not kept from the inode's pass
        data = _dir_data(ino, False, nids, inos) if type(ino) is DIR else ino.blocks
        _check_blocks(ino, len(data), blk)
        size = ino.nblocks * B
        piece += data
        piece += _zeros(size - len(data)) if size - len(data) < B else bytes(size - len(data))
        blk += ino.nblocks
        if len(piece) >= piece_size:
            sink.write(piece)
            piece = bytearray()
    if piece:
        sink.write(piece)
    if blk != total_blocks:  # what `sink.start` was told, whatever the sink
        raise AssertionError(f"EROFS writer: {blk} blocks written of a {total_blocks}-block image")


_PIECE = 1 << 20  # bytes an image is written in


def _check_blocks(ino: _Ino, data_len: int, next_block: int) -> None:
    """An inode's data goes to the next free blocks (where its i_u points: for a chunk-based
    file only the high bits), and fits the blocks laid out for it. Blocks before the first
    data block hold the header, superblock, inodes and shared xattrs: writing there would
    corrupt the image, so it is a bug in the layout, never a property of the input."""
    mask = 0xFFFF0000 if ino.layout == F.DATALAYOUT_CHUNK_BASED else 0xFFFFFFFF
    if (ino.i_u ^ next_block) & mask or data_len > ino.nblocks * F.BLOCK_SIZE:
        raise AssertionError(f"EROFS writer: an inode's {data_len} bytes of data at block "
                             f"{ino.i_u & mask} outside its blocks ({ino.nblocks} blocks; next free block {next_block})")


def _dir_data(ino: _DirIno, tail: bool, nids: array[int], inos: list[_Ino]) -> bytes:
    """A directory whose children have nids (by inode number): its inline tail (``tail``),
    else its full blocks, each padded to 4096. Each is packed when written, the other not."""
    B = F.BLOCK_SIZE
    names, children = ino.names, ino.children
    if not ino.nblocks:  # most directories: every entry in the tail
        return _dir_block(names, children, nids, inos) if tail else b""
    starts = [0]  # index of each block's first entry
    cur = 0
    for i, name in enumerate(names):
        cost = F.Dirent.SIZE + len(name)
        if cur + cost > B:
            starts.append(i)
            cur = 0
        cur += cost
    starts.append(len(names))
    if tail:
        if len(starts) - 1 <= ino.nblocks:
            return b""
        a, b = starts[-2], starts[-1]
        return _dir_block(names[a:b], children[a:b], nids, inos)
    out = bytearray()
    for k in range(ino.nblocks):
        a, b = starts[k], starts[k + 1]
        out += _dir_block(names[a:b], children[a:b], nids, inos)
        out += bytes(-len(out) % B)
    return bytes(out)


@functools.cache  # bounded: at most a block's worth of entries (4096 // 13)
def _dirents(count: int) -> struct.Struct:
    """The headers of a directory block of `count` entries (erofs_dirent, F.Dirent), as one
    struct: packed in one call instead of one per entry."""
    return struct.Struct("<" + F.Dirent.FMT.format.lstrip("<") * count)


def _dir_block(names: list[bytes], children: array[int], nids: array[int], inos: list[_Ino]) -> bytes:
    """One directory block of these entries (`children`: their inode numbers): their
    headers (nid, name offset, file type), then their names."""
    nameoffs = itertools.accumulate(map(len, names), initial=F.Dirent.SIZE * len(names))
    fields = [v for c, off in zip(children, nameoffs) for v in (nids[c], off, _FTYPES[inos[c].mode & _S_IFMT])]
    return _dirents(len(names)).pack(*fields) + b"".join(names)
