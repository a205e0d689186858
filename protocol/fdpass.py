"""SCM_RIGHTS fd passing on AF_UNIX stream sockets: the sendmsg/recvmsg primitives.

A message's bytes go out with the first batch of its fds attached to the first byte; the
kernel takes at most ``SCM_MAX_FD`` (253) fds per sendmsg, so further batches ride on
one-space continuation writes (the jsonrpc-fdpass convention; JSON parsers skip the space).
Received fds are close-on-exec from the moment they exist (``MSG_CMSG_CLOEXEC``), and when
the kernel had to drop some (``MSG_CTRUNC``) the ones that did arrive are closed before the
error is raised, so nothing leaks.

Each operation has a blocking form (the helper: plain sockets, no event loop to import) and
an ``a``-prefixed coroutine form for trio sockets (the host), which share the same
argument handling. Neither form imports trio: the coroutines only await the socket's own
``sendmsg``/``recvmsg``/``send``.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Sequence
from typing import Any

from pycfs.protocol.errors import PycfsError

# Linux's per-sendmsg limit (include/net/scm.h).
SCM_MAX_FD = 253
# A receive buffer sized for two kernel batches: a single recvmsg never returns more than
# one sender batch, so this is ample, and MSG_CTRUNC then really means "lost fds".
RECV_MAX_FDS = 512
RECV_BUFSIZE = 65536
CONTINUATION = b" "
_FD_SIZE = array.array("i").itemsize


class FdPassError(PycfsError):
    """The kernel lost or refused fds (truncated control data, EMFILE while receiving)."""

    code = -32050  # jsonrpc-fdpass "File Descriptor Error"


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring EBADF: used on error paths that must not raise again."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def plan_batches(data: bytes, fds: Sequence[int], per_call: int = SCM_MAX_FD) -> list[tuple[bytes, list[int]]]:
    """Split one message into (payload, fds) sendmsg calls.

    The first call carries the message bytes and up to ``per_call`` fds; every further
    batch rides on a single space. A message without fds is one call without ancillary data.
    """
    if not data:
        raise ValueError("fds need at least one byte to ride on")
    if per_call < 1:
        raise ValueError("per_call must be >= 1")
    fds = list(fds)
    calls = [(data, fds[:per_call])]
    for start in range(per_call, len(fds), per_call):
        calls.append((CONTINUATION, fds[start : start + per_call]))
    return calls


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The fds in one recvmsg's control data; on truncation, close them and raise."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(arr)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise FdPassError(
            "file descriptors were lost in transit (control data truncated: "
            "the receiver hit RLIMIT_NOFILE or the sender exceeded the batch size)"
        )
    return fds


def recv_args(bufsize: int, maxfds: int) -> tuple[int, int, int]:
    """socket.recvmsg's arguments for a message of at most bufsize bytes and maxfds fds."""
    return bufsize, socket.CMSG_SPACE(maxfds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC


# ---- blocking forms (helper side) ----


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = (), per_call: int = SCM_MAX_FD, *,
                  whole_or_none: bool = False) -> bool:
    """Send one whole message and all its fds; the caller keeps ownership of ``fds``.

    EINTR is retried by Python itself (PEP 475). EINVAL on the first call (nothing sent
    yet) halves the batch size and retries, for kernels with a lower limit than 253. With
    ``whole_or_none``, another failure of the first call returns False instead of raising:
    nothing of the message went, the peer's stream is still at a message boundary (the
    user's fds in flight at the kernel's limit, say, or the peer gone).
    """
    first = True
    while True:
        try:
            for payload, batch in plan_batches(data, fds, per_call):
                sent = sock.sendmsg([payload], _rights(batch)) if batch else sock.send(payload)
                first = False
                if sent < len(payload):
                    # The fds went with the first byte; the rest follows without any.
                    sock.sendall(payload[sent:])
            return True
        except OSError as e:
            if not first:
                raise
            if e.errno == errno.EINVAL and per_call > 1:
                per_call = max(1, per_call // 2)
            elif whole_or_none:
                return False
            else:
                raise


def recv_with_fds(
    sock: socket.socket, bufsize: int = RECV_BUFSIZE, maxfds: int = RECV_MAX_FDS
) -> tuple[bytes, list[int]]:
    """One recvmsg: (bytes, fds). ``b""`` means EOF. Received fds are close-on-exec."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(*recv_args(bufsize, maxfds))
    return data, fds_from_ancdata(ancdata, msg_flags)


# ---- coroutine forms (host side, trio sockets) ----


async def asend_with_fds(sock: Any, data: bytes, fds: Sequence[int] = (), per_call: int = SCM_MAX_FD) -> None:
    """`send_with_fds` for a trio socket."""
    first = True
    while True:
        try:
            for payload, batch in plan_batches(data, fds, per_call):
                if batch:
                    sent = await sock.sendmsg([payload], _rights(batch))
                else:
                    sent = await sock.send(payload)
                first = False
                while sent < len(payload):
                    payload = payload[sent:]
                    sent = await sock.send(payload)
            return
        except OSError as e:
            if e.errno != errno.EINVAL or per_call == 1 or not first:
                raise
            per_call = max(1, per_call // 2)


async def arecv_with_fds(sock: Any, bufsize: int = RECV_BUFSIZE, maxfds: int = RECV_MAX_FDS) -> tuple[bytes, list[int]]:
    """`recv_with_fds` for a trio socket."""
    data, ancdata, msg_flags, _addr = await sock.recvmsg(*recv_args(bufsize, maxfds))
    return data, fds_from_ancdata(ancdata, msg_flags)
