"""Tar header codec: ustar/GNU/PAX headers and a strict pull reader (spec 3.2, 3.6).

The reader never re-encodes anything: it hands back every byte it consumed for an entry
(extension headers, their data and padding, the main header) so the layer splitter can
store them inline verbatim and `cat` reproduces the archive byte for byte. Field
resolution follows the spec: PAX `path` > GNU long name > ustar prefix/name; PAX
`linkpath` > GNU long link > linkname; PAX `size`/`uid`/`gid`/`mtime` override the header;
xattrs only from `SCHILY.xattr.*`; PAX global headers are consumed but not applied.

The writer side (`TarHeader.pack`, `pax_data`, `gnu_long_entry`) exists to build test
archives with exact control over every field.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pycfs.host.errors import PycfsError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# POSIX ustar header; the GNU format reuses the same offsets and keeps its extra fields
# (atime, ctime, sparse map...) in the bytes ustar calls prefix/pad.
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")
assert HEADER.size == BLOCK
_CHKSUM_OFFSET = 148
_CHKSUM_SIZE = 8

MAGIC_USTAR = b"ustar\x00"
VERSION_USTAR = b"00"
MAGIC_GNU = b"ustar "
VERSION_GNU = b" \x00"

# typeflags
REGTYPE = b"0"
AREGTYPE = b"\x00"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
XHDTYPE = b"x"  # PAX extended header for the next entry
XGLTYPE = b"g"  # PAX global header
GNUTYPE_LONGNAME = b"L"
GNUTYPE_LONGLINK = b"K"
GNUTYPE_SPARSE = b"S"
REGULAR_TYPES = (REGTYPE, AREGTYPE, CONTTYPE)
_TYPEFLAG_OFFSET = 156
# the typeflags of headers that describe the next entry (or, `g`, the archive); also as the
# ints a header block's byte reads as
_EXTENSION_TYPES = (XHDTYPE, XGLTYPE, GNUTYPE_LONGNAME, GNUTYPE_LONGLINK)
_EXTENSION_TYPEFLAGS = frozenset(b"".join(_EXTENSION_TYPES))

# Everything read before an entry's own header (extension headers and their data, PAX
# global headers, stray zero blocks) is held in memory, in its raw bytes and its parsed
# records; a real archive needs a few KiB, so more than this in all is refused as corrupt
# or hostile. A total, not a bound per header: Go's archive/tar caps each PAX or GNU
# special file at 1 MiB but keeps only the last one's values, where this reader keeps every
# byte (the layer stream reproduces the archive), so any number of `g` headers or zero
# blocks would otherwise add up without end. 16 MiB still holds all Go accepts for one
# entry (a PAX header, a long name and a long link of 1 MiB each) many times over.
MAX_EXTENSION_SIZE = 16 << 20


class TarError(PycfsError):
    """The input is not a tar archive we can represent; the message says what and where."""


def roundup_block(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@functools.lru_cache(maxsize=4096)
def parse_number(field_bytes: bytes, what: str = "number") -> int:
    """Decode a numeric header field: octal text (NUL/space terminated) or GNU base-256.
    Cached: most fields of most headers (mode, ids, device numbers) repeat."""
    if field_bytes and field_bytes[0] & 0x80:
        # base-256: 0x80 marks a positive big-endian value in the remaining bytes,
        # 0xff a negative two's-complement value over the whole field
        if field_bytes[0] == 0x80:
            return int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] == 0xFF:
            return int.from_bytes(field_bytes, "big", signed=True)
        raise TarError(f"bad base-256 {what} field {field_bytes.hex()}")
    text = field_bytes.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.translate(None, b"01234567"):  # anything left is not an octal digit
        raise TarError(f"bad octal {what} field {field_bytes!r}")
    return int(text, 8)


def format_number(value: int, size: int, what: str = "number") -> bytes:
    """Encode like GNU tar: zero-padded octal plus NUL when it fits, else base-256."""
    if 0 <= value < 8 ** (size - 1):
        return b"%0*o\x00" % (size - 1, value)
    if -(256 ** (size - 1)) // 2 <= value < 256 ** (size - 1):
        if value >= 0:
            return b"\x80" + value.to_bytes(size - 1, "big")
        return value.to_bytes(size, "big", signed=True)
    raise TarError(f"{what} {value} does not fit a {size}-byte field")


_HIGH_BYTES = bytes(range(0x80, 0x100))

# The 8-byte numeric fields that sit together in a header: mode, uid, gid at 100 and the
# device numbers at 329, parsed (and cached) a run at a time.
_ID_FIELDS = ("mode", "uid", "gid")
_DEVICE_FIELDS = ("devmajor", "devminor")


@functools.lru_cache(maxsize=4096)
def _numbers(run: bytes, names: tuple[str, ...]) -> tuple[int, ...]:
    """parse_number over consecutive 8-byte fields: one cached call where most headers
    repeat the whole run (an owner and mode, no device)."""
    return tuple(parse_number(run[i : i + 8], what) for i, what in zip(range(0, len(run), 8), names, strict=True))


def _cstr(b: bytes) -> bytes:
    return b.split(b"\x00", 1)[0]


def _byte_sum(data: bytes) -> int:
    """sum(data) at C speed: adler32's low half is 1 + the byte sum modulo 65521, which is
    exact for 256 bytes at a time (256 * 255 < 65521). Every tar header is summed, and a
    Python-level sum() was a third of the cost of parsing one."""
    return sum((zlib.adler32(data[i : i + 256]) & 0xFFFF) - 1 for i in range(0, len(data), 256))


def header_checksums(block: bytes) -> tuple[int, int]:
    """(unsigned, signed) byte sums with the checksum field counted as spaces."""
    rest = block[:_CHKSUM_OFFSET] + block[_CHKSUM_OFFSET + _CHKSUM_SIZE :]
    unsigned = _byte_sum(rest) + 8 * 0x20
    # signed = unsigned - 256 for every byte >= 0x80 (old tars summed signed chars)
    signed = unsigned - 256 * (len(rest) - len(rest.translate(None, _HIGH_BYTES)))
    return unsigned, signed


def _verify_checksum(block: bytes, offset: int) -> int:
    """The checksum of a 512-byte header block, which must hold; TarError naming the offset else."""
    try:
        chksum = parse_number(block[148:156], "chksum")
    except TarError:
        raise TarError(f"not a tar archive: no valid tar header at offset {offset}") from None
    # The unsigned sum first (adler32's low halves, see _byte_sum, minus the stored field
    # counted as 8 spaces): the signed one (old tars) only matters when it differs.
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) \
        - (zlib.adler32(block[148:156]) & 0xFFFF) + 8 * 0x20 - 1
    if chksum != unsigned and chksum not in header_checksums(block):
        raise TarError(
            f"not a tar archive, or a damaged one: bad tar header checksum at offset {offset} "
            f"(stored {chksum}, computed {header_checksums(block)[0]})"
        )
    return chksum


def _verified_size(block: bytes, offset: int) -> int:
    """The size field of a header block whose checksum holds (an extension header: the rest
    of its fields mean nothing to the entry)."""
    _verify_checksum(block, offset)
    try:
        size = parse_number(block[124:136], "size")
    except TarError as e:
        raise TarError(f"{e} in tar header at offset {offset}") from None
    if size < 0:
        raise TarError(f"negative size {size} in tar header at offset {offset}")
    return size


def _verified_numbers(block: bytes, offset: int) -> tuple[int, int, int, int, int, int, int, int]:
    """(chksum, mode, uid, gid, size, mtime, devmajor, devminor) of a 512-byte header block
    whose checksum holds; TarError naming the offset else. Every entry's own header is
    checked here, whether it becomes a `TarHeader` or, a lone one, only a `TarEntry`
    (`TarReader.next`); an extension header, by `_verified_size`."""
    chksum = _verify_checksum(block, offset)
    try:  # one handler for every field (a closure per header measured ~1 us of ~10)
        mode, uid, gid = _numbers(block[100:124], _ID_FIELDS)
        size, mtime = parse_number(block[124:136], "size"), parse_number(block[136:148], "mtime")
        devmajor, devminor = _numbers(block[329:345], _DEVICE_FIELDS)
    except TarError as e:
        raise TarError(f"{e} in tar header at offset {offset}") from None
    if size < 0:
        raise TarError(f"negative size {size} in tar header at offset {offset}")
    return chksum, mode, uid, gid, size, mtime, devmajor, devminor


@dataclass(slots=True)
class TarHeader:
    """One 512-byte header block with the field names of POSIX ustar."""

    name: bytes = b""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    chksum: int = 0
    typeflag: bytes = REGTYPE
    linkname: bytes = b""
    magic: bytes = MAGIC_USTAR
    version: bytes = VERSION_USTAR
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    prefix: bytes = b""
    pad: bytes = bytes(12)

    @classmethod
    def parse(cls, block: bytes, offset: int = 0) -> TarHeader:
        """Decode and verify a header block; `offset` only serves error messages."""
        if len(block) != BLOCK:
            raise TarError(f"truncated tar header at offset {offset}: {len(block)} of {BLOCK} bytes")
        chksum, mode, uid, gid, size, mtime, devmajor, devminor = _verified_numbers(block, offset)
        (name, _, _, _, _, _, _, typeflag, linkname, magic, version, uname, gname, _, _, prefix,
         pad) = HEADER.unpack(block)
        # C strings; most headers leave linkname, the owner names and the prefix empty, and a
        # test of the first byte is a fraction of a split
        return cls(name.split(b"\x00", 1)[0], mode, uid, gid, size, mtime, chksum, typeflag,
                   linkname.split(b"\x00", 1)[0] if linkname[0] else b"", magic, version,
                   uname.split(b"\x00", 1)[0] if uname[0] else b"", gname.split(b"\x00", 1)[0] if gname[0] else b"",
                   devmajor, devminor,
                   prefix if magic == MAGIC_GNU else prefix.split(b"\x00", 1)[0] if prefix[0] else b"", pad)

    def pack(self) -> bytes:
        """Encode with a freshly computed checksum (the `chksum` attribute is ignored)."""
        for value, size, what in ((self.name, 100, "name"), (self.linkname, 100, "linkname"), (self.prefix, 155, "prefix")):
            if len(value) > size:
                raise TarError(f"{what} of {len(value)} bytes does not fit the {size}-byte field")
        block = bytearray(
            HEADER.pack(
                self.name,
                format_number(self.mode, 8, "mode"),
                format_number(self.uid, 8, "uid"),
                format_number(self.gid, 8, "gid"),
                format_number(self.size, 12, "size"),
                format_number(self.mtime, 12, "mtime"),
                b" " * _CHKSUM_SIZE,
                self.typeflag,
                self.linkname,
                self.magic,
                self.version,
                self.uname,
                self.gname,
                format_number(self.devmajor, 8, "devmajor"),
                format_number(self.devminor, 8, "devminor"),
                self.prefix,
                self.pad,
            )
        )
        block[_CHKSUM_OFFSET : _CHKSUM_OFFSET + _CHKSUM_SIZE] = b"%06o\x00 " % header_checksums(bytes(block))[0]
        return bytes(block)

    @property
    def full_name(self) -> bytes:
        """ustar prefix/name; GNU headers keep other data in the prefix bytes."""
        if self.magic == MAGIC_USTAR and self.prefix:
            return self.prefix + b"/" + self.name
        return self.name


def parse_pax(data: bytes, offset: int = 0) -> list[tuple[bytes, bytes]]:
    """Parse PAX records `"<len> <key>=<value>\\n"`; trailing NUL padding is tolerated."""
    records: list[tuple[bytes, bytes]] = []
    pos, end_of_records = 0, len(data.rstrip(b"\x00"))
    while pos < end_of_records:
        sp = data.find(b" ", pos, pos + 24)
        length_text = data[pos:sp] if sp >= 0 else b""
        if not length_text.isdigit():
            raise TarError(f"bad PAX record length at offset {offset + pos}")
        length = int(length_text)
        end = pos + length
        if length <= len(length_text) + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarError(f"bad PAX record of length {length} at offset {offset + pos}")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise TarError(f"PAX record without key=value at offset {offset + pos}")
        records.append((key, value))
        pos = end
    return records


@functools.lru_cache(maxsize=256)
def _cached_pax(data: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(parse_pax(data))


def _pax_records(data: bytes, offset: int) -> Sequence[tuple[bytes, bytes]]:
    """parse_pax, cached for short data: the entries of a layer often carry the same records
    (an image built with one timestamp of nanoseconds gives every entry a PAX header of
    one mtime record), and a long one must not stay in memory."""
    if len(data) <= 512:
        try:
            return _cached_pax(data)
        except TarError:
            pass  # (told again with the offset)
    return parse_pax(data, offset)


def pax_data(records: list[tuple[bytes, bytes]]) -> bytes:
    """Encode PAX records; the length prefix counts its own digits."""
    out = bytearray()
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(b"%d" % n) + len(body) != n:
            n = len(b"%d" % n) + len(body)
        out += b"%d" % n + body
    return bytes(out)


def pax_entry(records: list[tuple[bytes, bytes]], *, typeflag: bytes = XHDTYPE, name: bytes = b"././@PaxHeader") -> bytes:
    """An `x` (or `g`) header block plus its data and padding."""
    data = pax_data(records)
    hdr = TarHeader(name=name, mode=0o644, size=len(data), typeflag=typeflag).pack()
    return hdr + data + bytes(roundup_block(len(data)) - len(data))


def gnu_long_entry(value: bytes, typeflag: bytes = GNUTYPE_LONGNAME) -> bytes:
    """A GNU `L`/`K` block carrying a NUL-terminated long name."""
    data = value + b"\x00"
    hdr = TarHeader(name=b"././@LongLink", size=len(data), typeflag=typeflag, magic=MAGIC_GNU, version=VERSION_GNU).pack()
    return hdr + data + bytes(roundup_block(len(data)) - len(data))


# A PAX number longer than this is refused: no field it overrides needs a tenth of it, and
# int() of more than 4300 digits raises ValueError, which must not escape as a traceback.
MAX_PAX_DIGITS = 64


def parse_pax_mtime(text: bytes) -> tuple[int, int]:
    """`<sec>[.<frac>]` → (seconds, nanoseconds): first 9 fraction digits, right-padded.
    Cached for short values: the files of a layer mostly share a few timestamps, and a
    long value (say, megabytes of fraction) must not stay in memory."""
    return _cached_pax_mtime(text) if len(text) <= 32 else _pax_mtime(text)


def _pax_mtime(text: bytes) -> tuple[int, int]:
    sec_text, _, frac = text.partition(b".")
    digits = sec_text[1:] if sec_text.startswith(b"-") else sec_text
    if not digits.isdigit() or len(digits) > MAX_PAX_DIGITS:  # int() alone would also take "+1", " 1", "1_0"
        raise TarError(f"bad PAX mtime {text[:40]!r}")
    sec = int(sec_text)
    frac = frac[:9]
    nsec = int(frac.ljust(9, b"0")) if frac.isdigit() else 0
    return sec, nsec


_cached_pax_mtime = functools.lru_cache(maxsize=1024)(_pax_mtime)


@dataclass(slots=True)
class TarEntry:
    """One archive member with every override resolved; `raw` holds all bytes read for it,
    its main header block last (`header`)."""

    raw: bytes
    offset: int  # of the first byte of `raw` in the archive
    path: bytes
    linkpath: bytes
    size: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    typeflag: bytes  # of the main header, as mode and the device numbers
    mode: int
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    pax: dict[bytes, bytes] = field(default_factory=dict)
    # A GNU sparse file (old `S` type, or PAX GNU.sparse.* records): its content on tape is
    # a sparse map plus data segments, not the file's bytes. Set once by the reader: every
    # entry is asked several times.
    sparse: bool = False

    @property
    def header(self) -> TarHeader:
        """The main header block, decoded again (a lone header, most entries, is not made
        into a TarHeader as it is read)."""
        return TarHeader.parse(self.raw[-BLOCK:], self.offset + len(self.raw) - BLOCK)

    def is_regular(self) -> bool:
        """A plain regular file whose content on tape is the file's bytes. Sparse entries are
        not: their bytes stay inline in a layer stream, so an object is always file content."""
        return self.typeflag in REGULAR_TYPES and not self.sparse

    @property
    def padded_size(self) -> int:
        return roundup_block(self.size)


@dataclass
class TarEnd:
    """End of archive; `raw` holds the end marker (and any global header before it)."""

    raw: bytes
    offset: int


class TarReader:
    """Pull parser over `read(n)` (returns up to n bytes, b"" only at EOF).

    `next()` consumes the header bytes of one entry; the caller then consumes exactly the
    entry's `padded_size` content bytes with `read_exact` before calling `next()` again.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.offset = 0
        self.done = False

    def read_exact(self, n: int, what: str = "entry content") -> bytes:
        piece = self._read(n) if n else b""
        if len(piece) == n:  # the usual case: the source had all of it at hand
            self.offset += n
            return piece
        if not piece:
            raise TarError(f"truncated tar: {what} at offset {self.offset} ends {n} bytes early")
        self.offset += len(piece)
        parts = [piece]
        want = n - len(piece)
        while want:
            piece = self.read_some(want, what)
            parts.append(piece)
            want -= len(piece)
        return b"".join(parts)

    def read_some(self, n: int, what: str = "entry content") -> bytes:
        """1 to n (> 0) of the next bytes, as the source hands them: content copied
        straight on needs no join; TarError at EOF."""
        piece = self._read(n)
        if not piece:
            raise TarError(f"truncated tar: {what} at offset {self.offset} ends {n} bytes early")
        self.offset += len(piece)
        return piece

    def _read_block(self) -> bytes:
        """A full block, or b"" at a clean EOF; a partial block is an error."""
        piece = self._read(BLOCK)
        if len(piece) == BLOCK:  # the usual case, without a copy
            self.offset += BLOCK
            return bytes(piece)
        got = bytearray(piece)
        while piece and len(got) < BLOCK:
            piece = self._read(BLOCK - len(got))
            got += piece
        if got and len(got) < BLOCK:
            raise TarError(f"truncated tar header at offset {self.offset}: {len(got)} of {BLOCK} bytes")
        self.offset += len(got)
        return bytes(got)

    def next(self) -> TarEntry | TarEnd:
        if self.done:
            raise TarError("tar reader used after the end of the archive")
        start = self.offset
        block = self._read_block()
        if block and block[_TYPEFLAG_OFFSET] not in _EXTENSION_TYPEFLAGS and block != ZERO_BLOCK:
            # the usual entry, a lone header: none of the extension bookkeeping below
            return self._entry(block, start, block, start, {}, {}, None, None, False)
        return self._extended(start, block)

    def _extended(self, start: int, block: bytes) -> TarEntry | TarEnd:
        """The entry whose first block (read at `start`) is an extension header, a zero
        block or the end of the input."""
        raw = bytearray()
        pax: dict[bytes, bytes] = {}
        xattrs: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        pending = False  # extension headers seen that still need their entry
        sparse = False  # a PAX GNU.sparse.* record seen
        block_offset = start
        while True:
            if not block:
                if pending:
                    raise TarError(f"truncated tar: extension header at offset {start} has no entry")
                self.done = True
                return TarEnd(bytes(raw), start)
            raw += block
            if block == ZERO_BLOCK:
                # Two zero blocks end the archive; a lone one is absorbed into the next entry.
                second = self._read_block()
                raw += second
                if not second or second == ZERO_BLOCK:
                    if pending:
                        raise TarError(f"tar: extension header at offset {start} followed by the end marker")
                    self.done = True
                    return TarEnd(bytes(raw), start)
                block_offset += BLOCK
                block = second
            t = block[_TYPEFLAG_OFFSET : _TYPEFLAG_OFFSET + 1]
            if t not in _EXTENSION_TYPES:
                return self._entry(block, block_offset, bytes(raw), start, pax, xattrs, long_name, long_link, sparse)
            size = _verified_size(block, block_offset)
            if len(raw) + roundup_block(size) > MAX_EXTENSION_SIZE:
                raise TarError(f"tar: extension headers of the entry at offset {start} are too large: with the "
                               f"{t.decode()} header at offset {block_offset} ({size} bytes of data) more than "
                               f"{MAX_EXTENSION_SIZE} bytes precede its own header")
            data_offset = self.offset
            data = self.read_exact(roundup_block(size), "extension header data")
            raw += data
            data = data[:size]
            if t == XGLTYPE:
                _pax_records(data, data_offset)  # validated, not applied (as composefs-rs)
            elif t == XHDTYPE:
                pending = True
                for key, value in _pax_records(data, data_offset):
                    if key.startswith(b"SCHILY.xattr."):
                        xattrs[key[len(b"SCHILY.xattr.") :]] = value
                    else:
                        pax[key] = value
                        sparse = sparse or key.startswith(b"GNU.sparse.")
            elif t == GNUTYPE_LONGNAME:
                pending, long_name = True, _cstr(data)
            else:
                pending, long_link = True, _cstr(data)
            block_offset = self.offset
            block = self._read_block()

    @staticmethod
    def _entry(block: bytes, block_offset: int, raw: bytes, start: int, pax: dict[bytes, bytes],
               xattrs: dict[bytes, bytes], long_name: bytes | None, long_link: bytes | None, sparse: bool) -> TarEntry:
        """The entry of main header `block` (read at `block_offset`, checked here as
        `TarHeader.parse` checks it; its fields taken straight into the entry, no TarHeader
        made) with the extensions read before it."""
        _, mode, uid, gid, size, mtime, devmajor, devminor = _verified_numbers(block, block_offset)
        if long_name is not None:
            path = long_name
        else:
            path = block[:100].split(b"\x00", 1)[0]
            if block[345] and block[257:263] == MAGIC_USTAR:  # a ustar prefix (GNU keeps other data there)
                path = block[345:500].split(b"\x00", 1)[0] + b"/" + path
        linkpath = long_link if long_link is not None else block[157:257].split(b"\x00", 1)[0] if block[157] else b""
        mtime_nsec = 0
        if pax:  # (each lookup guarded: most PAX headers carry one or two records)
            path = pax.get(b"path") or path
            linkpath = pax.get(b"linkpath") or linkpath
            if b"size" in pax:
                size = _pax_int(pax, b"size", size, start)
            if b"uid" in pax:
                uid = _pax_int(pax, b"uid", uid, start)
            if b"gid" in pax:
                gid = _pax_int(pax, b"gid", gid, start)
            if pax.get(b"mtime"):
                mtime, mtime_nsec = parse_pax_mtime(pax[b"mtime"])
        typeflag = block[_TYPEFLAG_OFFSET : _TYPEFLAG_OFFSET + 1]
        return TarEntry(raw, start, path, linkpath, size, uid, gid, mtime, mtime_nsec, typeflag, mode, devmajor,
                        devminor, xattrs, pax, sparse or typeflag == GNUTYPE_SPARSE)


def _pax_int(pax: dict[bytes, bytes], key: bytes, default: int, start: int) -> int:
    value = pax[key]
    if not value:  # empty = "revert to the header field"
        return default
    if not value.isdigit() or len(value) > MAX_PAX_DIGITS:
        raise TarError(f"tar: bad PAX {key.decode()} {value[:40]!r} for entry at offset {start}")
    return int(value)


def simple_entry(name: bytes, data: bytes = b"", **fields) -> bytes:
    """A single ustar member (header + content + padding) for tests; `fields` go to TarHeader."""
    hdr = replace(TarHeader(name=name, mode=0o644, size=len(data)), **fields)
    return hdr.pack() + data + bytes(roundup_block(len(data)) - len(data))
