"""Forked object workers (`pycfs.host.workers.fork`) asked to store files by blocking calls,
without an event loop: for a job that knows every file before it starts (a local ostree
pull, once its commit is walked). Its host then never imports trio, whose import and
machinery were a sixth of such a pull's CPU (~0.1 s) and, on its critical path, time the
workers waited for the pool.

Requests go to the worker with the fewest unanswered ones, at most IN_FLIGHT each (one being
stored, the next queued behind it); `store` reads answers while every worker has that many.
With so few unanswered, what a worker writes back (~70 bytes a file) stays far below its
socket's buffer: it never blocks writing an answer while this process blocks writing it a
request. A worker that dies, answers out of turn or is stuck (`stuck`) fails the job with one PycfsError
naming it, its exit status and its last output, as the pool's do.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pycfs.host.errors import PycfsError
from pycfs.host import stuck
from pycfs.host.workers.fork import Forked, ForkedProcess, discard
from pycfs.protocol import worker_api as api
from pycfs.protocol.fdpass import FdPassError, recv_with_fds, send_with_fds
from pycfs.protocol.jsonrpc import Decoder, ProtocolError, encode
from pycfs.protocol.worker_api import Failed, Stored

IN_FLIGHT = 2
EXIT_GRACE = 5.0  # as the pool's: then SIGKILL

Done = Callable[[list[Stored | Failed]], None]


@dataclass
class _Request:
    id: int
    count: int  # files
    done: Done


class _Worker:
    def __init__(self, forked: Forked) -> None:
        self.forked = forked
        self.decoder = Decoder(api.MAX_MESSAGE_BYTES, max_fds=0)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.watch = stuck.Watch(forked.proc.pid)

    def describe(self) -> str:
        return f"object worker (pid {self.forked.proc.pid})"


class BlockingStore:
    """STORE requests to forked workers. ``early_done(params)``: the callback for a request
    `fork.send_early` wrote a worker already (``params``: the very dict sent), called with
    its results when they come, as `store`'s ``done`` is."""

    def __init__(self, forked: Sequence[Forked], digest_size: int, early_done: Callable[[dict[str, Any]], Done]) -> None:
        self.digest_size = digest_size
        self._forked = forked
        self._workers = [_Worker(f) for f in forked]
        self._by_fd = {w.forked.sock.fileno(): w for w in self._workers}
        self._poll = select.poll()
        self._next_id = 0
        for w in self._workers:
            self._poll.register(w.forked.sock, select.POLLIN)
            for request_id, method, params in w.forked.early:
                if method != api.STORE:
                    raise ValueError(f"early {method} request: only store requests are taken")
                w.waiting.append(_Request(request_id, len(params["sizes"]), early_done(params)))
                self._next_id = max(self._next_id, request_id)

    def store(self, fds: Sequence[int], params: dict[str, Any], done: Done) -> None:
        """Send a STORE request of ``fds`` (the caller may close its own once this returns);
        ``done`` gets its results (Stored or Failed per fd) from a later call here, from
        `drain`, or from this one while it waits for a worker with room."""
        while len((worker := min(self._workers, key=lambda w: len(w.waiting))).waiting) >= IN_FLIGHT:
            self._read_some()
        self._next_id += 1
        request = {"jsonrpc": "2.0", "method": api.STORE, "params": params, "id": self._next_id}
        worker.waiting.append(_Request(self._next_id, len(fds), done))
        try:
            send_with_fds(worker.forked.sock, encode(request, len(fds), api.MAX_MESSAGE_BYTES), fds)
        except OSError as e:
            self._fail(worker, f"cannot send to it: {e}")

    def drain(self) -> None:
        """Every answer taken."""
        while any(w.waiting for w in self._workers):
            self._read_some()

    def _read_some(self) -> None:
        """Read what the workers have written (blocking until one has), handing on each
        whole answer; a worker found stuck (`stuck`) meanwhile fails the job."""
        ready = self._poll.poll(stuck.check_every() * 1000)
        if not ready:
            for worker in self._workers:
                if worker.watch.stuck(bool(worker.waiting), time.monotonic()):
                    worker.forked.proc.kill()
                    self._fail(worker, stuck.stuck_message())
        for fd, _events in ready:
            worker = self._by_fd[fd]
            answered: list[tuple[_Request, list[Stored | Failed]]] = []
            try:
                data, fds = recv_with_fds(worker.forked.sock)
                if not data and not fds:
                    worker.decoder.feed_eof()
                else:
                    worker.decoder.feed(data, fds)
                while (msg := worker.decoder.next_message()) is not None:
                    msg.close()
                    request = worker.waiting.popleft() if worker.waiting else None
                    if request is None or msg.obj.get("id") != request.id:
                        raise ProtocolError(f"reply {msg.obj!r} answers no waiting request")
                    try:
                        results = api.parse_answer(msg.obj, request.count, api.STORE, self.digest_size)
                    except ValueError as e:
                        raise PycfsError(f"the {worker.describe()} {e}") from None
                    answered.append((request, api.stored_results(results)))
                if not data and not fds:
                    raise EOFError("it closed the connection")
            except (OSError, EOFError, ProtocolError, FdPassError) as e:
                self._fail(worker, str(e))
            finally:
                # outside the worker's errors: what `done` raises is the caller's own
                for request, stored in answered:
                    request.done(stored)

    def _fail(self, worker: _Worker, what: str) -> None:
        proc = worker.forked.proc
        _wait_exit(proc, 1.0)
        exited = f"; exit status {proc.returncode}" if proc.returncode is not None else ""
        raise PycfsError(f"the {worker.describe()} failed: {what}{exited}{worker.forked.output.note()}")

    def close_input(self) -> None:
        """No more requests: EOF to every worker, so they exit while the caller goes on."""
        for w in self._workers:
            try:
                w.forked.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, abort: bool = False) -> None:
        """EOF to every worker and wait for them to exit (killing them after EXIT_GRACE);
        ``abort``: kill them at once (what they stored is whole: objects appear whole or not
        at all). Their sockets and outputs are closed."""
        self.close_input()
        deadline = time.monotonic() + (0 if abort else EXIT_GRACE)
        try:
            for w in self._workers:
                _wait_exit(w.forked.proc, deadline - time.monotonic())
        finally:  # (a Ctrl-C in the wait too)
            for w in self._workers:
                w.decoder.close()
            discard(self._forked)


def _wait_exit(proc: ForkedProcess, timeout: float) -> None:
    """Until the process exited (and was reaped) or ``timeout`` seconds passed."""
    if proc.poll() is not None or timeout <= 0:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        proc.poll()
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    proc.poll()
