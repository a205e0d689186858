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
alike; it checks structure only. Names must pass `validate_filename` before any open. Given
a `spill`, it holds no long chunk whole (see `Decoder`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

from pycfs.protocol.errors import PycfsError

METADATA = 0x00
INLINE_DATA = 0x01
FILE_BACKED_DATA = 0x02

MAX_INLINE_CHUNK_SIZE = 256 << 20
MAX_FILENAME_LEN = 4096
# A chunk longer than this is not held whole by a decoder given a `spill` (see Decoder).
LONG_CHUNK = 1 << 20

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


@dataclass(slots=True)
class InlineFile:
    """An InlineData chunk a decoder's `spill` took as it came: `fd` (the caller's now)
    holds its `length` bytes."""

    fd: int
    length: int


class Spill(Protocol):
    """Where a long InlineData chunk goes as it arrives: made with its length, written in
    order, then `done()` (its InlineFile) or `close()` (given up)."""

    def write(self, data: memoryview) -> None: ...
    def done(self) -> InlineFile: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class _Long:
    """A long chunk's header, read (its body comes in pieces)."""

    kind: int
    length: int


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
    `eof()` at end of input (Truncated unless it falls on a chunk boundary).

    With a ``spill``, a chunk longer than LONG_CHUNK is not held whole (one of 256 MiB cost
    five times its size: the buffer, two slices, the copy the consumer makes): a Metadata
    chunk comes out in pieces as its bytes arrive (the same bytes, cut elsewhere), an
    InlineData chunk (one file's content) goes to `spill(length)` as it arrives and comes
    out as its InlineFile once whole. `close()` gives up a spill still open."""

    def __init__(self, spill: Callable[[int], Spill] | None = None) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._spill = spill
        self._long_over = LONG_CHUNK if spill is not None else MAX_INLINE_CHUNK_SIZE
        # the long chunk being read: its kind, the bytes still to come, its spill
        self._long: tuple[int, int, Spill | None] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @staticmethod
    def _next(buf: bytearray, pos: int, end: int, long_over: int = MAX_INLINE_CHUNK_SIZE
              ) -> tuple[Chunk | _Long, int] | int:
        """The chunk at `pos` and the offset after it (a long one's header and the offset
        after that), or the size of the incomplete read."""
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
            if length > long_over:
                return _Long(kind, length), start
            if start + length > end:
                return length
            data = bytes(buf[start : start + length])
            return (Metadata(data) if kind == METADATA else InlineData(data)), start + length
        if kind < 0:
            return 1
        raise UnknownChunkType(kind)

    def chunks(self) -> Iterator[Chunk | InlineFile]:
        """The whole chunks fed so far (one pass over the buffer, the position kept at each);
        with a spill, pieces of long Metadata and the InlineFiles of long InlineData too."""
        next_chunk, long_over = self._next, self._long_over
        while True:
            if self._long is not None:
                if self._pos == len(self._buf):
                    return
                piece = self._long_piece()
                if piece is not None:
                    yield piece
                continue
            got = next_chunk(self._buf, self._pos, len(self._buf), long_over)
            if isinstance(got, int):
                return
            self._pos = got[1]
            chunk = got[0]
            if type(chunk) is _Long:
                assert self._spill is not None
                self._long = (chunk.kind, chunk.length, self._spill(chunk.length) if chunk.kind == INLINE_DATA else None)
                continue
            yield chunk  # type: ignore[misc]

    def _long_piece(self) -> Metadata | InlineFile | None:
        """What the buffer holds of the long chunk being read: a Metadata piece, or (written
        to its spill) nothing until the InlineData is whole."""
        assert self._long is not None
        kind, remaining, spill = self._long
        take = min(len(self._buf) - self._pos, remaining)
        with memoryview(self._buf)[self._pos : self._pos + take] as view:
            out: Metadata | InlineFile | None = Metadata(bytes(view)) if spill is None else None
            if spill is not None:
                spill.write(view)
        self._pos += take
        remaining -= take
        self._long = (kind, remaining, spill) if remaining else None
        if not remaining and spill is not None:
            out = spill.done()
        return out

    def eof(self) -> None:
        if self._long is not None:
            raise Truncated(self._long[1])
        got = self._next(self._buf, self._pos, len(self._buf))
        if isinstance(got, int) and len(self._buf) > self._pos:
            raise Truncated(got)

    def close(self) -> None:
        """Give up a long InlineData still being read (its spill closed)."""
        if self._long is not None and self._long[2] is not None:
            self._long[2].close()
        self._long = None

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
        yield from cast(Iterator[Chunk], decoder.chunks())  # (no spill: whole chunks)


def decode(data: bytes) -> list[Chunk]:
    """Every chunk of a complete stream held in memory."""
    decoder = Decoder()
    decoder.feed(data)
    out = cast(list[Chunk], list(decoder.chunks()))  # (no spill: whole chunks)
    decoder.eof()
    return out
