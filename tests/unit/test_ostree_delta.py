"""Static delta pieces: names and paths (checked against what `ostree static-delta generate`
wrote), varuints, bsdiff patches, and refusal of damaged parts and superblocks."""

import base64
import hashlib
import lzma
import os
from functools import partial

import pytest
from hypothesis import given, strategies as st

from fdcount import open_fd_count
from memtrace import peak_of
from ostree_trees import commit, have_ostree, init_repo, make_tree, ostree
from pycfs.host.ostree.delta import (
    PART_TYPE, _offtin, _varuint, b64name, bspatch, decompress_part, delta_dir, index_path, parse_index,
    parse_superblock,
)
from pycfs.host.ostree.objects import OstreeError
from pycfs.protocol.gvariant import encode


def test_b64name():
    assert b64name(bytes(32)) == "A" * 43
    name = b64name(b"\xff" * 32)
    assert "/" not in name and "=" not in name
    raw = bytes(range(200, 232))
    assert name and b64name(raw) == base64.b64encode(raw).decode().rstrip("=").replace("/", "_")


@pytest.mark.parametrize("data,value", [(b"\x00", 0), (b"\x7f", 127), (b"\xac\x02", 300), (b"\x80\x80\x01", 16384)])
def test_varuint(data, value):
    assert _varuint(data, 0, "x") == (value, len(data))


def test_varuint_truncated():
    with pytest.raises(OstreeError, match="truncated"):
        _varuint(b"\x80", 0, "x")


def _offtout(v: int) -> bytes:
    b = bytearray(abs(v).to_bytes(8, "little"))
    if v < 0:
        b[7] |= 0x80
    return bytes(b)


@given(st.binary(min_size=1, max_size=300), st.binary(max_size=300), st.integers(-50, 50))
def test_bspatch(old, extra, z):
    new_prefix = bytes((b * 7 + 3) & 0xFF for b in old)
    diff = bytes((n - o) & 0xFF for n, o in zip(new_prefix, old))
    patch = _offtout(len(old)) + _offtout(len(extra)) + _offtout(z) + diff + extra
    assert _offtin(_offtout(z)) == z
    assert bspatch(old, patch, len(old) + len(extra), "x") == new_prefix + extra


def test_bspatch_refuses_out_of_bounds():
    with pytest.raises(OstreeError, match="out of bounds"):
        bspatch(b"abc", _offtout(10) + _offtout(0) + _offtout(0) + bytes(10), 10, "x")
    with pytest.raises(OstreeError, match="ends early"):
        bspatch(b"abc", b"", 3, "x")


def test_damaged_parts():
    payload = encode(PART_TYPE, ([], [], b"", b""))
    assert decompress_part(b"\0" + payload, "p") == ([], [], b"", b"")
    assert decompress_part(b"x" + lzma.compress(payload), "p") == ([], [], b"", b"")
    for raw, why in [(b"", "empty"), (b"z" + payload, "unknown compression"), (b"x" + b"junk", "corrupt xz"),
                     (b"x" + lzma.compress(payload)[:-5], "truncated"), (b"\0\x01\x02", "not a valid delta part")]:
        with pytest.raises(OstreeError, match=why):
            decompress_part(raw, "p")


@pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")
def test_paths_and_superblocks_of_real_deltas(tmp_path):
    repo = init_repo(tmp_path / "repo", "archive")
    a = bytes.fromhex(commit(repo, make_tree(tmp_path / "t1"), "main"))
    b = bytes.fromhex(commit(repo, make_tree(tmp_path / "t2", version=2), "main"))
    ostree("static-delta", "generate", f"--repo={repo}", "--empty", f"--to={a.hex()}")
    ostree("static-delta", "generate", f"--repo={repo}", f"--from={a.hex()}", f"--to={b.hex()}")
    ostree("summary", f"--repo={repo}", "-u")  # writes the delta indexes
    for frm, to in ((None, a), (a, b)):
        sb = (repo / delta_dir(frm, to) / "superblock").read_bytes()
        parsed = parse_superblock(sb, "d", frm, to)
        assert parsed.to_commit == to and hashlib.sha256(parsed.commit_data).digest() == to
        assert os.path.exists(repo / delta_dir(frm, to) / "0") and len(parsed.parts) == 1
        name = to.hex() if frm is None else f"{frm.hex()}-{to.hex()}"
        table = parse_index((repo / index_path(to)).read_bytes(), "i")
        assert table == {name: hashlib.sha256(sb).digest()}
        with pytest.raises(OstreeError, match="superblock is for"):
            parse_superblock(sb, "d", b"\1" * 32, to)
        with pytest.raises(OstreeError, match="not a valid superblock"):
            parse_superblock(sb[:-1], "d", frm, to)


def _varuints(*values: int) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


def _bswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _applier(mode: int, data: bytes, ops: bytes, checksum: bytes = b"\1" * 32, store=None, tmp_dir: str = "/tmp",
             read_base=None):
    from pycfs.host.ostree.delta import PartApplier
    from pycfs.host.ostree.objects import Kind

    def never(*args):
        raise AssertionError("nothing is valid here")

    payload = ([(0, 0, _bswap32(mode))], [[]], data, ops)
    return PartApplier("part", payload, [(Kind.FILE, checksum)], read_base or never, store or never, never, 1024,
                       tmp_dir)


@pytest.mark.parametrize("target", [b"a\0b", b"\xff\xfe"])
def test_a_delta_symlink_target_that_is_no_gvariant_string_is_refused(target):
    """(Before: a bare ValueError from the encoder, or UnicodeEncodeError, escaped.)"""
    applier = _applier(0o120777, target, b"S" + _varuints(0, 0, len(target), 0))
    with pytest.raises(OstreeError, match="symlink target is not UTF-8 text without NUL"):
        applier.run()


def test_delta_writes_are_bounded_by_the_open_file():
    """Repeated 'write' opcodes of the same bytes must not grow a file past its size."""
    import tracemalloc

    data = bytes(1 << 20)
    ops = b"o" + _varuints(0, 0, len(data)) + (b"w" + _varuints(len(data), 0)) * 64 + b"c"
    applier = _applier(0o100644, data, ops)
    tracemalloc.start()
    try:
        with pytest.raises(OstreeError, match="beyond the size of the open file"):
            applier.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_large_delta_file_goes_to_a_temporary_file_as_it_is_written(tmp_path):
    """A file built by 'open' + 'write's over inline_max never sits whole in memory (an
    'open' may declare any size; before, every write appended to a bytearray) and reaches
    the store as an fd holding exactly its bytes."""
    from pycfs.host.ostree.objects import FileHeader

    data = os.urandom(16 << 20)
    size = len(data)
    header = FileHeader(size, 0, 0, 0o100644, "", [])
    checksum = hashlib.sha256(header.checksum_prefix() + data).digest()
    kept = []
    ops = b"o" + _varuints(0, 0, size) + b"".join(b"w" + _varuints(1 << 20, i << 20) for i in range(16)) + b"c"
    applier = _applier(0o100644, data, ops, checksum, lambda c, fetched: kept.append((c, fetched)), str(tmp_path))
    assert peak_of(applier.run) < 8 << 20
    [(got, fetched)] = kept
    assert got == checksum and fetched.content is None and fetched.header.size == size
    try:
        with open(f"/proc/self/fd/{fetched.fd}", "rb") as f:
            assert f.read() == data
    finally:
        os.close(fetched.fd)


@pytest.mark.parametrize("end", [b"c", b""])
def test_a_large_delta_file_that_is_wrong_or_unfinished_leaves_no_fd(tmp_path, end):
    data = os.urandom(8192)
    ops = b"o" + _varuints(0, 0, 8192) + b"w" + _varuints(4096, 0) + b"w" + _varuints(4096, 4096) + end
    before = open_fd_count()
    with pytest.raises(OstreeError, match="does not match its checksum|do not build every object"):
        _applier(0o100644, data, ops, b"\2" * 32, tmp_dir=str(tmp_path)).run()
    assert open_fd_count() == before


def test_a_delta_symlink_longer_than_path_max_is_refused():
    ops = b"o" + _varuints(0, 0, 1 << 40) + b"w" + _varuints(4, 0) + b"c"
    with pytest.raises(OstreeError, match="a symlink of 1099511627776 bytes"):
        _applier(0o120777, b"abcd", ops).run()


def test_a_delta_file_copied_from_a_large_base_reads_the_base_in_pieces(tmp_path):
    """'read' of a stored base object then 'write's from it: the base is read where the
    writes need it (before: the whole object was read into memory), and closed after."""
    from pycfs.host.ostree.delta import BaseFile
    from pycfs.host.ostree.objects import FileHeader

    base = tmp_path / "base"
    base.write_bytes(os.urandom(1 << 20) * 40)
    size = base.stat().st_size
    header = FileHeader(size, 0, 0, 0o100644, "", [])
    checksum = hashlib.sha256(header.checksum_prefix() + base.read_bytes()).digest()
    opened, kept = [], []

    def read_base(c):
        assert c == b"\7" * 32
        opened.append(BaseFile(os.open(base, os.O_RDONLY), "base"))
        return opened[-1]

    ops = b"o" + _varuints(0, 0, size) + b"r" + _varuints(0) + b"w" + _varuints(size, 0) + b"c"
    applier = _applier(0o100644, b"\7" * 32, ops, checksum, lambda c, fetched: kept.append(fetched), str(tmp_path),
                       read_base)
    before = open_fd_count()
    peak = peak_of(applier.run)
    [fetched] = kept
    try:
        assert peak < 8 << 20 and open_fd_count() == before + 1  # the stored file's, nothing else
        with open(f"/proc/self/fd/{fetched.fd}", "rb") as f:
            assert f.read() == base.read_bytes()
    finally:
        os.close(fetched.fd)


def test_a_part_writes_no_more_than_its_data_and_the_bases_it_reads(tmp_path, monkeypatch):
    """An 'open' of 64 MiB filled by 'write's of the part's 4 KiB again and again (a few
    hundred bytes of xz declared a 4 GiB file, all written before its checksum refused it):
    refused before the write that goes past the part's data."""
    from pycfs.host.ostree import delta

    written = []
    monkeypatch.setattr(delta, "write_all", lambda fd, data: written.append(len(data)))
    data = os.urandom(4096)
    ops = b"o" + _varuints(0, 0, 64 << 20) + (b"w" + _varuints(len(data), 0)) * (16 << 10) + b"c"
    with pytest.raises(OstreeError, match=r"^part: the opcodes write more than the part's 4096 bytes of data and the 0 "
                                          r"bytes of the base objects they read: a delta crafted to fill the disk "
                                          r"\(`--no-delta` pulls without deltas\)$"):
        _applier(0o100644, data, ops, tmp_dir=str(tmp_path)).run()
    assert sum(written) == len(data)


def test_a_file_may_read_its_base_again_and_again_as_ostree_rollsum_writes_it(tmp_path):
    """ostree's rollsum 'read's the base again after each run of the part's data; every file
    that reads a base may write it (bsdiff 'read's it before the 'open')."""
    from pycfs.host.ostree.delta import BaseFile
    from pycfs.host.ostree.objects import FileHeader

    base = tmp_path / "base"
    base.write_bytes(os.urandom(8192))
    new = os.urandom(100)
    content = base.read_bytes()[:4096] + new + base.read_bytes()[4096:]
    header = FileHeader(len(content), 0, 0, 0o100644, "", [])
    checksum = hashlib.sha256(header.checksum_prefix() + content).digest()
    data = b"\7" * 32 + new * 2  # (each file's own run of data, as ostree writes them)
    ops = b"".join(b"o" + _varuints(0, 0, len(content)) + b"r" + _varuints(0) + b"w" + _varuints(4096, 0) + b"R"
                   + b"w" + _varuints(len(new), 32 + i * len(new)) + b"r" + _varuints(0) + b"w" + _varuints(4096, 4096)
                   + b"R" + b"c" for i in range(2))
    kept = []
    applier = _applier(0o100644, data, ops, checksum, lambda c, fetched: kept.append(fetched), str(tmp_path),
                       lambda c: BaseFile(os.open(base, os.O_RDONLY), "base"))
    applier.objects = [applier.objects[0]] * 2
    applier.run()
    assert len(kept) == 2 and applier.written == 2 * len(content)
    for fetched in kept:
        os.close(fetched.fd)


def test_a_part_is_held_once_however_it_is_stored():
    """A part's data is as large as the part (up to MAX_PART): an uncompressed part is read
    in place, an xz one inflated into one buffer, and the data is a view of either (before:
    a copy of the part without its first byte, lzma's blocks joined, then a copy of the
    data: up to three times the part)."""
    from pycfs.host.ostree.delta import XZ_PIECE

    data = bytes(range(256)) * (128 << 10)  # 32 MiB
    payload = encode(PART_TYPE, ([], [[(b"user.a\0", b"v")]], data, b"ops"))
    stored = b"\0" + payload
    xz = b"x" + lzma.compress(payload, preset=0)
    for raw, most in ((stored, 1 << 20), (xz, len(data) * 9 // 8 + XZ_PIECE)):
        got: list[tuple] = []
        peak = peak_of(partial(lambda raw, got: got.append(decompress_part(raw, "p")), raw, got))
        [(_modes, xattrs, part_data, ops)] = got
        assert part_data == data and ops == b"ops" and xattrs == [[(b"user.a\0", b"v")]]
        assert peak < most, (raw[0], peak)
