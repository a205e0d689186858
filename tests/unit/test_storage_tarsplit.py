"""tar-split reading (pycfs.host.storage.tarsplit): entries, names, checksums, corruption."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile

import pytest

from pycfs.host.storage import tarsplit
from pycfs.host.storage.tarsplit import (
    FileEntry,
    Segment,
    TarSplitError,
    crc64_iso,
    iter_entries,
    open_entries,
    write_entries,
)

from storage_trees import _tar_pieces


def _gz_lines(*objs) -> io.BytesIO:
    raw = b"".join(json.dumps(o).encode() + b"\n" for o in objs)
    return io.BytesIO(gzip.compress(raw))


def test_crc64_iso_matches_go():
    # Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO)) == 0xb90956c775a41001
    assert crc64_iso(b"123456789") == 0xB90956C775A41001
    assert crc64_iso(b"") == 0
    assert crc64_iso(b"6789", crc64_iso(b"12345")) == crc64_iso(b"123456789")


def test_segments_and_files_rebuild_the_tar():
    files = {"etc": None, "etc/a": b"x" * 100, "etc/b": b"", "c": b"tiny"}
    tar, entries = _tar_pieces(files)
    buf = io.BytesIO()
    write_entries(entries, buf)
    back = list(iter_entries(io.BytesIO(buf.getvalue())))
    assert back == entries
    rebuilt = b"".join(e.data if isinstance(e, Segment) else (files[e.name.decode()] or b"") for e in back)
    assert rebuilt == tar
    a = next(e for e in back if isinstance(e, FileEntry) and e.name == b"etc/a")
    assert a.size == 100 and a.crc64 == crc64_iso(b"x" * 100)


def test_real_tar_split_shapes():
    # As c/storage writes them: null payload, no size for empty entries, empty final payload.
    entries = list(iter_entries(_gz_lines(
        {"type": 2, "payload": base64.b64encode(b"hdr").decode(), "position": 0},
        {"type": 1, "name": "./etc/.wh.gone", "payload": None, "position": 1},
        {"type": 1, "name": "var/new", "size": 39, "payload": "/wC82AFw/xw=", "position": 2},
        {"type": 2, "payload": "", "position": 3},
    )))
    assert entries[0] == Segment(b"hdr")
    assert entries[1] == FileEntry(b"./etc/.wh.gone", 0, None)
    assert entries[1].relpath == b"etc/.wh.gone"
    assert entries[2] == FileEntry(b"var/new", 39, 0xFF00BCD80170FF1C)
    assert entries[3] == Segment(b"")


def test_name_raw_carries_non_utf8_names():
    name = b"data/caf\xe9"
    entries = list(iter_entries(_gz_lines({"type": 1, "name_raw": base64.b64encode(name).decode(), "size": 3})))
    assert entries == [FileEntry(name, 3, None)]
    buf = io.BytesIO()
    write_entries(entries, buf)
    assert b"name_raw" in gzip.decompress(buf.getvalue())
    assert list(iter_entries(io.BytesIO(buf.getvalue()))) == entries


def test_multi_member_gzip():
    one = gzip.compress(json.dumps({"type": 2, "payload": base64.b64encode(b"a").decode()}).encode() + b"\n")
    two = gzip.compress(json.dumps({"type": 2, "payload": base64.b64encode(b"b").decode()}).encode() + b"\n")
    assert list(iter_entries(io.BytesIO(one + two))) == [Segment(b"a"), Segment(b"b")]


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "/etc/shadow", "a\x00b"])
def test_hostile_names_rejected(name):
    with pytest.raises(TarSplitError, match="NUL|absolute|'\\.\\.'"):
        list(iter_entries(_gz_lines({"type": 1, "name": name, "size": 5})))


def test_corrupt_inputs_are_clear_errors(tmp_path):
    good = _gz_lines(*[{"type": 2, "payload": base64.b64encode(bytes(500)).decode()} for _ in range(50)]).getvalue()
    cases = {
        "truncated": good[: len(good) // 2],
        "not gzip": b"this is not gzip at all",
        "bad crc": good[:-8] + bytes(4) + good[-4:],
        "bad json": gzip.compress(b"{nope\n"),
        "bad type": gzip.compress(b'{"type": 99}\n'),
        "bad base64": gzip.compress(b'{"type": 2, "payload": "***"}\n'),
        "bad size": gzip.compress(b'{"type": 1, "name": "a", "size": -1}\n'),
        "bad checksum": gzip.compress(b'{"type": 1, "name": "a", "size": 1, "payload": "AAAA"}\n'),
        "no name": gzip.compress(b'{"type": 1, "size": 1}\n'),
        "no newline": gzip.compress(b'{"type": 2, "payload": ""}'),
        "empty": gzip.compress(b""),
    }
    for what, data in cases.items():
        path = tmp_path / f"{what}.tar-split.gz"
        path.write_bytes(data)
        with pytest.raises(TarSplitError) as info, open_entries(str(path)) as entries:
            list(entries)
        assert str(path) in str(info.value), what
    with pytest.raises(TarSplitError, match="cannot read"), open_entries(str(tmp_path / "missing.tar-split.gz")):
        pass


def test_zlib_error_in_the_middle():
    data = bytearray(_gz_lines({"type": 2, "payload": base64.b64encode(bytes(4000)).decode()}).getvalue())
    data[20] ^= 0xFF
    with pytest.raises(TarSplitError):
        list(iter_entries(io.BytesIO(bytes(data))))


def test_reads_in_small_bounded_pieces(monkeypatch):
    """Highly compressible data read and inflated a few bytes at a time, across members."""
    monkeypatch.setattr(tarsplit, "_READ_SIZE", 7)
    monkeypatch.setattr(tarsplit, "_GROUP", 3)
    entries = [Segment(bytes(1000)), FileEntry(b"a/b", 5, 1), Segment(b"\x01" * 3000), FileEntry(b"c", 0, None)]
    one, two = io.BytesIO(), io.BytesIO()
    write_entries(entries[:2], one)
    write_entries(entries[2:], two)
    assert list(iter_entries(io.BytesIO(one.getvalue() + two.getvalue()))) == entries


def test_a_line_without_end_is_refused_in_linear_time(monkeypatch):
    """A line over MAX_LINE is refused as it grows, and reading one is linear in its length:
    with 64-byte blocks, copying the line so far onto each block (as before) would take
    ~2 GB of copies for this 512 KiB line; joined once, it is instant."""
    monkeypatch.setattr(tarsplit, "_READ_SIZE", 64)
    monkeypatch.setattr(tarsplit, "MAX_LINE", 256 << 10)
    small = json.dumps({"type": 2, "payload": base64.b64encode(b"hdr").decode()}).encode()
    with pytest.raises(TarSplitError, match=r"^tar-split: line 2 is longer than 262144 bytes$"):
        list(iter_entries(io.BytesIO(gzip.compress(small + b"\n" + b"x" * (512 << 10)))))
    seg = json.dumps({"type": 2, "payload": base64.b64encode(bytes(150 << 10)).decode()}).encode()
    assert list(iter_entries(io.BytesIO(gzip.compress(seg + b"\n" + seg + b"\n")))) == [Segment(bytes(150 << 10))] * 2


@pytest.mark.parametrize("read_size, group", [(1 << 18, 512), (64, 3)])
def test_blank_lines_are_skipped_and_errors_name_their_line(monkeypatch, read_size, group):
    """Lines parsed a group at a time, in blocks cut anywhere: a blank line is skipped, a
    bad one is named by its number in the whole file."""
    monkeypatch.setattr(tarsplit, "_READ_SIZE", read_size)
    monkeypatch.setattr(tarsplit, "_GROUP", group)
    seg = json.dumps({"type": 2, "payload": base64.b64encode(b"hdr").decode()}).encode()
    lines = [seg] * 7 + [b"", b"  "] + [seg] * 5
    assert list(iter_entries(io.BytesIO(gzip.compress(b"\n".join(lines) + b"\n")))) == [Segment(b"hdr")] * 12
    lines[11] = b'{"type": 2, "payload": "***"}'
    with pytest.raises(TarSplitError, match=r"^tar-split: line 12: segment payload is not valid base64$"):
        list(iter_entries(io.BytesIO(gzip.compress(b"\n".join(lines) + b"\n"))))


@pytest.mark.parametrize("kind, uid, gid, mode, expected", [
    (tarfile.REGTYPE, 0, 0, 0o600, False),  # the user's own file (uid 0 in the storage's user namespace)
    (tarfile.REGTYPE, 0, 0, 0o000, True),  # ... that even its owner may not read
    (tarfile.REGTYPE, 1000, 1000, 0o644, False),  # world-readable
    (tarfile.REGTYPE, 1000, 1000, 0o640, True),
    (tarfile.REGTYPE, 1000, 0, 0o640, False),  # the user's group may read it
    (tarfile.REGTYPE, 1000, 0, 0o604, True),
    (tarfile.DIRTYPE, 1000, 1000, 0o700, True),  # a directory the user may not search
    (tarfile.DIRTYPE, 0, 0, 0o000, True),
    (tarfile.DIRTYPE, 0, 0, 0o755, False),
    (tarfile.SYMTYPE, 1000, 1000, 0o000, False),  # nothing is opened through a symlink's header
    (tarfile.REGTYPE, 2**40, 0, 0o600, False),  # base-256 uid: left to the open
])  # fmt: skip
def test_closed_to_user_reads_the_header_before_an_entry(kind, uid, gid, mode, expected):
    info = tarfile.TarInfo("f")
    info.type, info.uid, info.gid, info.mode = kind, uid, gid, mode
    header = b"\0" * 300 + info.tobuf(format=tarfile.GNU_FORMAT)  # padding of the previous file first
    assert tarsplit.closed_to_user(Segment(header)) is expected
    assert tarsplit.closed_to_user(Segment(header[-511:])) is False  # no whole header


def test_a_tar_split_that_is_not_a_regular_file_is_refused(tmp_path):
    """(Before: a fifo blocked the open until a writer came.)"""
    import os
    import threading

    path = tmp_path / "layer.tar-split.gz"
    os.mkfifo(path)
    rescue = threading.Timer(3, lambda: open(path, "wb").close())
    rescue.start()
    try:
        with pytest.raises(tarsplit.TarSplitError, match="is a fifo, not a regular file"), tarsplit.open_entries(str(path)):
            pass
    finally:
        rescue.cancel()


def test_a_line_nested_too_deeply_is_one_error():
    data = gzip.compress(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(tarsplit.TarSplitError, match="nests too deeply"):
        list(tarsplit.iter_entries(io.BytesIO(data), "deep"))


def _header_end(data: bytes, pos: int) -> int:
    """Where the entry whose first header block is at pos ends its headers (extension
    headers and their records, then its own): where tar-split ends the segment before it
    (a PAX 1.0 sparse map, after that, is read by Go as the file's data)."""
    while data[pos + 156 : pos + 157] in (b"x", b"g", b"L", b"K"):
        pos += 512 + -(-int(data[pos + 124 : pos + 136].strip(b"\0 "), 8) // 512) * 512
    return pos + 512


@pytest.mark.parametrize("tar_format", ["pax", "gnu", "posix"])
def test_is_sparse_sees_gnu_sparse_entries_and_nothing_else(tmp_path, tar_format):
    """GNU tar --sparse writes typeflag 'S' (gnu) or GNU.sparse.* PAX records (pax, posix):
    the segment before such an entry says so. A plain file, even one named like a PAX
    sparse record, with its own PAX header (a long name), does not."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    decoy = "12 GNU.sparse.major=1\n" + "n" * 120  # a PAX path record holds it
    (src / decoy).write_bytes(b"plain")
    out = tmp_path / "x.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-cf", out, "-C", src, "holes", decoy], check=True)
    data = out.read_bytes()
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf.getmembers()}
    for name, member in members.items():
        segment = Segment(b"\0" * 100 + data[member.offset:_header_end(data, member.offset)])  # padding first
        assert tarsplit.is_sparse(segment) is (name == "holes"), name
    assert members["holes"].issparse()


def test_is_sparse_looks_past_a_records_block_that_seems_a_header():
    """The backward look for the entry's PAX header gave up at the first block with an 'x'
    where a header's typeflag is (a records block of a 93-character name has one)."""
    def record(key: str, value: object) -> bytes:
        body = f" {key}={value}\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        return f"{n}{body}".encode()

    for length in range(1, 300):
        name = "usr/" + "x" * length
        records = (record("GNU.sparse.major", 1) + record("GNU.sparse.minor", 0) + record("GNU.sparse.name", name)
                   + record("GNU.sparse.realsize", 1 << 20))
        if records[156:157] == b"x":
            break
    pax = tarfile.TarInfo("./PaxHeaders/f")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    entry = tarfile.TarInfo("./GNUSparseFile.0/f")
    entry.size = 512
    segment = Segment(pax.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)
                      + entry.tobuf(tarfile.USTAR_FORMAT))
    assert tarsplit.is_sparse(segment)
