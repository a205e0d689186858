"""`pycfs.host.workers.blocking.BlockingStore`: forked object workers asked to store files
without an event loop. Results in order, an early request's answer handed on, at most
IN_FLIGHT requests a worker; a worker that dies or answers out of turn is one error naming
it; the workers exit at EOF and nothing of theirs is left open."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from fdcount import open_fd_count
from pycfs.host.childoutput import ChildOutput
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository
from pycfs.host import stuck
from pycfs.host.workers import blocking
from pycfs.host.workers.blocking import BlockingStore
from pycfs.host.workers.fork import Forked, ForkedProcess, fork_workers, send_early
from pycfs.protocol import worker_api as api
from pycfs.protocol.worker_api import Stored


pytestmark = pytest.mark.usefixtures("idle_threads_allowed")  # (tests/unit/conftest.py)


def _open(tmp_path, sizes):
    files = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        (tmp_path / f"f{i}").write_bytes(data)
        files.append((os.open(tmp_path / f"f{i}", os.O_RDONLY | os.O_CLOEXEC), data))
    return files


def test_files_are_stored_in_order_with_few_requests_in_flight(tmp_path, monkeypatch):
    before = open_fd_count()
    files = _open(tmp_path, [0, 65, 4097, (1 << 20) + 3] * 10)
    with Repository.init(tmp_path / "repo") as repo:
        forked = fork_workers(str(repo.path), 2)
        assert len(forked) == 2
        first = files[:3]
        params = api.file_params([len(d) for _, d in first])
        assert send_early(forked[0], 1, api.STORE, params, [fd for fd, _ in first])
        got: dict[int, list] = {}
        most = []
        real_send = blocking.send_with_fds

        def spy(sock, data, fds):
            most.append(max(len(w.waiting) for w in store._workers))
            real_send(sock, data, fds)

        monkeypatch.setattr(blocking, "send_with_fds", spy)
        store = BlockingStore(forked, repo.digest_size, lambda p: lambda results: got.__setitem__(0, results)
                              if p is params else pytest.fail("not the early request"))
        try:
            for start in range(3, len(files), 2):
                batch = files[start:start + 2]
                store.store([fd for fd, _ in batch], api.file_params([len(d) for _, d in batch]),
                            lambda results, start=start: got.__setitem__(start, results))
            store.drain()
        finally:
            store.close()
        results = [r for start in sorted(got) for r in got[start]]
        assert all(isinstance(r, Stored) for r in results)
        assert [r.object_id for r in results] == [digest_bytes(d) for _, d in files]
        assert repo.read_object(results[-1].object_id) == files[-1][1]
        assert max(most) <= blocking.IN_FLIGHT  # (counted with the request being sent)
        assert [f.proc.returncode for f in forked] == [0, 0]  # exited at EOF
    for fd, _ in files:
        os.close(fd)
    assert open_fd_count() == before


@pytest.mark.parametrize("signal_sent, why", [
    (signal.SIGKILL, ".*"),
    # No CPU used for STUCK_LIMIT with a request waiting (stopped here; in life a read on a
    # stalled filesystem): killed, one error; before, the store waited for good.
    (signal.SIGSTOP, r"it made no progress for 0 s .*: killed"),
])
def test_a_worker_that_dies_or_stops_fails_the_store_naming_it(tmp_path, monkeypatch, signal_sent, why):
    monkeypatch.setattr(stuck, "STUCK_LIMIT", 0.5)
    before = open_fd_count()
    files = _open(tmp_path, [5000] * 8)
    with Repository.init(tmp_path / "repo") as repo:
        forked = fork_workers(str(repo.path), 1)
        store = BlockingStore(forked, repo.digest_size, lambda p: pytest.fail("no early request"))
        os.kill(forked[0].proc.pid, signal_sent)
        started = time.monotonic()
        with pytest.raises(PycfsError, match=rf"^the object worker \(pid {forked[0].proc.pid}\) failed: {why}; "
                                             r"exit status -9$"):
            for fd, data in files:
                store.store([fd], api.file_params([len(data)]), lambda results: None)
            store.drain()
        assert time.monotonic() - started < 10
        store.close(abort=True)
    for fd, _ in files:
        os.close(fd)
    assert open_fd_count() == before


def test_an_answer_out_of_turn_fails_the_store(tmp_path):
    """A peer answering a request it was not asked (a wrong id): one error, and it is killed."""
    ours, theirs = socket.socketpair()
    pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], os.environ)  # stands for the worker's process

    def answer() -> None:
        theirs.recv(65536)
        theirs.sendall(b'{"jsonrpc": "2.0", "id": 7, "result": {"ids": "", "how": "", "failed": []}}')

    peer = threading.Thread(target=answer)
    peer.start()
    forked = Forked(ForkedProcess(pid), ours, ChildOutput("test-output"))
    store = BlockingStore([forked], 32, lambda p: pytest.fail("no early request"))
    try:
        with pytest.raises(PycfsError, match=rf"^the object worker \(pid {pid}\) failed: reply .* answers no waiting request"):
            store.store([], api.file_params([]), lambda results: None)
            store.drain()
    finally:
        store.close(abort=True)
        peer.join()
        theirs.close()
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, os.WNOHANG)
