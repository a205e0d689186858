"""Finding a test user's pycfs child processes (the helper, object workers) to stop or kill."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def pids_of(uid: int, marker: bytes, program: bytes | None = None) -> list[int]:
    """Processes of `uid` whose command line contains `marker` (e.g. b"pycfs.helper") and,
    with `program`, whose program name (argv[0]'s last component) contains it (b"python":
    the helper itself, not the `podman unshare` that runs it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if marker in cmdline and (program is None or program in cmdline.split(b"\0")[0].rsplit(b"/", 1)[-1]):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is `pid`'s parent, grandparent, ... (other test sessions run pulls
    as the same user at the same time: only our pull's children are ours to act on)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


BUSY_SIZE = 1 << 37  # a sparse file that takes a worker about a minute to hash


def busy_file(directory: Path) -> Path:
    """A sparse file of BUSY_SIZE bytes: hashing it keeps a child busy long after its host
    is killed, unless the child dies with the host."""
    path = directory / "busy"
    with open(path, "wb") as f:
        f.truncate(BUSY_SIZE)
    return path


# `python -c SPY_ON_FORK MODULE RECORD ARGS...`: `pycfs ARGS...`, where MODULE's fork_workers
# writes to RECORD the threads that ran when it was called and how many workers it forked.
SPY_ON_FORK = """
import importlib, json, sys, threading
from pycfs.tools.cli import main

module = importlib.import_module(sys.argv[1])
real = module.fork_workers

def spy(*args, **kwargs):
    threads = [type(t).__name__ for t in threading.enumerate()]
    forked = real(*args, **kwargs)
    with open(sys.argv[2], "w") as f:
        json.dump({"threads": threads, "forked": len(forked)}, f)
    return forked

module.fork_workers = spy
sys.exit(main(sys.argv[3:]))
"""


def run_with_stderr_on_terminal(argv: list, timeout: float = 60, cwd: str = "/") -> tuple[int, bytes, bytes]:
    """Run argv with stderr on a new pseudo-terminal and stdout on a pipe (a user piping the
    result); (exit status, stdout, what the terminal was shown)."""
    import pty
    import select

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, cwd=cwd)
        os.close(slave)
        slave = -1
        shown = b""
        deadline = time.monotonic() + timeout
        while True:  # drain the terminal until its last writer closes it
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"{argv} did not finish within {timeout} s"
            try:
                piece = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not piece:
                break
            shown += piece
        out, _ = proc.communicate(timeout=timeout)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return proc.returncode, out, shown


def children_die_with_host(script: str) -> list[int]:
    """Run the Python `script` (it prints the pids of the children it started on one line,
    then waits), kill it outright, and return those pids once every one is gone too
    (PR_SET_PDEATHSIG); AssertionError when one outlives it by 5 s."""
    import sys

    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert host.stdout is not None
        pids = [int(p) for p in host.stdout.readline().split()]
        assert pids and not any(_zombie(pid) for pid in pids)
        host.kill()
        host.wait()
        deadline = time.monotonic() + 5
        while not all(_zombie(pid) for pid in pids):
            assert time.monotonic() < deadline, "children outlived their host"
            time.sleep(0.01)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    return pids


def opened_beneath(pid: int, part: str) -> bool:
    """Whether process `pid` has an fd open on a path containing `part` (e.g. "/diff": the
    helper is serving open_files, in the middle of an import)."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if part in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    return True
    except OSError:
        pass
    return False


def act_mid_pull(user, repo, ref: str, marker: bytes, act, *, program: bytes | None = None, ready=None,
                 timeout: float = 120) -> tuple[int, int, str]:
    """Run `pycfs oci pull containers-storage:REF` as `user`; once a new process of its whose
    command line holds `marker` (and whose program name holds `program`) appears and
    `ready(pid)` says it is where it should be, call `act(pid, the pull's Popen)`. Returns (that pid, the
    pull's exit status, its stderr); the pull must end within `timeout` seconds, and every
    process it had started (podman, the helper, workers) within 10 s after it."""
    argv = [user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", f"containers-storage:{ref}"]
    proc = subprocess.Popen(list(map(str, argv)), cwd=user.home, env=user.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, user=user.uid, group=user.gid, extra_groups=[])
    try:
        deadline = time.monotonic() + 60
        while not (started := [p for p in pids_of(user.uid, marker, program) if descends_from(p, proc.pid)]):
            assert proc.poll() is None, (f"the pull ended before a {marker.decode()} process started",
                                         proc.communicate())
            assert time.monotonic() < deadline, f"no {marker.decode()} process started"
            time.sleep(0.002)
        pid = min(started)
        while ready is not None and not ready(pid):
            assert proc.poll() is None, ("the pull ended before the process was ready", proc.communicate())
            assert time.monotonic() < deadline, "the process never got ready"
            time.sleep(0.001)
        family = [p for p in pids_of(user.uid, b"") if descends_from(p, proc.pid)]  # podman, helper, workers
        act(pid, proc)
        _, err = proc.communicate(timeout=timeout)
        # None of them outlives the pull for long (podman unshare may tidy up for a moment).
        deadline = time.monotonic() + 10
        while left := [p for p in family if Path(f"/proc/{p}").exists() and not _zombie(p)]:
            assert time.monotonic() < deadline, f"left behind: {left}"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return pid, proc.returncode, err.decode()


def kill_child_mid_pull(user, repo, ref: str, marker: bytes, program: bytes | None = None,
                        timeout: float = 120, ready=None) -> tuple[int, int, str]:
    """`act_mid_pull` that freezes the process (the pull then surely waits on it, no race)
    and kills it."""
    def kill(pid: int, pull: subprocess.Popen) -> None:
        os.kill(pid, signal.SIGSTOP)
        assert pull.poll() is None, f"the pull finished before {marker.decode()} could be stopped"
        os.kill(pid, signal.SIGKILL)

    return act_mid_pull(user, repo, ref, marker, kill, program=program, ready=ready, timeout=timeout)


def image_and_fresh_repo(user, spec, layout_dir: Path, ref: str, prefix: str):
    """Build `spec`, load it into `user`'s storage as `ref`, and init an empty repository
    (on the user's scratch); returns (the built image, the repository path)."""
    import imagebuild

    built = imagebuild.build_layout(spec, layout_dir)
    imagebuild.load_into_storage(user, built.path, ref)
    repo = user.tmpdir(prefix) / "repo"
    user.pycfs("--repo", repo, "init")
    return built, repo


def rerun_completes(user, repo, ref: str, diff_id: str) -> dict:
    """A pull after whatever happened before completes: fsck clean before and after, the
    layer rebuilt to its diff_id. Returns the pull's statistics."""
    import hashlib
    import json

    assert json.loads(user.pycfs("--repo", repo, "fsck", "--json").stdout)["ok"] is True
    result = json.loads(user.pycfs("--repo", repo, "oci", "pull", "--json", f"containers-storage:{ref}").stdout)
    out = user.pycfs("--repo", repo, "cat", f"oci-layer-{diff_id}")
    assert "sha256:" + hashlib.sha256(out.stdout).hexdigest() == diff_id
    assert json.loads(user.pycfs("--repo", repo, "fsck", "--json").stdout)["ok"] is True
    return result["stats"]
