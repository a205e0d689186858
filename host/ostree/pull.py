"""Pull an ostree commit into the composefs repository (spec ostree.md 3.1-3.3), the
concurrent part: what `pycfs.host.ostree.pullcore.prepare_pull` leaves to the event loop.

1. (prepare_pull) Resolve the ref; a commit already stored only gets its image (if missing)
   and the ref. Bases: `--base-name`, the commit NAME names now, the new commit's parent,
   or what an interrupted pull of the same commit kept: an object one has is copied from it.
2. Metadata (over HTTP, or from a local archive repository): the commit, then its dirtrees
   and dirmetas, many at a time; every object is checked against its checksum before its
   children are looked at. (From a local repository prepare_pull has read them already.)
3. Files, while the metadata is still arriving: fetched as soon as a dirtree names them,
   concurrently on worker threads (a `.filez` inflates into an unlinked
   temporary file), then stored as objects by the object worker processes in batches
   (reflinked from a bare repository or the temporary file where the filesystem can),
   each content checksum verified before it enters the commit (a bare file's by the
   worker, in the read that computes the object's digest). A local repository's objects
   are read `LOCAL_BATCH` to a thread hop, which costs more than the read.
4. The EROFS image, then the commit stream naming it, then the ref: nothing is visible
   until everything is stored.

A pull that fails or is interrupted leaves `streams/ostree-partial-<commit>`: a commit
stream of what it had verified so far (rewritten every few seconds). The next pull of that
commit uses it as a base, so nothing stored is fetched again; success removes it.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from functools import partial

import trio
from pycfs.host.nursery import open_nursery
from pycfs.host.ostree.commitstream import has_commit, load_stream, stream_name
from pycfs.host.ostree.delta import MAX_PART, MAX_SUPERBLOCK, apply_parts, delta_dir, delta_name, find_delta, parse_superblock
from pycfs.host.ostree.objects import Commit, Kind, OstreeError
from pycfs.host.ostree.pullcore import (
    CHECKPOINT_SECONDS,
    STORE_BATCH,
    PullCore,
    PullOptions,
    PullResult,
    close_fds,
    prepare_pull,
)
from pycfs.host.ostree.source import FetchedFile, HttpRepo, LocalRepo
from pycfs.host.repository import Repository
from pycfs.host.workers.pool import WorkerPool, open_pool

# A local repository answers in microseconds: objects are read many to a thread hop (the
# hop costs more than the read), by a few threads. Over HTTP each object is its own fetch.
LOCAL_BATCH = 32
LOCAL_FETCHERS = 4


class _Puller:
    def __init__(self, core: PullCore) -> None:
        self.core = core
        local = isinstance(core.source, LocalRepo)
        options = core.options
        self.batch = LOCAL_BATCH if local else 1
        self.fetchers = min(LOCAL_FETCHERS, options.fetches) if local else options.fetches
        # separate budgets: file fetches must not hold up the metadata that finds more files
        self.meta_limiter = trio.CapacityLimiter(options.fetches)
        self.file_limiter = trio.CapacityLimiter(options.fetches)
        self.nursery: trio.Nursery | None = None

    def _flush(self) -> None:
        """Start fetching the metadata found so far, `batch` objects to a task."""
        assert self.nursery is not None
        found, self.core.found = self.core.found, []
        for start in range(0, len(found), self.batch):
            self.nursery.start_soon(self._fetch_metadata, found[start:start + self.batch])

    async def _fetch_metadata(self, batch: list[tuple[Kind, bytes]]) -> None:
        core = self.core

        def read() -> list[bytes]:
            return [core.read_metadata(kind, checksum) for kind, checksum in batch]

        for (kind, checksum), data in zip(batch, await trio.to_thread.run_sync(read, limiter=self.meta_limiter)):
            core.accept(kind, checksum, data)
        core.metadata_fetched(len(batch))
        self._flush()

    async def run(self, pool: WorkerPool) -> None:
        """Metadata and files at once: a file is fetched as soon as a dirtree names it."""
        core = self.core
        if core.walked:
            await self._store_walked(pool)
            return
        todo_send, todo_recv = trio.open_memory_channel[bytes](math.inf)
        store_send, store_recv = trio.open_memory_channel[tuple[bytes, FetchedFile]](STORE_BATCH)
        failed: Exception | None = None
        async with open_nursery() as storing:
            storing.start_soon(self._batcher, store_recv, pool)
            try:
                async with store_send, open_nursery() as nursery:
                    async with todo_recv:
                        for _ in range(self.fetchers):
                            nursery.start_soon(self._fetcher, todo_recv.clone(), store_send.clone())
                        # (a bare repository's files are reflinked: a delta's parts would be copies)
                        if core.options.deltas and core.source.archive:
                            await self._delta(core.source, store_send)
                    async with todo_send, open_nursery() as metadata:
                        self.nursery = metadata
                        core.on_file = todo_send.send_nowait
                        core.want(Kind.COMMIT, core.commit)
                        self._flush()
            except Exception as e:
                # a fetch failed (not Ctrl-C, not the storing): what was fetched is still
                # stored, and kept for the next try, before the failure is reported
                failed = e
        core.on_file = self.nursery = None
        if failed is not None:
            raise failed

    async def _store_walked(self, pool: WorkerPool) -> None:
        """Every file known (a walk here found them): STORE_BATCH of them fetched on a thread
        while the batches before are stored, with no task or channel per file (they cost
        the host more than the fetch)."""
        core = self.core
        files, core.files = core.files, []
        limiter = trio.CapacityLimiter(pool.batches_in_flight(STORE_BATCH))
        failed: Exception | None = None
        async with open_nursery() as nursery:
            for start in range(0, len(files), STORE_BATCH):
                try:
                    fetched = await trio.to_thread.run_sync(self._fetch_files, files[start:start + STORE_BATCH])
                except Exception as e:  # the batches with the workers are stored and kept for the next try
                    failed = e
                    break
                batch = []
                for checksum, f in zip(files[start:start + STORE_BATCH], fetched):
                    if f.fd is None:
                        core.inlined(checksum, f)
                    else:
                        batch.append((checksum, f))
                if batch:
                    try:
                        await limiter.acquire_on_behalf_of(batch[0][0])
                    except BaseException:
                        close_fds([f for _, f in batch])
                        raise
                    nursery.start_soon(self._store, batch, pool, limiter)
        if failed is not None:
            raise failed

    async def _delta(self, source: LocalRepo | HttpRepo, store: trio.MemorySendChannel[tuple[bytes, FetchedFile]]) -> None:
        """Apply a static delta to the commit when the source has one: its objects become a base."""
        core = self.core
        found = await trio.to_thread.run_sync(find_delta, source, core.commit, partial(has_commit, core.repo))
        if found is None:
            return
        from_commit, checksum = found
        name = delta_name(from_commit, core.commit)
        where = delta_dir(from_commit, core.commit)
        data = await trio.to_thread.run_sync(source.fetch_optional, f"{where}/superblock", MAX_SUPERBLOCK)
        if data is None:
            return  # advertised but not served: fetch object by object
        if hashlib.sha256(data).digest() != checksum:
            raise OstreeError(f"static delta {name}: the superblock does not match its checksum")
        superblock = parse_superblock(data, name, from_commit, core.commit)
        core.checks.check(core.commit, Commit.parse(superblock.commit_data, core.commit))  # before any part
        base = None if from_commit is None else load_stream(core.repo, stream_name(from_commit))
        token = trio.lowlevel.current_trio_token()

        def fetch_part(i: int) -> bytes:
            part = source.fetch_optional(f"{where}/{i}", MAX_PART)
            if part is None:
                raise OstreeError(f"static delta {name}: part {i} is missing from {source.description}")
            core.stats.delta_parts += 1
            return part

        def keep_file(file_checksum: bytes, fetched: FetchedFile) -> None:
            trio.from_thread.run(self._keep, store, file_checksum, fetched, trio_token=token)

        objects = await trio.to_thread.run_sync(apply_parts, superblock, fetch_part, base, core.repo.open_object,
                                                core.inline_max, core.tmp_dir, keep_file)
        core.add_base(objects, "static delta to")
        if base is not None:
            core.add_base(base, "static delta from")

    async def _keep(self, store: trio.MemorySendChannel[tuple[bytes, FetchedFile]], checksum: bytes,
                    fetched: FetchedFile) -> None:
        self.core.queued.add(checksum)  # stored by the batcher: not to be fetched again
        try:
            await store.send((checksum, fetched))
        except BaseException:
            if fetched.fd is not None:
                os.close(fetched.fd)
            raise

    async def _fetcher(self, todo: trio.MemoryReceiveChannel[bytes],
                       store: trio.MemorySendChannel[tuple[bytes, FetchedFile]]) -> None:
        async with todo, store:
            async for checksum in todo:
                batch = [checksum]
                while len(batch) < self.batch:
                    try:
                        batch.append(todo.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                files = await trio.to_thread.run_sync(self._fetch_files, batch, limiter=self.file_limiter)
                for i, (checksum, fetched) in enumerate(zip(batch, files)):
                    if fetched.fd is None:
                        self.core.inlined(checksum, fetched)
                        continue
                    try:
                        await self._keep(store, checksum, fetched)
                    except BaseException:
                        close_fds(files[i + 1:])
                        raise

    def _fetch_files(self, batch: list[bytes]) -> list[FetchedFile]:
        files: list[FetchedFile] = []
        try:
            for checksum in batch:
                files.append(self.core.fetch_file(checksum))
        except BaseException:
            close_fds(files)
            raise
        return files

    async def _batcher(self, store: trio.MemoryReceiveChannel[tuple[bytes, FetchedFile]], pool: WorkerPool) -> None:
        limiter = trio.CapacityLimiter(pool.batches_in_flight(STORE_BATCH))
        async with store, open_nursery() as nursery:
            while True:
                try:
                    batch = [await store.receive()]
                except trio.EndOfChannel:
                    break
                while len(batch) < STORE_BATCH:
                    try:
                        batch.append(store.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await limiter.acquire_on_behalf_of(batch[0][0])
                nursery.start_soon(self._store, batch, pool, limiter)

    async def _store(self, batch: list[tuple[bytes, FetchedFile]], pool: WorkerPool,
                     limiter: trio.CapacityLimiter) -> None:
        core = self.core
        fds = [f.fd for _, f in batch if f.fd is not None]
        checks = [core.content_check(checksum, f) for checksum, f in batch]
        try:
            results = await pool.store(fds, [f.header.size for _, f in batch], sha256s=checks)
        finally:
            for fd in fds:
                os.close(fd)
            limiter.release_on_behalf_of(batch[0][0])
        core.take_stored(batch, results)
        if time.monotonic() - core.last_checkpoint > CHECKPOINT_SECONDS:
            core.checkpoint()


async def run_prepared(core: PullCore) -> PullResult:
    """The rest of a pull `prepare_pull` could not finish (nor `PullCore.store_forked`):
    fetch and store concurrently."""
    try:
        async with open_pool(repo=core.repo, jobs=core.options.jobs, small_here=True) as pool:
            await _Puller(core).run(pool)
            pool.close_input()  # the workers exit while the image is built
            image_id = core.finish_image()
    except BaseException:
        core.checkpoint_after_failure()
        raise
    return core.result(image_id)


async def pull(repo: Repository, source: LocalRepo | HttpRepo, ref: str, options: PullOptions) -> PullResult:
    prepared = await trio.to_thread.run_sync(prepare_pull, repo, source, ref, options)
    return prepared if isinstance(prepared, PullResult) else await run_prepared(prepared)
