"""A varlink client on trio: calls with fds, `more` streams, error replies as VarlinkError."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from pycfs.host.varlink.transport import Connection, ConnectionClosed
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.varlink import (
    Reply,
    VarlinkError,
    VarlinkProtocolError,
    parse_reply,
)


class Client:
    """One connection; calls are made one at a time (varlink replies come in order)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def _next(self, method: str) -> Reply:
        got = await self.conn.receive()
        if got is None:
            raise ConnectionClosed(f"{self.conn.peer} closed the connection during {method}")
        obj, fds = got
        try:
            reply = parse_reply(obj, fds)
        except VarlinkProtocolError:
            close_fds(fds)
            raise
        if reply.error is not None:
            close_fds(fds)
            raise VarlinkError(reply.error, reply.parameters)
        return reply

    async def call(self, method: str, parameters: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> Reply:
        """One call, one reply (its fds are the caller's)."""
        await self.conn.send({"method": method, "parameters": parameters or {}}, fds)
        reply = await self._next(method)
        if reply.continues:
            close_fds(reply.fds)
            raise VarlinkProtocolError(f"{method}: 'continues' reply to a call without 'more'")
        return reply

    async def call_more(self, method: str, parameters: dict[str, Any] | None = None,
                        fds: Sequence[int] = ()) -> AsyncIterator[Reply]:
        """Every reply of a `more` call, the last one without `continues`. Breaking out of
        the loop early leaves the connection unusable: close it."""
        await self.conn.send({"method": method, "parameters": parameters or {}, "more": True}, fds)
        while True:
            reply = await self._next(method)
            yield reply
            if not reply.continues:
                return

    def close(self) -> None:
        self.conn.close()
