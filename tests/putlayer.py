"""Driving PutLayer in tests: a splitdirfdstream written down a pipe into `put_layer` on a
real pool of object workers, and a spare-worker rule that does not depend on timing."""

from __future__ import annotations

import itertools
import os

import trio

from pycfs.host.repository import Repository
from pycfs.host.varlink import transfer
from pycfs.host.workers.pool import Pinned, open_pool


async def put_stream(repo: Repository, src: os.PathLike | str, stream: bytes, diff_id: str, zerocopy: bool = False,
                     jobs: int = 2) -> transfer.PutResult:
    """PutLayer of ``stream``, whose files are named beneath the directory ``src``."""
    r, w = os.pipe2(os.O_CLOEXEC)
    dirfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with open_pool(repo=repo, jobs=jobs) as pool, trio.open_nursery() as nursery:

            async def feed() -> None:
                async with trio.lowlevel.FdStream(w) as out:
                    await out.send_all(stream)

            nursery.start_soon(feed)
            return await transfer.put_layer(repo, pool, r, [dirfd], diff_id, zerocopy)
    finally:
        os.close(dirfd)


def spill_every_other(monkeypatch) -> None:
    """Every other batch to the worker not keeping the layer's sha256, busy or not (the
    real rule, `LayerConsumer._spare`, waits for it to be spare: a matter of timing)."""
    turn = itertools.count()

    def spare(sha: Pinned) -> Pinned | None:
        other = next(w for w in sha.pool._workers if w is not sha.worker)
        return Pinned(sha.pool, other) if next(turn) % 2 else None

    monkeypatch.setattr(transfer.LayerConsumer, "_spare", staticmethod(spare))
