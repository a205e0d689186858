"""The commit splitstream: every object of one ostree commit, in one stream (spec ostree.md 2).

Stream `ostree-commit-<commit hex>`, content type 0xAFE138C18C463EF1, one inline chunk:

    header      u32 commit_id (index of the commit), u32 flags (0), u32 bucket_ends[256]
    ids         n x 32-byte ostree checksums, ascending
    info        n x (u32 data_block, u32 size, u32 external_index)   in the same order
    content     each object's bytes at data_block*8, zero-padded to a multiple of 8

bucket_ends[b] counts the ids whose first byte is <= b. Metadata objects are kept
verbatim (their SHA-256 is their id); a file object is its sized archive header, followed
by its content when that is small (<= 2 x the repository's digest size) or else naming the
composefs object holding the content through `external_index` (an index into the
splitstream's object_refs, assigned in id order). Refs: `streams/refs/ostree/<name>` with
`%` -> `%25` and `/` -> `%2F`; the EROFS image is the named ref `composefs.image`.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

from pycfs.host.errors import PycfsError
from pycfs.host.ostree.objects import (
    CHECKSUM_SIZE,
    Commit,
    DirMeta,
    DirTree,
    FileHeader,
    Kind,
    OstreeError,
    split_archive_header,
)
from pycfs.host.repository import Repository, RepositoryError
from pycfs.host.splitstream import (
    CONTENT_OSTREE_COMMIT,
    SplitStreamError,
    SplitStreamReader,
    SplitStreamWriter,
)

HEADER = struct.Struct("<II256I")
INFO = struct.Struct("<III")
NO_EXTERNAL = 0xFFFFFFFF
ALIGN = 8
IMAGE_REF = "composefs.image"
STREAM_PREFIX = "ostree-commit-"
REF_PREFIX = "ostree/"


def stream_name(commit: bytes) -> str:
    return STREAM_PREFIX + commit.hex()


def encode_ref(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def decode_ref(text: str) -> str:
    return text.replace("%2F", "/").replace("%25", "%")


def check_ref_name(name: str) -> None:
    if not name or "\0" in name or "\n" in name or name.startswith("/") or any(
            p in ("", ".", "..") for p in name.split("/")):
        raise OstreeError(f"invalid ostree ref name {name!r}")


@dataclass(frozen=True)
class Entry:
    """One object: its stored bytes and, for large file content, the composefs object id."""

    data: bytes
    external: bytes | None = None


def inline_max(repo: Repository) -> int:
    """Content up to this size is kept inside the stream."""
    return 2 * repo.digest_size


class CommitObjects:
    """The objects of a commit being assembled (a pull) or loaded (a stored stream)."""

    def __init__(self, commit: bytes) -> None:
        self.commit = commit
        self.entries: dict[bytes, Entry] = {}
        self.image_id: bytes | None = None
        self.headers: dict[bytes, FileHeader] = {}  # parsed file headers, where already known
        # metadata a pull verified and parsed already: building the image parses no object twice
        self.parsed: dict[bytes, Commit | DirTree | DirMeta] = {}

    def __contains__(self, checksum: bytes) -> bool:
        return checksum in self.entries

    def get(self, checksum: bytes) -> Entry | None:
        return self.entries.get(checksum)

    def add(self, checksum: bytes, entry: Entry) -> None:
        self.entries[checksum] = entry

    def file_header(self, checksum: bytes) -> tuple[FileHeader, bytes | None, bytes]:
        """(header, external object id or None, inline content) of a file object."""
        entry = self.entries.get(checksum)
        if entry is None:
            raise OstreeError(f"commit {self.commit.hex()} lacks object {checksum.hex()}.file: re-pull it")
        header = self.headers.get(checksum)
        if header is not None and entry.external is not None:
            return header, entry.external, b""
        header, end = split_archive_header(entry.data, checksum)
        content = entry.data[end:]
        if entry.external is not None and content:
            raise OstreeError(f"object {checksum.hex()}.file has both an external object and inline content")
        if entry.external is None and not header.is_symlink and len(content) != header.size:
            raise OstreeError(f"object {checksum.hex()}.file: {len(content)} bytes inline, header says {header.size}")
        return header, entry.external, content

    def metadata(self, checksum: bytes, kind: Kind) -> bytes:
        entry = self.entries.get(checksum)
        if entry is None or entry.external is not None:
            raise OstreeError(f"commit {self.commit.hex()} lacks object {checksum.hex()}.{kind.name.lower()}: re-pull it")
        return entry.data

    # ---- the stream -------------------------------------------------------------------

    def to_stream(self, alg: str) -> SplitStreamWriter:
        if self.commit not in self.entries:
            raise OstreeError(f"commit {self.commit.hex()} is not among its own objects")
        ids = sorted(self.entries)
        if len(ids) > 0xFFFFFFFE:
            raise OstreeError("too many objects for one commit stream")
        writer = SplitStreamWriter(alg, CONTENT_OSTREE_COMMIT)
        buckets = [0] * 256
        for i in ids:
            buckets[i[0]] += 1
        for b in range(1, 256):
            buckets[b] += buckets[b - 1]
        infos = []
        content = []
        offset = 0
        for i in ids:
            entry = self.entries[i]
            external = NO_EXTERNAL if entry.external is None else writer.add_object_ref(entry.external)
            size = len(entry.data)
            if offset // ALIGN > 0xFFFFFFFF or size > 0xFFFFFFFF:
                raise OstreeError("commit stream content exceeds the format's 32 GiB")
            infos.append(INFO.pack(offset // ALIGN, size, external))
            padded = -size % ALIGN
            content.append(entry.data + bytes(padded))
            offset += size + padded
        writer.write_inline(HEADER.pack(ids.index(self.commit), 0, *buckets))
        writer.write_inline(b"".join(ids))
        writer.write_inline(b"".join(infos))
        for piece in content:
            writer.write_inline(piece)
        if self.image_id is not None:
            writer.add_named_ref(IMAGE_REF, self.image_id)
        return writer

    @classmethod
    def from_stream(cls, reader: SplitStreamReader, name: str) -> CommitObjects:
        def bad(why: str) -> OstreeError:
            return OstreeError(f"stream {name} is not a valid ostree commit stream: {why}")

        parts = []
        for chunk in reader.chunks():
            if isinstance(chunk, int):
                raise bad("it has an external chunk")
            parts.append(chunk)
        data = b"".join(parts)  # (sliced as bytes: a memoryview's slices would each be copied again)
        if len(data) < HEADER.size:
            raise bad("shorter than its header")
        commit_index, _flags, *buckets = HEADER.unpack_from(data)
        n = buckets[255]
        if any(a > b for a, b in pairwise(buckets)) or commit_index >= n:
            raise bad("bucket table or commit index out of order")
        ids_end = HEADER.size + n * CHECKSUM_SIZE
        area = ids_end + n * INFO.size
        if len(data) < area:
            raise bad(f"{n} objects need {area} bytes of tables, the stream has {len(data)}")
        ids = [data[p:p + CHECKSUM_SIZE] for p in range(HEADER.size, ids_end, CHECKSUM_SIZE)]
        if any(a >= b for a, b in pairwise(ids)):
            raise bad("object ids are not sorted")
        for b in range(256):
            lo = buckets[b - 1] if b else 0
            if bisect.bisect_left(ids, bytes([b + 1]) if b < 255 else b"\xff" * 33) != buckets[b] or (
                    lo < buckets[b] and ids[lo][0] != b):
                raise bad(f"bucket {b} does not match the ids")
        objects = cls(ids[commit_index])
        for index, (block, size, external) in enumerate(INFO.iter_unpack(data[ids_end:area])):
            start = area + block * ALIGN
            if start + size > len(data):
                raise bad(f"object {ids[index].hex()} lies beyond the end of the stream")
            if external != NO_EXTERNAL and external >= len(reader.object_refs):
                raise bad(f"object {ids[index].hex()} names object ref {external} of {len(reader.object_refs)}")
            ext = None if external == NO_EXTERNAL else reader.object_refs[external]
            objects.entries[ids[index]] = Entry(data[start:start + size], ext)
        objects.image_id = reader.named_refs.get(IMAGE_REF)
        return objects


def write_commit_stream(repo: Repository, objects: CommitObjects, ref: str | None,
                        images: Iterable[bytes] = ()) -> bytes:
    """Store the stream; after one syncfs record ``images`` (stored objects: the commit's
    image) and make the stream visible; then point `ostree/<ref>` at it. Its object id."""
    return repo.write_stream(objects.to_stream(repo.alg), stream_name(objects.commit),
                             None if ref is None else REF_PREFIX + encode_ref(ref), images=images)


def load_stream(repo: Repository, name: str) -> CommitObjects:
    """A stored commit by stream name (`ostree-commit-HEX` or `refs/ostree/ENC`)."""
    try:
        reader = repo.open_stream(name, CONTENT_OSTREE_COMMIT)
    except SplitStreamError as e:
        raise OstreeError(f"{e} (the stream is damaged: run `pycfs fsck`)") from None
    return CommitObjects.from_stream(reader, name)


def has_commit(repo: Repository, commit: bytes) -> bool:
    return repo.has_stream(stream_name(commit)) is not None


def list_refs(repo: Repository) -> list[tuple[str, bytes]]:
    """(ref name, commit) of every `streams/refs/ostree/` ref whose stream is an ostree commit."""
    out = []
    for rel, target in repo.list_links("streams/refs/ostree"):
        base = target.rsplit("/", 1)[-1]
        if "/" not in rel and base.startswith(STREAM_PREFIX):
            try:
                commit = bytes.fromhex(base[len(STREAM_PREFIX):])
            except ValueError:
                continue
            if len(commit) == CHECKSUM_SIZE:
                out.append((decode_ref(rel), commit))
    return out


def resolve(repo: Repository, source: str) -> bytes:
    """A commit from a ref name, a full commit id, or a unique prefix of a stored commit's id."""
    commit = dict(list_refs(repo)).get(source)
    if commit is not None:
        return commit
    text = source.lower()
    if len(text) >= 4 and all(c in "0123456789abcdef" for c in text):
        names = [n for n in iter_commit_streams(repo) if n.startswith(STREAM_PREFIX + text)]
        if len(names) == 1:
            return bytes.fromhex(names[0][len(STREAM_PREFIX):])
        if len(names) > 1:
            raise OstreeError(f"{source!r} matches {len(names)} stored commits: give more digits")
    raise OstreeError(f"no ostree commit {source!r} in {repo.path} (see `pycfs ostree images`)")


def load_commit(repo: Repository, source: str, commit: bytes | None = None) -> CommitObjects:
    """The commit `source` names (`resolve`), or `commit` when the caller resolved it already."""
    try:
        return load_stream(repo, stream_name(commit if commit is not None else resolve(repo, source)))
    except RepositoryError as e:
        raise PycfsError(f"{source}: {e}") from None


def iter_commit_streams(repo: Repository) -> Iterator[str]:
    try:
        names = os.listdir(repo.path / "streams")
    except FileNotFoundError:
        return
    yield from (n for n in sorted(names) if n.startswith(STREAM_PREFIX))
