"""Reading and parsing JSON documents, with errors that say which document."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

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


def read_document(path: str | os.PathLike, limit: int, error: type[PycfsError] = PycfsError, *,
                  dir_fd: int | None = None, follow: bool = True, name: str | None = None) -> bytes:
    """The content of the regular file at path (relative to ``dir_fd`` if given; a symlink
    followed unless ``follow`` is False), at most `limit` bytes. FileNotFoundError passes
    through (the caller says what a missing file means); anything else is `error` naming
    the file (``name``, else path): a fifo would block the read, a device feed it without end."""
    shown = name or os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"cannot read {shown}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{shown} is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {shown}: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{shown} is larger than {limit} bytes: not a document this reads")
    return data
