"""ostree's objects: commits, dirtrees, dirmetas and file headers (spec ostree.md 1.1-1.4).

Each parser takes the object's bytes and the checksum it was asked for, so every error
names the object (`objects/XX/REST.dirtree: ...`). Checksums are raw 32-byte SHA-256
digests throughout; `hexname()` gives the 64-character form ostree prints.

ostree keeps uid, gid, mode, rdev, file size and the commit timestamp big-endian inside
little-endian GVariant frames: the dataclasses here hold the real numbers and swap on the
way in and out.
"""

from __future__ import annotations

import enum
import hashlib
import stat
import struct
from dataclasses import dataclass, field
from itertools import pairwise

from pycfs.host.errors import PycfsError
from pycfs.protocol.gvariant import MAX_VALUES, GVariantError, Variant, decode, encode, frame, offset_size
from pycfs.protocol.text import is_clean_text

COMMIT_TYPE = "(a{sv}aya(say)sstayay)"
DIRTREE_TYPE = "(a(say)a(sayay))"
DIRMETA_TYPE = "(uuua(ayay))"
FILE_HEADER_TYPE = "(tuuuusa(ayay))"  # archive ("zlib") form: with the content size
FILE_REGULAR_TYPE = "(uuuusa(ayay))"  # what the checksum covers
XATTRS_TYPE = "a(ayay)"
SUMMARY_TYPE = "(a(s(taya{sv}))a{sv})"

SIZED = struct.Struct(">I4x")  # the "sized variant" prefix: u32 BE length, 4 zero bytes
_FILE_FIELDS = struct.Struct(">QIIII")  # size uid gid mode rdev of (tuuuusa(ayay)), byte-swapped
_REGULAR_FIELDS = struct.Struct(">IIII")  # uid gid mode rdev of (uuuusa(ayay))
CHECKSUM_SIZE = 32
MAX_METADATA_SIZE = 128 << 20  # ostree's own limit for a metadata object
MAX_HEADER_SIZE = 1 << 20  # a file header is a few xattrs; anything bigger is hostile
# What a checkout (and a composefs image) can hold: NAME_MAX, and PATH_MAX less its NUL.
# Checked where the object is parsed, so the error names it.
MAX_NAME = 255
MAX_SYMLINK_TARGET = 4095


class OstreeError(PycfsError):
    pass


class Kind(enum.IntEnum):
    """Object types with their numeric codes (used by static deltas)."""

    FILE = 1
    DIRTREE = 2
    DIRMETA = 3
    COMMIT = 4

    def extension(self, archive: bool) -> str:
        if self is Kind.FILE:
            return "filez" if archive else "file"
        return self.name.lower()


def hexname(checksum: bytes) -> str:
    return checksum.hex()


def parse_checksum(text: str, what: str = "checksum") -> bytes:
    """64 lowercase or uppercase hex digits -> 32 bytes."""
    text = text.strip()
    if len(text) != 2 * CHECKSUM_SIZE:
        raise OstreeError(f"{what} {text[:80]!r} is not a 64-digit hex checksum")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise OstreeError(f"{what} {text[:80]!r} is not a 64-digit hex checksum") from None


def is_checksum_text(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def object_relpath(checksum: bytes, kind: Kind, archive: bool = True) -> str:
    h = checksum.hex()
    return f"objects/{h[:2]}/{h[2:]}.{kind.extension(archive)}"


def describe(checksum: bytes, kind: Kind) -> str:
    """How errors name an object, whatever the repository's mode: `object HEX.dirtree`."""
    return f"object {checksum.hex()}.{kind.name.lower()}"


def _decode(type_text: str, data: bytes, checksum: bytes, kind: Kind):
    try:
        return decode(type_text, data)
    except GVariantError as e:
        raise OstreeError(f"{describe(checksum, kind)}: not a valid {kind.name.lower()} object ({e})") from None


def verify_metadata(data: bytes, checksum: bytes, kind: Kind) -> None:
    """A metadata object's name is the SHA-256 of its bytes."""
    got = hashlib.sha256(data).digest()
    if got != checksum:
        raise OstreeError(f"{describe(checksum, kind)}: content does not match its checksum (got {got.hex()}): "
                          "the source repository is corrupt or was tampered with")


def _check_csum(value: bytes, checksum: bytes, kind: Kind, what: str) -> bytes:
    if len(value) != CHECKSUM_SIZE:
        raise OstreeError(f"{describe(checksum, kind)}: {what} is {len(value)} bytes, not a checksum")
    return value


def _xattrs_in(pairs: list[tuple[bytes, bytes]], checksum: bytes, kind: Kind) -> list[tuple[bytes, bytes]]:
    names = [n for n, _ in pairs]
    for n in names:
        if not n.endswith(b"\0") or b"\0" in n[:-1] or len(n) < 2:
            raise OstreeError(f"{describe(checksum, kind)}: xattr name {n[:60]!r} is not a NUL-terminated name")
    return pairs


@dataclass(frozen=True)
class Commit:
    metadata: list[tuple[str, Variant]]
    parent: bytes | None
    related: list[tuple[str, bytes]]
    subject: str
    body: str
    timestamp: int
    root_tree: bytes
    root_meta: bytes

    @classmethod
    def parse(cls, data: bytes, checksum: bytes) -> Commit:
        meta, parent, related, subject, body, ts, tree, dirmeta = _decode(COMMIT_TYPE, data, checksum, Kind.COMMIT)
        if parent:
            _check_csum(parent, checksum, Kind.COMMIT, "parent")
        return cls(meta, parent or None, related, subject, body, _bswap64(ts),
                   _check_csum(tree, checksum, Kind.COMMIT, "root dirtree"),
                   _check_csum(dirmeta, checksum, Kind.COMMIT, "root dirmeta"))

    def serialize(self) -> bytes:
        return encode(COMMIT_TYPE, (self.metadata, self.parent or b"", self.related, self.subject, self.body,
                                    _bswap64(self.timestamp), self.root_tree, self.root_meta))


def commit_seconds(timestamp: int) -> int:
    """A commit's timestamp (the u64 as stored) as seconds since 1970, signed, as `ostree
    show` reads it (`ostree commit --timestamp=1960-01-01T00:00:00Z` stores a negative one)."""
    return timestamp - (1 << 64) if timestamp >= 1 << 63 else timestamp


def commit_date(timestamp: int) -> str:
    """A commit's timestamp (the u64 as stored) as a UTC date, from `commit_seconds`;
    `timestamp N` where no date fits."""
    import datetime  # here: only inspect and a refused downgrade print a date

    seconds = commit_seconds(timestamp)
    try:  # (adding to the epoch: fromtimestamp depends on the platform's time_t)
        date = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)
    except OverflowError:
        return f"timestamp {seconds}"
    return f"{date.isoformat(sep=' ')} UTC"


def check_name(name: str, checksum: bytes, kind: Kind) -> None:
    if not name or name in (".", "..") or "/" in name:
        raise OstreeError(f"{describe(checksum, kind)}: invalid file name {name[:80]!r}")
    # (UTF-8 takes at most 4 bytes a character: most names need no encoding to measure)
    if len(name) > MAX_NAME // 4 and (length := len(name.encode())) > MAX_NAME:
        raise OstreeError(f"{describe(checksum, kind)}: file name {name[:40]!r}... of {length} bytes (at most {MAX_NAME})")


@dataclass(frozen=True)
class DirTree:
    files: list[tuple[str, bytes]]
    dirs: list[tuple[str, bytes, bytes]]

    @classmethod
    def parse(cls, data: bytes, checksum: bytes) -> DirTree:
        fast = _read_dirtree(data)
        files, dirs = fast if fast is not None else _decode(DIRTREE_TYPE, data, checksum, Kind.DIRTREE)
        # (the messages are made only for an entry that fails: a dirtree has thousands)
        for name, csum in files:
            check_name(name, checksum, Kind.DIRTREE)
            if len(csum) != CHECKSUM_SIZE:
                _check_csum(csum, checksum, Kind.DIRTREE, f"checksum of {name!r}")
        for name, tree, meta in dirs:
            check_name(name, checksum, Kind.DIRTREE)
            if len(tree) != CHECKSUM_SIZE or len(meta) != CHECKSUM_SIZE:
                _check_csum(tree, checksum, Kind.DIRTREE, f"dirtree of {name!r}")
                _check_csum(meta, checksum, Kind.DIRTREE, f"dirmeta of {name!r}")
        # (compared as str: names decode strictly from UTF-8, whose byte order is their code
        # points' order, so this is ostree's strcmp order)
        file_names, dir_names = [f[0] for f in files], [d[0] for d in dirs]
        for names in (file_names, dir_names):
            if any(a >= b for a, b in pairwise(names)):
                raise OstreeError(f"{describe(checksum, Kind.DIRTREE)}: entries are not sorted or repeat a name")
        if file_names and dir_names and not set(file_names).isdisjoint(dir_names):
            raise OstreeError(f"{describe(checksum, Kind.DIRTREE)}: a name is both a file and a directory")
        return cls(files, dirs)

    def serialize(self) -> bytes:
        return encode(DIRTREE_TYPE, (self.files, self.dirs))


@dataclass(frozen=True)
class DirMeta:
    uid: int
    gid: int
    mode: int  # with S_IFDIR
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes, checksum: bytes, kind: Kind = Kind.DIRMETA) -> DirMeta:
        uid, gid, mode, xattrs = _decode(DIRMETA_TYPE, data, checksum, kind)
        meta = cls(_bswap32(uid), _bswap32(gid), _bswap32(mode), _xattrs_in(xattrs, checksum, kind))
        if kind is Kind.DIRMETA and not stat.S_ISDIR(meta.mode):
            raise OstreeError(f"{describe(checksum, kind)}: mode {meta.mode:o} is not a directory's")
        return meta

    def serialize(self) -> bytes:
        return encode(DIRMETA_TYPE, (_bswap32(self.uid), _bswap32(self.gid), _bswap32(self.mode), self.xattrs))


@dataclass(frozen=True)
class FileHeader:
    """A file object's metadata; `size` is the content length (0 for symlinks)."""

    size: int
    uid: int
    gid: int
    mode: int  # with S_IFREG or S_IFLNK
    symlink_target: str
    xattrs: list[tuple[bytes, bytes]]

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @classmethod
    def parse(cls, variant: bytes, checksum: bytes) -> FileHeader:
        target = _plain_header_target(variant)
        if target is not None:  # read as big-endian: ostree's byte swap undone in the unpack
            size, uid, gid, mode, rdev = _FILE_FIELDS.unpack_from(variant)
            header = cls(size, uid, gid, mode, target, [])
        else:
            size, uid, gid, mode, rdev, target, xattrs = _decode(FILE_HEADER_TYPE, variant, checksum, Kind.FILE)
            header = cls(_bswap64(size), _bswap32(uid), _bswap32(gid), _bswap32(mode), target,
                         _xattrs_in(xattrs, checksum, Kind.FILE))
            rdev = _bswap32(rdev)
        header.check(checksum, rdev)
        return header

    def check(self, checksum: bytes, rdev: int = 0) -> None:
        why = None
        if rdev:
            why = "device files are not ostree content"
        elif self.is_symlink:
            if not self.symlink_target or self.size:
                why = "symlink without a target, or with content"
            elif not is_clean_text(self.symlink_target):
                # (a GVariant string: what a delta or a bare repository gives may be neither)
                why = "symlink target is not UTF-8 text without NUL"
            elif len(self.symlink_target) > MAX_SYMLINK_TARGET // 4 and (
                    length := len(self.symlink_target.encode())) > MAX_SYMLINK_TARGET:
                why = f"symlink target of {length} bytes (at most {MAX_SYMLINK_TARGET})"
        elif not stat.S_ISREG(self.mode):
            why = f"mode {self.mode:o} is neither a regular file nor a symlink"
        elif self.symlink_target:
            why = "regular file with a symlink target"
        if why is None and self.xattrs and (
                self.xattrs != sorted(self.xattrs) or len({n for n, _ in self.xattrs}) != len(self.xattrs)):
            why = "xattrs are not sorted by name or repeat a name"
        if why is not None:
            raise OstreeError(f"{describe(checksum, Kind.FILE)}: {why}")

    def _sized(self, fixed: bytes) -> bytes:
        # Laid out here, not through encode(): a pull writes two per file. The shape:
        # fixed fields, the NUL-terminated target, the xattrs array (last: no offset), one
        # framing offset (the target's end). test_file_header_encoders_match_the_codec
        # holds it to the generic codec.
        if "\0" in self.symlink_target:
            raise GVariantError("symlink target contains NUL")
        target = self.symlink_target.encode() + b"\0"
        end = len(fixed) + len(target)
        if not self.xattrs and end < 0xFF:  # (most files: one offset byte, ~3 us less a call)
            return SIZED.pack(end + 1) + fixed + target + bytes((end,))
        variant = frame(fixed + target + (encode(XATTRS_TYPE, self.xattrs) if self.xattrs else b""), [end])
        return SIZED.pack(len(variant)) + variant

    def archive_header(self) -> bytes:
        """The sized `(tuuuusa(ayay))`: a `.filez` starts with it, the commit splitstream keeps it.
        (Big-endian packing is ostree's byte swap inside the little-endian frame.)"""
        return self._sized(_FILE_FIELDS.pack(self.size, self.uid, self.gid, self.mode, 0))

    def checksum_prefix(self) -> bytes:
        """What the content checksum covers before the content: the sized `(uuuusa(ayay))`."""
        return self._sized(_REGULAR_FIELDS.pack(self.uid, self.gid, self.mode, 0))


# ---- fast readers -------------------------------------------------------------------------
# A pull reads a file header per file and a dirtree per directory: thousands, where the
# generic codec's per-value recursion cost more than everything else the pull does with them.
# These read the usual shapes directly and answer None for anything else (xattrs, a width
# or offset out of the ordinary, bad UTF-8, damage), which then goes to the generic codec:
# it gives the same value or the error. They accept only its normal form (tests hold them
# to it).


def _string(data: bytes, start: int, end: int) -> str | None:
    """The GVariant string at data[start:end] (NUL-terminated, no other NUL, UTF-8)."""
    if end <= start or data[end - 1] != 0 or data.find(b"\0", start, end - 1) >= 0:
        return None
    try:
        return data[start:end - 1].decode()
    except UnicodeDecodeError:
        return None


def _plain_header_target(variant: bytes) -> str | None:
    """The symlink target ("" for a file) of a `(tuuuusa(ayay))` without xattrs: 24 bytes of
    fixed fields, the target string, then one framing offset (the target's end), which
    equals the offset's own position when the xattrs array is empty."""
    n = len(variant)
    w = offset_size(n)
    if n < _FILE_FIELDS.size + 1 + w or int.from_bytes(variant[n - w:], "little") != n - w:
        return None
    return _string(variant, _FILE_FIELDS.size, n - w)


def _read_dirtree(data: bytes) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes, bytes]]] | None:
    """`(a(say)a(sayay))`: the files array, its end as the one framing offset, the dirs array
    (every member has alignment 1: there is no padding to check)."""
    n = len(data)
    w = offset_size(n)
    if not w:
        return None
    files_end = int.from_bytes(data[n - w:], "little")
    if files_end > n - w:
        return None
    files = _read_entries(data, 0, files_end, 1)
    dirs = _read_entries(data, files_end, n - w, 2)
    if files is None or dirs is None:
        return None
    return files, dirs


def _read_entries(data: bytes, start: int, end: int, checksums: int) -> list[tuple] | None:
    """An array of `(say)` (checksums=1) or `(sayay)` (2) at data[start:end]: the elements,
    then each element's end offset in order."""
    size = end - start
    if not size:
        return []
    w = offset_size(size)
    last = int.from_bytes(data[end - w:end], "little")
    # (each array within half the codec's MAX_VALUES, counted as the codec counts: an element
    # and its members; the codec decides the rest, and refuses what holds more)
    if last >= size or (size - last) % w or (size - last) // w * (2 + checksums) >= MAX_VALUES // 2:
        return None
    out: list[tuple] = []
    pos = start
    table = start + last
    for at in range(table, end, w):
        element_end = start + int.from_bytes(data[at:at + w], "little")
        if not pos <= element_end <= table:
            return None
        # an element: its string, its checksum(s), then the offsets (last first) of every
        # member but the last
        ew = offset_size(element_end - pos)
        framing = element_end - checksums * ew
        if framing < pos:
            return None
        name_end = pos + int.from_bytes(data[element_end - ew:element_end], "little")
        sum_end = framing if checksums == 1 else pos + int.from_bytes(data[framing:framing + ew], "little")
        if not pos <= name_end <= sum_end <= framing:
            return None
        name = _string(data, pos, name_end)
        if name is None:
            return None
        if checksums == 1:
            out.append((name, data[name_end:framing]))
        else:
            out.append((name, data[name_end:sum_end], data[sum_end:framing]))
        pos = element_end
    return out


def split_archive_header(data: bytes, checksum: bytes) -> tuple[FileHeader, int]:
    """Parse the sized header at the start of data: (header, offset where content starts)."""
    if len(data) < SIZED.size:
        raise OstreeError(f"{describe(checksum, Kind.FILE)}: truncated ({len(data)} bytes, no header)")
    (length,) = SIZED.unpack_from(data)
    end = SIZED.size + length
    why = None
    if data[4:8] != b"\0\0\0\0":
        why = f"bad header prefix {data[:8].hex()}"
    elif length > MAX_HEADER_SIZE:
        why = f"header of {length} bytes is implausibly large"
    elif len(data) < end:
        why = f"truncated ({len(data)} bytes, header needs {end})"
    if why is not None:
        raise OstreeError(f"{describe(checksum, Kind.FILE)}: {why}")
    return FileHeader.parse(data[SIZED.size:end], checksum), end


def header_length(prefix: bytes, checksum: bytes) -> int:
    """From the first 8 bytes of a `.filez`: the size of the header variant that follows."""
    if len(prefix) < SIZED.size:
        raise OstreeError(f"{describe(checksum, Kind.FILE)}: truncated ({len(prefix)} bytes, no header)")
    (length,) = SIZED.unpack_from(prefix)
    if prefix[4:8] != bytes(4) or length > MAX_HEADER_SIZE:
        raise OstreeError(f"{describe(checksum, Kind.FILE)}: bad header prefix {prefix[:8].hex()}")
    return length


def parse_summary(data: bytes, where: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, Variant]]]:
    """A repository's `summary` file: (ref, commit) of every ref, and its metadata."""
    try:
        refs, metadata = decode(SUMMARY_TYPE, data)
    except GVariantError as e:
        raise OstreeError(f"{where}: not a valid ostree summary ({e})") from None
    out = []
    for name, (_size, checksum, _meta) in refs:
        if len(checksum) != CHECKSUM_SIZE:
            raise OstreeError(f"{where}: ref {name!r} has a {len(checksum)}-byte checksum")
        out.append((name, checksum))
    return out, metadata


def parse_delta_table(metadata: list[tuple[str, Variant]], where: str) -> dict[str, bytes]:
    """`ostree.static-deltas` of a summary's or a delta index's metadata: delta name ->
    superblock checksum."""
    for key, value in metadata:
        if key == "ostree.static-deltas":
            if value.type != "a{sv}":
                raise OstreeError(f"{where}: ostree.static-deltas is a {value.type}, not a{{sv}}")
            return {name: v.value for name, v in value.value if v.type == "ay" and len(v.value) == CHECKSUM_SIZE}
    return {}


def parse_meta_xattr(value: bytes, checksum: bytes) -> FileHeader:
    """bare-user's `user.ostreemeta`: (uid, gid, mode, xattrs) in dirmeta form; size comes later."""
    meta = DirMeta.parse(value, checksum, Kind.FILE)
    return FileHeader(0, meta.uid, meta.gid, meta.mode, "", meta.xattrs)


def _bswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _bswap64(v: int) -> int:
    return int.from_bytes(v.to_bytes(8, "little"), "big")
