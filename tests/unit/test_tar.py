"""Tar header codec and reader: numbers, headers, PAX, GNU long names, strictness."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycfs.host.oci.tar import (
    BLOCK,
    GNUTYPE_LONGLINK,
    GNUTYPE_SPARSE,
    MAGIC_GNU,
    MAX_EXTENSION_SIZE,
    SYMTYPE,
    VERSION_GNU,
    XGLTYPE,
    ZERO_BLOCK,
    TarEnd,
    TarEntry,
    TarError,
    TarHeader,
    TarReader,
    _cached_pax_mtime,
    format_number,
    gnu_long_entry,
    parse_number,
    parse_pax,
    parse_pax_mtime,
    pax_data,
    pax_entry,
    simple_entry,
)


def read_all(data: bytes) -> list[TarEntry | TarEnd]:
    """Every event of an archive, consuming content as the contract requires."""
    reader = TarReader(io.BytesIO(data).read)
    events = []
    while True:
        ev = reader.next()
        events.append(ev)
        if isinstance(ev, TarEnd):
            return events
        reader.read_exact(ev.padded_size)


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "field, value",
    [
        (b"0000644\x00", 0o644),
        (b"    644 ", 0o644),
        (b"644\x00\x00\x00\x00\x00", 0o644),
        (b"\x00" * 8, 0),
        (b"        ", 0),
        (b"\x80" + (5).to_bytes(7, "big"), 5),
        (b"\x80\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00", 1 << 64),
        (b"\xff" * 8, -1),
        (b"\xff" * 7 + b"\xfe", -2),
    ],
)
def test_parse_number(field: bytes, value: int) -> None:
    assert parse_number(field) == value


@pytest.mark.parametrize("field", [b"0000899\x00", b"12a4\x00\x00\x00\x00", b"\x81\x00\x00\x00\x00\x00\x00\x00", b"-1\x00\x00\x00\x00\x00\x00"])
def test_parse_number_rejects_garbage(field: bytes) -> None:
    with pytest.raises(TarError, match="bad"):
        parse_number(field)


@given(st.integers(min_value=-(2**60), max_value=2**88 - 1), st.sampled_from([8, 12]))
def test_number_round_trip(value: int, size: int) -> None:
    try:
        encoded = format_number(value, size)
    except TarError:
        assert not (-(256 ** (size - 1)) // 2 <= value < 256 ** (size - 1))
        return
    assert len(encoded) == size
    assert parse_number(encoded) == value


def test_format_number_prefers_octal() -> None:
    assert format_number(0o755, 8) == b"0000755\x00"
    assert format_number(8**11 - 1, 12) == b"77777777777\x00"
    assert format_number(8**11, 12) == b"\x80" + (8**11).to_bytes(11, "big")


# ---------------------------------------------------------------------------- headers


header_fields = st.fixed_dictionaries(
    {
        "name": st.binary(min_size=1, max_size=100).map(lambda b: b.replace(b"\x00", b"n")),
        "mode": st.integers(0, 0o7777777),
        "uid": st.integers(0, 2**40),
        "gid": st.integers(0, 2**40),
        "size": st.integers(0, 2**70),
        "mtime": st.integers(-(2**40), 2**60),
        "typeflag": st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"\x00"]),
        "linkname": st.binary(max_size=100).map(lambda b: b.replace(b"\x00", b"l")),
        "uname": st.binary(max_size=32).map(lambda b: b.replace(b"\x00", b"u")),
        "gname": st.binary(max_size=32).map(lambda b: b.replace(b"\x00", b"g")),
        "devmajor": st.integers(0, 2**20),
        "devminor": st.integers(0, 2**20),
        "prefix": st.binary(max_size=155).map(lambda b: b.replace(b"\x00", b"p")),
    }
)


@settings(max_examples=200)
@given(header_fields)
def test_header_round_trip(fields: dict) -> None:
    block = TarHeader(**fields).pack()
    assert len(block) == BLOCK
    parsed = TarHeader.parse(block)
    for key, value in fields.items():
        assert getattr(parsed, key) == value, key
    assert parsed.pack() == block


@settings(max_examples=300)
@given(header_fields, st.sampled_from([b"0", b"1", b"2", b"3", b"5", b"6", b"S", b"\x00"]), st.booleans(),
       st.booleans())
def test_lone_header_entry_is_the_extended_path_entry(fields: dict, typeflag: bytes, gnu: bool, no_prefix: bool) -> None:
    """`TarReader.next` takes a lone header's fields straight into the entry: the entry is
    the one the general path (a PAX header of no effect before it) makes from a TarHeader."""
    fields = {**fields, "typeflag": typeflag, "size": fields["size"] % 700}
    if gnu:
        fields |= {"magic": MAGIC_GNU, "version": VERSION_GNU}
    if no_prefix:
        fields["prefix"] = b""
    block = TarHeader(**fields).pack()
    content = bytes(-(-fields["size"] // BLOCK) * BLOCK)
    lone = read_all(block + content + ZERO_BLOCK * 2)[0]
    general = read_all(pax_entry([(b"comment", b"x")]) + block + content + ZERO_BLOCK * 2)[0]
    assert isinstance(lone, TarEntry) and isinstance(general, TarEntry)
    assert lone.raw == block and lone.offset == 0 and general.raw.endswith(block)
    assert lone.header == general.header == TarHeader.parse(block)
    names = [n for n in TarEntry.__slots__ if n not in ("raw", "offset", "pax")]
    assert [getattr(lone, n) for n in names] == [getattr(general, n) for n in names]
    hdr = TarHeader.parse(block)
    assert (lone.path, lone.linkpath, lone.size, lone.uid, lone.gid, lone.mtime, lone.mtime_nsec, lone.typeflag,
            lone.mode, lone.devmajor, lone.devminor, lone.sparse, lone.xattrs, lone.pax) == (
        hdr.full_name, hdr.linkname, hdr.size, hdr.uid, hdr.gid, hdr.mtime, 0, typeflag, hdr.mode, hdr.devmajor,
        hdr.devminor, typeflag == GNUTYPE_SPARSE, {}, {})


def test_header_round_trip_gnu_keeps_raw_prefix_bytes() -> None:
    raw_prefix = b"\x00" * 12 + b"\x01\x02" + b"\x00" * 141  # GNU atime/ctime/... area
    block = TarHeader(name=b"x", magic=MAGIC_GNU, version=VERSION_GNU, prefix=raw_prefix).pack()
    parsed = TarHeader.parse(block)
    assert parsed.prefix == raw_prefix and parsed.full_name == b"x"
    assert parsed.pack() == block


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_parse_header_written_by_tarfile(fmt: int) -> None:
    ti = tarfile.TarInfo("dir/file")
    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = 1234, 0o4755, 1000, 100, 1_700_000_000
    ti.uname, ti.gname, ti.linkname, ti.type = "alice", "staff", "target", tarfile.SYMTYPE
    block = ti.tobuf(fmt)[:BLOCK]
    h = TarHeader.parse(block)
    assert (h.name, h.mode, h.uid, h.gid, h.mtime, h.typeflag) == (b"dir/file", 0o4755, 1000, 100, 1_700_000_000, SYMTYPE)
    assert (h.uname, h.gname, h.linkname) == (b"alice", b"staff", b"target")
    assert h.size == 1234  # the codec does not second-guess the size field of any type
    assert h.magic == (MAGIC_GNU if fmt == tarfile.GNU_FORMAT else b"ustar\x00")


def test_checksum_mismatch_is_an_error() -> None:
    block = bytearray(TarHeader(name=b"a").pack())
    block[0] ^= 1
    with pytest.raises(TarError, match="bad tar header checksum at offset 1024"):
        TarHeader.parse(bytes(block), 1024)


def test_signed_checksum_is_accepted() -> None:
    """Some old tars summed the header as signed chars; both sums are valid."""
    block = bytearray(TarHeader(name=b"\xe9t\xe9").pack())
    block[148:156] = b"%06o\x00 " % (sum(b if b < 128 else b - 256 for b in block[:148] + b" " * 8 + block[156:]))
    assert TarHeader.parse(bytes(block)).name == b"\xe9t\xe9"


def test_bad_number_in_header_names_offset() -> None:
    block = bytearray(TarHeader(name=b"a").pack())
    block[108:116] = b"00009x0\x00"  # uid
    block[148:156] = b"%06o\x00 " % sum(block[:148] + b" " * 8 + block[156:])
    with pytest.raises(TarError, match="bad octal uid field .* offset 512"):
        TarHeader.parse(bytes(block), 512)


@pytest.mark.parametrize(
    "offset, what", [(100, "mode"), (108, "uid"), (116, "gid"), (124, "size"), (136, "mtime"), (329, "devmajor"),
                     (337, "devminor")])
def test_every_bad_number_is_named(offset: int, what: str) -> None:
    """Fields parsed a run at a time (mode/uid/gid, the device numbers) still name the bad one."""
    block = bytearray(TarHeader(name=b"a").pack())
    block[offset : offset + 8] = b"0000800\x00"
    block[148:156] = b"%06o\x00 " % sum(block[:148] + b" " * 8 + block[156:])
    with pytest.raises(TarError, match=f"bad octal {what} field .* offset 1536"):
        TarHeader.parse(bytes(block), 1536)


@settings(max_examples=300)
@given(st.binary(min_size=64, max_size=64), st.integers(0, 448), st.sampled_from(["unsigned", "signed", "off", "wrap"]))
def test_checksum_accepts_exactly_the_two_sums(noise: bytes, at: int, stored: str) -> None:
    """Any bytes outside the numeric fields (name, padding...): a header is taken iff its
    checksum field holds the unsigned or the signed byte sum, computed here the slow way;
    a sum off by adler32's modulus (65521) is refused."""
    block = bytearray(TarHeader(name=b"a").pack())
    for i, b in enumerate(noise):
        if not (100 <= at + i < 157 or 257 <= at + i < 265 or 329 <= at + i < 345):  # numbers, magic, typeflag
            block[at + i] = b
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned, signed = sum(rest), sum(b - 256 if b >= 128 else b for b in rest)
    value = {"unsigned": unsigned, "signed": signed, "off": unsigned + 1, "wrap": unsigned + 65521}[stored]
    if value < 0:
        return  # a negative sum has no octal field
    block[148:156] = b"%06o\x00 " % value
    if value in (unsigned, signed):
        assert TarHeader.parse(bytes(block)).chksum == value
    else:
        with pytest.raises(TarError, match="bad tar header checksum"):
            TarHeader.parse(bytes(block))


def test_truncated_header_is_an_error() -> None:
    data = simple_entry(b"a", b"x") + TarHeader(name=b"b").pack()[:300]
    reader = TarReader(io.BytesIO(data).read)
    reader.read_exact(reader.next().padded_size)
    with pytest.raises(TarError, match="truncated tar header at offset 1024: 300 of 512"):
        reader.next()


def test_truncated_content_is_an_error() -> None:
    data = simple_entry(b"a", b"x" * 1000)[:700]
    reader = TarReader(io.BytesIO(data).read)
    entry = reader.next()
    with pytest.raises(TarError, match="truncated tar: entry content at offset 700"):
        reader.read_exact(entry.padded_size)


def test_negative_size_is_an_error() -> None:
    block = TarHeader(name=b"a", size=-5).pack()
    with pytest.raises(TarError, match="negative size"):
        TarHeader.parse(block)


# ---------------------------------------------------------------------------- PAX


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40).filter(lambda k: b"=" not in k and b"\x00" not in k),
                          st.binary(max_size=300))))
def test_pax_round_trip(records: list[tuple[bytes, bytes]]) -> None:
    assert parse_pax(pax_data(records)) == records


def test_pax_length_counts_its_own_digits() -> None:
    # 98 bytes after the digits: "99" would make 100, "100" makes 101, so the length is 101
    value = b"v" * 94
    data = pax_data([(b"k", value)])
    assert data.startswith(b"101 k=") and len(data) == 101
    assert parse_pax(data) == [(b"k", value)]


def test_pax_accepts_trailing_nuls() -> None:
    assert parse_pax(b"10 path=x\n\x00\x00\x00") == [(b"path", b"x")]


@pytest.mark.parametrize("data", [b"12 path=x\n", b"x path=x\n", b"10 pathx\n", b"11 path=x?", b"11 path=x\nzz", b"4 a\n"])
def test_pax_rejects_malformed(data: bytes) -> None:
    with pytest.raises(TarError, match="PAX record"):
        parse_pax(data)


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"1700000000", (1700000000, 0)),
        (b"1700000000.5", (1700000000, 500000000)),
        (b"1700000000.123456789999", (1700000000, 123456789)),
        (b"1700000000.000000001", (1700000000, 1)),
        (b"-5.25", (-5, 250000000)),
        (b"12.x", (12, 0)),
    ],
)
def test_pax_mtime(text: bytes, expected: tuple[int, int]) -> None:
    assert parse_pax_mtime(text) == expected


@pytest.mark.parametrize("text", [b"", b"+5", b" 5", b"1_0", b"x.5", b"-", b"--1"])
def test_pax_mtime_rejects_garbage(text: bytes) -> None:
    with pytest.raises(TarError, match="bad PAX mtime"):
        parse_pax_mtime(text)


def test_pax_overrides_and_xattrs() -> None:
    records = [
        (b"path", b"very/" + b"long/" * 60 + b"name"),
        (b"linkpath", b"L" * 300),
        (b"size", b"70"),
        (b"uid", b"4000000000"),
        (b"gid", b"7"),
        (b"mtime", b"1700000000.25"),
        (b"SCHILY.xattr.user.a", b"1\x002"),
        (b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        (b"LIBARCHIVE.xattr.user.b", b"ignored"),
        (b"comment", b"hello"),
    ]
    data = pax_entry(records) + simple_entry(b"short", b"", size=0) + b"c" * 70 + bytes(442) + ZERO_BLOCK * 2
    entry, end = read_all(data)
    assert entry.path == records[0][1] and entry.linkpath == b"L" * 300
    assert (entry.size, entry.uid, entry.gid, entry.mtime, entry.mtime_nsec) == (70, 4000000000, 7, 1700000000, 250000000)
    assert entry.header.size == 0
    assert entry.xattrs == {b"user.a": b"1\x002", b"security.capability": b"\x01\x00\x00\x02"}
    assert entry.pax[b"comment"] == b"hello"
    header_bytes = len(pax_entry(records)) + BLOCK
    assert header_bytes == 4 * BLOCK  # records need two data blocks
    assert entry.raw == data[:header_bytes] and entry.offset == 0
    assert isinstance(end, TarEnd) and end.raw == ZERO_BLOCK * 2 and end.offset == header_bytes + BLOCK


def test_empty_pax_value_reverts_to_header() -> None:
    data = pax_entry([(b"path", b""), (b"size", b"")]) + simple_entry(b"hdrname", b"abc")
    entry = read_all(data)[0]
    assert entry.path == b"hdrname" and entry.size == 3


def test_bad_pax_number_is_an_error() -> None:
    data = pax_entry([(b"size", b"12x")]) + simple_entry(b"a")
    with pytest.raises(TarError, match="bad PAX size"):
        read_all(data)


@pytest.mark.parametrize("key", [b"size", b"uid", b"gid", b"mtime"])
def test_huge_pax_number_is_refused(key: bytes) -> None:
    """Digits past int()'s limit (4300) are a TarError naming the record, not a ValueError."""
    with pytest.raises(TarError, match=f"bad PAX {key.decode()}"):
        read_all(pax_entry([(key, b"1" * 5000)]) + simple_entry(b"a"))


def test_long_pax_mtime_is_not_kept() -> None:
    """Only short mtimes are cached: megabytes of fraction parse, then are gone."""
    before = _cached_pax_mtime.cache_info().currsize
    assert parse_pax_mtime(b"17." + b"5" * 100_000) == (17, 555_555_555)
    assert _cached_pax_mtime.cache_info().currsize == before
    assert parse_pax_mtime(b"18.25") == (18, 250_000_000)
    assert _cached_pax_mtime.cache_info().currsize == before + 1


def test_global_header_consumed_not_applied() -> None:
    g = pax_entry([(b"path", b"global-name"), (b"uid", b"99")], typeflag=XGLTYPE, name=b"pax_global_header")
    member = simple_entry(b"a", b"x", uid=5)
    data = g + member + g + ZERO_BLOCK * 2
    entry, end = read_all(data)
    assert (entry.path, entry.uid) == (b"a", 5)
    assert entry.raw == g + member[:BLOCK]
    assert end.raw == g + ZERO_BLOCK * 2


# ---------------------------------------------------------------------------- names


def test_name_precedence() -> None:
    ustar = TarHeader(name=b"name", prefix=b"pre/fix", linkname=b"ln", typeflag=SYMTYPE)
    assert read_all(ustar.pack())[0].path == b"pre/fix/name"
    gnu = gnu_long_entry(b"gnu/" * 40 + b"long") + gnu_long_entry(b"gnulink" * 30, GNUTYPE_LONGLINK)
    e = read_all(gnu + ustar.pack())[0]
    assert e.path == b"gnu/" * 40 + b"long" and e.linkpath == b"gnulink" * 30
    pax = pax_entry([(b"path", b"paxpath"), (b"linkpath", b"paxlink")])
    e = read_all(gnu + pax + ustar.pack())[0]
    assert (e.path, e.linkpath) == (b"paxpath", b"paxlink")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_from_tarfile(fmt: int) -> None:
    names = ["a" * 99, "b" * 101, "d/" * 60 + "c" * 30, "e" * 300]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        for n in names:
            ti = tarfile.TarInfo(n)
            ti.type, ti.linkname = tarfile.SYMTYPE, "t" * 150
            tf.addfile(ti)
    events = read_all(bio.getvalue())
    assert [e.path for e in events[:-1]] == [n.encode() for n in names]
    assert {e.linkpath for e in events[:-1]} == {b"t" * 150}
    # every byte up to the end marker is accounted for; tarfile pads the rest with zeros
    headers = b"".join(e.raw for e in events)
    assert bio.getvalue().startswith(headers) and not bio.getvalue()[len(headers):].strip(b"\x00")


# ---------------------------------------------------------------------------- end of archive


def test_clean_eof_without_end_marker() -> None:
    data = simple_entry(b"a", b"x")
    entry, end = read_all(data)
    assert entry.path == b"a" and end.raw == b"" and end.offset == len(data)


def test_single_zero_block_before_eof_ends_archive() -> None:
    data = simple_entry(b"a", b"x") + ZERO_BLOCK
    assert read_all(data)[-1].raw == ZERO_BLOCK


def test_stray_zero_block_is_absorbed_into_next_entry() -> None:
    data = simple_entry(b"a", b"x") + ZERO_BLOCK + simple_entry(b"b", b"y") + ZERO_BLOCK * 2
    _a, b, end = read_all(data)
    assert b.path == b"b" and b.raw == ZERO_BLOCK + simple_entry(b"b", b"y")[:BLOCK] and b.offset == 1024
    assert end.raw == ZERO_BLOCK * 2


def test_extension_without_entry_is_an_error() -> None:
    with pytest.raises(TarError, match="has no entry"):
        read_all(pax_entry([(b"path", b"x")]))
    with pytest.raises(TarError, match="followed by the end marker"):
        read_all(gnu_long_entry(b"x" * 200) + ZERO_BLOCK * 2)


def test_sparse_entries_are_marked_not_regular() -> None:
    old = read_all(TarHeader(name=b"sp", typeflag=GNUTYPE_SPARSE, magic=MAGIC_GNU, version=VERSION_GNU).pack())[0]
    pax = read_all(pax_entry([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
                   + simple_entry(b"a", b"x" * 100))[0]
    plain = read_all(simple_entry(b"b", b"x" * 100))[0]
    assert (old.sparse, old.is_regular()) == (True, False)
    assert (pax.sparse, pax.is_regular()) == (True, False)
    assert (plain.sparse, plain.is_regular()) == (False, True)


def test_oversized_extension_is_refused() -> None:
    hdr = TarHeader(name=b"././@PaxHeader", size=1 << 40, typeflag=b"x").pack()
    with pytest.raises(TarError, match="too large"):
        read_all(hdr)


@pytest.mark.parametrize("zero_blocks", [False, True])
def test_extension_headers_of_one_entry_are_bounded_in_all(zero_blocks: bool) -> None:
    """Each `g` header (and a stray zero block) is kept in the next entry's raw bytes: a run
    of them, each well under the limit, must not grow that without end."""
    g = pax_entry([(b"comment", b"c" * (64 << 10))], typeflag=XGLTYPE, name=b"pax_global_header")
    unit = g + (ZERO_BLOCK if zero_blocks else b"")
    data = unit * (MAX_EXTENSION_SIZE // len(unit) + 2) + simple_entry(b"a", b"x") + ZERO_BLOCK * 2
    source = io.BytesIO(data)
    reader = TarReader(source.read)
    with pytest.raises(TarError, match="too large"):
        reader.next()
    assert source.tell() <= MAX_EXTENSION_SIZE + BLOCK


def test_extension_headers_up_to_the_limit_are_taken() -> None:
    g = pax_entry([(b"comment", b"c" * (64 << 10))], typeflag=XGLTYPE, name=b"pax_global_header")
    member = simple_entry(b"a", b"x")
    data = g * (MAX_EXTENSION_SIZE // len(g)) + member + ZERO_BLOCK * 2
    entry = read_all(data)[0]
    assert entry.path == b"a" and entry.raw == data[: len(data) - 3 * BLOCK]


# ---------------------------------------------------------------------------- robustness


def _pax_archive() -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("p" * 120)
        ti.size = 100
        ti.pax_headers = {"mtime": "1700000000.25", "SCHILY.xattr.user.x": "y", "uid": "7"}
        tf.addfile(ti, io.BytesIO(b"d" * 100))
    return bio.getvalue()


PAX_ARCHIVE = _pax_archive()


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 2 * BLOCK + 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_archives_fail_cleanly(mutations: list[tuple[int, int]]) -> None:
    """Bytes flipped in headers and (unchecksummed) PAX data: a TarError or a valid parse, never anything else."""
    data = bytearray(PAX_ARCHIVE)
    for pos, value in mutations:
        data[pos] = value
    try:
        read_all(bytes(data))
    except TarError:
        pass
