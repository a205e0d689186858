"""Where a child process's stdout and stderr go: a memfd, so nothing has to keep draining a
pipe, and its tail is there to quote when the child fails."""

from __future__ import annotations

import os

TAIL_BYTES = 2048


class ChildOutput:
    def __init__(self, name: str) -> None:
        self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)

    def note(self) -> str:
        """``"; its last output: ..."`` (the end of what the child printed, as one line), or ""."""
        if self.fd is None:
            return ""
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, TAIL_BYTES, max(0, size - TAIL_BYTES))
        text = tail.decode("utf-8", "replace").strip()
        if not text:
            return ""
        # One line, as PycfsError messages are.
        return "; its last output: " + " | ".join(line.strip() for line in text.splitlines() if line.strip())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
