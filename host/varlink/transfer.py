"""Layers over the splitdirfdstream transport: the repository producer (`GetLayer`) and the
verifying consumer (`PutLayer`).

Producer: the layer splitstream's inline bytes become Metadata chunks, each external
object a FileBackedData reference `XX/rest` under the repository's `objects/` dirfd.

Consumer: reads the pipe to EOF; every chunk's bytes enter the stream's sha256 in order;
a referenced file is opened beneath its dirfd (a directory slot, never a dummy), must be a
regular file of the declared length, and is stored by the object workers (reflink, else
copy; with `zerocopy`, reflink else hardlink, never a copy). The sha256 covers the stored
objects' bytes, so a source rewritten meanwhile cannot slip in content the digest did not
see: each file's bytes are read once from disk, by the worker that names its object, and
the sha256 reads them again from the page cache. A worker that stored a file under a read
lease on the source (hash, then clone) leaves the lease with the fd, and the sha256 reads
the source's pages while the lease is unbroken (no writer since the worker's hash);
otherwise (broken lease, no lease: another user's file) it reads the object, which the
worker then hashed from its own clone. Only when the sha256 equals the diff_id is the layer
stream committed; any failure commits nothing (objects already stored are orphans for gc).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.layer import INLINE_CONTENT_MAX, LayerEntry, LayerEntryCollector, layer_stream_name
from pycfs.host.repository import Repository, RepositoryError, feed_fd, lease_held
from pycfs.host.splitstream import CONTENT_OCI_LAYER, SplitStreamWriter
from pycfs.host.varlink.layers import open_beneath
from pycfs.host.workers.pool import Failed, WorkerPool
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.splitdirfdstream import (
    MAX_INLINE_CHUNK_SIZE,
    Chunk,
    Decoder,
    DirfdIndexOutOfRange,
    FileBackedData,
    InlineData,
    encode_file_backed_data,
    encode_metadata,
)

_SEND_PIECE = 1 << 16
_RECV_PIECE = 1 << 16
BATCH_FILES = 64
BATCH_BYTES = 8 << 20
# How long after the data EOF a GetLayer consumer may hold the directory fds' guard (locks).
KEEPALIVE_LIMIT = 3600.0


SendAll = Callable[[bytes], Awaitable[None]]
Producer = Callable[[SendAll], Awaitable[None]]  # writes a whole stream through send_all


class LayerTransferError(PycfsError):
    """A stream the consumer refuses (bad reference, wrong file, short data)."""


class DiffIdMismatch(PycfsError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"layer content is {actual}, not the announced diff_id {expected}")
        self.expected, self.actual = expected, actual


# ---------------------------------------------------------------------------- producer


def open_objects_dir(repo: Repository) -> int:
    """A fresh fd of the repository's objects/ (the repository dir when it has none yet:
    a layer without external objects references nothing)."""
    try:
        return os.open("objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=repo.dirfd)
    except FileNotFoundError:
        return os.dup(repo.dirfd)


async def produce_repo_layer(repo: Repository, layer_id: bytes, objects_index: int,
                             send_all: SendAll) -> None:
    """Write the splitdirfdstream of layer stream `layer_id` (any content type)."""
    reader = repo.open_stream_by_id(layer_id)
    buf = bytearray()
    for chunk in reader.chunks():
        if isinstance(chunk, int):
            object_id = reader.object_refs[chunk]
            size = repo.object_size(object_id)
            if size is None:
                raise PycfsError(f"object {object_id.hex()} of layer stream {layer_id.hex()} is missing")
            h = object_id.hex()
            buf += encode_file_backed_data(objects_index, size, f"{h[:2]}/{h[2:]}".encode())
        else:
            for start in range(0, len(chunk), MAX_INLINE_CHUNK_SIZE):
                buf += encode_metadata(chunk[start : start + MAX_INLINE_CHUNK_SIZE])
        if len(buf) >= _SEND_PIECE:
            await send_all(bytes(buf))
            buf.clear()
    if buf:
        await send_all(bytes(buf))


async def run_producer(pipe_w: int, keepalive_r: int, produce: Producer, release: Callable[[], None] | None = None) -> None:
    """Feed the pipe, close it (data EOF), then hold `release` until every copy of the
    keepalive write end is gone (the consumer is done with the directory fds), at most
    KEEPALIVE_LIMIT seconds."""
    try:
        async with trio.lowlevel.FdStream(pipe_w) as out:
            pipe_w = -1
            try:
                await produce(out.send_all)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer stopped reading: its business
            except (PycfsError, OSError) as e:
                # The consumer sees a short stream; a verifying one refuses it by digest.
                print(f"pycfs varlink: layer producer failed: {e}", file=sys.stderr)
        async with trio.lowlevel.FdStream(keepalive_r) as keep:
            keepalive_r = -1
            # Bounded: a client that never lets go must not hold (say) podman's locks forever.
            with trio.move_on_after(KEEPALIVE_LIMIT):
                while await keep.receive_some(4096):
                    pass
    finally:
        close_fds([fd for fd in (pipe_w, keepalive_r) if fd >= 0])
        if release is not None:
            release()


# ---------------------------------------------------------------------------- consumer


@dataclass
class PutStats:
    objects_reflinked: int = 0
    objects_hardlinked: int = 0
    objects_copied: int = 0
    objects_already_present: int = 0
    bytes_inlined: int = 0

    def count(self, how: str) -> None:
        name = {"reflinked": "objects_reflinked", "hardlinked": "objects_hardlinked", "copied": "objects_copied"}
        attr = name.get(how, "objects_already_present")
        setattr(self, attr, getattr(self, attr) + 1)


@dataclass
class PutResult:
    layer_id: bytes
    stats: PutStats
    entries: list[LayerEntry] | None  # the layer's entries (None: they did not parse)


@dataclass
class _File:
    fd: int
    size: int
    what: str  # for messages
    object_id: bytes = b""
    leased: bool = False  # the source's read lease is still with fd (Stored.leased)


@dataclass(eq=False)
class _Batch:
    items: list[bytes | _File] = field(default_factory=list)
    nbytes: int = 0
    nfiles: int = 0
    stored: trio.Event = field(default_factory=trio.Event)

    def files(self) -> list[_File]:
        return [i for i in self.items if isinstance(i, _File)]


class LayerConsumer:
    """One PutLayer: decode, store, hash, and (only if the digest matches) commit."""

    def __init__(self, repo: Repository, pool: WorkerPool, dirfds: list[int], zerocopy: bool,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.repo = repo
        self.pool = pool
        # batches in flight to the workers, shared by the layers that share the pool
        self.limiter = limiter or batch_limiter(pool)
        self.dirfds = dirfds
        self.zerocopy = zerocopy
        self.writer = SplitStreamWriter(repo.alg, CONTENT_OCI_LAYER)
        self.sha = hashlib.sha256()
        self.stats = PutStats()
        self._dir_checked: set[int] = set()
        self._hardlink: bool | None = None  # zerocopy: decided by the first file
        self._probe_lock = trio.Lock()
        # submitted batches not yet hashed: each holds a limiter token and (leased) open fds
        self._pending: set[_Batch] = set()
        # the layer's entries, parsed from what is written, for the image FinalizeImage builds
        self.collector = LayerEntryCollector()

    def _dirfd(self, index: int) -> int:
        if index >= len(self.dirfds):
            raise DirfdIndexOutOfRange(index, len(self.dirfds))
        fd = self.dirfds[index]
        if index not in self._dir_checked:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):
                raise LayerTransferError(
                    f"dirfd slot {index} is not a directory (file type {stat.S_IFMT(st.st_mode):#o}, "
                    f"size {st.st_size}): a dummy fd was used as a directory")
            self._dir_checked.add(index)
        return fd

    def _open(self, chunk: FileBackedData) -> _File:
        dirfd = self._dirfd(chunk.dirfd_index)
        what = f"{chunk.name.decode(errors='replace')!r} (dirfd {chunk.dirfd_index})"
        try:
            fd = open_beneath(dirfd, chunk.name)
        except OSError as e:
            raise LayerTransferError(f"cannot open {what}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != chunk.length:
            os.close(fd)
            kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes, declared {chunk.length}"
            raise LayerTransferError(f"{what}: {kind}")
        return _File(fd, chunk.length, what)

    async def run(self, receive_some: Callable[[int], Awaitable[bytes]]) -> str:
        """Consume the whole stream; returns its `sha256:<hex>`. Batches of files are stored
        by the workers several at a time while one task hashes and writes the stored
        batches in stream order."""
        decoder = Decoder()
        batch = _Batch()
        send, receive = trio.open_memory_channel[_Batch](int(self.limiter.total_tokens))
        send_written, written = trio.open_memory_channel[list[bytes | tuple[bytes]]](int(self.limiter.total_tokens))
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(self._write_in_order, receive, send_written)
                nursery.start_soon(self._parse, written)
                async with send:
                    while True:
                        data = await receive_some(_RECV_PIECE)
                        if not data:
                            decoder.eof()
                            break
                        decoder.feed(data)
                        for chunk in decoder.chunks():
                            self._add(batch, chunk)
                            if batch.nfiles >= BATCH_FILES or batch.nbytes >= BATCH_BYTES:
                                await self._submit(nursery, send, batch)
                                batch = _Batch()
                    await self._submit(nursery, send, batch)
                    batch = _Batch()
        finally:
            for b in (*self._pending, batch):
                self._finish(b)
        self.collector.close()
        return "sha256:" + self.sha.hexdigest()

    async def _submit(self, nursery: trio.Nursery, send: trio.MemorySendChannel[_Batch], batch: _Batch) -> None:
        # The token is held until the batch is hashed: its leased fds stay open until then.
        await self.limiter.acquire_on_behalf_of(batch)
        self._pending.add(batch)
        nursery.start_soon(self._store_batch, batch)
        await send.send(batch)

    async def _store_batch(self, batch: _Batch) -> None:
        files = batch.files()
        try:
            await self._store(files)
        finally:
            _close([f for f in files if not f.leased])
        batch.stored.set()

    def _finish(self, batch: _Batch) -> None:
        """Close what the batch still holds open and give back its token (once)."""
        _close(batch.files())
        if batch in self._pending:
            self._pending.remove(batch)
            self.limiter.release_on_behalf_of(batch)

    async def _write_in_order(self, receive: trio.MemoryReceiveChannel[_Batch],
                              written: trio.MemorySendChannel[list[bytes | tuple[bytes]]]) -> None:
        async with written:
            async for batch in receive:
                await batch.stored.wait()
                try:
                    await trio.to_thread.run_sync(self._hash_and_write, batch.items)
                finally:
                    self._finish(batch)
                await written.send([i if isinstance(i, bytes) else (i.object_id,) for i in batch.items])

    async def _parse(self, written: trio.MemoryReceiveChannel[list[bytes | tuple[bytes]]]) -> None:
        """The entries of what was written, in a thread of their own behind the writer (whose
        sha256 is the copy's sequential pass: the parse must not lengthen it)."""
        async for pieces in written:
            await trio.to_thread.run_sync(self.collector.feed, pieces)

    def _add(self, batch: _Batch, chunk: Chunk) -> None:
        if isinstance(chunk, FileBackedData):
            f = self._open(chunk)
            if f.size <= INLINE_CONTENT_MAX:
                try:
                    data = os.pread(f.fd, f.size, 0)
                finally:
                    os.close(f.fd)
                if len(data) != f.size:
                    raise LayerTransferError(f"{f.what}: short read")
                batch.items.append(data)
                batch.nbytes += len(data)
                return
            batch.items.append(f)
            batch.nbytes += f.size
            batch.nfiles += 1
            return
        data = chunk.data
        if isinstance(chunk, InlineData) and len(data) > INLINE_CONTENT_MAX:
            # content the producer read itself: through a memfd to the workers
            fd = os.memfd_create("pycfs-filecontent", os.MFD_CLOEXEC)
            try:
                mv = memoryview(data)
                while mv:
                    mv = mv[os.write(fd, mv):]
            except BaseException:
                os.close(fd)
                raise
            batch.items.append(_File(fd, len(data), "inline content"))
            batch.nfiles += 1
        else:
            batch.items.append(bytes(data))
        batch.nbytes += len(data)

    async def _store(self, files: list[_File]) -> None:
        if not files:
            return
        if self.zerocopy:
            async with self._probe_lock:
                if self._hardlink is None:
                    self._hardlink = not await trio.to_thread.run_sync(self._probe_reflink, files[0].fd)
        if self.zerocopy and self._hardlink:
            results = await self.pool.digest([f.fd for f in files], [f.size for f in files])
            for f, r in zip(files, results):
                if isinstance(r, Failed):
                    raise LayerTransferError(f"cannot read {f.what}: {r.message}")
                f.object_id = r
                self.stats.count(await trio.to_thread.run_sync(self._hardlink_object, f))
            return
        stored = await self.pool.store([f.fd for f in files], [f.size for f in files], keep_leases=True)
        for f, s in zip(files, stored):
            if isinstance(s, Failed):
                raise LayerTransferError(f"cannot store {f.what}: {s.message}")
            if self.zerocopy and s.how == "copied":
                raise LayerTransferError(f"zerocopy: {f.what} could not be reflinked or hardlinked")
            f.object_id, f.leased = s.object_id, s.leased
            self.stats.count(s.how)

    def _probe_reflink(self, src_fd: int) -> bool:
        """Can the destination's objects share extents with this source? (FICLONE into an
        anonymous file that is then dropped.)"""
        objects = open_objects_dir(self.repo)
        try:
            tmp = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=objects)
        except OSError:
            return False
        finally:
            os.close(objects)
        try:
            syscalls.ficlone(tmp, src_fd)
            return True
        except OSError as e:
            if e.errno in syscalls.CROSS_DEVICE_ERRNOS:
                return False
            raise
        finally:
            os.close(tmp)

    def _hardlink_object(self, f: _File) -> str:
        if self.repo.object_size(f.object_id) == f.size:
            return "present"
        h = f.object_id.hex()
        objects = open_objects_dir(self.repo)
        try:
            try:
                os.mkdir(h[:2], 0o755, dir_fd=objects)
            except FileExistsError:
                pass
            sub = os.open(h[:2], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=objects)
            try:
                syscalls.link_fd(f.fd, sub, h[2:])
            except FileExistsError:
                return "present"
            except OSError as e:
                raise LayerTransferError(
                    f"zerocopy: cannot reflink or hardlink {f.what} into {self.repo.path}: "
                    f"{os.strerror(e.errno) if e.errno else e}" + (" (different filesystems)" if e.errno == errno.EXDEV else "")
                ) from None
            finally:
                os.close(sub)
        finally:
            os.close(objects)
        return "hardlinked"

    def _hash_and_write(self, items: list[bytes | _File]) -> None:
        for item in items:
            if isinstance(item, bytes):
                self.sha.update(item)
                self.writer.write_inline(item)
                self.stats.bytes_inlined += len(item)
                continue
            self._hash_stored(item)
            self.writer.write_external(item.object_id, item.size)

    def _hash_stored(self, f: _File) -> None:
        """The stored bytes into the stream's sha256: the leased source's (cached) pages when
        the lease held throughout, else the object's."""
        if f.leased:
            before = self.sha.copy()
            try:
                if feed_fd(f.fd, f.size, self.sha.update) == f.size and lease_held(f.fd):
                    return
            except OSError:
                pass
            self.sha = before  # a writer came: what was read may not be what was stored
        try:
            self.repo.feed_object(f.object_id, f.size, self.sha.update)
        except RepositoryError as e:
            raise LayerTransferError(f"{f.what}: {e}") from None


def _close(files: list[_File]) -> None:
    close_fds([f.fd for f in files if f.fd >= 0])
    for f in files:
        f.fd = -1


def batch_limiter(pool: WorkerPool) -> trio.CapacityLimiter:
    """How many batches of files may wait for `pool` at once: enough to keep its workers
    busy, and (each batch holding its fds open) well within the open-file limit."""
    return trio.CapacityLimiter(pool.batches_in_flight(BATCH_FILES))


async def put_layer(repo: Repository, pool: WorkerPool, pipe_fd: int, dirfds: list[int], diff_id: str,
                    zerocopy: bool, limiter: trio.CapacityLimiter | None = None) -> PutResult:
    """Consume a splitdirfdstream from pipe_fd (taken) into `oci-layer-<diff_id>`; layers
    stored at once by one pool share its `limiter` (see batch_limiter)."""
    consumer = LayerConsumer(repo, pool, dirfds, zerocopy, limiter)
    async with trio.lowlevel.FdStream(pipe_fd) as pipe:
        actual = await consumer.run(pipe.receive_some)
    if actual != diff_id:
        raise DiffIdMismatch(diff_id, actual)
    layer_id = await trio.to_thread.run_sync(repo.write_stream, consumer.writer, layer_stream_name(diff_id))
    return PutResult(layer_id, consumer.stats, consumer.collector.entries)
