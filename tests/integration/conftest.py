"""Fixtures for integration tests: rootless podman users, a reflinking XFS, loaded images.

All of this needs root (to create users and loop mounts); without root, or without
podman/skopeo/mkfs.xfs, the fixtures skip with the reason.  With CI=true such skips are
turned into failures by tests/conftest.py.

Fixtures (see /work/notes/fixtures-api.md):
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

The test users run pycfs from a venv under /var/tmp/pycfs-test (world-readable, built
from a copy of this checkout with a non-editable `pip install`, rebuilt whenever the
sources change), because the checkout itself may sit below a directory such as /root that
they cannot enter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import imagebuild  # tests/ is on sys.path (tests/conftest.py)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_ROOT = Path(os.environ.get("PYCFS_TEST_ROOT", "/var/tmp/pycfs-test"))
USER_NAME = "pycfs-test"
XFS_USER_NAME = "pycfs-test-xfs"
XFS_SIZE = 4 << 30  # sparse: costs only what is written
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories copied to build the test users' venv (the package-dir mapping's sources).
SOURCE_ITEMS = ("pyproject.toml", "README.md", "host", "helper", "protocol", "tools")


class UserCommandError(subprocess.CalledProcessError):
    """A command run as a test user failed; str() shows its output."""

    def __str__(self) -> str:
        def text(b) -> str:
            return (b or b"").decode(errors="replace").strip()[-4000:]

        return (f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
                f"--- stdout\n{text(self.stdout)}\n--- stderr\n{text(self.stderr)}")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates test users and loop mounts")


def _require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run tools/setup.sh)")


@contextlib.contextmanager
def _locked(name: str):
    """Serialise set-up across concurrent pytest sessions on this machine."""
    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o755)
    with open(TEST_ROOT / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run as root, failing with the command's output on error."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, stdin=subprocess.DEVNULL, **kw)
    if p.returncode != 0:
        raise UserCommandError(p.returncode, cmd, p.stdout, p.stderr)
    return p


# ---------------------------------------------------------------------------------------
# The venv the test users run pycfs from


def _world_accessible(path: Path) -> bool:
    """Every directory above `path` is o+x and the file itself o+r/x."""
    path = path.resolve()
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o005 == 0o005)


def _world_python() -> str:
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        p = Path(cand)
        if not p.exists() or not _world_accessible(p):
            continue
        v = subprocess.run([cand, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True)
        if v.stdout.strip() == "True":
            return cand
    pytest.fail("no Python >= 3.11 with the venv module that other users can run "
                "(install python3-venv, see tools/setup.sh)")


def _source_hash() -> str:
    h = hashlib.sha256()
    for item in SOURCE_ITEMS:
        root = REPO_ROOT / item
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for p in files:
            h.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def build_user_venv() -> Path:
    """Return the python of a world-readable venv holding this checkout's pycfs
    (non-editable) and its dependencies.

    Two levels, so a source edit costs one wheel build, not a dependency install:
    `deps-<hash>` holds the dependencies; `pycfs-<source hash>` is a pip-less venv with
    pycfs installed into its site-packages and a .pth pointing at the deps.  A plain venv
    (not PYTHONPATH) because the helper is started through `podman unshare`, which does not
    pass the environment on."""
    old_umask = os.umask(0o022)
    try:
        with _locked("venv"):
            python = _world_python()
            project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
            deps = sorted(project.get("dependencies", []))
            ver = subprocess.run([python, "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True).stdout
            deps_dir = TEST_ROOT / ("deps-" + hashlib.sha256((ver + "\n".join(deps)).encode()).hexdigest()[:16])
            if not (deps_dir / ".complete").exists():
                shutil.rmtree(deps_dir, ignore_errors=True)
                _run([python, "-m", "venv", deps_dir])
                _run([deps_dir / "bin/python", "-m", "pip", "install", "--quiet", *deps])
                (deps_dir / ".complete").touch()

            pkg_dir = TEST_ROOT / ("pycfs-" + _source_hash())
            if not (pkg_dir / ".complete").exists():
                shutil.rmtree(pkg_dir, ignore_errors=True)
                _run([python, "-m", "venv", "--without-pip", pkg_dir])
                site = _site_packages(pkg_dir)
                with tempfile.TemporaryDirectory() as tmp:
                    # Build from a copy: an in-tree build would write build/ into the shared checkout.
                    src = Path(tmp) / "src"
                    src.mkdir()
                    for item in SOURCE_ITEMS:
                        s = REPO_ROOT / item
                        if s.is_dir():
                            shutil.copytree(s, src / item, ignore=shutil.ignore_patterns("__pycache__"))
                        elif s.exists():
                            shutil.copy2(s, src / item)
                    _run([deps_dir / "bin/python", "-m", "pip", "install", "--quiet", "--no-deps",
                          "--target", site, src])
                (site / "_pycfs_test_deps.pth").write_text(str(_site_packages(deps_dir)) + "\n")
                (pkg_dir / ".complete").touch()
                _prune_old_venvs(keep=pkg_dir)
            return pkg_dir / "bin/python"
    finally:
        os.umask(old_umask)


def _prune_old_venvs(keep: Path) -> None:
    """Drop pycfs-<hash> venvs unused for a day (each source edit makes one)."""
    cutoff = time.time() - 86400
    for p in TEST_ROOT.glob("pycfs-*"):
        if p != keep and p.is_dir() and p.stat().st_mtime < cutoff:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Test users


def _subid_ranges(path: str, name: str) -> list[tuple[int, int]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] == name:
                out.append((int(parts[1]), int(parts[2])))
    return out


def _ensure_subids(name: str) -> None:
    """useradd normally allocates ranges; add one for users created without."""
    for path, opt in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        if _subid_ranges(path, name):
            continue
        ends = [100000]
        with contextlib.suppress(FileNotFoundError):
            for line in Path(path).read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3:
                    ends.append(int(parts[1]) + int(parts[2]))
        start = max(ends)
        _run(["usermod", opt, f"{start}-{start + 65535}", name])


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "-m", "-s", "/bin/bash", name])
        pw = pwd.getpwnam(name)
    _ensure_subids(name)
    # rootless podman wants a private runtime dir; there is no systemd session to make one.
    runtime = Path(f"/run/user/{pw.pw_uid}")
    runtime.parent.mkdir(mode=0o755, exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, pw.pw_uid, pw.pw_gid)
    os.chmod(runtime, 0o700)
    return pw


def _restart_pause(name: str) -> None:
    """Stop `name`'s podman pause process, if any.  Rootless podman re-enters the mount
    namespace that process holds, which was copied when it started and does not see
    mounts made later (the loop XFS): the next podman command starts a fresh one."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    env = {"HOME": pw.pw_dir, "PATH": SYSTEM_PATH, "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}"}
    if Path(env["XDG_RUNTIME_DIR"]).is_dir():
        subprocess.run(["runuser", "-u", name, "--", "podman", "system", "migrate"], cwd="/",
                       env=env, capture_output=True, stdin=subprocess.DEVNULL)


def _write_as(path: Path, text: str, uid: int, gid: int, mode: int = 0o644) -> None:
    """Create `path` (and missing parents) owned by uid:gid."""
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o755)
        os.chown(d, uid, gid)
    path.write_text(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def storage_conf_text(graphroot: Path | None = None) -> str:
    lines = ["[storage]", 'driver = "overlay"']
    if graphroot:
        # Rootless c/storage takes graphroot from a config named by CONTAINERS_STORAGE_CONF
        # only through rootless_storage_path (graphroot there is root's); set both.
        lines += [f'graphroot = "{graphroot}"', f'rootless_storage_path = "{graphroot}"']
    return "\n".join(lines) + "\n"


@dataclass
class PodmanUser:
    name: str
    uid: int
    gid: int
    home: Path
    storage_root: Path
    python: Path  # the venv python that runs pycfs for this user
    scratch: Path  # where tmpdir() makes directories (on the XFS for xfs_podman_user)
    storage_conf: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        """Login-like environment: what `su - USER` would give, plus XDG_RUNTIME_DIR."""
        return {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
            "SHELL": "/bin/bash", "PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": f"/run/user/{self.uid}",
            **self.extra_env,
        }

    def run(self, cmd: list, *, check: bool = True, input: bytes | None = None,
            env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        argv = ["runuser", "-u", self.name, "--", *map(str, cmd)]
        # Own process group: on timeout (or a pytest-timeout interrupt) kill everything the
        # command started, so no orphan (a helper, podman unshare) outlives the test.
        proc = subprocess.Popen(argv, cwd=self.home, env={**self.environ(), **(env or {})},
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.communicate()
            raise
        p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and p.returncode != 0:
            raise UserCommandError(p.returncode, list(map(str, cmd)), p.stdout, p.stderr)
        return p

    def podman(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["podman", *args], check=check)

    def unshare(self, *cmd, check: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` inside the user's podman user namespace (as container root)."""
        return self.run(["podman", "unshare", *cmd], check=check)

    def pycfs(self, *args, check: bool = True, input: bytes | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
        """The pycfs CLI of this checkout, run as this user."""
        return self.run([self.python, "-m", "pycfs.tools.cli", *args], check=check, input=input, env=env)

    def tmpdir(self, prefix: str = "tmp-") -> Path:
        """A fresh directory owned by this user (removed with the session)."""
        d = Path(tempfile.mkdtemp(prefix=f"{self.name}-{prefix}", dir=self.scratch))
        os.chown(d, self.uid, self.gid)
        os.chmod(d, 0o755)
        return d


def _check_overlay(user: PodmanUser) -> None:
    """Storage must use the overlay driver; an old vfs store would make podman refuse
    or silently keep vfs, so reset it (these users exist only for tests)."""
    fmt = "{{.Store.GraphDriverName}} {{.Store.GraphRoot}}"
    info = user.podman("info", "--format", fmt, check=False)
    driver_trouble = b"driver" in info.stderr  # e.g. "graph driver vfs overwritten by ... from database"
    if info.returncode != 0 and not driver_trouble:
        raise UserCommandError(info.returncode, ["podman", "info"], info.stdout, info.stderr)
    if driver_trouble or info.stdout.decode().split()[0:1] != ["overlay"]:
        # Only on a real driver mismatch: concurrent sessions share this store.
        user.podman("system", "reset", "--force", check=False)
        info = user.podman("info", "--format", fmt)
    driver, graphroot = info.stdout.decode().split()
    assert driver == "overlay", f"{user.name}: podman uses {driver}, not overlay"
    assert Path(graphroot) == user.storage_root, (graphroot, user.storage_root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _sweep_stale() -> None:
    """Remove what killed sessions left behind: session dirs and loop XFS mounts are named
    after the pytest process that made them (`session-PID-*`, `xfs-PID-*`)."""
    for p in TEST_ROOT.glob("*-*-*"):
        kind, _, rest = p.name.partition("-")
        pid = rest.split("-")[0]
        if kind not in ("session", "xfs") or not pid.isdigit() or _pid_alive(int(pid)) or p.suffix == ".img":
            continue
        if kind == "xfs" and p.is_dir():
            if subprocess.run(["umount", p], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", p], capture_output=True)
            with contextlib.suppress(OSError):
                p.rmdir()
            with contextlib.suppress(FileNotFoundError):
                p.with_suffix(".img").unlink()
        elif kind == "session":
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir():
    """World-readable per-session directory under /var/tmp/pycfs-test."""
    _require_root()
    with _locked("sweep"):
        _sweep_stale()
    d = Path(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=TEST_ROOT))
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
    return build_user_venv()


@pytest.fixture(scope="session")
def podman_user(session_dir, user_python) -> PodmanUser:
    _require_root()
    _require_tools("podman", "skopeo", "runuser", "newuidmap")
    with _locked("users"):
        pw = _ensure_user(USER_NAME)
        home = Path(pw.pw_dir)
        conf = home / ".config/containers/storage.conf"
        _write_as(conf, storage_conf_text(), pw.pw_uid, pw.pw_gid)
        user = PodmanUser(pw.pw_name, pw.pw_uid, pw.pw_gid, home,
                          home / ".local/share/containers/storage", user_python, session_dir, conf)
        _check_overlay(user)
    return user


# ---------------------------------------------------------------------------------------
# Loop-mounted XFS with reflinks


@pytest.fixture(scope="session")
def xfs_mount(session_dir) -> Path:
    _require_tools("mkfs.xfs", "mount", "umount", "losetup")
    mnt = Path(tempfile.mkdtemp(prefix=f"xfs-{os.getpid()}-", dir=TEST_ROOT))
    img = mnt.with_suffix(".img")
    with open(img, "wb") as f:
        f.truncate(XFS_SIZE)
    try:
        _run(["mkfs.xfs", "-q", "-m", "reflink=1", img])
        _run(["mount", "-o", "loop", img, mnt])
    except Exception:
        img.unlink()
        mnt.rmdir()
        raise
    os.chmod(mnt, 0o755)
    for name in (USER_NAME, XFS_USER_NAME):
        _restart_pause(name)
    yield mnt
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        # Something (a lingering podman pause process's namespace) still uses it.
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    img.unlink()
    with contextlib.suppress(OSError):
        mnt.rmdir()


@pytest.fixture(scope="session")
def reflink_dir(xfs_mount) -> Path:
    """A world-writable (sticky, like /tmp) directory on the reflinking XFS."""
    d = xfs_mount / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


@pytest.fixture(scope="session")
def xfs_podman_user(xfs_mount, user_python) -> PodmanUser:
    _require_tools("podman", "skopeo", "runuser", "newuidmap")
    with _locked("users"):
        pw = _ensure_user(XFS_USER_NAME)
    base = xfs_mount / pw.pw_name
    for sub in ("", "storage", "scratch"):
        (base / sub).mkdir(mode=0o700 if sub == "storage" else 0o755, exist_ok=True)
        os.chown(base / sub, pw.pw_uid, pw.pw_gid)
    # A per-session storage.conf passed by env, not ~/.config: concurrent sessions each
    # have their own XFS.  (runroot stays the user's default /run/user/UID/containers.)
    conf = base / "storage.conf"
    _write_as(conf, storage_conf_text(base / "storage"), pw.pw_uid, pw.pw_gid)
    # For podman run without that variable (by hand): still overlay, never vfs.
    _write_as(Path(pw.pw_dir) / ".config/containers/storage.conf", storage_conf_text(),
              pw.pw_uid, pw.pw_gid)
    user = PodmanUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), base / "storage",
                      user_python, base / "scratch", conf,
                      extra_env={"CONTAINERS_STORAGE_CONF": str(conf)})
    _check_overlay(user)
    yield user
    # Its pause process's mount namespace would keep the XFS busy.
    _restart_pause(user.name)


# ---------------------------------------------------------------------------------------
# Images built by tests/imagebuild.py, loaded once per session


@dataclass
class LoadedImage:
    ref: str
    image_id: str
    built: imagebuild.BuiltImage
    spec: imagebuild.ImageSpec = field(repr=False)


class ImageCache:
    SPECS = {"multilayer": imagebuild.multilayer_image, "restrictive": imagebuild.restrictive_image}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, tuple[imagebuild.ImageSpec, imagebuild.BuiltImage]] = {}
        self.loaded: dict[tuple[str, str], LoadedImage] = {}

    def layout(self, name: str) -> tuple[imagebuild.ImageSpec, imagebuild.BuiltImage]:
        if name not in self.built:
            spec = self.SPECS[name]()
            self.built[name] = (spec, imagebuild.build_layout(spec, self.root / f"layout-{name}"))
        return self.built[name]

    def load(self, user: PodmanUser, name: str, ref: str | None = None) -> LoadedImage:
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
