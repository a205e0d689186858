"""Varlink connections on trio AF_UNIX stream sockets, with SCM_RIGHTS fd passing.

Addresses are `unix:PATH`. A service may also be socket-activated (systemd's
LISTEN_FDS/LISTEN_PID, first fd = 3): a listening socket is accepted on, an already
connected one (`varlinkctl call exec:...`, inetd style) is served as one connection.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio
from pycfs.host.errors import PycfsError
from pycfs.protocol.fdpass import FdPassError, arecv_with_fds, asend_with_fds, close_fds
from pycfs.protocol.varlink import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_VALUES,
    MAX_FDS_PER_MESSAGE,
    Decoder,
    VarlinkProtocolError,
    encode,
)

SD_LISTEN_FDS_START = 3


class ConnectionClosed(PycfsError):
    pass


def parse_address(address: str) -> str:
    """`unix:PATH` -> PATH (the only transport here; fd passing needs AF_UNIX)."""
    scheme, sep, path = address.partition(":")
    if not sep or scheme != "unix" or not path:
        raise PycfsError(f"unsupported varlink address {address!r}: use unix:PATH")
    return path.split(";", 1)[0]


class Connection:
    """One varlink peer: whole messages in, whole messages out, fds attached."""

    def __init__(self, sock: trio.socket.SocketType, peer: str = "peer", send_timeout: float | None = None,
                 max_message: int = DEFAULT_MAX_MESSAGE, max_values: int = DEFAULT_MAX_VALUES) -> None:
        self.sock = sock
        self.peer = peer
        # How long one message may take to go out (None: as long as it takes); past it the
        # peer, which is not reading, is dropped
        self._send_timeout = send_timeout
        self._decoder = Decoder(max_message, max_values)
        self._queue: collections.deque[tuple[dict[str, Any], list[int]]] = collections.deque()
        self._eof = False
        self._send_lock = trio.Lock()

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its fds (now the caller's), or None when the peer closed."""
        while not self._queue:
            if self._eof:
                return None
            try:
                data, fds = await arecv_with_fds(self.sock)
            except FdPassError as e:
                raise VarlinkProtocolError(str(e)) from None
            except ConnectionResetError:
                data, fds = b"", []
            if not data and not fds:
                self._eof = True
                self._decoder.eof()
                continue
            self._decoder.feed(data, fds)
            self._queue.extend(self._decoder.messages())
        return self._queue.popleft()

    def peer_uid(self) -> int:
        """The uid of the process at the other end (SO_PEERCRED: as it was when it connected
        or listened, in this user namespace)."""
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", raw)[1])

    def hung_up(self) -> bool:
        """Whether the peer closed its end (or reset it), seen without reading anything."""
        events = select.poll()
        events.register(self.sock.fileno(), select.POLLRDHUP)
        return any(e & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, e in events.poll(0))

    async def send(self, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send one message; the fds stay the caller's (the peer gets copies)."""
        await self.send_encoded(encode(obj), fds)

    async def send_encoded(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """`send` of a message `encode` made."""
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise ValueError(f"{len(fds)} fds in one varlink message (at most {MAX_FDS_PER_MESSAGE})")
        async with self._send_lock:
            # A message cut half way would desynchronise the stream for good: no cancellation
            # from outside, and a message cut by the timeout ends the connection.
            deadline = trio.current_time() + self._send_timeout if self._send_timeout is not None else math.inf
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                try:
                    await asend_with_fds(self.sock, message, fds)
                except (BrokenPipeError, ConnectionResetError):
                    raise ConnectionClosed(f"{self.peer} closed the connection") from None
            if scope.cancelled_caught:
                with contextlib.suppress(OSError):  # (ENOTCONN: the peer is gone already)
                    self.sock.shutdown(socket.SHUT_RDWR)
                raise ConnectionClosed(f"{self.peer} did not take a message within {self._send_timeout:g} seconds: dropped")

    def close(self) -> None:
        for _, fds in self._queue:
            close_fds(fds)
        self._queue.clear()
        self._decoder.close()
        self.sock.close()


def _trio_socket(sock: socket.socket) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(sock)


async def connect(address: str) -> Connection:
    path = parse_address(address)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as e:
        sock.close()
        raise PycfsError(f"cannot connect to varlink service {address}: {e.strerror}") from None
    return Connection(sock, address)


def socketpair() -> tuple[Connection, trio.socket.SocketType]:
    """An in-process link: (client connection, server-side socket)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(_trio_socket(a), "in-process service"), _trio_socket(b)


def listen(address: str) -> trio.socket.SocketType:
    """Bind and listen on unix:PATH, replacing a stale socket file (never another file, nor
    the socket of a service still listening there)."""
    path = parse_address(address)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise PycfsError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nothing listens there: a stale file a killed service left
        except OSError as e:  # (a full backlog, a slow service: someone is there)
            raise PycfsError(f"{path} is a socket something may still listen on ({e.strerror or e}): stop it first, "
                             "or choose another address") from None
        else:
            raise PycfsError(f"a service is listening on {path} already: stop it first, or choose another address")
        finally:
            probe.close()
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise PycfsError(f"cannot listen on {path}: {e.strerror}") from None
    return _trio_socket(sock)


def activation_socket() -> tuple[trio.socket.SocketType, bool] | None:
    """The socket systemd (or a test harness) passed as fd 3, and whether it is listening;
    None without activation. The variables are removed so children do not inherit them."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not count.isdigit() or int(count) < 1:
        raise PycfsError(f"socket activation: LISTEN_FDS={count!r} passes no socket")
    fd = SD_LISTEN_FDS_START
    os.set_inheritable(fd, False)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise PycfsError(f"socket activation: fd {fd} is not a socket ({e.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise PycfsError(f"socket activation: fd {fd} is not an AF_UNIX stream socket")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    return _trio_socket(sock), listening
