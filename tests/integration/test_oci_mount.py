"""A pulled image, mounted with `pycfs mount`, shows the tree podman shows for it.

Oracle: `podman image mount` (root's containers-storage) gives the image's merged rootfs
as podman builds it from the same layers. Compared entry by entry: type, permission
bits, owner, mtime (ns), size, content digest, symlink target, device number, link count,
security.capability. The root directory's own metadata is left out on purpose: composefs
derives it from /usr (spec 3.7), podman does not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagebuild

pytestmark = pytest.mark.integration

REF = "localhost/pycfs-mount-test:latest"


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, **kw)


def pycfs(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), *args)


def describe(root: Path) -> dict[bytes, tuple]:
    """Everything compared, per path relative to root (root itself excluded)."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                with open(path, "rb") as f:
                    extra = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(kind):
                extra = os.readlink(path)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = st.st_rdev
            else:
                extra = None
            try:
                cap = os.getxattr(path, "security.capability", follow_symlinks=False)
            except OSError:
                cap = None
            size = st.st_size if not stat.S_ISDIR(kind) else None
            nlink = st.st_nlink if not stat.S_ISDIR(kind) else None
            out[os.path.relpath(path, base)] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                                st.st_mtime_ns, size, nlink, extra, cap)
    return out


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("mounting EROFS and overlayfs needs root")
    for tool in ("podman", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (tools/setup.sh installs it)")


def test_mounted_image_equals_podman_rootfs(root_only, tmp_path):
    started_ns = time.time_ns()
    built = imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path / "layout")
    run("skopeo", "copy", "--quiet", f"oci:{built.path}", f"containers-storage:{REF}")
    repo, mnt = tmp_path / "repo", tmp_path / "mnt"
    mnt.mkdir()
    podman_dir = None
    try:
        pycfs(repo, "init")
        pulled = pycfs(repo, "oci", "pull", f"containers-storage:{REF}", "mount-test").stdout.decode()
        assert "(EROFS v1)" in pulled
        pycfs(repo, "mount", "mount-test", str(mnt))
        try:
            podman_dir = Path(run("podman", "image", "mount", REF).stdout.decode().strip())
            ours, theirs = describe(mnt), describe(podman_dir)
        finally:
            pycfs(repo, "umount", str(mnt))
        assert sorted(ours) == sorted(theirs)
        for path, want in theirs.items():
            got = ours[path]
            if stat.S_ISDIR(want[0]) and want[4] >= started_ns:
                # An upper layer changed this directory without a tar entry for it, so
                # containers-storage created it at extraction time; the image keeps the
                # stat of the layer that did define it, which is all a tar says.
                got, want = got[:4] + got[5:], want[:4] + want[5:]
            assert got == want, path
        # the content really came through the image: whiteouts, the opaque dir, replaced files
        assert b"etc/removed-later" not in ours and sorted(p for p in ours if p.startswith(b"var/cache/")) == [b"var/cache/new"]
        assert ours[b"usr/bin/tool"][6] == 2  # hardlinked
        assert ours[b"usr/bin/ping-like"][8] == imagebuild.CAP_NET_BIND_SERVICE_V2
    finally:
        if podman_dir is not None:
            subprocess.run(["podman", "image", "unmount", REF], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", REF], capture_output=True)


def test_mount_refuses_unknown_image(root_only, tmp_path):
    repo, mnt = tmp_path / "repo", tmp_path / "mnt"
    mnt.mkdir()
    pycfs(repo, "init")
    p = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), "mount", "nope", str(mnt)],
                       capture_output=True)
    assert p.returncode == 1 and b"no image or OCI image named 'nope'" in p.stderr
    assert not os.path.ismount(mnt)


# ---------------------------------------------------------------------------------------
# What a root mount makes reachable (a review proved each against the code before)


@pytest.fixture
def small_pulled(root_only, tmp_path, shared_tmp_path):
    """A repository holding a one-layer image (a set-user-ID root copy of /usr/bin/id and a
    text file) tagged "small", and an empty mount point: (repo, mount point, image id)."""
    spec = imagebuild.ImageSpec([[imagebuild.Dir("usr"), imagebuild.Dir("bin"),
                                  imagebuild.File("bin/id", data=Path("/usr/bin/id").read_bytes(), mode=0o4755),
                                  imagebuild.File("hello.txt", data=b"genuine content\n" * 8)]])
    built = imagebuild.build_layout(spec, tmp_path / "layout")
    repo, mnt = tmp_path / "repo", shared_tmp_path / "mnt"  # (a mount point every user can reach)
    mnt.mkdir()
    pycfs(repo, "init")
    pycfs(repo, "oci", "pull", f"oci:{built.path}", "small")
    image_id = next(p.name for p in (repo / "images").iterdir() if p.is_symlink())
    return repo, mnt, image_id


def _mount_fails(repo: Path, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), *args], capture_output=True)
    assert p.returncode == 1, p
    err = p.stderr.decode()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_root_mount_honours_no_set_user_id_bit_unless_asked(small_pulled):
    """An ordinary user ran the image's set-user-ID root `id` from root's mount as root
    (euid=0): a pulled image would give every local user root."""
    repo, mnt, _ = small_pulled
    nobody = ["runuser", "-u", "nobody", "--", str(mnt / "bin/id"), "-u"]
    for extra, euid in (((), "65534"), (("--suid",), "0")):
        pycfs(repo, "mount", *extra, "small", str(mnt))
        try:
            assert stat.S_IMODE(os.stat(mnt / "bin/id").st_mode) == 0o4755  # the image's mode, shown
            assert run(*nobody).stdout.decode().strip() == euid
        finally:
            pycfs(repo, "umount", str(mnt))


def test_a_kernel_mount_refuses_an_image_edited_after_it_was_named(small_pulled):
    """The kernel mount served an image whose bytes were edited (FUSE refused it)."""
    repo, mnt, image_id = small_pulled
    obj = repo / "objects" / image_id[:2] / image_id[2:]
    data = bytearray(obj.read_bytes())
    at = data.find(b"hello.txt")
    data[at:at + 5] = b"HACKD"
    obj.write_bytes(bytes(data))
    err = _mount_fails(repo, "mount", "small", str(mnt))
    assert err == (f"pycfs: error: image {image_id} in {repo} is corrupt: its fs-verity digest differs from its name "
                   "(run `pycfs fsck --repair`, then pull or create the image again)\n")
    assert not os.path.ismount(mnt)


def test_mount_points_that_are_links_or_inside_the_repository_are_refused(small_pulled, tmp_path):
    repo, mnt, _ = small_pulled
    link = tmp_path / "link"
    link.symlink_to(mnt)
    assert _mount_fails(repo, "mount", "small", str(link)) == \
        f"pycfs: error: mount point {link} is a symlink: name the directory itself\n"
    inside = repo / "objects"
    for fuse in ("no", "yes"):
        assert _mount_fails(repo, "mount", "--fuse", fuse, "small", str(inside)) == \
            f"pycfs: error: mount point {inside} is inside the repository {repo}: mount it elsewhere\n"
    assert not os.path.ismount(mnt) and not os.path.ismount(inside)


def test_a_second_mount_at_a_mount_point_is_refused_kernel_and_fuse(small_pulled):
    """The kernel mount stacked a second mount at the same point (FUSE refused it)."""
    repo, mnt, _ = small_pulled
    pycfs(repo, "mount", "small", str(mnt))
    try:
        for fuse in ("no", "yes"):
            assert _mount_fails(repo, "mount", "--fuse", fuse, "small", str(mnt)) == \
                f"pycfs: error: {mnt} is a mount point already: `pycfs umount {mnt}` first\n"
    finally:
        pycfs(repo, "umount", str(mnt))
    assert not os.path.ismount(mnt)  # one umount took off the one mount


def test_umount_unmounts_composefs_mounts_only_and_never_through_a_link(small_pulled, tmp_path):
    """As root, `pycfs umount` unmounted whatever it was named (a tmpfs; /proc alike)."""
    repo, mnt, _ = small_pulled
    other = tmp_path / "tmpfs"
    other.mkdir()
    run("mount", "-t", "tmpfs", "pycfs-test-tmpfs", str(other))
    try:
        assert _mount_fails(repo, "umount", str(other)) == (
            f"pycfs: error: {other} is a tmpfs mount of pycfs-test-tmpfs, not a composefs image: pycfs unmounts only "
            "its own (use umount)\n")
        assert os.path.ismount(other)
    finally:
        run("umount", str(other))
    pycfs(repo, "mount", "small", str(mnt))
    link = tmp_path / "link"
    link.symlink_to(mnt)
    try:
        assert _mount_fails(repo, "umount", str(link)) == \
            f"pycfs: error: {link} is a symlink: name the mount point itself\n"
        assert os.path.ismount(mnt)
    finally:
        pycfs(repo, "umount", str(mnt))
    assert not os.path.ismount(mnt)
