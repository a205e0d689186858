"""Pull an ostree commit into the composefs repository (spec ostree.md 3.1-3.3).

1. Resolve the ref; a commit already stored only gets its image (if missing) and the ref.
2. Metadata: fetch the commit, then its dirtrees and dirmetas, many at a time; every
   object is checked against its checksum before its children are looked at. An object a
   base commit has (`--base-name`, the commit NAME names now, the new commit's parent,
   or what an interrupted pull of the same commit kept) is copied from it instead.
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

import datetime
import errno
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.nursery import open_nursery
from pycfs.host.ostree.commitstream import (
    CommitObjects,
    Entry,
    check_ref_name,
    has_commit,
    inline_max,
    list_refs,
    load_commit,
    load_stream,
    stream_name,
)
from pycfs.host.ostree.delta import MAX_PART, MAX_SUPERBLOCK, apply_parts, delta_dir, delta_name, find_delta, parse_superblock
from pycfs.host.ostree.image import commit_of, ensure_image
from pycfs.host.ostree.signature import MAX_DETACHED, verify_commit
from pycfs.host.ostree.objects import (
    Commit,
    DirMeta,
    DirTree,
    Kind,
    OstreeError,
    describe,
    is_checksum_text,
    verify_metadata,
)
from pycfs.host.ostree.source import MISMATCH, FetchedFile, HttpRepo, LocalRepo
from pycfs.host.repository import Repository
from pycfs.host.splitstream import SplitStreamError
from pycfs.host.workers.pool import Failed, WorkerPool, open_pool

PARTIAL_PREFIX = "ostree-partial-"
CHECKPOINT_SECONDS = 5.0
STORE_BATCH = 64
# A local repository answers in microseconds: objects are read many to a thread hop (the
# hop costs more than the read), by a few threads. Over HTTP each object is its own fetch.
LOCAL_BATCH = 32
LOCAL_FETCHERS = 4
T = TypeVar("T")


class Progress(Protocol):
    def metadata(self, fetched: int) -> None: ...
    def file_found(self) -> None: ...
    def file_done(self, nbytes: int) -> None: ...


@dataclass
class PullStats:
    metadata_fetched: int = 0
    metadata_reused: int = 0
    files_fetched: int = 0
    files_reused: int = 0
    content_bytes: int = 0
    inlined: int = 0
    stored: dict[str, int] = field(default_factory=dict)  # "reflinked"/"copied"/"present" -> count
    requests: int | None = None  # HTTP requests made (None for a local repository)
    delta_parts: int = 0
    bases: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"metadata_fetched": self.metadata_fetched, "metadata_reused": self.metadata_reused,
                "files_fetched": self.files_fetched, "files_reused": self.files_reused,
                "content_bytes": self.content_bytes, "inlined": self.inlined, "stored": dict(self.stored),
                "requests": self.requests, "delta_parts": self.delta_parts, "bases": self.bases}


@dataclass
class PullResult:
    commit: bytes
    image_id: bytes
    ref: str | None
    already_present: bool
    stats: PullStats
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"commit": self.commit.hex(), "image": self.image_id.hex(), "ref": self.ref,
                "already_present": self.already_present, "seconds": round(self.seconds, 3), **self.stats.to_json()}


@dataclass
class PullOptions:
    name: str | None = None  # the ref to write; default: REF when it is a ref name
    base_name: str | None = None
    jobs: int | None = None  # object workers
    fetches: int = 16  # concurrent fetches
    deltas: bool = True  # use a static delta when an archive source (HTTP or local) has one
    gpg_keyring: str | None = None  # require a commit signature that verifies with this keyring
    allow_downgrade: bool = False  # let NAME move to a commit older than the one it names
    progress: Progress | None = None


class _Puller:
    def __init__(self, repo: Repository, source: LocalRepo | HttpRepo, commit: bytes, options: PullOptions,
                 checks: _Checks) -> None:
        self.repo = repo
        self.checks = checks
        self.source = source
        self.commit = commit
        self.options = options
        self.objects = CommitObjects(commit)
        self.bases: list[CommitObjects] = []
        self.queued: set[bytes] = set()
        self.todo: trio.MemorySendChannel[bytes] | None = None  # files to fetch, as they are found
        self.found: list[tuple[Kind, bytes]] = []  # metadata to fetch, started by _flush
        local = isinstance(source, LocalRepo)
        self.batch = LOCAL_BATCH if local else 1
        self.fetchers = min(LOCAL_FETCHERS, options.fetches) if local else options.fetches
        self.stats = PullStats()
        # separate budgets: file fetches must not hold up the metadata that finds more files
        self.meta_limiter = trio.CapacityLimiter(options.fetches)
        self.file_limiter = trio.CapacityLimiter(options.fetches)
        self.inline_max = inline_max(repo)
        # temporary files on the repository's filesystem, so storing them can reflink
        self.tmp_dir = os.path.abspath(repo.path / "objects")
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.last_checkpoint = time.monotonic()
        self.checkpointed = 0
        self.nursery: trio.Nursery | None = None

    # ---- bases ---------------------------------------------------------------------

    def add_base(self, objects: CommitObjects, why: str) -> None:
        # another commit once (named as base and parent, say); objects of this very commit
        # (a partial stream, a delta, the verified commit) each add what the others lack
        if objects.commit == self.commit or all(b.commit != objects.commit for b in self.bases):
            self.bases.append(objects)
            self.stats.bases.append(f"{why} {objects.commit.hex()}")

    def _from_base(self, checksum: bytes) -> Entry | None:
        for base in self.bases:
            entry = base.get(checksum)
            # an external object may have been collected since the base was written
            if entry is not None and (entry.external is None or self.repo.has_object(entry.external)):
                return entry
        return None

    # ---- metadata ------------------------------------------------------------------

    def want(self, kind: Kind, checksum: bytes) -> None:
        if checksum in self.queued:
            return
        self.queued.add(checksum)
        entry = self._from_base(checksum)
        if kind is Kind.FILE:
            if entry is not None:
                self.objects.add(checksum, entry)
                self.stats.files_reused += 1
            else:
                assert self.todo is not None
                self.todo.send_nowait(checksum)
                if self.options.progress:
                    self.options.progress.file_found()
        elif entry is not None:
            verify_metadata(entry.data, checksum, kind)  # a damaged base must not slip in
            self._accept(kind, checksum, entry.data)
            self.stats.metadata_reused += 1
        else:
            self.found.append((kind, checksum))

    def _flush(self) -> None:
        """Start fetching the metadata found so far, `batch` objects to a task."""
        assert self.nursery is not None
        found, self.found = self.found, []
        for start in range(0, len(found), self.batch):
            self.nursery.start_soon(self._fetch_metadata, found[start:start + self.batch])

    def _accept(self, kind: Kind, checksum: bytes, data: bytes) -> None:
        """Take a verified metadata object and look at what it refers to."""
        parsed: Commit | DirTree | DirMeta
        if kind is Kind.COMMIT:
            parsed = commit = Commit.parse(data, checksum)
            self.checks.check(checksum, commit)
            if commit.parent is not None and has_commit(self.repo, commit.parent):
                self.add_base(load_stream(self.repo, stream_name(commit.parent)), "parent")
            self.want(Kind.DIRMETA, commit.root_meta)
            self.want(Kind.DIRTREE, commit.root_tree)
        elif kind is Kind.DIRTREE:
            parsed = tree = DirTree.parse(data, checksum)
            for _name, file_checksum in tree.files:
                self.want(Kind.FILE, file_checksum)
            for _name, sub_tree, sub_meta in tree.dirs:
                self.want(Kind.DIRMETA, sub_meta)
                self.want(Kind.DIRTREE, sub_tree)
        else:
            parsed = DirMeta.parse(data, checksum)
        self.objects.add(checksum, Entry(data))
        self.objects.parsed[checksum] = parsed

    async def _fetch_metadata(self, batch: list[tuple[Kind, bytes]]) -> None:
        def read() -> list[bytes]:
            out = []
            for kind, checksum in batch:
                data = _named(self.source, kind, checksum, self.source.read_metadata, checksum, kind)
                verify_metadata(data, checksum, kind)
                out.append(data)
            return out

        for (kind, checksum), data in zip(batch, await trio.to_thread.run_sync(read, limiter=self.meta_limiter)):
            self._accept(kind, checksum, data)
            self.stats.metadata_fetched += 1
        if self.options.progress:
            self.options.progress.metadata(self.stats.metadata_fetched)
        self._flush()

    async def run(self, pool: WorkerPool) -> None:
        """Metadata and files at once: a file is fetched as soon as a dirtree names it."""
        todo_send, todo_recv = trio.open_memory_channel[bytes](math.inf)
        store_send, store_recv = trio.open_memory_channel[tuple[bytes, FetchedFile]](STORE_BATCH)
        self.todo = todo_send
        async with open_nursery() as nursery:
            async with todo_recv, store_send:
                for _ in range(self.fetchers):
                    nursery.start_soon(self._fetcher, todo_recv.clone(), store_send.clone())
                nursery.start_soon(self._batcher, store_recv, pool)
                # (a bare repository's files are reflinked: a delta's parts would be copies)
                if self.options.deltas and self.source.archive:
                    await self._delta(self.source, store_send)
            async with todo_send, open_nursery() as metadata:
                self.nursery = metadata
                self.want(Kind.COMMIT, self.commit)
                self._flush()
        self.nursery = self.todo = None

    async def _delta(self, source: LocalRepo | HttpRepo, store: trio.MemorySendChannel[tuple[bytes, FetchedFile]]) -> None:
        """Apply a static delta to the commit when the source has one: its objects become a base."""
        found = await trio.to_thread.run_sync(find_delta, source, self.commit, partial(has_commit, self.repo))
        if found is None:
            return
        from_commit, checksum = found
        name = delta_name(from_commit, self.commit)
        where = delta_dir(from_commit, self.commit)
        data = await trio.to_thread.run_sync(source.fetch_optional, f"{where}/superblock", MAX_SUPERBLOCK)
        if data is None:
            return  # advertised but not served: fetch object by object
        if hashlib.sha256(data).digest() != checksum:
            raise OstreeError(f"static delta {name}: the superblock does not match its checksum")
        superblock = parse_superblock(data, name, from_commit, self.commit)
        self.checks.check(self.commit, Commit.parse(superblock.commit_data, self.commit))  # before any part
        base = None if from_commit is None else load_stream(self.repo, stream_name(from_commit))
        token = trio.lowlevel.current_trio_token()

        def fetch_part(i: int) -> bytes:
            part = source.fetch_optional(f"{where}/{i}", MAX_PART)
            if part is None:
                raise OstreeError(f"static delta {name}: part {i} is missing from {source.description}")
            self.stats.delta_parts += 1
            return part

        def keep_file(file_checksum: bytes, fetched: FetchedFile) -> None:
            trio.from_thread.run(self._keep, store, file_checksum, fetched, trio_token=token)

        def read_object(object_id: bytes) -> bytes:
            return self.repo.read_object(object_id)

        objects = await trio.to_thread.run_sync(apply_parts, superblock, fetch_part, base, read_object,
                                                self.inline_max, self.tmp_dir, keep_file)
        self.add_base(objects, "static delta to")
        if base is not None:
            self.add_base(base, "static delta from")

    async def _keep(self, store: trio.MemorySendChannel[tuple[bytes, FetchedFile]], checksum: bytes,
                    fetched: FetchedFile) -> None:
        self.queued.add(checksum)  # stored by the batcher: not to be fetched again
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
                        self.objects.add(checksum, Entry(fetched.header.archive_header() + (fetched.content or b"")))
                        self._file_done(fetched.header.size)
                        self.stats.inlined += 1
                        continue
                    try:
                        await self._keep(store, checksum, fetched)
                    except BaseException:
                        _close_fds(files[i + 1:])
                        raise

    def _fetch_files(self, batch: list[bytes]) -> list[FetchedFile]:
        files: list[FetchedFile] = []
        try:
            for checksum in batch:
                files.append(_named(self.source, Kind.FILE, checksum, self.source.fetch_file,
                                    checksum, self.inline_max, self.tmp_dir))
        except BaseException:
            _close_fds(files)
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
        fds = [f.fd for _, f in batch if f.fd is not None]
        # Content not yet verified (a bare repository's file, which its owner could change
        # at any time) is checked by the worker on its private copy, in the same read that
        # computes the object's digest.
        checks = [None if f.verified else (f.header.checksum_prefix(), checksum) for checksum, f in batch]
        try:
            results = await pool.store(fds, [f.header.size for _, f in batch], sha256s=checks)
        finally:
            for fd in fds:
                os.close(fd)
            limiter.release_on_behalf_of(batch[0][0])
        for (checksum, fetched), result in zip(batch, results):
            if isinstance(result, Failed):
                if result.errno == errno.EBADMSG:
                    raise OstreeError(f"{describe(checksum, Kind.FILE)}: {MISMATCH}")
                raise OstreeError(f"{describe(checksum, Kind.FILE)}: storing its content failed: {result.message}")
            self.objects.add(checksum, Entry(fetched.header.archive_header(), result.object_id))
            self.objects.headers[checksum] = fetched.header
            self.stats.stored[result.how] = self.stats.stored.get(result.how, 0) + 1
            self._file_done(fetched.header.size)
        if time.monotonic() - self.last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint()

    def _file_done(self, nbytes: int) -> None:
        self.stats.files_fetched += 1
        self.stats.content_bytes += nbytes
        if self.options.progress:
            self.options.progress.file_done(nbytes)

    # ---- interruption --------------------------------------------------------------

    def checkpoint(self) -> None:
        """Keep what is verified so far as the partial stream (a base for the next try)."""
        self.last_checkpoint = time.monotonic()
        if self.commit not in self.objects or len(self.objects.entries) == self.checkpointed:
            return
        self.repo.write_stream(self.objects.to_stream(self.repo.alg), PARTIAL_PREFIX + self.commit.hex())
        self.checkpointed = len(self.objects.entries)

    def load_partial(self) -> None:
        name = PARTIAL_PREFIX + self.commit.hex()
        if self.repo.has_stream(name) is None:
            return
        try:
            self.add_base(load_stream(self.repo, name), "interrupted pull of")
        except (OstreeError, SplitStreamError):
            pass  # a damaged cache only costs refetching

    def drop_partial(self) -> None:
        try:
            os.unlink(f"streams/{PARTIAL_PREFIX}{self.commit.hex()}", dir_fd=self.repo.dirfd)
        except FileNotFoundError:
            pass


def _named(source: LocalRepo | HttpRepo, kind: Kind, checksum: bytes, fn: Callable[..., T], *args: object) -> T:
    """A source call; an OSError names the object it was about."""
    try:
        return fn(*args)
    except OSError as e:
        raise OstreeError(f"{describe(checksum, kind)} from {source.description}: {e}") from None


def _close_fds(files: list[FetchedFile]) -> None:
    for fetched in files:
        if fetched.fd is not None:
            os.close(fetched.fd)


def _signed_commit(source: LocalRepo | HttpRepo, commit: bytes, keyring: str) -> CommitObjects:
    """The commit object, once a signature on it verifies with the keyring."""
    data = source.read_metadata(commit, Kind.COMMIT)
    verify_metadata(data, commit, Kind.COMMIT)
    verify_commit(data, commit.hex(), source.read_detached(commit, MAX_DETACHED), keyring)
    objects = CommitObjects(commit)
    objects.add(commit, Entry(data))
    return objects


@dataclass(frozen=True)
class _Checks:
    """What a pull checks on the commit object before it fetches anything it names."""

    ref: str | None  # the branch it was asked for (None: a checksum)
    current: tuple[str, CommitObjects] | None  # NAME and what it names now, when it may not go back

    def check(self, commit: bytes, new: Commit) -> None:
        # As ostree: a commit bound to refs (`ostree.ref-binding`, written by `ostree
        # commit --branch`) comes only by one of them, so a server cannot pass one branch's
        # commit off as another's.
        bound = next((v.value for k, v in new.metadata if k == "ostree.ref-binding" and v.type == "as"), None)
        if self.ref is not None and bound is not None and self.ref not in bound:
            raise OstreeError(f"commit {commit.hex()} is bound to {', '.join(bound) or 'no ref'} (ostree.ref-binding), "
                              f"not to {self.ref}, the ref the repository serves it as")
        # As ostree's timestamp check: a commit older than the one NAME names now (a
        # replayed old, perhaps vulnerable, commit) is refused; the same second is not older.
        if self.current is not None:
            name, objects = self.current
            now = commit_of(objects).timestamp
            if new.timestamp < now:
                raise OstreeError(f"commit {commit.hex()} ({_utc(new.timestamp)}) is older than commit "
                                  f"{objects.commit.hex()} ({_utc(now)}) that {name} names now: refusing "
                                  "the downgrade (--allow-downgrade permits it)")


def _utc(timestamp: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"timestamp {timestamp}"


def _current(repo: Repository, name: str) -> bytes | None:
    return dict(list_refs(repo)).get(name)


async def pull(repo: Repository, source: LocalRepo | HttpRepo, ref: str, options: PullOptions) -> PullResult:
    started = time.monotonic()
    if options.gpg_keyring is not None:
        source.summary_keyring = options.gpg_keyring  # refs and deltas only from a signed summary
    commit = await trio.to_thread.run_sync(source.resolve, ref)
    name = options.name if options.name is not None else (None if is_checksum_text(ref) else ref)
    if name is not None:
        check_ref_name(name)
    current = load_commit(repo, name) if name is not None and _current(repo, name) is not None else None
    checks = _Checks(None if is_checksum_text(ref) else ref,
                     None if name is None or current is None or current.commit == commit or options.allow_downgrade
                     else (name, current))
    signed = None
    if options.gpg_keyring is not None:
        signed = await trio.to_thread.run_sync(_signed_commit, source, commit, options.gpg_keyring)
    if has_commit(repo, commit):
        objects = load_stream(repo, stream_name(commit))
        checks.check(commit, commit_of(objects))
        image_id = ensure_image(repo, objects, name)
        stats = PullStats(requests=source.requests if isinstance(source, HttpRepo) else None)
        return PullResult(commit, image_id, name, True, stats, time.monotonic() - started)
    puller = _Puller(repo, source, commit, options, checks)
    stats = puller.stats
    if options.base_name is not None:
        puller.add_base(load_commit(repo, options.base_name), f"--base-name {options.base_name}:")
    elif current is not None:
        puller.add_base(current, f"{name} was")
    puller.load_partial()
    if signed is not None:
        puller.add_base(signed, "signature verified on")  # not fetched again
    try:
        async with open_pool(repo=repo, jobs=options.jobs, small_here=True) as pool:
            await puller.run(pool)
            pool.close_input()  # the workers exit while the image is built
            image_id = ensure_image(repo, puller.objects, name)
    except BaseException:
        try:
            puller.checkpoint()
        except (OSError, PycfsError):
            pass  # the error being raised is the one to report
        raise
    puller.drop_partial()
    if isinstance(source, HttpRepo):
        stats.requests = source.requests
    return PullResult(commit, image_id, name, False, stats, time.monotonic() - started)
