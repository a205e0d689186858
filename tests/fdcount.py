"""Counting this process's open fds, for tests that must not leak any."""

import gc
import os
import resource

import pytest


def open_fd_count() -> int:
    # Garbage first: an fd held in a reference cycle some earlier test left (a socket in a
    # traceback's frame, say) would otherwise be closed by whichever collection comes next,
    # in the middle of another test's count (a count 1 lower than "before" failed CI once).
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def enough_fds():
    """Raise the soft fd limit for tests that pass thousands of fds; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
