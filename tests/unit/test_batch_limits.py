"""PutLayer's batches in flight are bounded per object worker: a worker slow with a big
layer cannot take the tokens the other worker's layer needs."""

from __future__ import annotations

import resource

import trio
from pycfs.host.varlink.transfer import BatchLimits
from pycfs.host.workers.batching import batch_files
from pycfs.host.workers.pool import Pinned, WorkerPool


class _Pool:
    jobs = 2
    batches_in_flight = WorkerPool.batches_in_flight


def _fd_limit(monkeypatch, fds: int) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (fds, fds))


def _tokens(limits: BatchLimits, pool: _Pool) -> list[int]:
    return [limits.of(Pinned(pool, object())).total_tokens for _ in range(pool.jobs)]  # type: ignore[arg-type]


def test_each_worker_has_its_own_tokens(monkeypatch) -> None:
    _fd_limit(monkeypatch, 1 << 20)  # (not the limit this test runs under)
    pool, one, two = _Pool(), object(), object()
    limits = BatchLimits(pool)  # type: ignore[arg-type]
    a, b = limits.of(Pinned(pool, one)), limits.of(Pinned(pool, two))  # type: ignore[arg-type]
    assert limits.of(Pinned(pool, one)) is a and a is not b  # type: ignore[arg-type]
    assert a.total_tokens == b.total_tokens == 4

    async def main() -> None:
        # The slow worker's layer holds every token it may: the other's first batch still goes.
        holders = [object() for _ in range(4)]
        for h in holders:
            a.acquire_on_behalf_of_nowait(h)
        with trio.fail_after(1):
            await b.acquire_on_behalf_of(object())
        assert a.available_tokens == 0 and b.available_tokens == 3

    trio.run(main)


def test_tokens_stay_within_the_open_file_limit(monkeypatch) -> None:
    pool = _Pool()
    _fd_limit(monkeypatch, 2 * (batch_files() + 1) * 3)  # half of it: three batches
    assert _tokens(BatchLimits(pool), pool) == [2, 1]  # type: ignore[arg-type]
    _fd_limit(monkeypatch, 16)  # not even one: one each all the same
    assert _tokens(BatchLimits(pool), pool) == [1, 1]  # type: ignore[arg-type]
