"""Fixtures for integration tests: rootless podman users, a reflinking XFS, loaded images.

All of this needs root (to create users and loop mounts); without root, or without
podman/skopeo/mkfs.xfs, the fixtures skip with the reason.  With CI=true such skips are
turned into failures by tests/conftest.py.

Fixtures (the set-up itself is pycfs.tools.dev.lab, shared with tools/bench):
- `podman_user` (session): user `pycfs-test`, storage in ~/.local/share/containers/storage
  with `driver = "overlay"` pinned in ~/.config/containers/storage.conf.
- `reflink_dir` (session): a 1777 directory on a loop-mounted XFS made with reflink=1.
- `xfs_podman_user` (session): user `pycfs-test-xfs` whose graphroot is on that XFS
  (its storage.conf is passed as CONTAINERS_STORAGE_CONF, so sessions don't collide).
- Users also have `.unshare(*cmd)` (run inside their podman user namespace), `.tmpdir()`
  (a fresh directory they own; on the XFS for `xfs_podman_user`, so a repository made
  there can reflink from that user's storage), `.python` (the venv running their pycfs),
  `.storage_conf` and `.environ()`.
- `shared_tmp_path` (function): a fresh 0755 directory every test user can read.
- `image_cache` (session): builds tests/imagebuild.py images once per session and loads
  them into a user's storage once; `multilayer_loaded` / `restrictive_loaded` are those
  for `podman_user`.

The test users run pycfs from a venv under /var/tmp/pycfs-test (lab.build_user_venv:
world-readable, built from a copy of this checkout, rebuilt whenever the sources change),
because the checkout itself may sit below a directory such as /root that they cannot enter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

import imagebuild  # tests/ is on sys.path (tests/conftest.py)
from pycfs.tools.dev import lab

USER_NAME = "pycfs-test"
XFS_USER_NAME = "pycfs-test-xfs"
XFS_SIZE = 4 << 30  # sparse: costs only what is written


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates test users and loop mounts")


def _require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run tools/setup.sh)")


@pytest.fixture(scope="session")
def session_dir():
    """World-readable per-session directory under /var/tmp/pycfs-test."""
    _require_root()
    with lab.locked("sweep"):
        lab.sweep_stale()
    d = Path(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=lab.LAB_ROOT))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared_tmp_path(session_dir) -> Path:
    """A fresh 0755 directory (root-owned) every test user can read: build image layouts here."""
    d = Path(tempfile.mkdtemp(prefix="t-", dir=session_dir))
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="session")
def user_python(session_dir) -> Path:
    return lab.build_user_venv()


@pytest.fixture(scope="session")
def podman_user(session_dir, user_python) -> lab.PodmanUser:
    _require_root()
    _require_tools("podman", "skopeo", "runuser", "newuidmap")
    with lab.locked("users"):
        pw = lab.ensure_user(USER_NAME)
        home = Path(pw.pw_dir)
        conf = home / ".config/containers/storage.conf"
        lab.write_as(conf, lab.storage_conf_text(), pw.pw_uid, pw.pw_gid)
        user = lab.PodmanUser(pw.pw_name, pw.pw_uid, pw.pw_gid, home,
                          home / ".local/share/containers/storage", user_python, session_dir, conf)
        lab.check_overlay(user)
    return user


# ---------------------------------------------------------------------------------------
# Loop-mounted XFS with reflinks


@pytest.fixture(scope="session")
def xfs_mount(session_dir) -> Path:
    _require_tools("mkfs.xfs", "mount", "umount", "losetup")
    mnt = lab.mount_xfs("xfs", XFS_SIZE)
    lab.restart_pause(USER_NAME)  # so its podman sees the new mount (lab.user_on does the XFS user's)
    yield mnt
    lab.unmount_xfs(mnt)


@pytest.fixture(scope="session")
def reflink_dir(xfs_mount) -> Path:
    """A world-writable (sticky, like /tmp) directory on the reflinking XFS."""
    d = xfs_mount / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


@pytest.fixture(scope="session")
def xfs_podman_user(xfs_mount, user_python) -> lab.PodmanUser:
    _require_tools("podman", "skopeo", "runuser", "newuidmap")
    user = lab.user_on(xfs_mount, XFS_USER_NAME, user_python)
    yield user
    # Its pause process's mount namespace would keep the XFS busy.
    lab.restart_pause(user.name)


# ---------------------------------------------------------------------------------------
# Images built by tests/imagebuild.py, loaded once per session


@dataclass
class LoadedImage:
    ref: str
    image_id: str
    built: imagebuild.BuiltImage
    spec: imagebuild.ImageSpec = field(repr=False)


class ImageCache:
    SPECS: ClassVar = {"multilayer": imagebuild.multilayer_image, "restrictive": imagebuild.restrictive_image}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, tuple[imagebuild.ImageSpec, imagebuild.BuiltImage]] = {}
        self.loaded: dict[tuple[str, str], LoadedImage] = {}

    def layout(self, name: str) -> tuple[imagebuild.ImageSpec, imagebuild.BuiltImage]:
        if name not in self.built:
            spec = self.SPECS[name]()
            self.built[name] = (spec, imagebuild.build_layout(spec, self.root / f"layout-{name}"))
        return self.built[name]

    def load(self, user: lab.PodmanUser, name: str, ref: str | None = None) -> LoadedImage:
        ref = ref or f"localhost/pycfs-test-{name}:latest"
        key = (user.name, ref)
        if key not in self.loaded:
            spec, built = self.layout(name)
            image_id = imagebuild.load_into_storage(user, built.path, ref)
            self.loaded[key] = LoadedImage(ref, image_id, built, spec)
        return self.loaded[key]


@pytest.fixture(scope="session")
def image_cache(session_dir) -> ImageCache:
    return ImageCache(session_dir)


@pytest.fixture(scope="session")
def multilayer_loaded(image_cache, podman_user) -> LoadedImage:
    return image_cache.load(podman_user, "multilayer")


@pytest.fixture(scope="session")
def restrictive_loaded(image_cache, podman_user) -> LoadedImage:
    return image_cache.load(podman_user, "restrictive")
