"""A layer's sha256 kept by one object worker (store_layer / layer_sha256, through a real
pool of worker processes): the inline bytes and every file's content, in stream order,
across requests, in the same read that names each object."""

from __future__ import annotations

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


def _request(layer: int, pieces: list[bytes], files: list[bytes], store: bool = True,
             first: bool = True) -> tuple[list[int], dict]:
    """fds and params of a store_layer request: pieces[i] before files[i], the last after."""
    fds = [_memfd(b"".join(pieces)), *(_memfd(f) for f in files)]
    return fds, {"layer": layer, "sizes": [len(f) for f in files], "inline": [len(p) for p in pieces], "store": store,
                 "first": first}


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(tmp_path / "repo")
    yield r
    r.close()


def _run(repo: Repository, requests: list[tuple[list[bytes], list[bytes], bool]], layer: int,
         sizes_off: int = 0) -> tuple[list, dict]:
    async def main() -> tuple[list, dict]:
        async with open_pool(repo=repo, jobs=2) as pool, pool.pinned() as worker:
            replies = []
            for i, (pieces, files, store) in enumerate(requests):
                fds, params = _request(layer, pieces, files, store, first=i == 0)
                params["sizes"] = [s + sizes_off for s in params["sizes"]]
                try:
                    replies.append((await worker.send(api.STORE_LAYER, fds, params), len(files)))
                finally:
                    for fd in fds:
                        os.close(fd)
            digest = await worker.send(api.LAYER_SHA256, [], {"layer": layer})
            results = [r for reply, n in replies for r in await worker.files(reply, n)]
            return results, (await worker.answer(digest))["result"]

    return trio.run(main)


def test_sha256_spans_requests_in_stream_order_and_objects_are_stored(repo) -> None:
    files = [os.urandom(n) for n in (100, 5000, 300_000, 70)]
    requests = [([b"head", b"mid"], files[:1], True), ([b""], [], True), ([b"", b"x" * 1000, b""], files[1:3], True),
                ([b"pad", b"tail"], files[3:], True)]
    results, answer = _run(repo, requests, 1)
    stream = b"head" + files[0] + b"mid" + files[1] + b"x" * 1000 + files[2] + b"pad" + files[3] + b"tail"
    assert answer == {"sha256": hashlib.sha256(stream).hexdigest()}
    assert [r[0] for r in results] == [digest_bytes(f) for f in files]
    for f, (object_id, _) in zip(files, results):
        assert repo.read_object(object_id) == f


def test_digest_only_stores_nothing(repo) -> None:
    files = [os.urandom(9000), os.urandom(200)]
    results, answer = _run(repo, [([b"a", b"b", b"c"], files, False)], 2)
    assert answer == {"sha256": hashlib.sha256(b"a" + files[0] + b"b" + files[1] + b"c").hexdigest()}
    assert results == [(digest_bytes(f), api.DIGESTED) for f in files]
    assert not any(repo.has_object(digest_bytes(f)) for f in files)


def test_a_failed_file_voids_the_layers_sha256(repo) -> None:
    """A file that is not its declared size fails, and the sha256 it is missing from is no answer."""
    results, answer = _run(repo, [([b"a", b"b"], [os.urandom(5000)], True)], 3, sizes_off=1)
    assert isinstance(results[0], Failed) and "5001" in results[0].message
    assert answer == {"sha256": None}


def test_inline_counts_must_match_the_files(repo) -> None:
    async def main() -> None:
        async with open_pool(repo=repo, jobs=1) as pool, pool.pinned() as worker:
            fds, params = _request(4, [b"a"], [b"x" * 100])  # one inline count for one file: one short
            try:
                reply = await worker.send(api.STORE_LAYER, fds, params)
            finally:
                for fd in fds:
                    os.close(fd)
            with pytest.raises(PycfsError, match="inline"):
                await worker.files(reply, 1)

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
                fds, params = _request(layer, [data], [], first=first)
                try:
                    await worker.files(await worker.send(api.STORE_LAYER, fds, params), 0)
                finally:
                    for fd in fds:
                        os.close(fd)

            await send(1000, b"extra entries first", True)
            for other in range(api.MAX_LAYERS_HELD + 1):
                await send(other, b"x", True)
            await send(1000, later, False)
            return (await worker.answer(await worker.send(api.LAYER_SHA256, [], {"layer": 1000})))["result"]

    assert trio.run(main) == {"sha256": None}
