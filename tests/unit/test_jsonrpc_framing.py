"""jsonrpc-fdpass framing: the incremental decoder fed by hand and over real sockets.

Every error case also checks that no fd leaked (the count of /proc/self/fd before/after).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest

from fdcount import enough_fds, open_fd_count  # noqa: F401 (enough_fds is an autouse fixture)
from hypothesis import given, settings
from hypothesis import strategies as st

from pycfs.protocol.fdpass import close_fds, recv_with_fds, send_with_fds
from pycfs.protocol.jsonrpc import Decoder, FdError, FramingError, Message, encode


@pytest.fixture
def no_leak():
    before = open_fd_count()
    yield
    assert open_fd_count() == before, "fds leaked"


def dup_null(n: int) -> list[int]:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [os.dup(fd) for _ in range(n)]
    finally:
        os.close(fd)


def drain(dec: Decoder) -> list[Message]:
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


def req(i: int, **extra) -> dict:
    return {"jsonrpc": "2.0", "method": "m", "params": {"i": i, **extra}, "id": i}


# ---- encoding ----


def test_encode_adds_fds_count_and_is_compact_ascii():
    assert encode({"jsonrpc": "2.0", "id": 1, "result": "é"}, 2) == b'{"jsonrpc":"2.0","id":1,"result":"\\u00e9","fds":2}'
    assert b"fds" not in encode({"jsonrpc": "2.0", "id": 1, "fds": 3}, 0)
    with pytest.raises(FramingError, match="exceeds"):
        encode({"x": "a" * 100}, max_size=50)


def test_undecodable_names_round_trip_as_surrogate_escapes(no_leak):
    name = os.fsdecode(b"caf\xe9/\xff\xfe")
    dec = Decoder()
    dec.feed(encode(req(1, path=name)))
    (m,) = drain(dec)
    assert os.fsencode(m.obj["params"]["path"]) == b"caf\xe9/\xff\xfe"


# ---- assembling messages ----


def test_several_messages_in_one_read_with_whitespace(no_leak):
    dec = Decoder()
    dec.feed(b" \n" + encode(req(1)) + b"\t\r\n" + encode(req(2)) + encode(req(3)) + b"  ")
    msgs = drain(dec)
    assert [m.obj["id"] for m in msgs] == [1, 2, 3]
    dec.feed_eof()
    assert dec.next_message() is None


def test_one_byte_feeds_with_fds_on_first_byte_and_strings_with_braces(no_leak):
    tricky = {"jsonrpc": "2.0", "id": 7, "result": {"s": 'a}"{\\', "l": [1, {"x": "]"}]}}
    stream = [(encode(tricky, 2), 2), (encode(req(8)), 0), (encode(req(9), 1), 1)]
    dec = Decoder()
    got: list[Message] = []
    for data, nfds in stream:
        fds = dup_null(nfds)
        for i in range(len(data)):
            dec.feed(data[i : i + 1], fds if i == 0 else [])
            got += drain(dec)
    assert [m.obj["id"] for m in got] == [7, 8, 9]
    assert got[0].obj["result"] == tricky["result"]
    assert [len(m.fds) for m in got] == [2, 0, 1]
    for m in got:
        m.close()


def test_fds_arriving_after_the_json_on_continuations(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 5), dup_null(2))
    assert dec.next_message() is None  # complete JSON, 3 fds still missing
    dec.feed(b" ", dup_null(2))
    assert dec.next_message() is None
    dec.feed(b" ", dup_null(1))
    (m,) = drain(dec)
    assert len(m.fds) == 5
    m.close()


def test_message_split_across_feeds_keeps_fds_that_came_early(no_leak):
    data = encode(req(1, pad="x" * 100), 3)
    dec = Decoder()
    dec.feed(data[:10], dup_null(3))  # fds ride on the first bytes, JSON not complete
    assert dec.next_message() is None
    dec.feed(data[10:])
    (m,) = drain(dec)
    assert len(m.fds) == 3
    m.close()


# ---- errors: fatal, and nothing leaks ----


@pytest.mark.parametrize(
    "garbage",
    [b"hello", b"[1,2]", b'{"a": tru}', b'{"a": 1]', b'{"a": "\xff"}', b"{" * 100 + b"}" * 100, b"123 "],
)
def test_garbage_is_a_framing_error_that_closes_queued_fds(garbage, no_leak):
    dec = Decoder()
    dec.feed(garbage, dup_null(2))
    with pytest.raises(FramingError):
        dec.next_message()
    assert dec.pending_fds == 0
    with pytest.raises(FramingError):  # stays failed
        dec.next_message()
    with pytest.raises(FramingError):
        dec.feed(b"{}", dup_null(1))  # later fds are refused and closed too
    assert dec.pending_fds == 0


def test_more_fds_than_declared_on_the_message(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 1), dup_null(3))
    with pytest.raises(FdError, match="declares 1 fds but 3"):
        dec.next_message()


def test_more_fds_than_declared_arriving_on_a_continuation(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 1), dup_null(1))
    (m,) = drain(dec)
    m.close()
    dec.feed(b" ", dup_null(2))  # an extra batch after the message was complete
    assert dec.next_message() is None
    dec.feed(encode(req(2)))  # ... is counted against the next message, which declares none
    with pytest.raises(FdError, match="declares 0 fds but 2 arrived"):
        dec.next_message()
    # The same, found at end of stream.
    dec2 = Decoder()
    dec2.feed(encode(req(1)) + b" ")
    drain(dec2)
    dec2.feed(b" ", dup_null(1))
    dec2.feed_eof()
    with pytest.raises(FdError, match="more than the last one declared"):
        dec2.next_message()


def test_fewer_fds_than_declared_before_the_next_message(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 4), dup_null(3))
    assert dec.next_message() is None
    dec.feed(b"  " + encode(req(2)))
    with pytest.raises(FdError, match="only 3 arrived before the next message"):
        dec.next_message()


def test_fewer_fds_than_declared_at_end_of_stream(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 2), dup_null(1))
    assert dec.next_message() is None
    dec.feed_eof()
    with pytest.raises(FdError, match="before the stream ended"):
        dec.next_message()


def test_fds_for_the_next_message_are_not_taken_by_this_one(no_leak):
    # One read may hold the end of message 1 and the fd-carrying start of message 2.
    one, two = encode(req(1)), encode(req(2), 2)
    dec = Decoder()
    dec.feed(one[:5])
    dec.feed(one[5:] + two[:3], dup_null(2))
    (m1,) = drain(dec)
    assert m1.fds == []
    dec.feed(two[3:])
    (m2,) = drain(dec)
    assert len(m2.fds) == 2
    m2.close()


def test_truncated_message_at_eof_and_stray_fds(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1))[:-1])
    dec.feed_eof()
    with pytest.raises(FramingError, match="middle of a message"):
        dec.next_message()
    dec2 = Decoder()
    dec2.feed(b"   ", dup_null(2))
    dec2.feed_eof()
    with pytest.raises(FdError, match="without a message"):
        dec2.next_message()


def test_limits_message_size_and_fd_count(no_leak):
    dec = Decoder(max_message=1000)
    dec.feed(b'{"jsonrpc":"2.0","x":"' + b"a" * 2000)  # refused before it ever completes
    with pytest.raises(FramingError, match="1000-byte limit"):
        dec.next_message()
    dec2 = Decoder(max_fds=4)
    dec2.feed(encode(req(1), 5))
    with pytest.raises(FdError, match="limit of 4"):
        dec2.next_message()
    dec3 = Decoder(max_fds=4)
    with pytest.raises(FdError, match="more than 4 fds queued"):
        dec3.feed(b"{", dup_null(5))
    for bad in (-1, True, "2", 1.5):
        d = Decoder()
        d.feed(json.dumps({"jsonrpc": "2.0", "id": 1, "fds": bad}).encode())
        with pytest.raises(FdError, match="non-negative integer"):
            d.next_message()


def test_close_releases_everything_queued(no_leak):
    dec = Decoder()
    dec.feed(encode(req(1), 3)[:4], dup_null(3))
    assert dec.pending_fds == 3
    dec.close()
    assert dec.pending_fds == 0


# ---- over real sockets ----


def pump(sock: socket.socket, dec: Decoder, bufsize: int) -> list[Message]:
    out = []
    while True:
        data, fds = recv_with_fds(sock, bufsize=bufsize)
        if data or fds:
            dec.feed(data, fds)
        else:
            dec.feed_eof()
        out += drain(dec)
        if not data:
            return out


@pytest.mark.parametrize("bufsize", [1, 7, 65536])
def test_thousands_of_fds_across_many_messages(bufsize, no_leak):
    counts = [0, 1, 253, 254, 600, 3, 0, 900, 2, 506] * 2  # 5038 fds in 20 messages
    a, b = socket.socketpair()
    src = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    null_ino = os.fstat(src).st_ino

    def sender():
        with a:
            for i, n in enumerate(counts):
                fds = [os.dup(src) for _ in range(n)]
                try:
                    send_with_fds(a, encode(req(i, pad="p" * i), n), fds)
                finally:
                    close_fds(fds)

    t = threading.Thread(target=sender)
    t.start()
    try:
        with b:
            msgs = pump(b, Decoder(max_fds=1000), bufsize)
    finally:
        t.join()
        os.close(src)
    assert [m.obj["id"] for m in msgs] == list(range(len(counts)))
    assert [len(m.fds) for m in msgs] == counts
    assert sum(counts) == 5038
    assert all(os.fstat(fd).st_ino == null_ino for m in msgs for fd in m.fds)
    for m in msgs:
        m.close()


def test_receiving_through_a_storm_of_signals(no_leak):
    """recvmsg interrupted by signals (EINTR) is retried; nothing is lost or duplicated."""
    a, b = socket.socketpair()
    fired = 0

    def on_alarm(signum, frame):
        nonlocal fired
        fired += 1

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    stop = threading.Event()

    def sender():
        with a:
            for i in range(300):
                fds = dup_null(i % 4)
                try:
                    send_with_fds(a, encode(req(i), len(fds)), fds)
                finally:
                    close_fds(fds)
                if i % 50 == 0:
                    stop.wait(0.01)  # let the receiver block in recvmsg

    t = threading.Thread(target=sender)
    t.start()
    try:
        with b:
            msgs = pump(b, Decoder(), 64)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        t.join()
    assert fired > 0
    assert [m.obj["id"] for m in msgs] == list(range(300))
    assert [len(m.fds) for m in msgs] == [i % 4 for i in range(300)]
    for m in msgs:
        m.close()


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10),
)
def test_any_read_sizes_give_the_same_messages(counts, sizes):
    before = open_fd_count()
    a, b = socket.socketpair()
    with a, b:
        for i, n in enumerate(counts):
            fds = dup_null(n)
            try:
                send_with_fds(a, b"\n" * (i % 2) + encode(req(i, s="}" * i), n), fds, per_call=4)
            finally:
                close_fds(fds)
        a.shutdown(socket.SHUT_WR)
        dec = Decoder()
        msgs: list[Message] = []
        k = 0
        while True:
            data, fds = recv_with_fds(b, bufsize=sizes[k % len(sizes)])
            k += 1
            if not data:
                dec.feed_eof()
                msgs += drain(dec)
                break
            dec.feed(data, fds)
            msgs += drain(dec)
    assert [(m.obj["id"], len(m.fds)) for m in msgs] == list(enumerate(counts))
    for m in msgs:
        m.close()
    assert open_fd_count() == before
