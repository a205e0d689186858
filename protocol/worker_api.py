"""What the host and its object workers (`python -m pycfs.host.workers`) say to each other.

A worker hashes files the host passes as fds (jsonrpc-fdpass) and, when started on a
repository, stores each as an object (reflinked where the filesystem allows). Requests
carry ``sizes``, one per fd, in order; a store request may add ``crcs`` (the tar-split's
CRC-64/GO-ISO of each file, or null), ``sha256s`` (``[PREFIX, SHA256]`` in hex or null:
the SHA-256 of the prefix followed by the content, an ostree content checksum), checked on
the bytes stored before the object is named. The result packs one answer per fd into a few
strings, as the host's framing scans JSON token by token:

    {"ids": HEX,          # the digests, back to back (zeros for a failed file)
     "how": "rcp=-",      # per file: HOW codes below
     "failed": [[INDEX, ERRNO, MESSAGE], ...]}   # the host names the file
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
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
# sends the tar's pieces in order on the socket, one message each (`piece_message`); then
# it closes the socket and answers {"blob": DIGEST, "blob_size": N, "diff_id": DIGEST,
# "tar_size": N, "files_inlined": N} or {"failed": MESSAGE}. File content so never crosses
# to the host: only headers and small files do, with the files' fds for the object workers;
# with ``store`` true the worker makes each file its object itself (hashes and links it, as
# ADOPT does) and sends only PIECE_STORED for them.
INFLATE = "inflate"

# A layer stream's files, in stream order, for one worker that also owns the layer's
# sha256 (its diff_id): fds are a file holding the stream's inline bytes, then the files;
# ``layer`` names the layer (the same worker gets all its requests, in order), ``inline``
# the byte count of each inline piece (one before each file and one after the last), and
# ``store`` false only digests the files (the caller links them), ``first`` true starts the
# layer's sha256 (a later request of a layer the worker no longer holds voids it). Each file's content
# enters the sha256 in the same read that digests it, as stored; the answer is a store's
# (or digest's). LAYER_SHA256 {"layer": N} then answers {"sha256": HEX, or null when a
# file failed or the layer was forgotten} and forgets the layer.
STORE_LAYER = "store_layer"
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
                sha256s: Sequence[tuple[bytes, bytes] | None] | None = None) -> dict[str, Any]:
    """A request's parameters for files of these sizes (one request: at most
    MAX_FILES_PER_REQUEST of them)."""
    params: dict[str, Any] = {"sizes": list(sizes)}
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
    if method == STORE_LAYER:  # digests only when not storing
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


# The messages of an inflate's socket, each one piece of the split tar, in order:
PIECE_INLINE = b"i"  # + up to MAX_INLINE_MESSAGE inline bytes (consecutive ones are one run)
PIECE_FILE = b"f"  # + u64 size, one fd attached: a file's content, written, read-only, unhashed
PIECE_STORED = b"s"  # + u64 size + how code + object id: one the worker stored itself (no O_TMPFILE)
MAX_INLINE_MESSAGE = 64 << 10  # well within a socket's default send buffer
_SIZE = struct.Struct("<Q")


def piece_message(kind: bytes, data: bytes = b"", size: int = 0, how: str = "") -> bytes:
    """One message: inline ``data``, or a file of ``size`` bytes (``how`` and the object id
    in ``data`` for PIECE_STORED)."""
    if kind == PIECE_INLINE:
        if not 0 < len(data) <= MAX_INLINE_MESSAGE:
            raise ValueError(f"an inline message of {len(data)} bytes")
        return kind + data
    if kind == PIECE_FILE:
        return kind + _SIZE.pack(size)
    if kind == PIECE_STORED:
        return kind + _SIZE.pack(size) + HOW_CODES[how].encode() + data
    raise ValueError(f"unknown piece kind {kind!r}")


def parse_piece(message: bytes, nfds: int, digest_size: int) -> tuple[bytes, bytes, int, str]:
    """(kind, inline bytes or object id, size, how) of one message carrying ``nfds`` fds;
    ValueError when malformed."""
    kind, body = message[:1], message[1:]
    if kind == PIECE_INLINE and body and nfds == 0:
        return kind, body, len(body), ""
    if kind == PIECE_FILE and len(body) == _SIZE.size and nfds == 1:
        return kind, b"", _SIZE.unpack(body)[0], ""
    if (kind == PIECE_STORED and len(body) == _SIZE.size + 1 + digest_size and nfds == 0
            and chr(body[_SIZE.size]) in HOW):
        return kind, body[_SIZE.size + 1 :], _SIZE.unpack_from(body)[0], HOW[chr(body[_SIZE.size])]
    raise ValueError(f"a malformed piece message of {len(message)} bytes with {nfds} fds")
