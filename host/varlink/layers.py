"""The splitdirfdstream layer transport: fd layout of a `GetLayer` reply, and reconstruction.

A `GetLayer` caller ends up with one fd array (the batches of every reply frame, in order):

    [0]               read end of the data pipe (the stream's bytes until EOF)
    [1 .. dir_count]  the dirfds region: chunk dirfd_index i means array index 1 + i; the
                      real directories sit at seed-chosen slots, every other slot is an
                      inert dummy (/dev/null or a memfd)
    [dir_count+1 ..]  lifetime fds: the keepalive pipe's write end, then 0-2 dummies

The awkwardness is deliberate and runs in production: a client that assumes "the
directory is fd 1", reads only the first frame or drops trailing fds fails at once,
deterministically for a given layer (the seed comes from its id).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pycfs.host import syscalls
from pycfs.host.oci.streams import MAX_IMAGE_LAYERS
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.splitdirfdstream import (
    Chunk,
    DirfdIndexOutOfRange,
    ExternalTooShort,
    FileBackedData,
    SplitDirFdStreamError,
    validate_filename,
)

MAX_FDS_PER_FRAME = 240
# What a consumer takes of a GetLayer reply: dir_count slots for the real directories of a
# chain of at most MAX_IMAGE_LAYERS layers and as many dummies, plus one (sparse_dir_slots);
# lifetime fds: the keepalive and 0-2 dummies (the spec leaves the count open: some slack).
MAX_DIR_COUNT = 2 * MAX_IMAGE_LAYERS + 1
MAX_LIFETIME_FDS = 8
RECONSTRUCT_BUFSIZE = 128 << 10


def seed_from_id(layer_id: str) -> int:
    """First 8 bytes of SHA-256(id) as a little-endian u64."""
    return int.from_bytes(hashlib.sha256(layer_id.encode()).digest()[:8], "little")


def sparse_dir_slots(n_real: int, seed: int) -> tuple[int, list[int]]:
    """(dir_count, the real slots ascending): at least one dummy slot, placed by the seed.
    Which slots are real is not part of the contract; only dirfd_index values are."""
    n_dummy = (seed >> 8) % (n_real + 1) + 1
    total = n_real + n_dummy
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return total, sorted(order[:n_real])


def n_extra_lifetime_fds(seed: int) -> int:
    return (seed >> 16) % 3


def _dummy(ordinal: int) -> int:
    if ordinal % 2 == 0:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    return os.memfd_create("composefs-layer-transfer-dummy", os.MFD_CLOEXEC)


@dataclass
class FdLayout:
    fds: list[int]  # the whole array, owned: close after sending
    dir_count: int
    real_slots: list[int]
    keepalive_read: int  # stays with the producer: EOF once every copy of the write end is gone


def build_layout(pipe_read: int, real_dirfds: Sequence[int], seed: int) -> FdLayout:
    """The array for pipe_read and the real directory fds (in chain order); takes ownership
    of pipe_read and the dirfds (closed on failure)."""
    made: list[int] = []
    try:
        dir_count, real_slots = sparse_dir_slots(len(real_dirfds), seed)
        region: list[int] = []
        ordinal = 0
        real = iter(real_dirfds)
        for slot in range(dir_count):
            if slot in real_slots:
                region.append(next(real))
            else:
                fd = _dummy(ordinal)
                made.append(fd)
                region.append(fd)
                ordinal += 1
        keep_r, keep_w = os.pipe2(os.O_CLOEXEC)
        made += [keep_r, keep_w]
        extras = [_dummy(i) for i in range(n_extra_lifetime_fds(seed))]
        made += extras
    except BaseException:
        close_fds(made + [pipe_read, *real_dirfds])
        raise
    return FdLayout([pipe_read, *region, keep_w, *extras], dir_count, real_slots, keep_r)


def n_frames(count: int, seed: int) -> int:
    """Frames for `count` fds with `more`: at least 3 for any real layer (so clients must
    handle continues), never more than MAX_FDS_PER_FRAME fds in one."""
    hash_min = max(count, 1) if count < 3 else min(max(seed % (count + 1), 3), count)
    n = max(hash_min, math.ceil(count / MAX_FDS_PER_FRAME))
    return min(max(n, 1), max(count, 1))


def split_frames(fds: Sequence[int], seed: int) -> list[list[int]]:
    """Contiguous, order-preserving batches; the first count % n get one more."""
    n = n_frames(len(fds), seed)
    base, extra = divmod(len(fds), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(list(fds[start : start + size]))
        start += size
    return out


_RESOLVE = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS | syscalls.RESOLVE_NO_XDEV


def open_beneath(dirfd: int, name: bytes) -> tuple[int, os.stat_result]:
    """Open a referenced file read-only beneath dirfd, only if it is a regular file (fd and
    its fstat): a validated name, then `syscalls.open_regular`, which refuses escapes (a
    symlink staying inside may be followed) and opens no fifo or device
    (syscalls.NotRegularFile)."""
    validate_filename(name)
    return syscalls.open_regular(dirfd, name, follow=True, resolve=_RESOLVE)


def reconstruct(chunks: Iterable[Chunk], dirfds: Sequence[int], write: Callable[[bytes], object]) -> int:
    """Write the byte stream the chunks describe; returns its length. A referenced file
    longer than declared gives its prefix; a shorter one is ExternalTooShort."""
    total = 0
    for chunk in chunks:
        if not isinstance(chunk, FileBackedData):
            write(chunk.data)
            total += len(chunk.data)
            continue
        if chunk.dirfd_index >= len(dirfds):
            raise DirfdIndexOutOfRange(chunk.dirfd_index, len(dirfds))
        try:
            fd, _ = open_beneath(dirfds[chunk.dirfd_index], chunk.name)
        except syscalls.NotRegularFile:
            raise SplitDirFdStreamError(f"{chunk.name!r} is not a regular file") from None
        try:
            offset = 0
            while offset < chunk.length:
                piece = os.pread(fd, min(RECONSTRUCT_BUFSIZE, chunk.length - offset), offset)
                if not piece:
                    raise ExternalTooShort(chunk.length, offset)
                write(piece)
                offset += len(piece)
        finally:
            os.close(fd)
        total += chunk.length
    return total
