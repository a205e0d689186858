"""The helper's JSON-RPC interface: method names, parameter/result shapes, error codes, limits.

Shared by the helper (`pycfs.helper.service`) and the host (`pycfs.host.helperclient`);
plain constants and small validators, nothing that does I/O.

Methods (JSON-RPC 2.0 over jsonrpc-fdpass, requests carry no fds):

``hello`` -> ``{"version": 1, "features": [...], "pid": int, "driver": str,
"uid_map": [[inside, outside, count], ...], "gid_map": [...], "max_paths": int,
"cap_effective": int, "cap_permitted": int, "cap_bounding": int, "no_new_privs": 0|1}``
(capability sets as bit masks, as the kernel reports them)

``open_files`` ``{"layer": <64 lowercase hex>, "paths": [str, ...], "store": int}`` ->
``{"results": [entry, ...]}`` with one entry per path, in order: ``{"fd": i}`` (index into
the response's fds) or ``{"errno": int, "reason": str, "message": str}``. Paths are
relative to the layer's root (``overlay/<id>/diff`` or ``vfs/dir/<id>``); names that are not
UTF-8 travel as ``os.fsdecode`` surrogate escapes. ``store`` (optional, default 0) picks the
store the layer is in: 0 the primary (``--storage-root``), N the Nth ``--additional-store``
the helper was started with (each an additional image store whose root the caller owns).

``shutdown`` -> ``null``; the helper exits after replying.

Request-level failures are JSON-RPC errors with the codes below; a refused *path* is a
per-path entry, so one bad name does not cost the batch.
"""

from __future__ import annotations

import errno
import re
from typing import NamedTuple

PROTOCOL_VERSION = 1
FEATURES = ("open-files", "read-only", "additional-stores")

HELLO = "hello"
OPEN_FILES = "open_files"
SHUTDOWN = "shutdown"

DRIVERS = ("overlay", "vfs")

# Limits: one response carries at most MAX_PATHS_PER_REQUEST fds, well under a default
# RLIMIT_NOFILE of 1024 on either side; MAX_MESSAGE_BYTES bounds what a peer can make us buffer.
MAX_PATHS_PER_REQUEST = 512
MAX_PATH_BYTES = 4096
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_FDS_PER_MESSAGE = MAX_PATHS_PER_REQUEST

# JSON-RPC error codes (request-level). -32602/-32601/-32700/-32050 are the standard ones.
ERR_UNKNOWN_LAYER = -32001
ERR_LAYER_UNREADABLE = -32002

# Per-path refusals. Each has its own reason token so a caller (and a test) can tell them
# apart; the errno is what the host's OSError for it carries.
class Refusal(NamedTuple):
    errno: int
    reason: str
    text: str


REFUSE_EMPTY = Refusal(errno.EINVAL, "empty-path", "the name is empty")
REFUSE_NUL = Refusal(errno.EINVAL, "nul-byte", "the name contains a NUL byte")
REFUSE_TOO_LONG = Refusal(errno.ENAMETOOLONG, "too-long", f"the name is longer than {MAX_PATH_BYTES} bytes")
REFUSE_ABSOLUTE = Refusal(errno.EINVAL, "absolute-path", "absolute name; names are relative to the layer")
REFUSE_DOTDOT = Refusal(errno.EXDEV, "dotdot-component", "a '..' component would leave the layer")
REFUSE_EMPTY_COMPONENT = Refusal(errno.EINVAL, "empty-component", "empty component ('//' or a trailing '/')")
REFUSE_ENCODING = Refusal(errno.EILSEQ, "bad-encoding", "not UTF-8 or surrogate-escaped bytes")
REFUSE_SYMLINK = Refusal(errno.ELOOP, "symlink", "a symlink (the helper follows none)")
REFUSE_DIRECTORY = Refusal(errno.EISDIR, "directory", "a directory, not a regular file")
REFUSE_SPECIAL = Refusal(errno.ENXIO, "not-regular", "not a regular file (fifo, socket or device)")
REFUSE_CHANGED = Refusal(errno.ESTALE, "changed-while-opening", "replaced while being opened")
OPEN_FAILED = "open-failed"  # the kernel's own errno (ENOENT, EACCES, ...)

_LAYER_ID = re.compile(r"[0-9a-f]{64}")


def is_layer_id(value: object) -> bool:
    """A c/storage layer id: exactly 64 lowercase hex digits."""
    return isinstance(value, str) and _LAYER_ID.fullmatch(value) is not None


def layer_dir(driver: str, layer_id: str) -> str:
    """The layer's root, relative to the storage root."""
    if driver == "overlay":
        return f"overlay/{layer_id}/diff"
    if driver == "vfs":
        return f"vfs/dir/{layer_id}"
    raise ValueError(f"unknown storage driver {driver!r}")


def check_relative_path(raw: bytes) -> Refusal | None:
    """The refusal for a requested name, or None when it is an acceptable relative path.

    Checked before any syscall, in this order, so each bad name gets one definite reason.
    ``.`` components are harmless and allowed (tar member names often start with ``./``).
    openat2's RESOLVE_BENEATH would also stop ``..`` and absolute names, but with less
    telling errors.
    """
    if not raw:
        return REFUSE_EMPTY
    if b"\0" in raw:
        return REFUSE_NUL
    if len(raw) > MAX_PATH_BYTES:
        return REFUSE_TOO_LONG
    if raw.startswith(b"/"):
        return REFUSE_ABSOLUTE
    parts = raw.split(b"/")
    if b".." in parts:
        return REFUSE_DOTDOT
    if b"" in parts:
        return REFUSE_EMPTY_COMPONENT
    return None
