"""The `pycfs` process's standard streams, set up before anything opens a file.

- A closed fd 0 or 2 gets /dev/null (Python would leave sys.stdin / sys.stderr None, and the
  next file opened, a repository's say, would become fd 0 or 2 for a stray read or print to
  hit); a closed stdout fails every command in one line: its result would be lost.
- stderr carries progress and notes: a reader that went away (EPIPE), or a full disk, loses
  them, not the work; the exit status still says how the work went.
- stdout carries the result: a failed write names standard output (not the repository the
  command was working on), and EPIPE, the reader gone, ends the command with 141 (as a
  SIGPIPE death would) where it had not already failed.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any

from pycfs.host.errors import PycfsError

SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `cmd | head` when cmd dies of it


class StdoutGone(PycfsError):
    """stdout's reader went away: nothing more to say to anyone (no line on stderr)."""


class OutputError(PycfsError):
    """Writing to stdout failed (a full disk, a quota, an I/O error)."""


def output_error(e: OSError) -> PycfsError:
    """The error for a failed write to stdout."""
    if isinstance(e, BrokenPipeError):
        return StdoutGone("standard output was closed by its reader")
    return OutputError(f"cannot write to standard output: {e.strerror or e}")


# Errors a write gives that no read does: an OSError of writing to fd 1 with one of these
# is stdout's even where (sendfile) one call both reads and writes.
WRITE_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class _Stdout(io.FileIO):
    def write(self, b: Any, /) -> int:
        try:
            return super().write(b)
        except BlockingIOError:
            raise  # BufferedWriter's to handle
        except OSError as e:
            raise output_error(e) from None


class _Stderr(io.FileIO):
    def write(self, b: Any, /) -> int:
        try:
            return super().write(b)
        except OSError:  # the reader left (EPIPE), or a full disk: the line is lost, not the work
            return memoryview(b).nbytes


def _text(raw: io.FileIO, like: Any, errors: str) -> io.TextIOWrapper:
    """A text stream on raw buffered as Python's own stream `like` was (stderr: by line;
    neither with python -u or PYTHONUNBUFFERED)."""
    unbuffered = like is not None and isinstance(getattr(like, "buffer", None), io.RawIOBase)
    return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw),
                            encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or errors,
                            line_buffering=getattr(like, "line_buffering", True), write_through=unbuffered)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _plug(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    if null != fd:
        os.dup2(null, fd, inheritable=True)
        os.close(null)
    else:
        os.set_inheritable(fd, True)


def set_up() -> None:
    """Plug closed fds 0 and 2, and put sys.stdout and sys.stderr on the writers above.
    Raises OutputError, after that, when stdout is closed."""
    stdout_closed = _closed(1)
    if _closed(0):
        _plug(0)
        sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)  # noqa: SIM115 (the process's)
    if _closed(2):
        _plug(2)
    sys.stderr = _text(_Stderr(2, "w", closefd=False), sys.stderr, "backslashreplace")
    if stdout_closed:
        raise OutputError("standard output is closed: give the command one (e.g. >/dev/null to drop what it prints)")
    sys.stdout = _text(_Stdout(1, "w", closefd=False), sys.stdout, "strict")
