"""The child processes pycfs talks JSON-RPC to over a socketpair (the user-namespace helper
through `podman unshare`, the object workers): starting one, where its output goes, and
reading its messages. Used by `pycfs.host.helperclient` and `pycfs.host.workers.pool`.

Its stdout and stderr go to a memfd, so nothing has to keep draining a pipe, and their tail
is there to quote when the child fails."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from pycfs.protocol.fdpass import arecv_with_fds
from pycfs.protocol.jsonrpc import Decoder, Message

TAIL_BYTES = 2048
T = TypeVar("T")


class ChildOutput:
    def __init__(self, name: str) -> None:
        self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)

    def note(self) -> str:
        """``"; its last output: ..."`` (the end of what the child printed, as one line), or ""."""
        if self.fd is None:
            return ""
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, TAIL_BYTES, max(0, size - TAIL_BYTES))
        text = tail.decode("utf-8", "replace").strip()
        if not text:
            return ""
        # One line, as PycfsError messages are.
        return "; its last output: " + " | ".join(line.strip() for line in text.splitlines() if line.strip())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Process(Protocol):
    """What `ChildProcess` needs of a child: a `subprocess.Popen`, or a forked one's
    `pycfs.host.workers.fork.ForkedProcess`."""

    pid: int

    def poll(self) -> int | None: ...
    def kill(self) -> None: ...


class ChildProcess:
    """A child forked from the main thread. PR_SET_PDEATHSIG, which ties a child's life to
    its parent, fires when the *thread* that forked it exits; trio's open_process forks in a
    cached thread, which exits after idling 10 s, and took object workers with it (SIGKILL in
    the middle of long pulls)."""

    def __init__(self, popen: Process) -> None:
        self._popen = popen
        self.pid = popen.pid
        import trio  # here, not at the top: `pycfs measure` forks its workers before importing trio

        # A forked worker may be reaped already (one found gone as it was written its
        # early requests): its status is known, there is nothing to wait on.
        self._pidfd = os.pidfd_open(popen.pid) if popen.poll() is None else -1
        self._waiting = trio.Lock()  # one task at a time may wait on the pidfd

    @property
    def returncode(self) -> int | None:
        status = self._popen.poll()
        if status is not None and not self._waiting.locked():
            self._close()
        return status

    async def wait(self) -> int:
        import trio

        async with self._waiting:
            while (status := self._popen.poll()) is None:
                await trio.lowlevel.wait_readable(self._pidfd)
            self._close()
        return status

    def _close(self) -> None:
        """The pidfd goes once the exit is seen (callers need not close anything)."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def kill(self) -> None:
        self._popen.kill()


async def spawn_on_socket(argv: Sequence[str], output_name: str) -> tuple[ChildProcess, Any, ChildOutput]:
    """Start `argv` with one end of a new socketpair as its stdin and its output in a memfd;
    returns (the process, our end as a trio socket, its output). OSError when it cannot
    start (nothing is left open then).

    cwd "/": `python -m` puts the cwd on sys.path, which must not shadow pycfs. A session of
    its own: a terminal's Ctrl-C reaches only the host, which then ends the child in order."""
    proc, parent, output = start_on_socket(lambda child, out: ChildProcess(subprocess.Popen(
        list(argv), stdin=child, stdout=out, stderr=out, cwd="/", start_new_session=True)), output_name)
    import trio

    return proc, trio.socket.from_stdlib_socket(parent), output


def start_on_socket(start: Callable[[int, int], T], output_name: str) -> tuple[T, socket.socket, ChildOutput]:
    """``start(child_end, output_fd)`` starts a child (spawned or forked) on one end of a new
    socketpair, its output going to a new memfd; returns (what ``start`` returned, our end,
    the output). When ``start`` raises, nothing is left open."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    output = ChildOutput(output_name)
    assert output.fd is not None
    try:
        started = start(child.fileno(), output.fd)
    except BaseException:
        parent.close()
        output.close()
        raise
    finally:
        child.close()
    return started, parent, output


async def receive_message(sock: Any, decoder: Decoder) -> Message | None:
    """The child's next message (its fds the caller's); None once it closed the connection
    between messages. OSError, ProtocolError or FdPassError when the stream breaks."""
    while (msg := decoder.next_message()) is None:
        data, fds = await arecv_with_fds(sock)
        if not data and not fds:
            decoder.feed_eof()
            return decoder.next_message()
        decoder.feed(data, fds)
    return msg
