"""On-disk structures of composefs EROFS images: small explicit struct codecs.

Every structure has a `pack_into(buf, offset)` / `unpack_from(buf, offset)` pair (and
`pack()` for convenience). Field names follow the EROFS kernel headers and the composefs
header (spec 5.2-5.9). All integers are little-endian.
"""

from __future__ import annotations

import functools
import stat as _stat
import struct
from dataclasses import dataclass

from pycfs.host.errors import PycfsError

BLOCK_SIZE = 4096
# composefs's limit on an image (the C library's and the kernel mount helper's): readers refuse larger.
MAX_IMAGE_SIZE = 1 << 30
BLOCK_BITS = 12
SUPERBLOCK_OFFSET = 1024
INODE_TABLE_OFFSET = 1152  # header + zeros + superblock, already 32-aligned

COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1  # the EROFS format version field of the composefs header
COMPOSEFS_FLAGS_HAS_ACL = 1 << 0

EROFS_SUPER_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4

# i_format bits
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
DATALAYOUT_FLAT_PLAIN = 0
DATALAYOUT_FLAT_INLINE = 2
DATALAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF

# dirent file types
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
# the file type of a directory entry, by its inode's mode & S_IFMT
FILE_TYPES = {
    _stat.S_IFREG: FT_REG_FILE, _stat.S_IFDIR: FT_DIR, _stat.S_IFCHR: FT_CHRDEV, _stat.S_IFBLK: FT_BLKDEV,
    _stat.S_IFIFO: FT_FIFO, _stat.S_IFSOCK: FT_SOCK, _stat.S_IFLNK: FT_SYMLINK,
}

# Bloom filter of xattr names (EROFS_XATTR_FILTER_*)
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32

# xattr name indexes; index 5 (lustre.) exists in EROFS but epoch-1 composefs does not use it
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_PREFIXES: dict[int, bytes] = {
    0: b"",
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}


class FormatError(PycfsError, ValueError):
    """A structure in an image is malformed or truncated."""


def _check_room(buf, offset: int, size: int, what: str) -> None:
    if offset < 0 or offset + size > len(buf):
        raise FormatError(f"truncated image: {what} at offset {offset} needs {size} bytes, image has {len(buf)}")


@dataclass
class ComposefsHeader:
    """32 bytes at offset 0."""

    magic: int = COMPOSEFS_MAGIC
    version: int = COMPOSEFS_HEADER_VERSION
    flags: int = 0
    composefs_version: int = 0

    FMT = struct.Struct("<IIII16x")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int = 0) -> None:
        self.FMT.pack_into(buf, offset, self.magic, self.version, self.flags, self.composefs_version)

    def pack(self) -> bytes:
        b = bytearray(self.SIZE)
        self.pack_into(b)
        return bytes(b)

    @classmethod
    def unpack_from(cls, buf, offset: int = 0) -> ComposefsHeader:
        _check_room(buf, offset, cls.SIZE, "composefs header")
        return cls(*cls.FMT.unpack_from(buf, offset))


@dataclass
class Superblock:
    """erofs_super_block, 128 bytes at offset 1024."""

    magic: int = EROFS_SUPER_MAGIC
    checksum: int = 0
    feature_compat: int = FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER
    blkszbits: int = BLOCK_BITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = 0
    available_compr_algs: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0

    FMT = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int = SUPERBLOCK_OFFSET) -> None:
        self.FMT.pack_into(
            buf, offset, self.magic, self.checksum, self.feature_compat, self.blkszbits,
            self.sb_extslots, self.root_nid, self.inos, self.build_time, self.build_time_nsec,
            self.blocks, self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name,
            self.feature_incompat, self.available_compr_algs, self.extra_devices,
            self.devt_slotoff, self.dirblkbits, self.xattr_prefix_count,
            self.xattr_prefix_start, self.packed_nid, self.xattr_filter_reserved,
        )

    def pack(self) -> bytes:
        b = bytearray(self.SIZE)
        self.pack_into(b, 0)
        return bytes(b)

    @classmethod
    def unpack_from(cls, buf, offset: int = SUPERBLOCK_OFFSET) -> Superblock:
        _check_room(buf, offset, cls.SIZE, "EROFS superblock")
        return cls(*cls.FMT.unpack_from(buf, offset))


@dataclass
class CompactInode:
    """erofs_inode_compact, 32 bytes (no mtime: readers use the superblock build_time)."""

    format: int = 0
    xattr_icount: int = 0
    mode: int = 0
    nlink: int = 0
    size: int = 0
    i_u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0

    FMT = struct.Struct("<HHHHI4xIIHH4x")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.format, self.xattr_icount, self.mode, self.nlink,
                           self.size, self.i_u, self.ino, self.uid, self.gid)

    def pack(self) -> bytes:
        b = bytearray(self.SIZE)
        self.pack_into(b, 0)
        return bytes(b)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> CompactInode:
        _check_room(buf, offset, cls.SIZE, "compact inode")
        return cls(*cls.FMT.unpack_from(buf, offset))


@dataclass
class ExtendedInode:
    """erofs_inode_extended, 64 bytes."""

    format: int = INODE_LAYOUT_EXTENDED
    xattr_icount: int = 0
    mode: int = 0
    size: int = 0
    i_u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    nlink: int = 0

    FMT = struct.Struct("<HHH2xQIIIIQII16x")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.format, self.xattr_icount, self.mode, self.size,
                           self.i_u, self.ino, self.uid, self.gid, self.mtime,
                           self.mtime_nsec, self.nlink)

    def pack(self) -> bytes:
        b = bytearray(self.SIZE)
        self.pack_into(b, 0)
        return bytes(b)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> ExtendedInode:
        _check_room(buf, offset, cls.SIZE, "extended inode")
        return cls(*cls.FMT.unpack_from(buf, offset))


def inode_is_extended(fmt: int) -> bool:
    return bool(fmt & 1)


def inode_datalayout(fmt: int) -> int:
    return (fmt >> 1) & 0x7


def make_inode_format(extended: bool, datalayout: int) -> int:
    return (INODE_LAYOUT_EXTENDED if extended else INODE_LAYOUT_COMPACT) | (datalayout << 1)


@dataclass
class Dirent:
    """erofs_dirent, 12 bytes; names follow all the headers of a directory block."""

    nid: int = 0
    nameoff: int = 0
    file_type: int = 0

    FMT = struct.Struct("<QHBx")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.nid, self.nameoff, self.file_type)

    def pack(self) -> bytes:
        return self.FMT.pack(self.nid, self.nameoff, self.file_type)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> Dirent:
        _check_room(buf, offset, cls.SIZE, "directory entry")
        return cls(*cls.FMT.unpack_from(buf, offset))


@dataclass
class XattrIbodyHeader:
    """erofs_xattr_ibody_header, 12 bytes, followed by shared_count u32 shared ids."""

    name_filter: int = 0
    shared_count: int = 0

    FMT = struct.Struct("<IB7x")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.name_filter, self.shared_count)

    def pack(self) -> bytes:
        return self.FMT.pack(self.name_filter, self.shared_count)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> XattrIbodyHeader:
        _check_room(buf, offset, cls.SIZE, "xattr header")
        return cls(*cls.FMT.unpack_from(buf, offset))


@dataclass
class XattrEntry:
    """erofs_xattr_entry, 4 bytes, then name suffix, value, zero padding to 4."""

    name_len: int = 0
    name_index: int = 0
    value_size: int = 0

    FMT = struct.Struct("<BBH")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.name_len, self.name_index, self.value_size)

    def pack(self) -> bytes:
        return self.FMT.pack(self.name_len, self.name_index, self.value_size)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> XattrEntry:
        _check_room(buf, offset, cls.SIZE, "xattr entry")
        return cls(*cls.FMT.unpack_from(buf, offset))


def xattr_entry_size(suffix_len: int, value_len: int) -> int:
    """Bytes taken by one xattr entry including its padding to 4."""
    return (XattrEntry.SIZE + suffix_len + value_len + 3) & ~3


@dataclass
class ChunkIndex:
    """erofs_inode_chunk_index (8 bytes); composefs writes the 4-byte block-map form instead."""

    advise: int = 0
    device_id: int = 0
    blkaddr: int = NULL_ADDR

    FMT = struct.Struct("<HHI")
    SIZE = FMT.size

    def pack_into(self, buf, offset: int) -> None:
        self.FMT.pack_into(buf, offset, self.advise, self.device_id, self.blkaddr)

    def pack(self) -> bytes:
        return self.FMT.pack(self.advise, self.device_id, self.blkaddr)

    @classmethod
    def unpack_from(cls, buf, offset: int) -> ChunkIndex:
        _check_room(buf, offset, cls.SIZE, "chunk index")
        return cls(*cls.FMT.unpack_from(buf, offset))


# The 4-byte block-map chunk entry used without CHUNK_FORMAT_INDEXES.
BLOCKMAP_ENTRY = struct.Struct("<I")
BLOCKMAP_ENTRY_SIZE = BLOCKMAP_ENTRY.size


@dataclass
class OverlayMetacopy:
    """Value of `trusted.overlay.metacopy` carrying an fs-verity digest (struct ovl_metacopy)."""

    version: int = 0
    length: int = 36
    flags: int = 0
    digest_algo: int = 1  # 1 = sha256, 2 = sha512
    digest: bytes = b""

    FMT = struct.Struct("<BBBB")

    def pack(self) -> bytes:
        return self.FMT.pack(self.version, 4 + len(self.digest), self.flags, self.digest_algo) + self.digest

    @classmethod
    def unpack(cls, value: bytes) -> OverlayMetacopy:
        if len(value) < 4:
            raise FormatError(f"overlay metacopy value of {len(value)} bytes is too short")
        version, length, flags, algo = cls.FMT.unpack_from(value, 0)
        if length != len(value):
            raise FormatError(f"overlay metacopy length field {length} != value size {len(value)}")
        return cls(version, length, flags, algo, bytes(value[4:]))


def xxh32(data: bytes, seed: int) -> int:
    """xxHash32 (used by the EROFS xattr name bloom filter; names are short)."""
    P1, P2, P3, P4, P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
    M = 0xFFFFFFFF
    n = len(data)
    i = 0
    if n >= 16:
        v1 = (seed + P1 + P2) & M
        v2 = (seed + P2) & M
        v3 = seed & M
        v4 = (seed - P1) & M
        lanes = struct.unpack_from(f"<{(n // 16) * 4}I", data, 0)
        for j in range(0, len(lanes), 4):
            v1 = (v1 + lanes[j] * P2) & M
            v1 = (((v1 << 13) | (v1 >> 19)) & M) * P1 & M
            v2 = (v2 + lanes[j + 1] * P2) & M
            v2 = (((v2 << 13) | (v2 >> 19)) & M) * P1 & M
            v3 = (v3 + lanes[j + 2] * P2) & M
            v3 = (((v3 << 13) | (v3 >> 19)) & M) * P1 & M
            v4 = (v4 + lanes[j + 3] * P2) & M
            v4 = (((v4 << 13) | (v4 >> 19)) & M) * P1 & M
        h = (((v1 << 1) | (v1 >> 31)) + ((v2 << 7) | (v2 >> 25))
             + ((v3 << 12) | (v3 >> 20)) + ((v4 << 18) | (v4 >> 14))) & M
        i = (n // 16) * 16
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h = (h + k * P3) & M
        h = (((h << 17) | (h >> 15)) & M) * P4 & M
        i += 4
    while i < n:
        h = (h + data[i] * P5) & M
        h = (((h << 11) | (h >> 21)) & M) * P1 & M
        i += 1
    h ^= h >> 15
    h = (h * P2) & M
    h ^= h >> 13
    h = (h * P3) & M
    h ^= h >> 16
    return h


@functools.lru_cache(maxsize=4096)
def xattr_name_filter_bit(name_index: int, suffix: bytes) -> int:
    # Cached: an image has a handful of distinct xattr names on thousands of inodes, and
    # xxh32 in Python costs about 5 µs a call.
    return xxh32(suffix, XATTR_FILTER_SEED + name_index) % XATTR_FILTER_BITS
