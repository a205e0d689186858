"""Fixtures shared by unit test modules."""

from __future__ import annotations

import threading

import pytest
from pycfs.host.workers import fork


@pytest.fixture
def idle_threads_allowed(monkeypatch):
    """fork_workers forks only while the main thread is alone (test_no_fork_while_another_thread_runs);
    earlier tests leave trio's idle cached threads behind for 10 s, so here only the main-thread rule holds."""
    monkeypatch.setattr(fork, "_alone", lambda: threading.current_thread() is threading.main_thread())
