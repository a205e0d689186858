"""A readers/writer lock for trio (which has none): many shared holders, or one exclusive.

A hold is a token, not a task's: a GetLayer takes it in its call, and its producer (another
task, outliving the call) lets go once the client is done with the objects. An exclusive
acquirer that waits goes before shared ones that come after it, so a stream of calls cannot
starve it. Every wait is bounded (trio.TooSlowError) and cancellable; a wait given up holds
nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class RWLock:
    def __init__(self) -> None:
        self.shared = 0  # holders
        self.exclusive = False
        self.waiting_shared = 0
        self.waiting_exclusive = 0
        self._changed = trio.Event()

    @property
    def idle(self) -> bool:
        """Nobody holds it or waits for it."""
        return not (self.shared or self.exclusive or self.waiting_shared or self.waiting_exclusive)

    def _free(self, exclusive: bool) -> bool:
        if exclusive:
            return not self.exclusive and not self.shared
        return not self.exclusive and not self.waiting_exclusive

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def acquire(self, exclusive: bool, limit: float) -> Callable[[], None]:
        """Hold it (shared or exclusive), waiting at most `limit` seconds; returns the
        release (calling it again does nothing)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if exclusive:
            self.waiting_exclusive += 1
        else:
            self.waiting_shared += 1
        try:
            with trio.fail_after(limit):
                while not self._free(exclusive):
                    await self._changed.wait()
        finally:
            if exclusive:
                self.waiting_exclusive -= 1
                # (one that gave up may have been all that kept shared ones waiting)
                self._notify()
            else:
                self.waiting_shared -= 1
        if exclusive:
            self.exclusive = True
        else:
            self.shared += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            if exclusive:
                self.exclusive = False
            else:
                self.shared -= 1
            self._notify()

        return release
