"""A trio nursery that fails with its first real exception, not an ExceptionGroup.

For the library's entry points (a pull, a copy, the worker pool, a varlink call): their
callers (the CLI, the varlink service, tests) see the failure itself. It picks that failure
with `pycfs.host.errors.first_error`, the same function the CLI's error edge applies to
anything that still arrives as a group, so there is one rule for which error is reported.
Cancellations that only followed the failure are dropped."""

from __future__ import annotations

from typing import Any

import trio

from pycfs.host.errors import first_error


class open_nursery:
    async def __aenter__(self) -> trio.Nursery:
        self._cm = trio.open_nursery()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool:
        try:
            return bool(await self._cm.__aexit__(*exc))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
