"""EROFS reader: `composefs-info dump/ls/objects` byte-exact against C, round trips, and strict
rejection of malformed images."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from pycfs.host import dumpfile
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
