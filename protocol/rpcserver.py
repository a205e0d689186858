"""A blocking JSON-RPC server loop over one AF_UNIX socket, with fds both ways (jsonrpc-fdpass).

Used by the child processes pycfs starts with a socket as their stdin: the user-namespace
helper (requests carry no fds, responses carry opened files) and the object workers
(requests carry files to hash, responses carry none). Methods are plain functions taking a
`Call` first. Two ways to dispatch:

* `validating_dispatch`: jsonrpcserver validates each request and binds its parameters. For
  the helper, whose requests cross a privilege boundary.
* `trusted_dispatch`: method lookup and keyword binding only, for the object workers, which
  run as the host's own user and only ever hear from it. It spares each worker
  jsonrpcserver's import (jsonschema and asyncio: 0.1 s of CPU per process, and a pull
  starts one worker per core).
"""

from __future__ import annotations

import inspect
import socket
import sys
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from pycfs.protocol.fdpass import FdPassError, close_fds, recv_with_fds, send_with_fds
from pycfs.protocol.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, Decoder, Message, ProtocolError, encode


@dataclass
class Call:
    """One request's context: the fds it carried (closed once the method returns), the fds
    to send with the response (closed once sent), and whether to stop after answering."""

    fds: list[int] = field(default_factory=list)
    out_fds: list[int] = field(default_factory=list)
    stop: bool = False


Dispatch = Callable[[dict[str, Any], Call], "dict[str, Any] | None"]


def validating_dispatch(methods: dict[str, Callable[..., Any]]) -> Dispatch:
    """jsonrpcserver's dispatch; methods return its Success/Error results."""
    from jsonrpcserver import dispatch_to_serializable

    def dispatch(request: dict[str, Any], call: Call) -> dict[str, Any] | None:
        # The framing layer already parsed the JSON: hand jsonrpcserver the object itself.
        # One request object in, so one response (or none, for a notification) out.
        response = dispatch_to_serializable("", methods=methods, context=call, deserializer=lambda _s: request)
        assert not isinstance(response, list)
        return response

    return dispatch


class InvalidParamsError(Exception):
    """Raised by a `trusted_dispatch` method: the error response says why."""


def trusted_dispatch(methods: dict[str, Callable[..., Any]]) -> Dispatch:
    """Dispatch for a peer of the same privilege: methods return their result or raise
    `InvalidParamsError`; params must be an object (keyword arguments)."""
    signatures = {name: inspect.signature(fn) for name, fn in methods.items()}

    def error(request: dict[str, Any], code: int, message: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": request.get("id")}

    def dispatch(request: dict[str, Any], call: Call) -> dict[str, Any] | None:
        name, params = request.get("method"), request.get("params", {})
        if request.get("jsonrpc") != "2.0" or not isinstance(name, str) or not isinstance(params, dict):
            return error(request, INVALID_REQUEST, "Invalid request")
        if name not in methods:
            return error(request, METHOD_NOT_FOUND, f"Method not found: {name}")
        try:
            signatures[name].bind(call, **params)
        except TypeError as e:
            return error(request, INVALID_PARAMS, f"Invalid params: {e}")
        try:
            result = methods[name](call, **params)
        except InvalidParamsError as e:  # a TypeError from inside the method is a bug, not bad params
            return error(request, INVALID_PARAMS, f"Invalid params: {e}")
        return {"jsonrpc": "2.0", "result": result, "id": request["id"]} if "id" in request else None

    return dispatch


def handle(dispatch: Dispatch, msg: Message) -> tuple[dict[str, Any] | None, list[int], bool]:
    """Dispatch one request: (response or None for a notification, fds to send, stop?).

    The fds to send belong to the caller, which must close them after sending; they are
    only returned with a success response.
    """
    request = {k: v for k, v in msg.obj.items() if k != "fds"}
    call = Call(fds=msg.fds)
    msg.fds = []
    try:
        response = dispatch(request, call)
    except BaseException:
        close_fds(call.out_fds)
        raise
    finally:
        close_fds(call.fds)
    if response is None or "error" in response:
        close_fds(call.out_fds)
        call.out_fds = []
    return response, call.out_fds, call.stop


def serve(sock: socket.socket, dispatch: Dispatch, *, name: str, max_message: int, max_fds: int) -> int:
    """Answer requests on ``sock`` until EOF or a method sets ``stop``; the process exit status.

    ``name`` prefixes what is printed on stderr; requests over ``max_message`` bytes or with
    more than ``max_fds`` fds end the connection with a protocol error.
    """
    decoder = Decoder(max_message, max_fds=max_fds)
    try:
        while True:
            data, fds = recv_with_fds(sock)
            if data or fds:
                decoder.feed(data, fds)
            else:
                decoder.feed_eof()
            while (msg := decoder.next_message()) is not None:
                response, out_fds, stop = handle(dispatch, msg)
                try:
                    if response is not None:
                        send_with_fds(sock, encode(response, len(out_fds), max_message), out_fds)
                finally:
                    close_fds(out_fds)
                if stop:
                    return 0
            if not data:
                return 0
    except (ProtocolError, FdPassError) as e:
        print(f"{name}: protocol error from the host: {e}", file=sys.stderr)
        try:
            reply = {"jsonrpc": "2.0", "error": {"code": e.code, "message": str(e)}, "id": None}
            send_with_fds(sock, encode(reply))
        except OSError:
            pass
        return 3
    except (BrokenPipeError, ConnectionResetError):
        print(f"{name}: the host closed the connection mid-reply", file=sys.stderr)
        return 1
    finally:
        decoder.close()
