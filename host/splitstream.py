"""Splitstream codec, the current composefs-rs file format (spec section 2).

File layout written: header(32) | info(80) | stream_refs | object_refs | named_refs (zstd)
| body (zstd). The body is a sequence of chunks: an i64 `n`; n < 0 means -n inline bytes
follow, n >= 0 is an index into object_refs whose object's bytes are inserted.

Byte-identity with composefs-rs matters (the file is an object named by its digest), so
the zstd sections are written in streaming "continue" mode at level 3 without a content
size, exactly as the Rust writer does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import DIGEST_SIZES, HASH_ALG_IDS
from pycfs.protocol.zstdframes import ZstdFrameChecker, ZstdFrameError

MAGIC = b"SplitStream"
LG_BLOCKSIZE = 12

# header: magic[11], version u8, flags u16, algorithm u8, lg_blocksize u8, info FileRange
HEADER = struct.Struct("<11sBHBB16s")
# the header of bootc <= 1.15 (compiler-reordered fields): info, flags, magic, version, algorithm, lg_blocksize
OLD_HEADER = struct.Struct("<16sH11sBBB")
FILE_RANGE = struct.Struct("<QQ")
# info: stream_refs, object_refs, stream, named_refs (FileRanges), content_type u64, stream_size u64
INFO = struct.Struct("<16s16s16s16sQQ")
CHUNK = struct.Struct("<q")
# The most one decompressing read yields: a zstd frame may expand ~30000-fold, so a
# read is bounded by what it gives, not by what it takes.
_OUTPUT_PIECE = 1 << 20
# The named-refs text is read whole; real ones are a few KiB (a name per layer and image).
NAMED_REFS_MAX = 16 << 20

HEADER_SIZE = HEADER.size  # 32
INFO_SIZE = INFO.size  # 80


def _magic(text: bytes) -> int:
    return int.from_bytes(text, "little")


# A named ref whose name is this, or starts with it and a dot, names an EROFS image
# (`composefs.image`, `composefs.image.v1`); every other named ref names a stream.
IMAGE_REF_PREFIX = "composefs.image"


def names_image(ref_name: str) -> bool:
    return ref_name == IMAGE_REF_PREFIX or ref_name.startswith(IMAGE_REF_PREFIX + ".")


CONTENT_OCI_LAYER = _magic(b"ocilayer")
CONTENT_OCI_CONFIG = _magic(b"ociconfg")
CONTENT_OCI_MANIFEST = _magic(b"ocimanif")
CONTENT_OCI_BLOB = _magic(b"oci_blob")
CONTENT_OSTREE_COMMIT = 0xAFE138C18C463EF1
CONTENT_OSTREE_SUMMARY = _magic(b"osummary")


class SplitStreamError(PycfsError, ValueError):
    """A splitstream file is malformed; the message says where."""


class StreamTooLarge(SplitStreamError):
    """A layer stream would hold more in memory than any real layer (see MAX_LAYER_INLINE_RUN)."""


# What a layer stream holds in memory until it is written: the inline bytes since the last
# file (one chunk, whose length comes first) and the compressed body. A real layer's are
# megabytes (tar headers and files of up to 64 bytes, ~100 bytes a file compressed); a
# hostile or broken source could send gigabytes (a PutLayer of 1 GiB of inline bytes took
# 1.1 GB). Past these, the layer is refused.
MAX_LAYER_INLINE_RUN = 128 << 20
MAX_LAYER_BODY = 256 << 20


def _zstd_section(parts: list[bytes]) -> bytes:
    """Compress like the Rust `zstd::stream::write::Encoder` at default level (see module doc)."""
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    out = [comp.compress(p) for p in parts if p]
    out.append(comp.flush())
    return b"".join(out)


_COMPRESS_BATCH = 256 << 10


class SplitStreamWriter:
    """Builds a splitstream in memory; finish() returns the file's bytes.

    Inline data is buffered so that adjacent inline bytes form one chunk (the writer
    determinism rule), and the body is compressed as it goes so memory stays bounded
    by the compressed size.
    """

    def __init__(self, alg: str, content_type: int, name: str = "") -> None:
        self.alg = alg
        self._named_as = f"{name}: " if name else ""  # what a refusal names (e.g. "layer sha256:...")
        self.content_type = content_type
        self._digest_size = DIGEST_SIZES[alg]
        self._inline = bytearray()
        self._object_index: dict[bytes, int] = {}
        self._object_refs: list[bytes] = []
        self._stream_index: dict[bytes, int] = {}
        self._stream_refs: list[bytes] = []
        self._named: dict[str, int] = {}
        self._compressor = zstandard.ZstdCompressor(level=3).compressobj()
        self._body: list[bytes] = []
        self._body_size = 0
        layer = content_type == CONTENT_OCI_LAYER
        self._max_run: float = MAX_LAYER_INLINE_RUN if layer else math.inf
        self._max_body: float = MAX_LAYER_BODY if layer else math.inf
        self._pending = bytearray()
        self._body_started = False
        self._finished = False
        self.stream_size = 0

    def _emit(self, data: bytes | bytearray) -> None:
        # Collected before compressing: one compress() per 8-byte external ref cost more
        # than the compression itself (zstd's output does not depend on how input is fed).
        self._body_started = True
        self._pending += data
        if len(self._pending) >= _COMPRESS_BATCH:
            self._compress_pending()

    def _compress_pending(self) -> None:
        piece = self._compressor.compress(bytes(self._pending))
        self._pending.clear()
        if piece:
            self._body.append(piece)
            self._body_size += len(piece)
            if self._body_size > self._max_body:
                raise StreamTooLarge(f"{self._named_as}the layer's tar headers and small files come to more than "
                                     f"{MAX_LAYER_BODY >> 20} MiB compressed: more than a real layer holds")

    def _flush_inline(self) -> None:
        if self._inline:
            self._emit(CHUNK.pack(-len(self._inline)))
            self._emit(self._inline)
            self._inline.clear()

    def write_inline(self, data: bytes | bytearray | memoryview) -> None:
        self._inline += data
        self.stream_size += len(data)
        if len(self._inline) > self._max_run:
            raise StreamTooLarge(f"{self._named_as}more than {MAX_LAYER_INLINE_RUN >> 20} MiB of tar headers and "
                                 "small files with no larger file between them: more than a real layer holds")

    def write_external(self, object_id: bytes, size: int) -> None:
        if len(object_id) != self._digest_size:
            raise ValueError(f"object id of {len(object_id)} bytes for {self.alg}")
        self._flush_inline()
        self._emit(CHUNK.pack(self.add_object_ref(object_id)))
        self.stream_size += size

    def add_object_ref(self, object_id: bytes) -> int:
        """List an object in object_refs (its index; once per object) without a chunk: for
        formats that address objects from inside their inline data (ostree commits)."""
        index = self._object_index.get(object_id)
        if index is None:
            index = self._object_index[object_id] = len(self._object_refs)
            self._object_refs.append(object_id)
        return index

    def add_named_ref(self, name: str, object_id: bytes) -> None:
        if "\0" in name:
            raise ValueError("named ref contains NUL")
        index = self._stream_index.get(object_id)
        if index is None:
            index = self._stream_index[object_id] = len(self._stream_refs)
            self._stream_refs.append(object_id)
        self._named[name] = index

    def finish(self) -> bytes:
        """The stream file's bytes, joined once from the pieces kept (a big layer's body and
        object refs are megabytes: joined first, each would be copied twice). Once: the
        writer lets go of its pieces and object index then, for what the caller still does
        while it holds the writer (a pull commits its last layer and merges it meanwhile)."""
        if self._finished:
            raise ValueError("SplitStreamWriter.finish() called twice")
        self._flush_inline()
        self._compress_pending()
        body = [*self._body, self._compressor.flush()] if self._body_started else [_zstd_section([])]
        body_len = sum(map(len, body))
        names = sorted(self._named.items(), key=lambda kv: kv[0].encode())
        named = _zstd_section([f"{index}:{name}\0".encode() for name, index in names])
        stream_refs = b"".join(self._stream_refs)
        start = HEADER_SIZE + INFO_SIZE
        sr = (start, start + len(stream_refs))
        orf = (sr[1], sr[1] + sum(map(len, self._object_refs)))
        nr = (orf[1], orf[1] + len(named))
        body_range = (nr[1], nr[1] + body_len)
        info = INFO.pack(
            FILE_RANGE.pack(*sr),
            FILE_RANGE.pack(*orf),
            FILE_RANGE.pack(*body_range),
            FILE_RANGE.pack(*nr),
            self.content_type,
            self.stream_size,
        )
        header = HEADER.pack(MAGIC, 0, 0, HASH_ALG_IDS[self.alg], LG_BLOCKSIZE, FILE_RANGE.pack(HEADER_SIZE, start))
        data = b"".join((header, info, stream_refs, *self._object_refs, named, *body))
        del body
        self._body, self._object_refs, self._object_index, self._finished = [], [], {}, True
        return data


@dataclass(frozen=True)
class _Range:
    start: int
    end: int


class _CheckedSection:
    """A compressed section as the decompressor reads it, each read fed to a frame checker."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.checker = ZstdFrameChecker()

    def read(self, n: int) -> bytes:
        piece, self._view = self._view[:n], self._view[n:]
        self.checker.feed(piece)
        return bytes(piece)


class SplitStreamReader:
    """Strict reader: every malformed input raises SplitStreamError with the reason.

    Memory stays bounded by what the stream declares: each decompressing read yields at
    most _OUTPUT_PIECE bytes, the named refs at most NAMED_REFS_MAX, and the inline chunks
    together no more than the stream's declared `stream_size`.
    """

    def __init__(self, data: bytes, alg: str, expected_content_type: int | None = None, *,
                 name: str | None = None) -> None:
        """`name` (the stream's name or object id) is prefixed to every error's message."""
        self._data = data
        self.alg = alg
        self.name = name
        try:
            self._parse(expected_content_type)
        except SplitStreamError as e:
            raise self._named(e) from None

    def _named(self, e: SplitStreamError) -> SplitStreamError:
        return e if self.name is None else SplitStreamError(f"splitstream {self.name}: {e}")

    def _parse(self, expected_content_type: int | None) -> None:
        data = self._data
        alg = self.alg
        d = DIGEST_SIZES[alg]
        if len(data) < HEADER_SIZE:
            raise SplitStreamError(f"file of {len(data)} bytes is shorter than the 32-byte header")
        magic, version, _flags, algorithm, lg_blocksize, info_raw = HEADER.unpack_from(data)
        if magic != MAGIC:
            info_raw, _flags, magic, version, algorithm, lg_blocksize = OLD_HEADER.unpack_from(data)
            if magic != MAGIC:
                raise SplitStreamError("bad magic: not a splitstream")
        if version != 0:
            raise SplitStreamError(f"unsupported splitstream version {version}")
        if algorithm != HASH_ALG_IDS[alg]:
            raise SplitStreamError(f"hash algorithm {algorithm} does not match the repository's {alg}")
        if lg_blocksize != LG_BLOCKSIZE:
            raise SplitStreamError(f"unsupported block size 2^{lg_blocksize}")
        info = self._range(info_raw, "info")
        if info.end - info.start < INFO_SIZE:
            raise SplitStreamError(f"info section of {info.end - info.start} bytes, need {INFO_SIZE}")
        sr, orf, body, nr, self.content_type, self.stream_size = INFO.unpack_from(data, info.start)
        if expected_content_type is not None and self.content_type != expected_content_type:
            raise SplitStreamError(
                f"content type {self.content_type:#x}, expected {expected_content_type:#x}"
            )
        self.stream_refs = self._id_array(self._range(sr, "stream_refs"), d, "stream_refs")
        self.object_refs = self._id_array(self._range(orf, "object_refs"), d, "object_refs")
        self._body = self._range(body, "stream")
        self.named_refs = self._parse_named(self._read_named(self._range(nr, "named_refs")))

    def _range(self, raw: bytes, what: str) -> _Range:
        start, end = FILE_RANGE.unpack(raw)
        if end < start:
            raise SplitStreamError(f"{what} range ends ({end}) before it starts ({start})")
        if end > len(self._data):
            raise SplitStreamError(f"{what} range {start}..{end} is beyond the end of the file ({len(self._data)})")
        return _Range(start, end)

    def _id_array(self, r: _Range, d: int, what: str) -> list[bytes]:
        length = r.end - r.start
        if length % d:
            raise SplitStreamError(f"{what} length {length} is not a multiple of the digest size {d}")
        return [self._data[i : i + d] for i in range(r.start, r.end, d)]

    def _read_named(self, r: _Range) -> bytes:
        out = bytearray()
        try:
            for piece in self._decompress_iter(r):
                out += piece
                if len(out) > NAMED_REFS_MAX:
                    raise SplitStreamError(f"named refs: more than {NAMED_REFS_MAX} bytes")
        except (zstandard.ZstdError, ZstdFrameError) as e:
            raise SplitStreamError(f"named_refs: corrupt zstd data: {e}") from None
        return bytes(out)

    def _decompress_iter(self, r: _Range) -> Iterator[bytes]:
        """Decompress a section piecewise, at most _OUTPUT_PIECE bytes a piece; several frames
        may follow each other. The decompressor ends a frame cut short silently: the frame
        checker, fed the same bytes, makes that an error."""
        source = _CheckedSection(memoryview(self._data)[r.start : r.end])
        reader = zstandard.ZstdDecompressor().stream_reader(
            source, read_size=1 << 16, read_across_frames=True)  # type: ignore[arg-type]  # (it calls read() only)
        while out := reader.read(_OUTPUT_PIECE):
            yield out
        if not source.checker.complete:
            raise zstandard.ZstdError("truncated zstd frame")

    def _parse_named(self, text: bytes) -> dict[str, bytes]:
        named: dict[str, bytes] = {}
        if text and not text.endswith(b"\0"):
            raise SplitStreamError("named refs: last record is not NUL-terminated")
        for record in text.split(b"\0")[:-1]:
            try:
                s = record.decode()
            except UnicodeDecodeError:
                raise SplitStreamError(f"named refs: record {record[:40]!r} is not UTF-8") from None
            index, sep, name = s.partition(":")
            if not sep or not index.isdigit() or not index.isascii() or len(index) > 20:  # (int() of 4300+ digits raises)
                raise SplitStreamError(f"named refs: malformed record {s[:80]!r}")
            if int(index) >= len(self.stream_refs):
                raise SplitStreamError(f"named refs: index {index} out of range ({len(self.stream_refs)} stream refs)")
            named[name] = self.stream_refs[int(index)]
        return named

    def chunks(self) -> Iterator[bytes | int]:
        """Yield inline bytes or object_refs indices, in stream order, decompressing lazily.
        An inline chunk of over _OUTPUT_PIECE bytes comes in pieces (of at most that), so what
        is held stays bounded whatever length a chunk declares."""
        buf = bytearray()
        pos = 0
        rest = 0  # bytes still to come of an inline chunk yielded in pieces
        inline_left = self.stream_size  # inline bytes are part of the declared stream_size
        try:
            for piece in self._decompress_iter(self._body):
                buf += piece
                while True:
                    if rest:
                        take = min(rest, len(buf) - pos)
                        if not take:
                            break
                        yield bytes(buf[pos : pos + take])
                        pos += take
                        rest -= take
                        continue
                    if len(buf) - pos < CHUNK.size:
                        break
                    (n,) = CHUNK.unpack_from(buf, pos)
                    if n >= 0:
                        if n >= len(self.object_refs):
                            raise SplitStreamError(
                                f"body: object index {n} out of range ({len(self.object_refs)} object refs)"
                            )
                        pos += CHUNK.size
                        yield n
                        continue
                    if -n > inline_left:
                        raise SplitStreamError(f"body: an inline chunk of {-n} bytes where the declared stream "
                                               f"size ({self.stream_size}) leaves {inline_left}")
                    if -n > _OUTPUT_PIECE:
                        inline_left += n
                        pos += CHUNK.size
                        rest = -n
                        continue
                    if len(buf) - pos - CHUNK.size < -n:
                        break
                    inline_left += n
                    start = pos + CHUNK.size
                    pos = start - n
                    yield bytes(buf[start:pos])
                del buf[:pos]
                pos = 0
            if buf or rest:
                raise SplitStreamError(f"body: truncated chunk ({len(buf) or rest} bytes "
                                       f"{'left over' if buf else 'missing'})")
        except (zstandard.ZstdError, ZstdFrameError) as e:
            raise self._named(SplitStreamError(f"body: corrupt zstd data: {e}")) from None
        except SplitStreamError as e:
            raise self._named(e) from None
