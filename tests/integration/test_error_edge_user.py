"""The error edge as an unprivileged user meets it: repositories the user cannot read or
write, or that sit on a read-only mount. Every command ends in one line (or succeeds where
reading is enough), never a traceback. Root ignores permissions, so these run as the test user."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import imagebuild

pytestmark = pytest.mark.integration

TAG = "img"


@pytest.fixture(scope="module")
def pulled(podman_user, tmp_path_factory) -> tuple[Path, imagebuild.BuiltImage]:
    """A repository owned by the test user with a small image pulled from an OCI layout."""
    spec = imagebuild.ImageSpec([[imagebuild.Dir("usr"), imagebuild.File("usr/big", data=os.urandom(200_000)),
                                  imagebuild.File("usr/small", data=b"hi\n")]])
    top = podman_user.tmpdir("edge-")
    built = imagebuild.build_layout(spec, top / "layout")
    subprocess.run(["chown", "-R", f"{podman_user.uid}:{podman_user.gid}", top], check=True)
    repo = top / "repo"
    podman_user.pycfs("--repo", repo, "init")
    podman_user.pycfs("--repo", repo, "oci", "pull", "--progress=none", built.oci_ref, TAG)
    return repo, built


def _commands(built) -> list[list[str]]:
    return [["init"], ["oci", "images"], ["oci", "inspect", TAG], ["oci", "compute-id", TAG], ["fsck"],
            ["gc", "--dry-run"], ["gc"], ["fsck", "--repair"], ["oci", "create-image", TAG],
            ["oci", "pull", "--progress=none", built.oci_ref, TAG], ["oci", "pull", "--progress=none", built.oci_ref,
                                                                      "other"]]


def _assert_edge(p: subprocess.CompletedProcess, what: str) -> str:
    err = p.stderr.decode()
    assert p.returncode in (0, 1), (what, p.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, (what, err)
    errors = [line for line in err.splitlines() if line.startswith("pycfs: error:")]
    if p.returncode == 1:
        assert len(errors) == 1, (what, err)
    return errors[0] if errors else ""


@pytest.mark.parametrize("mode", [0o000, 0o500])
def test_unreadable_or_unwritable_repository(podman_user, pulled, mode):
    repo, built = pulled
    os.chmod(repo, mode)
    try:
        for argv in _commands(built):
            p = podman_user.pycfs("--repo", repo, *argv, check=False)
            line = _assert_edge(p, f"mode {mode:o}: {argv}")
            if mode == 0o000:
                assert p.returncode == 1 and str(repo) in line and "permission denied" in line, (argv, line)
            elif argv[:2] == ["oci", "pull"] or argv in (["gc"], ["fsck", "--repair"]):
                assert p.returncode == 1 and "read-only" in line, (argv, line)
            else:  # reading is enough (create-image finds its image built already)
                assert p.returncode == 0, (argv, p.stderr)
    finally:
        os.chmod(repo, 0o700)


def test_read_only_mount(podman_user, pulled):
    repo, built = pulled
    subprocess.run(["mount", "--bind", repo, repo], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", repo], check=True)
        # Re-running init with the same settings is a no-op, even read-only (as the README says).
        p = podman_user.pycfs("--repo", repo, "init", check=False)
        assert p.returncode == 0, p.stderr
        for argv in _commands(built):
            p = podman_user.pycfs("--repo", repo, *argv, check=False)
            _assert_edge(p, f"read-only mount: {argv}")
        p = podman_user.pycfs("--repo", repo, "oci", "images", check=False)
        assert p.returncode == 0 and TAG in p.stdout.decode()
        p = podman_user.pycfs("--repo", repo, "oci", "pull", "--progress=none", built.oci_ref, "other", check=False)
        assert p.returncode == 1 and "read-only" in p.stderr.decode()
    finally:
        subprocess.run(["umount", repo], check=True)


def test_init_where_the_user_cannot_write(podman_user):
    p = podman_user.pycfs("--repo", "/usr/lib/pycfs-test-repo", "init", check=False)
    line = _assert_edge(p, "init under /usr/lib")
    assert p.returncode == 1 and "/usr/lib/pycfs-test-repo" in line and "permission denied" in line, line
