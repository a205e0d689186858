"""A varlink client on trio: calls with fds, `more` streams, error replies as VarlinkError.

A peer is not trusted to answer: with a `reply_timeout` each reply must come within it (a
service that never answers, or sends one `continues` frame and then nothing, would hang
the caller for ever), and the fds of a reply that should carry none are closed at once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.varlink.transport import Connection, ConnectionClosed
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.varlink import (
    Reply,
    VarlinkError,
    VarlinkProtocolError,
    parse_reply,
)


# How long a service may take to send each reply to a `timed` client (`oci copy`'s source
# service), in seconds (read at each reply: tests lower it).
REPLY_TIMEOUT = 60.0


class ReplyTimeout(PycfsError):
    """A peer did not answer in time (the connection is then out of step: close it)."""


class Client:
    """One connection; calls are made one at a time (varlink replies come in order).
    ``timed``: each reply within REPLY_TIMEOUT (a service elsewhere); else as long as it
    takes (a service in this process, working for its caller: a PutLayer takes minutes)."""

    def __init__(self, conn: Connection, timed: bool = False) -> None:
        self.conn = conn
        self.timed = timed

    async def _next(self, method: str) -> Reply:
        timeout = REPLY_TIMEOUT if self.timed else math.inf
        with trio.move_on_after(timeout) as waited:
            got = await self.conn.receive()
        if waited.cancelled_caught:
            # (its reply may still come: the connection is out of step, for its owner to close)
            raise ReplyTimeout(f"the varlink service {self.conn.peer} did not answer {method} within {timeout:g} s: "
                               "it is stuck or overloaded (check it or restart it, then try again)")
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

    async def call(self, method: str, parameters: dict[str, Any] | None = None, fds: Sequence[int] = (),
                   reply_fds: bool = False) -> Reply:
        """One call, one reply. Its fds are the caller's with ``reply_fds``; else a reply
        should carry none, and any it carries are closed here (a peer sending hundreds
        with every reply would have them kept open for ever)."""
        await self.conn.send({"method": method, "parameters": parameters or {}}, fds)
        reply = await self._next(method)
        if reply.continues:
            close_fds(reply.fds)
            raise VarlinkProtocolError(f"{method}: 'continues' reply to a call without 'more'")
        if not reply_fds and reply.fds:
            close_fds(reply.fds)
            reply.fds = []
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
