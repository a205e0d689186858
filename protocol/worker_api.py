"""What the host and its object workers (`python -m pycfs.host.workers`) say to each other.

A worker hashes files the host passes as fds (jsonrpc-fdpass) and, when started on a
repository, stores each as an object (reflinked where the filesystem allows). Requests
carry ``sizes``, one per fd, in order; a store request may add ``crcs`` (the tar-split's
CRC-64/GO-ISO of each file, or null), ``sha256s`` (``[PREFIX, SHA256]`` in hex or null:
the SHA-256 of the prefix followed by the content, an ostree content checksum), checked on
the bytes stored before the object is named, and ``leased`` true: the host may hold a read
lease on a file's open file already, which the worker then hashes under and leaves in place
(see FEED_LAYER). The result packs one answer per fd into a few
strings, as the host's framing scans JSON token by token:

    {"ids": HEX,          # the digests, back to back (zeros for a failed file)
     "how": "rcp=-",      # per file: HOW codes below
     "failed": [[INDEX, ERRNO, MESSAGE], ...]}   # the host names the file
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

STORE = "store"
DIGEST = "digest"
# Digest only, of files named by absolute ``paths`` (no fds, no sizes): the worker opens
# each itself (regular files only), so a host measuring many files does no per-file work.
DIGEST_PATHS = "digest_paths"
# Files the host wrote itself (a layer blob's content) as anonymous files in the object
# store, passed read-only with no writer left: the worker hashes each and links it as its
# object, so content is written once and hashed off the host's thread.
ADOPT = "adopt"

# A layer blob (fds: the blob, then a SOCK_SEQPACKET socket; params: ``compression``
# gzip|zstd|none, ``blob_alg`` and ``diff_alg`` sha256|sha512), for a worker started on a
# repository: it reads and hashes the blob, decompresses it, hashes the tar and splits it
# (spec 3.2), writing each file's content into an anonymous file of the object store, and
# sends the tar's pieces in order on the socket, as runs of records (`pack_runs`); then
# it closes the socket and answers {"blob": DIGEST, "blob_size": N, "diff_id": DIGEST,
# "tar_size": N, "files_inlined": N} or {"failed": MESSAGE}. File content so never crosses
# to the host: only headers and small files do, with the files' fds for the object workers;
# with ``store`` true the worker makes each file its object itself (hashes and links it, as
# ADOPT does) and sends only PIECE_STORED for them, until the host sends HAND_OFF on the
# socket: from its next run on, the worker sends PIECE_FILE for them, unhashed, for another
# worker to adopt (the host asks this of a layer left alone inflating, when a worker idles).
INFLATE = "inflate"
HAND_OFF = b"h"

# A layer stream's sha256 (its diff_id), kept by one worker across requests in stream
# order. FEED_LAYER's first fd is a file holding the inline bytes, ``inline`` the byte count
# of each inline piece (one before each file and one after the last), ``sizes`` the files'
# lengths, ``read`` says per file (FEED_READS) where its bytes come from:
#   h  the next fd, stored here as STORE stores it, into the sha256 in the same read
#   d  the next fd, digested only (the caller links it), in the same read
#   l  the next fd, the source of an object reflinked elsewhere (a STORE with ``leased``),
#      read again under the host's read lease, which must still be unbroken once read: no
#      writer since before the store, so the bytes the object was named by (the host asks
#      this only of a source on the repository's own filesystem, where it was reflinked)
#   s  the next fd, read as it is (the object itself, or content the host wrote)
#   o  the object in the repository (its pages are cached when a private copy was hashed)
# ``objects``: the digests of the l, s and o files, back to back, in hex. ``layer`` names
# the layer, ``first`` true starts its sha256 (a later request of a layer the worker no
# longer holds voids it). The answer is a store's for the h and d files, in order.
# LAYER_SHA256 {"layer": N} then answers {"sha256": HEX} or {"sha256": null, "failed":
# MESSAGE, or null when forgotten} and forgets the layer.
FEED_LAYER = "feed_layer"
FEED_READS = "hdlso"
LAYER_SHA256 = "layer_sha256"
# Layers a worker keeps a sha256 for: a caller that gave up on a layer never asks for its
# digest, so the oldest is forgotten past this many.
MAX_LAYERS_HELD = 64

HOW = {"r": "reflinked", "c": "copied", "p": "present"}  # store; "=" digest only, "-" failed
HOW_CODES = {v: k for k, v in HOW.items()}
DIGESTED = "="
FAILED = "-"

MAX_FILES_PER_REQUEST = 256
MAX_MESSAGE_BYTES = 1 << 20  # 256 sha512 digests in hex take 32 KiB; failures add messages


@dataclass(frozen=True)
class Stored:
    object_id: bytes
    how: str  # "reflinked", "copied" or "present"


@dataclass(frozen=True)
class Failed:
    """One file the worker could not hash or store; the caller knows which and names it."""

    errno: int
    message: str


def file_params(sizes: Sequence[int], crcs: Sequence[int | None] | None = None,
                sha256s: Sequence[tuple[bytes, bytes] | None] | None = None, leased: bool = False) -> dict[str, Any]:
    """A request's parameters for files of these sizes (one request: at most
    MAX_FILES_PER_REQUEST of them)."""
    params: dict[str, Any] = {"sizes": list(sizes)}
    if leased:
        params["leased"] = True
    if crcs is not None:
        params["crcs"] = list(crcs)
    if sha256s is not None:
        params["sha256s"] = [None if c is None else [c[0].hex(), c[1].hex()] for c in sha256s]
    return params


def parse_answer(obj: dict[str, Any], count: int, method: str, digest_size: int) -> list[tuple[bytes, str] | Failed]:
    """Unpack a response to a request for `count` files: (digest, how code) or Failed per
    file; ValueError when malformed."""
    if "error" in obj:
        raise ValueError(f"refused a request: {obj['error']}")
    result = obj.get("result")
    ids, how, failed = (result.get(k) for k in ("ids", "how", "failed")) if isinstance(result, dict) else (None,) * 3
    codes = {DIGESTED} if method in (DIGEST, DIGEST_PATHS) else set(HOW)
    if method == FEED_LAYER:  # stored, or digested only
        codes |= {DIGESTED}
    try:
        digests = bytes.fromhex(ids) if isinstance(ids, str) else b""
    except ValueError:
        digests = b""
    if (len(digests) != count * digest_size or not isinstance(how, str) or len(how) != count
            or not isinstance(failed, list) or not set(how) <= set(codes) | {FAILED}):
        raise ValueError(f"answered {obj!r} to a request for {count} files")
    out: list[tuple[bytes, str] | Failed] = [
        (digests[i * digest_size : (i + 1) * digest_size], code) for i, code in enumerate(how)
    ]
    for entry in failed:
        if (not isinstance(entry, list) or len(entry) != 3 or type(entry[0]) is not int or type(entry[1]) is not int
                or not isinstance(entry[2], str) or not 0 <= entry[0] < count or how[entry[0]] != FAILED):
            raise ValueError(f"sent a malformed failure: {entry!r}")
        out[entry[0]] = Failed(entry[1], entry[2])
    if any(not isinstance(r, Failed) and r[1] == FAILED for r in out):
        raise ValueError("marked a file failed without saying why")
    return out


def stored_results(answers: list[tuple[bytes, str] | Failed]) -> list[Stored | Failed]:
    """A store request's answers as Stored (or Failed)."""
    return [r if isinstance(r, Failed) else Stored(r[0], HOW[r[1]]) for r in answers]


# The messages of an inflate's socket: the split tar's pieces in order, as records back to
# back, at most MAX_RUN_MESSAGE bytes and MAX_RUN_FDS files' fds a message (`pack_runs`,
# `parse_run`): one message per piece cost a sendmsg, a poll and a recvmsg each, some
# 34,000 of them for the bench image's 17,000 files.
PIECE_INLINE = b"i"  # + u32 length + that many inline bytes (consecutive ones are one run)
PIECE_FILE = b"f"  # + u64 size; the message's next fd: a file's content, written, read-only, unhashed
PIECE_STORED = b"s"  # + u64 size + how code + object id: one the worker stored itself
MAX_RUN_MESSAGE = 64 << 10  # well within a socket's default send buffer
MAX_RUN_FDS = 64
MAX_INLINE_RECORD = MAX_RUN_MESSAGE - 5  # inline bytes in one record (longer runs take several)
_LEN = struct.Struct("<I")
_SIZE = struct.Struct("<Q")

# A record as `parse_run` gives it: (kind, inline bytes or object id, size, how).
Record = tuple[bytes, bytes, int, str]


def piece_record(kind: bytes, data: bytes | memoryview = b"", size: int = 0, how: str = "") -> bytes:
    """One record: inline ``data``, or a file of ``size`` bytes (``how`` and the object id
    in ``data`` for PIECE_STORED)."""
    if kind == PIECE_INLINE:
        if not 0 < len(data) <= MAX_INLINE_RECORD:
            raise ValueError(f"an inline record of {len(data)} bytes")
        return kind + _LEN.pack(len(data)) + bytes(data)
    if kind == PIECE_FILE:
        return kind + _SIZE.pack(size)
    if kind == PIECE_STORED:
        return kind + _SIZE.pack(size) + HOW_CODES[how].encode() + bytes(data)
    raise ValueError(f"unknown piece kind {kind!r}")


def pack_runs(records: Iterable[tuple[bytes, int | None]]) -> Iterator[tuple[bytes, list[int]]]:
    """Records (`piece_record`), each with its fd (a PIECE_FILE's) or None, packed in order
    into messages: (message, the fds that go with it)."""
    parts: list[bytes] = []
    fds: list[int] = []
    size = 0
    for record, fd in records:
        if parts and (size + len(record) > MAX_RUN_MESSAGE or (fd is not None and len(fds) == MAX_RUN_FDS)):
            yield b"".join(parts), fds
            parts, fds, size = [], [], 0
        parts.append(record)
        size += len(record)
        if fd is not None:
            fds.append(fd)
    if parts:
        yield b"".join(parts), fds


def parse_run(message: bytes, nfds: int, digest_size: int) -> list[Record]:
    """The records of one message carrying ``nfds`` fds (the i-th PIECE_FILE's is the
    i-th fd); ValueError when malformed."""
    if not 0 < len(message) <= MAX_RUN_MESSAGE:
        raise ValueError(f"a message of {len(message)} bytes")
    records: list[Record] = []
    at, files, end = 0, 0, len(message)
    while at < end:
        kind = message[at : at + 1]
        if kind == PIECE_INLINE and at + 1 + _LEN.size <= end:
            n = _LEN.unpack_from(message, at + 1)[0]
            start = at + 1 + _LEN.size
            if 0 < n <= end - start:
                records.append((kind, message[start : start + n], n, ""))
                at = start + n
                continue
        elif kind == PIECE_FILE and at + 1 + _SIZE.size <= end:
            records.append((kind, b"", _SIZE.unpack_from(message, at + 1)[0], ""))
            files += 1
            at += 1 + _SIZE.size
            continue
        elif kind == PIECE_STORED and at + 2 + _SIZE.size + digest_size <= end:
            how = chr(message[at + 1 + _SIZE.size])
            if how in HOW:
                start = at + 2 + _SIZE.size
                records.append((kind, message[start : start + digest_size], _SIZE.unpack_from(message, at + 1)[0],
                                HOW[how]))
                at = start + digest_size
                continue
        raise ValueError(f"a malformed piece record at byte {at} of a {end}-byte message")
    if files != nfds:
        raise ValueError(f"a message of {files} files with {nfds} fds")
    return records
