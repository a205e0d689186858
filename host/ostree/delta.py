"""ostree static deltas (spec ostree.md 1.9): find one for a commit, fetch its superblock
and parts, and turn them into the objects they carry.

A delta is found through the summary's `ostree.static-deltas` (name -> superblock
checksum) or `delta-indexes/<to[:2]>/<to[2:]>.index`; its name is `<to hex>` (from
nothing) or `<from hex>-<to hex>`, its directory the modified-base64 form of those
checksums. Everything is verified on the way: the superblock and each part against the
checksums that name them, the commit it carries against the commit asked for, every
object it builds against its own checksum. The result is a `CommitObjects` that a pull
uses as one more base; what the delta leaves out (fallbacks, objects of the from-commit)
the pull then takes from the other bases or fetches one by one.
"""

from __future__ import annotations

import base64
import hashlib
import lzma
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from pycfs.host.ostree.commitstream import CommitObjects, Entry
from pycfs.host.ostree.objects import (
    CHECKSUM_SIZE, COMMIT_TYPE, MAX_SYMLINK_TARGET, FileHeader, Kind, OstreeError, describe, parse_delta_table,
    verify_metadata,
)
from pycfs.host.ostree.source import MISMATCH, FetchedFile, HttpRepo, LocalRepo, _tmpfile
from pycfs.host.repository import write_all
from pycfs.protocol.gvariant import GVariantError, decode, encode

SUPERBLOCK_TYPE = "(a{sv}tayay" + COMMIT_TYPE + "aya(uayttay)a(yaytt))"
SIGNED_TYPE = "(taya{sv})"
SIGNED_MAGIC = b"OSTSGNDT"
PART_TYPE = "(a(uuu)aa(ayay)ayay)"
INDEX_TYPE = "a{sv}"
MAX_SUPERBLOCK = 64 << 20
MAX_PART = 1 << 30
XZ_PIECE = 16 << 20


def b64name(checksum: bytes) -> str:
    """ostree's modified base64: no padding, '/' -> '_'."""
    return base64.b64encode(checksum).decode().rstrip("=").replace("/", "_")


def delta_dir(from_commit: bytes | None, to_commit: bytes) -> str:
    to = b64name(to_commit)
    if from_commit is None:
        return f"deltas/{to[:2]}/{to[2:]}"
    f = b64name(from_commit)
    return f"deltas/{f[:2]}/{f[2:]}-{to}"


def delta_name(from_commit: bytes | None, to_commit: bytes) -> str:
    return to_commit.hex() if from_commit is None else f"{from_commit.hex()}-{to_commit.hex()}"


def index_path(to_commit: bytes) -> str:
    to = b64name(to_commit)
    return f"delta-indexes/{to[:2]}/{to[2:]}.index"


def parse_index(data: bytes, where: str) -> dict[str, bytes]:
    try:
        return parse_delta_table(decode(INDEX_TYPE, data), where)
    except GVariantError as e:
        raise OstreeError(f"{where}: not a valid delta index ({e})") from None


@dataclass
class Part:
    checksum: bytes
    size: int
    objects: list[tuple[Kind, bytes]]


@dataclass
class Superblock:
    from_commit: bytes | None
    to_commit: bytes
    commit_data: bytes
    parts: list[Part]
    inline_parts: dict[int, bytes]
    fallbacks: list[tuple[Kind, bytes]]


def parse_superblock(data: bytes, name: str, from_commit: bytes | None, to_commit: bytes) -> Superblock:
    where = f"static delta {name}"
    if data[:8] == SIGNED_MAGIC:
        try:
            _magic, data, _sigs = decode(SIGNED_TYPE, data)
        except GVariantError as e:
            raise OstreeError(f"{where}: bad signed superblock ({e})") from None
    try:
        meta, _ts, frm, to, commit, _prereq, parts, fallbacks = decode(SUPERBLOCK_TYPE, data)
    except GVariantError as e:
        raise OstreeError(f"{where}: not a valid superblock ({e})") from None
    if (frm or None) != from_commit or to != to_commit:
        raise OstreeError(f"{where}: the superblock is for {frm.hex() or 'nothing'} -> {to.hex()}")
    commit_data = encode(COMMIT_TYPE, commit)
    verify_metadata(commit_data, to_commit, Kind.COMMIT)
    out = []
    for i, (version, checksum, _csize, _usize, objects) in enumerate(parts):
        if version != 0 or len(checksum) != CHECKSUM_SIZE or len(objects) % 33:
            raise OstreeError(f"{where}: part {i} has an unknown version or a malformed object list")
        listed = [(_kind(objects[j], where), objects[j + 1:j + 33]) for j in range(0, len(objects), 33)]
        out.append(Part(checksum, _csize, listed))
    inline = {}
    prefix = delta_dir(from_commit, to_commit) + "/"
    for key, value in meta:
        if key.startswith(prefix) and key[len(prefix):].isdigit() and value.type == "(yay)":
            inline[int(key[len(prefix):])] = bytes([value.value[0]]) + value.value[1]
    fb = [(_kind(t, where), c) for t, c, _cs, _us in fallbacks]
    if any(len(c) != CHECKSUM_SIZE for _, c in fb):
        raise OstreeError(f"{where}: malformed fallback list")
    return Superblock(from_commit, to_commit, commit_data, out, inline, fb)


def _kind(code: int, where: str) -> Kind:
    try:
        kind = Kind(code)
    except ValueError:
        raise OstreeError(f"{where}: unknown object type {code}") from None
    return kind


def _varuint(data: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise OstreeError(f"{where}: truncated or overlong number in the opcodes")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _offtin(b: bytes | memoryview) -> int:
    """bsdiff's 8-byte number: magnitude little-endian, sign in the top bit."""
    value = int.from_bytes(b, "little")
    return -(value & ~(1 << 63)) if value >> 63 else value


def bspatch(old: bytes | BaseFile, patch: bytes | memoryview, size: int, where: str) -> bytes:
    """Apply a header-less bsdiff patch (control triples, diff and extra bytes, interleaved)."""
    out = bytearray()
    pos = oldpos = 0
    while len(out) < size:
        if pos + 24 > len(patch):
            raise OstreeError(f"{where}: bsdiff patch ends early")
        x, y, z = (_offtin(patch[pos + i:pos + i + 8]) for i in (0, 8, 16))
        pos += 24
        if x < 0 or y < 0 or len(out) + x + y > size or pos + x + y > len(patch) or oldpos < 0 or oldpos + x > len(old):
            raise OstreeError(f"{where}: bsdiff control entry out of bounds")
        diff = patch[pos:pos + x]
        base = old[oldpos:oldpos + x]
        # bytewise addition mod 256, a machine word at a time would need numpy; per byte is fine here
        out += bytes((a + b) & 0xFF for a, b in zip(base, diff))
        pos += x
        out += patch[pos:pos + y]
        pos += y
        oldpos += x + z
    return bytes(out)


PIECE = 1 << 20  # a 'write' copies at most this much at a time


class BaseFile:
    """A base object that 'write' and 'bspatch' opcodes read from, read with pread where
    they need it rather than whole into memory: a rollsum or bsdiff source may be gigabytes."""

    def __init__(self, fd: int, where: str) -> None:
        self.fd = fd
        self.where = where
        try:
            self.size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, piece: slice) -> bytes:
        start, stop, _ = piece.indices(self.size)
        data = os.pread(self.fd, max(0, stop - start), start)
        if len(data) != max(0, stop - start):
            raise OstreeError(f"{self.where} changed while it was read: run `pycfs fsck`")
        return data

    def close(self) -> None:
        os.close(self.fd)


class _Building:
    """The file object an 'open' starts; 'write' and 'bspatch' append to it. Content larger
    than inline_max goes straight into a temporary file and is hashed as it comes: an 'open'
    may declare any size, and repeated writes of the same data could otherwise fill memory."""

    def __init__(self, checksum: bytes, header: FileHeader, size: int, inline_max: int, tmp_dir: str) -> None:
        self.checksum = checksum
        self.header = header
        self.size = size  # the 'open''s size (a symlink's header says 0)
        self.length = 0
        self.small = bytearray()
        self.fd: int | None = None
        self.hasher: hashlib._Hash | None = None  # with fd: small content is checked whole at 'close'
        if not header.is_symlink and size > inline_max:
            self.hasher = hashlib.sha256(header.checksum_prefix())
            self.fd = _tmpfile(tmp_dir)

    def append(self, data: bytes | memoryview) -> None:
        self.length += len(data)
        if self.fd is None or self.hasher is None:
            self.small += data
        else:
            self.hasher.update(data)
            write_all(self.fd, data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class PartApplier:
    """Runs one part's opcodes. `read_base(checksum)` gives a base file object's content
    (bytes, or a BaseFile the applier closes);
    `store(checksum, fetched)` keeps a verified file object (content inline, or an fd of a
    temporary file the receiver closes) and `store_meta(kind, checksum, data)` a metadata one."""

    def __init__(self, where: str, payload: tuple, objects: list[tuple[Kind, bytes]],
                 read_base: Callable[[bytes], bytes | BaseFile], store: Callable[[bytes, FetchedFile], None],
                 store_meta: Callable[[Kind, bytes, bytes], None], inline_max: int, tmp_dir: str) -> None:
        self.where = where
        # (data and ops may be views of the part, see decompress_part; xattrs become headers)
        self.modes, xattrs, self.data, self.ops = payload
        self.xattrs = [[(bytes(name), bytes(value)) for name, value in pairs] for pairs in xattrs]
        self.objects = objects
        self.read_base = read_base
        self.store = store
        self.store_meta = store_meta
        self.inline_max = inline_max
        self.tmp_dir = tmp_dir
        self.current: _Building | None = None  # the file between 'open' and 'close'
        self.source: bytes | BaseFile | None = None  # what 'write' and 'bspatch' read, after 'read'
        # What the opcodes may write in all: the part's data, and each base object a file
        # reads (once a file: ostree's rollsum 'read's it again after each run of data).
        # An 'open' declares any size and 'write's may repeat: a few hundred bytes of xz
        # wrote 4 GiB before the checksum refused it.
        self.budget = len(self.data)
        self.written = 0
        self.read_by_file: set[bytes] = set()  # the base objects read since the last 'close'

    def _charge(self, n: int) -> None:
        """Count n bytes about to be written against the budget."""
        self.written += n
        if self.written > self.budget:
            raise OstreeError(f"{self.where}: the opcodes write more than the part's {len(self.data)} bytes of data "
                              f"and the {self.budget - len(self.data)} bytes of the base objects they read: a delta "
                              "crafted to fill the disk (`--no-delta` pulls without deltas)")

    def _slice(self, source: bytes | memoryview | BaseFile, offset: int, length: int) -> bytes | memoryview:
        self._check_range(source, offset, length)
        return source[offset:offset + length]

    def _check_range(self, source: bytes | memoryview | BaseFile, offset: int, length: int) -> None:
        if offset + length > len(source):
            raise OstreeError(f"{self.where}: opcode reads beyond its data ({offset}+{length} > {len(source)})")

    def _header(self, mode_idx: int, xattr_idx: int, size: int, checksum: bytes) -> FileHeader:
        if mode_idx >= len(self.modes) or xattr_idx >= len(self.xattrs):
            raise OstreeError(f"{self.where}: mode or xattr index out of range")
        uid, gid, mode = (int.from_bytes(v.to_bytes(4, "little"), "big") for v in self.modes[mode_idx])
        if stat.S_ISLNK(mode) and size > MAX_SYMLINK_TARGET:
            raise OstreeError(f"{self.where}: a symlink of {size} bytes (at most {MAX_SYMLINK_TARGET})")
        return FileHeader(0 if stat.S_ISLNK(mode) else size, uid, gid, mode, "", self.xattrs[xattr_idx])

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self.current is not None:  # an error left a file half built
                self.current.close()
                self.current = None
            self._set_source(None)

    def _set_source(self, source: bytes | BaseFile | None) -> None:
        if isinstance(self.source, BaseFile):
            self.source.close()
        self.source = source

    def _run(self) -> None:
        ops, pos, index = self.ops, 0, 0
        arg = self._arg

        def next_object() -> tuple[Kind, bytes]:
            nonlocal index
            if index >= len(self.objects):
                raise OstreeError(f"{self.where}: more objects in the opcodes than the part lists")
            index += 1
            return self.objects[index - 1]

        while pos < len(ops):
            op = chr(ops[pos])
            pos += 1
            current = self.current
            if op == "S":
                kind, checksum = next_object()
                if kind is Kind.FILE:
                    (mode_idx, xattr_idx, size, offset), pos = arg(pos, 4)
                    header = self._header(mode_idx, xattr_idx, size, checksum)
                    content = self._slice(self.data, offset, size)
                    self._charge(size)
                    self._finish(checksum, header, content)
                else:
                    (size, offset), pos = arg(pos, 2)
                    data = bytes(self._slice(self.data, offset, size))
                    self._charge(size)
                    verify_metadata(data, checksum, kind)
                    self.store_meta(kind, checksum, data)
            elif op == "o":
                (mode_idx, xattr_idx, size), pos = arg(pos, 3)
                kind, checksum = next_object()
                if kind is not Kind.FILE:
                    raise OstreeError(f"{self.where}: 'open' of a {kind.name.lower()} object")
                if current is not None:
                    raise OstreeError(f"{self.where}: 'open' while another file is open")
                header = self._header(mode_idx, xattr_idx, size, checksum)
                self.current = _Building(checksum, header, size, self.inline_max, self.tmp_dir)
            elif op == "w":
                (size, offset), pos = arg(pos, 2)
                # bounded by the open file's size: writes of the same bytes again and again
                # would otherwise grow it without end
                if current is None or current.length + size > current.size:
                    raise OstreeError(f"{self.where}: 'write' beyond the size of the open file, or with none open")
                source = self.source if self.source is not None else self.data
                self._check_range(source, offset, size)
                self._charge(size)
                for at in range(offset, offset + size, PIECE):
                    current.append(source[at:min(at + PIECE, offset + size)])
            elif op == "r":
                (offset,), pos = arg(pos, 1)
                base = bytes(self._slice(self.data, offset, CHECKSUM_SIZE))
                source = self.read_base(base)
                self._set_source(source)
                if base not in self.read_by_file:
                    self.read_by_file.add(base)
                    self.budget += len(source)
            elif op == "R":
                self._set_source(None)
            elif op == "B":
                (offset, length), pos = arg(pos, 2)
                if self.source is None or current is None:
                    raise OstreeError(f"{self.where}: bspatch without a read source or an open file")
                patched = bspatch(self.source, self._slice(self.data, offset, length), current.size - current.length,
                                  self.where)
                self._charge(len(patched))
                current.append(patched)
            elif op == "c":
                if current is None:
                    raise OstreeError(f"{self.where}: 'close' without an open file")
                self._finish_built(current)
                self.current = None
                self._set_source(None)
                self.read_by_file.clear()
            else:
                raise OstreeError(f"{self.where}: unknown opcode {op!r}")
        if index != len(self.objects) or self.current is not None:
            raise OstreeError(f"{self.where}: the opcodes do not build every object the part lists")

    def _arg(self, pos: int, n: int) -> tuple[list[int], int]:
        values = []
        for _ in range(n):
            v, pos = _varuint(self.ops, pos, self.where)
            values.append(v)
        return values, pos

    def _finish_built(self, built: _Building) -> None:
        if built.fd is None or built.hasher is None:
            self._finish(built.checksum, built.header, bytes(built.small))
            return
        if built.length != built.header.size:
            raise OstreeError(f"{describe(built.checksum, Kind.FILE)}: the delta gives {built.length} "
                              f"of {built.header.size} bytes")
        built.header.check(built.checksum)
        if built.hasher.digest() != built.checksum:
            raise OstreeError(f"{describe(built.checksum, Kind.FILE)}: {MISMATCH}")
        fd, built.fd = built.fd, None  # the receiver closes it now
        self.store(built.checksum, FetchedFile(built.header, fd=fd))

    def _finish(self, checksum: bytes, header: FileHeader, content: bytes | memoryview) -> None:
        if stat.S_ISLNK(header.mode):
            header = FileHeader(0, header.uid, header.gid, header.mode,
                                bytes(content).decode("utf-8", "surrogateescape"), header.xattrs)
            content = b""
        elif len(content) != header.size:
            raise OstreeError(f"{describe(checksum, Kind.FILE)}: the delta gives {len(content)} of {header.size} bytes")
        header.check(checksum)
        hasher = hashlib.sha256(header.checksum_prefix())
        hasher.update(content)  # (a large file's content is a view of the part: not joined to its prefix)
        if hasher.digest() != checksum:
            raise OstreeError(f"{describe(checksum, Kind.FILE)}: {MISMATCH}")
        if header.is_symlink or header.size <= self.inline_max:
            self.store(checksum, FetchedFile(header, content=bytes(content)))
            return
        fd = _tmpfile(self.tmp_dir)
        try:
            write_all(fd, content)
        except BaseException:
            os.close(fd)
            raise
        self.store(checksum, FetchedFile(header, fd=fd))


def decompress_part(raw: bytes, where: str) -> tuple:
    """The part's (modes, xattrs, data, ops), its data and ops views of what raw inflates to
    (of raw itself when it is stored uncompressed): a part's data is up to MAX_PART, and
    copies of it doubled or tripled what a part held."""
    if not raw:
        raise OstreeError(f"{where}: empty part")
    kind, body = raw[0], memoryview(raw)[1:]
    payload: bytearray | memoryview
    if kind == 0:
        payload = body
    elif kind == ord("x"):
        # inflated a piece at a time into one buffer: lzma's own output for a max_length is
        # gathered in blocks, then joined (twice the part at its end)
        payload = bytearray()
        try:
            d = lzma.LZMADecompressor()
            pending: bytes | memoryview = body
            while not d.eof and len(payload) <= MAX_PART and (pending or not d.needs_input):
                payload += d.decompress(pending, XZ_PIECE)
                pending = b""
            if not d.eof or d.unused_data or len(payload) > MAX_PART:
                raise OstreeError(f"{where}: truncated or oversized xz data")
        except lzma.LZMAError as e:
            raise OstreeError(f"{where}: corrupt xz data ({e})") from None
    else:
        raise OstreeError(f"{where}: unknown compression {kind!r}")
    try:
        return decode(PART_TYPE, payload, views=True)
    except GVariantError as e:
        raise OstreeError(f"{where}: not a valid delta part ({e})") from None


def apply_parts(superblock: Superblock, fetch_part: Callable[[int], bytes], base: CommitObjects | None,
                repo_open: Callable[[bytes], int], inline_max: int, tmp_dir: str,
                keep_file: Callable[[bytes, FetchedFile], None]) -> CommitObjects:
    """Every object the delta carries: metadata in the result, file objects through keep_file
    (small ones inline in the result). Blocking: a pull runs it on a thread."""
    name = delta_name(superblock.from_commit, superblock.to_commit)
    result = CommitObjects(superblock.to_commit)
    result.add(superblock.to_commit, Entry(superblock.commit_data))

    def read_base(checksum: bytes) -> bytes | BaseFile:
        if base is None:
            raise OstreeError(f"static delta {name}: reads object {checksum.hex()} of a base it does not have")
        _header, external, content = base.file_header(checksum)
        if external is None:
            return content
        return BaseFile(repo_open(external), f"the stored object of base file {checksum.hex()}")

    def store(checksum: bytes, fetched: FetchedFile) -> None:
        if fetched.content is not None:
            result.add(checksum, Entry(fetched.header.archive_header() + fetched.content))
        else:
            keep_file(checksum, fetched)

    def store_meta(kind: Kind, checksum: bytes, data: bytes) -> None:
        result.add(checksum, Entry(data))

    def apply(i: int, part: Part) -> None:
        """One part, whose buffers are dropped when it is done (not held while the next one
        is fetched)."""
        where = f"static delta {name} part {i}"
        raw = superblock.inline_parts.get(i)
        if raw is None:
            raw = fetch_part(i)
        if hashlib.sha256(raw).digest() != part.checksum:
            raise OstreeError(f"{where}: content does not match its checksum")
        payload = decompress_part(raw, where)
        del raw  # (an xz part's compressed bytes, once inflated)
        PartApplier(where, payload, part.objects, read_base, store, store_meta, inline_max, tmp_dir).run()

    for i, part in enumerate(superblock.parts):
        apply(i, part)
    return result


def find_delta(source: LocalRepo | HttpRepo, to_commit: bytes, have: Callable[[bytes], bool]) -> tuple[bytes | None, bytes] | None:
    """(from commit or None, superblock checksum) of the best delta to to_commit: one from a
    commit stored here, else one from nothing; None when the source has neither."""
    source.list_refs()
    table = {n: c for n, c in source.summary_deltas.items() if n.endswith(to_commit.hex())}
    if not table:
        data = source.fetch_optional(index_path(to_commit), MAX_SUPERBLOCK)
        if data is not None:
            table = parse_index(data, f"{source.description}/{index_path(to_commit)}")
    scratch = None
    for name, checksum in table.items():
        if name == to_commit.hex():
            scratch = (None, checksum)
        elif name.endswith("-" + to_commit.hex()) and len(name) == 129:
            try:
                from_commit = bytes.fromhex(name[:64])
            except ValueError:
                continue
            if have(from_commit):
                return from_commit, checksum
    return scratch
