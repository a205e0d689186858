"""Object workers started by fork (`pycfs.host.workers.fork`): real forked children serving a
real pool, real files; and a local ostree pull large enough to use them."""

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import trio
from fdcount import open_fd_count
from ostree_trees import commit, describe_dir, describe_image, have_ostree, init_repo, make_tree, ostree
from procs import SPY_ON_FORK, BUSY_SIZE, busy_file, children_die_with_host, run_with_stderr_on_terminal

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.ostree.pullcore import HERE_FILES, PullCore, PullOptions, prepare_pull
from pycfs.host.ostree.source import LocalRepo
from pycfs.host.repository import Repository
from pycfs.host.workers import batching, fork
from pycfs.host.workers.fork import fork_workers
from pycfs.host.workers.pool import EXIT_GRACE, Stored, WorkerPool, digest_files, open_pool


def _files(tmp_path, sizes):
    out = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        (tmp_path / f"f{i}").write_bytes(data)
        out.append((tmp_path / f"f{i}", data))
    return out


def test_forked_workers_store_keep_none_of_the_hosts_fds_and_exit_at_eof(tmp_path, idle_threads_allowed):
    files = _files(tmp_path, [0, 65, 4097, (1 << 20) + 3] * 4)
    before = open_fd_count()
    exited, pids, held = [], [], []
    marker = os.open(tmp_path / "f0", os.O_RDONLY)  # open in the host at the fork
    with Repository.init(tmp_path / "repo") as repo:
        try:
            forked = fork_workers(str(repo.path), 2)
        finally:
            os.close(marker)
        assert len(forked) == 2

        async def main():
            fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p, _ in files]
            try:
                async with open_pool(repo=repo, jobs=2, forked=forked) as pool:
                    results = await pool.store(fds, [len(d) for _, d in files])
                    pids.extend(w.proc.pid for w in pool._workers)
                    held.extend(os.readlink(f"/proc/{pid}/fd/{fd}") for pid in pids for fd in os.listdir(f"/proc/{pid}/fd"))
                    pool.close_input()
                    with trio.fail_after(EXIT_GRACE - 1):
                        for w in pool._workers:
                            exited.append(await w.proc.wait())
            finally:
                for fd in fds:
                    os.close(fd)
            return results

        results = trio.run(main)
        assert [r.object_id for r in results] == [digest_bytes(d) for _, d in files]
        assert all(isinstance(r, Stored) for r in results)
        for (_, data), r in zip(files, results):
            assert repo.read_object(r.object_id) == data
    assert pids == [f.proc.pid for f in forked] and exited == [0, 0]
    assert str(tmp_path / "f0") not in held and held
    assert open_fd_count() == before


@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_forked_digest_only_workers_hash_with_their_algorithm(tmp_path, alg, idle_threads_allowed):
    """`pycfs measure`'s workers: forked with no repository, hashing with the alg asked for."""
    files = _files(tmp_path, [0, 4097, (1 << 20) + 3] * 3)
    forked = fork_workers(None, 2, alg)
    assert len(forked) == 2
    got = trio.run(lambda: digest_files([str(p) for p, _ in files], alg, forked=forked))
    assert got == [digest_bytes(d, alg) for _, d in files]
    for f in forked:  # reaped by the pool as it closed
        with pytest.raises(ProcessLookupError):
            os.kill(f.proc.pid, 0)


async def _store_one(repo, forked, path):
    """Store one 100-byte file through a pool that takes the forked workers."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with open_pool(repo=repo, jobs=1, forked=forked) as pool:
            await pool.store([fd], [100])
    finally:
        os.close(fd)


def test_a_forked_worker_that_cannot_start_quotes_its_output(tmp_path, idle_threads_allowed):
    files = _files(tmp_path, [100])
    with Repository.init(tmp_path / "repo") as repo:
        forked = fork_workers(str(repo.path), 1)
        (tmp_path / "repo" / "meta.json").write_text("{}")  # the worker's own open fails

        with pytest.raises(PycfsError, match=r"failed: .*exit status 2; its last output: pycfs-worker: "):
            trio.run(_store_one, repo, forked, files[0][0])


def test_a_forked_worker_reaped_before_the_pool_took_it_fails_the_pool_naming_it(tmp_path, idle_threads_allowed):
    """A worker found gone (and so reaped) while it was written its early requests, before
    the pool existed: the pool's call fails naming it and its exit status (the pool's pidfd
    of a reaped pid once raised a bare "No such process")."""
    files = _files(tmp_path, [100])
    with Repository.init(tmp_path / "repo") as repo:
        forked = fork_workers(str(repo.path), 1)
        os.kill(forked[0].proc.pid, 9)
        os.waitid(os.P_PID, forked[0].proc.pid, os.WEXITED | os.WNOWAIT)
        assert forked[0].proc.poll() == -9  # reaped

        with pytest.raises(PycfsError, match=rf"object worker \(pid {forked[0].proc.pid}\) failed: .*exit status -9"):
            trio.run(_store_one, repo, forked, files[0][0])


def test_a_failed_fork_leaves_no_worker_and_no_fd(tmp_path, monkeypatch, idle_threads_allowed):
    """The second fork fails: the first worker is killed and reaped, its socket and output
    closed, and the pool will spawn its own."""
    real_fork, forked = os.fork, []

    def fork():
        if forked:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    before = open_fd_count()
    with Repository.init(tmp_path / "repo") as repo:
        monkeypatch.setattr(os, "fork", fork)
        assert fork_workers(str(repo.path), 2) == []
    assert len(forked) == 1 and not os.path.exists(f"/proc/{forked[0]}")
    assert open_fd_count() == before


def test_no_fork_off_the_main_thread(tmp_path):
    """PR_SET_PDEATHSIG follows the thread that forked: elsewhere the pool spawns its workers."""
    got = []
    with Repository.init(tmp_path / "repo") as repo:
        thread = threading.Thread(target=lambda: got.append(fork_workers(str(repo.path), 2)))
        thread.start()
        thread.join()
    assert got == [[]]


def test_no_fork_while_another_thread_runs(tmp_path):
    """A fork copies only the calling thread: with another one running, none is forked (the
    pool spawns its workers)."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with Repository.init(tmp_path / "repo") as repo:
            assert fork_workers(str(repo.path), 2) == []
    finally:
        stop.set()
        thread.join()


def test_forked_workers_run_in_the_root_directory(tmp_path, monkeypatch, idle_threads_allowed):
    """As a spawned worker: the caller's working directory is not kept busy."""
    monkeypatch.chdir(tmp_path)
    forked = fork_workers(None, 1)
    assert len(forked) == 1
    try:
        deadline = time.monotonic() + 5  # (the child moves there right after the fork)
        while (cwd := os.readlink(f"/proc/{forked[0].proc.pid}/cwd")) != "/" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cwd == "/"
    finally:
        forked[0].sock.close()  # EOF: the worker exits
        forked[0].output.close()
        os.waitpid(forked[0].proc.pid, 0)


def test_forked_workers_die_with_the_host(tmp_path):
    with Repository.init(tmp_path / "repo"):
        pass
    # busy in a request when the host is killed (an idle worker would exit at EOF anyway)
    assert len(children_die_with_host(
        "import os, trio\n"
        "from pycfs.host.repository import Repository\n"
        "from pycfs.host.workers.fork import fork_workers\n"
        "from pycfs.host.workers.pool import open_pool\n"
        f"workers = fork_workers({str(tmp_path / 'repo')!r}, 2)\n"
        "async def main():\n"
        f"    fd = os.open({str(busy_file(tmp_path))!r}, os.O_RDONLY)\n"
        f"    with Repository.open({str(tmp_path / 'repo')!r}) as repo:\n"
        "        async with open_pool(repo=repo, jobs=2, forked=workers) as pool:\n"
        "            async with trio.open_nursery() as nursery:\n"
        "                for _ in workers:\n"
        f"                    nursery.start_soon(pool.digest, [fd], [{BUSY_SIZE}])\n"
        "                await trio.sleep(0.5)\n"
        "                print(' '.join(str(w.proc.pid) for w in workers), flush=True)\n"
        "                await trio.sleep(60)\n"
        "trio.run(main)\n")) == 2


@pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")
def test_local_pull_with_more_files_than_stored_here_forks_its_workers(tmp_path, idle_threads_allowed):
    """A commit with more files than the pull stores in process, walked here (an archive
    repository, --no-delta): the files go to forked workers, and the image has the tree of
    `ostree checkout`."""
    tree = make_tree(tmp_path / "tree", xattrs=False, setid=False)
    for i in range(HERE_FILES + 20):
        (tree / "many" / f"n{i}").parent.mkdir(exist_ok=True)
        (tree / "many" / f"n{i}").write_bytes(b"content %d " % i * 20)
    repo_path = init_repo(tmp_path / "ostree", "archive")
    checksum = commit(repo_path, tree, "main")
    checkout = tmp_path / "checkout"
    ostree("checkout", f"--repo={repo_path}", "-U", "main", checkout)
    with Repository.init(tmp_path / "cfs") as repo:
        source = LocalRepo(str(repo_path))
        try:
            core = prepare_pull(repo, source, "main", PullOptions(deltas=False))
            assert isinstance(core, PullCore) and core.walked and len(core.files) > HERE_FILES
            files = len(core.files)
            forked = core.fork_workers()
            assert len(forked) >= 1
            # each worker was sent one request of its share of the first files (fewer than
            # two requests hold: all of them), the inline ones met on the way taken here
            assert len(core.early) == len(forked) and core.files == []
            assert sum(len(batch) for _, batch in core.early) + core.stats.inlined == files
            assert max(len(batch) for _, batch in core.early) == -(-files // len(forked))
            result = core.store_forked(forked)
        finally:
            source.close()
        assert result.commit.hex() == checksum and result.stats.files_fetched == len(core.objects.headers) + result.stats.inlined
        image = describe_image(repo, result.image_id)
    assert {p: (t, m, c) for p, (t, m, _u, _g, _x, c) in image.items()} == \
        {p: (t, m, c) for p, (t, m, _u, _g, _x, c) in describe_dir(checkout).items()}
    for f in forked:
        assert f.proc.poll() == 0


@pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")
def test_pull_local_on_a_terminal_forks_its_workers_before_the_progress_shows(tmp_path):
    """`pycfs ostree pull-local` with its rich progress on a terminal: the workers are forked
    while the main thread is the only one (rich's refresh thread starts after), and the
    progress is shown there, on stderr (stdout is the result's)."""
    tree = tmp_path / "tree"
    for i in range(HERE_FILES + 20):
        (tree / "many").mkdir(parents=True, exist_ok=True)
        (tree / "many" / f"n{i}").write_bytes(b"content %d " % i * 20)
    repo_path = init_repo(tmp_path / "ostree", "archive")
    checksum = commit(repo_path, tree, "main")
    cfs = tmp_path / "cfs"
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", cfs, "init"], check=True, capture_output=True)
    record = tmp_path / "fork.json"
    rc, out, shown = run_with_stderr_on_terminal([sys.executable, "-c", SPY_ON_FORK, "pycfs.host.workers.fork", record, "--repo", cfs, "ostree",
                                                  "pull-local", "--no-delta", "--jobs", "2", repo_path, "main"])
    assert rc == 0, shown.decode(errors="replace")
    assert out.decode().startswith(f"commit {checksum}\n")
    assert json.loads(record.read_text()) == {"threads": ["_MainThread"], "forked": 2}
    assert b"\x1b[?25l" in shown  # rich hid the cursor for its live display


_MEASURE_SPY = """
import json, sys
import pycfs.host.workers.fork as fork
from pycfs.tools.cli import main

real = fork.fork_digest_workers

def spy(*args, **kwargs):
    loaded = sorted(m for m in ("trio", "pycfs.host.repository", "pycfs.host.workers.pool") if m in sys.modules)
    forked = real(*args, **kwargs)
    with open(sys.argv[1], "w") as f:
        json.dump({"loaded": loaded, "early": [len(w.early) for w in forked]}, f)
    return forked

fork.fork_digest_workers = spy
sys.exit(main(sys.argv[2:]))
"""


def test_measure_forks_its_workers_and_sends_their_first_files_before_importing_trio(tmp_path):
    """`pycfs measure` of more than it hashes in process: both workers are given their first
    files before trio, the pool or the repository code is imported (they hash while the host
    imports and starts the pool), and the output still equals one digest per file, in order."""
    files = _files(tmp_path, [(3 << 20) + 5] * 8 + [0, 4097] * 40)
    listing = tmp_path / "list"
    listing.write_text("".join(f"{p}\n" for p, _ in files))
    record = tmp_path / "spy.json"
    done = subprocess.run([sys.executable, "-c", _MEASURE_SPY, record, "measure", "-j", "2", "--files-from", listing],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(f"{digest_bytes(d).hex()} {p}\n" for p, d in files)
    spied = json.loads(record.read_text())
    assert spied["loaded"] == []
    assert len(spied["early"]) == 2 and all(spied["early"])


def test_measure_of_many_small_files_does_not_hang(tmp_path):
    """20,000 small files: more answers than a socket holds come back before the pool reads
    any. When the workers were sent requests until each had 128 MiB (hundreds of requests
    of small files), a worker blocked writing its answers while the host blocked writing it
    the next request: the command hung for good (the bench's 200,000-file image)."""
    files = _files(tmp_path, [2000 + i % 7 for i in range(20_000)])
    listing = tmp_path / "list"
    listing.write_text("".join(f"{p}\n" for p, _ in files))
    done = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "measure", "-j", "2", "--files-from", listing],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(files)
    assert lines[0] == f"{digest_bytes(files[0][1]).hex()} {files[0][0]}"
    assert lines[-1] == f"{digest_bytes(files[-1][1]).hex()} {files[-1][0]}"


def test_early_requests_are_answered_once_and_the_rest_balanced(tmp_path, monkeypatch, idle_threads_allowed):
    """Requests sent before the pool existed (`Forked.early`) are not sent again: the pool
    hands their answers to digest_files' calls for the same batches and sends only the rest."""
    monkeypatch.setattr(batching, "MEASURE_BATCH", 4)
    monkeypatch.setattr(batching, "MEASURE_BATCH_MIN", 4)
    files = _files(tmp_path, [5000] * 60)
    names = [str(p) for p, _ in files]
    forked = fork.fork_digest_workers(names, 2)
    early = [len(w.early) for w in forked]
    assert early == [1, 1]  # one request each (see fork_digest_workers)
    sent = []
    real_send = WorkerPool._send

    async def spy(self, worker, method, fds, params, sent_cb=None):
        sent.append(params["paths"][0])
        return await real_send(self, worker, method, fds, params, sent_cb)

    monkeypatch.setattr(WorkerPool, "_send", spy)
    got = trio.run(lambda: digest_files(names, forked=forked))
    assert got == [digest_bytes(d) for _, d in files]
    firsts = [names[i] for i in range(0, 60, 4)]
    assert sorted(sent) == sorted(firsts[sum(early):])  # each batch once: the early ones not again


_PULL_SPY = """
import json, sys
from pycfs.host.ostree.pullcore import PullCore
from pycfs.tools.cli import main

real = PullCore.fork_workers

def spy(self):
    forked = real(self)
    with open(sys.argv[1], "w") as f:
        json.dump({"trio": "trio" in sys.modules, "early": [len(w.early) for w in forked],
                   "files": [len(batch) for _, batch in self.early]}, f)
    return forked

PullCore.fork_workers = spy
# every syncfs: the thread it ran on, and whether the image was written by then
import threading
from pycfs.host import syscalls
from pycfs.host.ostree import image
syncs, written = [], []
real_syncfs, real_image_bytes = syscalls.syncfs, image.image_bytes
syscalls.syncfs = lambda fd: syncs.append([threading.current_thread().name, bool(written)]) or real_syncfs(fd)
image.image_bytes = lambda *a, **k: written.append(1) or real_image_bytes(*a, **k)
rc = main(sys.argv[2:])
with open(sys.argv[1]) as f:
    record = json.load(f)
record["trio at the end"] = "trio" in sys.modules
record["syncs"] = sorted(syncs)
with open(sys.argv[1], "w") as f:
    json.dump(record, f)
sys.exit(rc)
"""


@pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")
def test_pull_local_sends_its_workers_their_first_files_and_never_imports_trio(tmp_path):
    """`pycfs ostree pull-local` of more files than it stores in process: the forked workers
    are each written one store request of the first files at once, then the rest, all
    without an event loop (trio is never imported); what they stored is synced on a thread
    while the image is built, and the pull's image has the tree of `ostree checkout`."""
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(3 * HERE_FILES):  # more than the two early requests hold
        (tree / "many" / f"n{i}").write_bytes(b"content %d " % i * 20)
    repo_path = init_repo(tmp_path / "ostree", "archive")
    checksum = commit(repo_path, tree, "main")
    checkout = tmp_path / "checkout"
    ostree("checkout", f"--repo={repo_path}", "-U", "main", checkout)
    cfs = tmp_path / "cfs"
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", cfs, "init"], check=True, capture_output=True)
    record = tmp_path / "spy.json"
    done = subprocess.run([sys.executable, "-c", _PULL_SPY, record, "--repo", cfs, "ostree", "pull-local", "--no-delta",
                           "--jobs", "2", "--json", repo_path, "main"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["commit"] == checksum and result["files_fetched"] == 3 * HERE_FILES
    spied = json.loads(record.read_text())
    syncs = spied.pop("syncs")
    assert spied == {"trio": False, "early": [1, 1], "files": [256, 256], "trio at the end": False}
    # one sync on a thread of its own, started before the image (when it runs is the
    # scheduler's), and the one that makes the pull durable, after the image was written
    assert sorted(name for name, _ in syncs) == ["MainThread", "pycfs-sync-behind"]
    assert [image_written for name, image_written in syncs if name == "MainThread"] == [True]
    with Repository.open(cfs) as repo:
        image = describe_image(repo, bytes.fromhex(result["image"]))
    assert {p: (t, m, c) for p, (t, m, _u, _g, _x, c) in image.items()} == \
        {p: (t, m, c) for p, (t, m, _u, _g, _x, c) in describe_dir(checkout).items()}


_FAIL_AFTER_FORK = """
import json, os, sys
sys.modules["pycfs.host.workers.blocking"] = None  # its import fails, once the workers are forked
from pycfs.host.ostree.pullcore import PullCore
from pycfs.tools.cli import main

real = PullCore.fork_workers
pids = []

def spy(self):
    forked = real(self)
    pids.extend(w.proc.pid for w in forked)
    return forked

def reaped(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False

PullCore.fork_workers = spy
try:
    main(sys.argv[1:])
finally:
    print(json.dumps([reaped(p) for p in pids]))
"""


@pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")
def test_workers_forked_before_a_failure_ahead_of_the_pool_are_reaped(tmp_path):
    """The pull fails between forking its workers (each storing its first files) and what
    would take them (an import failing, or Ctrl-C meanwhile): the workers are killed and
    reaped there, not left for the host's exit."""
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(2 * HERE_FILES):
        (tree / "many" / f"n{i}").write_bytes(b"content %d " % i * 20)
    repo_path = init_repo(tmp_path / "ostree", "archive")
    commit(repo_path, tree, "main")
    cfs = tmp_path / "cfs"
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", cfs, "init"], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", _FAIL_AFTER_FORK, "--repo", cfs, "ostree", "pull-local", "--no-delta",
                           "--jobs", "2", repo_path, "main"], capture_output=True, text=True, timeout=120)
    assert "import of pycfs.host.workers.blocking halted" in done.stderr
    assert json.loads(done.stdout) == [True, True], done.stderr


def test_an_early_request_that_could_not_go_leaves_the_worker_alive(idle_threads_allowed):
    """A head start's send the kernel refuses before any byte went (the user's fds in
    flight at its limit) is left for the pool to send: the worker is not killed."""
    worker = fork_workers(None, 1)[0]
    real_sock = worker.sock

    class Refusing:
        def sendmsg(self, *args):
            raise OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))

        send = sendall = sendmsg

    try:
        worker.sock = Refusing()
        assert not fork.send_early(worker, 1, "digest_paths", {"paths": []}, [0])
        time.sleep(0.2)  # a SIGKILL would have ended it by now
        assert worker.early == [] and worker.proc.poll() is None
    finally:
        worker.sock = real_sock
        fork.discard([worker])


def test_discarding_forked_workers_twice_does_nothing_the_second_time() -> None:
    """A failed ostree pull closes its workers through a blocking store and then discards
    them: the second discard waited for the reaped pids again ("No child processes")."""
    import socket

    from pycfs.host.childoutput import ChildOutput

    workers = []
    for _ in range(2):  # children that wait to be killed, as a worker waits for requests
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            os.read(theirs.fileno(), 1)
            os._exit(0)
        theirs.close()
        workers.append(fork.Forked(fork.ForkedProcess(pid), ours, ChildOutput("test-worker")))
    fork.discard(workers)
    fork.discard(workers)
    assert all(w.proc.returncode is not None and w.sock.fileno() == -1 and w.output.fd is None for w in workers)
