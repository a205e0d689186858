"""splitdirfdstream: a byte stream told as inline chunks and references to whole files.

A stream is a plain concatenation of chunks (no header, no terminator; all integers
little-endian); it ends with a clean EOF where the next chunk's type byte would start:

    0x00 Metadata        u32 length, then length bytes       -> those bytes
    0x01 InlineData      u32 length, then length bytes       -> those bytes (file content)
    0x02 FileBackedData  u64 content_length, u32 dirfd_index, u32 name_len, then the name
                         -> the first content_length bytes of `name` under dirfds[dirfd_index]

The format carries no fds: the consumer gets an ordered array of directory fds out of band
(varlink SCM_RIGHTS) and the stream names them by index. Nothing in the stream protects its
integrity, so consumers verify the reconstructed bytes themselves (an OCI diff_id).

The reader is a push decoder (feed bytes, take chunks), usable from blocking and async code
alike; it checks structure only. Names must pass `validate_filename` before any open.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pycfs.protocol.errors import PycfsError

METADATA = 0x00
INLINE_DATA = 0x01
FILE_BACKED_DATA = 0x02

MAX_INLINE_CHUNK_SIZE = 256 << 20
MAX_FILENAME_LEN = 4096

INLINE_HEADER = struct.Struct("<BI")  # type, length
FILE_HEADER = struct.Struct("<BQII")  # type, content_length, dirfd_index, name_len
_U32 = struct.Struct("<I")


class SplitDirFdStreamError(PycfsError):
    """A malformed stream or an unusable reference; the message says which."""


class Truncated(SplitDirFdStreamError):
    def __init__(self, expected: int) -> None:
        super().__init__(f"splitdirfdstream truncated: EOF inside a chunk (a read of {expected} bytes)")
        self.expected = expected


class InlineTooLarge(SplitDirFdStreamError):
    def __init__(self, size: int, max: int = MAX_INLINE_CHUNK_SIZE) -> None:
        super().__init__(f"splitdirfdstream inline chunk of {size} bytes exceeds the limit of {max}")
        self.size, self.max = size, max


class UnknownChunkType(SplitDirFdStreamError):
    def __init__(self, type_byte: int) -> None:
        super().__init__(f"splitdirfdstream: unknown chunk type {type_byte:#04x}")
        self.type_byte = type_byte


class FilenameTooLong(SplitDirFdStreamError):
    def __init__(self, length: int, max: int = MAX_FILENAME_LEN) -> None:
        super().__init__(f"splitdirfdstream file name of {length} bytes exceeds the limit of {max}")
        self.length, self.max = length, max


class InvalidFilename(SplitDirFdStreamError):
    def __init__(self, reason: str, name: bytes = b"") -> None:
        super().__init__(f"splitdirfdstream: invalid file name {name[:80]!r}: {reason}")
        self.reason = reason


class DirfdIndexOutOfRange(SplitDirFdStreamError):
    def __init__(self, index: int, count: int) -> None:
        super().__init__(f"splitdirfdstream: dirfd index {index} out of range ({count} directory fds)")
        self.index, self.count = index, count


class ExternalTooShort(SplitDirFdStreamError):
    def __init__(self, declared: int, actual: int) -> None:
        super().__init__(f"splitdirfdstream: referenced file has {actual} bytes, the stream declared {declared}")
        self.declared, self.actual = declared, actual


# Plain slotted classes: a stream has a chunk or two per file, and frozen dataclasses cost
# three times as much to make.
@dataclass(slots=True)
class Metadata:
    data: bytes


@dataclass(slots=True)
class InlineData:
    data: bytes


@dataclass(slots=True)
class FileBackedData:
    length: int
    dirfd_index: int
    name: bytes


Chunk = Metadata | InlineData | FileBackedData


def validate_filename(name: bytes) -> None:
    """The checks every referenced name passes before an open, in the format's order."""
    if b".." not in name and b"\0" not in name and 0 < len(name) <= MAX_FILENAME_LEN and name[0] != 0x2F:
        return  # the usual name (a file of every stream passes here): no list of its components
    if not name:
        raise InvalidFilename("empty filename", name)
    if len(name) > MAX_FILENAME_LEN:
        raise FilenameTooLong(len(name))
    if b"\0" in name:
        raise InvalidFilename("embedded NUL", name)
    if name.startswith(b"/"):
        raise InvalidFilename("absolute path", name)
    if b".." in name.split(b"/"):
        raise InvalidFilename("`..` component", name)


# ---------------------------------------------------------------------------- writer


def encode_metadata(data: bytes) -> bytes:
    """A Metadata chunk; empty data encodes to nothing (a reader still accepts an empty one)."""
    if len(data) > MAX_INLINE_CHUNK_SIZE:
        raise InlineTooLarge(len(data))
    return INLINE_HEADER.pack(METADATA, len(data)) + bytes(data) if data else b""


def encode_inline_data(data: bytes) -> bytes:
    """An InlineData chunk; written even when empty (a 0-byte file must round-trip)."""
    if len(data) > MAX_INLINE_CHUNK_SIZE:
        raise InlineTooLarge(len(data))
    return INLINE_HEADER.pack(INLINE_DATA, len(data)) + bytes(data)


def encode_file_backed_data(dirfd_index: int, length: int, name: bytes) -> bytes:
    validate_filename(name)
    return FILE_HEADER.pack(FILE_BACKED_DATA, length, dirfd_index, len(name)) + name


def encode_chunk(chunk: Chunk) -> bytes:
    if isinstance(chunk, Metadata):
        return encode_metadata(chunk.data)
    if isinstance(chunk, InlineData):
        return encode_inline_data(chunk.data)
    return encode_file_backed_data(chunk.dirfd_index, chunk.length, chunk.name)


class Writer:
    """Chunks to a `write(bytes)` sink; `finish()` appends nothing (EOF ends the stream)."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write

    def write_metadata(self, data: bytes) -> None:
        if data:
            self._write(encode_metadata(data))

    def write_inline_data(self, data: bytes) -> None:
        self._write(encode_inline_data(data))

    def write_file_backed_data(self, dirfd_index: int, length: int, name: bytes) -> None:
        self._write(encode_file_backed_data(dirfd_index, length, name))


# ---------------------------------------------------------------------------- reader


class Decoder:
    """Push decoder: `feed()` bytes as they arrive, take whole chunks from `chunks()`, call
    `eof()` at end of input (Truncated unless it falls on a chunk boundary)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @staticmethod
    def _next(buf: bytearray, pos: int, end: int) -> tuple[Chunk, int] | int:
        """The chunk at `pos` and the offset after it, or the size of the incomplete read."""
        kind = buf[pos] if pos < end else -1
        if kind == FILE_BACKED_DATA:
            start = pos + FILE_HEADER.size
            if start > end:
                return 16
            _, length, index, name_len = FILE_HEADER.unpack_from(buf, pos)
            if name_len > MAX_FILENAME_LEN:
                raise FilenameTooLong(name_len)
            if start + name_len > end:
                return name_len
            return FileBackedData(length, index, bytes(buf[start : start + name_len])), start + name_len
        if kind in (METADATA, INLINE_DATA):
            start = pos + INLINE_HEADER.size
            if start > end:
                return 4
            (length,) = _U32.unpack_from(buf, pos + 1)
            if length > MAX_INLINE_CHUNK_SIZE:
                raise InlineTooLarge(length)
            if start + length > end:
                return length
            data = bytes(buf[start : start + length])
            return (Metadata(data) if kind == METADATA else InlineData(data)), start + length
        if kind < 0:
            return 1
        raise UnknownChunkType(kind)

    def chunks(self) -> Iterator[Chunk]:
        """The whole chunks fed so far (one pass over the buffer, the position kept at each)."""
        next_chunk = self._next
        while True:
            got = next_chunk(self._buf, self._pos, len(self._buf))
            if isinstance(got, int):
                return
            self._pos = got[1]
            yield got[0]

    def eof(self) -> None:
        got = self._next(self._buf, self._pos, len(self._buf))
        if isinstance(got, int) and len(self._buf) > self._pos:
            raise Truncated(got)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos


def read_chunks(read: Callable[[int], bytes], bufsize: int = 1 << 16) -> Iterator[Chunk]:
    """Chunks from a blocking `read(n)` source (b"" at EOF)."""
    decoder = Decoder()
    while True:
        data = read(bufsize)
        if not data:
            decoder.eof()
            return
        decoder.feed(data)
        yield from decoder.chunks()


def decode(data: bytes) -> list[Chunk]:
    """Every chunk of a complete stream held in memory."""
    decoder = Decoder()
    decoder.feed(data)
    out = list(decoder.chunks())
    decoder.eof()
    return out
