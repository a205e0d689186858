"""A layer's sha256 kept by one object worker (feed_layer / layer_sha256, through a real pool
of worker processes): the inline bytes and every file's content, in stream order, across
requests; a file stored or digested there in the same read that names it (h, d), or read
again as stored elsewhere (l: a leased source, s: as it is, o: the object)."""

from __future__ import annotations

import fcntl
import hashlib
import os

import pytest
import trio

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository
from pycfs.host.workers.pool import open_pool
from pycfs.protocol import worker_api as api
from pycfs.protocol.worker_api import Failed


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


class _Request:
    """fds and params of a feed_layer request: pieces[i] before files[i], the last after;
    each file (mode, content, fd or None for the mode to open one)."""

    def __init__(self, layer: int, pieces: list[bytes], files: list[tuple[str, bytes, int | None]],
                 first: bool = True) -> None:
        self.fds = [_memfd(b"".join(pieces))]
        self.fds += [fd if fd is not None else _memfd(data) for mode, data, fd in files if mode != "o"]
        self.params = {"layer": layer, "sizes": [len(data) for _, data, _ in files],
                       "inline": [len(p) for p in pieces], "read": "".join(mode for mode, _, _ in files),
                       "objects": b"".join(digest_bytes(data) for mode, data, _ in files if mode not in "hd").hex(),
                       "first": first}

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(tmp_path / "repo")
    yield r
    r.close()


def _run(repo: Repository, requests: list[tuple[list[bytes], list[tuple[str, bytes, int | None]]]], layer: int,
         sizes_off: int = 0) -> tuple[list, dict]:
    async def main() -> tuple[list, dict]:
        async with open_pool(repo=repo, jobs=2) as pool, pool.pinned() as worker:
            replies = []
            for i, (pieces, files) in enumerate(requests):
                request = _Request(layer, pieces, files, first=i == 0)
                request.params["sizes"] = [s + sizes_off for s in request.params["sizes"]]
                try:
                    replies.append((await worker.send(api.FEED_LAYER, request.fds, request.params),
                                    sum(mode in "hd" for mode, _, _ in files)))
                finally:
                    request.close()
            digest = await worker.send(api.LAYER_SHA256, [], {"layer": layer})
            results = [r for reply, n in replies for r in await worker.files(reply, n, api.FEED_LAYER)]
            return results, (await worker.answer(digest))["result"]

    return trio.run(main)


def test_sha256_spans_requests_in_stream_order_and_objects_are_stored(repo) -> None:
    files = [os.urandom(n) for n in (100, 5000, 300_000, 70, 9000)]
    repo.ensure_object(files[4])  # stored elsewhere: read back from the repository (o)
    requests = [([b"head", b"mid"], [("h", files[0], None)]), ([b""], []),
                ([b"", b"x" * 1000, b""], [("h", files[1], None), ("s", files[2], None)]),
                ([b"pad", b"o", b"tail"], [("h", files[3], None), ("o", files[4], None)])]
    results, answer = _run(repo, requests, 1)
    stream = b"head" + files[0] + b"mid" + files[1] + b"x" * 1000 + files[2] + b"pad" + files[3] + b"o" + files[4] + b"tail"
    assert answer == {"sha256": hashlib.sha256(stream).hexdigest()}
    stored = [files[0], files[1], files[3]]  # (h: the answers are those of the files stored there)
    assert [r[0] for r in results] == [digest_bytes(f) for f in stored]
    for f, (object_id, _) in zip(stored, results):
        assert repo.read_object(object_id) == f
    assert not repo.has_object(digest_bytes(files[2]))  # s: read, not stored


def test_digest_only_stores_nothing(repo) -> None:
    files = [os.urandom(9000), os.urandom(200)]
    results, answer = _run(repo, [([b"a", b"b", b"c"], [("d", files[0], None), ("d", files[1], None)])], 2)
    assert answer == {"sha256": hashlib.sha256(b"a" + files[0] + b"b" + files[1] + b"c").hexdigest()}
    assert results == [(digest_bytes(f), api.DIGESTED) for f in files]
    assert not any(repo.has_object(digest_bytes(f)) for f in files)


def test_a_failed_file_voids_the_layers_sha256(repo) -> None:
    """A file that is not its declared size fails, and the sha256 it is missing from is no answer."""
    results, answer = _run(repo, [([b"a", b"b"], [("h", os.urandom(5000), None)])], 3, sizes_off=1)
    assert isinstance(results[0], Failed) and "5001" in results[0].message
    assert answer["sha256"] is None and "could not be stored" in answer["failed"]


def test_a_missing_object_voids_the_layers_sha256_and_says_which(repo) -> None:
    data = os.urandom(3000)  # never stored
    _, answer = _run(repo, [([b"a", b"b"], [("o", data, None)])], 4)
    assert answer["sha256"] is None and digest_bytes(data).hex() in answer["failed"]


def test_a_source_opened_for_writing_since_its_lease_voids_the_sha256(repo, tmp_path) -> None:
    """l: the host's read lease on the source, taken before any worker read it, must still
    hold once the sha256 has read it again; a writer meanwhile breaks it (the file may have
    changed after its object was named)."""
    data = os.urandom(20_000)
    path = tmp_path / "src"
    path.write_bytes(data)
    repo.ensure_object(data)
    repo.enable_source_leases()  # (SIGIO ignored: a lease break signals its holder)

    def leased() -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return fd

    fd = leased()
    _, answer = _run(repo, [([b"a", b"b"], [("l", data, fd)])], 5)
    assert answer == {"sha256": hashlib.sha256(b"a" + data + b"b").hexdigest()}
    fd = leased()
    with pytest.raises(BlockingIOError):  # breaks the lease, gives up at once
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    _, answer = _run(repo, [([b"a", b"b"], [("l", data, fd)])], 6)
    assert answer["sha256"] is None and "opened for writing" in answer["failed"]


def test_inline_counts_and_read_modes_must_match_the_files(repo) -> None:
    async def main() -> None:
        async with open_pool(repo=repo, jobs=1) as pool, pool.pinned() as worker:
            for change, complaint in (({"inline": [1]}, "inline"), ({"read": "x"}, "read"), ({"read": "o"}, "read"),
                                      ({"objects": "00"}, "objects")):
                request = _Request(7, [b"a", b"b"], [("s", b"x" * 100, None)])
                request.params.update(change)
                try:
                    reply = await worker.send(api.FEED_LAYER, request.fds, request.params)
                finally:
                    request.close()
                with pytest.raises(PycfsError, match=complaint):
                    await worker.files(reply, 0, api.FEED_LAYER)

    trio.run(main)


def test_a_layer_the_worker_forgot_gets_no_sha256_of_its_later_bytes(repo) -> None:
    """Past MAX_LAYERS_HELD other layers (a client that opens many and never finishes them),
    the worker forgets the oldest: its next batch must void the sha256, not start a fresh
    one that would match a tar made only of the later bytes (a hostile client could then
    commit its own files under a known diff_id)."""
    later = b"the later bytes, on their own a known tar"

    async def main() -> dict:
        async with open_pool(repo=repo, jobs=1) as pool, pool.pinned() as worker:

            async def send(layer: int, data: bytes, first: bool) -> None:
                request = _Request(layer, [data], [], first=first)
                try:
                    await worker.files(await worker.send(api.FEED_LAYER, request.fds, request.params), 0, api.FEED_LAYER)
                finally:
                    request.close()

            await send(1000, b"extra entries first", True)
            for other in range(api.MAX_LAYERS_HELD + 1):
                await send(other, b"x", True)
            await send(1000, later, False)
            return (await worker.answer(await worker.send(api.LAYER_SHA256, [], {"layer": 1000})))["result"]

    assert trio.run(main) == {"sha256": None, "failed": None}
