"""Host side of the object workers: a pool of `python -m pycfs.host.workers` processes.

    async with open_pool(repo=repo) as pool:          # or open_pool(alg="sha256"): digests only
        results = await pool.store(fds, sizes)        # Stored | Failed per fd, in order
        digests = await pool.digest(fds, sizes)       # bytes | Failed per fd, in order

    await digest_files(paths)                         # bytes | OSError per path (`pycfs measure`)

The workers start on the first call (a pull with every layer present needs none) and
stop when the block ends: EOF on their sockets, then a grace period, then SIGKILL. They
also die with the host (PR_SET_PDEATHSIG). The caller keeps its fds and closes them once
a call returns (the worker got its own copies). A pool opened with `small_here` (and no
number of jobs) serves calls in this process until they have brought START_AFTER_BYTES of
content, and until the workers that then start are up: a small job starts no process.

Requests go to the worker with the fewest unanswered ones, and several may wait at one
worker, so it never idles while the host prepares the next batch. A worker that dies,
misbehaves or is stuck (`pycfs.host.stuck`: no progress for long with requests waiting)
fails the pool: every waiting and later call raises `PycfsError`, naming the worker, its
exit status and its last output.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from pycfs.host import stuck
from pycfs.host.childoutput import ChildOutput, ChildProcess, receive_message, spawn_on_socket
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import DIGEST_SIZES, IN_PROCESS_BYTES, Identity, digest_regular_files, small_job
from pycfs.host.nursery import open_nursery
from pycfs.host.workers.batching import batches_in_flight, default_jobs, digest_batches
from pycfs.host.workers.fork import Forked, absolute_names, discard
from pycfs.host.workers.service import WorkerService
from pycfs.protocol import worker_api as api
from pycfs.protocol.worker_api import Failed, Stored
from pycfs.protocol.fdpass import FdPassError, asend_with_fds
from pycfs.protocol.jsonrpc import Decoder, ProtocolError, encode
from pycfs.protocol.rpcserver import Call, InvalidParamsError

if TYPE_CHECKING:  # a pool for `pycfs measure` (digests only) needs none of the repository code
    from pycfs.host.repository import Repository

EXIT_GRACE = 5.0


@dataclass(frozen=True)
class Inflated:
    """What a worker read of a layer blob and wrote of its tar (`WorkerPool.inflate`)."""

    blob: str  # digest, "alg:hex"
    blob_size: int
    diff_id: str
    tar_size: int
    files_inlined: int  # regular files small enough to stay inline


class _Reply:
    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.done = trio.Event()
        self.obj: dict[str, Any] | None = None


class _Worker:
    def __init__(self, proc: ChildProcess, sock: Any, output: ChildOutput) -> None:
        self.proc = proc
        self.sock = sock
        self.output = output
        self.waiting: collections.deque[_Reply] = collections.deque()
        # Requests given to it and not yet answered, counted as soon as it is chosen: the
        # choice of the next request must see this one even before it is sent.
        self.assigned = 0
        self.send_lock = trio.Lock()
        self.watch = stuck.Watch(proc.pid)

    def describe(self) -> str:
        return f"object worker (pid {self.proc.pid})"


class WorkerPool:
    def __init__(self, nursery: trio.Nursery, argv: list[str], jobs: int, alg: str,
                 local: WorkerService | None = None) -> None:
        """``local``: the workers' methods in this process. They serve calls (one at a
        time, on a thread) until the workers are up; the workers start once calls have
        brought START_AFTER_BYTES of content (or `start` is called). A small job then
        starts no process, and a large one does not wait for them to start."""
        self._nursery = nursery
        self.digest_size = DIGEST_SIZES[alg]
        self._argv = argv
        self.jobs = jobs
        self._workers: list[_Worker] = []
        self._local = local
        self._local_bytes = 0
        self._local_limiter = trio.CapacityLimiter(1)
        self._start_lock = trio.Lock()
        self._next_id = 0
        # Requests forked workers were sent before the pool existed (`Forked.early`), not yet
        # asked for: (method, params, worker, reply).
        self._early: list[tuple[str, dict[str, Any], _Worker, _Reply]] = []
        self._closing = False
        self._failure: PycfsError | None = None

    def batches_in_flight(self, batch_files: int, per_worker: int = 2) -> int:
        """How many batches of up to `batch_files` fds callers should keep in flight to
        this pool's workers (`pycfs.host.workers.batching.batches_in_flight`)."""
        return batches_in_flight(self.jobs, batch_files, per_worker)

    # -- calls --

    async def store(self, fds: Sequence[int], sizes: Sequence[int],
                    crcs: Sequence[int | None] | None = None,
                    sha256s: Sequence[tuple[bytes, bytes] | None] | None = None) -> list[Stored | Failed]:
        """Store each file as an object of the pool's repository; ``crcs``: the CRC-64/GO-ISO
        each file's content must have (None: unchecked), ``sha256s``: (prefix, SHA-256 of the
        prefix and the content) or None per file, else that file fails (see
        `Repository.store_object_from_fd`)."""
        return api.stored_results(await self._each(api.STORE, fds, sizes, crcs, sha256s))

    async def stored_early(self, request_id: int) -> list[Stored | Failed]:
        """The answer to STORE request ``request_id``, written to a forked worker before the
        pool existed (`Forked.early`; `pycfs.host.oci.headstart`)."""
        found = [i for i, (method, _, _, reply) in enumerate(self._early) if reply.id == request_id and method == api.STORE]
        if not found:
            raise ValueError(f"no early store request {request_id}")
        _, params, worker, reply = self._early.pop(found[0])
        _, obj = await self._early_answer(worker, reply)
        try:
            return api.stored_results(self._results(obj, len(params["sizes"]), api.STORE))
        except ValueError as e:
            raise PycfsError(f"the {worker.describe()} {e}") from None

    async def adopt(self, fds: Sequence[int], sizes: Sequence[int]) -> list[Stored | Failed]:
        """Make each anonymous file of the repository's object store (see
        `Repository.new_object_file`) its object."""
        return api.stored_results(await self._each(api.ADOPT, fds, sizes))

    async def digest(self, fds: Sequence[int], sizes: Sequence[int]) -> list[bytes | Failed]:
        """The fs-verity digest of each file (``sizes``: their exact lengths)."""
        return [r if isinstance(r, Failed) else r[0] for r in await self._each(api.DIGEST, fds, sizes)]

    async def digest_paths(self, paths: Sequence[str], expect: Sequence[Identity] | None = None) -> list[bytes | Failed]:
        """The fs-verity digest of each regular file named (absolute paths), which the
        workers open themselves: one request, so at most MAX_FILES_PER_REQUEST paths.
        ``expect``: see `digest_regular_files`."""
        params: dict[str, Any] = {"paths": list(paths)}
        if expect is not None:
            params["expect"] = list(expect)
        results = await self._call(api.DIGEST_PATHS, [], params, len(paths))
        return [r if isinstance(r, Failed) else r[0] for r in results]

    async def _each(self, method: str, fds: Sequence[int], sizes: Sequence[int],
                    crcs: Sequence[int | None] | None = None,
                    sha256s: Sequence[tuple[bytes, bytes] | None] | None = None) -> list[tuple[bytes, str] | Failed]:
        if len(fds) != len(sizes) or (crcs is not None and len(crcs) != len(fds)):
            raise ValueError(f"{len(fds)} fds but {len(sizes)} sizes{'' if crcs is None else f' and {len(crcs)} crcs'}")
        if sha256s is not None and len(sha256s) != len(fds):
            raise ValueError(f"{len(fds)} fds but {len(sha256s)} sha256s")
        out: list[tuple[bytes, str] | Failed] = []
        call: Callable[[str, list[int], dict[str, Any]], Awaitable[list[tuple[bytes, str] | Failed]]] = self._call
        if self._local is not None and len(self._workers) < self.jobs:
            call = self._call_here
            if self._local_bytes <= START_AFTER_BYTES < self._local_bytes + sum(sizes):
                self._nursery.start_soon(self._start_unless_closed)
            self._local_bytes += sum(sizes)
        for start in range(0, len(fds), api.MAX_FILES_PER_REQUEST):
            end = start + api.MAX_FILES_PER_REQUEST
            params = api.file_params(sizes[start:end], None if crcs is None else crcs[start:end],
                                     None if sha256s is None else sha256s[start:end])
            out += await call(method, list(fds[start:end]), params)
        return out

    async def _call_here(self, method: str, fds: list[int], params: dict[str, Any]) -> list[tuple[bytes, str] | Failed]:
        """A request served by this process's copy of the workers' methods, or by the
        workers when they came up while it waited for its turn here."""
        async with self._local_limiter:
            self._check()
            if self._closing:
                raise PycfsError("the object workers were shut down")
            local = self._local
            if local is not None and len(self._workers) < self.jobs:
                try:
                    result = await trio.to_thread.run_sync(partial(local.methods()[method], Call(fds), **params))
                except InvalidParamsError as e:
                    raise PycfsError(f"the object store refused a request: {e}") from None
                try:
                    return self._results({"result": result}, len(fds), method)
                except ValueError as e:
                    raise PycfsError(f"the object store {e}") from None
        return await self._call(method, fds, params)

    async def inflate(self, blob_fd: int, sock: int, compression: str, blob_alg: str, diff_alg: str,
                      store: bool = False) -> Inflated:
        """Have a worker (of a pool on a repository) read, hash and decompress a layer blob,
        hash its tar and split it, sending the pieces on ``sock`` (one end of a
        SOCK_SEQPACKET socketpair, which this closes once the worker has its copy: the reader
        then sees EOF when the worker is done; see `worker_api.INFLATE`); with ``store`` the
        worker makes the files objects itself (pieces of stored files only). The worker stays
        busy until the reader has taken every piece: a pool for inflating, not the one
        adopting its files."""
        open_end = [sock]

        def close() -> None:
            while open_end:
                os.close(open_end.pop())

        try:
            worker, obj = await self._request(api.INFLATE, [blob_fd, sock],
                                      {"compression": compression, "blob_alg": blob_alg, "diff_alg": diff_alg,
                                       "store": store},
                                      sent=close)
        finally:
            close()
        result = obj.get("result")
        if isinstance(result, dict) and isinstance(result.get("failed"), str):
            raise PycfsError(result["failed"])
        fields: list[Any] = [result.get(k) for k in ("blob", "blob_size", "diff_id", "tar_size", "files_inlined")] \
            if isinstance(result, dict) else []
        if [type(v) for v in fields] != [str, int, str, int, int]:
            raise PycfsError(f"the {worker.describe()} answered {obj!r} to an inflate request")
        return Inflated(*fields)

    async def _call(self, method: str, fds: list[int], params: dict[str, Any],
                    count: int | None = None) -> list[tuple[bytes, str] | Failed]:
        """``count``: how many files the request names, when not one per fd."""
        worker, obj = await self._request(method, fds, params)
        try:
            return self._results(obj, len(fds) if count is None else count, method)
        except ValueError as e:
            raise PycfsError(f"the {worker.describe()} {e}") from None

    async def _request(self, method: str, fds: list[int], params: dict[str, Any],
                       sent: Callable[[], None] | None = None) -> tuple[_Worker, dict[str, Any]]:
        """The worker asked and its response; ``sent`` runs once the request is sent (or could not be)."""
        early = None if fds else self._take_early(method, params)  # sent already?
        if early is not None:
            if sent is not None:
                sent()
            return await self._early_answer(*early)
        await self._start()
        worker = min(self._workers, key=lambda w: w.assigned)
        worker.assigned += 1
        try:
            return worker, await self._send_and_wait(worker, method, fds, params, sent)
        finally:
            worker.assigned -= 1

    def _take_early(self, method: str, params: dict[str, Any]) -> tuple[_Worker, _Reply] | None:
        """The early request (`Forked.early`) of this method and params, if one was sent."""
        for i, (sent_method, sent_params, worker, reply) in enumerate(self._early):
            if sent_method == method and sent_params == params:
                del self._early[i]
                return worker, reply
        return None

    async def _early_answer(self, worker: _Worker, reply: _Reply) -> tuple[_Worker, dict[str, Any]]:
        try:
            return worker, await self._wait(reply)
        finally:
            worker.assigned -= 1

    async def _send_and_wait(self, worker: _Worker, method: str, fds: list[int], params: dict[str, Any],
                             sent: Callable[[], None] | None) -> dict[str, Any]:
        return await self._wait(await self._send(worker, method, fds, params, sent))

    async def _send(self, worker: _Worker, method: str, fds: list[int], params: dict[str, Any],
                    sent: Callable[[], None] | None = None) -> _Reply:
        self._next_id += 1
        reply = _Reply(self._next_id)
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": reply.id}
        async with worker.send_lock:
            self._check()
            worker.waiting.append(reply)
            # Shielded: a message cut off half way would desynchronise the stream.
            with trio.CancelScope(shield=True):
                try:
                    await asend_with_fds(worker.sock, encode(request, len(fds), api.MAX_MESSAGE_BYTES), fds)
                except OSError as e:
                    await self._fail(worker, f"cannot send to it: {e}")
                finally:
                    if sent is not None:
                        sent()
        return reply

    async def _wait(self, reply: _Reply) -> dict[str, Any]:
        await reply.done.wait()
        self._check()
        assert reply.obj is not None
        return reply.obj

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[Pinned]:
        """One worker (the least busy) for requests that must all meet the same worker, in
        order (a job with state there: a layer's sha256); it answers them in that order."""
        await self._start()
        worker = min(self._workers, key=lambda w: w.assigned)
        worker.assigned += 1
        try:
            yield Pinned(self, worker)
        finally:
            worker.assigned -= 1

    def _results(self, obj: dict[str, Any], count: int, method: str) -> list[tuple[bytes, str] | Failed]:
        """Unpack a response (see `pycfs.protocol.worker_api`); ValueError when malformed."""
        return api.parse_answer(obj, count, method, self.digest_size)

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- processes --

    async def start(self) -> None:
        """Start the workers now (calls start them when needed): their start-up can then
        overlap other work. Calls then all go to them."""
        self._local = None
        await self._start()

    async def _start(self) -> None:
        async with self._start_lock:
            self._check()
            if self._closing:
                raise PycfsError("the object workers were shut down")
            while len(self._workers) < self.jobs:
                self._workers.append(await self._spawn())
                self._nursery.start_soon(self._read, self._workers[-1])
                if self._closing:  # the pool closed while this one started: it gets its EOF too
                    self.close_input()
                    return

    async def _start_unless_closed(self) -> None:
        """The start calls trigger in the background: moot once the pool closes."""
        try:
            await self._start()
        except PycfsError:
            if not self._closing:
                raise

    async def _spawn(self) -> _Worker:
        try:
            return _Worker(*await spawn_on_socket(self._argv, "pycfs-worker-output"))
        except OSError as e:
            raise PycfsError(f"cannot start an object worker ({self._argv[0]}): {e}") from None

    async def _read(self, worker: _Worker) -> None:
        """Match replies to waiting calls, in order; any surprise fails the pool."""
        decoder = Decoder(api.MAX_MESSAGE_BYTES, max_fds=0)
        try:
            while True:
                with trio.move_on_after(stuck.check_every()) as silent:
                    msg = await receive_message(worker.sock, decoder)
                if silent.cancelled_caught:
                    if worker.watch.stuck(bool(worker.waiting), trio.current_time()):
                        worker.proc.kill()
                        raise EOFError(stuck.stuck_message())
                    continue
                if msg is None:
                    break
                msg.close()
                reply = worker.waiting.popleft() if worker.waiting else None
                if reply is None or msg.obj.get("id") != reply.id:
                    raise ProtocolError(f"reply {msg.obj!r} answers no waiting request")
                reply.obj = msg.obj
                reply.done.set()
            if not (self._closing and not worker.waiting):
                raise EOFError("it closed the connection")
        except (OSError, EOFError, ProtocolError, FdPassError, trio.ClosedResourceError) as e:
            await self._fail(worker, str(e))
        finally:
            decoder.close()

    async def _fail(self, worker: _Worker, what: str) -> None:
        if self._closing and not worker.waiting:
            return  # the socket closed under a reader that had nothing left to read
        if self._failure is None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await worker.proc.wait()
            status = worker.proc.returncode
            exited = f"; exit status {status}" if status is not None else ""
            self._failure = PycfsError(f"the {worker.describe()} failed: {what}{exited}{worker.output.note()}")
        for w in self._workers:
            while w.waiting:
                w.waiting.popleft().done.set()

    def close_input(self) -> None:
        """No more calls: EOF to every worker now, so they exit while the caller does other
        work before the pool's block ends (which then only waits for them)."""
        self._closing = True
        for w in self._workers:
            try:
                w.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    async def aclose(self, abort: bool = False) -> None:
        """EOF to every worker, wait for them to exit (killing them after a grace period);
        ``abort``: kill them at once (what they stored so far is complete, objects appear
        whole or not at all)."""
        with trio.CancelScope(shield=True):
            self.close_input()
            with trio.move_on_after(0 if abort else EXIT_GRACE):
                for w in self._workers:
                    await w.proc.wait()
            for w in self._workers:
                if w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()
                w.sock.close()
                w.output.close()


@dataclass(frozen=True)
class Pinned:
    """Requests to one worker (`WorkerPool.pinned`, or `others`): `send` returns once
    the request is sent (the caller may close its fds then), `answer` waits for its response."""

    pool: WorkerPool
    worker: _Worker

    async def send(self, method: str, fds: list[int], params: dict[str, Any]) -> _Reply:
        return await self.pool._send(self.worker, method, fds, params)

    async def answer(self, reply: _Reply) -> dict[str, Any]:
        return await self.pool._wait(reply)

    async def files(self, reply: _Reply, count: int, method: str) -> list[tuple[bytes, str] | Failed]:
        """The answer to a `method` request for `count` files: (digest, how code) or Failed
        per file (see `pycfs.protocol.worker_api.parse_answer`)."""
        obj = await self.answer(reply)
        try:
            return self.pool._results(obj, count, method)
        except ValueError as e:
            raise PycfsError(f"the {self.worker.describe()} {e}") from None

    async def adopt(self, fds: Sequence[int], sizes: Sequence[int]) -> list[Stored | Failed]:
        """`WorkerPool.adopt`, by this worker (up to MAX_FILES_PER_REQUEST files)."""
        reply = await self.send(api.ADOPT, list(fds), api.file_params(sizes))
        return api.stored_results(await self.files(reply, len(fds), api.ADOPT))

    @property
    def backlog(self) -> int:
        """Requests sent to this worker and not answered yet."""
        return len(self.worker.waiting)

    @property
    def assigned(self) -> int:
        """Pins of this worker (`WorkerPool.pinned`) and the pool's own requests to it."""
        return self.worker.assigned

    def others(self) -> list[Pinned]:
        """The pool's other workers, for requests sent to them by `send` (not pinned: others
        may use them too)."""
        return [Pinned(self.pool, w) for w in self.pool._workers if w is not self.worker]


@asynccontextmanager
async def open_pool(*, repo: Repository | None = None, alg: str = "sha256",
                    jobs: int | None = None, small_here: bool = False,
                    forked: Sequence[Forked] = ()) -> AsyncIterator[WorkerPool]:
    """A pool of ``jobs`` workers (default: one per core) storing into ``repo``, or only
    hashing with ``alg`` when ``repo`` is None. ``small_here``: a one-shot job whose size
    is not known in advance (an ostree pull) starts serving calls in this process, and
    starts the workers only if it grows past START_AFTER_BYTES (see `WorkerPool`).
    ``forked``: workers started already (`pycfs.host.workers.fork`), the pool's own now."""
    argv = [sys.executable, "-B", "-m", "pycfs.host.workers"]
    argv += ["--repo", os.path.abspath(repo.path)] if repo is not None else ["--alg", alg]
    local = None
    # Not when a number of processes was asked for. A store here hashes its source under
    # a read lease as the workers do, which ignores SIGIO process-wide: only from the main
    # thread (signal handlers are set there).
    if small_here and jobs is None and threading.current_thread() is threading.main_thread():
        if repo is not None:
            repo.enable_source_leases()
        local = WorkerService(repo.alg if repo is not None else alg, repo)
    async with open_nursery() as nursery:
        pool = WorkerPool(nursery, argv, jobs or default_jobs(), repo.alg if repo is not None else alg, local)
        adopted = 0
        try:
            for f in forked:
                worker = _Worker(ChildProcess(f.proc), trio.socket.from_stdlib_socket(f.sock), f.output)
                for request_id, method, params in f.early:
                    reply = _Reply(request_id)
                    worker.waiting.append(reply)
                    worker.assigned += 1
                    pool._early.append((method, params, worker, reply))
                    pool._next_id = max(pool._next_id, request_id)
                pool._workers.append(worker)
                adopted += 1
                nursery.start_soon(pool._read, worker)
            yield pool
        except BaseException:
            discard(forked[adopted:])  # those not the pool's yet (an adoption failed part way)
            await pool.aclose(abort=True)
            raise
        await pool.aclose()


# A job whose size is not known up front (a small_here pool's store calls) starts the
# workers once this much has come: they take ~0.2 s to come up, in the background, while
# this process goes on storing; at IN_PROCESS_BYTES a 40 MB ostree pull-local stored its
# first 16 MiB on one core and took 0.25 s longer than with the workers from the start.
START_AFTER_BYTES = 1 << 20


async def digest_files(paths: Sequence[str | os.PathLike[str]], alg: str = "sha256",
                       jobs: int | None = None, on_done: Callable[[int], None] | None = None,
                       forked: Sequence[Forked] = (), expect: Sequence[Identity] | None = None) -> list[bytes | OSError]:
    """The fs-verity digest of each file, in order, hashed by a pool of workers (``forked``:
    digest-only workers started already, see `pycfs.host.workers.fork`); a path that
    cannot be opened, is not a regular file or cannot be read gives its OSError, one that
    is no longer the file ``expect`` describes (see `digest_regular_files`) OSError CHANGED. ``on_done``
    hears how many more files are done, batch by batch (for progress). The workers open the
    files by name (the host does no per-file work); they run in "/", so names are made
    absolute here (`absolute_names`)."""
    if not forked and jobs is None and (sum(e[2] for e in expect) <= IN_PROCESS_BYTES if expect is not None
                                        else await trio.to_thread.run_sync(small_job, paths)):
        done = await trio.to_thread.run_sync(digest_regular_files, paths, alg, expect)
        if on_done is not None:
            on_done(len(done))
        return done
    names = absolute_names(paths)
    results: list = [None] * len(paths)  # every slot is filled before the pool closes
    send, receive = trio.open_memory_channel(0)

    async with open_pool(alg=alg, jobs=len(forked) or jobs, forked=forked) as pool:

        async def coordinate() -> None:
            async for start, end in receive:
                got_all = await pool.digest_paths(names[start:end], None if expect is None else expect[start:end])
                for i, got in enumerate(got_all, start):
                    results[i] = OSError(got.errno, got.message) if isinstance(got, Failed) else got
                if on_done is not None:
                    on_done(end - start)

        async with open_nursery() as nursery:
            for _ in range(2 * pool.jobs):  # one request being answered per worker, one queued behind it
                nursery.start_soon(coordinate)
            async with send:
                for batch in digest_batches(names):
                    await send.send(batch)
    return results
