"""Mounting (root directly, users through fusermount3), serving until unmounted or
signalled, daemonising for `pycfs mount`, and unmounting."""

from __future__ import annotations

import errno
import gc
import logging
import logging.handlers
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pycfs.host import syscalls
from pycfs.host.errors import user_message
from pycfs.host.fuse.image import FuseMountError, ServedImage
from pycfs.host.fuse.operations import ComposefsOperations
from pycfs.host.fuse.readahead import Pusher
from pycfs.host.fuse.server import FuseServer

log = logging.getLogger("pycfs.fuse")

# How long `pycfs mount` waits for the daemonised server to answer the kernel's INIT.
READY_TIMEOUT = 60.0
FUSERMOUNT_TIMEOUT = 30.0
# How often the server looks whether its mount is still there (see _watch).
WATCH_INTERVAL = 2.0


class _Stop(BaseException):
    """A termination signal: leave the request loop so the mount is removed on the way out
    (a BaseException, so that no request's error handling takes it for a failed request)."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stop


class _Gone(BaseException):
    """The mount is no longer in the server's mount namespace."""


def _mount_device(mountpoint: bytes) -> bytes | None:
    """major:minor of the (topmost) pycfs FUSE mount at mountpoint, from this namespace's
    mountinfo (read there: a stat of the mount point would ask the server itself)."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            where = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if where == mountpoint and fields[fields.index(b"-") + 1] == b"fuse.pycfs":
                found = fields[2]
    return found


def _watch(device: bytes) -> Callable[[int, Any], None]:
    """A SIGALRM handler that ends serving once no mount of `device` is left here.

    Unmounting removes the mount from the caller's namespace only: a namespace made while it
    was mounted (a rootless podman's pause process, `unshare -m`) keeps a copy, the kernel
    keeps the connection for it, and the server would wait for requests forever."""

    def check(signum: int, frame: Any) -> None:
        with open("/proc/self/mountinfo", "rb") as f:
            if not any(line.split()[2] == device for line in f):
                raise _Gone

    return check


def _mount(mountpoint: str) -> tuple[int, bool]:
    """Open a FUSE connection mounted at mountpoint: (its /dev/fuse fd, whether fusermount3 made it).

    Root (also root of a user namespace that owns its mount namespace) mounts directly; an
    ordinary user through the set-uid fusermount3, which hands back the fd."""
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions"
        try:
            # Onto the directory itself, through its fd: a symlink put in its place since
            # the checks is not followed (ELOOP).
            target = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                syscalls.mount("composefs", f"/proc/self/fd/{target}", "fuse.pycfs",
                               syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV, options)
            finally:
                os.close(target)
            return fd, False
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM:
                raise FuseMountError(f"FUSE mount at {mountpoint} failed: {e.strerror}") from None
    return _mount_through_fusermount(mountpoint), True


def _fusermount() -> str:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise FuseMountError("fusermount3 is not installed (Debian package fuse3): a user cannot mount FUSE without it")
    return tool


def _mount_through_fusermount(mountpoint: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        try:
            proc = subprocess.Popen(  # argv[0] is the name its messages start with
                ["fusermount3", "-o", "ro,default_permissions,fsname=composefs,subtype=pycfs", "--", mountpoint],
                executable=_fusermount(), env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}, pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:
            raise FuseMountError(f"FUSE mount at {mountpoint} failed: fusermount3: {e.strerror}") from None
        theirs.close()  # fusermount3 holds the other end: it closes when it exits
        ours.settimeout(FUSERMOUNT_TIMEOUT)
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            _, err = proc.communicate(timeout=FUSERMOUNT_TIMEOUT)
        except (TimeoutError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            for fd in fds:
                os.close(fd)
            raise FuseMountError(f"FUSE mount at {mountpoint}: fusermount3 did not answer within "
                                 f"{FUSERMOUNT_TIMEOUT:.0f} s") from None
    if proc.returncode != 0 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"fusermount3 exited with status {proc.returncode}"
        if "/dev/fuse" in why:
            why += " (FUSE needs /dev/fuse open to you and fusermount3, from Debian's fuse3)"
        raise FuseMountError(f"FUSE mount at {mountpoint} failed: {why}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def _unmount_quietly(mountpoint: str, through_fusermount: bool) -> None:
    """On the way out after a signal: detach the mount (nothing may be left answering ENOTCONN)."""
    try:
        if through_fusermount:
            subprocess.run([_fusermount(), "-u", "-q", "-z", "--", mountpoint], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
        else:
            syscalls.umount(mountpoint, syscalls.MNT_DETACH)
    except (OSError, subprocess.TimeoutExpired, FuseMountError) as e:
        log.error("unmounting %s failed: %s", mountpoint, e)


def serve(image: ServedImage, mountpoint: str, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve in this process until unmounted or signalled; then unmount."""
    where = os.fsencode(os.path.realpath(mountpoint))  # before: afterwards it would ask this server
    ops = ComposefsOperations(image)
    ops.tree.load()
    fd, through_fusermount = _mount(mountpoint)
    pusher = Pusher(ops, fd)
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    device = _mount_device(where)
    if device is not None:
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _watch(device))
        signal.setitimer(signal.ITIMER_REAL, WATCH_INTERVAL, WATCH_INTERVAL)
    mounted = True
    server = FuseServer(ops, fd, on_ready, pusher)
    # what is loaded now lives as long as the server: keep the collector from walking it
    gc.freeze()
    try:
        server.serve()
        mounted = False  # served until the kernel said the mount is gone
    except _Stop:
        pass
    except _Gone:
        mounted = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if mounted:
            _unmount_quietly(mountpoint, through_fusermount)
        server.close()  # and the read-ahead process
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(fd)
        ops.close()


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pycfs mount: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _log_to_syslog() -> None:
    # A daemon has no terminal; the journal (through /dev/log) keeps its lines where there is one.
    if os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pycfs-mount[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def serve_daemon(image: ServedImage, mountpoint: str) -> int:
    """Fork a server that mounts and serves in the background; return its pid once the mount
    answers, or raise with the reason it could not be made."""
    mountpoint = os.path.abspath(mountpoint)  # the server leaves the working directory
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's outcome is checked through the pipe
        os.close(r)
        _daemon_child(image, mountpoint, w)
    os.close(w)
    try:
        answer = _read_answer(r, pid)
    finally:
        os.close(r)
    if answer == "ready":
        return pid
    os.waitpid(pid, 0)
    raise FuseMountError(answer)


def _read_answer(r: int, pid: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGTERM)
            return f"the FUSE server did not answer within {READY_TIMEOUT:.0f} s"
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace").strip()
    return text or "the FUSE server exited before the mount was ready"


class _Answer:
    """The pipe `pycfs mount` waits on: "ready" or one error line, sent once."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, text: str) -> None:
        if self.fd is None:
            log.error("%s", text)  # after the mount was ready: only the log can tell
            return
        try:
            os.write(self.fd, text.encode())
        except OSError:
            pass  # the caller is gone; the mount serves anyway
        os.close(self.fd)
        self.fd = None


def _close_inherited(keep: set[int]) -> None:
    """Close every fd above stderr but those in `keep`: whatever else the caller of `pycfs
    mount` left open to it (a pipe's write end its reader waits on for EOF, a lock, a
    socket) would stay open as long as the server serves."""
    gc.collect()  # a file object of the caller's left for the collector must not close a reused number later
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 0x7FFFFFFF))  # (unlimited: INT_MAX)


def _daemon_child(image: ServedImage, mountpoint: str, w: int) -> None:  # pragma: no cover
    answer = _Answer(w)
    status = 1
    try:
        os.setsid()
        os.chdir("/")  # hold no directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        _close_inherited({w, devnull, image.objects_fd, image.lock_fd})
        _log_to_syslog()

        def ready() -> None:
            answer.send("ready")
            os.dup2(devnull, 2)  # the caller returns now; nothing may keep its stderr open

        serve(image, mountpoint, ready)
        status = 0
    except BaseException as e:  # reported to the waiting parent, in one line
        answer.send(user_message(e))
    finally:
        os._exit(status)


def fuse_unmount(mountpoint: str) -> None:
    """Unmount a FUSE mount as its (unprivileged) owner, also when its server was killed."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise FuseMountError("fusermount3 is not installed (Debian package fuse3): cannot unmount as a user")
    try:
        p = subprocess.run([tool, "-u", mountpoint], capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FuseMountError(f"unmounting {mountpoint}: fusermount3 did not finish within "
                             f"{FUSERMOUNT_TIMEOUT:.0f} s") from None
    if p.returncode != 0:
        why = p.stderr.decode(errors="replace").strip().splitlines()
        raise FuseMountError(f"unmounting {mountpoint} failed: {why[-1] if why else f'status {p.returncode}'}")
