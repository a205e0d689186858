"""The lab: what integration tests and benchmarks set up as root on a Debian machine.

Unprivileged users with sub-uid ranges and rootless podman pinned to the overlay driver
(`PodmanUser`), a world-readable venv running this checkout's pycfs for them (the checkout
may sit below a directory such as /root they cannot enter), loop-mounted XFS with reflinks,
and clean-up of what killed runs left behind. Everything lives under LAB_ROOT
($PYCFS_TEST_ROOT, default /var/tmp/pycfs-test); set-up steps are serialised with file
locks there, so concurrent runs on one machine do not collide.
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

CHECKOUT = Path(__file__).resolve().parents[2]  # tools/dev/../.. in a checkout (editable install)
LAB_ROOT = Path(os.environ.get("PYCFS_TEST_ROOT", "/var/tmp/pycfs-test"))
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What is copied to build the users' venv (the package-dir mapping's sources).
SOURCE_ITEMS = ("pyproject.toml", "README.md", "host", "helper", "protocol", "tools")


class LabError(subprocess.CalledProcessError):
    """A command run as a test user failed; str() shows its output."""

    def __str__(self) -> str:
        def text(b) -> str:
            return (b or b"").decode(errors="replace").strip()[-4000:]

        return (f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
                f"--- stdout\n{text(self.stdout)}\n--- stderr\n{text(self.stderr)}")


def run_root(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run as root, failing with the command's output on error."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, stdin=subprocess.DEVNULL, **kw)
    if p.returncode != 0:
        raise LabError(p.returncode, cmd, p.stdout, p.stderr)
    return p


# ---------------------------------------------------------------------------------------
# The venv the test users run pycfs from


@contextlib.contextmanager
def locked(name: str):
    """Serialise set-up across concurrent runs (test sessions, benchmarks) on this machine."""
    LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(LAB_ROOT, 0o755)
    with open(LAB_ROOT / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------
# The venv the lab users run pycfs from


def world_accessible(path: Path) -> bool:
    """Every directory above `path` is o+x and the file itself o+r/x."""
    path = path.resolve()
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o005 == 0o005)


def world_python() -> str:
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        p = Path(cand)
        if not p.exists() or not world_accessible(p):
            continue
        v = subprocess.run([cand, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True)
        if v.stdout.strip() == "True":
            return cand
    raise LabError(1, ["python3"], b"", b"no Python >= 3.11 with the venv module that other users can "
                   b"run (install python3-venv, see tools/setup.sh)")


def source_hash() -> str:
    h = hashlib.sha256()
    for item in SOURCE_ITEMS:
        root = CHECKOUT / item
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for p in files:
            h.update(str(p.relative_to(CHECKOUT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def site_packages(venv: Path) -> Path:
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
    # Bytecode as an installed wheel has it: pip leaves it out where PYTHONDONTWRITEBYTECODE
    # is set, and the test users cannot write it, so every run would compile pycfs (~0.1 s).
    # Nor may it go to a PYTHONPYCACHEPREFIX (the bench sets one for its own checkout).
    compiling = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    try:
        with locked("venv"):
            python = world_python()
            project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
            deps = sorted(project.get("dependencies", []))
            ver = subprocess.run([python, "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True).stdout
            deps_dir = LAB_ROOT / ("deps-" + hashlib.sha256((ver + "\n".join(deps)).encode()).hexdigest()[:16])
            if not (deps_dir / ".complete").exists():
                shutil.rmtree(deps_dir, ignore_errors=True)
                run_root([python, "-m", "venv", deps_dir])
                run_root([deps_dir / "bin/python", "-m", "pip", "install", "--quiet", "--compile", *deps], env=compiling)
                (deps_dir / ".complete").touch()

            pkg_dir = LAB_ROOT / ("pycfs-" + source_hash())
            if not (pkg_dir / ".complete").exists():
                shutil.rmtree(pkg_dir, ignore_errors=True)
                run_root([python, "-m", "venv", "--without-pip", pkg_dir])
                site = site_packages(pkg_dir)
                with tempfile.TemporaryDirectory() as tmp:
                    # Build from a copy: an in-tree build would write build/ into the shared checkout.
                    src = Path(tmp) / "src"
                    src.mkdir()
                    for item in SOURCE_ITEMS:
                        s = CHECKOUT / item
                        if s.is_dir():
                            shutil.copytree(s, src / item, ignore=shutil.ignore_patterns("__pycache__"))
                        elif s.exists():
                            shutil.copy2(s, src / item)
                    run_root([deps_dir / "bin/python", "-m", "pip", "install", "--quiet", "--no-deps", "--compile",
                              "--target", site, src], env=compiling)
                (site / "_pycfs_test_deps.pth").write_text(str(site_packages(deps_dir)) + "\n")
                (pkg_dir / ".complete").touch()
                prune_old_venvs(keep=pkg_dir)
            return pkg_dir / "bin/python"
    finally:
        os.umask(old_umask)


def prune_old_venvs(keep: Path) -> None:
    """Drop pycfs-<hash> venvs unused for a day (each source edit makes one)."""
    cutoff = time.time() - 86400
    for p in LAB_ROOT.glob("pycfs-*"):
        if p != keep and p.is_dir() and p.stat().st_mtime < cutoff:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Test users


# ---------------------------------------------------------------------------------------
# Users


def subid_ranges(path: str, name: str) -> list[tuple[int, int]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] == name:
                out.append((int(parts[1]), int(parts[2])))
    return out


def ensure_subids(name: str) -> None:
    """useradd normally allocates ranges; add one for users created without."""
    for path, opt in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        if subid_ranges(path, name):
            continue
        ends = [100000]
        with contextlib.suppress(FileNotFoundError):
            for line in Path(path).read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3:
                    ends.append(int(parts[1]) + int(parts[2]))
        start = max(ends)
        run_root(["usermod", opt, f"{start}-{start + 65535}", name])


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        run_root(["useradd", "-m", "-s", "/bin/bash", name])
        pw = pwd.getpwnam(name)
    ensure_subids(name)
    # rootless podman wants a private runtime dir; there is no systemd session to make one.
    runtime = Path(f"/run/user/{pw.pw_uid}")
    runtime.parent.mkdir(mode=0o755, exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, pw.pw_uid, pw.pw_gid)
    os.chmod(runtime, 0o700)
    return pw


def restart_pause(name: str) -> None:
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


def write_as(path: Path, text: str, uid: int, gid: int, mode: int = 0o644) -> None:
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
            raise LabError(p.returncode, list(map(str, cmd)), p.stdout, p.stderr)
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


def check_overlay(user: PodmanUser) -> None:
    """Storage must use the overlay driver; an old vfs store would make podman refuse
    or silently keep vfs, so reset it (these users exist only for tests)."""
    fmt = "{{.Store.GraphDriverName}} {{.Store.GraphRoot}}"
    info = user.podman("info", "--format", fmt, check=False)
    driver_trouble = b"driver" in info.stderr  # e.g. "graph driver vfs overwritten by ... from database"
    if info.returncode != 0 and not driver_trouble:
        raise LabError(info.returncode, ["podman", "info"], info.stdout, info.stderr)
    if driver_trouble or info.stdout.decode().split()[0:1] != ["overlay"]:
        # Only on a real driver mismatch: concurrent sessions share this store.
        user.podman("system", "reset", "--force", check=False)
        info = user.podman("info", "--format", fmt)
    driver, graphroot = info.stdout.decode().split()
    assert driver == "overlay", f"{user.name}: podman uses {driver}, not overlay"
    assert Path(graphroot) == user.storage_root, (graphroot, user.storage_root)


# ---------------------------------------------------------------------------------------
# Loop-mounted XFS, clean-up


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


KEEP_VENV_COPIES = 4  # pycfs-<source hash> venvs: one per source change, 2 MB each


def sweep_stale() -> None:
    """Remove what ended runs left behind. Session dirs and loop XFS labs are named after
    the process that made them (`session-PID-*`, `xfs-PID-*`, `bench-PID-*`; a bench lab
    kept with --keep lasts until the next bench run or integration test session, whose set-up
    sweeps too), and an image file whose lab directory is gone goes too. Of the venv copies (`pycfs-<source hash>`) the newest few stay."""
    for p in sorted(LAB_ROOT.glob("*-*-*")):
        kind, _, rest = p.name.partition("-")
        pid = rest.split("-")[0]
        if kind not in ("session", "xfs", "bench") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if p.suffix == ".img":
            if not p.with_suffix("").exists():
                p.unlink(missing_ok=True)
        elif kind == "session":
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir():
            if subprocess.run(["umount", p], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", p], capture_output=True)
            with contextlib.suppress(OSError):
                p.rmdir()
            p.with_suffix(".img").unlink(missing_ok=True)
    copies = sorted(LAB_ROOT.glob("pycfs-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[KEEP_VENV_COPIES:]:
        shutil.rmtree(old, ignore_errors=True)


def user_on(mount: Path, name: str, python: Path) -> PodmanUser:
    """User `name` whose containers-storage graphroot and scratch space live on `mount`
    (e.g. a reflink XFS), through a storage.conf passed as CONTAINERS_STORAGE_CONF, so
    concurrent runs, each with its own mount, do not collide."""
    with locked("users"):
        pw = ensure_user(name)
    # Its podman pause process holds a mount namespace from before `mount` existed.
    restart_pause(name)
    base = mount / name
    for sub in ("", "storage", "scratch"):
        (base / sub).mkdir(mode=0o700 if sub == "storage" else 0o755, exist_ok=True)
        os.chown(base / sub, pw.pw_uid, pw.pw_gid)
    # (runroot stays the user's default /run/user/UID/containers.)
    conf = base / "storage.conf"
    write_as(conf, storage_conf_text(base / "storage"), pw.pw_uid, pw.pw_gid)
    # For podman run without that variable (by hand): still overlay, never vfs.
    write_as(Path(pw.pw_dir) / ".config/containers/storage.conf", storage_conf_text(), pw.pw_uid, pw.pw_gid)
    user = PodmanUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), base / "storage", python,
                      base / "scratch", conf, extra_env={"CONTAINERS_STORAGE_CONF": str(conf)})
    check_overlay(user)
    return user


def mount_xfs(prefix: str, size: int) -> Path:
    """A fresh sparse image file formatted `mkfs.xfs -m reflink=1`, loop-mounted on a new
    0755 directory LAB_ROOT/<prefix>-<pid>-XXXX (the name lets sweep_stale() find leftovers)."""
    LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    mnt = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=LAB_ROOT))
    img = mnt.with_suffix(".img")
    with open(img, "wb") as f:
        f.truncate(size)
    try:
        run_root(["mkfs.xfs", "-q", "-m", "reflink=1", img])
        run_root(["mount", "-o", "loop", img, mnt])
    except Exception:
        img.unlink()
        mnt.rmdir()
        raise
    os.chmod(mnt, 0o755)
    return mnt


def unmount_xfs(mnt: Path) -> None:
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        # Something (a lingering podman pause process's namespace) still uses it.
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    mnt.with_suffix(".img").unlink()
    with contextlib.suppress(OSError):
        mnt.rmdir()
