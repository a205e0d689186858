"""The README's main-job command, run as CI runs it (root): the demo imports its image as an
unprivileged user, and that user can go on with pycfs and podman from a login shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_USER = "pycfs-demo-t"  # not the README's user: the test leaves a real demo alone


@pytest.fixture
def demo_env():
    if os.geteuid() != 0:
        pytest.skip("needs root: the demo creates its user")
    if shutil.which("podman") is None:
        pytest.skip("podman missing (run tools/setup.sh)")
    env = dict(os.environ, PYCFS_DEMO_USER=DEMO_USER, PYCFS_DEMO_XFS="0")
    yield env
    # Its podman pause process would outlive the test.
    subprocess.run(["pkill", "-u", DEMO_USER], capture_output=True)


def _demo(env: dict[str, str]) -> str:
    p = subprocess.run(["bash", str(REPO_ROOT / "tools/demo.sh")], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_demo_then_login_shell(demo_env):
    out = _demo(demo_env)
    assert "containers-storage:localhost/pycfs-demo:latest" in out
    assert "EROFS v1" in out

    login = subprocess.run(["su", "-", DEMO_USER, "-c", "command -v pycfs && pycfs oci images --json"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert login.returncode == 0, login.stderr
    path, _, doc = login.stdout.partition("\n")
    assert path.startswith("/opt/pycfs-demo/venv/bin/pycfs")
    (image,) = json.loads(doc)["images"]
    assert image["tag"] == "containers-storage:localhost/pycfs-demo:latest"
    assert image["images"]["composefs.image.v1"]

    podman = subprocess.run(["su", "-", DEMO_USER, "-c", "podman images --format '{{.Repository}}'"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "localhost/pycfs-demo" in podman.stdout, podman.stderr

    # Run again: the image the new import untagged is gone, not left as <none>.
    def images() -> list[str]:
        listed = subprocess.run(["su", "-", DEMO_USER, "-c", "podman images --all --format '{{.ID}}'"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert listed.returncode == 0, listed.stderr
        return listed.stdout.split()

    first = images()
    assert "EROFS v1" in _demo(demo_env)
    second = images()
    assert len(second) == len(first) and set(second) != set(first), (first, second)
