"""A varlink server on trio: interfaces of async method handlers, one task per connection.

Calls on one connection are answered in order (varlink replies carry no id); connections
run side by side. When a client disconnects, the connection's tasks are cancelled, its
in-flight call with them, and every fd it sent and nobody took is closed.

A handler receives a `CallContext` and returns the reply parameters (or (parameters,
fds)); with `more` it may send `continues` replies first. A `VarlinkError` becomes an
error reply by name; any other `PycfsError` or `OSError` becomes the interface's
InternalError with the message.
"""

from __future__ import annotations

import resource
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from pycfs.host.errors import PycfsError, first_error, user_message
from pycfs.host.varlink.transport import Connection, ConnectionClosed
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.text import is_clean_text
from pycfs.protocol.varlink import (
    VarlinkError,
    VarlinkProtocolError,
    encode,
    parse_call,
    valid_interface_name,
)

SERVICE = "org.varlink.service"
# Calls read ahead of the one being answered, per connection; but once a call with fds is
# read, nothing more until it is answered: fds held for calls not yet served would fill the
# service's table (a slow PutLayer may take minutes).
PIPELINE_DEPTH = 8
# Connections served at once, at most; fewer where the open-file limit is low: a connection
# may hold a call's fds, the next call's and a third in its receive, besides the files its
# call opens (CONNECTION_FDS in all).
MAX_CONNECTIONS = 256
CONNECTION_FDS = 1024
# When every slot is taken and another client waits, the connection idle longest (no call
# queued or running, for at least this long) is closed to make room: clients that connect
# and send nothing, or half a message, cannot lock others out.
IDLE_GRACE = 1.0
# What a call may be (a reply may be larger: the client's limits): FinalizeImage carries an
# image's manifest and config as strings, KBs to ~1 MiB in practice.
CALL_MAX_MESSAGE = 8 << 20
CALL_MAX_VALUES = 100_000
# A client that takes none of a reply for this long is dropped: its connection's task would
# wait for it for ever (a send is shielded from cancellation, not to cut a message).
SEND_TIMEOUT = 120.0
# While a connection waits to read its client's next call, how often it looks whether the
# client hung up (it then cancels that client's calls).
HANGUP_POLL = 0.5

SERVICE_IDL = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""


def invalid_parameter(name: str) -> VarlinkError:
    return VarlinkError(f"{SERVICE}.InvalidParameter", {"parameter": name})


_MISSING = object()


class Params:
    """Typed access to a call's parameters; a wrong or missing one is InvalidParameter."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def _get(self, name: str, kinds: tuple[type, ...], optional: bool, default: Any) -> Any:
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            if optional:
                return default
            raise invalid_parameter(name)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise invalid_parameter(name)
        return value

    def string(self, name: str, optional: bool = False, default: str | None = None) -> Any:
        value = self._get(name, (str,), optional, default)
        if value is not None and not is_clean_text(value):
            raise invalid_parameter(name)
        return value

    def boolean(self, name: str, optional: bool = False, default: bool | None = None) -> Any:
        return self._get(name, (bool,), optional, default)

    def integer(self, name: str, optional: bool = False, default: int | None = None) -> Any:
        value = self._get(name, (int,), optional, default)
        if value is not None and not 0 <= value < 2**63:
            raise invalid_parameter(name)
        return value

    def obj(self, name: str, optional: bool = False) -> Params | None:
        value = self._get(name, (dict,), optional, None)
        return None if value is None else Params(value)

    def str_list(self, name: str, optional: bool = False) -> list[str]:
        value = self._get(name, (list,), optional, [])
        if not all(isinstance(v, str) and is_clean_text(v) for v in value):
            raise invalid_parameter(name)
        return value

    def obj_list(self, name: str) -> list[Params]:
        value = self._get(name, (list,), False, [])
        if not all(isinstance(v, dict) for v in value):
            raise invalid_parameter(name)
        return [Params(v) for v in value]


@dataclass
class CallContext:
    server: Server
    conn: Connection
    method: str
    params: Params
    more: bool
    oneway: bool
    fds: list[int]  # the call's fds: closed after the handler unless it takes them

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    async def send_continues(self, parameters: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """A non-final reply of a `more` call (the caller checked `more`)."""
        if not self.oneway:
            await self.conn.send({"parameters": parameters, "continues": True}, fds)


Result = dict[str, Any] | tuple[dict[str, Any], Sequence[int]] | None
Handler = Callable[[CallContext], Awaitable[Result]]


@dataclass
class Interface:
    name: str
    description: str
    methods: dict[str, Handler]
    internal_error: str = ""  # the error name for unexpected failures (default: <name>.InternalError)
    more_only: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not valid_interface_name(self.name):
            raise ValueError(f"bad interface name {self.name!r}")
        self.internal_error = self.internal_error or f"{self.name}.InternalError"


class Server:
    """Interfaces plus `org.varlink.service`; `nursery` holds work that outlives a call
    (a layer producer feeding a pipe the client took)."""

    def __init__(self, nursery: trio.Nursery, vendor: str, product: str, version: str, url: str) -> None:
        self.nursery = nursery
        self.info = {"vendor": vendor, "product": product, "version": version, "url": url}
        self.interfaces: dict[str, Interface] = {}
        self.add(Interface(SERVICE, SERVICE_IDL, {
            "GetInfo": self._get_info,
            "GetInterfaceDescription": self._get_description,
        }, internal_error=f"{SERVICE}.MethodNotImplemented"))
        self.connections = 0
        self.on_disconnect: list[Callable[[Connection], None]] = []  # told of each connection that closed
        self._peers: set[_Peer] = set()
        self._peers_changed = trio.Event()

    def add(self, interface: Interface) -> None:
        self.interfaces[interface.name] = interface

    async def _get_info(self, ctx: CallContext) -> Result:
        return {**self.info, "interfaces": list(self.interfaces)}

    async def _get_description(self, ctx: CallContext) -> Result:
        name = ctx.params.string("interface")
        if name not in self.interfaces:
            raise VarlinkError(f"{SERVICE}.InterfaceNotFound", {"interface": name})
        return {"description": self.interfaces[name].description}

    # -- serving --

    async def serve_listener(self, listener: trio.socket.SocketType) -> None:
        """Accept forever; each connection is its own task, at most `connection_cap()` at
        once (further clients wait in the listen backlog, or take an idle one's slot)."""
        cap = connection_cap()
        active = 0

        async def serve(sock: trio.socket.SocketType) -> None:
            nonlocal active
            try:
                await self.serve_connection(sock)
            except Exception as exc:  # one connection's failure never ends the service
                e = first_error(exc)
                if not isinstance(e, (PycfsError, OSError)):
                    traceback.print_exception(e, file=sys.stderr)  # a bug: logged, and the service goes on
                print(f"pycfs varlink: a connection failed: {user_message(e)}", file=sys.stderr)
            finally:
                active -= 1
                self._changed()

        async with trio.open_nursery() as nursery:
            while True:
                while active >= cap:
                    await self._make_room(listener)
                try:
                    sock, _ = await listener.accept()
                except OSError as e:
                    # EMFILE and friends: back off instead of spinning; the client retries.
                    print(f"pycfs varlink: accept failed: {e.strerror}", file=sys.stderr)
                    await trio.sleep(0.1)
                    continue
                active += 1
                nursery.start_soon(serve, sock)

    async def _make_room(self, listener: trio.socket.SocketType) -> None:
        """Every slot taken: once a client waits, close the connection idle longest (idle
        for IDLE_GRACE at least); return when a slot may be free."""
        changed = self._peers_changed
        with trio.move_on_after(IDLE_GRACE):  # (then look again: a peer's grace may be over)
            await trio.lowlevel.wait_readable(listener)
            now = trio.current_time()
            idle = [p for p in self._peers if p.idle_since is not None and now - p.idle_since >= IDLE_GRACE]
            if idle:
                min(idle, key=lambda p: p.idle_since or 0.0).scope.cancel()
            await changed.wait()

    async def serve_connection(self, sock: trio.socket.SocketType) -> None:
        conn = Connection(sock, send_timeout=SEND_TIMEOUT, max_message=CALL_MAX_MESSAGE, max_values=CALL_MAX_VALUES)
        self.connections += 1
        send, receive = trio.open_memory_channel[tuple[dict[str, Any], list[int]]](PIPELINE_DEPTH)
        peer = _Peer(self._changed)
        self._peers.add(peer)
        try:
            async with trio.open_nursery() as nursery:
                peer.scope = nursery.cancel_scope
                nursery.start_soon(self._answer, conn, receive, peer)
                try:
                    async with send:
                        while (msg := await conn.receive()) is not None:
                            peer.pending += 1
                            peer.idle_since = None
                            try:
                                await _watching(conn, lambda: send.send(msg))
                            except BaseException:
                                close_fds(msg[1])
                                raise
                            if msg[1]:  # answered before anything more is read (see PIPELINE_DEPTH)
                                await _watching(conn, peer.answered)
                except (VarlinkProtocolError, OSError) as e:
                    print(f"pycfs varlink: dropping a connection: {e}", file=sys.stderr)
                except ConnectionClosed:
                    pass  # the client went away: its calls are cancelled below
                # The peer is gone (or broke the protocol): stop its work.
                nursery.cancel_scope.cancel()
        finally:
            self.connections -= 1
            self._peers.discard(peer)  # (the listener hears of it when `serve` ends)
            for forget in self.on_disconnect:
                forget(conn)
            for _, fds in _drain(receive):
                close_fds(fds)
            conn.close()

    def _changed(self) -> None:
        """A connection closed or fell idle: one waiting for a slot looks again."""
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    async def _answer(self, conn: Connection, receive: trio.MemoryReceiveChannel, peer: _Peer) -> None:
        async for obj, fds in receive:
            try:
                call = parse_call(obj, fds)
            except VarlinkProtocolError as e:
                close_fds(fds)
                print(f"pycfs varlink: dropping a connection: {e}", file=sys.stderr)
                peer.scope.cancel()
                return
            try:
                await self._call(conn, call)
            except ConnectionClosed:
                peer.scope.cancel()
                return
            peer.done()

    async def _call(self, conn: Connection, call: Any) -> None:
        interface = self.interfaces.get(call.interface)
        ctx = CallContext(self, conn, call.method, Params(call.parameters), call.more, call.oneway, call.fds)
        internal = interface.internal_error if interface else f"{SERVICE}.MethodNotImplemented"
        reply_fds: Sequence[int] = ()
        try:
            if interface is None:
                raise VarlinkError(f"{SERVICE}.InterfaceNotFound", {"interface": call.interface})
            handler = interface.methods.get(call.member)
            if handler is None:
                raise VarlinkError(f"{SERVICE}.MethodNotFound", {"method": call.method})
            if call.member in interface.more_only and not call.more:
                raise VarlinkError(f"{SERVICE}.ExpectedMore")
            result = await handler(ctx)
            params, reply_fds = (result, ()) if not isinstance(result, tuple) else result
            reply: dict[str, Any] = {"parameters": params or {}}
        except Exception as exc:  # every failure becomes an error reply
            e = first_error(exc)  # a handler's nursery may wrap it in a group
            if isinstance(e, VarlinkError):
                reply = {"error": e.name, "parameters": e.parameters}
            else:
                if not isinstance(e, (PycfsError, OSError)):
                    traceback.print_exception(e, file=sys.stderr)  # a bug: log it, and still answer
                reply = {"error": internal, "parameters": {"message": user_message(e)}}
        finally:
            # Before the reply: a client that got its answer finds the fds it sent closed.
            close_fds(ctx.take_fds())
        try:
            if not call.oneway:
                try:
                    message = encode(reply)
                except UnicodeEncodeError as e:  # a file name that is not UTF-8 text: JSON cannot carry it
                    close_fds(list(reply_fds))
                    reply_fds = ()
                    around = e.object[max(e.start - 40, 0) : e.end + 10] if isinstance(e.object, str) else ""
                    message = encode({"error": internal, "parameters": {"message": (
                        f"cannot send the reply: it holds a name that is not UTF-8 text ({around!r}); "
                        "rename it, or remove it with `pycfs fsck --repair`")}})
                await conn.send_encoded(message, reply_fds)
        finally:
            close_fds(list(reply_fds))


class _Peer:
    """A connection's calls, as its reader and answerer and the listener see them."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.scope = trio.CancelScope()  # the connection's (set once it runs): cancelled, it ends
        self.pending = 0  # calls read and not yet answered
        self.idle_since: float | None = trio.current_time()  # none pending since (None: busy)
        self._changed = changed
        self._answered = trio.Event()

    def done(self) -> None:
        self.pending -= 1
        if not self.pending:
            self.idle_since = trio.current_time()
            self._answered.set()
            self._answered = trio.Event()
            self._changed()

    async def answered(self) -> None:
        """Until every call read is answered."""
        while self.pending:
            await self._answered.wait()


async def _watching(conn: Connection, wait: Callable[[], Awaitable[object]]) -> None:
    """await wait(), looking every HANGUP_POLL whether the client hung up meanwhile
    (ConnectionClosed): a reader that stopped reading would not see it, and the client's
    calls would run on for nobody."""
    while True:
        with trio.move_on_after(HANGUP_POLL):
            await wait()
            return
        if conn.hung_up():
            raise ConnectionClosed(f"{conn.peer} hung up")


def connection_cap() -> int:
    """Connections served at once: MAX_CONNECTIONS, or fewer to fit the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(MAX_CONNECTIONS, max(4, soft // CONNECTION_FDS))


def _drain(receive: trio.MemoryReceiveChannel) -> list[tuple[dict[str, Any], list[int]]]:
    out = []
    while True:
        try:
            out.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out
