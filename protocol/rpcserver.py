"""A blocking JSON-RPC server loop over one AF_UNIX socket, with fds both ways (jsonrpc-fdpass).

Used by the child processes pycfs starts with a socket as their stdin: the user-namespace
helper (requests carry no fds, responses carry opened files) and the object workers
(requests carry files to hash, responses carry none). Methods are plain functions taking a
`Call` first; jsonrpcserver does the dispatch, parameter binding and error envelopes.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from jsonrpcserver import dispatch_to_serializable

from pycfs.protocol.fdpass import FdPassError, close_fds, recv_with_fds, send_with_fds
from pycfs.protocol.jsonrpc import Decoder, Message, ProtocolError, encode


@dataclass
class Call:
    """One request's context: the fds it carried (closed once the method returns), the fds
    to send with the response (closed once sent), and whether to stop after answering."""

    fds: list[int] = field(default_factory=list)
    out_fds: list[int] = field(default_factory=list)
    stop: bool = False


def handle(methods: dict[str, Callable[..., Any]], msg: Message) -> tuple[dict[str, Any] | None, list[int], bool]:
    """Dispatch one request: (response or None for a notification, fds to send, stop?).

    The fds to send belong to the caller, which must close them after sending; they are
    only returned with a success response.
    """
    request = {k: v for k, v in msg.obj.items() if k != "fds"}
    call = Call(fds=msg.fds)
    msg.fds = []
    try:
        # The framing layer already parsed the JSON: hand jsonrpcserver the object itself.
        response = dispatch_to_serializable("", methods=methods, context=call, deserializer=lambda _s: request)
    except BaseException:
        close_fds(call.out_fds)
        raise
    finally:
        close_fds(call.fds)
    if response is None or "error" in response:
        close_fds(call.out_fds)
        call.out_fds = []
    return response, call.out_fds, call.stop


def serve(sock: socket.socket, methods: dict[str, Callable[..., Any]], *, name: str, max_message: int,
          max_fds: int) -> int:
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
                response, out_fds, stop = handle(methods, msg)
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
