"""EROFS composefs image writer (spec 5).

`write_image(fs, version)`:
* versions 0 and 1 ("epoch 1") are byte-identical to C mkcomposefs 1.0.8;
* version 2 is the legacy composefs-rs layout.

`choose_version(fs, min_version, max_version)` applies the C tool's rule (raise to the
maximum only when the tree holds a whiteout).

The writer is two-pass: `_collect_*` turn the tree into a flat list of `_Ino` records in inode
order (with the composefs xattrs), `_share_xattrs` and `_prepare_data_*` fix every size and
layout, then `_layout_and_emit` assigns nids and block addresses and packs the bytes into one
preallocated bytearray (directory blocks are built last, once every nid is known).
"""

from __future__ import annotations

import functools
import itertools
import stat as _stat
from collections import Counter, deque
from typing import NoReturn

from pycfs.host.errors import PycfsError
from pycfs.host.erofs import format as F
from pycfs.host.tree import (
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
    """One inode of the image (hardlinked names share one)."""

    __slots__ = (
        "blkaddr",
        "blocks",
        "children",
        "chunk_count",
        "chunk_format",
        "extended",
        "ftype",
        "gid",
        "i_u",
        "index",
        "inline",
        "layout",
        "local",
        "mode",
        "mtime",
        "name_filter",
        "nblocks",
        "nid",
        "nlink",
        "node",
        "nsec",
        "parent",
        "promoted",
        "rdev",
        "shared",
        "size",
        "uid",
        "xattr_size",
        "xattrs",
    )

    def __init__(self, node, index: int, parent: _Ino | None = None) -> None:
        self.node = node
        self.index = index
        self.parent = parent
        self.mode = self.uid = self.gid = self.mtime = self.nsec = self.nlink = 0
        self.layout = self.ftype = self.nid = 0
        self.extended = False
        self.xattrs: dict[bytes, bytes] = {}
        self.shared: list[int] = []
        self.local: list[tuple[int, bytes, bytes]] = []
        self.xattr_size = 0
        self.name_filter = 0
        self.inline = b""
        self.blocks = b""
        self.nblocks = 0
        self.i_u = 0
        self.rdev = 0
        self.size = 0
        self.children: list[tuple[bytes, _Ino]] = []
        self.promoted = False
        self.chunk_format = 0
        self.chunk_count = 0
        self.blkaddr = 0  # first data block, when nblocks


_FTYPES = {
    _stat.S_IFREG: F.FT_REG_FILE, _stat.S_IFDIR: F.FT_DIR, _stat.S_IFCHR: F.FT_CHRDEV,
    _stat.S_IFBLK: F.FT_BLKDEV, _stat.S_IFIFO: F.FT_FIFO, _stat.S_IFSOCK: F.FT_SOCK,
    _stat.S_IFLNK: F.FT_SYMLINK,
}


def write_image(fs: FileSystem, version: int = 0) -> bytes:
    """Serialise `fs` as a composefs EROFS image of format `version` (0, 1 or 2)."""
    if version not in (0, 1, 2):
        raise ImageError(f"cannot write file: Invalid argument (format version {version})")
    with gc_paused():
        return _write_image(fs, version)


def _write_image(fs: FileSystem, version: int) -> bytes:
    inos = _collect_v2(fs) if version == 2 else _collect_epoch1(fs, version)
    try:
        _check_limits(inos)
        if version == 2:
            shared_table = _share_xattrs(inos, v2=True)
            for ino in inos:
                _prepare_data_v2(ino)
            return _layout_and_emit(inos, shared_table, 2, 0, 0)
        _prepare_xattrs_epoch1(inos)
        shared_table = _share_xattrs(inos, v2=False)
        min_sec, min_nsec = min((i.mtime, i.nsec) for i in inos)
        for ino in inos:
            _prepare_data_epoch1(ino, min_sec, min_nsec)
        return _layout_and_emit(inos, shared_table, version, min_sec, min_nsec)
    finally:
        # parent and child links make cycles: cut, the records go by reference counting
        # instead of waiting for a full collection (1.5 s at exit for 200,000 inodes)
        for ino in inos:
            ino.parent = None
            ino.children = []


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


def _canonical_occurrences(fs: FileSystem) -> tuple[dict[int, int], dict[int, tuple[int, bytes]]]:
    """Link counts per leaf and, for multiply-linked leaves, the (id(dir), name) where the
    inode is numbered: the recorded primary name, else the first depth-first occurrence."""
    counts: dict[int, int] = {}
    seen_dirs = {id(fs.root)}
    stack = [fs.root]
    while stack:
        d = stack.pop()
        for child in d.entries.values():
            if isinstance(child, Leaf):
                k = id(child)
                counts[k] = counts.get(k, 0) + 1
            elif id(child) not in seen_dirs:
                seen_dirs.add(id(child))
                stack.append(child)
    multi = {k for k, c in counts.items() if c > 1}
    if not multi:
        return counts, {}
    canon = _dfs_first(fs.root, multi)
    for k in multi:
        rec = fs.primary_links.get(k)
        if rec is not None and id(rec[0].entries.get(rec[1])) == k:
            canon[k] = (id(rec[0]), rec[1])
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

    root_ino = _Ino(root, 0)
    root_ino.parent = root_ino
    inos: list[_Ino] = [root_ino]
    by_id: dict[int, _Ino] = {id(root): root_ino}
    late: list[tuple[_Ino, int, int]] = []  # (dir ino, child position, leaf id)
    multi = {k for k, n in counts.items() if n > 1}
    queue = deque([root_ino])
    while queue:
        dino = queue.popleft()
        d: Directory = dino.node
        entries = d.entries
        if dino is root_ino and stubs:
            entries = dict(entries)
            entries.update(stubs)
        children = dino.children
        for name in sorted(entries):
            child = entries[name]
            k = id(child)
            if type(child) is Directory:
                cino = by_id.get(k)
                if cino is None and _is_dir_home(fs, child, d, name):
                    by_id[k] = cino = _Ino(child, len(inos), dino)
                    inos.append(cino)
                    queue.append(cino)
            elif k in multi and canon.get(k) != (id(d), name):
                cino = by_id.get(k)
            else:
                by_id[k] = cino = _Ino(child, len(inos), dino)
                inos.append(cino)
            if cino is None:
                # canonical name is deeper in the BFS: fill in once it has a number
                late.append((dino, len(children), k))
                children.append((name, None))  # type: ignore[arg-type]
                continue
            children.append((name, cino))
    for dino, pos, k in late:
        dino.children[pos] = (dino.children[pos][0], by_id[k])

    # per-inode metadata and composefs xattrs
    wh_parents: list[_Ino | None] = []
    for ino in inos:
        node = ino.node
        st = node.stat
        ino.uid, ino.gid = st.uid, st.gid
        ino.mtime, ino.nsec = st.mtime_sec, st.mtime_nsec
        ino.xattrs = _escape_xattrs(st.xattrs) if st.xattrs else {}
        if type(node) is Directory:
            ino.mode = _stat.S_IFDIR | (st.mode & 0o7777)
            ino.nlink = _dir_nlink(ino)
            continue
        ino.nlink = 1 if id(node) in stub_ids else (node.nlink if node.nlink is not None else counts.get(id(node), 1))
        c = node.content
        tc = type(c)
        ino.mode = TYPE_BITS[tc] | (st.mode & 0o7777)
        if tc is External:
            ino.xattrs[XATTR_METACOPY] = _metacopy(c.id)
            backing = c.backing_path  # a property: hex and slices per call
            if backing:
                ino.xattrs[XATTR_REDIRECT] = b"/" + backing
        elif tc is ExternalNoVerity or tc is Sparse:
            ino.xattrs[XATTR_METACOPY] = b""
            if tc is ExternalNoVerity and c.backing_path:
                ino.xattrs[XATTR_REDIRECT] = b"/" + c.backing_path
        elif tc is CharDevice and c.rdev == 0 and id(node) not in stub_ids:
            # a whiteout: escaped to a regular file; only the directory of its own name is
            # marked, not one holding a hardlink to it
            ino.mode = _stat.S_IFREG | (st.mode & 0o7777)
            ino.xattrs[XATTR_ESC_WHITEOUT] = b""
            ino.xattrs[XATTR_USER_WHITEOUT] = b""
            wh_parents.append(ino.parent)

    for wdir in wh_parents:
        if wdir is not None:
            wdir.xattrs[XATTR_ESC_WHITEOUTS] = b""
            wdir.xattrs[XATTR_USER_WHITEOUTS] = b""
            if version >= 1:
                wdir.xattrs[XATTR_ESC_OPAQUE] = b"x"
                wdir.xattrs[XATTR_USER_OPAQUE] = b"x"
    root_ino.xattrs[XATTR_OPAQUE] = b"y"
    return inos


def _dir_nlink(ino: _Ino) -> int:
    """2 + the subdirectories whose home is this directory (hardlinked names do not count)."""
    return 2 + len({id(c) for _n, c in ino.children if isinstance(c.node, Directory) and c.parent is ino and c is not ino})


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
    by_id: dict[int, _Ino] = {}

    def new_ino(node, parent: _Ino | None) -> _Ino:
        ino = _Ino(node, len(inos))
        ino.parent = parent if parent is not None else ino
        inos.append(ino)
        by_id[id(node)] = ino
        return ino

    root_ino = new_ino(fs.root, None)
    iters = [(root_ino, iter(fs.root.sorted_entries()))]
    while iters:
        dino, it = iters[-1]
        for name, child in it:
            k = id(child)
            if isinstance(child, Leaf):
                counts[k] = counts.get(k, 0) + 1
            cino = by_id.get(k)
            if cino is None:
                cino = new_ino(child, dino)
                dino.children.append((name, cino))
                if isinstance(child, Directory):
                    iters.append((cino, iter(child.sorted_entries())))
                    break
            else:
                dino.children.append((name, cino))
        else:
            iters.pop()

    for ino in inos:
        node = ino.node
        st = node.stat
        ino.uid, ino.gid = st.uid, st.gid
        ino.mtime, ino.nsec = st.mtime_sec, 0
        ino.mode = node.st_mode
        own = _escape_xattrs(dict(sorted(st.xattrs.items())))
        x: dict[bytes, bytes] = {}
        if isinstance(node, Directory):
            ino.nlink = _dir_nlink(ino)
        else:
            ino.nlink = node.nlink if node.nlink is not None else counts.get(id(node), 1)
            c = node.content
            if isinstance(c, External):
                x[XATTR_METACOPY] = F.OverlayMetacopy(digest_algo=_verity_algo(c.id), digest=c.id).pack()
            elif isinstance(c, (ExternalNoVerity, Sparse)):
                x[XATTR_METACOPY] = b""
            if isinstance(c, (External, ExternalNoVerity)) and c.backing_path:
                x[XATTR_REDIRECT] = b"/" + c.backing_path
        x.update(own)
        ino.xattrs = x
    return inos


def _prepare_data_v2(ino: _Ino) -> None:
    node = ino.node
    ino.extended = True
    if isinstance(node, Directory):
        _prepare_data_epoch1(ino, ino.mtime, ino.nsec)
        ino.extended = True
        return
    c = node.content
    ino.ftype = _FTYPES[_stat.S_IFMT(ino.mode)]
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
        ino.chunk_format = ino.i_u = 31
        ino.inline = b"\xff\xff\xff\xff" if isinstance(c, External) else b""
    elif isinstance(c, (CharDevice, BlockDevice)):
        ino.layout = F.DATALAYOUT_FLAT_PLAIN
        ino.rdev = ino.i_u = c.rdev & 0xFFFFFFFF
    else:
        ino.layout = F.DATALAYOUT_FLAT_PLAIN


def _check_limits(inos: list[_Ino]) -> None:
    """Reject what EROFS cannot store, with a message instead of a struct.error."""
    u32 = 1 << 32
    lo63, hi63 = -(1 << 63), 1 << 63
    for ino in inos:
        if not (0 <= ino.uid < u32 and 0 <= ino.gid < u32 and 0 <= ino.nlink < u32
                and 0 <= ino.nsec < u32 and lo63 <= ino.mtime < hi63):
            _refuse_inode(ino)
        if ino.children:
            names = [name for name, _c in ino.children]
            joined = b"".join(names)
            if b"/" in joined or b"\0" in joined or not 0 < min(map(len, names)) <= max(map(len, names)) <= 255:
                bad = next(n for n in names if not 0 < len(n) <= 255 or b"/" in n or b"\0" in n)
                raise ImageError(f"invalid file name {bad!r} (1..255 bytes, no '/' or NUL)")
        node = ino.node
        if type(node) is Leaf and type(node.content) is Symlink and not 0 < len(node.content.target) < 4096:
            raise ImageError(f"{_what(ino)}: symlink target of {len(node.content.target)} bytes (1..4095 allowed)")
        for k, v in ino.xattrs.items():
            if len(k) > 255 + 24 or len(v) > 0xFFFF:
                raise ImageError(f"{_what(ino)}: xattr {k[:40]!r} too long (name {len(k)}, value {len(v)} bytes)")


def _what(ino: _Ino) -> str:
    return f"inode {ino.index} ({type(ino.node).__name__})"


def _refuse_inode(ino: _Ino) -> NoReturn:
    if not (0 <= ino.uid < 1 << 32 and 0 <= ino.gid < 1 << 32):
        raise ImageError(f"{_what(ino)}: uid/gid {ino.uid}/{ino.gid} do not fit 32 bits")
    if not 0 <= ino.nlink < 1 << 32:
        raise ImageError(f"{_what(ino)}: nlink {ino.nlink} out of range")
    raise ImageError(f"{_what(ino)}: mtime {ino.mtime}.{ino.nsec} out of range")


# ---------------------------------------------------------------------------- xattrs


def _prepare_xattrs_epoch1(inos: list[_Ino]) -> None:
    for ino in inos:
        if ino.xattrs:
            # keys are unique, so the C order (name, then value length, then value) is by name
            ino.xattrs = dict(sorted(ino.xattrs.items()))


def _share_xattrs(inos: list[_Ino], v2: bool) -> list[tuple[int, bytes, bytes]]:
    """Move (key, value) pairs used by several inodes to the shared table; returns the table
    entries (name index, suffix, value) and fills each inode's xattr fields.

    Epoch 1 (C): table in descending (name, value length, value) order. V2 (composefs-rs):
    ascending (name index, suffix, value), and the lustre. prefix index is used."""
    order = _PREFIX_ORDER_V2 if v2 else _PREFIX_ORDER_EPOCH1
    # counted in C (Counter's update from an iterable)
    counts = Counter(itertools.chain.from_iterable(ino.xattrs.items() for ino in inos))
    shared = [kv for kv, n in counts.items() if n > 1]
    if v2:
        shared.sort(key=lambda kv: (*_split_xattr_name(kv[0], order), kv[1]))
    else:
        shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
    # A handful of distinct names on thousands of inodes: (prefix index, suffix, filter bit)
    # once per name.
    names: dict[bytes, tuple[int, bytes, int]] = {}

    def name_info(k: bytes) -> tuple[int, bytes, int]:
        idx, suffix = _split_xattr_name(k, order)
        if len(suffix) > 255:
            raise ImageError(f"xattr name {k[:40]!r}... longer than EROFS allows")
        info = names[k] = (idx, suffix, 1 << F.xattr_name_filter_bit(idx, suffix))
        return info

    # ids are relative to xattr_blkaddr; offsets within the table are known now, the table's
    # start is added in _layout_and_emit
    offsets: dict[tuple[bytes, bytes], int] = {}
    off = 0
    for kv in shared:
        idx, suffix, _bit = names.get(kv[0]) or name_info(kv[0])
        offsets[kv] = off
        off += F.xattr_entry_size(len(suffix), len(kv[1]))
    header_size = F.XattrIbodyHeader.SIZE
    entry_size = F.XattrEntry.SIZE + 3  # + padding to 4, masked off below
    for ino in inos:
        if not ino.xattrs:
            continue
        filt = 0
        shared_refs: list[int] = []
        local: list[tuple[int, bytes, bytes]] = []
        size = header_size
        for kv in ino.xattrs.items():
            k, v = kv
            idx, suffix, bit = names.get(k) or name_info(k)
            ref = offsets.get(kv) if offsets else None
            if ref is not None and len(shared_refs) < MAX_SHARED_PER_INODE:
                shared_refs.append(ref)
                size += 4
            else:
                local.append((idx, suffix, v))
                size += (entry_size + len(suffix) + len(v)) & ~3
            filt |= bit
        ino.shared = shared_refs  # byte offsets inside the table for now
        ino.local = local
        ino.xattr_size = size
        ino.name_filter = (~filt) & 0xFFFFFFFF
    return [(*names[kv[0]][:2], kv[1]) for kv in shared]


# ---------------------------------------------------------------------------- data


def _chunk_bits(size: int) -> int:
    bits = (size - 1).bit_length() if size > 1 else 1
    return min(max(bits, F.BLOCK_BITS), 43)


def _split_tail(data_len: int) -> tuple[int, int]:
    nblocks, tail = divmod(data_len, F.BLOCK_SIZE)
    if tail > F.BLOCK_SIZE // 2:
        nblocks += 1
        tail = 0
    return nblocks, tail


def _prepare_data_epoch1(ino: _Ino, min_sec: int, min_nsec: int) -> None:
    node = ino.node
    is_symlink = False
    wide = False  # a special file whose dumpfile SIZE does not fit 32 bits (C: extended inode)
    if isinstance(node, Directory):
        ino.ftype = F.FT_DIR
        # size from names alone; the bytes are built once nids are known
        names = [b".", b".."] + [n for n, _c in ino.children]
        names.sort()
        ino.children = sorted([(b".", ino), (b"..", ino.parent)] + ino.children, key=lambda t: t[0])  # type: ignore[arg-type]
        full = 0
        cur = 0
        for n in names:
            cost = F.Dirent.SIZE + len(n)
            if cur + cost > F.BLOCK_SIZE:
                full += 1
                cur = 0
            cur += cost
        if cur > F.BLOCK_SIZE // 2:
            full += 1
            cur = 0
        ino.nblocks = full
        ino.size = full * F.BLOCK_SIZE + cur
        ino.inline = bytes(cur)  # placeholder of the right length
        ino.layout = F.DATALAYOUT_FLAT_INLINE if cur else F.DATALAYOUT_FLAT_PLAIN
    else:
        c = node.content
        ino.ftype = _FTYPES[_stat.S_IFMT(ino.mode)]
        if isinstance(c, Inline) or (isinstance(c, CharDevice) and ino.ftype == F.FT_REG_FILE):
            data = c.data if isinstance(c, Inline) else b""
            ino.size = len(data)
            nblocks, tail = _split_tail(len(data))
            ino.nblocks = nblocks
            if nblocks:
                ino.blocks = data[: nblocks * F.BLOCK_SIZE]
            ino.inline = data[nblocks * F.BLOCK_SIZE:] if tail else b""
            ino.layout = F.DATALAYOUT_FLAT_INLINE if tail else F.DATALAYOUT_FLAT_PLAIN
        elif isinstance(c, Symlink):
            ino.size = len(c.target)
            ino.layout = F.DATALAYOUT_FLAT_INLINE
            ino.inline = c.target
            is_symlink = True  # inline or promoted, decided below
        elif isinstance(c, (External, ExternalNoVerity, Sparse)):
            size = c.size
            ino.size = size
            bits = _chunk_bits(size)
            count = -(-size // (1 << bits))
            if count > MAX_CHUNKS:
                raise ImageError("cannot write file: File too large")
            ino.layout = F.DATALAYOUT_CHUNK_BASED
            ino.chunk_format = bits - F.BLOCK_BITS
            ino.chunk_count = count
            ino.inline = b"\xff" * (4 * count)
            ino.i_u = ino.chunk_format
        elif isinstance(c, (CharDevice, BlockDevice)):
            ino.layout = F.DATALAYOUT_FLAT_PLAIN
            ino.rdev = c.rdev & 0xFFFFFFFF
            ino.i_u = ino.rdev
            wide = c.dump_size > 0xFFFFFFFF
        else:  # fifo, socket
            ino.layout = F.DATALAYOUT_FLAT_PLAIN
            wide = c.dump_size > 0xFFFFFFFF
    ino.extended = wide or not (
        ino.mtime == min_sec and ino.nsec == min_nsec and ino.nlink <= 0xFFFF
        and ino.uid <= 0xFFFF and ino.gid <= 0xFFFF and ino.size <= 0xFFFFFFFF
    )
    hdr = F.ExtendedInode.SIZE if ino.extended else F.CompactInode.SIZE
    if is_symlink and hdr + ino.xattr_size + ino.size >= F.BLOCK_SIZE:
        # long symlink target: one data block instead of an inline tail
        ino.promoted = True
        ino.layout = F.DATALAYOUT_FLAT_PLAIN
        ino.blocks = ino.inline
        ino.nblocks = 1
        ino.inline = b""
    elif ino.layout == F.DATALAYOUT_CHUNK_BASED and len(ino.inline) + ino.xattr_size % 32 > F.BLOCK_SIZE:
        # the indexes get a block of their own, which C fills with null indexes to the end
        ino.promoted = True
        ino.blocks = b"\xff" * F.BLOCK_SIZE
        ino.nblocks = 1
        ino.inline = b""


# ---------------------------------------------------------------------------- layout + emit


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _layout_and_emit(inos: list[_Ino], shared_table, version: int, min_sec: int, min_nsec: int) -> bytes:
    B = F.BLOCK_SIZE
    pos = F.INODE_TABLE_OFFSET
    for ino in inos:
        pos = _align(pos, 32)
        hdr = F.ExtendedInode.SIZE if ino.extended else F.CompactInode.SIZE
        meta = hdr + ino.xattr_size
        tail = len(ino.inline)
        is_symlink = ino.ftype == F.FT_SYMLINK
        if ino.promoted and is_symlink:
            if pos // B != (pos + meta + ino.size - 1) // B:
                pos = _align(pos, B)
        elif ino.promoted:
            pos = _align(pos, B)
        elif ino.layout == F.DATALAYOUT_CHUNK_BASED:
            start = pos + meta
            if start % B and B - start % B < tail:
                pos += _align(B - start % B, 32)
        elif ino.layout == F.DATALAYOUT_FLAT_INLINE and version == 2:
            start = pos + meta
            # (exclusive end: a tail ending exactly on a boundary also moves)
            if (start - 1) // B != (start + ino.size % B) // B:
                pos = _align(pos + B - (start - 1) % B, 32)
        elif ino.layout == F.DATALAYOUT_FLAT_INLINE:
            if is_symlink:
                if pos % B + meta + ino.size % B > B:
                    pos = _align(pos, B)
            else:
                start = pos + meta
                if start % B and B - start % B < tail:
                    pos += _align(B - start % B, 32)
        ino.nid = pos // 32
        pos += meta + tail
    inodes_end = _align(pos, 32)
    if version == 2:
        # composefs-rs: i_ino is the nid, shared xattr ids are absolute offsets / 4
        for ino in inos:
            ino.index = ino.nid
        xattr_blkaddr = 0
    else:
        xattr_blkaddr = inodes_end // B
    table_base = inodes_end - xattr_blkaddr * B
    pos = inodes_end
    table_parts = []
    for idx, suffix, value in shared_table:
        e = F.XattrEntry(len(suffix), idx, len(value)).pack() + suffix + value
        e += bytes(-len(e) % 4)
        table_parts.append(e)
        pos += len(e)
    table = b"".join(table_parts)
    first_data_block = blk = _align(pos, B) // B
    for ino in inos:
        if ino.nblocks:
            ino.blkaddr = first = blk
            blk += ino.nblocks
            if ino.layout == F.DATALAYOUT_CHUNK_BASED:
                ino.i_u = (first & 0xFFFF0000) | ino.chunk_format
            else:
                ino.i_u = first
        elif ino.layout != F.DATALAYOUT_CHUNK_BASED and ino.ftype not in (F.FT_CHRDEV, F.FT_BLKDEV):
            ino.i_u = 0
    total_blocks = max(blk, 1)
    img = bytearray(total_blocks * B)

    has_acl = version != 2 and any(k in ACL_XATTRS for ino in inos for k in ino.xattrs)
    F.ComposefsHeader(flags=F.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0, composefs_version=version).pack_into(img, 0)
    F.Superblock(
        root_nid=inos[0].nid, inos=len(inos), build_time=min_sec & 0xFFFFFFFFFFFFFFFF,
        build_time_nsec=min_nsec, blocks=total_blocks, xattr_blkaddr=xattr_blkaddr,
    ).pack_into(img, F.SUPERBLOCK_OFFSET)
    img[inodes_end:inodes_end + len(table)] = table

    pack_c = F.CompactInode.FMT.pack_into
    pack_e = F.ExtendedInode.FMT.pack_into
    pack_xh = F.XattrIbodyHeader.FMT.pack_into
    pack_xe = F.XattrEntry.FMT.pack_into
    pack_ref = F.BLOCKMAP_ENTRY.pack_into
    ft_dir = F.FT_DIR
    for ino in inos:
        off = ino.nid * 32
        fmt = F.make_inode_format(ino.extended, ino.layout)
        xattr_size = ino.xattr_size
        icount = 0 if not xattr_size else 1 + (xattr_size - 12) // 4
        if ino.extended:
            pack_e(img, off, fmt, icount, ino.mode & 0xFFFF, ino.size, ino.i_u, ino.index,
                   ino.uid, ino.gid, ino.mtime & 0xFFFFFFFFFFFFFFFF, ino.nsec, ino.nlink)
            off += 64
        else:
            pack_c(img, off, fmt, icount, ino.mode & 0xFFFF, ino.nlink, ino.size, ino.i_u,
                   ino.index, ino.uid, ino.gid)
            off += 32
        if xattr_size:
            pack_xh(img, off, ino.name_filter, len(ino.shared))
            off += 12
            for rel in ino.shared:
                pack_ref(img, off, (table_base + rel) // 4)
                off += 4
            for idx, suffix, value in ino.local:
                pack_xe(img, off, len(suffix), idx, len(value))
                off += 4
                end = off + len(suffix) + len(value)
                img[off:end] = suffix + value
                off = (end + 3) & ~3
        if ino.ftype == ft_dir:
            dir_blocks, tail_bytes = _dir_data(ino)
            img[off:off + len(tail_bytes)] = tail_bytes
            if dir_blocks:
                _put_blocks(img, ino, dir_blocks, first_data_block)
        else:
            if ino.inline:
                img[off:off + len(ino.inline)] = ino.inline
            if ino.blocks:
                _put_blocks(img, ino, ino.blocks, first_data_block)
    return bytes(img)


def _put_blocks(img: bytearray, ino: _Ino, data: bytes, first_data_block: int) -> None:
    """Copy an inode's data blocks to the blocks laid out for it. Blocks before the first
    data block hold the header, superblock, inodes and shared xattrs: writing there would
    corrupt the image, so it is a bug in the layout, never a property of the input."""
    start = ino.blkaddr
    if not (first_data_block <= start and len(data) <= ino.nblocks * F.BLOCK_SIZE):
        raise AssertionError(f"EROFS writer: inode {ino.index} data at block {start} "
                             f"({len(data)} bytes) outside its blocks (data starts at block {first_data_block})")
    img[start * F.BLOCK_SIZE:start * F.BLOCK_SIZE + len(data)] = data


def _dir_data(ino: _Ino) -> tuple[bytes, bytes]:
    """(full blocks padded to 4096, inline tail) of a directory whose children have nids."""
    B = F.BLOCK_SIZE
    blocks: list[list[tuple[bytes, _Ino]]] = [[]]
    cur = 0
    for name, child in ino.children:
        cost = F.Dirent.SIZE + len(name)
        if cur + cost > B:
            blocks.append([])
            cur = 0
        blocks[-1].append((name, child))
        cur += cost
    out_full = bytearray()
    tail = b""
    for i, entries in enumerate(blocks):
        data = _dir_block(entries)
        if i < ino.nblocks:
            out_full += data
            out_full += bytes(-len(data) % B)
        else:
            tail = data
    return bytes(out_full), tail


def _dir_block(entries: list[tuple[bytes, _Ino]]) -> bytes:
    n = len(entries)
    buf = bytearray(F.Dirent.SIZE * n + sum(len(name) for name, _c in entries))
    nameoff = F.Dirent.SIZE * n
    pack = F.Dirent.FMT.pack_into
    for i, (name, child) in enumerate(entries):
        pack(buf, i * F.Dirent.SIZE, child.nid, nameoff, child.ftype)
        buf[nameoff:nameoff + len(name)] = name
        nameoff += len(name)
    return bytes(buf)
