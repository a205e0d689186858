"""Storing a source under a read lease (hash the source, then clone it) on a real reflinking
XFS: whatever writers do meanwhile, an object is named by the digest of the bytes it holds."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest
import trio

from pycfs.host import syscalls
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import LOOKUP_MISSES_BEFORE_SKIPPING, Repository
from pycfs.host.workers.pool import Stored, open_pool

BIG = 48 << 20  # hashing takes long enough for a writer to come along meanwhile


@pytest.fixture
def repo(reflink_dir) -> Repository:
    path = reflink_dir / f"repo-{os.getpid()}-{time.monotonic_ns()}"
    r = Repository.init(path)
    r.enable_source_leases()
    yield r
    r.close()


def _source(repo: Repository, name: str, data: bytes):
    path = repo.path.parent / f"{repo.path.name}-{name}"
    path.write_bytes(data)
    return path


def _store(repo: Repository, path, observer=None):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return repo.store_object_from_fd(fd, observer=observer)
    finally:
        os.close(fd)


def test_leased_store_reflinks_and_skips_the_clone_of_a_present_object(repo):
    data = os.urandom(300_000)
    first = _store(repo, _source(repo, "a", data))
    again = _store(repo, _source(repo, "b", data))
    assert first.how == "reflinked" and again.how == "present"
    assert first.object_id == again.object_id == digest_bytes(data)
    assert repo.read_object(first.object_id) == data
    # No stray temporary files: the second store made no clone at all.
    assert sum(len(files) for _, _, files in os.walk(repo.path / "objects")) == 1


def test_a_first_store_of_new_files_skips_lookups_and_a_present_one_turns_them_on(repo, monkeypatch):
    """Real FICLONE: after LOOKUP_MISSES_BEFORE_SKIPPING misses the store clones without
    looking up; the clone of a present object then ends at the link's EEXIST as "present",
    leaving nothing behind, and lookups resume (no more clones of present objects)."""
    calls = {"lookups": 0, "clones": 0}
    has_object, ficlone = Repository.has_object, syscalls.ficlone

    def lookup(self, object_id):
        calls["lookups"] += 1
        return has_object(self, object_id)

    def clone(dst_fd, src_fd):
        calls["clones"] += 1
        ficlone(dst_fd, src_fd)

    monkeypatch.setattr(Repository, "has_object", lookup)
    monkeypatch.setattr(syscalls, "ficlone", clone)
    contents = [os.urandom(5000 + i) for i in range(LOOKUP_MISSES_BEFORE_SKIPPING + 20)]
    paths = [_source(repo, f"f{i}", data) for i, data in enumerate(contents)]
    first = [_store(repo, p) for p in paths]
    assert calls == {"lookups": LOOKUP_MISSES_BEFORE_SKIPPING, "clones": len(paths)}
    again = [_store(repo, p) for p in paths]
    assert calls == {"lookups": LOOKUP_MISSES_BEFORE_SKIPPING + len(paths) - 1, "clones": len(paths) + 1}
    assert [(r.object_id, r.how) for r in first] == [(digest_bytes(d), "reflinked") for d in contents]
    assert [(r.object_id, r.how) for r in again] == [(digest_bytes(d), "present") for d in contents]
    assert [repo.read_object(r.object_id) for r in first] == contents
    assert sum(len(files) for _, _, files in os.walk(repo.path / "objects")) == len(contents)


def test_a_writer_opening_the_source_mid_store_breaks_the_lease(repo):
    """The writer's open breaks the lease (and waits for its release); the store notices the
    broken lease and stores a private clone instead, named by that clone's digest."""
    old = os.urandom(BIG)
    path = _source(repo, "src", old)
    attempts: list[int] = []

    def observer():
        def see(piece):
            if not attempts:
                try:  # non-blocking: breaks the lease, then gives up at once
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError as e:
                    attempts.append(e.errno)
                else:
                    attempts.append(0)
        return see

    result = _store(repo, path, observer)
    assert attempts == [errno.EWOULDBLOCK]  # a lease was held, and broken
    stored = repo.read_object(result.object_id)
    assert stored == old and digest_bytes(stored) == result.object_id and result.how == "reflinked"


def test_a_source_open_for_writing_is_never_hashed_in_place(repo, monkeypatch):
    """A writer holding the file open before the store: no lease is granted, so the store
    clones first and hashes the clone; a rewrite after the first read cannot reach it."""
    size = 3 * (1 << 20) + 5
    old, new = os.urandom(size), os.urandom(size)
    path = _source(repo, "src", old)
    writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    real = os.preadv
    done: list[bool] = []

    def preadv(fd, buffers, offset, *rest):
        n = real(fd, buffers, offset, *rest)
        if not done:
            done.append(True)
            os.pwrite(writer, new, 0)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        result = _store(repo, path)
    finally:
        os.close(writer)
    assert done
    stored = repo.read_object(result.object_id)
    assert stored == old and digest_bytes(stored) == result.object_id


def test_object_worker_survives_a_lease_break_and_the_writer_goes_on(repo):
    """A real worker process holds the lease; a blocking writer arrives mid-store and writes
    as soon as it may. The lease break's SIGIO must not kill the worker, the writer must get
    its open once the store lets go (not after the kernel's 45 s lease-break time), and the
    object is what its name says."""
    old, new = os.urandom(BIG), os.urandom(BIG)
    path = _source(repo, "src", old)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    broke = threading.Event()
    wrote: list[float] = []

    def writer():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except BlockingIOError:
                break  # the worker holds a lease: now wait for it, as a plain writer does
            time.sleep(0.002)
        else:
            return
        broke.set()
        started = time.monotonic()
        with open(path, "r+b") as f:
            f.write(new)
        wrote.append(time.monotonic() - started)

    async def main():
        async with open_pool(repo=repo, jobs=1) as pool:
            await pool.start()
            thread = threading.Thread(target=writer)
            thread.start()
            try:
                return await pool.store([fd], [BIG])
            finally:
                await trio.to_thread.run_sync(thread.join)

    try:
        [result] = trio.run(main)
    finally:
        os.close(fd)
    assert broke.is_set(), "the worker never held a read lease on its source"
    assert isinstance(result, Stored), result
    # The lease broke, so the worker stored a clone made after it let go: old bytes, new
    # ones or a mix, but named by exactly what it holds.
    stored = repo.read_object(result.object_id)
    assert len(stored) == BIG and digest_bytes(stored) == result.object_id
    assert wrote and wrote[0] < 10, wrote
    assert path.read_bytes() == new


@pytest.fixture
def short_lease_breaks():
    """The kernel's lease-break time down to its shortest, one second (0 means never), for
    the test: a writer then waits no longer for a lease holder (the sysctl is global, so it
    is put back at once)."""
    knob = "/proc/sys/fs/lease-break-time"
    with open(knob) as f:
        saved = f.read()
    with open(knob, "w") as f:
        f.write("1\n")
    try:
        yield
    finally:
        with open(knob, "w") as f:
            f.write(saved)


def test_a_writer_that_outwaits_the_lease_cannot_misname_the_object(repo, short_lease_breaks):
    """The lease breaks and its holder is slow: the kernel lets the writer write while the
    source is being hashed. The broken lease is seen after the clone, so the object is
    hashed again from its clone: never the torn digest of a source that changed under it."""
    size = 3 * (1 << 20) + 5
    old, new = os.urandom(size), os.urandom(size)
    path = _source(repo, "src", old)
    written = threading.Event()

    def write():
        with open(path, "r+b") as f:  # waits for the lease holder, a second at most
            f.write(new)
        written.set()

    def observer():
        def see(piece):
            if not written.is_set():
                threading.Thread(target=write).start()
                assert written.wait(10)
        return see

    result = _store(repo, path, observer)
    assert written.is_set()
    stored = repo.read_object(result.object_id)
    assert stored == new and digest_bytes(stored) == result.object_id


def test_feed_layer_sha256_takes_only_the_pass_stored_when_the_lease_breaks(repo, monkeypatch):
    """A layer's sha256 kept by the worker that stores its files (feed_layer, h): a file
    whose lease broke mid-store is read twice (the source, then the private clone that is
    stored); the sha256 takes the stored pass, once, between the inline bytes around it."""
    import hashlib

    from pycfs.host import repository
    from pycfs.host.workers.service import WorkerService
    from pycfs.protocol.rpcserver import Call

    data = os.urandom(300_000)
    path = _source(repo, "src", data)
    broken: list[int] = []
    real_lease_held = repository.lease_held

    def lease_held(fd: int) -> bool:
        if not broken:
            try:  # non-blocking: breaks the lease, then gives up at once
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                broken.append(e.errno)
        return real_lease_held(fd)

    monkeypatch.setattr(repository, "lease_held", lease_held)
    worker = WorkerService(repo.alg, repo)
    inline = os.memfd_create("inline", os.MFD_CLOEXEC)
    os.write(inline, b"head" + b"tail")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        answer = worker.feed_layer(Call([inline, fd]), 1, [len(data)], [4, 4], "h", first=True)
    finally:
        os.close(fd)
        os.close(inline)
    assert broken == [errno.EWOULDBLOCK]  # a lease was held, and broken
    assert (answer["how"], answer["ids"]) == ("r", digest_bytes(data).hex())
    assert worker.layer_sha256(Call([]), 1) == {"sha256": hashlib.sha256(b"head" + data + b"tail").hexdigest()}


def test_a_store_under_the_callers_lease_leaves_it_in_place(repo):
    """caller_lease: the source hashed under a lease its caller took (PutLayer's host, which
    has the file read again under it for the layer's sha256) is stored reflinked, and the
    lease is still there afterwards, unbroken; without one, the store takes its own and lets
    it go."""
    data = os.urandom(200_000)
    path = _source(repo, "src", data)
    repo.enable_source_leases()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        result = repo.store_object_from_fd(fd, size=len(data), caller_lease=True)
        assert (result.how, result.object_id) == ("reflinked", digest_bytes(data))
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        assert repo.store_object_from_fd(fd, size=len(data), caller_lease=True).how == "present"
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_put_layer_commits_only_the_right_diff_id_reads_no_content_here_and_leaks_no_fd(repo, monkeypatch):
    """PutLayer on a reflinking XFS, the source files ours (so stored under leases): a wrong
    diff_id commits nothing, and every fd is closed either way; the right one commits a
    stream whose bytes hash to it. The sha256 is the worker's: this process reads no
    file's content (os.preadv is how content is read)."""
    import hashlib

    from fdcount import open_fd_count
    from pycfs.host.streamcat import iter_stream_bytes
    from pycfs.host.varlink.transfer import DiffIdMismatch
    from pycfs.protocol.splitdirfdstream import encode_file_backed_data, encode_metadata
    from putlayer import put_stream

    src = repo.path.parent / f"{repo.path.name}-layer"
    src.mkdir()
    stream, tar = bytearray(), bytearray()
    for i, size in enumerate([65, 4096, 300_000, 2 << 20, 100, 77_777] * 30):
        data = os.urandom(size)
        (src / f"f{i}").write_bytes(data)
        header = f"header {i}".encode()
        stream += encode_metadata(header) + encode_file_backed_data(0, size, f"f{i}".encode())
        tar += header + data
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    read_here: list[int] = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, *flags):
        read_here.append(fd)
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)

    def put(claimed: str):
        return trio.run(put_stream, repo, src, bytes(stream), claimed)

    wrong = "sha256:" + "0" * 64
    with pytest.raises(DiffIdMismatch):  # fresh objects
        put(wrong)
    assert repo.has_stream(f"oci-layer-{wrong}") is None
    put_result = put(diff_id)
    layer_id, stats = put_result.layer_id, put_result.stats
    # no tar headers around these files: nothing parsed for FinalizeImage, which then reads the stream
    assert put_result.entries is None
    assert stats.objects_reflinked + stats.objects_already_present == 180 and not read_here
    assert repo.has_stream(f"oci-layer-{diff_id}") == layer_id
    before = open_fd_count()  # the repository's cached directory fds are open now
    with pytest.raises(DiffIdMismatch):  # present objects, their sources leased too
        put(wrong)
    assert repo.has_stream(f"oci-layer-{wrong}") is None and open_fd_count() == before
    assert put(diff_id).layer_id == layer_id and open_fd_count() == before
    assert hashlib.sha256(b"".join(iter_stream_bytes(repo, repo.open_stream(f"oci-layer-{diff_id}")))).digest() \
        == hashlib.sha256(tar).digest()


@pytest.mark.parametrize("writer", [False, True])
def test_put_layer_reads_a_spare_workers_files_again_under_the_same_lease(repo, monkeypatch, writer):
    """PutLayer on a reflinking XFS, every other batch stored by the spare worker: the
    sha256's worker reads those sources again under the leases this process took before
    either worker read them (l). A writer that opens one of them in between (after the
    spare stored it) breaks its lease: the layer is refused, naming the object, and nothing
    is committed; with no writer, the layer is committed and its bytes are the tar's."""
    import hashlib

    from pycfs.host.streamcat import iter_stream_bytes
    from pycfs.host.varlink import transfer
    from pycfs.host.workers.pool import Pinned
    from pycfs.protocol import worker_api as api
    from pycfs.protocol.splitdirfdstream import encode_file_backed_data, encode_metadata
    from putlayer import put_stream, spill_every_other

    src = repo.path.parent / f"{repo.path.name}-spare"
    src.mkdir()
    stream, tar = bytearray(), bytearray()
    for i in range(12):
        data = os.urandom(300_000 + i)
        (src / f"f{i}").write_bytes(data)
        stream += encode_metadata(b"header %d" % i) + encode_file_backed_data(0, len(data), b"f%d" % i)
        tar += b"header %d" % i + data
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    monkeypatch.setattr(transfer, "batch_files", lambda: 2)
    spill_every_other(monkeypatch)
    reads: list[str] = []
    real_feed, real_send = transfer.LayerConsumer._feed, Pinned.send

    async def feed(self, batch):
        if writer and batch.spare is not None and not reads:
            with pytest.raises(BlockingIOError):  # breaks the lease, then gives up at once
                os.open(src / batch.files[0].source.name.decode(), os.O_WRONLY | os.O_NONBLOCK)
        return await real_feed(self, batch)

    async def send(self, method, fds, params):
        if method == api.FEED_LAYER and "l" in params["read"]:
            reads.append(params["read"])
        return await real_send(self, method, fds, params)

    monkeypatch.setattr(transfer.LayerConsumer, "_feed", feed)
    monkeypatch.setattr(Pinned, "send", send)

    if writer:
        with pytest.raises(transfer.LayerTransferError, match="was opened for writing while it was stored"):
            trio.run(put_stream, repo, src, bytes(stream), diff_id)
        assert repo.has_stream(f"oci-layer-{diff_id}") is None
    else:
        put_result = trio.run(put_stream, repo, src, bytes(stream), diff_id)
        assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(put_result.layer_id))) == bytes(tar)
    assert reads and all(set(r) == {"l"} for r in reads)
