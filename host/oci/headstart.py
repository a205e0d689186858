"""The first layer of a containers-storage pull, begun before the event loop is imported.

Once `pycfs.host.oci.repull` has looked (the image read under the c/storage read locks,
which it keeps for the pull) and the object workers are forked, the CLI opens the first
layer to import's tar-split, reads its first chunks, opens the first batches of their files
and writes each forked worker up to EARLY_PER_WORKER store requests of them
(`Forked.early`).
The workers store those files while this process imports trio and starts the pull (~0.1 s
of CPU, most of the start-up the workers sat idle through); the layer's import
(`pycfs.host.oci.cstorage.LayerImport`) then goes on from there with the same reader and
files, and takes the early requests' answers from the pool.

Everything here is the import's own code (`pycfs.host.oci.layerfiles`): the files are
opened beneath the layer directory, regular files only, under the locks; nothing is
committed before the layer's stream is, after the whole tar is rebuilt and checked. A
failure here stops the head start where it is (what was sent stays sent, and is taken);
the pull meets the failure again in its place and reports it there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pycfs.host.errors import PycfsError
from pycfs.host.oci.layerfiles import (
    CHUNK_ENTRIES,
    LayerFiles,
    TarSplitReader,
    file_batches,
    open_batch,
    stored_files,
)
from pycfs.host.storage.image import ImageSource
from pycfs.host.storage.tarsplit import FileEntry, Segment
from pycfs.host.workers.batching import batch_files, batches_in_flight
from pycfs.host.workers.fork import Forked, send_early
from pycfs.protocol import worker_api as api

# Store requests written to each forked worker before the event loop: enough to keep it busy
# while trio is imported and the pull starts (within half the open-file limit in all: their
# fds are in flight until the worker reads each request). Nothing reads their answers until
# the pool starts; a few answers (~17 KB each) fit the socket's buffer many times over, so a
# worker never blocks writing one while this process writes it the next request.
EARLY_PER_WORKER = 4
# Tar-split chunks read for them at most (as many as the import holds unwritten).
HEAD_CHUNKS = 4


@dataclass
class EarlyBatch:
    """A batch of a chunk's files (`file_batches` of `stored_files`, in order)
    written to a forked worker as request ``request_id``: per file (``entries``), its bytes
    (small files), the fd it was sent as (closed here since), or None (the helper must open
    it). ``request_id`` None: no file of it was sent (all small, or all for the helper)."""

    request_id: int | None
    opened: list[bytes | int | None]
    entries: list[FileEntry]


class HeadStart:
    """Layer ``index`` of the image, begun: its tar-split open (``reader``, kept open by
    ``stack``), its first chunks read (``chunks``) and the first batches of their files
    sent (``early``, in dealing order). The import that takes it over closes the reader
    and the files; `close` does it otherwise (again: nothing)."""

    def __init__(self, index: int, files: LayerFiles, reader: TarSplitReader, stack: contextlib.ExitStack) -> None:
        self.index = index
        self.files = files
        self.reader = reader
        self.stack = stack
        self.chunks: list[list[Segment | FileEntry]] = []
        self.early: list[EarlyBatch] = []
        # What reading the chunk after these raised: the import raises it in its place.
        self.failure: Exception | None = None

    def close(self) -> None:
        self.stack.close()
        self.files.close()


def head_start(source: ImageSource, index: int, forked: Sequence[Forked]) -> HeadStart | None:
    """Begin importing layer ``index`` of ``source`` (read under the c/storage read locks,
    which the caller holds) with the forked workers; None when there are none, or its
    tar-split cannot be opened (the pull reports that, as any failure met here)."""
    if not forked:
        return None
    layer = source.layers[index]
    files = LayerFiles(layer.store, layer.layer.id)
    stack = contextlib.ExitStack()
    try:
        reader = TarSplitReader(stack.enter_context(layer.store.tar_split_entries(layer.layer.id)), files,
                                layer.layer.diff_size)
    except (PycfsError, OSError):
        stack.close()
        files.close()
        return None
    head = HeadStart(index, files, reader, stack)
    files_per_batch = batch_files()
    most = batches_in_flight(len(forked), files_per_batch, EARLY_PER_WORKER)
    workers = itertools.islice(itertools.cycle(forked), most)
    request_ids = itertools.count(1)
    try:
        while len(head.chunks) < HEAD_CHUNKS:
            try:
                entries = reader.take(CHUNK_ENTRIES)
            except Exception as e:  # (the reader is spent: no entry after it may be taken)
                head.failure = e
                break
            if not entries:
                break
            head.chunks.append(entries)
            for batch in file_batches(stored_files(entries), files_per_batch):
                worker = next(workers, None)
                if worker is None or not _send(head, worker, next(request_ids), [entry for _, entry in batch]):
                    return head
    except BaseException:
        head.close()
        raise
    return head


def _send(head: HeadStart, worker: Forked, request_id: int, batch: list[FileEntry]) -> bool:
    """Open a batch and write its files to a forked worker (`head.early`); False when that
    could not be done (the import then opens it in its place)."""
    try:
        opened = open_batch(head.files, batch)
    except (PycfsError, OSError):
        return False
    fds = [got for got in opened if isinstance(got, int)]
    if not fds:
        head.early.append(EarlyBatch(None, opened, batch))
        return True
    try:
        sent = [(entry.size, entry.crc64) for entry, got in zip(batch, opened) if isinstance(got, int)]
        params = api.file_params([size for size, _ in sent], [crc for _, crc in sent])
        if not send_early(worker, request_id, api.STORE, params, fds):
            return False  # not sent (the import sends it), or the worker is gone (the pool says so)
    finally:
        for fd in fds:
            os.close(fd)
    head.early.append(EarlyBatch(request_id, opened, batch))
    return True
