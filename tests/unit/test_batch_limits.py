"""PutLayer's batches in flight, for every layer that shares one pool: four per worker,
within half the open-file limit (each batch holds its files' fds until it is written)."""

from __future__ import annotations

import resource

from pycfs.host.varlink.transfer import batch_limiter
from pycfs.host.workers.batching import batch_files
from pycfs.host.workers.pool import WorkerPool


class _Pool:
    jobs = 2
    batches_in_flight = WorkerPool.batches_in_flight


def _fd_limit(monkeypatch, fds: int) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (fds, fds))


def test_four_batches_per_worker(monkeypatch) -> None:
    _fd_limit(monkeypatch, 1 << 20)  # (not the limit this test runs under)
    assert batch_limiter(_Pool()).total_tokens == 8  # type: ignore[arg-type]


def test_tokens_stay_within_the_open_file_limit(monkeypatch) -> None:
    _fd_limit(monkeypatch, 2 * (batch_files() + 1) * 3)  # half of it: three batches
    assert batch_limiter(_Pool()).total_tokens == 3  # type: ignore[arg-type]
    _fd_limit(monkeypatch, 2)  # not even one: one all the same
    assert batch_limiter(_Pool()).total_tokens == 1  # type: ignore[arg-type]
