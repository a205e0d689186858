"""SCM_RIGHTS primitives over real socketpairs: batching, close-on-exec, truncation, leaks."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

from fdcount import enough_fds, open_fd_count  # noqa: F401 (enough_fds is an autouse fixture)
import trio

from pycfs.protocol.fdpass import (
    CONTINUATION,
    SCM_MAX_FD,
    FdPassError,
    arecv_with_fds,
    asend_with_fds,
    close_fds,
    plan_batches,
    recv_with_fds,
    send_with_fds,
)
import functools
import operator


def make_files(n: int) -> list[int]:
    """n fds of distinct memfds, each holding its own index, for identity checks."""
    fds = []
    for i in range(n):
        fd = os.memfd_create(f"t{i}", os.MFD_CLOEXEC)
        os.write(fd, str(i).encode())
        fds.append(fd)
    return fds


def identities(fds: list[int]) -> list[tuple[int, int]]:
    return [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds]


def recv_all(sock: socket.socket, nbytes: int, **kw) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while len(data) < nbytes:
        chunk, got = recv_with_fds(sock, **kw)
        assert chunk, "unexpected EOF"
        data += chunk
        fds += got
    return data, fds


def test_plan_batches_splits_fds_onto_space_continuations():
    calls = plan_batches(b'{"a":1}', list(range(600)))
    assert [(p, len(f)) for p, f in calls] == [(b'{"a":1}', 253), (CONTINUATION, 253), (CONTINUATION, 94)]
    assert functools.reduce(operator.iadd, (f for _, f in calls), []) == list(range(600))
    assert plan_batches(b"x", []) == [(b"x", [])]
    with pytest.raises(ValueError):
        plan_batches(b"", [1])


def test_thousand_fds_arrive_in_order_and_cloexec():
    a, b = socket.socketpair()
    before = open_fd_count()
    sent = make_files(1000)
    try:
        t = threading.Thread(target=send_with_fds, args=(a, b"hello", sent))
        t.start()
        data, got = recv_all(b, len(b"hello") + 3, bufsize=1 << 16)  # 3 continuation spaces
        t.join()
        assert data == b"hello   "
        assert len(got) == 1000
        assert identities(got) == identities(sent)
        assert os.pread(got[999], 10, 0) == b"999"
        assert not any(os.get_inheritable(fd) for fd in got)
        close_fds(got)
    finally:
        close_fds(sent)
        a.close()
        b.close()
    assert open_fd_count() == before - 2  # the socketpair existed before counting


def test_one_byte_reads_get_fds_with_the_first_byte():
    a, b = socket.socketpair()
    sent = make_files(3)
    try:
        send_with_fds(a, b"abc", sent)
        first, fds = recv_with_fds(b, bufsize=1)
        assert first == b"a" and len(fds) == 3
        assert recv_with_fds(b, bufsize=1) == (b"b", [])
        assert recv_with_fds(b, bufsize=1) == (b"c", [])
        assert identities(fds) == identities(sent)
        close_fds(fds)
    finally:
        close_fds(sent)
        a.close()
        b.close()


def test_truncated_control_data_closes_what_arrived_and_raises():
    a, b = socket.socketpair()
    sent = make_files(10)
    try:
        send_with_fds(a, b"x", sent)
        before = open_fd_count()
        with pytest.raises(FdPassError, match="lost in transit"):
            recv_with_fds(b, maxfds=2)
        assert open_fd_count() == before
    finally:
        close_fds(sent)
        a.close()
        b.close()


def test_kernel_limit_einval_halves_the_batch():
    a, b = socket.socketpair()
    sent = make_files(300)
    try:
        # 300 > SCM_MAX_FD: the kernel says EINVAL, the sender retries with 150 per call.
        send_with_fds(a, b"m", sent, per_call=300)
        data, got = recv_all(b, 2)
        assert data == b"m " and len(got) == 300
        assert identities(got) == identities(sent)
        close_fds(got)
    finally:
        close_fds(sent)
        a.close()
        b.close()
    assert SCM_MAX_FD == 253


def test_large_payload_with_fds_survives_partial_sends():
    a, b = socket.socketpair()
    payload = os.urandom(3 << 20)  # far beyond the socket buffer: sendmsg returns short
    sent = make_files(5)
    try:
        t = threading.Thread(target=send_with_fds, args=(a, payload, sent))
        t.start()
        data, got = recv_all(b, len(payload))
        t.join()
        assert data == payload
        assert identities(got) == identities(sent)
        close_fds(got)
    finally:
        close_fds(sent)
        a.close()
        b.close()


def test_trio_forms_round_trip_many_fds():
    sent = make_files(700)

    async def main():
        a, b = trio.socket.socketpair()
        with a, b:
            payload = b"z" * 200_000
            received: list[int] = []
            data = b""

            async def receiver():
                nonlocal data
                while len(data) < len(payload) + 2:
                    chunk, fds = await arecv_with_fds(b)
                    assert chunk
                    data += chunk
                    received.extend(fds)

            async with trio.open_nursery() as n:
                n.start_soon(receiver)
                await asend_with_fds(a, payload, sent)
            return data, received

    try:
        data, got = trio.run(main)
        assert data == b"z" * 200_000 + b"  "
        assert identities(got) == identities(sent)
        close_fds(got)
    finally:
        close_fds(sent)


class _Refusing:
    """A socket whose every send fails as the kernel does with too many fds in flight."""

    def sendmsg(self, *args):
        raise OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))

    send = sendall = sendmsg


def test_whole_or_none_says_false_only_when_nothing_went():
    a, b = socket.socketpair()
    b.close()
    try:
        with pytest.raises(BrokenPipeError):  # the specific error, as callers catch it
            send_with_fds(a, b"m", [])
        assert send_with_fds(a, b"m", [], whole_or_none=True) is False
    finally:
        a.close()
    with pytest.raises(OSError) as e:
        send_with_fds(_Refusing(), b"m", [0])
    assert e.value.errno == errno.ETOOMANYREFS
    assert send_with_fds(_Refusing(), b"m", [0], whole_or_none=True) is False
    a, b = socket.socketpair()
    try:
        assert send_with_fds(a, b"m", [], whole_or_none=True) is True
        assert b.recv(10) == b"m"
    finally:
        a.close()
        b.close()
