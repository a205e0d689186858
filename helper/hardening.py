"""Hardening of the user-namespace helper, applied before it reads a single request.

The helper runs as ``podman unshare <python> -m pycfs.helper``: uid 0 in the rootless user
namespace, so it holds a full capability set over the user's sub-uids. It keeps only what
opening any file read-only needs:

* **dies with its parent**: ``PR_SET_PDEATHSIG(SIGKILL)``, then checks that the parent it
  started with is still the parent (if podman already died, it exits at once). The host's
  death is seen as EOF on the socket, which also ends the helper.
* **inside a user namespace only**: refuses to run when ``/proc/self/uid_map`` is the
  initial namespace's identity map (it is not meant to be root on the real host).
* **no_new_privs**: nothing it could exec gains privileges.
* **capabilities**: bounding, permitted and effective sets reduced to ``CAP_DAC_READ_SEARCH``
  (effective, so it can open files of any mapped owner read-only and traverse 0700/0000
  directories); inheritable and ambient sets emptied; securebits NOROOT locked so even an
  exec as uid 0 would not regain more. No CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN...: it
  cannot write to anything it does not own.
* **fds**: the socket moves off fd 0 (stdin becomes /dev/null); every other inherited fd
  above 2 is closed; RLIMIT_NOFILE's soft limit is raised to the hard one so a full batch
  of opened files fits.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat

import prctl

from pycfs.protocol.confined import raise_open_file_limit
from pycfs.protocol.errors import PycfsError

KEEP = prctl.CAP_DAC_READ_SEARCH
_STATUS_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class HardeningError(PycfsError):
    """The helper cannot run safely; the message says why."""


def take_socket() -> socket.socket:
    """The AF_UNIX stream socket the host passed as fd 0, moved to a close-on-exec fd."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        raise HardeningError("fd 0 is closed; pycfs starts this helper with a socket as its stdin") from None
    if not stat.S_ISSOCK(mode):
        raise HardeningError("fd 0 is not a socket; pycfs starts this helper with a socket as its stdin")
    sock = socket.socket(fileno=os.dup(0))
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise HardeningError("fd 0 is not an AF_UNIX stream socket")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return sock


def close_inherited_fds(keep: int) -> None:
    """Close every fd above 2 except ``keep`` (the socket)."""
    os.closerange(3, keep)
    os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def die_with_parent(ppid_at_start: int) -> None:
    prctl.set_pdeathsig(signal.SIGKILL)
    # The signal only covers deaths from now on: the parent may have gone already.
    if os.getppid() != ppid_at_start or ppid_at_start == 1:
        raise HardeningError("the parent process exited before the helper started")


def in_user_namespace() -> bool:
    """False in the initial user namespace, whose uid_map is the full identity map."""
    with open("/proc/self/uid_map", encoding="ascii") as f:
        lines = [line.split() for line in f if line.strip()]
    return lines != [["0", "0", "4294967295"]]


def drop_capabilities() -> None:
    if not prctl.cap_permitted.dac_read_search:
        raise HardeningError("no CAP_DAC_READ_SEARCH in this user namespace (is it running as uid 0 there?)")
    prctl.securebits.noroot = True
    prctl.securebits.noroot_locked = True
    prctl.capbset.limit(KEEP)
    prctl.cap_inheritable.limit()  # empties the ambient set too
    prctl.cap_effective.limit(KEEP)
    prctl.cap_permitted.limit(KEEP)
    sets = capability_sets()
    want = {"CapInh": 0, "CapPrm": 1 << KEEP, "CapEff": 1 << KEEP, "CapBnd": 1 << KEEP, "CapAmb": 0}
    if sets != want:
        raise HardeningError(f"capabilities not dropped as intended: {sets}")


def capability_sets() -> dict[str, int]:
    """The process's capability sets as the kernel reports them in /proc/self/status."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_SETS:
                out[key] = int(value.strip(), 16)
    return out


def open_owned_store(root: str) -> int:
    """An O_PATH fd of an additional image store's root, which must be absolute and owned
    by the caller (uid 0 here): the helper opens files beneath the stores the user keeps,
    not beneath any directory its capability could read."""
    if not os.path.isabs(root):
        raise HardeningError(f"--additional-store root must be absolute, got {root!r}")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if os.fstat(fd).st_uid != 0:
        os.close(fd)
        raise HardeningError(f"additional store {root} is not owned by the user the helper runs for")
    return fd


def harden(ppid_at_start: int) -> socket.socket:
    """Apply everything in the module docstring; returns the host's socket."""
    die_with_parent(ppid_at_start)
    if not in_user_namespace():
        raise HardeningError(
            "not running inside a user namespace; this helper is started by pycfs through `podman unshare`"
        )
    sock = take_socket()
    close_inherited_fds(sock.fileno())
    prctl.set_no_new_privs(True)
    drop_capabilities()
    raise_open_file_limit()
    return sock
