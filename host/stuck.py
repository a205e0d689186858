"""When a child process pycfs waits on counts as stuck: an object worker (the pool's and
`workers.blocking.BlockingStore`'s waits for answers) or the user-namespace helper
(`helperclient`). Every wait is bounded, but a fixed bound per answer would cut off honest
work (a 30 GB file copied where it cannot be reflinked takes minutes). So the bound is on
progress: a child with requests waiting that has neither used CPU nor been ready to run for
STUCK_LIMIT seconds is stuck: blocked on a file of a stalled network or FUSE filesystem (a
varlink client can pass the service such a file), stopped, or wedged. The host then kills
it and fails the job with one line naming it; a re-run finishes the job.

The host checks every `check_every()` seconds of silence. A check that comes much later
than that means the host itself did not run (stopped with Ctrl-Z, the machine suspended):
the count starts again rather than blaming the child for the host's pause."""

from __future__ import annotations

STUCK_LIMIT = 600.0


def check_every() -> float:
    return STUCK_LIMIT / 10


def progress(pid: int) -> tuple[int, bool] | None:
    """utime + stime of the process (all its threads) in clock ticks, and whether it is
    running or runnable (a worker waiting for a core on a loaded machine is not stuck);
    None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # After the command name, which may hold spaces and parentheses: state is field 3,
    # utime and stime fields 14 and 15.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12]), fields[0] == b"R"


class Watch:
    """One child's progress, as the host's checks see it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks: int | None = None
        self._still_since = 0.0
        self._checked = 0.0

    def stuck(self, busy: bool, now: float) -> bool:
        """Whether the child, with requests waiting (``busy``) or not, is stuck at ``now``
        (a monotonic time in seconds)."""
        seen = progress(self.pid)
        ticks, running = seen if seen is not None else (None, False)
        overslept = now - self._checked > 2 * check_every()
        self._checked = now
        if not busy or running or ticks != self._ticks or overslept:
            self._ticks, self._still_since = ticks, now
            return False
        return now - self._still_since >= STUCK_LIMIT


def stuck_message() -> str:
    return (f"it made no progress for {STUCK_LIMIT:.0f} s with requests waiting (used no CPU, was not ready to "
            "run: a file it reads may be on a stalled network or FUSE filesystem): killed")
