"""kill -9 at random points of pulls (of the pull itself, the helper, an object worker and
`podman unshare`): the repository stays consistent (fsck), no process and no temporary
file is left, no pull hangs, and a re-run completes. PYCFS_STRESS_KILLS sets how many kills
to try (tools/stress runs many more than CI's default)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from imagebuild import Dir, File, ImageSpec
from procs import _zombie, descends_from, image_and_fresh_repo, pids_of, rerun_completes


KILLS = int(os.environ.get("PYCFS_STRESS_KILLS", "20"))
PULL_BOUND = 60.0  # seconds for one killed pull to end (they take ~2 s)
# What to kill: (name, command-line marker, program-name filter); None marker: the pull.
# The object workers are forked by the pull: their command line is the pull's own.
TARGETS = [
    ("pull", None, None),
    ("helper", b"pycfs.helper", b"python"),
    ("worker", b"pycfs.tools.cli", None),
    ("podman unshare", b"pycfs.helper", b"podman"),
]


def image() -> ImageSpec:
    """Files the user may read and files only the helper opens, enough to take a second."""
    layer = [Dir("srv"), Dir("home"), Dir("home/user", mode=0o700, uid=1000, gid=1000)]
    layer += [File(f"srv/f{i:04d}", size=8192 + i, seed=i) for i in range(800)]
    layer += [File(f"home/user/s{i:04d}", size=4096 + i, seed=10_000 + i, mode=0o600, uid=1000, gid=1000)
              for i in range(800)]
    return ImageSpec([layer])


def kill_once(user, repo, ref: str, target, rng: random.Random) -> tuple[bool, int, str]:
    """Start a pull, kill its `target` after a random delay; (whether a kill was done, the
    pull's exit status, its stderr). Asserts the pull ends within PULL_BOUND and leaves no
    process behind."""
    name, marker, program = target
    argv = [user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", f"containers-storage:{ref}"]
    proc = subprocess.Popen(list(map(str, argv)), cwd=user.home, env=user.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, user=user.uid, group=user.gid, extra_groups=[])
    killed = False
    family: set[int] = set()
    try:
        # A random point: for the pull, a random time into it; for a child, a random time
        # after it appears (the helper starts only when the first denied file comes).
        deadline = time.monotonic() + (rng.uniform(0.05, 2.0) if marker is None else PULL_BOUND)
        victims: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            family |= {p for p in pids_of(user.uid, b"") if descends_from(p, proc.pid)}
            if marker is not None:
                victims = [p for p in pids_of(user.uid, marker, program) if descends_from(p, proc.pid)]
                if victims:
                    time.sleep(rng.uniform(0, 0.4))
                    break
            time.sleep(0.005)
        if proc.poll() is None:
            victim = proc.pid if marker is None else rng.choice(victims) if victims else None
            if victim is not None:
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed = True
                except ProcessLookupError:
                    pass  # it finished its work first (workers exit before the image build): no kill

        try:
            _, err = proc.communicate(timeout=PULL_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the pull hung after {name} was killed") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while left := [p for p in family if os.path.exists(f"/proc/{p}") and not _zombie(p)]:
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind after killing {name}: {left}")
        time.sleep(0.02)
    return killed, proc.returncode, err.decode()


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_kill_nine_at_random_points(podman_user, shared_tmp_path, target):
    user = podman_user
    ref = "localhost/pycfs-kill-random:latest"
    built, repo = image_and_fresh_repo(user, image(), shared_tmp_path / "layout", ref, "kill-random-")
    rng = random.Random(int(os.environ.get("PYCFS_STRESS_SEED", "10")) + TARGETS.index(target))
    wanted = -(-KILLS // len(TARGETS))  # this kind's share
    tried = survived = attempts = 0
    while tried < wanted:
        attempts += 1
        assert attempts < 4 * wanted, f"could place only {tried} of {wanted} kills of the {target[0]}"
        killed, status, err = kill_once(user, repo, ref, target, rng)
        if status == 0:
            # It finished first: an empty repository again, so the next pull has work to do.
            subprocess.run(["rm", "-rf", repo], check=True)
            user.pycfs("--repo", repo, "init")
        if not killed:
            continue
        tried += 1
        if target[0] != "pull":  # a pull killed itself prints nothing; its children must say why
            lines = err.strip().splitlines()
            assert "Traceback" not in err and (status == 0 or (status == 1 and lines[-1].startswith("pycfs: error:"))), err
        fsck = user.pycfs("--repo", repo, "fsck", "--json", check=False)
        assert fsck.returncode == 0 and json.loads(fsck.stdout)["ok"] is True, fsck.stdout
        temps = [p for p in repo.rglob("*") if ".tmp" in p.name]
        assert not temps, temps
        survived += 1
    print(f"kills of the {target[0]} survived/tried: {survived}/{tried}")
    assert rerun_completes(user, repo, ref, built.diff_ids[0])["layers"] == 1
    assert survived == tried
