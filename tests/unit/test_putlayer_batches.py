"""PutLayer's batches to the object workers: the inline bytes (tar headers, small files) go
to the worker keeping the layer's sha256 with the files, in the batch's memfd, and are held
here until the batch is written; so they count toward BATCH_BYTES, and a stream of mostly
inline bytes is cut into bounded batches instead of gathering in one. A batch goes to
another worker when that one has nothing to do, and the sha256 then reads its files again,
from where the lease, the hardlink or the object store vouches for the bytes stored."""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.host.varlink import transfer
from pycfs.host.workers.pool import Pinned, open_pool
from pycfs.protocol import splitdirfdstream as sd
from pycfs.protocol import worker_api as api

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
    repo = Repository.init(tmp_path / "repo")
    dirfd = os.open(tmp_path / "files", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def main() -> transfer.PutResult:
        r, w = os.pipe2(os.O_CLOEXEC)

        async def feed() -> None:
            async with trio.lowlevel.FdStream(w) as out:
                await out.send_all(stream)

        async with open_pool(repo=repo, jobs=1) as pool, trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            return await transfer.put_layer(repo, pool, r, [dirfd], diff_id, zerocopy=False)

    try:
        put = trio.run(main)
        # bounded: no batch holds much more than the cap (the chunk that crossed it)
        assert len(sent) >= 16
        assert all(inline <= BATCH + PIECE for inline, _ in sent)
        assert sum(inline for inline, _ in sent) + sum(f.stat().st_size for f in (tmp_path / "files").iterdir()) \
            == len(content)
        assert sum(files for _, files in sent) == file_count == put.stats.objects_copied + put.stats.objects_reflinked
        assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(put.layer_id))) == content
    finally:
        os.close(dirfd)
        repo.close()


@pytest.mark.parametrize("how", ["leased", "unleased", "hardlinked"])
def test_batches_spill_to_an_idle_worker_and_the_sha256_reads_them_again(tmp_path, monkeypatch, how) -> None:
    """One layer on two workers: its sha256's worker stores the first batches as it hashes
    them (c, or d to be hardlinked), and once it has work queued and the other none, batches
    go there and the sha256 reads their files again: the leased source (l), the object (o:
    no lease, taken only from the main thread), the hardlinked source (s). Every mode gives
    the layer's one sha256 and its objects."""
    rng = random.Random(3)
    files = tmp_path / "files"
    files.mkdir()
    stream, content = bytearray(), bytearray()
    for i in range(40):
        header, data = rng.randbytes(512), rng.randbytes((1 << 20) + i)
        (files / f"f{i}").write_bytes(data)
        stream += sd.encode_metadata(header) + sd.encode_file_backed_data(0, len(data), f"f{i}".encode())
        content += header + data
    diff_id = "sha256:" + hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(transfer, "batch_files", lambda: 2)
    reads: list[str] = []
    real_send = Pinned.send

    async def send(self, method, fds, params):
        if method == api.FEED_LAYER:
            reads.append(params["read"])
        return await real_send(self, method, fds, params)

    monkeypatch.setattr(Pinned, "send", send)
    repo = Repository.init(tmp_path / "repo")
    dirfd = os.open(files, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def main() -> transfer.PutResult:
        r, w = os.pipe2(os.O_CLOEXEC)

        async def feed() -> None:
            async with trio.lowlevel.FdStream(w) as out:
                await out.send_all(bytes(stream))

        async with open_pool(repo=repo, jobs=2) as pool, trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            return await transfer.put_layer(repo, pool, r, [dirfd], diff_id, zerocopy=how == "hardlinked")

    try:
        if how == "unleased":  # no read leases off the main thread (SIGIO can only be ignored there)
            with ThreadPoolExecutor(1) as thread:
                put = thread.submit(trio.run, main).result()
        else:
            put = trio.run(main)
        here, elsewhere = {"leased": ("c", "l"), "unleased": ("c", "o"), "hardlinked": ("d", "s")}[how]
        modes = set("".join(reads))
        assert modes == {here, elsewhere}, reads  # (ext4 here: no reflinks, so zerocopy hardlinks)
        assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(put.layer_id))) == content
        stats = put.stats
        assert stats.objects_copied + stats.objects_hardlinked == 40
    finally:
        os.close(dirfd)
        repo.close()

