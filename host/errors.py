"""The error edge: one hierarchy of library errors, and one way to say any failure in a line.

Every library error derives from `PycfsError` (defined in pycfs.protocol.errors so the helper
shares it). Concurrency code runs plain trio nurseries; whoever reports a failure (the CLI,
the varlink service) calls `user_message` once, which unwraps exception groups."""

from __future__ import annotations

import errno
import sys

from pycfs.protocol.errors import PycfsError
from pycfs.protocol.text import printable

__all__ = ["PycfsError", "first_error", "user_message"]

# What to do about an OSError the user can meet, by errno.
_ERRNO_ADVICE = {
    errno.EACCES: "permission denied (check the owner and mode, or choose another path)",
    errno.EPERM: "operation not permitted (check the owner and mode, or choose another path)",
    errno.EROFS: "read-only file system (choose a writable location)",
    errno.ENOSPC: "no space left on device (free some space, e.g. `pycfs gc`, and re-run)",
    errno.EDQUOT: "disk quota exceeded (free some space, e.g. `pycfs gc`, and re-run)",
    errno.EMFILE: "too many open files (raise the limit with `ulimit -n` and re-run)",
    errno.EIO: "input/output error (check the device; `pycfs fsck` checks the repository)",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory",
}


def first_error(exc: BaseException) -> BaseException:
    """The failure to report: for an exception group its first leaf that is not a
    cancellation (which only followed the failure); any other exception itself."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    # trio is looked up, not imported: a command that never ran trio has no cancellation to
    # skip, and should not pay for importing it (start-up time).
    trio = sys.modules.get("trio")
    real = [e for e in leaves if trio is None or not isinstance(e, trio.Cancelled)]
    return (real or leaves or [exc])[0]


def describe_oserror(e: OSError) -> str:
    what = _ERRNO_ADVICE.get(e.errno or 0) or e.strerror or str(e)
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


def user_message(exc: BaseException) -> str:
    """One line for any failure: a PycfsError's own message, an OSError's path and advice,
    and for anything else (a bug) its type and text."""
    e = first_error(exc)
    if isinstance(e, PycfsError):
        return _one_line(str(e)) or type(e).__name__
    if isinstance(e, OSError):
        return _one_line(describe_oserror(e))
    return f"internal error: {type(e).__name__}: {_one_line(str(e))} (a bug in pycfs: PYCFS_DEBUG=1 shows the traceback)"


def _one_line(text: str) -> str:
    """Quoted child output and the like keep their content but lose their line breaks; the
    rest is `printable` (a path from an image, a tag, a peer's text may hold terminal
    controls or bytes that are not UTF-8)."""
    return printable("; ".join(line.strip() for line in text.splitlines() if line.strip()))
