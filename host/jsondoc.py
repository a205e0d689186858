"""Reading and parsing JSON documents, with errors that say which document."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError

# The largest JSON document (OCI index, manifest, config) read: real ones are KiB.
MAX_JSON_DOCUMENT = 64 << 20


def loads(raw: bytes | str, what: str, error: type[PycfsError] = PycfsError) -> Any:
    """raw as JSON; otherwise `error` naming `what` (e.g. "manifest sha256:...")."""
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise error(f"{what} is not valid JSON: {e}") from None
    except RecursionError:  # json's C parser recurses once per nested array or object
        raise error(f"{what} is not valid JSON: it nests too deeply") from None


def parse_object(raw: bytes | str, what: str, error: type[PycfsError] = PycfsError) -> dict:
    """raw as a JSON object; otherwise `error` naming `what`."""
    doc = loads(raw, what, error)
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc


def open_document(path: str | os.PathLike, error: type[PycfsError] = PycfsError, *, dir_fd: int | None = None,
                  follow: bool = True, name: str | None = None, resolve: int = 0) -> int:
    """An fd of the regular file at path, as `read_document` opens it (its arguments);
    FileNotFoundError passes through, anything else is `error` naming the file."""
    shown = name or os.fspath(path)
    try:
        fd, _ = syscalls.open_regular(syscalls.AT_FDCWD if dir_fd is None else dir_fd, os.fsencode(path),
                                      follow=follow, resolve=resolve)
    except FileNotFoundError:
        raise
    except syscalls.NotRegularFile as e:
        raise error(f"{shown} is {e.kind}, not a regular file") from None
    except OSError as e:
        why = "it leads out of its directory or through a symlink" if e.errno in (errno.EXDEV, errno.ELOOP) \
            and resolve else e.strerror
        raise error(f"cannot read {shown}: {why}") from None
    return fd


def read_document(path: str | os.PathLike, limit: int, error: type[PycfsError] = PycfsError, *,
                  dir_fd: int | None = None, follow: bool = True, name: str | None = None,
                  resolve: int = 0) -> bytes:
    """The content of the regular file at path (relative to ``dir_fd`` if given; a symlink
    followed unless ``follow`` is False; ``resolve``: openat2's RESOLVE_* flags, e.g. to
    stay beneath ``dir_fd``), at most `limit` bytes. FileNotFoundError passes through (the
    caller says what a missing file means); anything else is `error` naming the file
    (``name``, else path). Nothing but a regular file is opened: a fifo would block the
    read, a device feed it without end or act on its open."""
    shown = name or os.fspath(path)
    fd = open_document(path, error, dir_fd=dir_fd, follow=follow, name=name, resolve=resolve)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {shown}: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{shown} is larger than {limit} bytes: not a document this reads")
    return data
