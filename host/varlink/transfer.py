"""Layers over the splitdirfdstream transport: the repository producer (`GetLayer`) and the
verifying consumer (`PutLayer`).

Producer: the layer splitstream's inline bytes become Metadata chunks, each external
object a FileBackedData reference `XX/rest` under the repository's `objects/` dirfd.

Consumer: reads the pipe to EOF; a referenced file is opened beneath its dirfd (a directory
slot, never a dummy), must be a regular file of the declared length, and goes, with the
inline bytes around it and in stream order, to the one object worker that keeps the
stream's sha256. That worker stores each file (reflink, else copy; with `zerocopy`, reflink
else hardlink, never a copy) and feeds the sha256 from the bytes stored, in the same read
that names the object (hashed under a read lease on the source, then cloned, or hashed from
a private clone), so a source rewritten meanwhile cannot slip in content the digest did not
see. While another worker has nothing to do and this one has work queued, a batch is
stored there instead and the sha256 reads its files again: under a read lease this process
took on each source before any worker read it, which must still hold once read (no writer
in between, on the repository's own filesystem, where the source was reflinked), or from
the object otherwise (see `worker_api.FEED_LAYER`). A hardlinked file (`zerocopy` without reflinks) is the
exception: it is digested, then this process links the client's own inode, so a client
writing to its file afterwards changes the object (and, stored by a spare worker, it is read
twice, so such a writer can make the digest and the sha256 see different bytes); zerocopy
hardlinks trust the source that way by design. Only when the sha256 equals the diff_id is the layer stream committed; any
failure commits nothing (objects already stored are orphans for gc).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import math
import os
import re
import stat
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.layer import INLINE_CONTENT_MAX, LayerEntry, LayerEntryCollector, layer_stream_name
from pycfs.host.repository import Repository, take_read_lease, write_all
from pycfs.host.splitstream import CONTENT_OCI_LAYER, SplitStreamWriter
from pycfs.host.varlink.layers import open_beneath
from pycfs.host.workers.batching import BATCH_BYTES, batch_files
from pycfs.host.workers.pool import Failed, Pinned, Stored, WorkerPool
from pycfs.protocol import worker_api as api
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.text import shown
from pycfs.protocol.splitdirfdstream import (
    FILE_BACKED_DATA,
    FILE_HEADER,
    INLINE_HEADER,
    MAX_INLINE_CHUNK_SIZE,
    METADATA,
    Chunk,
    Decoder,
    DirfdIndexOutOfRange,
    FileBackedData,
    InlineData,
    InlineFile,
    Metadata,
    encode_metadata,
)

if TYPE_CHECKING:
    from pycfs.host.workers.pool import _Reply

_SEND_PIECE = 1 << 16
_RECV_PIECE = 1 << 16
# How long opening (and reading the small ones of) one received piece's referenced files may
# take: see `LayerConsumer._resolved`.
OPEN_LIMIT = 60.0
# How long after the data EOF a GetLayer consumer may hold the directory fds' guard (locks).
KEEPALIVE_LIMIT = 3600.0
# How long a GetLayer consumer may leave a piece of the stream untaken before the producer
# gives up (the consumer then sees a short stream): it holds the source's locks meanwhile.
# As long as the keep-alive: a working consumer may spend that long on one object (a 30 GB
# file its filesystem cannot reflink, copied at 50 MB/s, takes 600 s).
STALL_LIMIT = KEEPALIVE_LIMIT
# How long a PutLayer producer (a peer's) may leave its pipe silent while the consumer waits
# for it, neither writing nor closing it, before the consumer gives up and commits nothing
# (it holds a worker's batches meanwhile). A working producer is never silent that long: it
# writes as it reads its own files (the containers-storage one reads a file of up to
# 256 MiB through its helper before sending it), and a slow consumer is not waiting.
SILENCE_LIMIT = 120.0
# What one layer's stream may reference in all: a real layer's files number in the hundreds
# of thousands and its bytes in gigabytes; an endless stream (one file referenced again and
# again, memory flat) otherwise never ended.
MAX_LAYER_FILES = 1 << 22
MAX_LAYER_BYTES = 1 << 40


SendAll = Callable[[bytes], Awaitable[None]]
Producer = Callable[[SendAll], Awaitable[None]]  # writes a whole stream through send_all


class LayerTransferError(PycfsError):
    """A stream the consumer refuses (bad reference, wrong file, short data)."""


def check_directory_giver(uid: int, who: str) -> None:
    """Refuse directory fds from a peer running as another uid than this process, unless root.

    The consumer opens the files a stream names beneath the directory fds a peer passed, with
    this process's rights, not the peer's: had a peer of another uid passed a directory it
    may open but whose files it may not read (`/etc` for `shadow`, any O_PATH fd of a 0700
    directory), a consumer running as root would read them into objects anyone can read. The
    simplest sound rule: the giver is this process's own uid (what it passes, this process
    could open anyway) or root (which can read whatever this process can). Checking each
    file's mode against the peer's credentials would have to redo the kernel's permission
    checks (groups, ACLs, capabilities), and opening with the peer's fsuid would still carry
    this process's groups."""
    euid = os.geteuid()
    if uid not in (0, euid):
        raise LayerTransferError(
            f"{who} runs as uid {uid}, this process as uid {euid}: files beneath the directories it passes would be "
            f"opened with uid {euid}'s rights, so only uid {euid} or root may pass them (run both as one user)")


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
    object_refs = reader.object_refs
    # Per chunk, with no checks to repeat: an object's name is hex (a valid reference name),
    # and a splitstream's inline piece is at most 1 MiB (below MAX_INLINE_CHUNK_SIZE).
    file_header, inline_header, stat_at = FILE_HEADER.pack, INLINE_HEADER.pack, os.stat
    buf = bytearray()
    # Its own fd of objects/: the producer outlives the call that started it, and a
    # CloseRepository meanwhile closes the repository's fds (whose numbers may be reused).
    objects = open_objects_dir(repo)
    try:
        for chunk in reader.chunks():
            if type(chunk) is int:
                h = object_refs[chunk].hex().encode()
                name = h[:2] + b"/" + h[2:]  # bytes: the stat and the stream take them as they are
                try:
                    size = stat_at(name, dir_fd=objects, follow_symlinks=False).st_size
                except FileNotFoundError:
                    raise PycfsError(f"object {h.decode()} of layer stream {layer_id.hex()} is missing") from None
                buf += file_header(FILE_BACKED_DATA, size, objects_index, len(name))
                buf += name
            elif len(chunk) <= MAX_INLINE_CHUNK_SIZE:
                if chunk:
                    buf += inline_header(METADATA, len(chunk))
                    buf += chunk
            else:
                for start in range(0, len(chunk), MAX_INLINE_CHUNK_SIZE):
                    buf += encode_metadata(chunk[start : start + MAX_INLINE_CHUNK_SIZE])
            if len(buf) >= _SEND_PIECE:
                await send_all(bytes(buf))
                buf.clear()
    finally:
        os.close(objects)
    if buf:
        await send_all(bytes(buf))


def reflinks_into(repo: Repository, src_fd: int) -> bool:
    """Can the repository's objects share extents with this source? (FICLONE into an
    anonymous file that is then dropped.)"""
    objects = open_objects_dir(repo)
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


def log_producer_failure(e: Exception) -> None:
    """A service's default for a producer that failed: its log (stderr) says why; the
    client only sees the stream end short."""
    print(f"pycfs varlink: layer producer failed: {e}", file=sys.stderr)


async def run_producer(pipe_w: int, keepalive_r: int, produce: Producer, release: Callable[[], None] | None = None,
                       failed: Callable[[Exception], None] = log_producer_failure) -> None:
    """Feed the pipe, close it (data EOF), then hold `release` until every copy of the
    keepalive write end is gone (the consumer is done with the directory fds), at most
    KEEPALIVE_LIMIT seconds. ``failed`` hears why the producer stopped short."""
    try:
        async with trio.lowlevel.FdStream(pipe_w) as out:
            pipe_w = -1

            async def send_all(data: bytes) -> None:
                with trio.move_on_after(STALL_LIMIT) as waited:
                    await out.send_all(data)
                if waited.cancelled_caught:
                    raise trio.BrokenResourceError("the consumer stopped taking the stream")

            try:
                await produce(send_all)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer stopped reading: its business
            except (PycfsError, OSError) as e:
                # The consumer sees a short stream; a verifying one refuses it by digest.
                failed(e)
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

    def count(self, how: str, n: int = 1) -> None:
        attr = _STAT_NAMES.get(how, "objects_already_present")
        setattr(self, attr, getattr(self, attr) + n)


_STAT_NAMES = {"reflinked": "objects_reflinked", "hardlinked": "objects_hardlinked", "copied": "objects_copied"}


@dataclass
class PutResult:
    layer_id: bytes
    stats: PutStats
    entries: list[LayerEntry] | None  # the layer's entries (None: they did not parse)


class _File:
    """A file of the stream on its way to the worker; `source` None: inline content."""

    __slots__ = ("fd", "leased", "object_id", "size", "source")

    def __init__(self, fd: int, size: int, source: FileBackedData | None) -> None:
        self.fd, self.size, self.source = fd, size, source
        self.leased = False  # this process holds a read lease on it (see LayerConsumer._take_leases)
        self.object_id = b""

    @property
    def what(self) -> str:
        """The file, for messages (built only for one)."""
        return _describe(self.source) if self.source is not None else "inline content"


def _add(batch: _Batch, item: _File | bytes) -> None:
    if isinstance(item, _File):
        batch.add_file(item)
    else:
        batch.add_inline(item)


def _describe(chunk: FileBackedData) -> str:
    return f"{shown(chunk.name.decode(errors='replace'))} (dirfd {chunk.dirfd_index})"


@dataclass(eq=False)
class _Batch:
    """Kept as it is built (one pass per chunk): the items in order, the files among them,
    and the inline bytes with their count before each file."""

    items: list[bytes | _File] = field(default_factory=list)
    files: list[_File] = field(default_factory=list)
    inline: list[bytes] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # inline bytes before each file
    run: int = 0  # inline bytes since the last file
    nbytes: int = 0
    # Stored by another worker than the one keeping the layer's sha256 (`spare`): its
    # answers (`stored` once in), then fed to the sha256; else stored by the sha256's
    # worker, which answers for them. `reply`: the sha256's worker's answer to come.
    spare: Pinned | None = None
    stored: trio.Event = field(default_factory=trio.Event)
    results: list[Stored | bytes | Failed] = field(default_factory=list)
    reply: _Reply | None = None

    def add_inline(self, data: bytes) -> None:
        self.items.append(data)
        self.inline.append(data)
        self.run += len(data)
        self.nbytes += len(data)

    def add_file(self, f: _File) -> None:
        self.items.append(f)
        self.files.append(f)
        self.counts.append(self.run)
        self.run = 0
        self.nbytes += f.size


_layer_numbers = itertools.count()


class LayerConsumer:
    """One PutLayer: decode, store, hash, and (only if the digest matches) commit."""

    def __init__(self, repo: Repository, pool: WorkerPool, dirfds: list[int], zerocopy: bool,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.repo = repo
        self.pool = pool
        # batches in flight to the workers, shared by the layers that share the pool
        self.limiter = limiter or batch_limiter(pool)
        self.batch_files = batch_files()
        self.dirfds = dirfds
        self.zerocopy = zerocopy
        self.writer = SplitStreamWriter(repo.alg, CONTENT_OCI_LAYER)
        self.layer = next(_layer_numbers)  # the worker's name for this layer's sha256
        self._sha: Pinned | None = None  # the worker that keeps the layer's sha256
        self._fed = False  # its first piece sent
        self.stats = PutStats()
        self._dir_checked: set[int] = set()
        self._hardlink: bool | None = None  # zerocopy: decided by the first file
        # Read leases on the sources of batches stored by a spare worker (see _take_leases),
        # which need SIGIO ignored: from the main thread.
        self._lease = threading.current_thread() is threading.main_thread()
        if self._lease:
            repo.enable_source_leases()
        # batches taken in and not yet written: each holds a limiter token, and its files' fds
        # until they are sent to the sha256's worker (to be hardlinked: until linked)
        self._pending: set[_Batch] = set()
        # the layer's entries, parsed from what is written, for the image FinalizeImage builds
        self.collector = LayerEntryCollector(where="PutLayer")  # (FinalizeImage bounds the image's total)

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
            # An O_PATH fd needs no read permission on the directory (any user can make one
            # of a 0700 root directory): its opener showed no right to list or enter it.
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
                raise LayerTransferError(f"dirfd slot {index} is an O_PATH fd: pass a directory opened for reading")
            self._dir_checked.add(index)
        return fd

    def _open(self, chunk: FileBackedData) -> int:
        """An fd of the referenced file, checked to be a regular file of the declared length."""
        dirfd = self._dirfd(chunk.dirfd_index)
        try:
            fd, st = open_beneath(dirfd, chunk.name)
        except syscalls.NotRegularFile:
            raise LayerTransferError(f"{_describe(chunk)}: not a regular file") from None
        except OSError as e:
            raise LayerTransferError(f"cannot open {_describe(chunk)}: {e.strerror}") from None
        if st.st_size != chunk.length:
            os.close(fd)
            raise LayerTransferError(f"{_describe(chunk)}: {st.st_size} bytes, declared {chunk.length}")
        return fd

    async def run(self, receive_some: Callable[[int], Awaitable[bytes]]) -> str:
        """Consume the whole stream; returns its `sha256:<hex>`. One worker keeps the
        layer's sha256: it gets every batch, in stream order, and stores the batch's files
        as it hashes them, each byte read once. But when another worker is spare (see
        `_spare`: the last big layer of an image, an image of one layer), a batch is stored
        there instead, and its files are read again for the sha256 (from the page cache:
        the cost of a read, not of a hash). One task sends
        the batches to the sha256's worker in order, one writes the layer stream from the
        answers, in order, while this one reads on."""
        decoder = Decoder(spill=_MemfdSpill)
        files = size = 0  # referenced so far (see MAX_LAYER_FILES)
        batch = _Batch()
        # (as many as the limiter's tokens: a batch holds one from before it is sent on)
        to_send, sending = trio.open_memory_channel[_Batch](math.inf)
        to_write, writing = trio.open_memory_channel[_Batch](math.inf)
        here: str | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with open_nursery() as nursery:
                    nursery.start_soon(self._send_in_order, sending, to_write)
                    nursery.start_soon(self._write_in_order, writing)
                    async with to_send:
                        while True:
                            with trio.move_on_after(SILENCE_LIMIT) as waited:
                                data = await receive_some(_RECV_PIECE)
                            if waited.cancelled_caught:
                                raise LayerTransferError(f"the stream's producer sent nothing for {SILENCE_LIMIT:.0f} s "
                                                         "without closing the pipe: nothing was committed")
                            if not data:
                                decoder.eof()
                                break
                            decoder.feed(data)
                            chunks = _taken(decoder)
                            try:
                                for c in chunks:
                                    if isinstance(c, FileBackedData):
                                        files += 1
                                        size += c.length
                                    else:
                                        size += c.size if isinstance(c, _File) else len(c.data)
                                if files > MAX_LAYER_FILES or size > MAX_LAYER_BYTES:
                                    raise LayerTransferError(
                                        f"the stream goes on past {MAX_LAYER_FILES} files or {MAX_LAYER_BYTES >> 30} "
                                        "GiB, more than a real layer holds: nothing was committed")
                            except BaseException:
                                _close([c for c in chunks if isinstance(c, _File)])
                                raise
                            items = await self._resolved(chunks)
                            try:
                                while items:
                                    _add(batch, items.popleft())
                                    if len(batch.files) >= self.batch_files or batch.nbytes >= BATCH_BYTES:
                                        await self._submit(stack, nursery, to_send, batch)
                                        batch = _Batch()
                            finally:
                                _close([f for f in items if isinstance(f, _File)])
                        if self._sha is None and not batch.files:
                            # a stream of a few inline bytes: hashed here, and no worker starts
                            here = hashlib.sha256(b"".join(batch.inline)).hexdigest()
                            await self._hold(batch)
                            await to_write.send(batch)
                        else:
                            await self._submit(stack, nursery, to_send, batch)
                        batch = _Batch()
                if self._sha is not None:  # (every piece fed by now, in order)
                    obj = await self._sha.answer(await self._sha.send(api.LAYER_SHA256, [], {"layer": self.layer}))
        finally:
            decoder.close()
            for b in (*self._pending, batch):
                self._finish(b)
        self.collector.close()
        if here is not None:
            return "sha256:" + here
        result = obj.get("result")
        sha = result.get("sha256") if isinstance(result, dict) else None
        if isinstance(result, dict) and sha is None and isinstance(result.get("failed"), str):
            raise LayerTransferError(f"{result['failed']}: nothing was committed")
        if isinstance(result, dict) and sha is None:
            raise PycfsError(f"the object worker holds no sha256 of this layer (more than {api.MAX_LAYERS_HELD} "
                             "layers were in flight on it at once): nothing was committed; send the layer again")
        if not isinstance(sha, str) or not re.fullmatch("[0-9a-f]{64}", sha):
            raise PycfsError(f"the object worker answered {obj!r} for the sha256 of layer {self.layer}")
        return "sha256:" + sha

    async def _hold(self, batch: _Batch) -> None:
        """A token of the limiter for the batch, held until it is written."""
        await self.limiter.acquire_on_behalf_of(batch)
        self._pending.add(batch)

    async def _submit(self, stack: contextlib.AsyncExitStack, nursery: trio.Nursery,
                      send: trio.MemorySendChannel[_Batch], batch: _Batch) -> None:
        """Pass the batch on to be sent in order; a batch for a spare worker (see `run`) is
        sent there now, by a task of its own."""
        if self._sha is None:  # (its first batch: the pool's workers start here)
            self._sha = await stack.enter_async_context(self.pool.pinned())
        sha: Pinned = self._sha
        await self._hold(batch)
        if batch.files:
            if self.zerocopy and self._hardlink is None:
                self._hardlink = not await trio.to_thread.run_sync(reflinks_into, self.repo, batch.files[0].fd)
            batch.spare = self._spare(sha)
            if batch.spare is not None:
                if self._lease and not (self.zerocopy and self._hardlink):
                    self._take_leases(batch.files)
                nursery.start_soon(self._store_spare, batch)
        await send.send(batch)

    @staticmethod
    def _spare(sha: Pinned) -> Pinned | None:
        """Another worker to store a batch: one with nothing to do while the sha256's worker
        has work queued, else one that keeps no layer's sha256 and has no more requests
        waiting than it (a lone layer then spreads over both, as each batch there costs
        more: its sha256 too). A worker keeping another layer's sha256 is busy with its own
        and gets a batch only when idle: each spare batch costs a second read."""
        others = sha.others()
        idle = [w for w in others if not w.backlog]
        if idle and sha.backlog >= 2:
            return min(idle, key=lambda w: w.assigned)
        free = [w for w in others if not w.assigned and w.backlog <= sha.backlog]
        return min(free, key=lambda w: w.backlog) if free else None

    @staticmethod
    def _take_leases(files: list[_File]) -> None:
        """A read lease on each source this process can lease, before any worker reads it: the
        sha256's worker reads it again once another worker has stored it, under the same
        lease, which only holds if no one opened the file for writing in between (see
        worker_api.FEED_LAYER)."""
        for f in files:
            f.leased = f.source is not None and take_read_lease(f.fd)

    async def _store_spare(self, batch: _Batch) -> None:
        assert batch.spare is not None
        fds, sizes = [f.fd for f in batch.files], [f.size for f in batch.files]
        # digested only, to be hardlinked here; else stored
        method = api.DIGEST if self.zerocopy and self._hardlink else api.STORE
        reply = await batch.spare.send(method, fds, api.file_params(sizes, leased=any(f.leased for f in batch.files)))
        batch.results = _results(await batch.spare.files(reply, len(fds), method))
        batch.stored.set()

    async def _send_in_order(self, receive: trio.MemoryReceiveChannel[_Batch],
                             send: trio.MemorySendChannel[_Batch]) -> None:
        """Each batch to the sha256's worker, in stream order (one stored elsewhere once it
        is: its objects are named then), and on to the writer."""
        async with send:
            async for batch in receive:
                if batch.spare is not None:
                    await batch.stored.wait()
                await self._feed(batch)
                await send.send(batch)

    async def _feed(self, batch: _Batch) -> None:
        """The batch's inline bytes and files to the layer's sha256 (see worker_api.FEED_LAYER)."""
        assert self._sha is not None
        hardlink = bool(self.zerocopy and self._hardlink)
        if batch.spare is None:
            read = ("d" if hardlink else "h") * len(batch.files)
            fds = [f.fd for f in batch.files]
        else:
            _check_stored(batch.files, batch.results)
            for f, r in zip(batch.files, batch.results):
                f.object_id = r if isinstance(r, bytes) else r.object_id
            # A hardlinked source or content sent inline, as it is (the object itself, or ours);
            # a source leased here and reflinked (its pages cached): the lease vouches for it
            # there, on the repository's own local filesystem (where content changes only
            # through an open for writing, which breaks it), not on another (FUSE, NFS);
            # else the object (a private copy was hashed: its pages are cached).
            read = "".join("s" if hardlink or f.source is None
                           else "l" if f.leased and isinstance(r, Stored) and r.how == "reflinked" else "o"
                           for f, r in zip(batch.files, batch.results))
            fds = [f.fd for f, r in zip(batch.files, read) if r != "o"]
        inline = os.memfd_create("pycfs-layer-inline", os.MFD_CLOEXEC)
        try:
            write_all(inline, b"".join(batch.inline))
            batch.reply = await self._sha.send(api.FEED_LAYER, [inline, *fds], {
                "layer": self.layer, "sizes": [f.size for f in batch.files], "inline": [*batch.counts, batch.run],
                "read": read, "objects": b"".join(f.object_id for f, r in zip(batch.files, read) if r not in "hd").hex(),
                "first": not self._fed})
            self._fed = True
        finally:
            os.close(inline)
        if not hardlink:  # the workers have their own copies (a lease stays while any is open)
            _close(batch.files)

    def _finish(self, batch: _Batch) -> None:
        """Close what the batch still holds open and give back its token (once)."""
        _close(batch.files)
        if batch in self._pending:
            self._pending.remove(batch)
            self.limiter.release_on_behalf_of(batch)

    async def _write_in_order(self, receive: trio.MemoryReceiveChannel[_Batch]) -> None:
        async for batch in receive:
            try:
                if batch.reply is not None:
                    assert self._sha is not None
                    stored_here = len(batch.files) if batch.spare is None else 0
                    results = _results(await self._sha.files(batch.reply, stored_here, api.FEED_LAYER))
                    if batch.spare is None:
                        batch.results = results
                if batch.files:
                    await self._take(batch.files, batch.results)
                await trio.to_thread.run_sync(self._write, batch.items)
            finally:
                self._finish(batch)

    async def _resolved(self, chunks: list[Chunk | _File]) -> collections.deque[_File | bytes]:
        """The chunks as batches take them: referenced files opened (small ones read), off
        the event loop, within OPEN_LIMIT: a directory fd from the client may lie on a FUSE
        mount whose server does not answer, and the service serves others meanwhile. The
        _Files among them (content the decoder spilled) are taken: closed on failure."""
        if all(isinstance(c, Metadata) or (isinstance(c, InlineData) and len(c.data) <= INLINE_CONTENT_MAX)
               for c in chunks):  # (inline bytes alone: no thread)
            return collections.deque(c.data for c in chunks)  # type: ignore[union-attr]
        lock = threading.Lock()
        state: dict[str, object] = {"abandoned": False, "done": None}

        def work() -> collections.deque[_File | bytes]:
            out: collections.deque[_File | bytes] = collections.deque()
            try:
                for chunk in chunks:
                    out.append(self._resolve(chunk))
            except BaseException:
                _close([f for f in out if isinstance(f, _File)])
                _close([c for c in chunks[len(out):] if isinstance(c, _File)])
                raise
            with lock:
                if state["abandoned"]:  # nobody takes them any more
                    _close([f for f in out if isinstance(f, _File)])
                state["done"] = out
            return out

        try:
            with trio.fail_after(OPEN_LIMIT):
                return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException as e:
            with lock:
                state["abandoned"] = True
                done = state["done"]
                if isinstance(done, collections.deque):  # finished as it was given up
                    _close([f for f in done if isinstance(f, _File)])
            if isinstance(e, trio.TooSlowError):
                raise LayerTransferError(f"opening the layer's files took more than {OPEN_LIMIT:.0f} s (a directory "
                                         "on a mount that does not answer?): nothing was committed") from None
            raise

    def _resolve(self, chunk: Chunk | _File) -> _File | bytes:
        """A chunk as a batch takes it: a file to store (opened, or content the producer sent,
        put in a memfd), or inline bytes. Blocking: see `_resolved`."""
        if isinstance(chunk, _File):  # (spilled as it came)
            return chunk
        if isinstance(chunk, FileBackedData):
            fd = self._open(chunk)
            if chunk.length > INLINE_CONTENT_MAX:
                return _File(fd, chunk.length, chunk)
            try:
                data = os.pread(fd, chunk.length, 0)
            finally:
                os.close(fd)
            if len(data) != chunk.length:
                raise LayerTransferError(f"{_describe(chunk)}: short read")
            return data
        if isinstance(chunk, InlineData) and len(chunk.data) > INLINE_CONTENT_MAX:
            # content the producer read itself: through a memfd to the workers
            fd = os.memfd_create("pycfs-filecontent", os.MFD_CLOEXEC)
            try:
                write_all(fd, chunk.data)
            except BaseException:
                os.close(fd)
                raise
            return _File(fd, len(chunk.data), None)
        return chunk.data

    async def _take(self, files: list[_File], results: list[Stored | bytes | Failed]) -> None:
        """The workers' answers for a batch's files: their objects, stored (or, to be
        hardlinked, digested, then linked here)."""
        _check_stored(files, results)
        if self.zerocopy and self._hardlink:
            for f, r in zip(files, results):
                assert isinstance(r, bytes)
                f.object_id = r
                self.stats.count(await trio.to_thread.run_sync(self._hardlink_object, f))
            return
        for f, r in zip(files, results):
            assert isinstance(r, Stored)
            if self.zerocopy and r.how == "copied":
                raise LayerTransferError(f"zerocopy: {f.what} could not be reflinked or hardlinked")
            f.object_id = r.object_id
            self.stats.count(r.how)

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

    def _write(self, items: list[bytes | _File]) -> None:
        """Write the items to the layer stream, then parse their entries (one thread trip)."""
        pieces: list[bytes | tuple[bytes]] = []
        for item in items:
            if isinstance(item, bytes):
                self.writer.write_inline(item)
                self.stats.bytes_inlined += len(item)
                pieces.append(item)
            else:
                self.writer.write_external(item.object_id, item.size)
                pieces.append((item.object_id,))
        self.collector.feed(pieces)


def _check_stored(files: list[_File], results: list[Stored | bytes | Failed]) -> None:
    """LayerTransferError naming the first file a worker could not store (or digest)."""
    for f, r in zip(files, results):
        if isinstance(r, Failed):
            raise LayerTransferError(f"cannot store {f.what}: {r.message}")


def _results(answers: list[tuple[bytes, str] | Failed]) -> list[Stored | bytes | Failed]:
    """A worker's answers as objects stored, digests (of files only digested) or failures."""
    return [r if isinstance(r, Failed) else r[0] if r[1] == api.DIGESTED else Stored(r[0], api.HOW[r[1]])
            for r in answers]


class _MemfdSpill:
    """A long InlineData chunk (file content the producer read itself), written to a memfd
    as it arrives: to the workers as a file, never held whole here."""

    def __init__(self, length: int) -> None:
        self.fd = os.memfd_create("pycfs-filecontent", os.MFD_CLOEXEC)
        self.length = length

    def write(self, data: memoryview) -> None:
        write_all(self.fd, data)

    def done(self) -> InlineFile:
        fd, self.fd = self.fd, -1
        return InlineFile(fd, self.length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _taken(decoder: Decoder) -> list[Chunk | _File]:
    """The decoder's chunks so far, its InlineFiles as _Files (closed if it fails)."""
    out: list[Chunk | _File] = []
    try:
        for c in decoder.chunks():
            out.append(_File(c.fd, c.length, None) if isinstance(c, InlineFile) else c)
    except BaseException:
        _close([c for c in out if isinstance(c, _File)])
        raise
    return out


def _close(files: list[_File]) -> None:
    close_fds([f.fd for f in files if f.fd >= 0])
    for f in files:
        f.fd = -1


def batch_limiter(pool: WorkerPool) -> trio.CapacityLimiter:
    """How many batches of files may be taken in and not yet written, for all the layers
    that share `pool`: four per worker, as a batch's token comes back only once it is
    written, in its layer's order, so the workers need a few queued behind the ones they
    store to keep busy while this process catches up; within half the open-file limit, as
    a batch's fds stay open until sent to the worker keeping the layer's sha256 (and, to be
    hardlinked, until linked)."""
    return trio.CapacityLimiter(pool.batches_in_flight(batch_files() + 1, per_worker=4))


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
