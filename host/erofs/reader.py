"""Read a composefs EROFS image back into a `FileSystem` (what `composefs-info dump` shows).

Strict: every offset is bounds-checked and anything outside what composefs writers produce
(compression, other block sizes, unknown xattr prefixes, bad dirents, directory loops) is an
`ImageFormatError` with the offending nid/offset.

composefs transformations are undone the way the C loader does it: native chr 0:0 entries
(the whiteout stubs) are skipped in epoch-1 images; `trusted.overlay.overlay.X` is unescaped
to `trusted.overlay.X`, other `trusted.overlay.*` are dropped (metacopy and redirect become
the file's digest and payload); a regular file marked as an escaped whiteout becomes chr 0:0
again and the directory markers are dropped.
"""

from __future__ import annotations

import stat as _stat
import struct
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from pycfs.host.errors import PycfsError
from pycfs.host.erofs import format as F
from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Inode,
    Leaf,
    LeafContent,
    Socket,
    Sparse,
    Stat,
    Symlink,
    object_path,
)

MAX_IMAGE_SIZE = F.MAX_IMAGE_SIZE

# the raw structs (a dataclass each is most of the cost of reading an inode or a dirent)
_COMPACT = F.CompactInode.FMT
_EXTENDED = F.ExtendedInode.FMT
_XATTR_ENTRY = F.XattrEntry.FMT
_DIRENT = F.Dirent.FMT
_LAYOUTS = (F.DATALAYOUT_FLAT_PLAIN, F.DATALAYOUT_FLAT_INLINE, F.DATALAYOUT_CHUNK_BASED)

_OVERLAY = b"trusted.overlay."
_OVERLAY_ESC = b"trusted.overlay.overlay."


class ImageFormatError(PycfsError):
    """The bytes are not a (well-formed) composefs EROFS image."""


@dataclass(slots=True)  # a server keeps one per inode: no __dict__ each
class RawInode:
    """An inode as stored, before composefs interpretation."""

    nid: int
    format: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    inline_offset: int  # absolute offset of the inline tail

    @property
    def datalayout(self) -> int:
        return F.inode_datalayout(self.format)


@dataclass
class LoadedImage:
    fs: FileSystem
    header: F.ComposefsHeader
    superblock: F.Superblock
    dir_sizes: dict[int, int] = field(default_factory=dict)  # id(Directory) -> i_size
    # regular files a user `trusted.overlay.whiteout` turned into whiteouts: id(leaf) -> the
    # external content C's composefs-info still prints for them
    masked: dict[int, External | ExternalNoVerity] = field(default_factory=dict)


# the external content a regular file marked a whiteout masks (C's composefs-info prints it)
_Masked: TypeAlias = External | ExternalNoVerity | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        if len(data) < F.SUPERBLOCK_OFFSET + F.Superblock.SIZE:
            raise ImageFormatError(f"image too small ({len(data)} bytes) for a composefs header and superblock")
        if len(data) > MAX_IMAGE_SIZE:
            raise ImageFormatError(f"image of {len(data)} bytes exceeds the 1 GiB composefs limit")
        self.data = bytes(data)  # no copy of bytes; what is read of it, sliced, is bytes already
        self.header = F.ComposefsHeader.unpack_from(self.data, 0)
        h = self.header
        if h.magic != F.COMPOSEFS_MAGIC:
            raise ImageFormatError(f"bad composefs magic 0x{h.magic:08x} (expected 0x{F.COMPOSEFS_MAGIC:08x})")
        if h.version != F.COMPOSEFS_HEADER_VERSION:
            raise ImageFormatError(f"unsupported composefs header version {h.version}")
        if h.composefs_version not in (0, 1, 2):
            raise ImageFormatError(f"unsupported composefs_version {h.composefs_version}")
        sb = F.Superblock.unpack_from(self.data, F.SUPERBLOCK_OFFSET)
        self.sb = sb
        if sb.magic != F.EROFS_SUPER_MAGIC:
            raise ImageFormatError(f"bad EROFS magic 0x{sb.magic:08x}")
        if sb.blkszbits != F.BLOCK_BITS:
            raise ImageFormatError(f"unsupported block size 2^{sb.blkszbits}")
        if sb.feature_compat & ~(F.FEATURE_COMPAT_SB_CHKSUM | F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER):
            raise ImageFormatError(f"unsupported feature_compat 0x{sb.feature_compat:x}")
        if sb.feature_incompat & ~F.FEATURE_INCOMPAT_CHUNKED_FILE:
            raise ImageFormatError(f"unsupported feature_incompat 0x{sb.feature_incompat:x}")
        if sb.sb_extslots or sb.extra_devices or sb.packed_nid or sb.xattr_prefix_count or sb.meta_blkaddr:
            raise ImageFormatError("image uses EROFS features composefs never writes (extslots, devices, packed inode, xattr prefixes or meta_blkaddr)")
        self.epoch1 = h.composefs_version in (0, 1)
        self._shared: dict[int, tuple[bytes, bytes]] = {}  # shared xattr id -> (name, value)

    def _need(self, off: int, size: int, what: str) -> None:
        if off < 0 or size < 0 or off + size > len(self.data):
            raise ImageFormatError(f"truncated image: {what} at offset {off} (+{size}) beyond end {len(self.data)}")

    def inode(self, nid: int) -> RawInode:
        # structs unpacked straight to fields: a walk reads every inode, and FUSE each it serves
        off = nid * 32
        data = self.data
        end = len(data)
        if off < 0 or off + 32 > end:
            self._need(off, 32, f"inode nid {nid}")
        fmt, icount, mode, nlink, size, i_u, ino, uid, gid = _COMPACT.unpack_from(data, off)
        if fmt & ~0xF:
            raise ImageFormatError(f"inode nid {nid}: unsupported i_format 0x{fmt:x}")
        layout = (fmt >> 1) & 0x7
        if layout not in _LAYOUTS:
            raise ImageFormatError(f"inode nid {nid}: unsupported data layout {layout} (compressed?)")
        if fmt & F.INODE_LAYOUT_EXTENDED:
            if off + 64 > end:
                self._need(off, 64, f"inode nid {nid}")
            _, icount, mode, size, i_u, ino, uid, gid, mtime, nsec, nlink = _EXTENDED.unpack_from(data, off)
            xoff = off + 64
        else:
            mtime, nsec = self.sb.build_time, self.sb.build_time_nsec
            xoff = off + 32
        if mtime >= 1 << 63:
            mtime -= 1 << 64
        if icount:
            xsize = 12 + 4 * (icount - 1)
            if xoff + xsize > end:
                self._need(xoff, xsize, f"xattrs of inode nid {nid}")
            xattrs = self._xattrs(nid, xoff, xsize)
        else:
            xsize = 0
            xattrs = ()
        if size > end and layout != F.DATALAYOUT_CHUNK_BASED and not _stat.S_ISCHR(mode) and not _stat.S_ISBLK(mode):
            raise ImageFormatError(f"inode nid {nid}: size {size} larger than the image")
        return RawInode(nid, fmt, mode, nlink, size, i_u, ino, uid, gid, mtime, nsec, xattrs, xoff + xsize)

    def _xattr_entry(self, off: int, end: int, nid: int) -> tuple[tuple[bytes, bytes], int]:
        if off + 4 > end:
            raise ImageFormatError(f"inode nid {nid}: xattr entry at {off} runs past its block")
        name_len, name_index, value_size = _XATTR_ENTRY.unpack_from(self.data, off)
        prefix = F.XATTR_PREFIXES.get(name_index)
        if prefix is None:
            raise ImageFormatError(f"inode nid {nid}: unknown xattr name index {name_index}")
        nend = off + 4 + name_len
        vend = nend + value_size
        if vend > end:
            raise ImageFormatError(f"inode nid {nid}: xattr entry at {off} runs past its block")
        return (prefix + self.data[off + 4:nend], self.data[nend:vend]), (vend + 3) & ~3

    def _xattrs(self, nid: int, off: int, size: int) -> tuple[tuple[bytes, bytes], ...]:
        end = off + size
        nshared = self.data[off + 4]  # the ibody header: u32 name filter, u8 shared count, 7 reserved
        pos = off + 12
        if pos + 4 * nshared > end:
            raise ImageFormatError(f"inode nid {nid}: {nshared} shared xattrs do not fit its xattr block")
        shared_ids = struct.unpack_from(f"<{nshared}I", self.data, pos)
        pos += 4 * nshared
        local = []
        while pos < end:
            kv, pos = self._xattr_entry(pos, end, nid)
            local.append(kv)
        # the C loader lists the inline entries first, then the shared ones
        decoded = self._shared.get
        for sid in shared_ids:
            local.append(decoded(sid) or self._shared_xattr(sid, nid))
        return tuple(local)

    def _shared_xattr(self, sid: int, nid: int) -> tuple[bytes, bytes]:
        """A shared xattr, decoded once: the inodes that refer to it share the one (name,
        value) (3000 files with one 32 KB xattr were 96 MB of copies)."""
        kv = self._shared.get(sid)
        if kv is None:
            soff = self.sb.xattr_blkaddr * F.BLOCK_SIZE + 4 * sid
            self._need(soff, 4, f"shared xattr {sid} of inode nid {nid}")
            kv, _ = self._xattr_entry(soff, len(self.data), nid)
            self._shared[sid] = kv
        return kv

    def data_of(self, ino: RawInode) -> bytes:
        """Bytes of a FLAT_PLAIN / FLAT_INLINE inode (directory, inline file, symlink)."""
        size = ino.size
        layout = (ino.format >> 1) & 0x7
        data = self.data
        if layout == F.DATALAYOUT_FLAT_PLAIN:
            if size == 0:
                return b""
            start = ino.i_u * F.BLOCK_SIZE
            self._need(start, size, f"data of inode nid {ino.nid}")
            return data[start:start + size]
        if layout == F.DATALAYOUT_FLAT_INLINE:
            nfull, tail = divmod(size, F.BLOCK_SIZE)
            start = ino.i_u * F.BLOCK_SIZE
            if nfull:
                self._need(start, nfull * F.BLOCK_SIZE, f"data blocks of inode nid {ino.nid}")
            inline = ino.inline_offset
            self._need(inline, tail, f"inline data of inode nid {ino.nid}")
            if tail and inline // F.BLOCK_SIZE != (inline + tail - 1) // F.BLOCK_SIZE:
                raise ImageFormatError(f"inode nid {ino.nid}: inline data crosses a block boundary")
            if not nfull:
                return data[inline:inline + tail]
            return data[start:start + nfull * F.BLOCK_SIZE] + data[inline:inline + tail]
        raise ImageFormatError(f"inode nid {ino.nid}: chunk-based inode has no inline data")

    def dirents(self, ino: RawInode) -> list[tuple[bytes, int, int]]:
        data = self.data_of(ino)
        out = []
        B = F.BLOCK_SIZE
        for bstart in range(0, len(data), B):
            size = min(B, len(data) - bstart)
            if size < _DIRENT.size:
                raise ImageFormatError(f"directory nid {ino.nid}: truncated dirent block")
            first = data[bstart + 8] | data[bstart + 9] << 8  # the first dirent's nameoff
            if first % _DIRENT.size or not _DIRENT.size <= first <= size:
                raise ImageFormatError(f"directory nid {ino.nid}: bad first nameoff {first}")
            ents = list(_DIRENT.iter_unpack(data[bstart:bstart + first]))
            last = len(ents) - 1
            for i, (nid, nameoff, ftype) in enumerate(ents):
                end = ents[i + 1][1] if i < last else size
                if not nameoff <= end <= size:
                    raise ImageFormatError(f"directory nid {ino.nid}: bad nameoff {nameoff}")
                name = data[bstart + nameoff:bstart + end]
                if i == last:  # the last name may be NUL-padded
                    nul = name.find(b"\0")
                    if nul >= 0:
                        name = name[:nul]
                if not name or b"/" in name or b"\0" in name:
                    raise ImageFormatError(f"directory nid {ino.nid}: invalid entry name {name!r}")
                out.append((name, nid, ftype))
        return out


# the whiteout markers composefs writes; C's loader hides them on every inode
_HIDDEN = frozenset((b"trusted.overlay.whiteouts", b"user.overlay.whiteout", b"user.overlay.whiteouts"))


def _interpret_xattrs(raw: tuple[tuple[bytes, bytes], ...], hide_markers: bool = True,
                      ) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Split stored xattrs into (user-visible, composefs-internal trusted.overlay.*).
    ``hide_markers``: drop the whiteout markers as C's loader does (composefs-info); the
    overlay mount itself shows them."""
    user: dict[bytes, bytes] = {}
    internal: dict[bytes, bytes] = {}
    for k, v in raw:
        if k.startswith(_OVERLAY):
            if not k.startswith(_OVERLAY_ESC):
                internal[k] = v
                continue
            k = _OVERLAY + k[len(_OVERLAY_ESC):]
        if not (hide_markers and k in _HIDDEN):
            user[k] = v
    return user, internal


def read_image(data: bytes) -> LoadedImage:
    """Parse a composefs image into a tree (C composefs-info semantics)."""
    r = _Reader(data)
    tree = _TreeBuilder(r, LoadedImage(FileSystem(), r.header, r.sb))
    _walk(r, tree)
    return tree.loaded


def check_image(data: bytes) -> frozenset[bytes]:
    """Check an image as `read_image` does, with the same walk, making no tree (a FUSE server
    checks before it serves, then reads by nid): the names of the xattrs its inodes show
    (`read_image`'s `Stat.xattrs`)."""
    r = _Reader(data)
    check = _Checker()
    _walk(r, check)
    return frozenset(check.xattr_names)


def leaf_contents(data: bytes) -> list[LeafContent]:
    """The content of each file inode the tree reaches (once each), checked as `read_image`
    checks it, without making the tree: what gc and fsck need of an image (its objects)."""
    r = _Reader(data)
    visit = _Contents()
    _walk(r, visit)
    return visit.contents


class _Visitor(Protocol):
    """What `_walk` tells of the tree, each once it is checked."""

    def directory(self, raw: RawInode, xattrs: dict[bytes, bytes]) -> None:
        """A directory inode, met for the first time (the root first), with the xattrs it shows."""

    def leaf(self, raw: RawInode, xattrs: dict[bytes, bytes], content: LeafContent, masked: _Masked) -> None:
        """Any other inode the tree shows (whiteout stubs are not), met for the first time, as
        `_decode_leaf` decoded it."""

    def entry(self, parent: int, name: bytes, nid: int) -> None:
        """Directory nid `parent` names `nid` (inode told already) `name`."""


# 1 + an inode's dirent file type, by its mode's S_IFMT (`_walk`'s bytearray: 0 is unread)
_FTYPES = {fmt: 1 + ft for fmt, ft in F.FILE_TYPES.items()}
_UNKNOWN, _DIR, _CHR = 1 + F.FT_UNKNOWN, 1 + F.FT_DIR, 1 + F.FT_CHRDEV
_S_IFMT = 0o170000


def _walk(r: _Reader, visit: _Visitor) -> None:
    """Walk the tree from the root once, checking every dirent, inode, xattr and leaf's
    content, and tell the visitor what it met."""
    sb = r.sb
    root_raw = r.inode(sb.root_nid)
    if not _stat.S_ISDIR(root_raw.mode):
        raise ImageFormatError(f"root inode nid {sb.root_nid} is not a directory")
    # Each inode's data (dirents, inline content, symlink target) is its own, so all of it
    # fits in the image once: inodes pointing at one area (a 430 KB image of 1500 directories
    # sharing 20,000 dirents made 30 million entries) are refused when the sum passes it.
    data_left = len(r.data) - _data_size(root_raw)
    # 1 + the file type of every inode read (whiteout stubs too), by nid: one byte per 32
    # bytes of image, where a dict would take some 100 bytes per inode
    ftypes = bytearray(len(r.data) // 32)
    ftypes[sb.root_nid] = _DIR
    stubs: set[int] = set()  # whiteout stubs' nids (C: any native chr 0:0 is skipped)
    namers: dict[int, set[int]] = {sb.root_nid: {sb.root_nid}}  # directory nid -> the dirs naming it
    dots: set[int] = set()  # directory nids with a `.` entry
    dotdot: dict[int, int] = {}  # directory nid -> the nid its `..` names
    inode, directory, leaf, entry = r.inode, visit.directory, visit.leaf, visit.entry  # (looked up once)
    directory(root_raw, _interpret_xattrs(root_raw.xattrs)[0])
    shared = False  # a directory with two names (C mkcomposefs writes one for a hardlinked directory)
    stack = [root_raw]
    while stack:
        draw = stack.pop()
        dnid = draw.nid
        prev = b""
        for name, nid, ftype in r.dirents(draw):
            # the kernel finds a name by binary search: one out of order it would not find
            if name <= prev:
                what = "duplicate entry" if name == prev else "entry out of order"
                raise ImageFormatError(f"directory nid {dnid}: {what} {name!r}")
            prev = name
            if name in (b".", b".."):
                if ftype != F.FT_DIR or (name == b"." and nid != dnid):
                    raise ImageFormatError(f"directory nid {dnid}: {name.decode()} names nid {nid} (type {ftype})")
                if name == b".":
                    dots.add(dnid)
                else:
                    dotdot[dnid] = nid
                continue
            if nid >= len(ftypes):
                raise ImageFormatError(f"directory nid {dnid}: entry {name!r} names nid {nid}, beyond the image")
            known = ftypes[nid]
            if not known:
                craw = inode(nid)
                known = ftypes[nid] = _FTYPES.get(craw.mode & _S_IFMT, _UNKNOWN)
                data_left -= _data_size(craw)
                if data_left < 0:
                    raise ImageFormatError(f"inode nid {nid}: its data overlaps another inode's (the inodes' "
                                           f"data add up to more than the image's {len(r.data)} bytes)")
                if known == _DIR:
                    directory(craw, _interpret_xattrs(craw.xattrs)[0])
                    stack.append(craw)
                elif known == _CHR and r.epoch1 and craw.i_u == 0:
                    stubs.add(nid)
                else:
                    leaf(craw, *_decode_leaf(r, craw))
            elif known == _DIR:
                shared = True
            if ftype + 1 != known:
                raise ImageFormatError(f"directory nid {dnid}: entry {name!r} has file type {ftype}, "
                                       f"its inode nid {nid} type {known - 1}")
            if known == _DIR:
                namers.setdefault(nid, set()).add(dnid)
            elif known == _CHR and nid in stubs:
                continue
            entry(dnid, name, nid)
    for nid, parents in namers.items():
        # fsck.erofs checks these; C's second name of a directory has the same `..`
        if nid not in dots or nid not in dotdot:
            raise ImageFormatError(f"directory nid {nid}: no {'..' if nid in dots else '.'} entry")
        if dotdot[nid] not in parents:
            raise ImageFormatError(f"directory nid {nid}: .. names nid {dotdot[nid]}, which has no entry for it")
    if shared:
        _refuse_loops(r, sb.root_nid)


_WITH_DATA = (_stat.S_IFDIR, _stat.S_IFREG, _stat.S_IFLNK)


def _data_size(raw: RawInode) -> int:
    """The bytes of the image an inode's data takes (chunk indexes, devices: none counted)."""
    if (raw.format >> 1) & 0x7 == F.DATALAYOUT_CHUNK_BASED or _stat.S_IFMT(raw.mode) not in _WITH_DATA:
        return 0
    return raw.size


def _refuse_loops(r: _Reader, root: int) -> None:
    """Refuse a directory that contains itself (a walk of the tree would never end; a
    directory with two names is C's quirk and fine): depth-first over directory nids,
    iterative, each directory once, a directory met again while it is being walked being
    the loop."""
    walking: set[int] = {root}
    done: set[int] = set()
    stack = [iter(_subdirs(r, root))]
    path = [root]
    while stack:
        for name, child in stack[-1]:
            if child in done:
                continue
            if child in walking:
                raise ImageFormatError(f"directory entry {name!r} names a directory it is in (a directory loop)")
            walking.add(child)
            path.append(child)
            stack.append(iter(_subdirs(r, child)))
            break
        else:
            stack.pop()
            finished = path.pop()
            walking.discard(finished)
            done.add(finished)


def _subdirs(r: _Reader, nid: int) -> list[tuple[bytes, int]]:
    """(name, nid) of the directories a directory the walk checked names, in image order."""
    return [(name, child) for name, child, ftype in r.dirents(r.inode(nid))
            if ftype == F.FT_DIR and name not in (b".", b"..")]


def _stat_of(raw: RawInode, xattrs: dict[bytes, bytes]) -> Stat:
    return Stat(raw.mode & 0o7777, raw.uid, raw.gid, raw.mtime, raw.mtime_nsec, xattrs)


class _TreeBuilder:
    """`read_image`'s visitor: the Leaf/Directory tree."""

    def __init__(self, r: _Reader, loaded: LoadedImage) -> None:
        self.root_nid = r.sb.root_nid
        self.loaded = loaded
        self.dirs: dict[int, Directory] = {}
        self.nodes: dict[int, Inode] = {}

    def directory(self, raw: RawInode, xattrs: dict[bytes, bytes]) -> None:
        d = Directory(_stat_of(raw, xattrs))
        if raw.nid == self.root_nid:
            self.loaded.fs.root = d
        self.loaded.dir_sizes[id(d)] = raw.size
        self.dirs[raw.nid] = self.nodes[raw.nid] = d

    def leaf(self, raw: RawInode, xattrs: dict[bytes, bytes], content: LeafContent, masked: _Masked) -> None:
        leaf = self.nodes[raw.nid] = Leaf(_stat_of(raw, xattrs), content, raw.nlink)
        if masked is not None:
            self.loaded.masked[id(leaf)] = masked

    def entry(self, parent: int, name: bytes, nid: int) -> None:
        self.dirs[parent].entries[name] = self.nodes[nid]


class _Contents:
    """`leaf_contents`'s visitor."""

    def __init__(self) -> None:
        self.contents: list[LeafContent] = []

    def directory(self, raw: RawInode, xattrs: dict[bytes, bytes]) -> None:
        pass

    def leaf(self, raw: RawInode, xattrs: dict[bytes, bytes], content: LeafContent, masked: _Masked) -> None:
        self.contents.append(content)

    def entry(self, parent: int, name: bytes, nid: int) -> None:
        pass


class _Checker:
    """`check_image`'s visitor: the names of the xattrs shown, nothing else kept."""

    def __init__(self) -> None:
        self.xattr_names: set[bytes] = set()

    def directory(self, raw: RawInode, xattrs: dict[bytes, bytes]) -> None:
        self.xattr_names.update(xattrs)

    def leaf(self, raw: RawInode, xattrs: dict[bytes, bytes], content: LeafContent, masked: _Masked) -> None:
        self.xattr_names.update(xattrs)

    def entry(self, parent: int, name: bytes, nid: int) -> None:
        pass


def _chunked_content(raw: RawInode, internal: dict[bytes, bytes]) -> LeafContent:
    if raw.i_u & ~(F.CHUNK_FORMAT_BLKBITS_MASK | 0xFFFF0000):
        raise ImageFormatError(f"inode nid {raw.nid}: unsupported chunk format 0x{raw.i_u:x}")
    if raw.size == 0:
        return Inline(b"")
    digest = None
    mc = internal.get(b"trusted.overlay.metacopy")
    if mc:
        try:
            digest = F.OverlayMetacopy.unpack(mc).digest
        except F.FormatError as e:
            raise ImageFormatError(f"inode nid {raw.nid}: {e}") from None
    redirect = internal.get(b"trusted.overlay.redirect")
    payload = redirect[1:] if redirect and redirect.startswith(b"/") else redirect
    if digest:
        if payload is None:
            payload = b""
        return External(digest, raw.size, None if payload == object_path(digest) else payload)
    if payload:
        return ExternalNoVerity(payload, raw.size)
    return Sparse(raw.size)


def _decode_leaf(r: _Reader, raw: RawInode) -> tuple[dict[bytes, bytes], LeafContent, _Masked]:
    """A non-directory inode, checked: its user-visible xattrs, its content and, for a
    regular file a user `trusted.overlay.whiteout` makes a whiteout (that xattr then not
    shown), the external content it masks."""
    user, internal = _interpret_xattrs(raw.xattrs)
    fmt = _stat.S_IFMT(raw.mode)
    if fmt == _stat.S_IFREG:
        chunked = raw.datalayout == F.DATALAYOUT_CHUNK_BASED
        if b"trusted.overlay.whiteout" in user:
            del user[b"trusted.overlay.whiteout"]
            masked = _chunked_content(raw, internal) if chunked else None
            return user, CharDevice(0), masked if isinstance(masked, (External, ExternalNoVerity)) else None
        if chunked:
            return user, _chunked_content(raw, internal), None
        return user, Inline(r.data_of(raw)), None
    if fmt == _stat.S_IFLNK:
        target = r.data_of(raw)
        if not target:
            raise ImageFormatError(f"inode nid {raw.nid}: empty symlink")
        return user, Symlink(target), None
    if fmt == _stat.S_IFCHR:
        return user, CharDevice(raw.i_u), None
    if fmt == _stat.S_IFBLK:
        return user, BlockDevice(raw.i_u), None
    if fmt == _stat.S_IFIFO:
        return user, Fifo(), None
    if fmt == _stat.S_IFSOCK:
        return user, Socket(), None
    raise ImageFormatError(f"inode nid {raw.nid}: invalid mode 0o{raw.mode:o}")


# The raw layer, for serving the stored inodes the way the kernel's overlay mount shows them
# (pycfs.host.fuse): inodes, dirents and data by nid, and overlayfs's view of xattrs
# (user-visible, overlay-internal).
ImageReader = _Reader


def overlay_xattrs(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    return _interpret_xattrs(raw, hide_markers=False)
