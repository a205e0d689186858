"""Reassembling a splitstream's original bytes (what `pycfs cat` prints)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from pycfs.host.repository import Repository
from pycfs.host.splitstream import SplitStreamReader

_PIECE = 1 << 20


def iter_stream_bytes(repo: Repository, reader: SplitStreamReader) -> Iterator[bytes]:
    """The stream's bytes in order, in pieces of bounded size."""
    for chunk in reader.chunks():
        if isinstance(chunk, bytes):
            yield chunk
            continue
        fd = repo.open_object(reader.object_refs[chunk])
        try:
            offset = 0
            while piece := os.pread(fd, _PIECE, offset):
                yield piece
                offset += len(piece)
        finally:
            os.close(fd)


def stream_digest(repo: Repository, stream_id: bytes, alg: str) -> str:
    """The hex `alg` digest of the stored stream's reassembled bytes (a layer's diff_id)."""
    h = hashlib.new(alg)
    for piece in iter_stream_bytes(repo, repo.open_stream_by_id(stream_id)):
        h.update(piece)
    return h.hexdigest()


def write_stream_to_fd(repo: Repository, reader: SplitStreamReader, out_fd: int) -> int:
    """Write the reassembled stream to out_fd; objects go through sendfile (no user copy)."""
    total = 0
    for chunk in reader.chunks():
        if isinstance(chunk, bytes):
            view = memoryview(chunk)
            while view:
                n = os.write(out_fd, view)
                view = view[n:]
            total += len(chunk)
            continue
        fd = repo.open_object(reader.object_refs[chunk])
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset < size:
                n = os.sendfile(out_fd, fd, offset, size - offset)
                if n == 0:
                    break
                offset += n
            total += offset
        finally:
            os.close(fd)
    return total
