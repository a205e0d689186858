"""The frame structure of a zstd stream (RFC 8878, section 3.1), checked as it streams by.

A zstd stream is a sequence of frames. A zstd frame is

    Magic_Number (4, 0xFD2FB528) Frame_Header Data_Block... [Content_Checksum (4)]

with Frame_Header = Frame_Header_Descriptor (1) [Window_Descriptor (1)] [Dictionary_ID (0-4)]
[Frame_Content_Size (0-8)], and each Data_Block a 3-byte little-endian Block_Header
(bit 0 Last_Block, bits 1-2 Block_Type, bits 3-23 Block_Size) followed by Block_Size bytes
(Raw, Compressed) or one byte (RLE). A skippable frame is a Magic_Number 0x184D2A50-5F, a
4-byte little-endian Frame_Size and that many bytes of user data.

`ZstdFrameChecker` is fed the compressed bytes in chunks of any size and reads only these
headers (block contents are skipped by count), so that a reader can tell, at the end of
its input, whether the input ended on a frame boundary: a decompressor that streams
output in bounded pieces may otherwise end a cut stream silently. Decompressing, and the
checks of block contents and checksums, are left to the decompressor.

Its cost is per block header (~1 µs): real encoders write blocks of up to 128 KiB, but a
hostile blob of empty blocks, 3 bytes each, costs ~5 CPU-minutes per GiB (libzstd itself
~2 s). That stays in step with the blob's size, which its digest and the manifest fix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from pycfs.protocol.errors import PycfsError

ZSTD_MAGIC_NUMBER = 0xFD2FB528
SKIPPABLE_MAGIC_MIN = 0x184D2A50
SKIPPABLE_MAGIC_MAX = 0x184D2A5F

BLOCK_RAW = 0
BLOCK_RLE = 1
BLOCK_COMPRESSED = 2
BLOCK_RESERVED = 3

MAGIC = struct.Struct("<I")
SKIPPABLE_FRAME_SIZE = struct.Struct("<I")
CONTENT_CHECKSUM_SIZE = 4
BLOCK_HEADER_SIZE = 3

# Frame_Content_Size_Flag → field size (flag 0: 1 byte with Single_Segment_Flag, else none).
_FCS_FIELD_SIZE = (0, 2, 4, 8)
_DID_FIELD_SIZE = (0, 1, 2, 4)


class ZstdFrameError(PycfsError):
    """The bytes are not a sequence of zstd frames; the message names the offset."""


@dataclass(frozen=True)
class FrameHeaderDescriptor:
    """The first byte of a Frame_Header."""

    frame_content_size_flag: int
    single_segment_flag: bool
    reserved_bit: bool
    content_checksum_flag: bool
    dictionary_id_flag: int

    @classmethod
    def unpack(cls, byte: int) -> FrameHeaderDescriptor:
        return cls(byte >> 6, bool(byte & 0x20), bool(byte & 0x08), bool(byte & 0x04), byte & 0x03)

    def pack(self) -> int:
        return (self.frame_content_size_flag << 6 | self.single_segment_flag << 5 | self.reserved_bit << 3
                | self.content_checksum_flag << 2 | self.dictionary_id_flag)

    def fields_size(self) -> int:
        """Bytes of Frame_Header after this descriptor."""
        fcs = _FCS_FIELD_SIZE[self.frame_content_size_flag]
        if self.frame_content_size_flag == 0 and self.single_segment_flag:
            fcs = 1
        window = 0 if self.single_segment_flag else 1
        return window + _DID_FIELD_SIZE[self.dictionary_id_flag] + fcs


class BlockHeader(NamedTuple):
    """A tuple: one is made for every block, and a tuple is quicker to make than a dataclass."""

    last_block: bool
    block_type: int
    block_size: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> BlockHeader:
        value = int.from_bytes(data, "little")
        return cls(bool(value & 1), value >> 1 & 3, value >> 3)

    def pack(self) -> bytes:
        return (self.block_size << 3 | self.block_type << 1 | self.last_block).to_bytes(BLOCK_HEADER_SIZE, "little")

    def content_size(self) -> int:
        """Bytes of Block_Content that follow the header."""
        return 1 if self.block_type == BLOCK_RLE else self.block_size


# What the next header bytes are.
_MAGIC, _SKIPPABLE_SIZE, _DESCRIPTOR, _HEADER_FIELDS, _BLOCK_HEADER, _CHECKSUM = range(6)


class ZstdFrameChecker:
    """Follows the frame structure of a zstd stream fed in chunks of any size; `complete`
    says whether what was fed so far ends on a frame boundary."""

    def __init__(self) -> None:
        self.offset = 0  # bytes fed so far
        self._state = _MAGIC
        self._need = MAGIC.size  # header bytes the state wants
        self._header = bytearray()  # those gathered so far
        self._skip = 0  # content bytes to pass over before the next header
        self._checksum = False  # the frame being read ends with a Content_Checksum

    @property
    def complete(self) -> bool:
        return self._state == _MAGIC and not self._header and not self._skip

    def feed(self, data: bytes | memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                continue
            need = self._need
            header: bytes | memoryview
            if not self._header and end - pos >= need:  # the usual case: the header is whole here
                header = data[pos:pos + need]
                pos += need
            else:
                take = min(need - len(self._header), end - pos)
                self._header += data[pos:pos + take]
                pos += take
                if len(self._header) < need:
                    break
                header = bytes(self._header)
                self._header.clear()
            self._advance(header, self.offset + pos - need)
        self.offset += end

    def _advance(self, header: bytes | memoryview, at: int) -> None:
        """Act on the complete header that started at offset `at` (block headers first: they
        are most of the headers)."""
        state = self._state
        if state == _BLOCK_HEADER:
            block = BlockHeader.unpack(header)
            if block.block_type == BLOCK_RESERVED:
                raise ZstdFrameError(f"reserved block type at offset {at}")
            self._skip = block.content_size()
            if block.last_block:
                if self._checksum:
                    self._expect(_CHECKSUM, CONTENT_CHECKSUM_SIZE)
                else:
                    self._expect(_MAGIC, MAGIC.size)
        elif state == _MAGIC:
            (magic,) = MAGIC.unpack(header)
            if magic == ZSTD_MAGIC_NUMBER:
                self._expect(_DESCRIPTOR, 1)
            elif SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
                self._expect(_SKIPPABLE_SIZE, SKIPPABLE_FRAME_SIZE.size)
            else:
                raise ZstdFrameError(f"no zstd frame at offset {at} (magic number 0x{magic:08x})")
        elif state == _SKIPPABLE_SIZE:
            (self._skip,) = SKIPPABLE_FRAME_SIZE.unpack(header)
            self._expect(_MAGIC, MAGIC.size)
        elif state == _DESCRIPTOR:
            descriptor = FrameHeaderDescriptor.unpack(header[0])
            if descriptor.reserved_bit:
                raise ZstdFrameError(f"reserved bit set in the frame header at offset {at}")
            self._checksum = descriptor.content_checksum_flag
            if fields := descriptor.fields_size():
                self._expect(_HEADER_FIELDS, fields)
            else:
                self._expect(_BLOCK_HEADER, BLOCK_HEADER_SIZE)
        elif state == _HEADER_FIELDS:
            self._expect(_BLOCK_HEADER, BLOCK_HEADER_SIZE)
        else:  # _CHECKSUM
            self._expect(_MAGIC, MAGIC.size)

    def _expect(self, state: int, size: int) -> None:
        self._state, self._need = state, size
