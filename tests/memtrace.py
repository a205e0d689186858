"""Memory measured in tests: the peak of Python's allocations while a call runs."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_of(fn: Callable[[], object]) -> int:
    """The peak of Python allocations while fn runs (bytes)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
