"""EROFS/composefs struct codecs: sizes, field placement, round trips, xxh32."""

from __future__ import annotations

import pytest

from pycfs.host.erofs import format as F


@pytest.mark.parametrize(
    "cls, size",
    [
        (F.ComposefsHeader, 32), (F.Superblock, 128), (F.CompactInode, 32), (F.ExtendedInode, 64),
        (F.Dirent, 12), (F.XattrIbodyHeader, 12), (F.XattrEntry, 4), (F.ChunkIndex, 8),
    ],
)
def test_sizes(cls, size):
    assert size == cls.SIZE


@pytest.mark.parametrize(
    "obj",
    [
        F.ComposefsHeader(flags=1, composefs_version=1),
        F.Superblock(root_nid=36, inos=300, build_time=(1 << 64) - 5, build_time_nsec=7,
                     blocks=9, xattr_blkaddr=2, uuid=bytes(range(16))),
        F.CompactInode(format=4, xattr_icount=6, mode=0o40755, nlink=3, size=4096, i_u=5, ino=1, uid=7, gid=8),
        F.ExtendedInode(format=9, xattr_icount=2, mode=0o100644, size=1 << 44, i_u=31, ino=12,
                        uid=1 << 31, gid=100000, mtime=1 << 40, mtime_nsec=999999999, nlink=70000),
        F.Dirent(nid=1 << 40, nameoff=36, file_type=F.FT_SYMLINK),
        F.XattrIbodyHeader(name_filter=0xFFFFEFFF, shared_count=3),
        F.XattrEntry(name_len=14, name_index=4, value_size=1),
        F.ChunkIndex(advise=0, device_id=1, blkaddr=77),
    ],
    ids=lambda o: type(o).__name__,
)
def test_roundtrip(obj):
    raw = obj.pack()
    assert len(raw) == obj.SIZE
    buf = bytearray(7) + raw
    back = type(obj).unpack_from(bytes(buf), 7)
    assert back == obj
    out = bytearray(obj.SIZE + 3)
    obj.pack_into(out, 3)
    assert bytes(out[3:]) == raw


def test_field_placement_matches_spec():
    h = F.ComposefsHeader(flags=1, composefs_version=1).pack()
    assert h[:4] == bytes.fromhex("9a6278d0") and h[4:8] == b"\1\0\0\0" and h[12] == 1
    sb = F.Superblock(root_nid=36, inos=1, blocks=4, xattr_blkaddr=2).pack()
    assert sb[:4] == bytes.fromhex("e2e1f5e0")
    assert sb[8] == 6 and sb[12] == 12 and sb[14:16] == b"\x24\x00"
    assert sb[36:40] == b"\4\0\0\0" and sb[44:48] == b"\2\0\0\0"
    ino = F.CompactInode(format=0, xattr_icount=6, mode=0o40755, nlink=2, size=4096, i_u=4, ino=0).pack()
    assert ino[:16] == bytes.fromhex("00000600ed4102000010000000000000") and ino[16:20] == b"\4\0\0\0"


def test_truncated_input_raises_format_error():
    with pytest.raises(F.FormatError, match="truncated"):
        F.ExtendedInode.unpack_from(bytes(63), 0)
    with pytest.raises(F.FormatError):
        F.Superblock.unpack_from(bytes(1100))


def test_inode_format_bits():
    assert F.make_inode_format(False, F.DATALAYOUT_FLAT_INLINE) == 4
    assert F.make_inode_format(True, F.DATALAYOUT_CHUNK_BASED) == 9
    assert F.inode_is_extended(9) and F.inode_datalayout(9) == F.DATALAYOUT_CHUNK_BASED


def test_xattr_entry_size():
    assert F.xattr_entry_size(14, 1) == 20
    assert F.xattr_entry_size(0, 0) == 4


def test_metacopy():
    m = F.OverlayMetacopy(digest=b"\x11" * 32)
    raw = m.pack()
    assert raw[:4] == b"\x00\x24\x00\x01" and len(raw) == 36
    assert F.OverlayMetacopy.unpack(raw).digest == b"\x11" * 32
    with pytest.raises(F.FormatError):
        F.OverlayMetacopy.unpack(raw[:-1])


@pytest.mark.parametrize(
    "data, seed, expected",
    [
        (b"", 0, 0x02CC5D05),
        (b"abc", 0, 0x32D153FF),
        (b"Nobody inspects the spammish repetition", 0, 0xE2293B2F),
    ],
)
def test_xxh32(data, seed, expected):
    assert F.xxh32(data, seed) == expected


def test_name_filter_matches_image():
    # "trusted.overlay.opaque" alone gives the stored filter bytes ff ff ef ff (files_inline root)
    bit = F.xattr_name_filter_bit(F.XATTR_INDEX_TRUSTED, b"overlay.opaque")
    assert ((~(1 << bit)) & 0xFFFFFFFF).to_bytes(4, "little") == bytes.fromhex("ffffefff")
