"""Import an image from podman's containers-storage into a repository, reflinking file content.

Per layer not yet in the repository (`streams/oci-layer-<diff_id>` absent) the layer tar is
rebuilt from its tar-split: segment bytes go inline; each file's content is taken from the
layer directory, files over 64 bytes stored as objects (FICLONE when the filesystems allow:
no data copied), smaller ones inline. That is the same cut as the tar import path, so both
give identical layer streams.

The host opens the files (threads) and passes their fds to object worker processes
(`pycfs.host.workers`), which hash and store them: one per core, as hashing in threads of
one process is capped by the GIL. A layer streams through: its tar-split is read a chunk
at a time while earlier chunks are stored and written (`LayerImport`), and with
`parse_layers` the entries of each imported layer are parsed from the pieces as they are
written (`LayerEntryCollector`) and merged into the image's tree (`ImageTree`) while the
import goes on: the image build after it only normalises and writes the tree.

Files are opened beneath the layer directory with openat2 (RESOLVE_CONFINED, O_NOFOLLOW):
nothing a tar-split names can lead outside it (`pycfs.host.oci.layerfiles`, which the CLI's
head start, `pycfs.host.oci.headstart`, shares to begin the first layer before trio). A
file the user may not open (owned by a user-namespace uid) goes to the helper, which hands
back an fd; without a helper that is an error naming the file, never a silent skip. An
overlay metacopy stub (metadata only) is looked up in the layer's ancestors.

The c/storage read locks are held from the image lookup until the last layer file is
stored, so `podman rmi` waits for us instead of deleting what we read.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import functools
import pwd
import time
from pathlib import Path
from typing import Protocol

import trio

from pycfs.host.errors import PycfsError
from pycfs.host.helperclient import owns_store
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.headstart import EarlyBatch, HeadStart
from pycfs.host.oci.image import finish_pull
from pycfs.host.oci.merge import ImageTree
from pycfs.host.oci.layer import LayerEntryCollector
from pycfs.host.oci.result import ImportStats, PullResult, containers_storage_result
from pycfs.host.oci.streams import check_layer_count
from pycfs.host.progress import PullProgress
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.streamcat import stream_digest
from pycfs.host.storage.image import ImageSource, read_image
from pycfs.host.storage.locks import ReadLocks
from pycfs.host.storage.store import ImageLayer, Storage, StorageError
from pycfs.host.storage.tarsplit import FileEntry, Segment
from pycfs.host.oci.layerfiles import (
    CHUNK_ENTRIES,
    LayerFiles,
    TarSplitReader,
    file_batches,
    inline_or_fd,
    open_batch,
    stored_files,
)
from pycfs.host.workers.batching import batch_files
from pycfs.host.workers.fork import Forked
from pycfs.host.workers.pool import Failed, WorkerPool, open_pool
from pycfs.protocol.worker_api import Stored

CHUNKS_IN_FLIGHT = 4  # read ahead of the writer: bounds memory whatever the layer's size
HELPER_BATCH = 128  # paths per helper call: bounded by the helper client's fd budget
# Layer imports begun and not finished: the next one starts while the one before drains,
# no more (each holds its chunks, its stream writer and its directory fds).
LAYERS_IN_FLIGHT = 2


class FdOpener(Protocol):
    """Opens layer files for us and takes the fds back (`release` closes them)."""

    async def open_files(self, layer_id: str, paths: list[bytes], store: Path | None = None) -> list[int | OSError]:
        """Open paths of the layer in the primary store, or in additional store ``store``."""

    def release(self, fd: int) -> None: ...

    async def warm_up(self) -> None:
        """Get ready for `open_files` ahead of need; a failure waits for a real need."""

    def denied_advice(self) -> str | None:
        """What to do when it was denied a file, if its set-up says why; else None."""


class HelperOpener(FdOpener, Protocol):
    """What the importer needs from pycfs.host.helperclient.HelperClient."""

    info: dict | None  # None until the helper has started

    async def hello(self) -> dict: ...

    async def aclose(self) -> None:
        """Stop the helper (and its `podman unshare`), if started; again: nothing."""


# ---- one layer ------------------------------------------------------------------------


class _Chunk:
    """A run of consecutive tar-split entries, written out once all its files are stored."""

    def __init__(self, entries: list[Segment | FileEntry]) -> None:
        self.entries = entries
        self.content: dict[int, bytes | tuple[bytes, int]] = {}  # index -> inline bytes or (object id, size)
        self.files = stored_files(entries)
        self.pending = len(self.files)
        self.done = trio.Event()
        if not self.pending:
            self.done.set()

    def record(self, index: int, content: bytes | tuple[bytes, int]) -> None:
        self.content[index] = content
        self.pending -= 1
        if not self.pending:
            self.done.set()


# One file of a chunk on its way to the repository: (chunk, index in it, its entry).
_Item = tuple[_Chunk, int, FileEntry]


class LayerImport:
    """Rebuild one layer from tar-split + layer files into `oci-layer-<diff_id>`, streaming.

    Three kinds of task share the work: a reader takes the tar-split CHUNK_ENTRIES entries at
    a time and deals their files out in batches; the pull's coordinators (`coordinate`)
    open each batch (in a thread; the helper for what the user may not open) and hand the
    fds to the object workers; a writer appends each chunk to the splitstream, in order,
    once its files are stored. At most CHUNKS_IN_FLIGHT chunks are held, so memory does not
    grow with the layer, and the workers start on the first files while the rest of the
    tar-split is still being read.

    The coordinators serve every layer of a pull: once this layer's reader has dealt its
    last batch (`dealt`), the next layer's reader starts, so the workers go on with its
    files while this layer's last ones are stored and its stream is written, instead of
    idling at each layer's end. What must stay in layer order waits for `after`, the layer
    before's `finished`: merging entries into the image's tree, and committing the stream.

    A layer begun before the event loop (`head`) goes on from there: its chunks read
    already are dealt first, the batches sent early taken from the pool in their place.
    """

    def __init__(
        self,
        repo: Repository,
        layer: ImageLayer,
        stats: ImportStats,
        limiter: trio.CapacityLimiter,
        pool: WorkerPool,
        helper: FdOpener | None,
        progress: PullProgress | None,
        verify_diffid: bool,
        batches: trio.MemorySendChannel,
        tree: ImageTree | None = None,
        after: trio.Event | None = None,
        head: HeadStart | None = None,
    ) -> None:
        """``batches``: where the reader deals its batches, for `coordinate` (this closes its
        own clone of it); ``after``: the layer before's `finished` (None: none is pending);
        ``head``: this layer, begun before the event loop (its reader and files are this
        import's now)."""
        self.repo = repo
        self.pool = pool
        self.layer = layer
        self.stats = stats
        self.limiter = limiter
        self.helper = helper
        self.progress = progress
        self.head = head
        self.files = head.files if head is not None else LayerFiles(layer.store, layer.layer.id)
        self.writer = repo.new_stream(CONTENT_OCI_LAYER, f"layer {layer.diff_id}")
        self.hasher = hashlib.sha256() if verify_diffid else None
        # the layer's entries, parsed from what is written, go to the image's tree
        self.tree = tree
        self.collector = LayerEntryCollector(tree.budget, 1, f"layer {layer.diff_id}") if tree is not None else None
        self.total = 0  # bytes of the rebuilt tar so far
        self.batch_files = batch_files()
        self.batches = batches.clone()
        self.after = after
        self.dealt = trio.Event()  # every batch is dealt: the next layer's reader may start
        # Set by the pull once the stream is committed and known, and the entries are merged.
        self.finished = trio.Event()

    def _advance(self, nbytes: int) -> None:
        if self.progress is not None and nbytes:
            self.progress.advance(self.layer.diff_id, nbytes)

    async def run(self) -> bytes:
        """Import the layer; returns its stream id."""
        rec = self.layer.layer
        path = self.layer.store.tar_split_path(rec.id)
        if self.head is None and not path.exists():
            raise StorageError(f"layer {rec.id[:12]} has no tar-split ({path}): it cannot be rebuilt byte-exact")
        if self.progress is not None:
            self.progress.layer_started(self.layer.diff_id, rec.diff_size)
        send_chunks, chunks = trio.open_memory_channel(CHUNKS_IN_FLIGHT)
        send_written, written = trio.open_memory_channel(CHUNKS_IN_FLIGHT)
        async with open_nursery() as nursery:
            nursery.start_soon(self._read, send_chunks, nursery)
            nursery.start_soon(self._write, chunks, send_written)
            nursery.start_soon(self._parse, written)
        # Every file is recorded, so no coordinator opens any more of this layer's files.
        # (After a failure the pull closes them once every coordinator's thread is back:
        # a directory fd closed under a thread's openat2 could be some other file by then.)
        self.files.close()
        if self.after is not None:
            await self.after.wait()
        return await trio.to_thread.run_sync(self._finish, limiter=self.limiter)

    # -- reading --

    async def _read(self, chunks: trio.MemorySendChannel, nursery: trio.Nursery) -> None:
        warming = False
        head, self.head = self.head, None
        async with chunks, self.batches as batches:
            with head.stack if head is not None else self.layer.store.tar_split_entries(self.layer.layer.id) as source:
                reader = head.reader if head is not None else TarSplitReader(source, self.files,
                                                                             self.layer.layer.diff_size)
                read = collections.deque(head.chunks if head is not None else ())
                early = collections.deque(head.early if head is not None else ())
                while entries := read.popleft() if read else await self._take(reader, head):
                    if reader.helper_wanted and not warming and self.helper is not None:
                        # The helper's start-up (podman unshare, ~0.25 s) overlaps the
                        # files read before these, instead of stalling the first denied one.
                        warming = True
                        nursery.start_soon(self.helper.warm_up)
                    chunk = _Chunk(entries)
                    await chunks.send(chunk)  # waits while CHUNKS_IN_FLIGHT are unwritten
                    for batch in file_batches([(chunk, i, e) for i, e in chunk.files], self.batch_files):
                        if early:  # sent before the event loop, in this order
                            nursery.start_soon(self._take_early, early.popleft(), batch)
                        else:
                            await batches.send((self, batch))
        self.dealt.set()

    @staticmethod
    async def _take(reader: TarSplitReader, head: HeadStart | None) -> list[Segment | FileEntry]:
        """The next chunk of entries; what reading it raised when the head start did."""
        if head is not None and head.failure is not None:
            raise head.failure
        return await trio.to_thread.run_sync(reader.take, CHUNK_ENTRIES)

    # -- storing --

    async def store_batch(self, batch: list[_Item]) -> None:
        """Open a batch (in a thread), hand its fds to the object workers, record."""
        # Not behind self.limiter: the background layer parses hold it for long
        # stretches, and the workers would starve. The coordinators bound these.
        opened = await trio.to_thread.run_sync(open_batch, self.files, [entry for _, _, entry in batch])
        items, denied = [], []
        for item, got in zip(batch, opened):
            if got is None:
                denied.append(item)
            else:
                items.append((item, got))
        try:
            await self._store(items, via_helper=False)
        finally:
            for _, got in items:
                if isinstance(got, int):
                    os.close(got)
        if denied:
            await self._via_helper(denied)

    async def _take_early(self, early: EarlyBatch, batch: list[_Item]) -> None:
        """Record a batch the CLI sent before the event loop (`pycfs.host.oci.headstart`):
        the workers' answer to it, its small files' bytes, and the helper's files."""
        if len(early.entries) != len(batch) or any(sent is not entry for sent, (_, _, entry) in zip(early.entries, batch)):
            raise AssertionError("an early batch is not the batch dealt in its place")
        items = [(item, got) for item, got in zip(batch, early.opened) if got is not None]
        results = await self.pool.stored_early(early.request_id) if early.request_id is not None else []
        self._record(items, results, via_helper=False)
        denied = [item for item, got in zip(batch, early.opened) if got is None]
        if denied:
            await self._via_helper(denied)

    async def _store(self, items: list[tuple[_Item, bytes | int]], via_helper: bool) -> None:
        """Record inline bytes; send the fds to the object workers and record what they stored."""
        sent = [(item, fd) for item, fd in items if isinstance(fd, int)]
        results = await self.pool.store([fd for _, fd in sent], [item[2].size for item, _ in sent],
                                        [item[2].crc64 for item, _ in sent])
        self._record(items, results, via_helper)

    def _record(self, items: list[tuple[_Item, bytes | int]], results: list[Stored | Failed], via_helper: bool) -> None:
        """Record each item's inline bytes, or what the workers stored of it (``results``:
        the answers for the items with an fd, in order)."""
        sent = [item for item, data in items if isinstance(data, int)]
        for (chunk, index, _), data in items:
            if isinstance(data, bytes):
                chunk.record(index, data)
        for (chunk, index, entry), result in zip(sent, results):
            if isinstance(result, Failed):
                raise PycfsError(f"cannot store {self.files.describe(entry.relpath)}: {result.message}")
            chunk.record(index, (result.object_id, entry.size))
            self.stats.count(result.how, entry.size)
        if via_helper:
            self.stats.files_via_helper += len(items)
        self._advance(sum(item[2].size for item, _ in items))

    async def _via_helper(self, denied: list[_Item]) -> None:
        """Files the user may not open: the helper opens them in the user namespace and passes fds."""
        first = denied[0][2]
        more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
        store = self.layer.store
        # The helper opens files beneath the primary store and the additional ones you own
        # (every helper is started with those: `HelperClient(additional_stores=...)`)
        if store.read_only and not owns_store(store.root):
            raise PycfsError(
                f"permission denied reading {self.files.describe(first.relpath)}{more}: it is in additional "
                f"image store {store.root}, whose root is not yours, and the helper opens files only in stores "
                "you own; the store's owner can make the file readable"
            )
        if self.helper is None:
            raise PycfsError(
                f"permission denied reading {self.files.describe(first.relpath)}{more}: it belongs to a "
                "user-namespace uid and needs the helper (--helper auto or always)"
            )
        pending = denied
        for layer_id in self.files.chain():  # ancestors only matter for overlay metacopy stubs
            if not pending:
                break
            still: list[_Item] = []
            for start in range(0, len(pending), HELPER_BATCH):
                still += await self._helper_batch(layer_id, pending[start : start + HELPER_BATCH])
            pending = still
        if pending:
            raise PycfsError(
                f"{self.files.describe(pending[0][2].relpath)} is an overlay metacopy stub whose data is in no layer below it"
            )

    async def _helper_batch(self, layer_id: str, batch: list[_Item]) -> list[_Item]:
        """Store one batch through helper fds; returns the metacopy stubs, to look for in lower layers."""
        helper = self.helper
        assert helper is not None
        own = layer_id == self.files.layer_id
        results = await helper.open_files(layer_id, [entry.relpath for _, _, entry in batch],
                                          self.layer.store.root if self.layer.store.read_only else None)
        unreleased = {r for r in results if isinstance(r, int)}

        def give_back(fd: int) -> None:
            if fd in unreleased:
                unreleased.discard(fd)
                helper.release(fd)

        still = []
        try:
            if len(results) != len(batch):
                raise PycfsError(f"the helper answered {len(results)} of {len(batch)} files")
            ready = []
            for item, res in zip(batch, results):
                entry = item[2]
                if isinstance(res, OSError):
                    if res.errno != errno.ENOENT:
                        advice = helper.denied_advice() if res.errno in (errno.EACCES, errno.EPERM) else None
                        raise PycfsError(f"the helper cannot open {self.files.describe(entry.relpath)}"
                                         + (f" ({res.strerror}): {advice}" if advice else f": {res}"))
                    if own:  # listed by the layer's tar-split, so it must be in the layer itself
                        raise PycfsError(f"{self.files.describe(entry.relpath)} is missing from the layer directory")
                    still.append(item)
                    continue
                st = os.fstat(res)
                if self.files.metacopy_lookup(res, st, entry.size, entry.relpath) is not None:
                    give_back(res)
                    still.append(item)  # a stub: its data is in a lower layer
                    continue
                data = inline_or_fd(self.files, entry, res, st, owned=False)
                if isinstance(data, bytes):
                    give_back(res)
                ready.append((item, data))
            await self._store(ready, via_helper=True)
        finally:
            for fd in list(unreleased):
                give_back(fd)  # closed right after storing: the helper's fd budget is finite
        return still

    # -- writing --

    async def _write(self, chunks: trio.MemoryReceiveChannel, written: trio.MemorySendChannel) -> None:
        async with written:
            async for chunk in chunks:
                await chunk.done.wait()
                pieces: list[bytes | tuple[bytes]] = []
                headers, inlined, files = await trio.to_thread.run_sync(self._write_chunk, chunk, pieces,
                                                                        limiter=self.limiter)
                # Counted here, in trio's thread: layers write their chunks on threads at once.
                self.stats.bytes_inlined += inlined
                self.stats.files_inlined += files
                self._advance(headers)
                if self.collector is not None:
                    await written.send(pieces)

    async def _parse(self, written: trio.MemoryReceiveChannel) -> None:
        """The entries of each chunk written, parsed in a thread of their own: in the
        writer's, the parse held up the pipeline (measured: the pull took 1-2 s longer).
        Not before the layer below is merged into the tree (meanwhile what is written
        waits in the channel, and the writer and reader behind it)."""
        async for pieces in written:
            if self.after is not None:
                await self.after.wait()
            await trio.to_thread.run_sync(self._apply, pieces, limiter=self.limiter)

    def _apply(self, pieces: list[bytes | tuple[bytes]]) -> None:
        assert self.collector is not None and self.tree is not None
        self.collector.feed(pieces)
        self.tree.apply(self.collector.take())

    def _write_chunk(self, chunk: _Chunk, pieces: list[bytes | tuple[bytes]]) -> tuple[int, int, int]:
        """Worker thread: append a chunk to the splitstream (hashing it when verifying);
        returns its bytes of tar headers (for the progress bar), its inline bytes and its
        files written inline (for the stats). When collecting, what it writes is listed in
        pieces, for `LayerEntryCollector.feed`."""
        headers = inlined = files = 0
        collecting = self.collector is not None
        for index, entry in enumerate(chunk.entries):
            if isinstance(entry, Segment):
                data: bytes | tuple[bytes, int] = entry.data
                headers += len(data)
            elif entry.size == 0:
                continue
            else:
                data = chunk.content[index]
            if isinstance(data, bytes):
                if not data:
                    continue
                self.writer.write_inline(data)
                self.total += len(data)
                inlined += len(data)
                files += isinstance(entry, FileEntry)
                if self.hasher is not None:
                    self.hasher.update(data)
                if collecting:
                    pieces.append(data)
            else:
                object_id, size = data
                self.writer.write_external(object_id, size)
                self.total += size
                if self.hasher is not None:
                    self.repo.feed_object(object_id, size, self.hasher.update)
                if collecting:
                    pieces.append((object_id,))
        return headers, inlined, files

    def _finish(self) -> bytes:
        """Worker thread: check the rebuilt tar against what c/storage recorded, then commit."""
        rec = self.layer.layer
        if rec.diff_size is not None and self.total != rec.diff_size:
            raise PycfsError(f"layer {rec.id[:12]}: rebuilt tar is {self.total} bytes, c/storage recorded {rec.diff_size}")
        if self.hasher is not None and "sha256:" + self.hasher.hexdigest() != self.layer.diff_id:
            raise PycfsError(
                f"layer {rec.id[:12]}: rebuilt tar has digest sha256:{self.hasher.hexdigest()}, "
                f"not its diff_id {self.layer.diff_id}"
            )
        stream_id = self.repo.write_stream(self.writer, f"oci-layer-{self.layer.diff_id}",
                                           verified=self.hasher is not None)
        if self.collector is not None and self.tree is not None:
            self.collector.close()
            self.tree.apply(self.collector.take())
            self.tree.end_layer(stream_id)
        return stream_id


def _stream_has_diffid(repo: Repository, stream_id: bytes, diff_id: str) -> bool:
    """Worker thread: whether a stored layer stream's tar hashes to `diff_id`."""
    try:
        if "sha256:" + stream_digest(repo, stream_id, "sha256") != diff_id:
            return False
    except (PycfsError, OSError):
        return False
    repo.mark_verified(stream_id)  # (checked now: later pulls from checked sources may take it)
    return True


async def coordinate(batches: trio.MemoryReceiveChannel) -> None:
    """One of the pull's coordinators: store each batch the layers' readers deal out."""
    async for job, batch in batches:
        await job.store_batch(batch)


# ---- the whole image ------------------------------------------------------------------


class _HelperGate:
    """Starts the helper with the c/storage locks let go: `podman unshare` takes them for writing.

    After re-taking the locks the image is looked up again; if podman changed it meanwhile
    the pull stops (objects stored so far are content-addressed, so nothing is wrong, only
    unfinished)."""

    def __init__(self, helper: HelperOpener, locks: ReadLocks, storage: Storage, source: ImageSource,
                 ref: str, on_wait) -> None:
        self.helper = helper
        self.locks = locks
        self.storage = storage
        self.source = source
        self.ref = ref
        self.on_wait = on_wait
        self._starting = trio.Lock()
        self._warming: trio.CancelScope | None = None  # a start nothing has needed yet
        self._done = False

    async def open_files(self, layer_id: str, paths: list[bytes], store: Path | None = None) -> list[int | OSError]:
        await self._start()
        return await self.helper.open_files(layer_id, paths, store)

    async def warm_up(self) -> None:
        await self._start(needed=False)

    def stop_warming(self) -> None:
        """Every layer is imported: a start no file needed is given up, not waited for (a
        `podman unshare` that hangs would hold the pull up to HELLO_TIMEOUT). The locks are
        taken again and the image checked all the same."""
        self._done = True
        if self._warming is not None:
            self._warming.cancel()

    async def _start(self, needed: bool = True) -> None:
        async with self._starting:  # several coordinators may need the helper at once
            if self.helper.info is None and (needed or not self._done):
                self.locks.release()
                scope = trio.CancelScope()
                if not needed:
                    self._warming = scope
                try:
                    with scope:
                        await self.helper.hello()
                except PycfsError:
                    if needed:
                        raise
                    # Perhaps no file needs it after all; one that does meets the error again.
                finally:
                    self._warming = None
                    await self.locks.acquire(on_wait=self.on_wait)
                again = await trio.to_thread.run_sync(read_image, self.storage, self.ref)
                if again.image.id != self.source.image.id or [l.layer.id for l in again.layers] != [
                    l.layer.id for l in self.source.layers
                ]:
                    raise PycfsError(
                        f"image {self.ref!r} changed in containers-storage while the helper started: run the pull again"
                    )

    def release(self, fd: int) -> None:
        self.helper.release(fd)

    def denied_advice(self) -> str | None:
        """Without a subordinate id range `podman unshare` maps the user's own id alone: the
        store's files of other ids (written while a range was there) are closed to the helper
        too, as the kernel lets no capability reach an unmapped owner."""
        info = self.helper.info or {}
        for key, what in (("uid_map", "uid"), ("gid_map", "gid")):
            rows = info.get(key)
            if isinstance(rows, list) and sum(r[2] for r in rows if isinstance(r, list) and len(r) == 3
                                               and type(r[2]) is int) == 1:
                try:
                    user = pwd.getpwuid(os.getuid()).pw_name
                except KeyError:
                    user = f"uid {os.getuid()}"
                return (f"`podman unshare` maps only your {what} (no /etc/subuid or /etc/subgid range for {user}): "
                        "add one and run `podman system migrate`")
        return None


def default_limiter() -> trio.CapacityLimiter:
    """Threads for the longer Python work (writing splitstream chunks and parsing their
    entries for the image; hashing is in worker processes): one per core, as it mostly holds the GIL. The
    short trips (opening a batch, reading a tar-split chunk) are bounded by the pipeline."""
    return trio.CapacityLimiter(max(2, os.cpu_count() or 1))


async def _import_layers(repo: Repository, source: ImageSource, stats: ImportStats, limiter: trio.CapacityLimiter,
                         pool: WorkerPool, gate: _HelperGate | None, progress: PullProgress | None,
                         verify_diffid: bool, tree: ImageTree | None,
                         background: trio.Nursery, head: HeadStart | None = None) -> list[tuple[str, bytes]]:
    """Each layer's stream, in order: found stored, or imported. A layer's import starts
    once the layer before has dealt out all its files (`LayerImport`), with at most
    LAYERS_IN_FLIGHT begun and not finished; the pull's coordinators store every layer's
    batches in the order dealt. ``head``: a layer's import begun before the event loop,
    which that layer's import goes on with."""
    streams: list[bytes | None] = [None] * len(source.layers)
    imports: set[LayerImport] = set()  # begun, not finished: their files are closed on failure
    previous: trio.Event | None = None  # the layer before's end (stream known, entries merged)
    # diff_id -> the index of its import in this pull, and that import's end (not the
    # import itself: each one's stream writer, with its object index, goes when it ends)
    first_import: dict[str, tuple[int, trio.Event]] = {}
    in_flight: collections.deque[trio.Event] = collections.deque()  # the imports' ends, oldest first
    send_batches, batches = trio.open_memory_channel(0)
    try:
        async with open_nursery() as layers:
            for _ in range(pool.batches_in_flight(batch_files())):
                layers.start_soon(coordinate, batches)
            async with send_batches:
                warming = False
                for index, layer in enumerate(source.layers):
                    earlier = first_import.get(layer.diff_id)
                    existing = None if earlier is not None else repo.intact_stream(f"oci-layer-{layer.diff_id}")
                    if existing is not None and verify_diffid and not await trio.to_thread.run_sync(
                            _stream_has_diffid, repo, existing, layer.diff_id, limiter=limiter):
                        existing = None  # what is stored is not that layer: import it again, verified
                    if earlier is not None or existing is not None:
                        done = trio.Event()
                        layers.start_soon(_stored_layer, streams, index, layer.diff_id, existing, earlier, previous,
                                          done, stats, tree, progress)
                        previous = done
                        continue
                    while len(in_flight) >= LAYERS_IN_FLIGHT:
                        await in_flight.popleft().wait()
                    await pool.start()  # the workers' start-up overlaps the first tar-split read
                    if gate is not None and not warming and any(l.layer.foreign_ids for l in source.layers[index:]):
                        # Files of other ids may need the helper: its start-up overlaps the
                        # import from the first layer on, not only from the first such file.
                        warming = True
                        background.start_soon(gate.warm_up)
                    job = LayerImport(repo, layer, stats, limiter, pool, gate, progress, verify_diffid, send_batches,
                                      tree, previous, head if head is not None and head.index == index else None)
                    imports.add(job)
                    first_import[layer.diff_id] = (index, job.finished)
                    in_flight.append(job.finished)
                    layers.start_soon(_imported_layer, job, streams, index, imports)
                    previous = job.finished
                    await job.dealt.wait()
    finally:
        for job in imports:
            job.files.close()
    out = []
    for layer, stream_id in zip(source.layers, streams, strict=True):
        assert stream_id is not None  # every layer's task ended, and each sets its stream
        out.append((layer.diff_id, stream_id))
    return out


async def _imported_layer(job: LayerImport, streams: list[bytes | None], index: int, imports: set[LayerImport]) -> None:
    streams[index] = await job.run()
    imports.discard(job)  # its files are closed; its stream writer's object index is not the image build's
    if job.progress is not None:
        job.progress.layer_done(job.layer.diff_id, False)
    job.finished.set()


async def _stored_layer(streams: list[bytes | None], index: int, diff_id: str, existing: bytes | None,
                        earlier: tuple[int, trio.Event] | None, previous: trio.Event | None, done: trio.Event,
                        stats: ImportStats, tree: ImageTree | None, progress: PullProgress | None) -> None:
    """A layer stored already, or imported earlier in this pull (a diff_id twice: ``earlier``,
    its index and end), taken in its turn (after the layer before)."""
    if earlier is not None:
        await earlier[1].wait()
        existing = streams[earlier[0]]
    if previous is not None:
        await previous.wait()
    assert existing is not None
    stats.layers_already_present += 1
    streams[index] = existing
    if tree is not None:
        tree.add_stored(existing)
    if progress is not None:
        progress.layer_done(diff_id, True)
    done.set()


async def pull_image(
    repo: Repository,
    storage: Storage,
    ref: str,
    tag: str | None = None,
    *,
    verify_diffid: bool = False,
    helper: HelperOpener | None = None,
    progress: PullProgress | None = None,
    limiter: trio.CapacityLimiter | None = None,
    jobs: int | None = None,
    parse_layers: bool = False,
    locks: ReadLocks | None = None,
    forked: list[Forked] | None = None,
    looked: ImageSource | None = None,
    head: HeadStart | None = None,
) -> PullResult:
    """Import image `ref` from containers-storage; tag it `tag` (None: no tag). ``jobs``:
    object worker processes (default: one per core). ``parse_layers``: build the image, its
    tree merged from the entries of each imported layer as it is written.
    ``locks``: the c/storage read locks when the caller holds them already (pycfs.host.oci.repull's
    look found a layer to import): kept, so podman cannot come between that look and this pull;
    ``looked``: the image as that look read it under them (read again otherwise).
    ``forked``: object workers started already (`pycfs.host.oci.pull.fork_pull_workers`),
    which the pull's pool takes out of the list (the caller discards what is left there);
    ``head``: a layer's import begun with them under those locks (`pycfs.host.oci.headstart`;
    the caller closes it after the pull)."""
    started = time.monotonic()
    limiter = limiter or default_limiter()
    stats = ImportStats()
    locks = locks or storage.read_locks()
    layer_streams: list[tuple[str, bytes]] = []
    tree = ImageTree(repo) if parse_layers else None
    try:
        if not locks.held:
            looked, head = None, None  # what was read before is not what the locks now protect
            await locks.acquire(on_wait=progress.waiting_for_lock if progress else None)
        source: ImageSource = looked if looked is not None else await trio.to_thread.run_sync(read_image, storage, ref)
        check_layer_count(len(source.layers), f"the config of {ref!r} in containers-storage")
        stats.layers = len(source.layers)
        if progress is not None:
            progress.layers([(layer.diff_id, layer.layer.diff_size) for layer in source.layers])
        on_wait = progress.waiting_for_lock if progress else None
        gate = _HelperGate(helper, locks, storage, source, ref, on_wait) if helper is not None else None
        taken = list(forked or ())
        if forked:
            forked.clear()
        async with open_pool(repo=repo, jobs=jobs, forked=taken) as pool:
            async with open_nursery() as background:
                streams = await _import_layers(repo, source, stats, limiter, pool, gate, progress, verify_diffid,
                                               tree, background, head)
                layer_streams.extend(streams)
                if gate is not None:
                    gate.stop_warming()
            # Every file is stored, and the helper's warm-up has ended (the nursery waited
            # for it, and for its check that the image did not change while the locks were
            # let go): the workers exit (~15 ms), podman has its storage back, and the
            # helper stops, while the image is written. (The helper's exit, then `podman
            # unshare`'s tidy-up, which waits for the storage locks just let go, took
            # 0.1-0.3 s after the image was written.)
            pool.close_input()
            locks.release()
            async with open_nursery() as ending:
                if helper is not None:
                    ending.start_soon(helper.aclose)
                finished = await trio.to_thread.run_sync(
                    functools.partial(finish_pull, repo, source.manifest_digest, source.manifest, source.config_digest,
                                      source.config, layer_streams, tag, build_image=parse_layers, tree=tree,
                                      on_phase=progress.phase if progress is not None else None),
                    limiter=limiter,
                )
    finally:
        locks.release()
        if tree is not None:
            tree.release()  # also when the pull ended before finish_pull ran (it releases itself otherwise)
    return containers_storage_result(source, finished, layer_streams, stats, tag, started)
