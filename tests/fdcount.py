"""Counting this process's open fds, for tests that must not leak any."""

import os
import resource

import pytest


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def enough_fds():
    """Raise the soft fd limit for tests that pass thousands of fds; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
