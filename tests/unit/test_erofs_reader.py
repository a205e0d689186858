"""EROFS reader: `composefs-info dump/ls/objects` byte-exact against C, round trips, and strict
rejection of malformed images."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from pycfs.host import dumpfile
from pycfs.host.erofs.info import format_ls, image_objects
from pycfs.host.erofs.reader import ImageFormatError, check_image, read_image
from pycfs.host.erofs.writer import choose_version, write_image
from pycfs.host.tree import External, ExternalNoVerity, Sparse
from vectors import C_VECTORS, c_manifest

import crafted_images as crafted

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
    img = crafted.second_name_of(b"/" if target == "root" else b"/f")
    if target == "root":
        with pytest.raises(ImageFormatError, match="directory entry b'e' names a directory it is in"):
            read_image(img)
    else:  # two names, no loop: C's quirk, read as it is
        back = read_image(img).fs.root
        assert back.entries[b"d"].entries[b"e"] is back.entries[b"f"]
        assert check_image(img) == frozenset()


def test_a_loop_through_second_names_is_refused():
    """/d/e names /f and /f/g names /d: each directory reached from the root first, the loop
    only through second names."""
    with pytest.raises(ImageFormatError, match="names a directory it is in"):
        read_image(crafted.loop_through_second_names())


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
        assert_check_image_agrees(bytes(img))


def assert_check_image_agrees(image: bytes) -> None:
    """check_image refuses an image with read_image's message, or names the xattrs of the
    tree read_image makes."""
    try:
        fs = read_image(image).fs
    except ImageFormatError as e:
        with pytest.raises(ImageFormatError) as checked:
            check_image(image)
        assert str(checked.value) == str(e)
    else:
        assert check_image(image) == {key for _, node in fs.walk() for key in node.stat.xattrs}


def test_reader_output_is_deterministic_digest():
    fs = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n")
    img = write_image(fs, 0)
    assert hashlib.sha256(dumpfile.write(read_image(img).fs)).hexdigest() == hashlib.sha256(
        b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n").hexdigest()


# ---------------------------------------------------------------------------- crafted images


@pytest.mark.parametrize("kind", ["dirs", "files"])
def test_inodes_sharing_one_data_area_are_refused(kind):
    """The inodes' data may add up to the image's size at most: directories sharing one
    dirent area made a 430 KB image into 30 million entries (35 s, then MemoryError)."""
    img = crafted.shared_data_image(1, kind)
    assert len(read_image(img).fs.root.entries) == 1  # one is well-formed
    img = crafted.shared_data_image(40, kind)
    with pytest.raises(ImageFormatError, match=r"^inode nid \d+: its data overlaps another inode's"):
        read_image(img)


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
    read_image(write_image(dumpfile.parse(crafted.SUBDIR), 0))
    with pytest.raises(ImageFormatError, match=message):
        read_image(crafted.subdir_damaged(damage))


@pytest.mark.parametrize("case", sorted(crafted.REFUSED))
def test_check_image_refuses_what_read_image_refuses(case):
    """Every check of read_image is check_image's (the FUSE start-up's): the same message."""
    make, message = crafted.REFUSED[case]
    image = make()
    with pytest.raises(ImageFormatError, match=message) as read:
        read_image(image)
    with pytest.raises(ImageFormatError) as checked:
        check_image(image)
    assert str(checked.value) == str(read.value)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_check_image_names_the_xattrs_the_tree_shows(name):
    assert_check_image_agrees((VECTORS / f"{name}.cfs").read_bytes())
