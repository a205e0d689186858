"""How much work goes to the object workers: how many workers, and how many files (and
bytes) one request carries. One policy for every caller (a layer import, PutLayer,
`pycfs measure`, ostree pulls, oci copy). Free of trio: `pycfs measure` and local ostree
pulls batch their first requests before the event loop is imported (`pycfs.host.workers.fork`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Sequence

from pycfs.protocol import worker_api as api
from pycfs.protocol.fdpass import SCM_MAX_FD


def default_jobs() -> int:
    """One worker per CPU this process may run on (its affinity mask, which containers and
    CI runners often narrow, not the machine's count)."""
    return len(os.sched_getaffinity(0)) or 1


# Content per store request of a layer import, beside `batch_files()`: the worker reads each
# byte once (hashing it); at 4 or 8 MiB most of the bench image's batches were cut by size.
BATCH_BYTES = 32 << 20


def batch_files() -> int:
    """Files per store request of a layer import (PutLayer's and containers-storage's): as
    many as one message's fds allow beside one more (PutLayer's memfd of inline bytes), as
    per-request costs (a message each way, a thread trip) were a fifth of PutLayer's CPU at
    64 files; but an eighth of the open-file limit at most: each layer being put holds the
    batch it builds open besides those in flight (half the limit, `batches_in_flight`), and
    at the usual soft limit of 1024 three layers at once would not fit otherwise."""
    return max(1, min(SCM_MAX_FD - 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8))


def batches_in_flight(jobs: int, batch_files: int, per_worker: int = 2) -> int:
    """How many batches of up to `batch_files` fds callers should keep in flight to ``jobs``
    workers: `per_worker` per worker (by default one being hashed, the next queued behind
    it), within half the open-file limit, as each batch holds its fds open until answered
    (or, written before the pool reads answers, in flight: the kernel refuses more fds in
    flight than that limit)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, min(per_worker * jobs, soft // 2 // batch_files))


# Files per DIGEST_PATHS request: at most MEASURE_BATCH (on the bench's 17,130 files the host
# spent 0.30 CPU-s at 64, 0.24 at 256: a request's round trip costs it ~0.2 ms), and at most an
# eighth of what is left, but MEASURE_BATCH_MIN: the workers run out of files together.
MEASURE_BATCH = 256
MEASURE_BATCH_MIN = 16
# Path text per request: a name escaped in JSON takes at most 6 bytes a character.
MEASURE_BATCH_CHARS = api.MAX_MESSAGE_BYTES // 8


def digest_batches(names: Sequence[str]) -> Iterator[tuple[int, int]]:
    """(start, end) of each DIGEST_PATHS request's share of names: MEASURE_BATCH of them at
    first, fewer towards the end, and fewer when long."""
    start, chars, want = 0, 0, _batch_files(len(names))
    for i, name in enumerate(names):
        if i > start and (i - start == want or chars + len(name) > MEASURE_BATCH_CHARS):
            yield start, i
            start, chars, want = i, 0, _batch_files(len(names) - i)
        chars += len(name)
    if start < len(names):
        yield start, len(names)


def _batch_files(left: int) -> int:
    return max(MEASURE_BATCH_MIN, min(MEASURE_BATCH, left // 8))
