"""PutLayer's batches to the object worker: the inline bytes (tar headers, small files) go
to the worker with the files, in the batch's memfd, for the layer's sha256, and are held
here until the batch is written; so they count toward BATCH_BYTES, and a stream of mostly
inline bytes is cut into bounded batches instead of gathering in one."""

from __future__ import annotations

import hashlib
import os
import random

import trio
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.host.varlink import transfer
from pycfs.host.workers.pool import open_pool
from pycfs.protocol import splitdirfdstream as sd

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

    async def recording(self, stack, send, batch):
        sent.append((sum(map(len, batch.inline)), len(batch.files)))
        return await real_submit(self, stack, send, batch)

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
