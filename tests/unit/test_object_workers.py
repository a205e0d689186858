"""Object worker processes: real `python -m pycfs.host.workers` children, real files, real fds."""

import contextlib
import errno
import itertools
import os
import json
import signal
import subprocess
import sys

import pytest
import trio
from hypothesis import given, strategies as st

from fdcount import open_fd_count
from procs import BUSY_SIZE, busy_file, children_die_with_host
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes, digest_fd, digest_path
from pycfs.host.repository import Repository
from pycfs.host import stuck
from pycfs.host.workers.batching import MEASURE_BATCH, MEASURE_BATCH_MIN, digest_batches
from pycfs.host.workers.pool import Failed, Stored, WorkerPool, open_pool
from pycfs.protocol import worker_api as api

SIZES = [0, 1, 65, 4095, 4096, 4097, 128 * 4096 + 1, (1 << 20) + 3]


@pytest.fixture
def files(tmp_path):
    """(path, content) of files of SIZES, seeded random."""
    out = []
    for i, size in enumerate(SIZES):
        data = os.urandom(size)
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        out.append((p, data))
    return out


@contextlib.contextmanager
def _opened(paths):
    """(fds, sizes) of the files, closed afterwards."""
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        yield fds, [os.fstat(fd).st_size for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def _run(fn, *args):
    return trio.run(fn, *args)


def test_digest_matches_in_process_hashing(files):
    async def main():
        with _opened([p for p, _ in files]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=2) as pool:
                return await pool.digest(fds, sizes)

    got = _run(main)
    assert got == [digest_bytes(data) for _, data in files]


def test_sha512_workers(files):
    async def main():
        with _opened([files[5][0]]) as (fds, sizes):
            async with open_pool(alg="sha512", jobs=1) as pool:
                return await pool.digest(fds, sizes)

    assert _run(main) == [digest_bytes(files[5][1], "sha512")]


def test_store_writes_objects_and_second_store_finds_them(tmp_path, files):
    with Repository.init(tmp_path / "repo") as repo:

        async def main():
            with _opened([p for p, _ in files]) as (fds, sizes):
                async with open_pool(repo=repo, jobs=2) as pool:
                    first = await pool.store(fds, sizes)
                    second = await pool.store(fds, sizes)
                return first, second

        first, second = _run(main)
        for (_, data), stored, again in zip(files, first, second):
            assert isinstance(stored, Stored) and stored.object_id == digest_bytes(data)
            assert stored.how in ("copied", "reflinked")
            assert again == Stored(stored.object_id, "present")
            fd = repo.open_object(stored.object_id)
            try:
                assert os.pread(fd, len(data) + 1, 0) == data
                assert digest_fd(fd) == stored.object_id
            finally:
                os.close(fd)


def test_small_job_is_served_in_process_and_a_large_one_starts_the_workers(tmp_path, files, monkeypatch):
    """With small_here (and no number of processes), the pool stores here until calls have brought
    START_AFTER_BYTES (the workers then start, in the background) and checks the content
    (a wrong SHA-256 is refused) just as the workers do."""
    from pycfs.host.workers import pool as pool_module

    monkeypatch.setattr(pool_module, "START_AFTER_BYTES", 1 << 20)
    paths = [p for p, _ in files]
    small = [i for i, (_, data) in enumerate(files) if len(data) < 8192]
    with Repository.init(tmp_path / "repo") as repo:

        async def main():
            seen = []
            with _opened(paths) as (fds, sizes):
                async with open_pool(repo=repo, small_here=True) as pool:
                    bad = [(b"", b"\0" * 32) if i == small[1] else None for i in small]
                    first = await pool.store([fds[i] for i in small], [sizes[i] for i in small], sha256s=bad)
                    seen.append((len(pool._workers), pool._next_id))
                    rest = await pool.store(fds, sizes)  # beyond the budget: this one still here
                    seen.append(pool._next_id)
                    with trio.fail_after(30):
                        while len(pool._workers) < pool.jobs:
                            await trio.sleep(0.01)
                    again = await pool.store(fds, sizes)  # by the workers
                    seen.append(pool._next_id > 0)
            return first, rest, again, seen

        first, rest, again, seen = _run(main)
    assert seen == [(0, 0), 0, True]  # no process, no request for the first two; the workers stored the last
    assert isinstance(first[1], Failed) and first[1].errno == errno.EBADMSG
    for i, got in zip(small, first):
        if i != small[1]:
            assert got == Stored(digest_bytes(files[i][1]), got.how) and got.how in ("copied", "reflinked")
    assert [r.object_id for r in rest] == [digest_bytes(data) for _, data in files]
    assert again == [Stored(digest_bytes(data), "present") for _, data in files]


def test_adopt_links_anonymous_files_as_their_objects(tmp_path, files):
    """What the oci:DIR import hands the workers: content it wrote into anonymous files of
    the object store, read-only. Each becomes its object (already present: left unlinked);
    a named file or one of the wrong size fails alone and stores nothing."""
    with Repository.init(tmp_path / "repo") as repo:
        contents = [data for _, data in files[2:5]] + [files[2][1], files[6][1]]  # the first twice
        fds = []
        for data in contents:
            rw = repo.new_object_file()
            assert rw is not None, "tmpfs and ext4 have O_TMPFILE"
            os.write(rw, data)
            fds.append(os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC))
            os.close(rw)
        named = os.open(files[3][0], os.O_RDONLY | os.O_CLOEXEC)

        async def main():
            async with open_pool(repo=repo, jobs=1) as pool:
                first = await pool.adopt(fds[:3], [len(d) for d in contents[:3]])
                return first + await pool.adopt([fds[3], named, fds[4]], [len(contents[3]), len(files[3][1]), 1])

        try:
            got = _run(main)
        finally:
            for fd in fds + [named]:
                os.close(fd)
        assert got[:3] == [Stored(digest_bytes(d), "copied") for d in contents[:3]]
        assert got[3] == Stored(digest_bytes(contents[3]), "present")
        assert isinstance(got[4], Failed) and "not an anonymous file" in got[4].message
        assert got[5] == Failed(errno.ESTALE, f"has {len(contents[4])} bytes, expected 1")
        for data in contents[:3]:
            fd = repo.open_object(digest_bytes(data))
            try:
                assert os.pread(fd, len(data) + 1, 0) == data
            finally:
                os.close(fd)
        assert sorted(p.name for p in (tmp_path / "repo" / "objects").iterdir() if p.is_file()) == []


def test_many_files_in_one_call_span_several_requests(tmp_path):
    count = api.MAX_FILES_PER_REQUEST * 2 + 5
    paths = []
    for i in range(count):
        p = tmp_path / f"s{i}"
        p.write_bytes(b"%d" % i * 40)
        paths.append(p)

    async def main():
        with _opened(paths) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=2) as pool:
                return await pool.digest(fds, sizes)

    assert _run(main) == [digest_bytes(p.read_bytes()) for p in paths]


def test_one_bad_file_fails_alone(tmp_path, files):
    """A wrong size and a directory: each its own Failed; the files around them are stored."""
    with Repository.init(tmp_path / "repo") as repo:

        async def main():
            with _opened([files[2][0], files[3][0], tmp_path]) as (fds, sizes):
                sizes[0] += 1
                async with open_pool(repo=repo, jobs=1) as pool:
                    return await pool.store(fds, sizes)

        wrong_size, good, directory = _run(main)
        assert wrong_size == Failed(errno.ESTALE, f"has {len(files[2][1])} bytes, expected {len(files[2][1]) + 1}")
        assert good == Stored(digest_bytes(files[3][1]), good.how)
        assert isinstance(directory, Failed) and directory.errno == errno.EISDIR


def test_digest_only_worker_refuses_to_store(files):
    async def main():
        with _opened([files[3][0]]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=1) as pool:
                await pool.store(fds, sizes)

    with pytest.raises(PycfsError, match="refused a request.*without a repository"):
        _run(main)


def test_dead_worker_fails_the_pool_with_its_status(files):
    async def main():
        with _opened([files[3][0]]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=1) as pool:
                await pool.digest(fds, sizes)
                os.kill(pool._workers[0].proc.pid, signal.SIGKILL)
                await pool._workers[0].proc.wait()
                await pool.digest(fds, sizes)

    with pytest.raises(PycfsError, match=r"object worker \(pid \d+\) failed: .*exit status -9"):
        _run(main)


def test_a_stopped_worker_with_requests_waiting_is_killed_and_named(files, monkeypatch):
    """A worker that uses no CPU while a request waits (here: stopped; in life: reading a
    file on a stalled FUSE or network filesystem) fails the pool after STUCK_LIMIT, one
    line naming it; before, the call waited for good."""
    monkeypatch.setattr(stuck, "STUCK_LIMIT", 0.5)

    async def main():
        with _opened([files[3][0]]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=1) as pool:
                await pool.digest(fds, sizes)
                os.kill(pool._workers[0].proc.pid, signal.SIGSTOP)
                with trio.fail_after(10):
                    await pool.digest(fds, sizes)

    with pytest.raises(PycfsError, match=r"^the object worker \(pid \d+\) failed: it made no progress for 0 s with "
                                         r"requests waiting \(.*FUSE.*\): killed; exit status -9$"):
        _run(main)


def test_a_busy_worker_is_not_taken_for_stuck(tmp_path, monkeypatch):
    """Hashing longer than STUCK_LIMIT is progress: the answer comes, and is right."""
    monkeypatch.setattr(stuck, "STUCK_LIMIT", 0.2)
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # ~0.7 s of hashing at ~1.5 GB/s

    async def main():
        with _opened([path]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=1) as pool:
                return await pool.digest(fds, sizes)

    assert _run(main) == [digest_path(str(path))]


def test_close_input_lets_the_workers_exit_before_the_block_ends(files):
    """The caller's other work (a pull's image) overlaps their exit; later calls are refused."""
    exited = []

    async def main():
        with _opened([files[3][0]]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=2) as pool:
                assert await pool.digest(fds, sizes) == [digest_bytes(files[3][1])]
                pool.close_input()
                with trio.fail_after(10):
                    for w in pool._workers:
                        exited.append(await w.proc.wait())
                with pytest.raises(PycfsError, match="shut down"):
                    await pool.digest(fds, sizes)

    _run(main)
    assert exited == [0, 0]


def test_worker_that_cannot_start_quotes_its_output(tmp_path, files):
    with Repository.init(tmp_path / "repo") as repo:
        (tmp_path / "repo" / "meta.json").write_text("{}")  # the worker's own open fails

        async def main():
            with _opened([files[3][0]]) as (fds, sizes):
                async with open_pool(repo=repo, jobs=1) as pool:
                    await pool.store(fds, sizes)

        with pytest.raises(PycfsError, match=r"failed: .*exit status 2; its last output: pycfs-worker: "):
            _run(main)


def test_no_process_or_fd_left_after_the_pool(files):
    """Also when the block is cancelled with calls in flight."""
    before = open_fd_count()
    pids = []

    async def main():
        with _opened([files[-1][0]] * 50) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=2) as pool:
                await pool.start()
                pids.extend(w.proc.pid for w in pool._workers)
                with trio.move_on_after(0.05):
                    async with trio.open_nursery() as nursery:
                        for _ in range(4):
                            nursery.start_soon(pool.digest, fds, sizes)

    _run(main)
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert open_fd_count() == before


def test_measure_command_keeps_order_and_reports_each_failure(tmp_path, files):
    listing = tmp_path / "list"
    listing.write_text("".join(f"{p}\n" for p, _ in files[3:]))
    argv = [sys.executable, "-m", "pycfs.tools.cli", "measure", str(files[0][0]), str(tmp_path / "missing"),
            str(tmp_path), str(files[1][0]), "--files-from", str(listing), "-j", "2"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    assert out.returncode == 1
    expected = [files[0], files[1], *files[3:]]
    assert out.stdout.splitlines() == [f"{digest_bytes(data).hex()} {p}" for p, data in expected]
    assert out.stderr.splitlines() == [f"pycfs: error: {tmp_path / 'missing'}: No such file or directory",
                                       f"pycfs: error: {tmp_path}: Is a directory"]


def test_measure_writes_its_lines_in_order_around_the_errors(tmp_path, files):
    """stdout and stderr on one pipe (a terminal, `2>&1`): each error line comes after the
    digests of the files before it, though the digests are written in runs."""
    argv = [sys.executable, "-m", "pycfs.tools.cli", "measure", "-j", "2", str(files[0][0]), str(tmp_path / "gone"),
            str(files[1][0]), str(files[2][0]), str(tmp_path / "gone2"), str(files[3][0])]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    assert out.returncode == 1
    line = {i: f"{digest_bytes(files[i][1]).hex()} {files[i][0]}" for i in range(4)}
    assert out.stdout.splitlines() == [line[0], f"pycfs: error: {tmp_path / 'gone'}: No such file or directory",
                                       line[1], line[2], f"pycfs: error: {tmp_path / 'gone2'}: No such file or directory",
                                       line[3]]


def test_measure_output_in_runs_keeps_every_line(tmp_path, files, monkeypatch, capsys):
    """Lines are written OUTPUT_RUN at a time (here 2): none lost or repeated at a run's end,
    an error's line between."""
    from pycfs.tools import cli
    from pycfs.tools.commands import repo

    monkeypatch.setattr(repo, "OUTPUT_RUN", 2)
    names = [str(p) for p, _ in files[:5]]
    names.insert(3, str(tmp_path / "gone"))
    assert cli.main(["measure", "-j", "1", *names]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{digest_bytes(d).hex()} {p}" for p, d in files[:5]]
    assert err == f"pycfs: error: {tmp_path / 'gone'}: No such file or directory\n"


def test_measure_by_name_resolves_like_the_kernel_and_refuses_what_is_not_a_file(tmp_path, files):
    """The workers (cwd "/") open the names themselves: a relative name is the caller's
    (its ".." taken after the symlink, as the kernel does), a non-UTF-8 name survives JSON,
    a fifo is refused without hanging, a directory and a missing file fail alone."""
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    odd.write_bytes(files[4][1])
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "deep")
    (tmp_path / "f0").rename(tmp_path / "sub" / "f0")  # "link/../f0" is sub/f0; normalised, it would be f0
    os.mkfifo(tmp_path / "fifo")
    names = [os.fsdecode(b"caf\xe9"), "link/../f0", "f3", "fifo", "sub", "missing"]
    listing = tmp_path / "list"
    listing.write_bytes(b"".join(os.fsencode(n) + b"\n" for n in names[1:]))
    argv = [sys.executable, "-m", "pycfs.tools.cli", "measure", "-j", "2", os.fsencode(names[0]), "--files-from", "list"]
    out = subprocess.run(argv, capture_output=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [f"{digest_bytes(data).hex()} ".encode() + os.fsencode(name) for name, data in
                                       [(names[0], files[4][1]), (names[1], files[0][1]), (names[2], files[3][1])]]
    assert out.stderr.decode().splitlines() == ["pycfs: error: fifo: not a regular file", "pycfs: error: sub: Is a directory",
                                                "pycfs: error: missing: No such file or directory"]


def test_measure_of_absolute_names_works_from_a_removed_directory(tmp_path, files):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f'cd {gone} && rmdir {gone} && exec "$0" -m pycfs.tools.cli measure -j 2 {files[3][0]} {files[4][0]}'
    out = subprocess.run(["sh", "-c", script, sys.executable], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{digest_bytes(data).hex()} {p}" for p, data in files[3:5]]


def test_workers_open_only_absolute_names_and_take_no_fds(tmp_path, files):
    async def main(paths, with_fd):
        async with open_pool(alg="sha256", jobs=1) as pool:
            if not with_fd:
                return await pool.digest_paths(paths)
            with _opened([files[3][0]]) as (fds, _):
                return await pool._call(api.DIGEST_PATHS, fds, {"paths": paths}, len(paths))

    assert _run(main, [str(files[3][0]), str(tmp_path)], False) == [digest_bytes(files[3][1]),
                                                                    Failed(errno.EISDIR, "Is a directory")]
    for paths, with_fd in [(["f3"], False), ([str(files[3][0])], True), ([str(files[3][0]) + "\0x"], False),
                           ([str(files[3][0])] * (api.MAX_FILES_PER_REQUEST + 1), False)]:
        with pytest.raises(PycfsError, match="refused a request.*absolute paths"):
            _run(main, paths, with_fd)


def test_workers_hash_only_the_file_expected(tmp_path, files):
    """``expect``: a path now naming another inode, or a file of another size, is CHANGED."""
    from pycfs.host.fsverity import CHANGED, identity

    path, data = files[3]
    other = tmp_path / "other"
    other.write_bytes(data)

    async def main(expect):
        async with open_pool(alg="sha256", jobs=1) as pool:
            return await pool.digest_paths([str(path)], expect)

    assert _run(main, [identity(os.stat(path))]) == [digest_bytes(data)]
    changed = Failed(CHANGED, "changed while being read")
    assert _run(main, [identity(os.stat(other))]) == [changed]
    st = os.stat(path)
    assert _run(main, [(st.st_dev, st.st_ino, st.st_size - 1, st.st_mtime_ns)]) == [changed]
    assert _run(main, [("1", st.st_ino, st.st_size, st.st_mtime_ns)]) == [changed]
    for expect in ([], [[1, 2, 3]], [5]):
        with pytest.raises(PycfsError, match="refused a request.*identity"):
            _run(main, expect)


def test_measure_batches_stay_within_a_message():
    names = ["/" + "x" * 4000] * 100 + ["/a"] * 2000
    batches = list(digest_batches(names))
    assert [b for b in batches if b[0] < 100] == [(i, i + 32) for i in range(0, 96, 32)] + [(96, 96 + 2004 // 8)]
    assert batches[-1][1] == len(names) and all(a[1] == b[0] for a, b in itertools.pairwise(batches))
    assert all(end - start <= MEASURE_BATCH for start, end in batches)


def test_measure_batches_shrink_towards_the_end():
    """Large requests while many files are left, an eighth of the rest later (but not under
    MEASURE_BATCH_MIN): neither worker is left hashing a long last batch alone."""
    sizes = [end - start for start, end in digest_batches(["/a"] * 10_000)]
    assert sizes[:30] == [MEASURE_BATCH] * 30 and sum(sizes) == 10_000
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] <= MEASURE_BATCH_MIN
    left = 10_000
    for size in sizes:
        assert size == max(MEASURE_BATCH_MIN, min(MEASURE_BATCH, left // 8)) or size == left
        left -= size


def test_malformed_replies_are_refused():
    pool = WorkerPool(None, [], 1, "sha256")
    good = {"ids": (b"\x01" * 32 + bytes(32)).hex(), "how": "r-", "failed": [[1, 2, "gone"]]}
    assert pool._results({"result": good}, 2, api.STORE) == [(b"\x01" * 32, "r"), Failed(2, "gone")]
    bad = [
        {"error": {"code": -32602, "message": "no"}},
        {"result": {**good, "ids": good["ids"][:-2]}},  # short digests
        {"result": {**good, "ids": "zz" * 64}},  # not hex
        {"result": {**good, "how": "r"}},  # one code for two files
        {"result": {**good, "how": "x-"}},  # unknown code
        {"result": {**good, "how": "rr"}},  # a failure for a stored file
        {"result": {**good, "failed": []}},  # a failed file without a reason
        {"result": {**good, "failed": [[5, 2, "gone"]]}},  # out of range
        {"result": {**good, "failed": [["1", 2, "gone"]]}},
        {"result": None},
    ]
    for obj in bad:
        with pytest.raises(ValueError):
            pool._results(obj, 2, api.STORE)
    with pytest.raises(ValueError):  # store codes in a digest reply
        pool._results({"result": good}, 2, api.DIGEST)


def test_read_only_repository_fails_each_file_with_the_reason(tmp_path, files):
    """The worker opens the repository for itself; here it finds it read-only (a feature
    from the future it must not write under), so each file fails, saying why."""
    with Repository.init(tmp_path / "repo") as repo:
        meta = tmp_path / "repo" / "meta.json"
        doc = json.loads(meta.read_text())
        doc["features"]["read-only-compatible"].append("from-the-future")
        meta.write_text(json.dumps(doc))

        async def main():
            with _opened([files[3][0]]) as (fds, sizes):
                async with open_pool(repo=repo, jobs=1) as pool:
                    return await pool.store(fds, sizes)

        (result,) = _run(main)
        assert isinstance(result, Failed) and "read-only" in result.message, result


def test_workers_die_with_the_host(tmp_path):
    """The host killed outright in the middle of a request: its workers go too
    (PR_SET_PDEATHSIG), not left hashing a file that takes them a minute (an idle worker
    would exit at EOF on its socket anyway)."""
    assert len(children_die_with_host(
        "import os, trio\n"
        "from pycfs.host.workers.pool import open_pool\n"
        "async def main():\n"
        f"    fd = os.open({str(busy_file(tmp_path))!r}, os.O_RDONLY)\n"
        "    async with open_pool(alg='sha256', jobs=2) as pool:\n"
        "        await pool.start()\n"
        "        async with trio.open_nursery() as nursery:\n"
        "            for _ in pool._workers:\n"
        f"                nursery.start_soon(pool.digest, [fd], [{BUSY_SIZE}])\n"
        "            await trio.sleep(0.5)\n"
        "            print(' '.join(str(w.proc.pid) for w in pool._workers), flush=True)\n"
        "            await trio.sleep(60)\n"
        "trio.run(main)\n")) == 2


def test_workers_outlive_the_thread_that_started_them(monkeypatch, files):
    """PR_SET_PDEATHSIG follows the forking thread: workers forked in one of trio's cached
    threads were killed once it idled out (10 s; here 1 s), in the middle of a pull."""
    import trio._core._thread_cache as thread_cache

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 1.0)

    async def main():
        with _opened([files[4][0]]) as (fds, sizes):
            async with open_pool(alg="sha256", jobs=1) as pool:
                first = await pool.digest(fds, sizes)  # the worker is up (and has its death signal set)
                await trio.sleep(2.5)  # the thread that forked it, if one of the cache's, idles out
                return first + await pool.digest(fds, sizes)

    assert _run(main) == [digest_bytes(files[4][1])] * 2


def rewrite_after_first_read(monkeypatch, path, new: bytes) -> list[bool]:
    """Rewrite the file at `path` in place (same size) right after its content is first
    read: a source changing under the pull. Returns a flag list, [True] once done."""
    target = os.stat(path)
    real = os.preadv
    done: list[bool] = []

    def preadv(fd, buffers, offset, *rest):
        n = real(fd, buffers, offset, *rest)
        st = os.fstat(fd)
        if not done and (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            done.append(True)
            with open(path, "r+b") as f:
                f.write(new)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    return done


@pytest.mark.parametrize("size", [100, 3 * (1 << 20) + 5])
def test_object_is_what_its_name_says_when_the_source_is_rewritten(tmp_path, monkeypatch, size):
    """The source changes after its first read: whatever is stored must digest to its name
    (the digest once came from the source and the content from a later copy of it)."""
    repo = Repository.init(tmp_path / "repo")
    path = tmp_path / "src"
    old, new = os.urandom(size), os.urandom(size)
    path.write_bytes(old)
    done = rewrite_after_first_read(monkeypatch, path, new)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = repo.store_object_from_fd(fd)
    finally:
        os.close(fd)
    assert done
    stored = repo.read_object(result.object_id)
    assert digest_bytes(stored) == result.object_id
    # A torn read (old first MiB, new rest) may be what was stored: the name says so.
    assert len(stored) == size and stored[:100] == old[:100]


@pytest.mark.parametrize("leased", [False, True])
def test_store_refuses_a_source_of_another_size_before_storing_anything(tmp_path, leased):
    """`size`: checked by the one fstat (under the lease when leases are on), before any
    byte is stored; the right size stores the object its content names."""
    repo = Repository.init(tmp_path / "repo")
    sigio = signal.getsignal(signal.SIGIO)
    if leased:
        repo.enable_source_leases()  # (here a clone may be impossible: the copy path then)
    data = os.urandom(5000)
    (tmp_path / "src").write_bytes(data)
    fd = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as refused:
            repo.store_object_from_fd(fd, size=len(data) + 1)
        assert refused.value.errno == errno.ESTALE and str(len(data)) in str(refused.value)
        assert not [p for p in (repo.path / "objects").rglob("*") if p.is_file()]
        result = repo.store_object_from_fd(fd, size=len(data))
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, sigio)
    assert result.object_id == digest_bytes(data) and repo.read_object(result.object_id) == data


def test_observer_sees_exactly_what_is_stored_and_can_refuse_it(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    data = os.urandom(3 * (1 << 20) + 7)
    (tmp_path / "src").write_bytes(data)
    seen = bytearray()
    fd = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = repo.store_object_from_fd(fd, observer=lambda: seen.extend)
        assert bytes(seen) == data == repo.read_object(result.object_id)

        def refuse(piece):
            raise OSError(errno.EBADMSG, "refused")

        repo2 = Repository.init(tmp_path / "repo2")
        with pytest.raises(OSError, match="refused"):
            repo2.store_object_from_fd(fd, observer=lambda: refuse)
    finally:
        os.close(fd)
    assert not [p for p in (repo2.path / "objects").rglob("*") if p.is_file()]


def test_store_checks_a_prefixed_sha256_in_the_same_read(tmp_path, files):
    """`sha256s`: SHA-256(prefix + content) must match, else that file fails and no object is
    named; the files around it are stored."""
    import hashlib

    picked = [files[2], files[6], files[7]]
    prefix = b"\0\0\0\x10header-variant!"
    checks = [(prefix, hashlib.sha256(prefix + data).digest()) for _, data in picked]
    checks[1] = (prefix, hashlib.sha256(b"other" + picked[1][1]).digest())
    with Repository.init(tmp_path / "repo") as repo:

        async def main():
            with _opened([p for p, _ in picked]) as (fds, sizes):
                async with open_pool(repo=repo, jobs=1) as pool:
                    return await pool.store(fds, sizes, sha256s=checks)

        first, wrong, last = _run(main)
        assert first == Stored(digest_bytes(picked[0][1]), first.how)
        assert last == Stored(digest_bytes(picked[2][1]), last.how)
        assert isinstance(wrong, Failed) and wrong.errno == errno.EBADMSG
        assert repo.object_size(digest_bytes(picked[1][1])) is None


def test_store_answers_take_only_store_codes():
    pool = WorkerPool(None, [], 1, "sha256")
    reply = {"ids": (b"\1" * 32 + b"\2" * 32).hex(), "how": "rp", "failed": []}
    assert pool._results({"result": reply}, 2, api.STORE) == [(b"\1" * 32, "r"), (b"\2" * 32, "p")]
    with pytest.raises(ValueError):
        pool._results({"result": reply}, 2, api.DIGEST)
    for how in ("RP", "r="):  # no lease-kept codes any more; a store is not a digest
        with pytest.raises(ValueError):
            pool._results({"result": {**reply, "how": how}}, 2, api.STORE)


def _tar(*sizes: int) -> bytes:
    """A tar of random files of these sizes (the small ones stay inline when split)."""
    from pycfs.host.oci.tar import BLOCK, simple_entry

    return b"".join(simple_entry(b"f%d" % i, os.urandom(n)) for i, n in enumerate(sizes)) + bytes(2 * BLOCK)


def _receive_pieces(sock, got: bytearray, kinds: list, take=None, objects=None) -> None:
    """Read an inflate's messages to EOF (``take``: close after that many), rebuilding
    the tar in ``got`` from the inline bytes and the files' content (a stored file's read
    from the repository at ``objects``, and checked against its name); ``kinds`` lists the
    kind of each message."""
    import array
    import socket

    with sock:
        for _ in itertools.count() if take is None else range(take):
            data, anc, _, _ = sock.recvmsg(api.MAX_RUN_MESSAGE, socket.CMSG_SPACE(4 * api.MAX_RUN_FDS))
            fds = [fd for _, _, raw in anc for fd in array.array("i", raw)]
            if not data:
                return
            files = iter(fds)
            for kind, body, size, _ in api.parse_run(data, len(fds), 32):
                kinds.append(kind)
                if kind == api.PIECE_FILE:
                    with open(next(files), "rb") as f:  # read-only, as the object workers get it
                        content = f.read()
                    assert len(content) == size
                    got.extend(content)
                elif kind == api.PIECE_STORED:
                    content = (objects / body[:1].hex() / body[1:].hex()).read_bytes()
                    assert len(content) == size and digest_bytes(content) == body
                    got.extend(content)
                else:
                    got.extend(body)


def _inflate(blob: bytes, tmp_path, compression: str, take=None, store=False,
             said: bytes = b"") -> tuple[object, bytes, list]:
    """A worker's inflate of blob, its pieces read here as they come (``take``: how many
    messages to read before closing the socket; ``store``: the worker stores the files;
    ``said``: sent to the worker on the socket first): (the answer or the PycfsError, the
    tar rebuilt from the pieces, their kinds)."""
    import socket

    (tmp_path / "blob").write_bytes(blob)
    got = bytearray()
    kinds: list = []

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if said:
            ours.send(said)
        with Repository.init(tmp_path / "repo") as repo:
            async with open_pool(repo=repo, jobs=1) as pool, trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _receive_pieces, ours, got, kinds, take,
                                   tmp_path / "repo" / "objects")
                with open(tmp_path / "blob", "rb") as f:
                    try:
                        answer = await pool.inflate(f.fileno(), theirs.detach(), compression, "sha256", "sha512",
                                                    store)
                    except PycfsError as e:
                        answer = e
                # the pool still answers after a failed inflate
                with _opened([tmp_path / "blob"]) as (fds, sizes):
                    assert await pool.digest(fds, sizes) == [digest_bytes(blob)]
        return answer

    return _run(main), bytes(got), kinds


def test_inflate_splits_the_tar_and_answers_both_digests(tmp_path):
    """Across frames and far past the socket's buffer: the pieces (inline runs cut into
    messages, files as read-only fds of the object store) rebuild the tar byte for byte,
    and the answer has the blob's and the tar's digests and sizes."""
    import hashlib
    import zstandard

    tar = _tar(3 << 20, 10, 200 << 10, 5 << 20, 64, 65)
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(tar[:12345]) + cctx.compress(tar[12345:])
    answer, got, kinds = _inflate(blob, tmp_path, "zstd")
    assert got == tar
    assert kinds.count(api.PIECE_FILE) == 4  # the files over 64 bytes
    assert (answer.blob, answer.blob_size) == ("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
    assert (answer.diff_id, answer.tar_size) == ("sha512:" + hashlib.sha512(tar).hexdigest(), len(tar))
    assert answer.files_inlined == 2


def test_inflate_that_stores_sends_objects_named_by_their_content(tmp_path):
    """With store, the inflating worker makes every file over 64 bytes its object itself:
    only stored pieces come, each an object whose name is the digest of its bytes, and
    together with the inline bytes they are the tar; a file twice is stored once."""
    import hashlib
    import zstandard

    tar = _tar(3 << 20, 10, 200 << 10, 64, 65)
    tar = tar[:-1024] + tar[:-1024] + bytes(1024)  # every file again: present the second time
    blob = zstandard.ZstdCompressor().compress(tar)
    answer, got, kinds = _inflate(blob, tmp_path, "zstd", store=True)
    assert got == tar
    assert api.PIECE_FILE not in kinds and kinds.count(api.PIECE_STORED) == 6
    assert (answer.diff_id, answer.tar_size) == ("sha512:" + hashlib.sha512(tar).hexdigest(), len(tar))
    assert answer.files_inlined == 4


def test_inflate_that_stores_hands_its_files_off_when_asked(tmp_path):
    """HAND_OFF from the host before a run: the worker stores none of its files from then
    on, sending each as a read-only unhashed fd for another worker to adopt; the pieces
    still rebuild the tar."""
    import zstandard

    tar = _tar(3 << 20, 10, 200 << 10, 64, 65)
    answer, got, kinds = _inflate(zstandard.ZstdCompressor().compress(tar), tmp_path, "zstd", store=True,
                                  said=api.HAND_OFF)
    assert got == tar and not isinstance(answer, PycfsError)
    assert api.PIECE_STORED not in kinds and kinds.count(api.PIECE_FILE) == 3  # the files over 64 bytes
    assert not list((tmp_path / "repo" / "objects").glob("*/*"))  # nothing linked by the inflater


def test_inflate_refuses_anything_else_said_on_its_socket(tmp_path):
    import zstandard

    answer, _, _ = _inflate(zstandard.ZstdCompressor().compress(_tar(10 << 10, 65)), tmp_path, "zstd", store=True,
                            said=b"stop")
    assert isinstance(answer, PycfsError) and str(answer) == "the host sent b'stop' on the inflate socket"


def test_inflate_that_stores_fails_on_a_cut_blob_with_nothing_pending(tmp_path):
    """A blob cut inside its last file: the error names the damage; the files of the runs
    sent before it are objects (a re-run finds them present), the later ones of the run cut
    short are not, and no partial file is under a name."""
    import zstandard

    tar = _tar(*[10 << 10] * 70, 1 << 20)  # a run is 64 files: the first run goes whole
    blob = zstandard.ZstdCompressor().compress(tar)
    answer, got, kinds = _inflate(blob[:-300_000], tmp_path, "zstd", store=True)
    assert isinstance(answer, PycfsError) and "corrupt zstd layer: truncated frame" in str(answer)
    assert kinds.count(api.PIECE_STORED) == 64 and got == tar[: len(got)]
    objects = list((tmp_path / "repo" / "objects").glob("*/*"))
    assert sorted(digest_bytes(p.read_bytes()) for p in objects) == sorted(
        bytes.fromhex(p.parent.name + p.name) for p in objects)
    assert len(objects) == 64


def test_inflate_of_a_cut_blob_fails_with_the_reason(tmp_path):
    import zstandard

    blob = zstandard.ZstdCompressor().compress(_tar(1 << 20))
    answer, got, _ = _inflate(blob[:-100], tmp_path, "zstd")
    assert isinstance(answer, PycfsError) and "corrupt zstd layer: truncated frame" in str(answer)
    assert len(got) < 1 << 20


def test_inflate_of_what_is_not_a_tar_fails_naming_the_damage(tmp_path):
    import gzip

    answer, got, _ = _inflate(gzip.compress(os.urandom(1 << 20)), tmp_path, "gzip")
    assert isinstance(answer, PycfsError) and "not a tar archive" in str(answer)
    assert "is the blob damaged?" in str(answer) and got == b""


def test_inflate_for_a_reader_that_stops_fails_and_leaves_the_worker_serving(tmp_path):
    import gzip

    # more messages (64 files of 100 bytes each) than the socket's buffer holds
    tar = _tar(*[100] * 4000)
    answer, got, kinds = _inflate(gzip.compress(tar), tmp_path, "gzip", take=1)
    assert isinstance(answer, PycfsError) and "cannot inflate the layer" in str(answer)
    assert kinds.count(api.PIECE_FILE) == api.MAX_RUN_FDS and got == tar[: len(got)]


def test_requests_started_together_go_to_different_workers(tmp_path):
    """Two inflates asked at once run on the two workers: the second does not wait behind
    the first, whose pieces nobody reads until the second has answered (a worker serves
    one request at a time, so sharing one would never end)."""
    import gzip
    import socket

    tar = _tar(*[100] * 4000)  # more messages than the socket buffers: the stalled one waits
    (tmp_path / "blob").write_bytes(gzip.compress(tar))

    def pair():
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)

    async def main():
        (stalled_ours, stalled_theirs), (ours, theirs) = pair(), pair()
        got = bytearray()
        with Repository.init(tmp_path / "repo") as repo:
            async with open_pool(repo=repo, jobs=2) as pool, trio.open_nursery() as nursery:
                await pool.start()
                with open(tmp_path / "blob", "rb") as stalled, open(tmp_path / "blob", "rb") as f:
                    nursery.start_soon(pool.inflate, stalled.fileno(), stalled_theirs.detach(), "gzip", "sha256",
                                       "sha256")
                    with trio.fail_after(20):
                        async with trio.open_nursery() as reading:
                            reading.start_soon(trio.to_thread.run_sync, _receive_pieces, ours, got, [])
                            answer = await pool.inflate(f.fileno(), theirs.detach(), "gzip", "sha256", "sha256")
                    assert bytes(got) == tar and answer.tar_size == len(tar)
                    got.clear()
                    await trio.to_thread.run_sync(_receive_pieces, stalled_ours, got, [])
                    assert bytes(got) == tar

    _run(main)


_RECORDS = st.one_of(
    st.tuples(st.just(api.PIECE_INLINE), st.binary(min_size=1, max_size=api.MAX_INLINE_RECORD), st.just(0), st.just("")),
    st.tuples(st.just(api.PIECE_FILE), st.just(b""), st.integers(0, (1 << 64) - 1), st.just("")),
    st.tuples(st.just(api.PIECE_STORED), st.binary(min_size=32, max_size=32), st.integers(0, (1 << 64) - 1),
              st.sampled_from(sorted(api.HOW_CODES))))


@given(st.lists(_RECORDS, max_size=200))
def test_runs_of_piece_records_round_trip(records):
    """Packed into messages within the limits and parsed back: the same records in order,
    each file's fd with the message that names it."""
    fds = itertools.count(100)
    packed = [(api.piece_record(k, d, s, h), next(fds) if k == api.PIECE_FILE else None) for k, d, s, h in records]
    got, got_fds = [], []
    for message, message_fds in api.pack_runs(packed):
        assert 0 < len(message) <= api.MAX_RUN_MESSAGE and len(message_fds) <= api.MAX_RUN_FDS
        got += api.parse_run(message, len(message_fds), 32)
        got_fds += message_fds
    assert got == [(k, d, len(d) if k == api.PIECE_INLINE else s, h) for k, d, s, h in records]
    assert got_fds == [fd for _, fd in packed if fd is not None]


def test_runs_hold_at_most_max_run_fds_files():
    packed = [(api.piece_record(api.PIECE_FILE, size=i), i) for i in range(2 * api.MAX_RUN_FDS + 1)]
    assert [len(fds) for _, fds in api.pack_runs(packed)] == [api.MAX_RUN_FDS, api.MAX_RUN_FDS, 1]


@pytest.mark.parametrize("message, nfds", [
    (b"", 0), (b"i" + bytes(4), 0), (b"i\1\0\0\0", 0), (b"i\1\0\0\0x", 1),  # empty, no bytes, short, an fd too many
    (b"f" + bytes(8), 0), (b"f" + bytes(7), 1), (b"f" + bytes(8), 2),  # a file needs its one fd and 8 size bytes
    (b"s" + bytes(8) + b"c" + bytes(31), 0), (b"s" + bytes(8) + b"x" + bytes(32), 0),  # short id, unknown how
    (b"z" + bytes(8), 0), (b"i\1\0\0\0x" + b"q", 0),  # unknown kinds, also after a good record
    (b"i" + (api.MAX_RUN_MESSAGE - 4).to_bytes(4, "little") + bytes(api.MAX_RUN_MESSAGE - 4), 0)])  # too long
def test_malformed_run_messages_are_refused(message, nfds):
    with pytest.raises(ValueError):
        api.parse_run(message, nfds, 32)


def test_piece_records_refuse_what_no_message_holds():
    with pytest.raises(ValueError):
        api.piece_record(api.PIECE_INLINE, bytes(api.MAX_INLINE_RECORD + 1))
    with pytest.raises(ValueError):
        api.piece_record(api.PIECE_INLINE, b"")


def test_the_split_never_waits_for_a_writeback_that_is_behind(tmp_path, monkeypatch):
    """An inflating worker's writeback thread (`service._Writeback`) blocked in the device's
    throttling: the runs it has queued wait for it, a run beyond those is closed at once
    without its writeback (left to the layer's syncfs), and nothing is left open at the end."""
    import threading
    import time

    from pycfs.host.workers import service

    release, started = threading.Event(), []

    def start_writeback(fd: int) -> None:
        started.append(os.readlink(f"/proc/self/fd/{fd}"))
        release.wait(10)

    monkeypatch.setattr(service.syscalls, "start_writeback", start_writeback)
    paths = [tmp_path / f"f{i}" for i in range(service._WRITEBACK_RUNS + 2)]
    for p in paths:
        p.write_bytes(b"x")
    before = open_fd_count()
    writeback = service._Writeback()
    runs = [[(os.open(p, os.O_RDONLY), True)] for p in paths]
    taker = threading.Thread(target=lambda: [writeback.take(run) for run in runs[1:]])
    try:
        writeback.take(runs[0])
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:  # the thread holds the first run
            time.sleep(0.01)
        taker.start()  # _WRITEBACK_RUNS queued behind it, the last one closed by take
        taker.join(5)
        blocked = taker.is_alive()
        last_open = os.path.exists(f"/proc/self/fd/{runs[-1][0][0]}")
    finally:
        release.set()
        taker.join()
        writeback.close()
    assert not blocked and not last_open
    assert started == [str(p) for p in paths[:-1]]
    assert open_fd_count() == before
