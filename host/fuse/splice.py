"""Object bytes to /dev/fuse: spliced through a pipe, so the kernel copies them once."""

from __future__ import annotations

import fcntl
import os

from pycfs.host.fuse.operations import ObjectProblem, pread_exactly

# The pipe file bytes travel through to /dev/fuse: 1 MiB, the default most a user may ask for.
PIPE_SIZE = 1 << 20
# Smaller replies and pushes are read and written (two calls) rather than spliced (three).
SPLICE_FROM = 16 * 1024


class Splicer:
    """Sends a message whose body is bytes of a file: the header written into a pipe, the
    file's pages spliced behind it, the pipe spliced to the output. The kernel copies the
    bytes once (page cache to page cache) where pread + write would copy them twice."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe: smaller messages
        # a page for the header, one more for a start that is not page-aligned
        self.limit = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ) - 8192

    def send(self, out: int, header: bytes, fd: int, offset: int, length: int) -> None:
        """Write header + `length` bytes of fd at offset to out, as one write. ObjectProblem
        when fd has fewer bytes there or cannot be read (nothing is written then); OSError
        from out passes on."""
        if length < SPLICE_FROM or length > self.limit:
            os.writev(out, [header, pread_exactly(fd, length, offset)])
            return
        os.write(self.w, header)
        try:
            moved = 0
            while moved < length:
                try:
                    n = os.splice(fd, self.w, length - moved, offset_src=offset + moved)
                except OSError as e:
                    raise ObjectProblem(f"cannot be read ({e.strerror})") from None
                if n == 0:  # a short message would shrink the file in the kernel's cache
                    raise ObjectProblem("is shorter than the image says")
                moved += n
            total = len(header) + length
            while total:
                total -= os.splice(self.r, out, total)
        except BaseException:
            self._drain()
            raise

    def _drain(self) -> None:
        try:
            while os.read(self.r, PIPE_SIZE):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
