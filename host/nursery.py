"""A trio nursery that fails with its first real exception, not an ExceptionGroup.

The CLI reports a `PycfsError` as one line; a group around it (trio's strict exception
groups) would turn that into a traceback. Cancellations that only followed the failure are
dropped."""

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
