"""tar-split metadata (`<layer-id>.tar-split.gz`): how to rebuild a layer's exact tar.

The file is gzip-compressed NDJSON, one entry per line (tar-split's `storage.Entry`):

    {"type": 2, "payload": "<base64 raw tar bytes>", "position": N}          # Segment
    {"type": 1, "name": "etc/x", "size": 123, "payload": "<base64 crc64>", "position": N}  # File

Segments carry every byte of the tar except file contents (headers, extension records,
the previous file's padding, the end blocks). File entries stand for `size` content bytes
that live in the layer's directory under `name` (`name_raw`, base64, when the name is not
UTF-8). A File's payload is the CRC-64 (ISO polynomial, big-endian) of its content.
The stream is the concatenation, in order, of segment bytes and file contents.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fastcrc
import pybase64

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import open_document, parse_object

TYPE_FILE = 1
TYPE_SEGMENT = 2
MAX_NAME = 4096
# A line holds one entry: a file's name or the tar bytes between files, whose largest part,
# a PAX header, Go's archive/tar keeps under 1 MiB (base64 and JSON add a third).
MAX_LINE = 16 << 20


def crc64_iso(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Go's crc64.Update(crc, crc64.MakeTable(crc64.ISO), data) (CRC-64/GO-ISO: reflected
    polynomial 0x1B, init and xorout all-ones): pass the previous value to continue. fastcrc
    runs at memory speed (9 GB/s measured, a Python table loop 0.2 GB/s at best)."""
    return fastcrc.crc64.go_iso(data, crc)


class TarSplitError(PycfsError):
    """The tar-split file is corrupt, truncated or names something it must not."""


@dataclass(frozen=True)
class Segment:
    data: bytes


@dataclass(frozen=True)
class FileEntry:
    name: bytes  # the tar entry name as recorded, e.g. b"./etc/passwd"
    size: int
    crc64: int | None  # None when the entry carries no checksum

    @property
    def relpath(self) -> bytes:
        """The name relative to the layer directory: leading './' removed."""
        path = self.name
        while path.startswith(b"./"):
            path = path[2:]
        return path.rstrip(b"/") or b"."


# Tar typeflags whose entries carry no data: Go's archive/tar (which tar-split and
# c/storage use) reads none for them whatever the header's size field says.
_HEADER_ONLY_TYPES = {
    b"1": "hard link", b"2": "symlink", b"3": "character device", b"4": "block device", b"5": "directory", b"6": "fifo",
}  # fmt: skip
_TAR_HEADER = 512
_TYPEFLAG = 156


def header_only_kind(segment: Segment) -> str | None:
    """What the tar entry whose header ends `segment` is, when its kind carries no data
    (a fifo, a device, ...); None for a regular file or when the segment holds no header."""
    if len(segment.data) < _TAR_HEADER:
        return None
    offset = len(segment.data) - _TAR_HEADER + _TYPEFLAG
    return _HEADER_ONLY_TYPES.get(segment.data[offset : offset + 1])


_SIZE = slice(124, 136)


def is_sparse(segment: Segment) -> bool:
    """Whether the tar entry whose header ends `segment` is a GNU sparse file: typeflag 'S'
    (the old GNU format), or `GNU.sparse.*` records in its own PAX header (formats 0.0 to
    1.0, `tar --sparse --format=pax`). Go's archive/tar hands such a file over expanded, so
    tar-split records its holes as data the layer's tar does not hold."""
    data = segment.data
    if len(data) < _TAR_HEADER:
        return False
    end = len(data) - _TAR_HEADER
    if data[end + _TYPEFLAG : end + _TYPEFLAG + 1] == b"S":
        return True
    if b"GNU.sparse." not in data:  # (every other entry stops here)
        return False
    # Its PAX header ('x', then the records in whole blocks) ends where its own header starts
    for start in range(end - _TAR_HEADER, -1, -_TAR_HEADER):
        block = data[start : start + _TAR_HEADER]
        if block[_TYPEFLAG : _TYPEFLAG + 1] != b"x":
            continue
        try:  # (a records block may hold an 'x' where a header's typeflag would be: look on)
            size = int(block[_SIZE].strip(b"\0 ") or b"0", 8)
        except ValueError:
            continue
        if start + _TAR_HEADER + -(-size // _TAR_HEADER) * _TAR_HEADER != end:
            continue
        return any(key.startswith(b"GNU.sparse.") for key in _pax_keys(data[start + _TAR_HEADER : start + _TAR_HEADER + size]))
    return False


def _pax_keys(records: bytes) -> Iterator[bytes]:
    """The keys of PAX records ("<length> <key>=<value>\n" each), until one is malformed."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos, pos + 20)
        if space < 0 or not records[pos:space].isdigit():
            return
        length = int(records[pos:space])
        record = records[space + 1 : pos + length]
        if length <= space - pos or b"=" not in record:
            return
        yield record.split(b"=", 1)[0]
        pos += length


_MODE, _UID, _GID = slice(100, 108), slice(108, 116), slice(116, 124)  # ustar octal fields
_NEEDS = {b"0": 4, b"\0": 4, b"7": 4, b"5": 1}  # typeflag -> permission to open: read, or search


def closed_to_user(segment: Segment) -> bool:
    """Whether the tar entry whose header ends `segment` is, by its owner and mode, a file
    the user may not read or a directory the user may not search: in rootless storage the
    user is uid and gid 0 of the storage's user namespace, so the owner's bits apply when
    the uid is 0, the group's when the gid is, the others' else. A hint only (PAX ids and
    supplementary groups are not looked at); False when the segment holds no header."""
    if len(segment.data) < _TAR_HEADER:
        return False
    header = segment.data[-_TAR_HEADER:]
    needs = _NEEDS.get(header[_TYPEFLAG : _TYPEFLAG + 1])
    if needs is None:
        return False
    try:
        mode = int(header[_MODE].strip(b"\0 ") or b"0", 8)
        if mode & needs * 0o111 == needs * 0o111:  # open to all: whose it is does not matter
            return False
        uid = int(header[_UID].strip(b"\0 ") or b"0", 8)
        gid = int(header[_GID].strip(b"\0 ") or b"0", 8)
    except ValueError:  # base-256 or damaged: the import finds out when it opens the file
        return False
    shift = 6 if uid == 0 else 3 if gid == 0 else 0
    return not (mode >> shift) & needs


def check_name(name: bytes, where: str) -> None:
    """Reject names that could reach outside the layer directory."""
    if b"\0" in name:
        raise TarSplitError(f"{where}: entry name contains NUL")
    if name.startswith(b"/"):
        raise TarSplitError(f"{where}: absolute entry name {name!r}")
    if b".." in name and b".." in name.split(b"/"):  # the split only for the rare name with ".."
        raise TarSplitError(f"{where}: entry name {name!r} contains '..'")
    if len(name) > MAX_NAME:
        raise TarSplitError(f"{where}: entry name longer than {MAX_NAME} bytes")


def _b64(value: object, where: str, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise TarSplitError(f"{where}: {what} is not a base64 string")
    try:
        # pybase64 (SIMD): the stdlib's decoder took 4.8 us of a segment's 8 us parse
        # (2.4 KB of base64 a segment on the bench image), pybase64 0.56 us.
        return pybase64.b64decode(value, validate=True)
    except ValueError as e:  # binascii.Error is one
        raise TarSplitError(f"{where}: {what} is not valid base64") from e


def _entry(obj: object, label: str, lineno: int) -> Segment | FileEntry:
    """The entry on line `lineno`; a segment, half the entries, takes the short way."""
    if type(obj) is dict and obj.get("type") == TYPE_SEGMENT:
        payload = obj.get("payload")
        if type(payload) is str:
            try:
                return Segment(pybase64.b64decode(payload, validate=True))
            except ValueError:
                pass  # _checked_entry names the line
    return _checked_entry(obj, f"{label}: line {lineno}")


def _checked_entry(obj: object, where: str) -> Segment | FileEntry:
    if not isinstance(obj, dict):
        raise TarSplitError(f"{where} is not a JSON object")
    kind = obj.get("type")
    if kind == TYPE_SEGMENT:
        return Segment(_b64(obj.get("payload"), where, "segment payload"))
    if kind != TYPE_FILE:
        raise TarSplitError(f"{where}: unknown entry type {kind!r}")
    if "name_raw" in obj and obj["name_raw"] is not None:
        name = _b64(obj["name_raw"], where, "name_raw")
    elif isinstance(obj.get("name"), str):
        name = obj["name"].encode("utf-8", "surrogateescape")
    else:
        raise TarSplitError(f"{where}: file entry without a name")
    check_name(name, where)
    size = obj.get("size", 0)
    if size is None:
        size = 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TarSplitError(f"{where}: file entry {name!r} has invalid size {size!r}")
    crc = _b64(obj.get("payload"), where, "file checksum")
    if crc and len(crc) != 8:
        raise TarSplitError(f"{where}: file entry {name!r} checksum is {len(crc)} bytes, expected 8")
    return FileEntry(name, size, int.from_bytes(crc, "big") if crc else None)


_READ_SIZE = 1 << 18
_GROUP = 512  # lines per json.loads: amortises its call cost, keeps memory to a few MiB


def _inflate(stream: BinaryIO, label: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip file, a block at a time, member after member."""
    inflater = zlib.decompressobj(wbits=31)
    fed = False  # has the current member started?
    try:
        while chunk := stream.read(_READ_SIZE):
            while chunk:
                fed = True
                # Bounded output: tar-split compresses 50:1, one read could inflate whole.
                out = inflater.decompress(chunk, _READ_SIZE)
                if out:
                    yield out
                if inflater.unconsumed_tail:
                    chunk = inflater.unconsumed_tail
                    continue
                if not inflater.eof:
                    break
                chunk = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)
                fed = False
    except zlib.error as e:
        raise TarSplitError(f"{label}: not a valid gzip file ({e})") from e
    if fed:
        raise TarSplitError(f"{label}: truncated (compressed data ends early)")


def _line_runs(blocks: Iterator[bytes], label: str) -> Iterator[tuple[int, list[bytes]]]:
    """The whole lines of each decompressed block, as (number of the first, lines)."""
    # A line's parts are joined once its end comes: a hostile line without one, copied
    # onto each next block, would cost time quadratic in its length.
    parts: list[bytes] = []
    held = 0
    lineno = 0
    for block in blocks:
        lines = block.split(b"\n")  # split first: no copy of the block joined to the rest
        tail = lines.pop()
        if lines:
            if parts:
                parts.append(lines[0])
                lines[0] = b"".join(parts)
                parts, held = [], 0
            yield lineno + 1, lines
            lineno += len(lines)
        if tail:
            parts.append(tail)
            held += len(tail)
            if held > MAX_LINE:
                raise TarSplitError(f"{label}: line {lineno + 1} is longer than {MAX_LINE} bytes")
    if parts:
        # tar-split ends every entry with a newline; its absence means the data stopped.
        raise TarSplitError(f"{label}: truncated at line {lineno + 1}")
    if lineno == 0:
        raise TarSplitError(f"{label}: empty")


def iter_entries(stream: BinaryIO, label: str = "tar-split") -> Iterator[Segment | FileEntry]:
    """Entries of a tar-split file, in order; `stream` is the gzip-compressed file.

    Decompressed a block at a time; the lines of a block are parsed in groups, each as one
    JSON array (a json.loads per line, and gzip's line reader, were most of the cost).
    Should a group fail to parse (a blank line makes it fail too), or hold more values
    than lines, its lines are parsed one by one, blank ones skipped, to name the bad one.
    Multi-member files are taken; a truncated or corrupt file raises TarSplitError naming
    `label` and the line.
    """
    for first, lines in _line_runs(_inflate(stream, label), label):
        for start in range(0, len(lines), _GROUP):
            yield from _parse_group(lines[start : start + _GROUP], first + start, label)


def _parse_group(lines: list[bytes], first: int, label: str) -> Iterator[Segment | FileEntry]:
    """The entries of consecutive lines, the first of them line number `first`."""
    try:
        docs = json.loads(b"[" + b",".join(lines) + b"]")
    except (ValueError, RecursionError):  # (parsed again line by line to name the bad one)
        docs = None
    if docs is not None and len(docs) == len(lines):
        for n, obj in enumerate(docs, first):
            yield _entry(obj, label, n)
        return
    for n, line in enumerate(lines, first):
        if line.strip():
            yield _entry(parse_object(line, f"{label}: line {n}", TarSplitError), label, n)


@contextlib.contextmanager
def open_entries(path: str, dir_fd: int | None = None,
                 name: str | None = None) -> Iterator[Iterator[Segment | FileEntry]]:
    """The entries of the tar-split file at `path`, read as they are taken (the file stays
    open inside the `with`); a file that cannot be opened or read raises TarSplitError.
    With ``dir_fd``, path is beneath it and no symlink is followed on the way (``name``:
    the file's name in messages). Nothing but a regular file is opened."""
    shown = name or path
    try:
        fd = open_document(path, TarSplitError, dir_fd=dir_fd, follow=dir_fd is None, name=name,
                           resolve=0 if dir_fd is None else syscalls.RESOLVE_CONFINED)
    except FileNotFoundError as e:
        raise TarSplitError(f"cannot read {shown}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        yield _reading(iter_entries(f, shown), shown)


def _reading(entries: Iterator[Segment | FileEntry], path: str) -> Iterator[Segment | FileEntry]:
    try:
        yield from entries
    except OSError as e:
        raise TarSplitError(f"cannot read {path}: {e.strerror}") from e


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_entries(entries: list[Segment | FileEntry], stream: BinaryIO) -> None:
    """Write entries as tar-split does (gzip NDJSON); used to make test fixtures and round trips."""
    with gzip.GzipFile(fileobj=stream, mode="wb") as gz:
        for position, entry in enumerate(entries):
            if isinstance(entry, Segment):
                obj: dict = {"type": TYPE_SEGMENT, "payload": _b64encode(entry.data), "position": position}
            else:
                obj = {"type": TYPE_FILE}
                try:
                    obj["name"] = entry.name.decode("utf-8")
                except UnicodeDecodeError:
                    obj["name_raw"] = _b64encode(entry.name)
                if entry.size:
                    obj["size"] = entry.size
                obj["payload"] = None if entry.crc64 is None else _b64encode(entry.crc64.to_bytes(8, "big"))
                obj["position"] = position
            gz.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
