"""EROFS writer: byte-identical to C mkcomposefs 1.0.8 on every golden vector, plus the
composefs-rs pinned digests built through the tree API."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycfs.host import dumpfile
from pycfs.host.erofs.reader import read_image
from pycfs.host.erofs.writer import ImageError, choose_version, write_image
from pycfs.host.fsverity import digest_bytes
from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Socket,
    Sparse,
    Stat,
    Symlink,
)
from vectors import C_VECTORS, c_manifest

VECTORS = C_VECTORS
MANIFEST = c_manifest()

VARIANTS = {"default": (0, 1), "v0": (0, 0), "v1": (1, 1)}


def _reference_image(name: str, variant: str, sha: str) -> bytes | None:
    for fn in (f"{name}.{variant}.cfs", f"{name}.cfs"):
        p = VECTORS / fn
        if p.exists():
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                return data
    return None


def assert_same_image(got: bytes, sha: str, ref: bytes | None) -> None:
    if hashlib.sha256(got).hexdigest() == sha:
        return
    if ref is None:
        pytest.fail(f"image sha256 {hashlib.sha256(got).hexdigest()} != {sha} (no reference bytes stored)")
    n = min(len(got), len(ref))
    first = next((i for i in range(n) if got[i] != ref[i]), n)
    pytest.fail(f"image differs from C at offset {first} (0x{first:x}); sizes {len(got)} vs {len(ref)}")


CASES = [(c, v) for c in MANIFEST["dumpfile_cases"] for v in VARIANTS]


@pytest.mark.parametrize("case, variant", CASES, ids=[f"{c['name']}-{v}" for c, v in CASES])
def test_dumpfile_vector_byte_identical(case, variant):
    fs = dumpfile.parse((VECTORS / case["dump"]).read_bytes())
    exp = case["variants"][variant]
    version = choose_version(fs, *VARIANTS[variant])
    assert version == exp["composefs_version"]
    image = write_image(fs, version)
    assert_same_image(image, exp["sha256"], _reference_image(case["name"], variant, exp["sha256"]))
    assert digest_bytes(image).hex() == exp["fsverity"]


@pytest.mark.parametrize("case", MANIFEST["directory_cases"], ids=lambda c: c["name"])
def test_directory_vector_from_info_dump(case):
    # the `re=yes` column: the C info dump fed back to mkcomposefs reproduces the image
    fs = dumpfile.parse((VECTORS / f"{case['name']}.info-dump").read_bytes())
    image = write_image(fs, choose_version(fs, 0, 1))
    assert_same_image(image, case["sha256"], _reference_image(case["name"], "default", case["sha256"]))


def test_too_big_file():
    with pytest.raises(dumpfile.DumpfileError, match=r"line 2 \(/f\): cannot write file: File too large"):
        dumpfile.parse((VECTORS / "fail_too_big.dump").read_bytes())
    # a tree from elsewhere meets the writer's own check
    root = Directory(Stat(0o755), {b"f": Leaf(Stat(0o644), Sparse(1 << 60))})
    with pytest.raises(ImageError, match="cannot write file: File too large"):
        write_image(FileSystem(root), 0)


def _rs_tree(simple: bool) -> FileSystem:
    root = Directory(Stat(0o755))
    if simple:
        def leaf(c):
            return Leaf(Stat(0), c)
        root.entries.update({
            b"fifo": leaf(Fifo()), b"regular-inline": leaf(Inline(b"hihi")),
            b"regular-external": leaf(External(b"\x5a" * 32, 1234)),
            b"chrdev": leaf(CharDevice(123)), b"blkdev": leaf(BlockDevice(123)),
            b"socket": leaf(Socket()), b"symlink": leaf(Symlink(b"/target")),
        })
    return FileSystem(root)


@pytest.mark.parametrize(
    "simple, version, expected",
    [
        (False, 0, "8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682"),
        (False, 1, "14a26c957c84f6eb774b91205476adc13196c7c33b9dd97d08d43725ecb90b63"),
        (True, 0, "9f3f5620ee0c54708516467d0d58741e7963047c7106b245d94c298259d0fa01"),
        (True, 1, "ad6db6427568a1e4fdc772cbab7b6063f5eb4b33cb62982a740ba9213e5962b5"),
    ],
)
def test_composefs_rs_pinned_vectors(simple, version, expected):
    """spec 5.14: trees built through the tree API, not a dumpfile."""
    assert digest_bytes(write_image(_rs_tree(simple), version)).hex() == expected


def test_writer_does_not_mutate_the_tree():
    fs = _rs_tree(True)
    fs.root.entries[b"wh"] = Leaf(Stat(0o644, xattrs={b"trusted.overlay.x": b"1"}), CharDevice(0))
    before = dumpfile.write(fs)
    write_image(fs, 1)
    assert dumpfile.write(fs) == before
    assert set(fs.root.entries) == {b"fifo", b"regular-inline", b"regular-external", b"chrdev",
                                    b"blkdev", b"socket", b"symlink", b"wh"}


def test_refcount_nlink_for_shared_leaves():
    root = Directory(Stat(0o755))
    f = Leaf(Stat(0o644), Inline(b"x"))
    sub = Directory(Stat(0o755), {b"b": f})
    root.entries.update({b"a": f, b"sub": sub})
    image = write_image(FileSystem(root), 0)
    back = read_image(image).fs
    assert back.root.entries[b"a"] is back.root.entries[b"sub"].entries[b"b"]
    assert back.root.entries[b"a"].nlink == 2


@pytest.mark.parametrize(
    "lo, hi, has_whiteout, expected",
    [(0, 1, False, 0), (0, 1, True, 1), (0, 0, True, 0), (1, 1, False, 1), (1, 0, False, 1)],
)
def test_choose_version(lo, hi, has_whiteout, expected):
    fs = _rs_tree(False)
    if has_whiteout:
        fs.root.entries[b"w"] = Leaf(Stat(0), CharDevice(0))
    assert choose_version(fs, lo, hi) == expected


def test_invalid_versions():
    with pytest.raises(ImageError, match="Invalid argument"):
        choose_version(_rs_tree(False), 0, 2)
    with pytest.raises(ImageError, match="Invalid argument"):
        write_image(_rs_tree(False), 3)


def big_tree(n_files: int) -> FileSystem:
    """n_files spread over directories of 100, mixed inline/external/symlinks and xattrs."""
    root = Directory(Stat(0o755, 0, 0, 1700000000, 0))
    for d in range(n_files // 100):
        sub = Directory(Stat(0o755, 0, 0, 1700000000 + d, 0, {b"security.selinux": b"u:object_r:usr_t:s0\0"}))
        root.entries[b"dir%04d" % d] = sub
        for i in range(100):
            k = d * 100 + i
            st = Stat(0o644, 0, 0, 1700000000, k % 7, {b"security.selinux": b"u:object_r:usr_t:s0\0"})
            if k % 10 == 0:
                leaf = Leaf(st, Symlink(b"../dir%04d/file%05d" % (d, k + 1)))
            elif k % 3 == 0:
                leaf = Leaf(st, Inline(b"%d\n" % k))
            else:
                leaf = Leaf(st, External(hashlib.sha256(b"%d" % k).digest(), 1000 + k))
            sub.entries[b"file%05d" % k] = leaf
    return FileSystem(root)


def test_10000_files_fast_and_fsck_clean(tmp_path):
    fs = big_tree(10_000)
    t0 = time.perf_counter()
    image = write_image(fs, 1)
    elapsed = time.perf_counter() - t0
    print(f"10,000-file image: {len(image)} bytes in {elapsed:.2f}s")
    assert elapsed < 10
    back = read_image(image)
    assert dumpfile.write(back.fs) == dumpfile.write(fs, dir_sizes=back.dir_sizes)
    if shutil.which("fsck.erofs"):
        p = tmp_path / "big.cfs"
        p.write_bytes(image)
        r = subprocess.run(["fsck.erofs", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr + r.stdout


# ---------------------------------------------------------------------------- format 2


@pytest.mark.parametrize(
    "simple, expected",
    [
        (False, "086b702a519b57d6ef5aea6f8b3f2be24355cd1fb835cd80fb4e3d388b24d5a5"),
        (True, "a8fcd41f8b313bede69f462f2af0a38d64b99a6333f5df884ea9ab4037fac722"),
    ],
)
def test_v2_pinned_vectors(simple, expected):
    image = write_image(_rs_tree(simple), 2)
    assert digest_bytes(image).hex() == expected
    assert image[12] == 2 and len(image) % 4096 == 0


def test_v2_snapshot_layout():
    """spec 5.14: V2 'simple' inode positions and the external file's xattr block."""
    from pycfs.host.erofs import format as F

    image = write_image(_rs_tree(True), 2)
    sb = F.Superblock.unpack_from(image)
    assert (sb.root_nid, sb.build_time, sb.xattr_blkaddr) == (36, 0, 0)
    root = F.ExtendedInode.unpack_from(image, 36 * 32)
    assert (root.format, root.mode, root.size, root.nlink) == (5, 0o40755, 170, 2)
    ext = F.ExtendedInode.unpack_from(image, 50 * 32)
    assert (ext.xattr_icount, ext.i_u, ext.ino) == (37, 31, 50)
    assert F.XattrIbodyHeader.unpack_from(image, 50 * 32 + 64).name_filter == 0x7FFDFFFF
    assert image[50 * 32 + 64 + 156:50 * 32 + 64 + 160] == b"\xff" * 4


@pytest.mark.parametrize("name", ["whiteouts", "xattrs_shared", "hardlinks", "bigdir3000", "devices"])
def test_v2_reads_back(name, tmp_path):
    fs = dumpfile.parse((VECTORS / f"{name}.dump").read_bytes())
    image = write_image(fs, 2)
    back = read_image(image)
    assert back.header.composefs_version == 2
    # V2 drops nanoseconds only; these vectors have none, and whiteouts stay chr 0:0
    assert dumpfile.write(back.fs, sort_xattrs=True) == dumpfile.write(fs, sort_xattrs=True)
    if shutil.which("fsck.erofs"):
        p = tmp_path / "v2.cfs"
        p.write_bytes(image)
        r = subprocess.run(["fsck.erofs", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr + r.stdout


def test_v2_refuses_big_inline_data():
    root = Directory(Stat(0o755))
    root.entries[b"big"] = Leaf(Stat(0o644), Inline(b"x" * 4095))
    with pytest.raises(ImageError, match="format 2"):
        write_image(FileSystem(root), 2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.entries.__setitem__(b"x" * 256, Leaf(Stat(), Inline(b""))), "invalid file name .* in '/d/e'"),
        (lambda r: r.entries.__setitem__(b"l", Leaf(Stat(), Symlink(b"a" * 4096))), "^'/d/e/l': symlink target"),
        (lambda r: r.entries.__setitem__(b"u", Leaf(Stat(uid=1 << 32), Inline(b""))), "^'/d/e/u': uid/gid"),
        (lambda r: r.entries.__setitem__(b"x", Leaf(Stat(xattrs={b"user." + b"n" * 256: b""}), Inline(b""))),
         "longer than EROFS allows"),
        (lambda r: r.entries.__setitem__(b"v", Leaf(Stat(xattrs={b"user.v": b"v" * 70000}), Inline(b""))), "too long"),
    ],
)
@pytest.mark.parametrize("version", [0, 2])
def test_limits_give_image_errors(mutate, message, version):
    root = Directory(Stat(0o755))
    for name in (b"a", b"b", b"c"):
        root.entries[name] = Leaf(Stat(), Inline(name))
    root.entries[b"d"] = Directory(Stat(0o755))
    root.entries[b"d"].entries[b"e"] = inner = Directory(Stat(0o755))
    inner.entries[b"0"] = Leaf(Stat(), Inline(b"0"))
    mutate(inner)  # the error names the entry's path
    with pytest.raises(ImageError, match=message):
        write_image(FileSystem(root), version)


# ---------------------------------------------------------------------------- random trees


def random_tree(rng, max_entries: int = 300, small_data: bool = False) -> FileSystem:
    """A random tree exercising block-boundary padding: inline sizes around 2048/4096, long
    symlinks, big xattrs, long names, extended inodes, whiteouts, external files.
    `small_data` keeps inline data, targets and xattrs small enough for format 2."""
    root = Directory(Stat(0o755, 0, 0, rng.choice([0, 5]), 0))
    dirs = [root]
    for _ in range(rng.randint(1, max_entries)):
        d = rng.choice(dirs)
        name = bytes(rng.choice(b"abcdefghij0123456789.-_ ") for _ in range(rng.randint(1, rng.choice([3, 20, 255]))))
        if name in (b".", b"..") or name in d.entries:
            continue
        st = Stat(rng.choice([0o644, 0o755]), rng.choice([0, 1000, 70000]), 0, rng.choice([0, 5, 1 << 33]), rng.choice([0, 7]))
        for _ in range(rng.choice([0, 0, 1, 3])):
            key = rng.choice([b"user.", b"security.", b"trusted."]) + bytes(rng.choice(b"abc") for _ in range(rng.randint(1, 30)))
            st.xattrs[key] = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 10, 300, 2000][: 4 if small_data else 5])))
        k = rng.random()
        if k < 0.15:
            child = Directory(st)
            dirs.append(child)
            d.entries[name] = child
            continue
        if k < 0.5:
            n = rng.choice([0, 1, 64, 2047, 2048, 2049, 4095, 4096, 4097, 5000, rng.randint(0, 5000)])
            n = min(n, rng.randint(0, 1024)) if small_data else n
            c = Inline(bytes(rng.randrange(256) for _ in range(n)))
        elif k < 0.65:
            n = rng.choice([1, 100, 2000, 3000, 3900, 4000, 4050, 4095, rng.randint(1, 4095)])
            c = Symlink(b"x" * (min(n, rng.randint(1, 1024)) if small_data else n))
        elif k < 0.8:
            c = External(bytes(rng.randrange(256) for _ in range(32)), rng.choice([1, 4096, 1 << 33, 1 << 40]))
        elif k < 0.85:
            c = CharDevice(rng.choice([0, 259]))
        elif k < 0.9:
            c = Sparse(rng.randint(1, 1 << 20))
        else:
            c = Fifo()
        d.entries[name] = Leaf(st, c)
    return FileSystem(root)


@pytest.mark.parametrize("seed", range(8))
def test_random_trees_roundtrip_and_fsck(seed, tmp_path):
    import random

    fs = random_tree(random.Random(seed))
    has_whiteout = any(isinstance(n, Leaf) and n.is_whiteout() for _p, n in fs.walk())
    for version in (0, 1):
        image = write_image(fs, version)
        if not (version == 1 and has_whiteout):  # V1 adds opaque xattrs to whiteout parents
            assert dumpfile.write(read_image(image).fs, sort_xattrs=True) == dumpfile.write(fs, sort_xattrs=True)
        if shutil.which("fsck.erofs"):
            p = tmp_path / f"r{version}.cfs"
            p.write_bytes(image)
            r = subprocess.run(["fsck.erofs", str(p)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr + r.stdout


def test_generated_big_dumpfile_builds_and_reads_back():
    """tools/dev/gendump.py (the bench's 200,000-entry input) at a small size: deterministic,
    every line an entry, the image reads back to the same tree; the GC is left as found."""
    import gc

    from pycfs.tools.dev.gendump import generate

    text = generate(3000, seed=1)
    assert text == generate(3000, seed=1) and text.count(b"\n") == 3000
    fs = dumpfile.parse(text)
    assert sum(1 for _ in fs.walk()) == 3000
    assert gc.isenabled()
    image = write_image(fs, choose_version(fs, 0, 1))
    assert gc.isenabled()
    assert dumpfile.write(read_image(image).fs, sort_xattrs=True).count(b"\n") == 3000


_DIGESTS = st.sampled_from([bytes([n]) * 32 for n in range(3)] + [bytes([n]) * 64 for n in range(2)]) | \
    st.binary(min_size=32, max_size=32) | st.binary(min_size=64, max_size=64)
_FILES = st.lists(st.tuples(
    _DIGESTS,
    st.sampled_from([None, None, b"", b"some/where"]),  # payload: its id's own path, none, another
    st.sampled_from([{}, {}, {b"user.a": b"1"}, {b"security.capability": b"\x01" * 20},
                     {b"security.selinux": b"system_u:object_r:usr_t:s0", b"user.z": b"2"}]),
), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(files=_FILES, version=st.sampled_from([0, 1, 2]))
def test_plain_file_xattr_template_is_the_laid_out_block(files, version):
    """Plain files' xattr blocks come from a template (`_PlainBlock`, one per set of xattrs
    of their own): byte for byte what laying out and packing each gives, beside files whose
    pairs are shared (a repeated digest, a payload spelling an id's path)."""
    from pycfs.host.erofs import writer
    from pycfs.host.tree import object_path

    root = Directory(Stat(0o755))
    for i, (digest, payload, xattrs) in enumerate(files):
        if payload == b"some/where" and i % 2:
            payload = object_path(files[0][0])  # spells another file's own path
        root.entries[b"f%d" % i] = Leaf(Stat(0o644, xattrs=dict(xattrs)), External(digest, 5000, payload))
    fs = FileSystem(root)
    inos = writer._collect_v2(fs) if version == 2 else writer._collect_epoch1(fs, version)
    table = writer._Xattrs(inos, v2=version == 2)
    templated = 0

    def key(ino):
        c = getattr(ino.node, "content", None)
        if c is None:  # the directory: its own xattrs alone
            return ~id(ino.xattrs) if ino.xattrs else None
        if type(c) is not External or c.payload is not None or c.id in table._maybe_shared:
            return None
        return id(ino.xattrs) << 1 | (len(c.id) == 64)  # backed by its own id's path, which no other file may share

    assert table.keys == [key(ino) for ino in inos]
    for ino, key in zip(inos, table.keys):
        if ino.xattr_size:
            laid_out = table.layout(table.items(ino))
            assert ino.xattr_size == laid_out[0]
            assert bytes(table.block(ino, key, 4096)) == bytes(table._pack(*laid_out, 4096))
            templated += table.templates.get(key) is not None
    counts = Counter(d for d, _p, _x in files)
    plain = sum(1 for d, p, _x in files if p is None and counts[d] == 1)
    assert templated >= plain - 1  # (less one: a file whose own path another's payload spells)
