"""PutLayer's batches to the object workers: the inline bytes (tar headers, small files) go
to the worker keeping the layer's sha256 with the files, in the batch's memfd, and are held
here until the batch is written; so they count toward BATCH_BYTES, and a stream of mostly
inline bytes is cut into bounded batches instead of gathering in one. A batch goes to
another worker when that one has nothing to do, and the sha256 then reads its files again,
from where the lease, the hardlink or the object store vouches for the bytes stored."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.host.varlink import transfer
from pycfs.host.workers.pool import Pinned
from pycfs.protocol import splitdirfdstream as sd
from pycfs.protocol import worker_api as api

from putlayer import put_stream, spill_every_other

BATCH = 256 << 10  # BATCH_BYTES for the test (32 MiB in use): the stream is 16 times that
PIECE = 16 << 10


def _stream(tmp_path) -> tuple[bytes, bytes, int]:
    """(splitdirfdstream, the bytes it stands for, its file count): Metadata pieces with a
    file every 64 of them."""
    rng = random.Random(7)
    files = tmp_path / "files"
    files.mkdir()
    stream, content, count = bytearray(), bytearray(), 0
    for i in range(16 * BATCH // PIECE):
        piece = rng.randbytes(PIECE)
        stream += sd.encode_metadata(piece)
        content += piece
        if i % 64 == 63:
            data = rng.randbytes(4096 + i)
            (files / f"f{i}").write_bytes(data)
            stream += sd.encode_file_backed_data(0, len(data), f"f{i}".encode())
            content += data
            count += 1
    return bytes(stream), bytes(content), count


def test_inline_bytes_count_toward_the_batch_cap(tmp_path, monkeypatch) -> None:
    stream, content, file_count = _stream(tmp_path)
    diff_id = "sha256:" + hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(transfer, "BATCH_BYTES", BATCH)
    sent: list[tuple[int, int]] = []  # (inline bytes, files) of each batch sent to the worker
    real_submit = transfer.LayerConsumer._submit

    async def recording(self, stack, nursery, send, batch):
        sent.append((sum(map(len, batch.inline)), len(batch.files)))
        return await real_submit(self, stack, nursery, send, batch)

    monkeypatch.setattr(transfer.LayerConsumer, "_submit", recording)
    with Repository.init(tmp_path / "repo") as repo:
        put = trio.run(functools.partial(put_stream, repo, tmp_path / "files", stream, diff_id, jobs=1))
        # bounded: no batch holds much more than the cap (the chunk that crossed it)
        assert len(sent) >= 16
        assert all(inline <= BATCH + PIECE for inline, _ in sent)
        assert sum(inline for inline, _ in sent) + sum(f.stat().st_size for f in (tmp_path / "files").iterdir()) \
            == len(content)
        assert sum(files for _, files in sent) == file_count == put.stats.objects_copied + put.stats.objects_reflinked
        assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(put.layer_id))) == content


def _files_stream(tmp_path, count: int = 40) -> tuple[bytes, bytes]:
    """(splitdirfdstream, the bytes it stands for): a header, then a file of ~1 MiB, each."""
    rng = random.Random(3)
    files = tmp_path / "files"
    files.mkdir()
    stream, content = bytearray(), bytearray()
    for i in range(count):
        header, data = rng.randbytes(512), rng.randbytes((1 << 20) + i)
        (files / f"f{i}").write_bytes(data)
        stream += sd.encode_metadata(header) + sd.encode_file_backed_data(0, len(data), f"f{i}".encode())
        content += header + data
    return bytes(stream), bytes(content)


def _put(tmp_path, repo: Repository, stream: bytes, diff_id: str, zerocopy: bool, leases: bool) -> transfer.PutResult:
    """PutLayer of the stream on two workers; without leases, from a thread of its own (no
    read leases off the main thread: SIGIO can only be ignored there)."""
    put = functools.partial(trio.run, functools.partial(put_stream, repo, tmp_path / "files", stream, diff_id, zerocopy))
    if leases:
        return put()
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(put).result()


@pytest.mark.parametrize(("zerocopy", "leases"), [(False, True), (False, False), (True, True)])
def test_batches_stored_by_a_spare_worker_are_read_again_for_the_sha256(tmp_path, monkeypatch, zerocopy, leases) -> None:
    """One layer on two workers, every other batch stored by the one not keeping its sha256:
    the sha256's worker stores the others as it hashes them (h, or d to be hardlinked) and
    reads the spare's files again: the source under this process's lease where it was
    reflinked (l), else the object (o: a private copy was hashed), a hardlinked source as it
    is (s). Every mode gives the layer's one sha256, its bytes and its objects."""
    stream, content = _files_stream(tmp_path)
    diff_id = "sha256:" + hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(transfer, "batch_files", lambda: 2)
    spill_every_other(monkeypatch)
    reads: list[str] = []
    real_send = Pinned.send

    async def send(self, method, fds, params):
        if method == api.FEED_LAYER:
            reads.append(params["read"])
        return await real_send(self, method, fds, params)

    monkeypatch.setattr(Pinned, "send", send)
    with Repository.init(tmp_path / "repo") as repo:
        src = os.open(tmp_path / "files" / "f0", os.O_RDONLY | os.O_CLOEXEC)
        try:
            reflinks = transfer.reflinks_into(repo, src)
        finally:
            os.close(src)
        put = _put(tmp_path, repo, stream, diff_id, zerocopy, leases)
        hardlink = zerocopy and not reflinks
        here, elsewhere = ("d", "s") if hardlink else ("h", "l" if leases and reflinks else "o")
        assert set("".join(reads)) == {here, elsewhere}, reads
        assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(put.layer_id))) == content
        stats = put.stats
        assert (stats.objects_hardlinked if hardlink else stats.objects_copied + stats.objects_reflinked) == 40


def test_a_file_that_fails_at_the_spare_worker_commits_nothing(tmp_path, monkeypatch) -> None:
    """A source cut short after it was opened, in a batch the spare worker stores: the store
    fails naming the file, the sha256 is never asked for, nothing is committed, and every
    fd of the stream is closed."""
    from fdcount import open_fd_count

    stream, content = _files_stream(tmp_path, 12)
    diff_id = "sha256:" + hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(transfer, "batch_files", lambda: 2)
    spill_every_other(monkeypatch)
    real_store = transfer.LayerConsumer._store_spare

    async def store_spare(self, batch):
        if "f3" in batch.files[-1].what:
            os.truncate(tmp_path / "files" / "f3", 100)
        return await real_store(self, batch)

    monkeypatch.setattr(transfer.LayerConsumer, "_store_spare", store_spare)
    with Repository.init(tmp_path / "repo") as repo:
        before = open_fd_count()
        with pytest.raises(transfer.LayerTransferError, match=r"cannot store 'f3' \(dirfd 0\): "):
            _put(tmp_path, repo, stream, diff_id, zerocopy=False, leases=False)
        assert repo.has_stream(f"oci-layer-{diff_id}") is None
        assert open_fd_count() == before


def test_a_spare_is_an_idle_worker_or_one_keeping_no_sha256() -> None:
    """The rule (`LayerConsumer._spare`): an idle worker (the least assigned) once the
    sha256's worker has two requests waiting; else a worker keeping no layer's sha256 with
    no more waiting than it; never a busy worker keeping another layer's sha256."""
    from collections import deque
    from types import SimpleNamespace

    def worker(waiting: int, assigned: int) -> SimpleNamespace:
        return SimpleNamespace(waiting=deque(range(waiting)), assigned=assigned)

    def spare(mine: SimpleNamespace, *others: SimpleNamespace) -> SimpleNamespace | None:
        pool = SimpleNamespace(_workers=[mine, *others])
        chosen = transfer.LayerConsumer._spare(Pinned(pool, mine))  # type: ignore[arg-type]
        return None if chosen is None else chosen.worker

    pinned_idle, free_idle, free_busy, pinned_busy = worker(0, 1), worker(0, 0), worker(2, 0), worker(1, 1)
    assert spare(worker(2, 1), pinned_idle, free_idle, free_busy) is free_idle
    assert spare(worker(2, 1), pinned_idle, pinned_busy) is pinned_idle
    assert spare(worker(1, 1), pinned_idle, pinned_busy) is None  # (one waiting: not worth a second read)
    assert spare(worker(1, 1), free_busy) is None
    assert spare(worker(2, 1), free_busy) is free_busy
    assert spare(worker(3, 1), pinned_busy) is None
