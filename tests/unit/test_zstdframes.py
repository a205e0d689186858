"""The zstd frame checker (protocol/zstdframes.py) against frames made by python-zstandard
(libzstd), the independent writer: complete exactly at frame boundaries, whatever the chunks."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pycfs.protocol.zstdframes import (
    BLOCK_COMPRESSED,
    BLOCK_RAW,
    BLOCK_RESERVED,
    BLOCK_RLE,
    BlockHeader,
    FrameHeaderDescriptor,
    ZstdFrameChecker,
    ZstdFrameError,
)


def _skippable(magic_low: int, payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50 | magic_low, len(payload)) + payload


# One frame: its data, and how it is written (checksum, content size, level), or a skippable frame.
_frame = st.one_of(
    st.tuples(st.just("zstd"), st.binary(max_size=40_000) | st.builds(bytes, st.integers(0, 300_000)),
              st.booleans(), st.booleans(), st.sampled_from([-5, 1, 3])),
    st.tuples(st.just("skip"), st.integers(0, 15), st.binary(max_size=300)),
)


def _encode(frame: tuple) -> bytes:
    if frame[0] == "skip":
        return _skippable(frame[1], frame[2])
    _, data, checksum, content_size, level = frame
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=content_size)
    if content_size:
        return cctx.compress(data)
    # compressobj does not know the size up front: a frame without Frame_Content_Size
    c = cctx.compressobj()
    return c.compress(data) + c.flush()


def _feed(checker: ZstdFrameChecker, data: bytes, chunks: list[int]) -> None:
    pos, i = 0, 0
    while pos < len(data):
        n = chunks[i % len(chunks)]
        checker.feed(memoryview(data)[pos:pos + n] if i % 2 else data[pos:pos + n])
        pos, i = pos + n, i + 1


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(_frame, max_size=5), chunks=st.lists(st.integers(1, 70_000), min_size=1, max_size=6))
def test_frames_fed_in_any_chunks_are_complete_and_read_by_libzstd(frames: list[tuple], chunks: list[int]) -> None:
    """Frames with and without checksum and content size, skippable frames between them: the
    checker is complete at the end and at every frame boundary, and libzstd reads the same
    stream back to the frames' data (so the checker followed real frames)."""
    parts = [_encode(f) for f in frames]
    blob = b"".join(parts)
    checker = ZstdFrameChecker()
    for part in parts:
        assert checker.complete
        _feed(checker, part, chunks)
    assert checker.complete and checker.offset == len(blob)
    expected = b"".join(f[1] for f in frames if f[0] == "zstd")
    assert zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read() == expected


@settings(max_examples=25, deadline=None)
@given(frames=st.lists(_frame, min_size=1, max_size=3), chunk=st.integers(1, 5000))
def test_every_truncation_point_is_incomplete(frames: list[tuple], chunk: int) -> None:
    """Cut anywhere inside any frame (header, block header, block content, checksum,
    skippable payload): not complete."""
    parts = [_encode(f) for f in frames]
    blob = b"".join(parts)
    boundaries = {sum(map(len, parts[:i])) for i in range(len(parts) + 1)}
    for cut in range(len(blob) + 1):
        checker = ZstdFrameChecker()
        _feed(checker, blob[:cut], [chunk])
        assert checker.complete == (cut in boundaries), cut


def test_a_byte_at_a_time_of_a_large_frame() -> None:
    """A frame of many blocks (raw, RLE and compressed), fed one byte at a time."""
    data = bytes(300_000) + bytes(range(256)) * 2000 + b"x" * 200_000
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    checker = ZstdFrameChecker()
    for i in range(len(blob)):
        checker.feed(blob[i:i + 1])
        assert checker.complete == (i == len(blob) - 1)


@pytest.mark.parametrize("garbage", [b"\0\0\0\0", b"PK\3\4", struct.pack("<I", 0x184D2A60)])
def test_what_is_not_a_frame_is_an_error_naming_its_offset(garbage: bytes) -> None:
    frame = zstandard.ZstdCompressor().compress(b"hello" * 100)
    checker = ZstdFrameChecker()
    with pytest.raises(ZstdFrameError, match=f"no zstd frame at offset {len(frame)} "):
        checker.feed(frame + garbage)


def _first_block_at(frame: bytes | bytearray) -> int:
    """After the magic number, the descriptor and the header fields it announces."""
    return 5 + FrameHeaderDescriptor.unpack(frame[4]).fields_size()


def test_a_reserved_block_type_is_an_error_naming_its_offset() -> None:
    frame = bytearray(zstandard.ZstdCompressor().compress(b"hello" * 100))
    at = _first_block_at(frame)
    block = BlockHeader.unpack(bytes(frame[at:at + 3]))
    frame[at:at + 3] = BlockHeader(block.last_block, BLOCK_RESERVED, block.block_size).pack()
    with pytest.raises(ZstdFrameError, match=f"reserved block type at offset {at}$"):
        ZstdFrameChecker().feed(frame)


def test_the_reserved_bit_of_the_frame_header_is_an_error() -> None:
    frame = bytearray(zstandard.ZstdCompressor().compress(b"hello"))
    frame[4] |= 0x08
    with pytest.raises(ZstdFrameError, match="reserved bit set in the frame header at offset 4$"):
        ZstdFrameChecker().feed(frame)


@given(byte=st.integers(0, 255))
def test_frame_header_descriptor_round_trip(byte: int) -> None:
    """Every field kept but the Unused_Bit (bit 4), which carries nothing."""
    assert FrameHeaderDescriptor.unpack(byte).pack() == byte & ~0x10


@given(last=st.booleans(), kind=st.integers(0, 3), size=st.integers(0, (1 << 21) - 1))
def test_block_header_round_trip(last: bool, kind: int, size: int) -> None:
    header = BlockHeader(last, kind, size)
    packed = header.pack()
    assert len(packed) == 3 and BlockHeader.unpack(packed) == header
    assert header.content_size() == (1 if kind == 1 else size)


def test_block_headers_as_libzstd_writes_them() -> None:
    """Incompressible data makes raw blocks of 128 KiB, then a compressed block, then runs of
    zeros RLE blocks of their size; the last block ends the frame (no checksum here)."""
    data = os.urandom(300_000) + bytes(300_000)
    frame = zstandard.ZstdCompressor(write_checksum=False).compress(data)
    at, blocks = _first_block_at(frame), list[BlockHeader]()
    while not (blocks and blocks[-1].last_block):
        blocks.append(BlockHeader.unpack(frame[at:at + 3]))
        at += 3 + blocks[-1].content_size()
    assert at == len(frame)
    assert [(b.block_type, b.block_size) for b in blocks[:2]] == [(BLOCK_RAW, 128 << 10)] * 2
    assert {b.block_type for b in blocks} == {BLOCK_RAW, BLOCK_COMPRESSED, BLOCK_RLE}
    assert 0 < sum(b.block_size for b in blocks if b.block_type == BLOCK_RLE) <= 300_000
