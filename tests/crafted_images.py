"""Crafted composefs images, each damaged so that one of the EROFS reader's checks refuses
it: `read_image`, `check_image` and a FUSE mount's start-up must all refuse every one
(`REFUSED`: id -> (image maker, the message's pattern))."""

from __future__ import annotations

import struct
from collections.abc import Callable

from pycfs.host import dumpfile
from pycfs.host.erofs import format as F
from pycfs.host.erofs.reader import RawInode, _Reader
from pycfs.host.erofs.writer import write_image
from vectors import C_VECTORS

_B = F.BLOCK_SIZE
DIGEST = "ab" * 32


def dirent_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Full dirent blocks of (name, nid, file type), as many as they need."""
    blocks: list[list[tuple[bytes, int, int]]] = [[]]
    used = 0
    for e in entries:
        if used + 12 + len(e[0]) > _B:
            blocks.append([])
            used = 0
        blocks[-1].append(e)
        used += 12 + len(e[0])
    out = bytearray()
    for blk in blocks:
        b = bytearray(_B)
        nameoff = 12 * len(blk)
        for i, (name, nid, ft) in enumerate(blk):
            F.Dirent(nid, nameoff, ft).pack_into(b, 12 * i)
            b[nameoff:nameoff + len(name)] = name
            nameoff += len(name)
        out += b
    return bytes(out)


def shared_data_image(n: int, kind: str) -> bytes:
    """A root of `n` inodes whose data is one area: directories sharing 300 dirents, or
    regular files sharing one block of content."""
    root_nid, leaf_nid, first = 36, 37, 38
    data_blk = ((first + n) * 32 + _B - 1) // _B
    ft = F.FT_DIR if kind == "dirs" else F.FT_REG_FILE
    root_data = dirent_blocks([(b".", root_nid, F.FT_DIR), (b"..", root_nid, F.FT_DIR)]
                              + [(b"e%04d" % i, first + i, ft) for i in range(n)])
    shared_blk = data_blk + len(root_data) // _B
    if kind == "dirs":
        shared = dirent_blocks([(b".", first, F.FT_DIR), (b"..", root_nid, F.FT_DIR)]
                               + [(b"f%04d" % i, leaf_nid, F.FT_REG_FILE) for i in range(300)])
    else:
        shared = b"x" * _B
    img = bytearray(shared_blk * _B + len(shared))
    F.ComposefsHeader(composefs_version=1).pack_into(img, 0)
    F.Superblock(root_nid=root_nid, inos=n + 2, blocks=len(img) // _B).pack_into(img, 1024)
    F.CompactInode(format=0, mode=0o40755, nlink=2, size=len(root_data), i_u=data_blk, ino=1).pack_into(img, root_nid * 32)
    inline = F.make_inode_format(False, F.DATALAYOUT_FLAT_INLINE)
    F.CompactInode(format=inline, mode=0o100644, nlink=1, size=0, ino=2).pack_into(img, leaf_nid * 32)
    for i in range(n):
        F.CompactInode(format=0, mode=0o40755 if kind == "dirs" else 0o100644, nlink=2, size=len(shared),
                       i_u=shared_blk, ino=3 + i).pack_into(img, (first + i) * 32)
    img[data_blk * _B:data_blk * _B + len(root_data)] = root_data
    img[shared_blk * _B:] = shared
    return bytes(img)


def raw_inode(img: bytes | bytearray, path: bytes) -> RawInode:
    """The stored inode at `path` (b"/" the root), found through the dirents."""
    reader = _Reader(bytes(img))
    raw = reader.inode(reader.sb.root_nid)
    for name in path.strip(b"/").split(b"/") if path != b"/" else []:
        raw = reader.inode({n: nid for n, nid, _ in reader.dirents(raw)}[name])
    return raw


# /d holds a, b and e: its inline dirent block is 3 + 3 headers then the names "...abe"
SUBDIR = (b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/a 1 100644 1 0 0 0 0.0 - a -\n"
          b"/d/b 1 100644 1 0 0 0 0.0 - b -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n")


def subdir_damaged(damage: str) -> bytes:
    """`SUBDIR` with /d's dirents damaged as fsck.erofs would refuse."""
    img = bytearray(write_image(dumpfile.parse(SUBDIR), 0))
    raw = raw_inode(img, b"/d")
    assert raw.datalayout == F.DATALAYOUT_FLAT_INLINE and raw.size < _B
    off = raw.inline_offset
    ents = [F.Dirent.unpack_from(img, off + 12 * i) for i in range(5)]  # . .. a b e
    assert bytes(img[off + ents[0].nameoff:off + ents[4].nameoff + 1]) == b"...abe"
    if damage == "order":  # the names a and b swapped: b, then a
        img[off + ents[2].nameoff], img[off + ents[3].nameoff] = ord("b"), ord("a")
    elif damage == "duplicate":  # a, a
        img[off + ents[3].nameoff] = ord("a")
    elif damage == "file_type":
        F.Dirent(ents[2].nid, ents[2].nameoff, F.FT_DIR).pack_into(img, off + 24)
    elif damage == "no_dot":  # "." renamed "+", which sorts before ".."
        img[off + ents[0].nameoff] = ord("+")
    elif damage == "dotdot_elsewhere":  # /d's `..` names /d/e
        F.Dirent(ents[4].nid, ents[1].nameoff, F.FT_DIR).pack_into(img, off + 12)
    elif damage == "dot_elsewhere":
        F.Dirent(ents[4].nid, ents[0].nameoff, F.FT_DIR).pack_into(img, off)
    elif damage == "dotdot_type":
        F.Dirent(ents[1].nid, ents[1].nameoff, F.FT_REG_FILE).pack_into(img, off + 12)
    elif damage == "beyond":  # a names a nid past the image's end
        F.Dirent(1 << 40, ents[2].nameoff, F.FT_REG_FILE).pack_into(img, off + 24)
    elif damage == "slash":
        img[off + ents[2].nameoff] = ord("/")
    elif damage == "first_nameoff":
        F.Dirent(ents[0].nid, 13, F.FT_DIR).pack_into(img, off)
    elif damage == "nameoff":  # b's name starts past the block
        F.Dirent(ents[3].nid, _B + 1, F.FT_REG_FILE).pack_into(img, off + 36)
    else:
        raise AssertionError(damage)
    return bytes(img)


def second_name_of(target: bytes) -> bytes:
    """/d/e made to name the directory at `target`: b"/" is a directory loop (the root then
    contains itself), b"/f" a second name of /f, no loop (C mkcomposefs writes such a
    hardlinked directory)."""
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n"
                        b"/f 0 40755 2 0 0 0 0.0 - - -\n")
    return _rename_dirent_targets(bytearray(write_image(fs, 0)), [(b"...e", target)])


def loop_through_second_names() -> bytes:
    """/d/e names /f and /f/g names /d: each directory reached from the root first, the loop
    only through second names."""
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n"
                        b"/f 0 40755 2 0 0 0 0.0 - - -\n/f/g 0 40755 2 0 0 0 0.0 - - -\n")
    return _rename_dirent_targets(bytearray(write_image(fs, 0)), [(b"...e", b"/f"), (b"...g", b"/d")])


def _rename_dirent_targets(img: bytearray, renames: list[tuple[bytes, bytes]]) -> bytes:
    nids = {target: raw_inode(img, target).nid for _, target in renames}
    for names, target in renames:
        at = bytes(img).find(names)
        assert at > 0
        struct.pack_into("<Q", img, at - 36 + 24, nids[target])  # the third dirent's nid
    return bytes(img)


_FILES = (b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 1 100644 1 0 0 0 0.0 - a - user.k=v\n"
          + f"/e 100 100644 1 0 0 0 0.0 - - {DIGEST}\n".encode() + b"/l 1 120777 1 0 0 0 0.0 t - -\n")


def inode_damaged(damage: str) -> bytes:
    """An image of /f (inline, user.k=v), /e (external, metacopy) and /l (symlink) with one
    inode field or xattr damaged."""
    img = bytearray(write_image(dumpfile.parse(_FILES), 1))

    def at(path: bytes) -> tuple[int, RawInode]:
        raw = raw_inode(img, path)
        return raw.nid * 32, raw

    if damage == "invalid_mode":  # no file type bits
        off, raw = at(b"/f")
        struct.pack_into("<H", img, off + 4, 0o644)
    elif damage == "root_not_dir":
        off, raw = at(b"/")
        struct.pack_into("<H", img, off + 4, 0o100644)
    elif damage == "empty_symlink":
        off, raw = at(b"/l")
        _set_size(img, off, raw, 0)
    elif damage == "size":
        off, raw = at(b"/f")
        _set_size(img, off, raw, 1 << 31)
    elif damage == "crosses_block":  # the inline tail made to run into the next block
        off, raw = at(b"/f")
        _set_size(img, off, raw, _B - 1 - raw.inline_offset % _B + 2)
    elif damage == "i_format":
        off, raw = at(b"/f")
        struct.pack_into("<H", img, off, raw.format | 0x10)
    elif damage == "layout":  # a compressed layout
        off, raw = at(b"/f")
        struct.pack_into("<H", img, off, (raw.format & 1) | (1 << 1))
    elif damage == "chunk_format":
        off, raw = at(b"/e")
        assert raw.datalayout == F.DATALAYOUT_CHUNK_BASED
        struct.pack_into("<I", img, off + 16, raw.i_u | F.CHUNK_FORMAT_INDEXES)
    elif damage == "metacopy":  # its length field one short of the value
        value = F.OverlayMetacopy(digest=bytes.fromhex(DIGEST)).pack()
        where = bytes(img).find(value)
        assert where > 0
        img[where + 1] -= 1
    elif damage in ("xattr_index", "xattr_size"):
        where = bytes(img).find(F.XattrEntry(1, F.XATTR_INDEX_USER, 1).pack() + b"kv")
        assert where > 0
        if damage == "xattr_index":
            img[where + 1] = 9
        else:
            struct.pack_into("<H", img, where + 2, 200)
    elif damage == "shared_count":
        off, raw = at(b"/f")
        img[off + (64 if raw.format & 1 else 32) + 4] = 50  # the xattr ibody header's count
    else:
        raise AssertionError(damage)
    return bytes(img)


def _set_size(img: bytearray, off: int, raw: RawInode, size: int) -> None:
    if raw.format & 1:
        struct.pack_into("<Q", img, off + 8, size)
    else:
        struct.pack_into("<I", img, off + 8, size)


def header_damaged(damage: str) -> bytes:
    good = bytearray((C_VECTORS / "mixed_rootfs.cfs").read_bytes())
    if damage == "too_small":
        return bytes(good[:1100])
    if damage == "composefs_magic":
        good[0:4] = bytes(4)
    elif damage == "composefs_version":
        struct.pack_into("<I", good, 12, 7)
    elif damage == "erofs_magic":
        good[1024] ^= 0xFF
    elif damage == "block_size":
        good[1024 + 12] = 9
    elif damage == "incompat":
        struct.pack_into("<I", good, 1024 + 80, 0x8)
    elif damage == "root_nid":  # past the image's end
        struct.pack_into("<H", good, 1024 + 14, 0xFFFF)
    elif damage == "truncated":
        return bytes((C_VECTORS / "bigdir3000.cfs").read_bytes()[:-_B])
    else:
        raise AssertionError(damage)
    return bytes(good)


def _cases() -> dict[str, tuple[Callable[[], bytes], str]]:
    cases: dict[str, tuple[Callable[[], bytes], str]] = {}
    for damage, message in [
        ("order", r"entry out of order b'a'"),
        ("duplicate", r"duplicate entry b'a'"),
        ("file_type", r"entry b'a' has file type 2, its inode nid \d+ type 1"),
        ("no_dot", r"no \. entry"),
        ("dotdot_elsewhere", r"\.\. names nid \d+, which has no entry for it"),
        ("dot_elsewhere", r"\. names nid \d+"),
        ("dotdot_type", r"\.\. names nid \d+ \(type 1\)"),
        ("beyond", r"entry b'a' names nid 1099511627776, beyond the image"),
        ("slash", r"invalid entry name b'/'"),
        ("first_nameoff", r"bad first nameoff 13"),
        ("nameoff", r"bad nameoff \d+"),
    ]:
        cases[f"dirents-{damage}"] = (lambda d=damage: subdir_damaged(d)), message
    for damage, message in [
        ("invalid_mode", r"inode nid \d+: invalid mode 0o644"),
        ("root_not_dir", r"root inode nid \d+ is not a directory"),
        ("empty_symlink", r"inode nid \d+: empty symlink"),
        ("size", r"inode nid \d+: size 2147483648 larger than the image"),
        ("crosses_block", r"inode nid \d+: inline data crosses a block boundary"),
        ("i_format", r"inode nid \d+: unsupported i_format 0x1[0-9a-f]"),
        ("layout", r"inode nid \d+: unsupported data layout 1 \(compressed\?\)"),
        ("chunk_format", r"inode nid \d+: unsupported chunk format 0x2[0-9a-f]"),
        ("metacopy", r"inode nid \d+: overlay metacopy length field 35 != value size 36"),
        ("xattr_index", r"inode nid \d+: unknown xattr name index 9"),
        ("xattr_size", r"inode nid \d+: xattr entry at \d+ runs past its block"),
        ("shared_count", r"inode nid \d+: 50 shared xattrs do not fit its xattr block"),
    ]:
        cases[f"inode-{damage}"] = (lambda d=damage: inode_damaged(d)), message
    for damage, message in [
        ("too_small", r"image too small \(1100 bytes\)"),
        ("composefs_magic", r"bad composefs magic"),
        ("composefs_version", r"unsupported composefs_version 7"),
        ("erofs_magic", r"bad EROFS magic"),
        ("block_size", r"unsupported block size 2\^9"),
        ("incompat", r"unsupported feature_incompat 0x8"),
        ("root_nid", r"truncated image: inode nid 65535 at offset 2097120"),
        ("truncated", r"truncated image: data of inode nid \d+"),
    ]:
        cases[f"header-{damage}"] = (lambda d=damage: header_damaged(d)), message
    for kind in ("dirs", "files"):
        cases[f"shared-data-{kind}"] = ((lambda k=kind: shared_data_image(40, k)),
                                        r"^inode nid \d+: its data overlaps another inode's")
    cases["loop"] = (lambda: second_name_of(b"/")), r"directory entry b'e' names a directory it is in"
    cases["loop-second-names"] = loop_through_second_names, r"directory entry b'g' names a directory it is in"
    return cases


REFUSED = _cases()
