"""Finding a test user's pycfs child processes (the helper, object workers) to stop or kill."""

import os
import signal
import subprocess
import time
from pathlib import Path


def pids_of(uid: int, marker: bytes) -> list[int]:
    """Processes of `uid` whose command line contains `marker` (e.g. b"pycfs.helper")."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def kill_child_mid_pull(user, repo, ref: str, marker: bytes) -> tuple[int, int, str]:
    """Run `pycfs oci pull containers-storage:REF` as `user`; once a new process of its whose
    command line holds `marker` appears, freeze it (the pull then surely waits on it, no
    race) and kill it. Returns (that process's pid, the pull's exit status, its stderr)."""
    before = set(pids_of(user.uid, marker))
    argv = [user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", f"containers-storage:{ref}"]
    proc = subprocess.Popen(list(map(str, argv)), cwd=user.home, env=user.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, user=user.uid, group=user.gid, extra_groups=[])
    try:
        deadline = time.monotonic() + 60
        while not (started := set(pids_of(user.uid, marker)) - before):
            assert proc.poll() is None, (f"the pull ended before a {marker.decode()} process started",
                                         proc.communicate())
            assert time.monotonic() < deadline, f"no {marker.decode()} process started"
            time.sleep(0.002)
        victim = min(started)
        os.kill(victim, signal.SIGSTOP)
        assert proc.poll() is None, f"the pull finished before {marker.decode()} could be stopped"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return victim, proc.returncode, err.decode()
