"""What a pull of an ostree commit does without the event loop (spec ostree.md 3.1-3.3).

`prepare_pull` resolves the ref, checks the commit it names (ref binding, downgrade,
signature), finishes at once when the commit is stored already, and sets up the bases
(`--base-name`, what NAME names now, an interrupted pull's partial stream). From a local
repository it then reads the metadata here, object after object (each answers in
microseconds, and is checked against its checksum before its children are looked at),
and when the files still missing come to at most HERE_BYTES of content it stores them
here too and finishes: an update of a few files, or a re-pull, starts neither trio nor
an object worker (their start-up was most of such a pull's time). Anything bigger is
returned as a `PullCore`: walked here, its files go to forked object workers by
blocking calls (`fork_workers`, `store_forked`: every file is known, trio is not needed);
otherwise `pycfs.host.ostree.pull.run_prepared` fetches and stores the files
concurrently (over HTTP, the metadata too, while the files arrive).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
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
from pycfs.host.ostree.image import commit_of, ensure_image
from pycfs.host.ostree.objects import (
    Commit,
    DirMeta,
    DirTree,
    Kind,
    OstreeError,
    commit_date,
    describe,
    verify_metadata,
)
from pycfs.host.ostree.signature import MAX_DETACHED, verify_commit
from pycfs.host.ostree.source import MISMATCH, FetchedFile, HttpRepo, LocalRepo
from pycfs.host.repository import Repository
from pycfs.host.splitstream import SplitStreamError
from pycfs.host.tree import gc_paused
from pycfs.protocol import worker_api as api
from pycfs.protocol.worker_api import Failed, Stored

PARTIAL_PREFIX = "ostree-partial-"
CHECKPOINT_SECONDS = 5.0
# Files up to this much content are stored here, one after another: the object workers'
# own threshold for starting (pycfs.host.workers.pool.START_AFTER_BYTES), below which
# their start-up costs more than the hashing they would share.
HERE_BYTES = 1 << 20
# ... and at most this many of them: each is held open until all are stored (well below
# the usual 1024-fd soft limit).
HERE_FILES = 256
# Files to a store request when the object workers take them all (about 64 a request
# kept answer and request round trips a small part of the host's work).
STORE_BATCH = 64
T = TypeVar("T")

if TYPE_CHECKING:
    from pycfs.host.workers.fork import Forked
    from pycfs.host.workers.blocking import BlockingStore


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


class PullCore:
    """The state of one pull: the objects verified so far, the bases, the stats."""

    def __init__(self, repo: Repository, source: LocalRepo | HttpRepo, commit: bytes, name: str | None,
                 options: PullOptions, checks: _Checks, started: float) -> None:
        self.repo = repo
        self.source = source
        self.commit = commit
        self.name = name
        self.options = options
        self.checks = checks
        self.started = started
        self.objects = CommitObjects(commit)
        self.bases: list[CommitObjects] = []
        self.queued: set[bytes] = set()
        self.found: list[tuple[Kind, bytes]] = []  # metadata to fetch
        self.files: list[bytes] = []  # files to fetch, when no one takes them as they are found
        # files forked workers were sent at once (`fork_workers`): the request's params (by
        # whose id `store_forked` finds its answer) and the files (their fds closed once sent)
        self.early: list[tuple[dict, list[tuple[bytes, FetchedFile]]]] = []
        self.on_file: Callable[[bytes], None] | None = None
        self.walked = False  # every metadata object is verified and in `objects`
        self.stats = PullStats()
        self.inline_max = inline_max(repo)
        # temporary files on the repository's filesystem, so storing them can reflink
        self.tmp_dir = os.path.abspath(repo.path / "objects")
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.last_checkpoint = time.monotonic()
        self.checkpointed = 0

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
                if self.on_file is None:
                    self.files.append(checksum)
                else:
                    self.on_file(checksum)
                if self.options.progress:
                    self.options.progress.file_found()
        elif entry is not None:
            verify_metadata(entry.data, checksum, kind)  # a damaged base must not slip in
            self.accept(kind, checksum, entry.data)
            self.stats.metadata_reused += 1
        else:
            self.found.append((kind, checksum))

    def accept(self, kind: Kind, checksum: bytes, data: bytes) -> None:
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

    def read_metadata(self, kind: Kind, checksum: bytes) -> bytes:
        """One metadata object from the source, verified (a blocking call)."""
        data = named(self.source, kind, checksum, self.source.read_metadata, checksum, kind)
        verify_metadata(data, checksum, kind)
        return data

    def metadata_fetched(self, count: int) -> None:
        self.stats.metadata_fetched += count
        if self.options.progress:
            self.options.progress.metadata(self.stats.metadata_fetched)

    def walk_here(self) -> None:
        """Every metadata object, read here one after another; the files they name are left
        in `files`."""
        self.want(Kind.COMMIT, self.commit)
        while self.found:
            kind, checksum = self.found.pop()
            self.accept(kind, checksum, self.read_metadata(kind, checksum))
            self.metadata_fetched(1)
        self.walked = True

    # ---- files ---------------------------------------------------------------------

    def fetch_file(self, checksum: bytes) -> FetchedFile:
        return named(self.source, Kind.FILE, checksum, self.source.fetch_file, checksum, self.inline_max, self.tmp_dir)

    def inlined(self, checksum: bytes, fetched: FetchedFile) -> None:
        self.objects.add(checksum, Entry(fetched.header.archive_header() + (fetched.content or b"")))
        self.stats.inlined += 1
        self._file_done(fetched.header.size)

    def stored(self, checksum: bytes, fetched: FetchedFile, object_id: bytes, how: str) -> None:
        self.objects.add(checksum, Entry(fetched.header.archive_header(), object_id))
        self.objects.headers[checksum] = fetched.header
        self.stats.stored[how] = self.stats.stored.get(how, 0) + 1
        self._file_done(fetched.header.size)

    def take_stored(self, batch: list[tuple[bytes, FetchedFile]], results: list[Stored | Failed]) -> None:
        """The object workers' answers for these files: each an object of the commit, or
        the first failure raised, naming its file."""
        for (checksum, fetched), result in zip(batch, results):
            if isinstance(result, Failed):
                if result.errno == errno.EBADMSG:
                    raise OstreeError(f"{describe(checksum, Kind.FILE)}: {MISMATCH}")
                raise OstreeError(f"{describe(checksum, Kind.FILE)}: storing its content failed: {result.message}")
            self.stored(checksum, fetched, result.object_id, result.how)

    @staticmethod
    def content_check(checksum: bytes, fetched: FetchedFile) -> tuple[bytes, bytes] | None:
        """Content not yet verified (a bare repository's file, which its owner could change
        at any time) is checked by whoever stores it, on the private copy, in the same read
        that computes the object's digest: (the checksum's prefix, the checksum)."""
        return None if fetched.verified else (fetched.header.checksum_prefix(), checksum)

    def store_params(self, batch: list[tuple[bytes, FetchedFile]]) -> dict:
        """A STORE request's params for these files: sizes, and the content checks."""
        return api.file_params([f.header.size for _, f in batch],
                               sha256s=[self.content_check(c, f) for c, f in batch])

    def _file_done(self, nbytes: int) -> None:
        self.stats.files_fetched += 1
        self.stats.content_bytes += nbytes
        if self.options.progress:
            self.options.progress.file_done(nbytes)

    def store_here(self) -> bool:
        """Fetch and store the files in `files` here, when their content comes to at most
        HERE_BYTES in at most HERE_FILES files; False, having stored nothing, when to more."""
        # imported here: the workers' methods, without the pool (and trio)
        from pycfs.host.workers.service import WorkerService
        from pycfs.protocol.rpcserver import Call

        fetched: list[tuple[bytes, FetchedFile]] = []
        try:
            total = held = 0
            for checksum in self.files:
                fetched.append((checksum, self.fetch_file(checksum)))
                if fetched[-1][1].fd is not None:
                    total += fetched[-1][1].header.size
                    held += 1
                    if total > HERE_BYTES or held > HERE_FILES:
                        return False
            stores = [(c, f) for c, f in fetched if f.fd is not None]
            if stores:
                # Hashing a source under a read lease (as the workers do) ignores SIGIO,
                # which only the main thread may set.
                if threading.current_thread() is threading.main_thread():
                    self.repo.enable_source_leases()
                params = self.store_params(stores)
                answer = WorkerService(self.repo.alg, self.repo).store(Call([f.fd for _, f in stores]), **params)
                self.take_stored(stores, api.stored_results(
                    api.parse_answer({"result": answer}, len(stores), api.STORE, self.repo.digest_size)))
            for checksum, f in fetched:
                if f.fd is None:
                    self.inlined(checksum, f)
            self.files = []
            return True
        finally:
            close_fds([f for _, f in fetched])

    def fork_workers(self) -> list[Forked]:
        """The object workers, forked now when the commit was walked here and its files are
        more than this process stores alone (none for a pull that does not know yet: its
        pool starts them when it needs them). Call it while the main thread is the only one
        (see `pycfs.host.workers.fork`): each worker is written at once one STORE request of
        the first files (`early`), which it stores while this process fetches the next
        ones for `store_forked`."""
        if not self.walked or not self.files:
            return []
        # here: an update or a re-pull forks none
        from pycfs.host.workers.batching import default_jobs
        from pycfs.host.workers.fork import discard, fork_workers

        forked = fork_workers(str(self.repo.path), self.options.jobs or default_jobs())
        if not forked:
            return []
        share = min(api.MAX_FILES_PER_REQUEST, -(-len(self.files) // len(forked)))
        try:
            for request_id, worker in enumerate(forked, 1):
                if not self._send_early(worker, request_id, share):
                    break
        except BaseException as e:
            if isinstance(e, Exception) and self.early:  # (not on Ctrl-C: out at once)
                with contextlib.suppress(Exception):  # what the workers stored is kept for the next try
                    workers = self._blocking_store(forked)
                    try:
                        workers.drain()
                    finally:
                        workers.close(abort=True)
            discard(forked)  # (after a close: nothing more)
            self.checkpoint_after_failure()
            raise
        return forked

    def _send_early(self, worker: Forked, request_id: int, share: int) -> bool:
        """The next `share` files in `files` that need storing, sent to a forked worker
        (the inline ones met on the way taken here); False when there were none, or the
        worker is gone (then `store_forked` fails the pull when it reads from that worker)."""
        from pycfs.host.workers.fork import send_early

        batch: list[tuple[bytes, FetchedFile]] = []
        taken = 0
        try:
            while len(batch) < share and taken < len(self.files):
                checksum = self.files[taken]
                fetched = self.fetch_file(checksum)
                taken += 1
                if fetched.fd is None:
                    self.inlined(checksum, fetched)
                else:
                    batch.append((checksum, fetched))
            if not batch:
                del self.files[:taken]
                return False
            params = self.store_params(batch)
            sent = send_early(worker, request_id, api.STORE, params, [f.fd for _, f in batch])
        finally:
            close_fds([f for _, f in batch])
        self.files[:taken] = [] if sent else [c for c, _ in batch]
        if sent:
            self.early.append((params, batch))
        return sent

    def _blocking_store(self, forked: Sequence[Forked]) -> BlockingStore:
        """The forked workers behind blocking calls, their early requests' answers (when
        they come) taken into the commit."""
        from pycfs.host.workers.blocking import BlockingStore

        early = {id(params): batch for params, batch in self.early}
        self.early = []
        return BlockingStore(forked, self.repo.digest_size, lambda params: partial(self.take_stored, early.pop(id(params))))

    def store_forked(self, forked: Sequence[Forked]) -> PullResult:
        """The walked pull's remaining files fetched here and stored by the forked workers
        (`fork_workers`, whose early requests' answers are taken too), then the image:
        all of it without an event loop (`pycfs.host.workers.blocking`). The workers are
        this call's: stopped and reaped whatever happens."""
        try:
            workers = self._blocking_store(forked)
        except BaseException:
            from pycfs.host.workers.fork import discard

            discard(forked)
            self.checkpoint_after_failure()
            raise
        try:
            files, self.files = self.files, []
            for start in range(0, len(files), STORE_BATCH):
                batch = []
                try:
                    for checksum in files[start:start + STORE_BATCH]:
                        fetched = self.fetch_file(checksum)
                        if fetched.fd is None:
                            self.inlined(checksum, fetched)
                        else:
                            batch.append((checksum, fetched))
                    if batch:
                        workers.store([f.fd for _, f in batch], self.store_params(batch), partial(self.take_stored, batch))
                finally:
                    close_fds([f for _, f in batch])  # (once sent, the worker has its own)
                if time.monotonic() - self.last_checkpoint > CHECKPOINT_SECONDS:
                    self.checkpoint()
            workers.drain()
            workers.close_input()  # the workers exit while the image is built
            behind = _sync_behind(self.repo)
            try:
                image_id = self.finish_image()
            finally:
                behind.join()
        except BaseException as e:
            if isinstance(e, Exception):  # (not on Ctrl-C: out at once)
                # what the workers stored meanwhile is kept for the next try, not fetched again
                with contextlib.suppress(Exception):
                    workers.drain()
            workers.close(abort=True)
            self.checkpoint_after_failure()
            raise
        workers.close()
        return self.result(image_id)

    # ---- the end -------------------------------------------------------------------

    def finish_image(self) -> bytes:
        """The image, then the commit stream naming it, then the ref."""
        return ensure_image(self.repo, self.objects, self.name)

    def result(self, image_id: bytes) -> PullResult:
        self.drop_partial()
        if isinstance(self.source, HttpRepo):
            self.stats.requests = self.source.requests
        return PullResult(self.commit, image_id, self.name, False, self.stats, time.monotonic() - self.started)

    # ---- interruption --------------------------------------------------------------

    def checkpoint(self) -> None:
        """Keep what is verified so far as the partial stream (a base for the next try)."""
        self.last_checkpoint = time.monotonic()
        if self.commit not in self.objects or len(self.objects.entries) == self.checkpointed:
            return
        self.repo.write_stream(self.objects.to_stream(self.repo.alg), PARTIAL_PREFIX + self.commit.hex())
        self.checkpointed = len(self.objects.entries)

    def checkpoint_after_failure(self) -> None:
        try:
            self.checkpoint()
        except (OSError, PycfsError):
            pass  # the error being raised is the one to report

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


def _sync_behind(repo: Repository) -> threading.Thread:
    """syncfs on a thread, started once the workers have stored every file: what they wrote
    goes to disk while this process builds the image (~0.06 s of CPU), so the sync before
    the commit stream becomes visible (which alone makes the pull durable) has only the
    image and the stream left to wait for (o3: 20-80 ms, on one core at the end)."""

    def sync() -> None:
        try:
            syscalls.syncfs(repo.dirfd)
        except OSError:
            pass  # the sync before the stream is the one that counts: it reports

    thread = threading.Thread(target=sync, name="pycfs-sync-behind", daemon=True)
    thread.start()
    return thread


def named(source: LocalRepo | HttpRepo, kind: Kind, checksum: bytes, fn: Callable[..., T], *args: object) -> T:
    """A source call; an OSError names the object it was about."""
    try:
        return fn(*args)
    except OSError as e:
        raise OstreeError(f"{describe(checksum, kind)} from {source.description}: {e}") from None


def close_fds(files: list[FetchedFile]) -> None:
    for fetched in files:
        if fetched.fd is not None:
            os.close(fetched.fd)
            fetched.fd = None  # (the batch is kept for its answer: no second close)


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

    ref: str | None  # the ref it was asked for (None: a checksum)
    upstream: str | None  # that branch's name upstream (`origin/main`, `origin:main`: main)
    current: tuple[str, CommitObjects] | None  # NAME and what it names now, when it may not go back

    def check(self, commit: bytes, new: Commit) -> None:
        # As ostree: a commit bound to refs (`ostree.ref-binding`, written by `ostree
        # commit --branch`) comes only by one of them, so a server cannot pass one branch's
        # commit off as another's.
        bound = next((v.value for k, v in new.metadata if k == "ostree.ref-binding" and v.type == "as"), None)
        if self.upstream is not None and bound is not None and self.upstream not in bound:
            asked = "" if self.ref == self.upstream else f" (asked for as {self.ref})"
            raise OstreeError(f"commit {commit.hex()} is bound to {', '.join(bound) or 'no ref'} (ostree.ref-binding), "
                              f"not to {self.upstream}{asked}, the ref the repository serves it as")
        # As ostree's timestamp check: a commit older than the one NAME names now (a
        # replayed old, perhaps vulnerable, commit) is refused; the same second is not older.
        if self.current is not None:
            name, objects = self.current
            now = commit_of(objects).timestamp
            if new.timestamp < now:
                raise OstreeError(f"commit {commit.hex()} ({commit_date(new.timestamp)}) is older than commit "
                                  f"{objects.commit.hex()} ({commit_date(now)}) that {name} names now: refusing "
                                  "the downgrade (--allow-downgrade permits it)")


def _current(repo: Repository, name: str) -> bytes | None:
    return dict(list_refs(repo)).get(name)


def prepare_pull(repo: Repository, source: LocalRepo | HttpRepo, ref: str, options: PullOptions) -> PullResult | PullCore:
    """The pull's result when it needs no event loop, else its state for `run_prepared`
    (blocking calls: from a trio task, run it on a thread)."""
    # Loading the base and the walk make thousands of objects and no cycles: the collector
    # would rescan them dozens of times (~4 ms of an update's 0.2 s).
    with gc_paused():
        return _prepare_pull(repo, source, ref, options, time.monotonic())


def _prepare_pull(repo: Repository, source: LocalRepo | HttpRepo, ref: str, options: PullOptions,
                  started: float) -> PullResult | PullCore:
    if options.gpg_keyring is not None:
        source.summary_keyring = options.gpg_keyring  # refs and deltas only from a signed summary
    commit, upstream = source.resolve(ref)
    # (`origin:main` is stored as ostree stores it, as origin/main)
    name = options.name if options.name is not None else (None if upstream is None else ref.replace(":", "/", 1))
    if name is not None:
        check_ref_name(name)
    at = _current(repo, name) if name is not None else None
    current = load_commit(repo, name, at) if name is not None and at is not None else None
    checks = _Checks(None if upstream is None else ref, upstream,
                     None if name is None or current is None or current.commit == commit or options.allow_downgrade
                     else (name, current))
    signed = None
    if options.gpg_keyring is not None:
        signed = _signed_commit(source, commit, options.gpg_keyring)
    if has_commit(repo, commit):
        # a re-pull under the same NAME has it loaded already
        objects = current if current is not None and current.commit == commit else load_stream(repo, stream_name(commit))
        checks.check(commit, commit_of(objects))
        image_id = ensure_image(repo, objects, name)
        stats = PullStats(requests=source.requests if isinstance(source, HttpRepo) else None)
        return PullResult(commit, image_id, name, True, stats, time.monotonic() - started)
    core = PullCore(repo, source, commit, name, options, checks, started)
    if options.base_name is not None:
        core.add_base(load_commit(repo, options.base_name), f"--base-name {options.base_name}:")
    elif current is not None:
        core.add_base(current, f"{name} was")
    core.load_partial()
    if signed is not None:
        core.add_base(signed, "signature verified on")  # not fetched again
    # From a local repository: the metadata here (an archive's static delta, which gives
    # a base, is looked for by the full pull first).
    if isinstance(source, LocalRepo) and not (options.deltas and source.archive):
        try:
            core.walk_here()
            # as the pool would: in process unless a number of workers was asked for
            if options.jobs is None and core.store_here():
                return core.result(core.finish_image())
        except BaseException:
            core.checkpoint_after_failure()
            raise
    return core
