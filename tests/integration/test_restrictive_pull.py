"""Files the user cannot read arrive through the helper, reflinked, byte-exact; a helper
that dies mid-import stops the pull cleanly and a re-run finishes it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from imagebuild import MIB, Dir, File, ImageSpec
from procs import act_mid_pull, image_and_fresh_repo, kill_child_mid_pull, opened_beneath, rerun_completes

from pycfs.host.storage.locks import try_read_lock

from pycfs.host.oci.layer import iter_layer_entries, layer_stream_name
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.tree import External, Inline
from pycfs.tools.dev import lab

# (path in the image, why the user cannot open it directly)
RESTRICTIVE = {
    b"/etc/shadow": "mode 0000",
    b"/srv/shadow-hardlink": "hardlink to a mode 0000 file",
    b"/home/user/secret.txt": "0600, owned by container uid 1000, in a 0700 directory",
    b"/home/user/tiny": "small (inline) 0600 file of container uid 1000",
    b"/srv/locked/readonly.bin": "0400 file in a 0000 directory",
    b"/root/big-secret.bin": "0600 file over 100 MiB owned by container uid 1000",
}


def pull(user, repo: Path, ref: str, *extra: str) -> dict:
    return json.loads(user.pycfs("--repo", repo, "oci", "pull", "--json", *extra, f"containers-storage:{ref}").stdout)


def layer_contents(repo: Path, diff_id: str) -> dict[bytes, bytes]:
    """As root: path -> content of every regular file in the layer stream (objects read back)."""
    out = {}
    with Repository.open(repo, writable=False) as r:
        reader = r.open_stream(layer_stream_name(diff_id), CONTENT_OCI_LAYER)
        for entry in iter_layer_entries(reader):
            if isinstance(entry.item, External):
                out[entry.path] = r.read_object(entry.item.id)
            elif isinstance(entry.item, Inline):
                out[entry.path] = entry.item.data
    return out


def diff_dir(user, ref: str) -> str:
    layer = user.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", ref).stdout.decode().strip()
    assert layer, "no overlay upper dir for the image"
    return layer


def test_restrictive_files_are_reflinked_and_exact(xfs_podman_user, image_cache):
    user = xfs_podman_user
    image = image_cache.load(user, "restrictive")
    repo = user.tmpdir("restrictive-") / "repo"  # on the XFS, like the storage
    user.pycfs("--repo", repo, "init")
    for path in RESTRICTIVE:  # the premise: the user really cannot read these
        probe = user.run(["cat", diff_dir(user, image.ref) + os.fsdecode(path)], check=False)
        assert probe.returncode != 0 and b"Permission denied" in probe.stderr, path
    result = pull(user, repo, image.ref)
    stats = result["stats"]
    assert stats["objects_copied"] == 0 and stats["bytes_copied"] == 0, stats
    assert stats["files_via_helper"] >= len(RESTRICTIVE) - 1, stats  # the hardlink's data is its target's
    assert stats["bytes_reflinked"] >= 100 * MIB, stats
    (diff_id,) = image.built.diff_ids
    contents = layer_contents(repo, diff_id)
    upper = diff_dir(user, image.ref)
    for path, why in RESTRICTIVE.items():
        if path == b"/srv/shadow-hardlink":
            continue  # a tar hardlink entry carries no data; checked through its target
        truth = user.unshare("cat", upper + os.fsdecode(path)).stdout
        assert hashlib.sha256(contents[path]).digest() == hashlib.sha256(truth).digest(), (path, why)
    inspected = user.pycfs("--repo", repo, "oci", "inspect", f"containers-storage:{image.ref}").stdout
    assert "composefs.image.v1" in json.loads(inspected)["images"]


def many_restricted_files() -> ImageSpec:
    """Enough unreadable files that the import needs the helper for many requests."""
    layer = [Dir("home"), Dir("home/user", mode=0o700, uid=1000, gid=1000)]
    layer += [File(f"home/user/f{i:04d}", size=4096 + i, seed=i, mode=0o600, uid=1000, gid=1000) for i in range(1500)]
    return ImageSpec([layer])


def test_helper_killed_mid_import(podman_user, shared_tmp_path):
    user = podman_user
    ref = "localhost/pycfs-helper-kill:latest"
    built, repo = image_and_fresh_repo(user, many_restricted_files(), shared_tmp_path / "layout", ref, "kill-")
    _, status, err = kill_child_mid_pull(user, repo, ref, b"pycfs.helper")
    assert status == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("pycfs: error:") and "helper" in lines[-1], lines[-1]
    # nothing half-made is visible, the repository is consistent, and a re-run completes
    assert not list((repo / "streams").glob("oci-layer-*")) if (repo / "streams").exists() else True
    assert rerun_completes(user, repo, ref, built.diff_ids[0])["files_via_helper"] == 1500


def test_helper_process_itself_killed_mid_import_ends_within_seconds(podman_user, shared_tmp_path):
    """kill -9 of the helper (the python process, not the `podman unshare` running it):
    podman keeps the socket open and, at its exit, waits for the storage write lock the
    pull holds. The pull must still end in one line within seconds, leaving no process."""
    user = podman_user
    ref = "localhost/pycfs-helper-kill:latest"
    built, repo = image_and_fresh_repo(user, many_restricted_files(), shared_tmp_path / "layout", ref, "kill-helper-")
    started = time.monotonic()
    _, status, err = kill_child_mid_pull(user, repo, ref, b"pycfs.helper", program=b"python", timeout=60,
                                         ready=lambda pid: opened_beneath(pid, "/diff"))
    assert time.monotonic() - started < 10, err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("pycfs: error:")] == lines[-1:], lines
    assert "helper" in lines[-1] and "Traceback" not in err, lines
    assert rerun_completes(user, repo, ref, built.diff_ids[0])["files_via_helper"] == 1500


def test_a_reader_of_the_storage_does_not_hold_up_the_pull_exit(podman_user, shared_tmp_path):
    """Another process takes a storage read lock while the helper runs: at its exit `podman
    unshare` waits for the write lock, and used to be waited for 5 s, then killed."""
    user = podman_user
    ref = "localhost/pycfs-helper-kill:latest"
    _, repo = image_and_fresh_repo(user, many_restricted_files(), shared_tmp_path / "layout", ref, "reader-")
    locks = []
    taken = []

    def take_read_locks(pid, pull):
        for name in ("overlay-layers/layers.lock", "overlay-images/images.lock"):
            fd = os.open(user.storage_root / name, os.O_RDONLY)
            locks.append(fd)
            assert try_read_lock(fd)
        taken.append(time.monotonic())

    try:
        _, status, err = act_mid_pull(user, repo, ref, b"pycfs.helper", take_read_locks, program=b"python",
                                      ready=lambda pid: opened_beneath(pid, "/diff"), timeout=60)
        ended = time.monotonic()
    finally:
        for fd in locks:
            os.close(fd)
    assert status == 0, err
    assert ended - taken[0] < 3.5, ended - taken[0]


NOSUB_USER = "pycfs-test-nosub"


def _is_mine(line: str) -> bool:
    return line.startswith(f"{NOSUB_USER}:")


def _rewrite(path: str, mine: list[str]) -> None:
    """The file with NOSUB_USER's lines replaced by `mine`."""
    kept = [line for line in Path(path).read_text().splitlines(keepends=True) if not _is_mine(line)]
    tmp = Path(path + ".pycfs-test")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept + mine))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def test_without_a_subuid_range_the_helper_failure_says_so(session_dir, user_python, image_cache):
    """The user's /etc/subuid and /etc/subgid ranges are gone (after the image was pulled):
    `podman unshare` maps only the user's own id, so the helper cannot open files of the
    store's other ids either. The one line said "the helper cannot open ...: Permission
    denied"; now it says what is missing and what to do. A user of its own: the session's
    test user keeps its ranges for the other tests."""
    with lab.locked("users"):
        pw = lab.ensure_user(NOSUB_USER)
        home = Path(pw.pw_dir)
        conf = home / ".config/containers/storage.conf"
        lab.write_as(conf, lab.storage_conf_text(), pw.pw_uid, pw.pw_gid)
    user = lab.PodmanUser(pw.pw_name, pw.pw_uid, pw.pw_gid, home, home / ".local/share/containers/storage",
                          user_python, session_dir, conf)
    lab.check_overlay(user)
    image = image_cache.load(user, "restrictive")
    repo = user.tmpdir("nosub-") / "repo"
    user.pycfs("--repo", repo, "init")
    with lab.locked("users"):  # (usermod --del-subuids refuses while podman's pause process runs)
        mine = {path: [line for line in Path(path).read_text().splitlines(keepends=True) if _is_mine(line)]
                for path in ("/etc/subuid", "/etc/subgid")}
        for path in mine:
            _rewrite(path, [])
    try:
        user.podman("system", "migrate")
        assert user.unshare("cat", "/proc/self/uid_map").stdout.split() == [b"0", str(pw.pw_uid).encode(), b"1"]
        refused = user.pycfs("--repo", repo, "oci", "pull", f"containers-storage:{image.ref}", check=False)
        err = refused.stderr.decode()
        assert refused.returncode == 1 and err.count("error") == 1, err
        assert re.search(r"^pycfs: error: the helper cannot open \S+ \(layer [0-9a-f]{12}, .*\) \(Permission denied\): "
                            rf"`podman unshare` maps only your uid \(no /etc/subuid or /etc/subgid range for {NOSUB_USER}\): "
                            r"add one and run `podman system migrate`\n\Z", err, re.M), err
    finally:
        with lab.locked("users"):
            for path, lines in mine.items():
                _rewrite(path, lines)
        user.podman("system", "migrate")
    assert pull(user, repo, image.ref)["stats"]["files_via_helper"] >= len(RESTRICTIVE) - 1
