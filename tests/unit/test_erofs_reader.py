"""EROFS reader: `composefs-info dump/ls/objects` byte-exact against C, round trips, and strict
rejection of malformed images."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from pycfs.host import dumpfile
from pycfs.host.erofs import format as F
from pycfs.host.erofs.info import format_ls, image_objects
from pycfs.host.erofs.reader import ImageFormatError, _Reader, read_image
from pycfs.host.erofs.writer import choose_version, write_image
from pycfs.host.tree import External, ExternalNoVerity, Sparse
from vectors import C_VECTORS, c_manifest

VECTORS = C_VECTORS
MANIFEST = c_manifest()
ALL_NAMES = [c["name"] for c in MANIFEST["dumpfile_cases"] + MANIFEST["directory_cases"]]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_info_dump_and_ls_byte_exact(name):
    loaded = read_image((VECTORS / f"{name}.cfs").read_bytes())
    assert dumpfile.write(loaded.fs, dir_sizes=loaded.dir_sizes) == (VECTORS / f"{name}.info-dump").read_bytes()
    assert format_ls(loaded.fs) == (VECTORS / f"{name}.info-ls").read_bytes()


@pytest.mark.parametrize("name", ["mixed_rootfs", "files_external", "dir_synth", "hardlinks"])
def test_objects_match_c(name):
    info = (VECTORS / f"{name}.info").read_bytes()
    section = info.split(b"### composefs-info objects")[1].split(b"\n", 1)[1].split(b"###")[0]
    fs = read_image((VECTORS / f"{name}.cfs").read_bytes()).fs
    assert b"".join(p + b"\n" for p in image_objects(fs)) == section


@pytest.mark.parametrize("case", MANIFEST["dumpfile_cases"], ids=lambda c: c["name"])
def test_dump_image_dump_roundtrip(case):
    """dumpfile -> image -> tree -> dumpfile -> image: same image (except C's known non-round-trips)."""
    image = (VECTORS / f"{case['name']}.cfs").read_bytes()
    text = dumpfile.write(read_image(image).fs)
    if case["name"] == "quirk_hardlink_to_dir":
        # like C, the dump of a hardlinked directory cannot be read back (re=NO in the vectors)
        with pytest.raises(dumpfile.DumpfileError, match="Directories can't be hardlinked"):
            dumpfile.parse(text)
        return
    fs = dumpfile.parse(text)
    again = write_image(fs, choose_version(fs, 0, 1))
    if case["variants"]["default"]["composefs_dump_roundtrip_identical"]:
        assert again == image
    else:
        # hardlinks (primary name changes) and xattrs_overlay (a user trusted.overlay.whiteout
        # reads back as a real whiteout, bumping the version): C differs too. One more pass
        # must then be a fixpoint.
        text2 = dumpfile.write(read_image(again).fs)
        fs2 = dumpfile.parse(text2)
        assert write_image(fs2, choose_version(fs2, 0, 1)) == again


def test_external_kinds_roundtrip():
    text = (
        "/ 0 40755 2 0 0 0 0.0 - - -\n"
        f"/a 100 100644 1 0 0 0 0.0 - - {'ab' * 32}\n"
        "/b 100 100644 1 0 0 0 0.0 x/y - -\n"
        "/c 100 100644 1 0 0 0 0.0 - - -\n"
        f"/d 100 100644 1 0 0 0 0.0 /abs - {'cd' * 32}\n"
    ).encode()
    fs = read_image(write_image(dumpfile.parse(text), 0)).fs
    e = fs.root.entries
    assert e[b"a"].content == External(b"\xab" * 32, 100, b"")
    assert e[b"b"].content == ExternalNoVerity(b"x/y", 100)
    assert e[b"c"].content == Sparse(100)
    assert e[b"d"].content == External(b"\xcd" * 32, 100, b"/abs")


# ---------------------------------------------------------------------------- malformed input


def test_rejects_non_images():
    with pytest.raises(ImageFormatError, match="too small"):
        read_image((VECTORS / "empty_root.dump").read_bytes())
    good = (VECTORS / "mixed_rootfs.cfs").read_bytes()
    with pytest.raises(ImageFormatError, match="composefs magic"):
        read_image(b"\0" * 4 + good[4:])
    bad_sb = bytearray(good)
    bad_sb[1024] ^= 0xFF
    with pytest.raises(ImageFormatError, match="EROFS magic"):
        read_image(bytes(bad_sb))
    bad_blk = bytearray(good)
    bad_blk[1024 + 12] = 9
    with pytest.raises(ImageFormatError, match="block size"):
        read_image(bytes(bad_blk))


def test_truncated_image():
    good = (VECTORS / "bigdir3000.cfs").read_bytes()
    with pytest.raises(ImageFormatError, match="truncated"):
        read_image(good[: len(good) - 4096])


def test_bad_root_nid():
    img = bytearray((VECTORS / "nested5.cfs").read_bytes())
    struct.pack_into("<H", img, 1024 + 14, 0xFFFF)
    with pytest.raises(ImageFormatError):
        read_image(bytes(img))


@pytest.mark.parametrize("target", ["root", "sibling"])
def test_a_directory_loop_is_refused_and_a_second_name_read(target):
    """A dirent naming the root: a directory loop, refused (a FUSE mount spun for ever on
    one); naming a directory that has a name already, not above it: C mkcomposefs writes
    such a hardlinked directory (the quirk vector), read as it is."""
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n"
                        b"/f 0 40755 2 0 0 0 0.0 - - -\n")
    img = bytearray(write_image(fs, 0))
    reader = _Reader(bytes(img))
    root = reader.inode(reader.sb.root_nid)
    named = {name: nid for name, nid, _ in reader.dirents(root)}
    nid = reader.sb.root_nid if target == "root" else named[b"f"]
    # /d's inline dirent block: 3 headers then the names ".", "..", "e"
    names = bytes(img).find(b"...e")
    assert names > 0
    struct.pack_into("<Q", img, names - 36 + 24, nid)
    if target == "root":
        with pytest.raises(ImageFormatError, match="directory entry b'e' names a directory it is in"):
            read_image(bytes(img))
    else:  # two names, no loop: C's quirk, read as it is
        back = read_image(bytes(img)).fs.root
        assert back.entries[b"d"].entries[b"e"] is back.entries[b"f"]


def test_a_loop_through_second_names_is_refused():
    """/d/e names /f and /f/g names /d: each directory reached from the root first, the loop
    only through second names."""
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n"
                        b"/f 0 40755 2 0 0 0 0.0 - - -\n/f/g 0 40755 2 0 0 0 0.0 - - -\n")
    img = bytearray(write_image(fs, 0))
    reader = _Reader(bytes(img))
    named = {name: nid for name, nid, _ in reader.dirents(reader.inode(reader.sb.root_nid))}
    for entry, target in ((b"...e", b"f"), (b"...g", b"d")):
        names = bytes(img).find(entry)
        assert names > 0
        struct.pack_into("<Q", img, names - 36 + 24, named[target])
    with pytest.raises(ImageFormatError, match="names a directory it is in"):
        read_image(bytes(img))


def test_random_corruption_never_crashes():
    images = [(VECTORS / f"{n}.cfs").read_bytes() for n in ("mixed_rootfs", "xattrs_shared", "symlinks_long", "hardlinks")]
    rng = random.Random(1234)
    for _ in range(400):
        img = bytearray(rng.choice(images))
        if rng.random() < 0.2:
            img = img[: rng.randrange(len(img))]
        else:
            for _ in range(rng.randint(1, 6)):
                limit = min(len(img), rng.choice([1152 + 64, 4096, 8192, len(img)]))
                img[rng.randrange(1024, limit)] = rng.randrange(256)
        try:
            read_image(bytes(img))
        except ImageFormatError:
            pass


def test_reader_output_is_deterministic_digest():
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n")
    img = write_image(fs, 0)
    assert hashlib.sha256(dumpfile.write(read_image(img).fs)).hexdigest() == hashlib.sha256(
        b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n").hexdigest()


# ---------------------------------------------------------------------------- crafted images

_B = F.BLOCK_SIZE


def _dirent_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
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


def _shared_data_image(n: int, kind: str) -> bytes:
    """A root of `n` inodes whose data is one area: directories sharing 300 dirents, or
    regular files sharing one block of content."""
    root_nid, leaf_nid, first = 36, 37, 38
    data_blk = ((first + n) * 32 + _B - 1) // _B
    ft = F.FT_DIR if kind == "dirs" else F.FT_REG_FILE
    root_data = _dirent_blocks([(b".", root_nid, F.FT_DIR), (b"..", root_nid, F.FT_DIR)]
                               + [(b"e%04d" % i, first + i, ft) for i in range(n)])
    shared_blk = data_blk + len(root_data) // _B
    if kind == "dirs":
        shared = _dirent_blocks([(b".", first, F.FT_DIR), (b"..", root_nid, F.FT_DIR)]
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


@pytest.mark.parametrize("kind", ["dirs", "files"])
def test_inodes_sharing_one_data_area_are_refused(kind):
    """The inodes' data may add up to the image's size at most: directories sharing one
    dirent area made a 430 KB image into 30 million entries (35 s, then MemoryError)."""
    img = _shared_data_image(1, kind)
    assert len(read_image(img).fs.root.entries) == 1  # one is well-formed
    img = _shared_data_image(40, kind)
    with pytest.raises(ImageFormatError, match=r"^inode nid \d+: its data overlaps another inode's"):
        read_image(img)


def _subdir_dirents(img: bytes) -> tuple[int, int]:
    """(offset of /d's inline dirent block, nid of /d) in an image of `_SUBDIR`."""
    reader = _Reader(img)
    named = {name: nid for name, nid, _ in reader.dirents(reader.inode(reader.sb.root_nid))}
    raw = reader.inode(named[b"d"])
    assert raw.datalayout == F.DATALAYOUT_FLAT_INLINE and raw.size < _B
    return raw.inline_offset, raw.nid


_SUBDIR = (b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/a 1 100644 1 0 0 0 0.0 - a -\n"
           b"/d/b 1 100644 1 0 0 0 0.0 - b -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n")


@pytest.mark.parametrize("damage, message", [
    ("order", r"entry out of order b'a'"),
    ("file_type", r"entry b'a' has file type 2, its inode nid \d+ type 1"),
    ("no_dot", r"no \. entry"),
    ("dotdot_elsewhere", r"\.\. names nid \d+, which has no entry for it"),
    ("dot_elsewhere", r"\. names nid \d+"),
])
def test_dirents_fsck_erofs_refuses_are_refused(damage, message):
    """Names out of order (the kernel's binary search would not find them), a file type
    that is not the inode's, `.` or `..` missing or naming another directory."""
    img = bytearray(write_image(dumpfile.parse(_SUBDIR), 0))
    read_image(bytes(img))
    off, _nid = _subdir_dirents(bytes(img))
    ents = [F.Dirent.unpack_from(img, off + 12 * i) for i in range(5)]  # . .. a b e
    assert bytes(img[off + ents[0].nameoff:off + ents[4].nameoff + 1]) == b"...abe"
    if damage == "order":  # the names a and b swapped: b, then a
        img[off + ents[2].nameoff], img[off + ents[3].nameoff] = ord("b"), ord("a")
    elif damage == "file_type":
        F.Dirent(ents[2].nid, ents[2].nameoff, F.FT_DIR).pack_into(img, off + 24)
    elif damage == "no_dot":  # "." renamed "+", which sorts before ".."
        img[off + ents[0].nameoff] = ord("+")
    elif damage == "dotdot_elsewhere":  # /d's `..` names /d/e
        F.Dirent(ents[4].nid, ents[1].nameoff, F.FT_DIR).pack_into(img, off + 12)
    else:
        F.Dirent(ents[4].nid, ents[0].nameoff, F.FT_DIR).pack_into(img, off)
    with pytest.raises(ImageFormatError, match=message):
        read_image(bytes(img))
