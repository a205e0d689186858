"""splitdirfdstream codec: the format's byte vectors, limits, name rules, truncation, round trips."""

from __future__ import annotations

import io
import os
import struct
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycfs.host.errors import PycfsError
from pycfs.host.varlink.layers import reconstruct
from pycfs.protocol import splitdirfdstream as sd


def test_byte_vectors() -> None:
    assert sd.encode_file_backed_data(2, 9, b"ab") == bytes.fromhex("02" "0900000000000000" "02000000" "02000000" "6162")
    assert sd.encode_inline_data(b"hello") == bytes.fromhex("0105000000") + b"hello"
    assert sd.encode_metadata(b"hello") == bytes.fromhex("0005000000") + b"hello"
    assert sd.encode_inline_data(b"") == bytes.fromhex("0100000000")
    assert sd.decode(sd.encode_metadata(b"hello")) == [sd.Metadata(b"hello")]


def test_writer_drops_empty_metadata_only() -> None:
    out = io.BytesIO()
    w = sd.Writer(out.write)
    w.write_metadata(b"")
    w.write_metadata(b"real")
    w.write_metadata(b"")
    assert out.getvalue() == bytes.fromhex("0004000000") + b"real"
    assert len(out.getvalue()) == 9
    w.write_inline_data(b"")
    assert out.getvalue().endswith(bytes.fromhex("0100000000"))
    # a reader accepts an empty Metadata chunk someone else wrote
    assert sd.decode(bytes.fromhex("0000000000")) == [sd.Metadata(b"")]


@pytest.mark.parametrize("name", [b"", b"/abs", b"a/../b", b"../escape", b"a/b/..", b"..", b"foo\0bar", b"a" * 4097])
def test_rejected_names(name: bytes) -> None:
    with pytest.raises((sd.InvalidFilename, sd.FilenameTooLong)):
        sd.validate_filename(name)
    with pytest.raises(PycfsError):
        sd.encode_file_backed_data(0, 1, name)


@pytest.mark.parametrize("name", [b"a/b/c", b"a/./b", b"a" * 4096, b"..foo", b"foo..", b"a/..foo", b"foo../b"])
def test_accepted_names(name: bytes) -> None:
    sd.validate_filename(name)


def _name_refused(name: bytes) -> bool:
    """The format's name rules, written out plainly (the model the fast path must agree with)."""
    return (not name or len(name) > sd.MAX_FILENAME_LEN or b"\0" in name or name.startswith(b"/")
            or b".." in name.split(b"/"))


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"/", b"\0", b"x" * 1000]), max_size=8).map(b"".join))
@settings(max_examples=500)
def test_names_as_the_rules_say(name: bytes) -> None:
    """validate_filename's shortcut for ordinary names refuses exactly what the rules refuse."""
    try:
        sd.validate_filename(name)
    except (sd.InvalidFilename, sd.FilenameTooLong):
        assert _name_refused(name)
    else:
        assert not _name_refused(name)


def test_name_checks_in_order() -> None:
    # too long wins over NUL and absolute; NUL wins over absolute and ..
    with pytest.raises(sd.FilenameTooLong):
        sd.validate_filename(b"/\0" + b"a" * 4096)
    with pytest.raises(sd.InvalidFilename, match="embedded NUL"):
        sd.validate_filename(b"/../\0")
    with pytest.raises(sd.InvalidFilename, match="absolute path"):
        sd.validate_filename(b"/../x")
    with pytest.raises(sd.InvalidFilename, match="`..` component"):
        sd.validate_filename(b"x/../y")
    with pytest.raises(sd.InvalidFilename, match="empty filename"):
        sd.validate_filename(b"")


@pytest.mark.parametrize("type_byte", [0x03, 0x80, 0xFF])
def test_unknown_chunk_type(type_byte: int) -> None:
    with pytest.raises(sd.UnknownChunkType) as e:
        sd.decode(bytes([type_byte]))
    assert e.value.type_byte == type_byte


@pytest.mark.parametrize("data, expected", [
    (b"\x00", 4), (b"\x00\x05\x00", 4), (b"\x01\x05\x00\x00\x00hel", 5),
    (b"\x02" + b"\x00" * 15, 16), (struct.pack("<BQII", 2, 1, 0, 3) + b"ab", 3),
])
def test_truncated_inside_chunk(data: bytes, expected: int) -> None:
    with pytest.raises(sd.Truncated) as e:
        sd.decode(data)
    assert e.value.expected == expected


def test_clean_eof_only_at_boundaries() -> None:
    stream = sd.encode_metadata(b"abc") + sd.encode_file_backed_data(1, 7, b"x/y") + sd.encode_inline_data(b"q")
    assert len(sd.decode(stream)) == 3
    for cut in range(1, len(stream)):
        boundary = cut in (8, 8 + 20)
        if boundary:
            sd.decode(stream[:cut])
        else:
            with pytest.raises(sd.Truncated):
                sd.decode(stream[:cut])


def test_limits_checked_before_allocating() -> None:
    with pytest.raises(sd.InlineTooLarge) as e:
        sd.decode(struct.pack("<BI", 0, sd.MAX_INLINE_CHUNK_SIZE + 1))
    assert e.value.size == sd.MAX_INLINE_CHUNK_SIZE + 1
    with pytest.raises(sd.FilenameTooLong):
        sd.decode(struct.pack("<BQII", 2, 0, 0, 4097))
    with pytest.raises(sd.InlineTooLarge):
        sd.encode_inline_data(memoryview(bytearray(sd.MAX_INLINE_CHUNK_SIZE + 1)))
    # the reader returns names raw: policy is the caller's (validate_filename)
    assert sd.decode(struct.pack("<BQII", 2, 0, 0, 2) + b"..") == [sd.FileBackedData(0, 0, b"..")]


def test_u64_length_parses() -> None:
    raw = struct.pack("<BQII", 2, 2**64 - 1, 2**32 - 1, 1) + b"a"
    assert sd.decode(raw) == [sd.FileBackedData(2**64 - 1, 2**32 - 1, b"a")]


_names = st.lists(st.sampled_from(["a", "bb", "c.d", "..e", "f.."]), min_size=1, max_size=3).map(
    lambda parts: "/".join(parts).encode())
_chunks = st.one_of(
    st.binary(min_size=1, max_size=300).map(sd.Metadata),
    st.binary(max_size=300).map(sd.InlineData),
    st.builds(sd.FileBackedData, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), _names),
)


@settings(max_examples=200)
@given(st.lists(_chunks, max_size=32), st.integers(1, 64))
def test_round_trip_any_feed_sizes(chunks: list[sd.Chunk], piece: int) -> None:
    data = b"".join(sd.encode_chunk(c) for c in chunks)
    decoder = sd.Decoder()
    got: list[sd.Chunk] = []
    for i in range(0, len(data), piece):
        decoder.feed(data[i : i + piece])
        got += decoder.chunks()
    decoder.eof()
    assert got == chunks
    assert list(sd.read_chunks(io.BytesIO(data).read, piece)) == chunks


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.binary(min_size=1, max_size=100).map(sd.Metadata),
    st.tuples(st.integers(0, 3), st.sampled_from(["f0", "f1", "sub/f2"]), st.integers(0, 40)),
), max_size=32))
def test_reconstruct_matches_model(tmp_path_factory, items) -> None:
    base = tmp_path_factory.mktemp("dirs")
    contents = {}
    dirfds = []
    for d in range(4):
        (base / str(d) / "sub").mkdir(parents=True)
        for name in ("f0", "f1", "sub/f2"):
            data = os.urandom(40)
            (base / str(d) / name).write_bytes(data)
            contents[d, name] = data
        dirfds.append(os.open(base / str(d), os.O_RDONLY | os.O_DIRECTORY))
    try:
        chunks: list[sd.Chunk] = []
        expected = b""
        for item in items:
            if isinstance(item, sd.Metadata):
                chunks.append(item)
                expected += item.data
            else:
                d, name, length = item
                chunks.append(sd.FileBackedData(length, d, name.encode()))
                expected += contents[d, name][:length]
        out = io.BytesIO()
        stream = b"".join(sd.encode_chunk(c) for c in chunks)
        assert reconstruct(sd.decode(stream), dirfds, out.write) == len(expected)
        assert out.getvalue() == expected
    finally:
        for fd in dirfds:
            os.close(fd)


def test_reconstruct_errors(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"ABCDEFGH")
    (tmp_path / "two").write_bytes(b"xy")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = io.BytesIO()
        reconstruct([sd.FileBackedData(4, 0, b"a"), sd.FileBackedData(4, 0, b"a")], [fd], out.write)
        assert out.getvalue() == b"ABCDABCD"
        with pytest.raises(sd.ExternalTooShort) as e:
            reconstruct([sd.FileBackedData(100, 0, b"two")], [fd], io.BytesIO().write)
        assert (e.value.declared, e.value.actual) == (100, 2)
        with pytest.raises(sd.ExternalTooShort) as e:
            reconstruct([sd.FileBackedData(2**64 - 1, 0, b"two")], [fd], io.BytesIO().write)
        assert e.value.declared == 2**64 - 1
        with pytest.raises(sd.DirfdIndexOutOfRange) as e2:
            reconstruct([sd.FileBackedData(1, 5, b"a")], [fd], io.BytesIO().write)
        assert (e2.value.index, e2.value.count) == (5, 1)
        with pytest.raises(sd.InvalidFilename):
            reconstruct([sd.FileBackedData(1, 0, b"../a")], [fd], io.BytesIO().write)
        os.symlink("/etc/passwd", tmp_path / "escape")
        with pytest.raises(OSError):
            reconstruct([sd.FileBackedData(1, 0, b"escape")], [fd], io.BytesIO().write)
    finally:
        os.close(fd)


def test_fd_layout_worked_example() -> None:
    from pycfs.host.varlink import layers

    seed = layers.seed_from_id("child-layer-001")
    assert seed == 9551015030439334514
    dir_count, real = layers.sparse_dir_slots(2, seed)
    assert dir_count == 5 and len(real) == 2 and real == sorted(real)
    assert layers.n_extra_lifetime_fds(seed) == 2
    assert [len(f) for f in layers.split_frames(list(range(9)), seed)] == [3, 2, 2, 2]
    frames = layers.split_frames(list(range(1000)), 0)
    assert len(frames) >= 5 and all(len(f) <= layers.MAX_FDS_PER_FRAME for f in frames)
    assert [fd for frame in frames for fd in frame] == list(range(1000))


def test_fd_layout_fds(tmp_path) -> None:
    from pycfs.host.varlink import layers

    r, w = os.pipe()
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    seed = layers.seed_from_id("oci-layer-sha256:" + "0" * 64)
    lay = layers.build_layout(r, [d], seed)
    try:
        assert lay.fds[0] == r and lay.fds[1 + lay.real_slots[0]] == d
        assert len(lay.fds) == 1 + lay.dir_count + 1 + layers.n_extra_lifetime_fds(seed)
        for slot in range(lay.dir_count):
            if slot not in lay.real_slots:  # dummies are never directories
                assert not os.path.isdir(f"/proc/self/fd/{lay.fds[1 + slot]}")
        keep_w = lay.fds[1 + lay.dir_count]
        os.close(keep_w)
        lay.fds[1 + lay.dir_count] = -1
        assert os.read(lay.keepalive_read, 1) == b""  # last write end gone: EOF
    finally:
        for fd in lay.fds + [lay.keepalive_read, w]:
            if fd >= 0:
                os.close(fd)


class _ListSpill:
    made: ClassVar[list[_ListSpill]] = []

    def __init__(self, length: int) -> None:
        self.length, self.data, self.closed = length, bytearray(), False
        _ListSpill.made.append(self)

    def write(self, data: memoryview) -> None:
        self.data += data

    def done(self) -> sd.InlineFile:
        return sd.InlineFile(len(_ListSpill.made) - 1, self.length)

    def close(self) -> None:
        self.closed = True


def test_a_decoder_with_a_spill_holds_no_long_chunk_whole() -> None:
    """A 3 MiB Metadata chunk comes out in pieces as it arrives, a 3 MiB InlineData goes to
    the spill as it arrives: the buffer holds at most a feed's worth (before: whole chunks,
    each held several times over)."""
    _ListSpill.made.clear()
    meta, content = os.urandom(3 << 20), os.urandom(3 << 20)
    stream = sd.encode_metadata(b"head") + sd.encode_metadata(meta) + sd.encode_inline_data(content) \
        + sd.encode_inline_data(b"small") + sd.encode_file_backed_data(0, 5, b"f")
    decoder = sd.Decoder(spill=_ListSpill)
    out = []
    for start in range(0, len(stream), 1 << 16):
        decoder.feed(stream[start : start + (1 << 16)])
        out += decoder.chunks()
        assert decoder.buffered <= 1 << 16
    decoder.eof()
    metas = [c for c in out if isinstance(c, sd.Metadata)]
    assert metas[0] == sd.Metadata(b"head") and b"".join(c.data for c in metas[1:]) == meta and len(metas) > 10
    (spilled,) = [c for c in out if isinstance(c, sd.InlineFile)]
    assert spilled == sd.InlineFile(0, 3 << 20) and bytes(_ListSpill.made[0].data) == content
    assert out[-2:] == [sd.InlineData(b"small"), sd.FileBackedData(5, 0, b"f")]
    # cut inside a long InlineData: Truncated, and close() gives its spill up
    decoder = sd.Decoder(spill=_ListSpill)
    decoder.feed(sd.encode_inline_data(content)[: 2 << 20])
    assert list(decoder.chunks()) == []
    with pytest.raises(sd.Truncated):
        decoder.eof()
    decoder.close()
    assert _ListSpill.made[-1].closed
