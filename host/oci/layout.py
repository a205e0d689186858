"""`oci:DIR[:TAG]`: reading an OCI image layout and pulling it into a repository (spec 3.5).

Every blob read is checked against its descriptor (size and digest) before anything made
from it becomes visible; layers are decompressed while they are split, never staged.
Manifest lists / image indexes are resolved to the manifest for this machine's platform.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import hashlib
import os
import platform
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import MAX_JSON_DOCUMENT, parse_object, read_document
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.layer import (
    EntryBudget,
    LayerDigestError,
    LayerEntry,
    LayerEntryCollector,
    PendingFile,
    Piece,
    PieceRun,
    SplitLayer,
    StoredFile,
    close_pieces,
    layer_stream_name,
    parse_digest,
    publish_layer,
    store_layer,
    write_pieces,
)
from pycfs.host.oci.image import PullImages, finish_pull, pull_images
from pycfs.host.oci.result import ImportStats, PullResult
from pycfs.host.oci.streams import check_layer_count, config_diff_ids
from pycfs.host.progress import PullProgress
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.workers.batching import default_jobs
from pycfs.host.workers.fork import Forked, discard
from pycfs.host.workers.pool import Failed, Inflated, Pinned, WorkerPool, open_pool
from pycfs.protocol import worker_api as api
from pycfs.protocol.fdpass import close_fds, fds_from_ancdata, recv_args
from pycfs.protocol.text import listed, shown

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# layer media type → compression
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386",
           "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI/Go spelling."""
    machine = platform.machine()
    return "linux", _GOARCH.get(machine, machine)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    @classmethod
    def from_json(cls, doc: object, where: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise PycfsError(f"{where}: descriptor is not a JSON object")
        media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
        if not isinstance(digest, str) or type(size) is not int or size < 0:
            raise PycfsError(f"{where}: descriptor needs a digest string and a non-negative size")
        parse_digest(digest, f"{where} digest")
        annotations, platform = doc.get("annotations") or {}, doc.get("platform")
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise PycfsError(f"{where}: descriptor {digest} has annotations that are not an object of strings")
        if platform is not None and not isinstance(platform, dict):
            raise PycfsError(f"{where}: descriptor {digest} has a platform that is not an object")
        return cls(media_type if isinstance(media_type, str) else "", digest, size, annotations, platform)


class OciLayout:
    """A directory in the OCI image layout format."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            layout = parse_object(read_document(self.path / "oci-layout", MAX_JSON_DOCUMENT), f"{self.path}/oci-layout")
            self.index = parse_object(read_document(self.path / "index.json", MAX_JSON_DOCUMENT), f"{self.path}/index.json")
        except FileNotFoundError as e:
            raise PycfsError(f"{self.path} is not an OCI image layout: {e.filename} is missing") from None
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise PycfsError(f"{self.path}: unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}")

    def blob_path(self, digest: str) -> Path:
        alg, hexpart = parse_digest(digest)
        return self.path / "blobs" / alg / hexpart

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """The blob, a regular file of the descriptor's size (never a fifo, which would
        block the open, or a device, which could feed a pull without end)."""
        path = self.blob_path(desc.digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PycfsError(f"{self.path}: blob {desc.digest} is missing") from None
        except OSError as e:
            raise PycfsError(f"{self.path}: cannot open blob {desc.digest}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PycfsError(f"{self.path}: blob {desc.digest} is not a regular file")
            if st.st_size != desc.size:
                raise LayerDigestError(f"blob {desc.digest} has {st.st_size} bytes, its descriptor says {desc.size}")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        """The whole blob, checked against the descriptor's size and digest."""
        if desc.size > MAX_JSON_DOCUMENT:
            raise PycfsError(f"{what} {desc.digest} of {desc.size} bytes is too large")
        with self.open_blob(desc) as f:
            data = f.read(desc.size + 1)
        alg, hexpart = parse_digest(desc.digest)
        if len(data) != desc.size:
            raise LayerDigestError(f"{what} {desc.digest}: blob has {len(data)} bytes, descriptor says {desc.size}")
        if hashlib.new(alg, data).hexdigest() != hexpart:
            raise LayerDigestError(f"{what} {desc.digest}: blob content does not match its digest")
        return data

    def descriptors(self) -> list[Descriptor]:
        manifests = self.index.get("manifests")
        if not isinstance(manifests, list):
            raise PycfsError(f"{self.path}/index.json has no manifests list")
        return [Descriptor.from_json(m, f"{self.path}/index.json") for m in manifests]

    def resolve(self, tag: str | None) -> tuple[Descriptor, bytes]:
        """The image manifest for tag (or the only image), through any image index."""
        descs = self.descriptors()
        tags = sorted({d.annotations.get(REF_NAME_ANNOTATION, "") for d in descs} - {""})
        if tag:
            chosen = [d for d in descs if d.annotations.get(REF_NAME_ANNOTATION) == tag]
            if not chosen:
                raise PycfsError(f"no image tagged {shown(tag)} in {self.path} (tags: {listed(tags)})")
        else:
            chosen = descs
            if len(descs) != 1:
                raise PycfsError(
                    f"{self.path} holds {len(descs)} images: name one as oci:{self.path}:TAG (tags: {listed(tags)})"
                )
        return self._resolve_desc(chosen[0], depth=0)

    def _resolve_desc(self, desc: Descriptor, depth: int) -> tuple[Descriptor, bytes]:
        if depth > 4:
            raise PycfsError(f"{self.path}: image indexes nested too deeply")
        raw = self.read_blob(desc, "manifest")
        doc = parse_object(raw, f"manifest {desc.digest}")
        media_type = doc.get("mediaType") or desc.media_type
        if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
            return self._resolve_desc(self._pick_platform(doc, desc.digest), depth + 1)
        if media_type and media_type not in MANIFEST_TYPES:
            raise PycfsError(f"manifest {desc.digest} has unsupported media type {media_type!r}")
        return desc, raw

    def _pick_platform(self, index: dict, digest: str) -> Descriptor:
        want_os, want_arch = host_platform()
        descs = [Descriptor.from_json(m, f"index {digest}") for m in _list(index, "manifests", f"index {digest}")]
        for d in descs:
            p = d.platform or {}
            if p.get("os") == want_os and p.get("architecture") == want_arch:
                return d
        have = [f"{(d.platform or {}).get('os')}/{(d.platform or {}).get('architecture')}" for d in descs]
        raise PycfsError(f"image index {digest} has no manifest for {want_os}/{want_arch} (has: {listed(have)})")


def _list(doc: dict, key: str, what: str) -> list:
    """doc[key] as a list, [] when absent or null."""
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PycfsError(f"{what}: {key!r} is not a list")
    return value


@dataclass(frozen=True)
class ImageLayers:
    """A manifest's layers paired with the config's diff_ids."""

    config: Descriptor
    layers: list[tuple[Descriptor, str]]  # (layer blob, diff_id)


def image_layers(manifest: dict, config_raw: bytes, digest: str) -> ImageLayers:
    config_desc = Descriptor.from_json(manifest.get("config"), f"manifest {digest} config")
    if config_desc.media_type and config_desc.media_type not in CONFIG_TYPES:
        raise PycfsError(f"manifest {digest}: config type {config_desc.media_type!r} is not a container image "
                         "(OCI artifacts are not supported)")
    layer_docs = _list(manifest, "layers", f"manifest {digest}")
    check_layer_count(len(layer_docs), f"manifest {digest}")
    layer_descs = [Descriptor.from_json(d, f"manifest {digest} layer") for d in layer_docs]
    diff_ids = config_diff_ids(config_raw, f"config {config_desc.digest}")
    if len(diff_ids) != len(layer_descs):
        raise PycfsError(f"config {config_desc.digest}: rootfs.diff_ids does not match the manifest's "
                         f"{len(layer_descs)} layers")
    for diff_id in diff_ids:
        parse_digest(diff_id, "diff_id")
    for d in layer_descs:
        if d.media_type not in LAYER_TYPES:
            raise PycfsError(f"layer {d.digest} has unsupported media type {d.media_type!r}")
    return ImageLayers(config_desc, list(zip(layer_descs, diff_ids)))


# Runs of a layer held at once: one being split, the rest with the object workers or
# waiting to be written (each holds its files' fds and up to 4 MiB of inline bytes).
CHUNKS_IN_FLIGHT = 4


# Each wait for the inflating worker's socket is bounded by this, then asks trio whether
# the pull was cancelled.
_POLL = 0.1


class _PieceSource:
    """The split tar from the inflating worker's socket (`worker_api.INFLATE`), taken a run
    of pieces at a time by the splitting thread (`chunk`, as `TarSplitter.chunk`): the worker
    decompresses, hashes and splits, and writes the files' content into the object store,
    on a core of its own; only headers, small files and the files' fds come here. At EOF it
    waits for the worker's answer (`done`): when the worker failed (a corrupt blob), the
    pull is cancelled and reports that, not the short tar the worker left."""

    def __init__(self, digest_size: int) -> None:
        self.sock: socket.socket | None = None
        self.digest_size = digest_size
        self.count = 0  # tar bytes: inline and the files'
        self.stored_there = 0  # files the inflating worker made objects itself
        self.inflated: Inflated | None = None
        # The last message's records not yet taken, each with its fd (a PIECE_FILE's): a
        # run ends at its max_files even inside a message.
        self._left: deque[tuple[api.Record, int | None]] = deque()
        self.done = threading.Event()
        self._ended = False
        self._poll = select.poll()

    def open(self, sock: socket.socket) -> None:
        """Read from sock (closed by `close`)."""
        self.sock = sock
        self._poll.register(sock, select.POLLIN)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        close_fds([fd for _, fd in self._left if fd is not None])
        self._left.clear()

    def _receive(self) -> tuple[bytes, list[int]]:
        """The next message and its fds; b"" at EOF."""
        assert self.sock is not None
        trio.from_thread.check_cancelled()  # also when the socket never runs dry
        while not self._poll.poll(int(_POLL * 1000)):
            trio.from_thread.check_cancelled()
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(*recv_args(1 + api.MAX_RUN_MESSAGE, api.MAX_RUN_FDS))
        except ConnectionResetError:
            # The worker closed with a HAND_OFF of ours unread (sent as it finished): the
            # kernel reports that once, before the pieces still queued and the EOF.
            data, ancdata, flags, _ = self.sock.recvmsg(*recv_args(1 + api.MAX_RUN_MESSAGE, api.MAX_RUN_FDS))
        fds = fds_from_ancdata(ancdata, flags)
        if flags & socket.MSG_TRUNC:
            close_fds(fds)
            raise PycfsError("the inflating worker sent a message larger than a run of pieces may be")
        return data, fds

    def chunk(self, max_files: int = api.MAX_RUN_FDS, max_inline: int = 4 << 20) -> list[Piece]:
        """The next pieces, up to max_files files or about max_inline inline bytes; [] at the end."""
        left = self._left
        with PieceRun() as run:
            while run.files < max_files and len(run.inline) < max_inline:
                if not left and not self._next_message():
                    break
                (kind, body, size, how), fd = left.popleft()
                self.count += size
                if kind == api.PIECE_INLINE:
                    run.inline += body
                elif fd is not None:
                    run.add_file(PendingFile(fd, size))
                else:
                    run.add_file(StoredFile(body, size, how))
                    self.stored_there += 1
            return run.take()

    def _next_message(self) -> bool:
        """The next message's records into _left; False at the end (once the worker answered)."""
        if self._ended:
            return False
        data, fds = self._receive()
        if not data:
            close_fds(fds)
            self._ended = True
            while not self.done.wait(_POLL):
                trio.from_thread.check_cancelled()
            return False
        try:
            records = api.parse_run(data, len(fds), self.digest_size)
        except ValueError as e:
            close_fds(fds)
            raise PycfsError(f"the inflating worker sent {e}") from None
        files = iter(fds)
        self._left.extend((r, next(files) if r[0] == api.PIECE_FILE else None) for r in records)
        return True


class _Chunk:
    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self.stored = trio.Event()


@dataclass
class LayoutLayer:
    """An imported layer: its stream, and its entries when collected."""

    stats: ImportStats
    stream_id: bytes
    entries: list[LayerEntry] | None


async def import_layout_layer(repo: Repository, pool: WorkerPool, inflaters: WorkerPool, layout: OciLayout,
                              desc: Descriptor, diff_id: str, limiter: trio.CapacityLimiter, progress: PullProgress | None,
                              collect: bool = False, store_here: bool = False,
                              inflated: Callable[[], None] | None = None,
                              stored: Callable[[LayoutLayer], None] | None = None,
                              handoff: trio.Event | None = None, budget: EntryBudget | None = None,
                              weight: int = 1) -> LayoutLayer:
    """Decompress and split a layer blob, verify its digest and diff_id, commit
    `oci-layer-<diff_id>`. A worker of ``inflaters`` reads, hashes and decompresses the blob,
    hashes the tar and splits it, writing file content once into anonymous files of the
    object store; a thread here takes its pieces a run at a time, the object workers hash
    and link those files (as they do the files of a containers-storage pull), and each run
    is appended to the layer stream, in order, once its files are objects; with
    ``store_here`` the inflating worker makes them objects itself. With
    ``collect``, the layer's entries for the image build are parsed from the pieces as
    they are written. ``inflated`` is called once the inflating worker is done (or failed):
    it is free for the next layer while this one's last runs are written and committed.
    ``stored`` is called once the layer is checked and its stream stored, before the syncfs
    that makes it visible: the image build need not wait for that. Once ``handoff`` is set
    (`_Handoff`), an inflating worker that stores its files hands the rest of them to an
    idle one of ``inflaters``, if there is one. ``budget``, ``weight``: the image's entries
    the collected ones count against, and how many times the image lists this layer."""
    stats = ImportStats()
    collector = LayerEntryCollector(budget, weight, f"layer {diff_id}") if collect else None
    held: set[_Chunk] = set()
    advanced = 0  # blob bytes shown as progress
    source = _PieceSource(repo.digest_size)
    writer = repo.new_stream(CONTENT_OCI_LAYER, f"layer {desc.digest}")
    with layout.open_blob(desc) as f:
        # the worker's end goes to the inflating worker: `inflaters.inflate` closes it here
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        source.open(ours)
        send, receive = trio.open_memory_channel[_Chunk](CHUNKS_IN_FLIGHT - 1)
        adopter: Pinned | None = None  # the idle inflater the files were handed to
        asking = trio.CancelScope()  # for the handoff, until the last run is written
        written = trio.Event()

        async def store(chunk: _Chunk) -> None:
            pending = [(i, p) for i, p in enumerate(chunk.pieces) if isinstance(p, PendingFile)]
            if pending:
                adopt = pool.adopt if adopter is None else adopter.adopt
                results = await adopt([p.fd for _, p in pending], [p.size for _, p in pending])
                for (i, p), r in zip(pending, results):
                    if isinstance(r, Failed):
                        raise PycfsError(f"layer {diff_id}: cannot store a file of {p.size} bytes: {r.message}")
                    os.close(p.fd)
                    chunk.pieces[i] = StoredFile(r.object_id, p.size, r.how)
            chunk.stored.set()

        def next_chunk() -> _Chunk:
            chunk = _Chunk(source.chunk())
            held.add(chunk)  # here in the thread: a cancelled wait for it must still close its files
            return chunk

        async def split(nursery: trio.Nursery) -> None:
            async with send:
                try:
                    while (chunk := await trio.to_thread.run_sync(next_chunk, limiter=limiter)).pieces:
                        nursery.start_soon(store, chunk)
                        await send.send(chunk)  # waits while CHUNKS_IN_FLIGHT are unwritten
                except OSError as e:
                    raise PycfsError(f"layer {desc.digest}: cannot read the inflating worker's pieces: "
                                     f"{e.strerror or e}") from None
                except PycfsError as e:
                    raise PycfsError(f"layer {desc.digest}: {e}") from None

        async def write() -> None:
            nonlocal advanced
            async for chunk in receive:
                await chunk.stored.wait()
                write_pieces(writer, chunk.pieces, stats)
                held.discard(chunk)
                if collector is not None:  # the parse in a thread: the event loop serves the stores meanwhile
                    await trio.to_thread.run_sync(
                        _collect, collector, [p if isinstance(p, bytes) else (p.object_id,) for p in chunk.pieces])
                if progress is not None:  # the worker reads the blob through the same open file
                    at = os.lseek(f.fileno(), 0, os.SEEK_CUR)
                    progress.advance(diff_id, at - advanced)
                    advanced = at
            asking.cancel()
            written.set()

        async def hand_off() -> None:
            """Hand the inflater's files to an idle inflater once asked (and hold it for
            them until every run is written)."""
            nonlocal adopter
            assert handoff is not None
            with asking:
                await handoff.wait()
            if not handoff.is_set() or source.done.is_set():
                return
            async with inflaters.pinned() as idle:
                if idle.assigned != 1 or idle.backlog:
                    return  # every inflater busy: the pin is not an idle one's alone
                adopter = idle  # before the worker hears it: its next runs' files come unhashed
                try:
                    assert source.sock is not None
                    source.sock.send(api.HAND_OFF, socket.MSG_DONTWAIT)
                except OSError:
                    return  # it sent its last run and left: nothing to hand over
                await written.wait()

        async def inflate() -> None:
            try:
                source.inflated = await inflaters.inflate(f.fileno(), theirs.detach(), LAYER_TYPES[desc.media_type],
                                                          parse_digest(desc.digest)[0], parse_digest(diff_id)[0],
                                                          store_here)
            except PycfsError as e:
                raise PycfsError(f"layer {desc.digest}: {e}") from None
            finally:
                source.done.set()
                if inflated is not None:
                    inflated()

        try:
            async with open_nursery() as nursery:
                nursery.start_soon(inflate)
                nursery.start_soon(split, nursery)
                nursery.start_soon(write)
                if handoff is not None:
                    nursery.start_soon(hand_off)
        finally:
            source.close()
            theirs.close()
            for chunk in held:
                close_pieces(chunk.pieces)
    inflated = source.inflated
    assert inflated is not None
    if inflated.blob_size != desc.size or inflated.blob != desc.digest:
        raise LayerDigestError(f"layer blob {desc.digest}: content does not match its digest or size "
                               f"(got {inflated.blob}, {inflated.blob_size} bytes)")
    if inflated.tar_size != source.count:
        raise PycfsError(f"layer {diff_id}: the inflating worker split {inflated.tar_size} bytes, "
                         f"{source.count} came")
    stats.files_inlined += inflated.files_inlined
    stats.files_stored_by_inflater += source.stored_there
    if progress is not None:
        progress.advance(diff_id, desc.size - advanced)
    stream_id = await trio.to_thread.run_sync(store_layer, repo,
                                              SplitLayer(writer, inflated.diff_id, inflated.tar_size, stats),
                                              diff_id, limiter=limiter)
    entries = None
    if collector is not None:
        collector.close()
        entries = collector.entries
    layer = LayoutLayer(stats, stream_id, entries)
    if stored is not None:
        stored(layer)
    await trio.to_thread.run_sync(publish_layer, repo, diff_id, stream_id, limiter=limiter)
    return layer


def _collect(collector: LayerEntryCollector, pieces: list[bytes | tuple[bytes]]) -> None:
    """Parse the entries of a run of pieces; what they hold (all alive until the image is
    written) leaves the cyclic collector's generations, as `ImageTree.apply` does: else a
    full collection rescans every entry parsed so far each time they grow by a quarter
    (~1 s at 200,000 files). `pull_oci_layout` gives them back."""
    collector.feed(pieces)
    gc.freeze()


class _Handoff:
    """Where inflaters store their files (`inflaters_store`), the layer left alone inflating
    once every layer has started hands its files to the inflater that idles then: alone,
    its worker split, hashed and linked on one core while the other did less (a pull of the
    bench image ended with ~1.5 s at 1.6 of 2 cores busy). An event per layer inflating,
    set for the last one."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._inflating: dict[str, trio.Event] = {}
        self._all_started = False

    def started(self, diff_id: str) -> trio.Event | None:
        if not self.enabled:
            return None
        event = self._inflating[diff_id] = trio.Event()
        return event

    def inflated(self, diff_id: str) -> None:
        self._inflating.pop(diff_id, None)
        self._check()

    def all_started(self) -> None:
        self._all_started = True
        self._check()

    def _check(self) -> None:
        if self._all_started and len(self._inflating) == 1:
            next(iter(self._inflating.values())).set()


def inflaters_store(sizes: list[int]) -> bool:
    """Whether each layer's inflating worker stores its files itself (rather than sending
    them to the object workers), given the compressed sizes of the layers to import.

    Storing in the inflater saves each file's round trip through here to the object workers
    (bench image, zstd: 9.4 against 10.2 CPU-seconds), but does all of a layer's work in one
    process. That pays only while the other layers keep the other cores busy beside the
    largest one: with a lone large layer (a 1 GB layer and a tiny one, as most registry
    images) it cost 15% wall time with zstd and 18% with gzip on 2 cores, where the object
    workers hash beside the split. The bench image's largest layer is 1.9 times the others
    together and gained, hence the bound of 2.
    """
    if len(sizes) < 2:
        return False
    largest = max(sizes)
    return largest <= 2 * (sum(sizes) - largest)


async def pull_oci_layout(repo: Repository, source: str, tag: str | None, *, build_image: bool = True,
                          progress: PullProgress | None = None, jobs: int | None = None,
                          forked: list[Forked] | None = None) -> PullResult:
    """Pull `DIR[:TAG]` (the part after `oci:`) and tag the manifest stream as `tag`. Layers
    whose stream is missing or damaged are imported (again). ``forked``: inflating workers
    started already (`pycfs.host.workers.fork`), this pull's to use or stop: it takes them
    out of the list."""
    forked = [] if forked is None else forked
    try:
        return await _pull_oci_layout(repo, source, tag, build_image, progress, jobs, forked)
    finally:
        discard(forked)  # those the inflaters' pool did not take
        forked.clear()


async def _pull_oci_layout(repo: Repository, source: str, tag: str | None, build_image: bool,
                           progress: PullProgress | None, jobs: int | None, forked: list[Forked]) -> PullResult:
    started = time.monotonic()
    directory, _, layout_tag = source.partition(":")
    if not directory:
        raise PycfsError("oci: needs a directory: oci:DIR[:TAG]")
    layout = await trio.to_thread.run_sync(OciLayout, directory)
    manifest_desc, manifest_raw = await trio.to_thread.run_sync(layout.resolve, layout_tag or None)
    manifest = parse_object(manifest_raw, f"manifest {manifest_desc.digest}")
    config_desc = Descriptor.from_json(manifest.get("config"), f"manifest {manifest_desc.digest} config")
    stats = ImportStats()
    config_raw = await trio.to_thread.run_sync(layout.read_blob, config_desc, "config")
    layers = image_layers(manifest, config_raw, manifest_desc.digest)
    if progress is not None:
        progress.layers(list({d: desc.size for desc, d in layers.layers}.items()))
    todo: dict[str, Descriptor] = {}
    for desc, diff_id in layers.layers:
        present = repo.intact_stream(layer_stream_name(diff_id))
        if present is None or not repo.stream_verified(present):  # (an unchecked one is imported again, checked)
            todo.setdefault(diff_id, desc)
        elif progress is not None:
            progress.layer_done(diff_id, True)
    stats.layers = len({d for _, d in layers.layers})
    stats.layers_already_present = stats.layers - len(todo)
    # Each layer being inflated holds an inflating worker. The next layer starts as soon as
    # a worker is done, not once its layer is committed: the commit's syncfs waited for the
    # layer's writeback (~0.4 s of a workload(0.5) pull) with that worker idle. Layers open
    # at once (inflating, or with their last runs and commit to go) are bounded too: each
    # holds its runs in flight and its stream, and uses up to two threads (split, parse or
    # commit), which the limiter allows each of them.
    layers_at_once = jobs or default_jobs()
    layers_open = 2 * layers_at_once
    limiter = trio.CapacityLimiter(2 * layers_open)
    at_once = trio.Semaphore(layers_at_once)  # taken in the layers' order, given back by each once inflated
    open_layers = trio.Semaphore(layers_open)  # given back by each once committed
    parsed: dict[bytes, list[LayerEntry]] = {}  # by stream id: entries of the layers imported
    budget = EntryBudget()  # the entries parsed, against the image's bound, as they are parsed
    listings = collections.Counter(d for _, d in layers.layers)  # a layer listed twice counts twice
    store_here = inflaters_store([d.size for d in todo.values()])
    handoff = _Handoff(store_here)
    # The image is built once every layer's stream is stored, beside the syncfs that makes
    # the last one visible (0.1-0.9 s at the end of a pull, with a core idle): it needs the
    # streams' ids and entries, not their durability, and is recorded after a barrier of its own.
    stored_ids: dict[str, bytes] = {}
    all_stored = trio.Event()
    early: list[tuple[list[tuple[str, bytes]], PullImages]] = []  # (the layers it was built from, images)

    def stored(diff_id: str, layer: LayoutLayer) -> None:
        stored_ids[diff_id] = layer.stream_id
        if layer.entries is not None:
            parsed[layer.stream_id] = layer.entries
        if len(stored_ids) == len(todo):
            all_stored.set()

    async def after_layers(pool: WorkerPool, inflaters: WorkerPool) -> None:
        await all_stored.wait()
        # Every file is stored: the workers exit while the image is built and the last
        # layer committed (the pools' ends then only collect them).
        pool.close_input()
        inflaters.close_input()
        if not build_image:
            return
        refs = [(d, stored_ids.get(d) or repo.has_stream(layer_stream_name(d))) for _, d in layers.layers]
        if not all(stream_id for _, stream_id in refs):
            return  # a layer found in place is gone: the pull's end says so
        early.append((refs, await trio.to_thread.run_sync(functools.partial(
            pull_images, repo, config_desc.digest, config_raw, refs, parsed=parsed))))

    async def one(pool: WorkerPool, inflaters: WorkerPool, diff_id: str, desc: Descriptor,
                  asked: trio.Event | None) -> None:
        inflating = True

        def inflated() -> None:
            nonlocal inflating
            if inflating:
                inflating = False
                at_once.release()
                handoff.inflated(diff_id)

        try:
            if progress is not None:
                progress.layer_started(diff_id, desc.size)
            layer = await import_layout_layer(repo, pool, inflaters, layout, desc, diff_id, limiter, progress,
                                              build_image, store_here, inflated, functools.partial(stored, diff_id),
                                              asked, budget, listings[diff_id])
        finally:
            inflated()
            open_layers.release()
        stats.add(layer.stats)
        if progress is not None:
            progress.layer_done(diff_id, False)

    try:
        async with contextlib.AsyncExitStack() as pools:
            if todo:
                # The inflating workers are a pool of their own: each is busy for a whole layer.
                pool = await pools.enter_async_context(open_pool(repo=repo, jobs=jobs))
                inflating = min(layers_at_once, len(todo))
                ours = forked[:inflating]
                del forked[:len(ours)]  # the pool's now (it stops them, even when it fails to start)
                discard(forked)  # no layer for these: stopped now, not idle until the end
                forked.clear()
                inflaters = await pools.enter_async_context(open_pool(repo=repo, jobs=inflating, forked=ours))
                async with open_nursery() as nursery:
                    if not store_here:  # (else no file comes to them: no processes to start)
                        nursery.start_soon(pool.start)  # the workers' start-up overlaps the first split
                    nursery.start_soon(after_layers, pool, inflaters)
                    # Largest first (trio runs the tasks it starts in no set order): the others
                    # then run beside it, and the pull does not end on a large layer alone.
                    for diff_id, desc in sorted(todo.items(), key=lambda kv: -kv[1].size):
                        await open_layers.acquire()
                        await at_once.acquire()
                        # (counted as inflating now: `all_started` may come before the task runs)
                        nursery.start_soon(one, pool, inflaters, diff_id, desc, handoff.started(diff_id))
                    handoff.all_started()
            layer_refs = []
            for _, diff_id in layers.layers:
                stream_id = repo.has_stream(layer_stream_name(diff_id))
                if stream_id is None:
                    raise PycfsError(f"layer {diff_id} vanished from the repository during the pull")
                layer_refs.append((diff_id, stream_id))
            images = None
            if early and early[0][0] == layer_refs:
                images = early[0][1]
                if images.written and progress is not None:
                    progress.phase("image")  # (after the last layer's end, as the front ends expect)
            finished = await trio.to_thread.run_sync(functools.partial(
                finish_pull, repo, manifest_desc.digest, manifest_raw, config_desc.digest, config_raw, layer_refs,
                tag, build_image=build_image, parsed=parsed, on_phase=progress.phase if progress is not None else None,
                images=images))
    finally:
        # What `_collect` froze, whether or not an image was written from it (process-wide:
        # in `varlink serve` it thaws other pulls' trees too, which costs only collection time).
        gc.unfreeze()
    return PullResult(tag, manifest_desc.digest, config_desc.digest, finished.manifest_stream_id,
                      finished.config_stream_id, layer_refs, stats, time.monotonic() - started,
                      images=finished.images)
