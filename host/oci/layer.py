"""Tar layers ↔ layer splitstreams (spec 3.2 and 3.6).

Splitting: the tar byte stream is cut only around the content of regular-file entries
whose effective size exceeds 64 bytes; those bytes are streamed into a new object, every
other byte (headers, extension records, small or non-regular content, padding, the end
marker and whatever follows it) is inline. The cut points are a format constant: they
decide every object id, so they must match composefs-rs exactly.

Reading back: `iter_layer_entries` walks a stored layer stream entry by entry without
touching the objects (their ids and sizes are in the stream), for building images.

Also here: opening a layer blob as a tar stream (plain, gzip or zstd), strictly, so a
truncated or corrupt compressed layer is an error and never a short tar.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import zstandard

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import VerityHasher, digest_bytes
from pycfs.host.oci.tar import (
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    DIRTYPE,
    FIFOTYPE,
    LNKTYPE,
    REGULAR_TYPES,
    SYMTYPE,
    TarEnd,
    TarEntry,
    TarError,
    TarReader,
)
from pycfs.host.oci.result import ImportStats
from pycfs.host.oci.streams import parse_digest
from pycfs.host.repository import Repository
from pycfs.protocol.text import shown
from pycfs.protocol.zstdframes import ZstdFrameChecker, ZstdFrameError
from pycfs.host.splitstream import CONTENT_OCI_LAYER, SplitStreamReader, SplitStreamWriter
from pycfs.host.tree import BlockDevice, CharDevice, External, Fifo, Inline, LeafContent, SharedStats, Stat, Symlink

# Format constant (INLINE_CONTENT_MAX_V0): regular files up to this size stay inline.
INLINE_CONTENT_MAX = 64
_PIECE = 1 << 20
# What may follow a tar's end marker (kept inline, for the diff_id): tar pads to its
# record size, 10 KiB by default; an endless tail (say, a decompression bomb of zeros) is refused.
MAX_TRAILING = 16 << 20
# Content a non-file entry (directory, link, device, fifo, unknown type) or a GNU sparse
# file may declare: it stays inline, so the splitter holds it in memory. GNU tar and Go's
# archive/tar write size 0 for directories, links, devices and fifos; a sparse file's map
# and data segments are refused at image build anyway.
MAX_INLINE_ENTRY_CONTENT = 64 << 10

# Entries (files, directories, links, whiteouts) of an image's layers together, a layer
# listed twice counted twice: each is kept (~170 B parsed, more in the tree) until the image
# is written; 200,000 files take under 200 MB, so this bounds a pull near 1 GB whatever
# a few KB of compressed headers declare.
MAX_IMAGE_ENTRIES = 1_000_000


# Linux's limits (linux/limits.h, linux/xattr.h): a name component NAME_MAX bytes, a path
# PATH_MAX with its NUL (symlink(2) takes a target of PATH_MAX - 1 bytes at most), an xattr
# name XATTR_NAME_MAX, a value XATTR_SIZE_MAX. An entry past them could not be extracted
# either; refused as parsed, so that no name up to a PAX record's 16 MiB is kept (nor walked).
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


class LayerDigestError(PycfsError):
    """The bytes read do not have the digest they were announced with."""


class HashingReader:
    """Wraps a binary file; hashes and counts every byte handed out."""

    def __init__(self, f: BinaryIO, alg: str = "sha256") -> None:
        self._f = f
        self.hasher = hashlib.new(alg)
        self.alg = alg
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hasher.update(data)
        self.count += len(data)
        return data

    def digest(self) -> str:
        return f"{self.alg}:{self.hasher.hexdigest()}"


class HashedSource(Protocol):
    """A reader that counts and digests every byte it hands out (HashingReader's face)."""

    count: int

    def read(self, n: int = -1) -> bytes: ...

    def digest(self) -> str: ...


# ---------------------------------------------------------------------------- compression


class _GzipReader:
    """Decompresses concatenated gzip members (zero padding between them allowed, as gzip
    does) with zlib, which checks each member's header, CRC-32 and length. Compressed input
    is read and hashed a _PIECE at a time, and output comes at most `n` bytes a call (zlib's
    max_length), so a highly compressed member never lands in memory whole; a member cut
    short is an error."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._d: zlib._Decompress | None = None  # the member being read
        self._in = b""  # compressed input not yet given to zlib

    def read(self, n: int = -1) -> bytes:
        limit = n if n > 0 else _PIECE
        while True:
            if not self._in:
                self._in = self._f.read(_PIECE)
                if not self._in:
                    if self._d is not None:
                        raise PycfsError("corrupt gzip layer: compressed data ends in the middle of a member")
                    return b""
            if self._d is None:
                self._in = self._in.lstrip(b"\0")
                if not self._in:
                    continue
                self._d = zlib.decompressobj(wbits=31)
            try:
                out = self._d.decompress(self._in, limit)
            except zlib.error as e:
                raise PycfsError(f"corrupt gzip layer: {e}") from None
            if self._d.eof:
                self._in, self._d = self._d.unused_data, None
            else:
                self._in = self._d.unconsumed_tail
            if out:
                return out


class _CheckedSource:
    """The compressed blob as the decompressor reads it, each read fed to a frame checker."""

    def __init__(self, f: BinaryIO, checker: ZstdFrameChecker) -> None:
        self._f = f
        self._checker = checker

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        self._checker.feed(data)
        return data


class _ZstdReader:
    """Decompresses concatenated (and skippable) zstd frames, at most `n` bytes a read, so a
    frame that expands a thousandfold never lands in memory whole. The decompressor would
    end a stream cut inside a frame silently: the frame checker, fed the same compressed
    bytes, makes that an error."""

    def __init__(self, f: BinaryIO) -> None:
        self._checker = ZstdFrameChecker()
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _CheckedSource(f, self._checker),  # type: ignore[arg-type]  # (it calls read() only)
            read_size=_PIECE, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        try:
            out = self._reader.read(n if n > 0 else _PIECE)
        except (zstandard.ZstdError, ZstdFrameError) as e:
            raise PycfsError(f"corrupt zstd layer: {e}") from None
        if not out and not self._checker.complete:
            raise PycfsError("corrupt zstd layer: truncated frame")
        return out


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def detect_compression(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def decompressing_reader(f: BinaryIO, compression: str) -> BinaryIO:
    """A reader of the uncompressed bytes of f; compression is 'gzip', 'zstd' or 'none'."""
    if compression == "gzip":
        return _GzipReader(f)  # type: ignore[return-value]
    if compression == "zstd":
        return _ZstdReader(f)  # type: ignore[return-value]
    if compression == "none":
        return f
    raise PycfsError(f"unsupported layer compression {compression!r}")


# ---------------------------------------------------------------------------- splitting


@dataclass
class SplitLayer:
    """A split tar not yet committed: the caller checks `diff_id` first."""

    writer: SplitStreamWriter
    diff_id: str  # digest of the tar bytes read, `sha256:<hex>`
    size: int
    stats: ImportStats


class _ReadAhead:
    """read(n) over another read, taking _PIECE at a time from it: a tar's 512-byte headers
    then cost a slice each, not a call down through the hasher and the decompressor."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._data = b""
        self._view = memoryview(b"")

    def read(self, n: int) -> bytes:
        if not self._view:
            self._data = self._read(_PIECE)
            if len(self._data) <= n:
                return self._data  # handed on whole, not copied
            self._view = memoryview(self._data)
        piece, self._view = self._view[:n], self._view[n:]
        return bytes(piece)

    def view(self, n: int) -> memoryview:
        """Up to n bytes as read(n), none only at EOF, as a view of the piece read: a file's
        content goes on to its hash and its write without a copy."""
        if not self._view:
            self._data = self._read(_PIECE)
            self._view = memoryview(self._data)
        piece, self._view = self._view[:n], self._view[n:]
        return piece


@dataclass(frozen=True, slots=True)
class PendingFile:
    """A file's content written, unhashed, to an anonymous file of the object store: a
    read-only fd (no writer left) for the object workers to adopt (`WorkerPool.adopt`); the
    writable one, for a splitter that adopts its files itself where objects get no
    fs-verity (`Repository.seals_objects`)."""

    fd: int
    size: int
    object_id: bytes | None = None  # its digest, when hashed as it was written (`hash_files`)


@dataclass(frozen=True, slots=True)
class StoredFile:
    object_id: bytes
    size: int
    how: str  # StoreResult.how


# What a tar splits into, in order: inline bytes, or a file's content as an object.
Piece = bytes | PendingFile | StoredFile


class TarSplitter:
    """Splits an uncompressed tar stream (spec 3.2) a run of entries at a time.

    Each file over INLINE_CONTENT_MAX becomes a StoredFile (hashed and stored here), or with
    ``defer`` a PendingFile: written once, not hashed, so a pipelined import hashes it on the
    object workers while this thread decompresses and splits on; with ``hash_files`` as
    well, its fs-verity digest is taken from the bytes as they are written (its
    ``object_id``), for a caller that adopts it here: no read of the file back. Whoever
    takes pieces closes the PendingFile fds among them (`close_pieces`)."""

    def __init__(self, repo: Repository, f: BinaryIO, alg: str = "sha256", *, defer: bool = False,
                 hashed: bool = False, hash_files: bool = False) -> None:
        """With ``hashed``, f already counts and digests what it hands out (`count`,
        `digest()`, as a HashingReader): the tar is not hashed a second time here."""
        self.repo = repo
        self.hash_files = hash_files
        self.src: HashedSource = f if hashed else HashingReader(f, alg)  # type: ignore[assignment]
        self._ahead = _ReadAhead(self.src.read)
        self.reader = TarReader(self._ahead.read)
        self.files_inlined = 0
        self.done = False
        # Deferring needs anonymous files, which the worker links by fd (O_TMPFILE).
        probe = repo.new_object_file() if defer else None
        self.defer = probe is not None
        if probe is not None:
            os.close(probe)

    def chunk(self, max_files: int = 64, max_inline: int = 4 << 20) -> list[Piece]:
        """The next entries, up to max_files stored files or about max_inline inline bytes;
        [] after the end (the end marker and anything after it are inline)."""
        with PieceRun() as run:
            inline = run.inline
            while not self.done and run.files < max_files and len(inline) < max_inline:
                entry = self.reader.next()
                inline += entry.raw
                if isinstance(entry, TarEnd):
                    trailing = 0
                    while piece := self._ahead.read(_PIECE):
                        inline += piece
                        trailing += len(piece)
                        if trailing > MAX_TRAILING:
                            raise TarError(f"more than {MAX_TRAILING >> 20} MiB after the tar's end marker")
                    self.done = True
                elif entry.is_regular() and entry.size > INLINE_CONTENT_MAX:
                    run.add_file(self._store(entry.size))
                    inline += self.reader.read_exact(entry.padded_size - entry.size, "padding")
                else:
                    if entry.size > INLINE_CONTENT_MAX and entry.size > MAX_INLINE_ENTRY_CONTENT:
                        kind = "GNU sparse file" if entry.sparse else f"entry of type {entry.typeflag!r}"
                        raise TarError(f"tar {kind} {shown(entry.path)} at offset {entry.offset} declares "
                                       f"{entry.size} bytes of content (more than {MAX_INLINE_ENTRY_CONTENT}): "
                                       "the layer is damaged or crafted (rebuild it with a standard tar)")
                    self.files_inlined += entry.is_regular()
                    remaining = entry.padded_size
                    while remaining:
                        piece = self.reader.read_exact(min(remaining, _PIECE))
                        inline += piece
                        remaining -= len(piece)
            return run.take()

    def _store(self, size: int) -> PendingFile | StoredFile:
        if not self.defer:
            object_id, present = _store_content(self.repo, self.reader, size)
            return StoredFile(object_id, size, "present" if present else "copied")
        fd = self.repo.new_object_file()
        if fd is None:
            raise PycfsError(f"the object store of {self.repo.path} no longer takes anonymous files")
        whole: bytes | None = None  # the digest of a file read in one piece
        hasher: VerityHasher | None = None
        try:
            remaining = size
            while remaining:
                piece = self._ahead.view(min(remaining, _PIECE))
                if not piece:
                    raise TarError(f"truncated tar: entry content at offset {self.reader.offset} ends {remaining} bytes early")
                self.reader.offset += len(piece)
                remaining -= len(piece)
                if self.hash_files:
                    if hasher is None and not remaining:  # the whole file in one piece (most are)
                        whole = digest_bytes(piece, self.repo.alg)
                    else:
                        hasher = hasher or VerityHasher(self.repo.alg)
                        hasher.update(piece)
                while piece:
                    piece = piece[os.write(fd, piece) :]
            if self.hash_files and not self.repo.seals_objects:
                # Adopted in this process where objects get no fs-verity: the writable fd
                # will do: no reopen through /proc and no second close per file.
                ro, fd = fd, -1
            else:  # read-only, and no writable fd left: the worker can enable fs-verity on it
                ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            if fd >= 0:
                os.close(fd)
        return PendingFile(ro, size, hasher.digest() if hasher is not None else whole)

    @property
    def diff_id(self) -> str:
        return self.src.digest()


class PieceRun:
    """A run of pieces being gathered: bytes added to ``inline`` become one inline piece
    before the next file (`add_file`); `take` ends the run. As a context it closes the
    run's PendingFile fds when the gathering fails."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.inline = bytearray()
        self.files = 0

    def add_file(self, piece: PendingFile | StoredFile) -> None:
        self._flush()
        self.pieces.append(piece)
        self.files += 1

    def take(self) -> list[Piece]:
        self._flush()
        return self.pieces

    def _flush(self) -> None:
        if self.inline:
            self.pieces.append(bytes(self.inline))
            self.inline.clear()

    def __enter__(self) -> PieceRun:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            close_pieces(self.pieces)


def close_pieces(pieces: list[Piece]) -> None:
    for p in pieces:
        if isinstance(p, PendingFile):
            os.close(p.fd)
    pieces[:] = [p for p in pieces if not isinstance(p, PendingFile)]


def write_pieces(writer: SplitStreamWriter, pieces: list[Piece], stats: ImportStats) -> None:
    """Append split pieces (none pending) to a layer stream, counting them in stats."""
    for p in pieces:
        if isinstance(p, bytes):
            writer.write_inline(p)
            stats.bytes_inlined += len(p)
        elif isinstance(p, StoredFile):
            writer.write_external(p.object_id, p.size)
            stats.count(p.how, p.size)
        else:
            raise AssertionError("a file not yet stored")


def split_tar(repo: Repository, f: BinaryIO, alg: str = "sha256") -> SplitLayer:
    """Read an uncompressed tar stream from f to EOF and split it (spec 3.2).

    Objects are written as content arrives (one file's bytes are never all in memory);
    nothing becomes visible until the caller commits the returned writer.
    """
    splitter = TarSplitter(repo, f, alg)
    writer = SplitStreamWriter(repo.alg, CONTENT_OCI_LAYER)
    stats = ImportStats()
    while pieces := splitter.chunk():
        write_pieces(writer, pieces, stats)
    stats.files_inlined += splitter.files_inlined
    return SplitLayer(writer, splitter.diff_id, splitter.src.count, stats)


def _store_content(repo: Repository, reader: TarReader, size: int) -> tuple[bytes, bool]:
    ow = repo.object_writer()
    try:
        remaining = size
        while remaining:
            piece = reader.read_exact(min(remaining, _PIECE))
            ow.write(piece)
            remaining -= len(piece)
    except BaseException:
        ow.abort()
        raise
    return ow.finish()


def layer_stream_name(diff_id: str) -> str:
    return f"oci-layer-{diff_id}"


def commit_layer(repo: Repository, layer: SplitLayer, diff_id: str, ref: str | None = None) -> bytes:
    """Make the split layer visible as `oci-layer-<diff_id>`, if its digest is that diff_id."""
    stream_id = store_layer(repo, layer, diff_id)
    publish_layer(repo, diff_id, stream_id, ref)
    return stream_id


def store_layer(repo: Repository, layer: SplitLayer, diff_id: str) -> bytes:
    """`commit_layer`'s first part: the stream stored, not yet visible, if the split layer's
    digest is that diff_id; its id."""
    if layer.diff_id != diff_id:
        raise LayerDigestError(f"layer digest mismatch: expected diff_id {diff_id}, the tar stream is {layer.diff_id} "
                               "(nothing was committed; `pycfs gc` frees the files it stored)")
    return repo.store_stream(layer.writer)


def publish_layer(repo: Repository, diff_id: str, stream_id: bytes, ref: str | None = None) -> None:
    """`commit_layer`'s second part: the stored stream visible as `oci-layer-<diff_id>` (and
    ref) after a syncfs."""
    repo.publish_streams([(layer_stream_name(diff_id), stream_id)])
    if ref is not None:
        repo.set_stream_ref(ref, layer_stream_name(diff_id))


def import_layer(repo: Repository, diff_id: str, f: BinaryIO, compression: str | None = None,
                 ref: str | None = None) -> tuple[bytes, SplitLayer | None]:
    """Import a layer blob (compression autodetected when None) as `oci-layer-<diff_id>`.

    Returns (stream id, split result); the split result is None when the stream already
    existed (then f is not read).
    """
    alg, _ = parse_digest(diff_id, "diff_id")
    existing = repo.has_stream(layer_stream_name(diff_id))
    if existing is not None:
        if ref is not None:
            repo.set_stream_ref(ref, layer_stream_name(diff_id))
        return existing, None
    if compression is None:
        compression = detect_compression(_peek(f, 4))
    layer = split_tar(repo, decompressing_reader(f, compression), alg)
    return commit_layer(repo, layer, diff_id, ref), layer


def _peek(f: BinaryIO, n: int) -> bytes:
    peek = getattr(f, "peek", None)
    if peek is None:
        raise PycfsError("cannot detect the compression of an unbuffered input")
    return peek(n)[:n]


# ---------------------------------------------------------------------------- reading back


@dataclass(frozen=True, slots=True)
class Directory:
    """A directory entry (its children come as their own entries)."""


@dataclass(frozen=True, slots=True)
class Hardlink:
    target: bytes  # normalized absolute path of an earlier entry


_DIRECTORY = Directory()  # (no fields: one for every directory entry)


@dataclass(slots=True)
class LayerEntry:
    """One tar entry of a layer as the image builder needs it (spec 3.6)."""

    path: bytes  # normalized: b"/a/b", b"" for the root directory
    stat: Stat  # mode as in the header
    item: Directory | Hardlink | LeafContent


def normalize_path(raw: bytes) -> bytes:
    """Absolute path without empty/`.` components; b"" is the root; `..` is refused."""
    stripped = raw.strip(b"/")
    if b"//" not in stripped and b"/." not in stripped and stripped[:1] != b".":
        # the usual path, with no empty or dot-led component: nothing to drop or refuse
        return b"/" + stripped if stripped else b""
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TarError(f"tar entry path {raw!r} contains '..'")
    return b"".join(b"/" + p for p in parts)


class _InlineCursor:
    """Inline bytes of a layer stream as a read(n) source; external chunks are taken explicitly."""

    def __init__(self, reader: SplitStreamReader) -> None:
        self._chunks = reader.chunks()
        self._refs = reader.object_refs
        self._buf = memoryview(b"")

    def read(self, n: int) -> bytes:
        if not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            if isinstance(chunk, int):
                raise TarError("layer stream: an object where tar headers or small-file content belong")
            self._buf = memoryview(chunk)
        piece, self._buf = self._buf[:n], self._buf[n:]
        return bytes(piece)

    def external(self) -> bytes:
        chunk = None if self._buf else next(self._chunks, None)
        if not isinstance(chunk, int):
            raise TarError(f"layer stream: inline data where the content object of a file > {INLINE_CONTENT_MAX} bytes belongs")
        return self._refs[chunk]


def iter_layer_entries(reader: SplitStreamReader) -> Iterator[LayerEntry]:
    """The entries of a layer splitstream, in archive order (PAX global headers skipped)."""
    if reader.content_type != CONTENT_OCI_LAYER:
        raise TarError(f"stream content type {reader.content_type:#x} is not a tar layer")
    cursor = _InlineCursor(reader)
    tar = TarReader(cursor.read)
    stats = SharedStats()
    while (entry := _next_entry(tar, cursor, stats)) is not None:
        yield entry


def _next_entry(tar: TarReader, cursor: _InlineCursor | LayerEntryCollector, stats: SharedStats) -> LayerEntry | None:
    """The next entry of a layer stream read through `cursor`; None at the end marker."""
    entry = tar.next()
    if type(entry) is TarEnd:
        return None
    size = entry.size
    if size > INLINE_CONTENT_MAX and entry.is_regular():
        object_id = cursor.external()
        tar.offset += size
        if size % BLOCK:
            tar.read_exact(BLOCK - size % BLOCK, "padding")
        return layer_entry(entry, External(object_id, size), stats)
    return layer_entry(entry, tar.read_exact(entry.padded_size)[:size] if size else b"", stats)


def layer_entry(entry: TarEntry, content: bytes | External, stats: SharedStats) -> LayerEntry:
    """A tar entry as the image builder takes it; content is what the entry holds inline,
    or the object of a regular file over INLINE_CONTENT_MAX. A non-directory's Stat may be
    one shared through ``stats`` with other entries of the layer: not to be changed in place. A directory's is always its own (OCI normalisation changes /run's)."""
    if entry.sparse:
        raise TarError(f"tar entry {entry.path!r} is a GNU sparse file: the layer stream keeps it byte for "
                       "byte, but composefs images cannot represent sparse tar entries yet")
    _check_names(entry)
    t = entry.typeflag
    mode, uid, gid = entry.mode, entry.uid, entry.gid
    if not (0 <= uid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF):  # (cut to 32 bits, 2^32 would be root)
        raise TarError(f"tar entry {shown(entry.path)} has uid/gid {uid}/{gid}, outside 0..4294967295: the layer "
                       "is damaged or crafted")
    xattrs = tuple(sorted(entry.xattrs.items())) if entry.xattrs else ()
    if t == DIRTYPE:
        return LayerEntry(normalize_path(entry.path), Stat(mode, uid, gid, entry.mtime, entry.mtime_nsec, dict(xattrs)),
                          _DIRECTORY)
    stat = stats.get(mode, uid, gid, entry.mtime, entry.mtime_nsec, xattrs)
    item: Hardlink | LeafContent
    if t in REGULAR_TYPES:  # (not sparse: refused above)
        item = content if isinstance(content, External) else Inline(content)
    elif t == LNKTYPE:
        item = Hardlink(normalize_path(entry.linkpath))
    elif t == SYMTYPE:
        item = Symlink(entry.linkpath)
    elif t in (CHRTYPE, BLKTYPE):
        if entry.devmajor < 0 or entry.devminor < 0:  # (os.makedev takes -1 as all ones)
            raise TarError(f"tar entry {shown(entry.path)} has device number {entry.devmajor}:{entry.devminor}: "
                           "the layer is damaged or crafted")
        try:
            rdev = os.makedev(entry.devmajor, entry.devminor)
        except (OverflowError, ValueError):
            rdev = 1 << 32
        if rdev > 0xFFFFFFFF:
            raise TarError(f"device number {entry.devmajor}:{entry.devminor} of {shown(entry.path)} does not fit 32 bits")
        item = CharDevice(rdev) if t == CHRTYPE else BlockDevice(rdev)
    elif t == FIFOTYPE:
        item = Fifo()
    else:
        raise TarError(f"tar entry {entry.path!r} has unsupported type {t!r}")
    return LayerEntry(normalize_path(entry.path), stat, item)


class EntryLimitError(PycfsError):
    """An image's layers hold more entries than MAX_IMAGE_ENTRIES."""


class EntryNameError(TarError):
    """A name, link target or xattr of an entry past Linux's limits."""


def _check_path(path: bytes, what: str) -> None:
    if len(path) >= PATH_MAX:
        raise EntryNameError(f"{what} {shown(path)} is longer than Linux's PATH_MAX "
                             f"({PATH_MAX - 1} bytes): the layer is damaged or crafted")
    if b"\0" in path:
        raise EntryNameError(f"{what} {shown(path)} holds a NUL byte: the layer is damaged or crafted")
    if len(path) > NAME_MAX and any(len(c) > NAME_MAX for c in path.split(b"/")):
        raise EntryNameError(f"{what} {shown(path)} has a component longer than Linux's NAME_MAX "
                             f"({NAME_MAX} bytes): the layer is damaged or crafted")


def _check_names(entry: TarEntry) -> None:
    """Refuse an entry whose path, link target or xattrs Linux could not hold."""
    _check_path(entry.path, "tar entry")
    t, target = entry.typeflag, entry.linkpath
    if t == LNKTYPE:
        _check_path(target, f"tar entry {shown(entry.path)}: hardlink target")
    elif t == SYMTYPE and (not target or len(target) >= PATH_MAX or b"\0" in target):
        raise EntryNameError(f"tar entry {shown(entry.path)}: symlink target {shown(target)} is not one "
                             f"Linux takes (1 to {PATH_MAX - 1}, no NUL): the layer is damaged or crafted")
    for name, value in entry.xattrs.items():
        if not name or len(name) > XATTR_NAME_MAX or len(value) > XATTR_SIZE_MAX:
            raise EntryNameError(f"tar entry {shown(entry.path)}: xattr {shown(name)} with a value of "
                                 f"{len(value)} bytes is past Linux's limits (names 1 to {XATTR_NAME_MAX} bytes, values "
                                 f"up to {XATTR_SIZE_MAX}): the layer is damaged or crafted")


class EntryBudget:
    """The entries an image's layers may still hold (MAX_IMAGE_ENTRIES, read when made), shared
    by the parses of its layers (threads of their own)."""

    def __init__(self) -> None:
        self.limit = self.left = MAX_IMAGE_ENTRIES
        self._lock = threading.Lock()

    def charge(self, count: int, where: str) -> None:
        with self._lock:
            self.left -= count
            over = self.left < 0
        if over:
            raise EntryLimitError(f"{where}: the image's layers hold more than {self.limit} entries (files, "
                                  "directories, links) together: pycfs takes no image that large (rebuild it "
                                  "with fewer files)")


class _NeedMore(Exception):
    """The pieces written so far end inside an entry."""


class LayerEntryCollector:
    """The entries of a layer stream parsed from the pieces written to it, as they are
    written: a pull that has just imported a layer builds its image from these instead of
    reading the stream back (`iter_layer_entries`). Feed it every piece of the stream, in order
    (`add_inline` bytes, `add_external` object ids, as `SplitStreamWriter` takes them), call
    `advance` from time to time and `close` at the end; then `entries` is what
    `iter_layer_entries` gives for the stored stream, the same code parsing the same bytes.

    An entry cut by the end of what was fed is parsed again, whole, on the next `advance`.
    If the pieces do not parse, `entries` is None: the image build then reads the stream
    back, which reports the error; past ``budget`` (by default MAX_IMAGE_ENTRIES for this
    layer alone), each entry counted ``weight`` times (a layer the image lists that many
    times), `advance` raises EntryLimitError naming ``where``."""

    def __init__(self, budget: EntryBudget | None = None, weight: int = 1, where: str = "layer") -> None:
        self.budget = budget or EntryBudget()
        self.weight = weight
        self.where = where
        self.entries: list[LayerEntry] | None = []
        self._pieces: list[bytes | tuple[bytes]] = []  # inline bytes, or (object id,)
        self._at = 0  # the piece being read ...
        self._pos = 0  # ... and the offset in it, when inline
        self._closed = False
        self._done = False
        self._tar = TarReader(self.read)
        self._stats = SharedStats()

    def add_inline(self, data: bytes) -> None:
        if data and not self._done:
            self._pieces.append(data)

    def add_external(self, object_id: bytes) -> None:
        if not self._done:
            self._pieces.append((object_id,))

    def take(self) -> list[LayerEntry] | None:
        """The entries parsed since the last take (None once parsing failed), for a caller
        that applies them as they come instead of keeping them all."""
        entries = self.entries
        if entries is not None:
            self.entries = []
        return entries

    def feed(self, pieces: list[bytes | tuple[bytes]]) -> None:
        """`add_inline` each bytes and `add_external` each (object id,) of pieces, then
        `advance`: for a writer that hands its pieces over to be parsed elsewhere."""
        for piece in pieces:
            if isinstance(piece, bytes):
                self.add_inline(piece)
            else:
                self.add_external(piece[0])
        self.advance()

    def close(self) -> None:
        self._closed = True
        self.advance()
        if not self._done:
            self.entries = None

    def advance(self) -> None:
        """Parse every entry the pieces fed so far hold whole."""
        tar, entries = self._tar, self.entries
        before = len(entries) if entries is not None else 0
        while not self._done and entries is not None:
            at, pos, offset = self._at, self._pos, tar.offset
            try:
                entry = _next_entry(tar, self, self._stats)
            except _NeedMore:
                self._at, self._pos, tar.offset = at, pos, offset
                break
            except EntryNameError as e:
                raise EntryNameError(f"{self.where}: {e}") from None  # (the layer's stream keeps such names: a read-back fails too)
            except PycfsError:
                self.entries = None
                break
            if entry is None:
                self._done = True
            else:
                entries.append(entry)
        if entries is not None and self.entries is not None:  # (a run holds a few thousand entries at most)
            self.budget.charge((len(entries) - before) * self.weight, self.where)
        if self._done or self.entries is None:
            self._pieces = []
            self._at = self._pos = 0
        elif self._at:
            del self._pieces[: self._at]
            self._at = 0

    def _inline_piece(self) -> bytes | None:
        """The inline piece with bytes left to read (the pieces read are passed), None at the end."""
        pieces = self._pieces
        while self._at < len(pieces):
            piece = pieces[self._at]
            if not isinstance(piece, bytes) or self._pos < len(piece):
                return piece  # type: ignore[return-value]
            self._at += 1
            self._pos = 0
        if not self._closed:
            raise _NeedMore
        return None

    def read(self, n: int) -> bytes:
        """`TarReader`'s source: up to n inline bytes, b"" at the end."""
        if self._at < len(self._pieces):  # the usual case: all n in the piece being read
            current, start = self._pieces[self._at], self._pos
            if start + n <= len(current) and isinstance(current, bytes):
                self._pos = start + n
                return current[start : start + n]
        piece = self._inline_piece()
        if piece is None:
            return b""
        if not isinstance(piece, bytes):
            raise TarError("layer stream: an object where tar headers or small-file content belong")
        start = self._pos
        self._pos = min(start + n, len(piece))
        return piece if start == 0 and self._pos == len(piece) else piece[start : self._pos]

    def external(self) -> bytes:
        """The object id of the file whose header was just read (`_InlineCursor.external`)."""
        piece = self._inline_piece()
        if not isinstance(piece, tuple):
            raise TarError(f"layer stream: inline data where the content object of a file > {INLINE_CONTENT_MAX} bytes belongs")
        self._at += 1
        return piece[0]


def open_layer(repo: Repository, diff_id: str) -> SplitStreamReader:
    return repo.open_stream(layer_stream_name(diff_id), CONTENT_OCI_LAYER)
