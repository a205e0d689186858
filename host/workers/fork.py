"""Object workers started by fork, for a job that knows before its event loop starts that it
will keep them busy (a local ostree pull, once it has walked the commit; `pycfs measure`; an
`oci pull` with a layer to import; `oci copy`).

A forked worker runs the workers' own main (`python -m pycfs.host.workers`) on the modules
this process has loaded already: it is serving within milliseconds, where a spawned one
spends ~0.07 s of CPU starting Python and importing them, on the cores the host and the other
workers need (measured: `pycfs ostree pull-local` of 2,715 files on 2 cores; see the commit).

`fork_workers` forks only while the main thread is this process's only thread (before
trio starts, before a progress display's refresh thread): PR_SET_PDEATHSIG follows the
thread that forked, a fork copies only the calling thread (a lock another one holds then,
rich's or a stream's, would stay held in the child for good), and nothing of the event
loop must be copied into a child. Otherwise it forks none, and the pool spawns its
workers. The child takes fresh stdio objects, keeps only its socket and output, runs in
"/" (as a spawned one: it must keep no directory of the caller's busy), and opens the
repository (if any) itself.

`fork_digest_workers` (`pycfs measure`) forks before trio or the pool is even imported and
writes each worker its first request at once: the workers hash while this process spends
~0.1 s of CPU importing and starting its event loop, where they used to wait for it. The
pool hands their answers to the calls that make the same requests (`Forked.early`).
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pycfs.host.childoutput import ChildOutput, start_on_socket
from pycfs.host.workers.batching import digest_batches
from pycfs.protocol import worker_api as api
from pycfs.protocol.fdpass import send_with_fds
from pycfs.protocol.jsonrpc import encode

@dataclass
class Forked:
    """One forked worker: its process and the host's end of its socket, taken by a pool
    (`open_pool(forked=)`) or by `pycfs.host.workers.blocking.BlockingStore`."""

    proc: ForkedProcess
    sock: socket.socket
    output: ChildOutput
    # Requests written to it already, before any event loop (`fork_digest_workers`, an
    # ostree pull's `fork_workers`, a containers-storage pull's head start): (id, method,
    # params), answered in this order ahead of anything sent later.
    early: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


class ForkedProcess:
    """A forked child as `pycfs.host.childoutput.ChildProcess` takes it (a `Process`, as a
    spawned child's `subprocess.Popen` is)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def fork_workers(repo_path: str | None, jobs: int, alg: str = "sha256") -> list[Forked]:
    """``jobs`` workers storing into the repository at ``repo_path`` (only hashing with
    ``alg`` when it is None), forked now; none (the pool spawns its own then) when this is
    not the main thread, another thread runs, or a fork fails."""
    if not _alone():
        return []
    for stream in (sys.stdout, sys.stderr):  # what is buffered would be written twice
        stream.flush()
    workers: list[Forked] = []
    try:
        for _ in range(jobs):
            workers.append(_fork_one(["--repo", os.path.abspath(repo_path)] if repo_path else ["--alg", alg]))
    except OSError:
        discard(workers)
        return []
    return workers


def absolute_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The paths as names a worker, which runs in "/", resolves to the same files: joined to
    the cwd as the kernel would resolve them (no normalisation)."""
    names = [os.fspath(path) for path in paths]
    if all(name.startswith("/") for name in names):  # getcwd fails in a removed directory
        return names
    cwd = os.getcwd()
    return [os.path.join(cwd, name) for name in names]


def fork_digest_workers(names: Sequence[str], jobs: int, alg: str = "sha256") -> list[Forked]:
    """``jobs`` digest-only workers (see `fork_workers`), each sent one of the first
    DIGEST_PATHS requests `digest_files` will make of ``names`` (absolute). Import nothing of
    trio before calling this: the workers are meant to hash while that happens.

    One request each, no more: nothing reads the workers' answers until the pool starts, so
    a worker with a second request could block writing its first answer while this process
    blocks writing that second request to it (200,000 small files hung so)."""
    workers = fork_workers(None, jobs, alg)
    for worker, (request_id, (start, end)) in zip(workers, enumerate(digest_batches(names), 1)):
        if not send_early(worker, request_id, api.DIGEST_PATHS, {"paths": list(names[start:end])}):
            break
    return workers


def send_early(worker: Forked, request_id: int, method: str, params: dict[str, Any], fds: Sequence[int] = ()) -> bool:
    """Write a forked worker an early request (`Forked.early`; how many before answers are
    read is each caller's bound: see `fork_digest_workers`, `pycfs.host.oci.headstart`),
    ``fds`` passed with it (the caller may close its own then). False when it could not be
    written: nothing of it went (too many fds in flight for the user, or the worker gone:
    whoever takes the worker, a pool or a BlockingStore, meets that as it reads its
    socket), or part of it did (the worker is killed then, so no one reads on from half a
    request)."""
    request = {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
    try:
        if not send_with_fds(worker.sock, encode(request, len(fds), api.MAX_MESSAGE_BYTES), fds, whole_or_none=True):
            return False
    except OSError:
        worker.proc.kill()
        return False
    worker.early.append((request_id, method, params))
    return True


def discard(workers: Sequence[Forked]) -> None:
    """Stop and reap forked workers no pool took (their sockets and outputs closed); again
    for the same workers, nothing."""
    for worker in workers:
        worker.proc.kill()
        if worker.proc.returncode is None:  # (kill polls first: an exit seen there is reaped)
            _, status = os.waitpid(worker.proc.pid, 0)
            worker.proc.returncode = os.waitstatus_to_exitcode(status)
        worker.sock.close()
        worker.output.close()


def _alone() -> bool:
    """Whether the main thread is running this, and no other thread exists."""
    return threading.current_thread() is threading.main_thread() and threading.active_count() == 1


def _fork_one(argv: list[str]) -> Forked:
    def start(child: int, output: int) -> ForkedProcess:
        pid = os.fork()
        if pid == 0:
            _child(child, output, argv)  # never returns
        return ForkedProcess(pid)

    return Forked(*start_on_socket(start, "pycfs-worker-output"))


def _child(sock_fd: int, output_fd: int, argv: list[str]) -> None:
    status = 1
    try:
        # What was inherited lives as long as the worker: collections need not walk it
        # (walking it would also write to, and so copy, the pages it shares with the host).
        gc.freeze()
        os.setsid()  # as a spawned worker: a terminal's Ctrl-C reaches only the host
        os.dup2(sock_fd, 0)  # where the workers' main takes its socket from
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.chdir("/")
        # Nothing of the host's: its repository and source, and the other workers' host ends
        # (a copy held here would keep such a worker from seeing the host close its end).
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        # Line-buffered, as a spawned worker's stderr: a worker killed by a signal leaves
        # its last lines for the pool to quote.
        sys.stdout = sys.stderr = open(1, "w", encoding="utf-8", errors="replace", closefd=False,  # noqa: SIM115 (until _exit)
                                       buffering=1)
        sys.modules.pop("pycfs.host.workers.__main__", None)  # its parent pid is read at import
        from pycfs.host.workers.__main__ import main

        status = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(status)
