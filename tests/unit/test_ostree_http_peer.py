"""HttpRepo against hostile HTTP peers (a raw socket server in a thread, scripted per
connection): an endless error page, and a body or headers dripped a byte at a time, are
each bounded in what they make the pull read and how long they hold it. Redirects: kept
connections per origin, a bounded number of origins, retries, https never down to http."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from memtrace import peak_of
from pycfs.host.ostree import source
from pycfs.host.ostree.objects import OstreeError
from pycfs.host.ostree.source import HttpRepo


class Peer:
    """Accepts connections on 127.0.0.1 and answers each request with `script`; counts the
    bytes it managed to send."""

    def __init__(self, script: Callable[[Peer, socket.socket], None]) -> None:
        self.script = script
        self.sent = 0
        self.connections = 0
        self.request = b""  # the last request's bytes
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/repo"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while request := conn.recv(65536):  # a request (each fits one recv), until the client closes
                    self.request = request
                    self.script(self, conn)
            except OSError:
                pass  # the client went away

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def drip(self, conn: socket.socket, data: bytes, pause: float = 0.02) -> None:
        for i in range(len(data)):
            if self._stop.is_set():
                return
            self.send(conn, data[i:i + 1])
            time.sleep(pause)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def peer() -> Iterator[Callable[[Callable[[Peer, socket.socket], None]], Peer]]:
    made: list[Peer] = []

    def make(script: Callable[[Peer, socket.socket], None]) -> Peer:
        made.append(Peer(script))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def quick_limits(monkeypatch) -> None:
    monkeypatch.setattr(source, "LOW_SPEED_TIME", 0.5)
    monkeypatch.setattr(source, "LOW_SPEED_LIMIT", 1000)


def test_a_plain_answer_is_read(peer):
    p = peer(lambda p, c: p.send(c, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    repo = HttpRepo(p.url, attempts=1)
    try:
        assert repo.fetch_optional("summary", 100) == b"hello"
        assert repo.fetch_optional("summary", 100) == b"hello"
    finally:
        repo.close()
    assert p.connections == 1  # the second on the connection kept


def test_an_endless_error_page_is_not_read_to_its_end(peer):
    def endless_404(p: Peer, conn: socket.socket) -> None:
        p.send(conn, b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n")
        while p.sent < 64 << 20:
            p.send(conn, bytes(64 << 10))

    p = peer(endless_404)
    repo = HttpRepo(p.url, attempts=1)
    try:
        assert repo.fetch_optional("summary", 100) is None
    finally:
        repo.close()
    time.sleep(0.2)  # the peer's last send fails once the client closed
    assert p.sent < 32 << 20


_SLOW_HEAD = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 200 + b"\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("serve, most_sent", [
    # a body: the headers come, then not all 200 bytes of the body
    (lambda p, c: (p.send(c, b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n"), p.drip(c, b"x" * 200)), 100 + 80),
    (lambda p, c: p.drip(c, _SLOW_HEAD), 100),  # the headers themselves
], ids=["body", "headers"])  # fmt: skip
def test_a_peer_dripping_a_byte_at_a_time_is_dropped(peer, quick_limits, serve, most_sent):
    p = peer(serve)
    repo = HttpRepo(p.url, attempts=1)
    try:
        with pytest.raises(OstreeError, match="failed after 1 attempts: less than 1000 bytes a second"):
            repo.fetch_optional("summary", 1000)
    finally:
        repo.close()
    assert p.sent < most_sent


_CONTINUE = b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"
_LAST_CHUNK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
_TRAILER = b"X-Trailer: " + b"a" * 100 + b"\r\n"


def _endless(first: bytes, line: bytes, pause: float, most: int) -> Callable[[Peer, socket.socket], None]:
    """first, then line again and again (every `pause` seconds) until `most` bytes are sent:
    a server http.client would go on reading for ever (before: until the peer stopped)."""
    def script(p: Peer, c: socket.socket) -> None:
        p.send(c, first)
        while p.sent < most:
            p.send(c, line)
            if pause:
                time.sleep(pause)
    return script


@pytest.mark.parametrize("first, line", [(b"", _CONTINUE), (_LAST_CHUNK, _TRAILER)], ids=["interim", "trailer"])
def test_endless_interim_replies_or_trailers_are_bounded_in_bytes(peer, first, line):
    p = peer(_endless(first, line, 0, 8 << 20))
    repo = HttpRepo(p.url, attempts=1)
    try:
        with pytest.raises(OstreeError, match=r"failed after 1 attempts: more than \d+ bytes of "
                                              "status, header or trailer lines$"):
            repo.fetch_optional("summary", 1000)
    finally:
        repo.close()


@pytest.mark.parametrize("first, line", [(b"", _CONTINUE), (_LAST_CHUNK, _TRAILER)], ids=["interim", "trailer"])
def test_endless_interim_replies_or_trailers_are_bounded_in_time(peer, quick_limits, first, line):
    """Lines faster than the low-speed limit (120 bytes every 10 ms), too few to reach
    MAX_LINES: the run of lines ends at LOW_SPEED_TIME, with a retry as for a slow server."""
    p = peer(_endless(first, line, 0.01, 400 * len(line)))  # about 4 s of them
    repo = HttpRepo(p.url, attempts=2, backoff=0.01)
    started = time.monotonic()
    try:
        with pytest.raises(OstreeError, match="failed after 2 attempts: status, header or trailer lines for more "
                                              "than 0.5 seconds$"):
            repo.fetch_optional("summary", 1000)
    finally:
        repo.close()
    assert time.monotonic() - started < 2.5 and p.connections == 2


def test_a_body_of_many_chunks_is_no_run_of_lines(peer, monkeypatch):
    """Each chunk's size line is followed by body bytes, which start a new run: a body of
    more chunk-size lines than MAX_LINES allows in a row is read whole."""
    monkeypatch.setattr(source, "MAX_LINES", 1000)
    body = b"".join(b"1\r\n%c\r\n" % (48 + i % 10) for i in range(2000)) + b"0\r\n\r\n"
    p = peer(lambda p, c: p.send(c, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body))
    repo = HttpRepo(p.url, attempts=1)
    try:
        assert repo.fetch_optional("summary", 4000) == bytes(48 + i % 10 for i in range(2000))
    finally:
        repo.close()


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_a_body_costs_about_its_size_however_it_is_served(peer, framing):
    """A body in 1-byte chunks (before: a list of 1-byte objects, ~88 times its size), with
    a Content-Length, or up to the connection's end, is gathered in one buffer."""
    body = os.urandom(200_000)
    if framing == "chunked":
        head, wire = b"Transfer-Encoding: chunked", b"".join(b"1\r\n%c\r\n" % b for b in body) + b"0\r\n\r\n"
    else:
        head, wire = (b"Content-Length: %d" % len(body) if framing == "length" else b"Connection: close"), body
    p = peer(lambda p, c: (p.send(c, b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n"),
                           [p.send(c, wire[i:i + 4096]) for i in range(0, len(wire), 4096)],
                           framing == "close" and c.close()))
    repo = HttpRepo(p.url, attempts=1)
    got: list[bytes | None] = []
    try:
        repo.fetch_optional("summary", 1 << 20)  # (the modules a fetch imports, not measured)
        peak = peak_of(lambda: got.append(repo.fetch_optional("summary", 1 << 20)))
    finally:
        repo.close()
    # (a read of a body without a length allocates READ_CHUNK, then keeps what came)
    assert got == [body] and peak < 3 * len(body) + source.READ_CHUNK


def test_time_the_reader_spends_between_reads_is_not_the_servers(quick_limits):
    """The low-speed limit judges the server: a reader that takes longer than the window
    between two reads of bytes already sent (inflating, hashing, writing) is not dropped."""
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(5)
        theirs.sendall(b"a" * 300 + b"b" * 300)
        reader = source._PacedSocketReader(ours, ours.makefile("rb"))
        buf = bytearray(300)
        assert reader.readinto(buf) == 300 and buf == b"a" * 300
        time.sleep(0.7)  # past the 0.5 s window, with 300 of its 500 bytes come
        assert reader.readinto(buf) == 300 and buf == b"b" * 300
    finally:
        ours.close()
        theirs.close()


def _answer(body: bytes) -> Callable[[Peer, socket.socket], None]:
    return lambda p, c: p.send(c, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def _moved(location: Callable[[str], str], status: int = 302) -> Callable[[Peer, socket.socket], None]:
    """Each request redirected to location(its path)."""
    def script(p: Peer, c: socket.socket) -> None:
        path = p.request.split(b" ")[1].decode()
        p.send(c, b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 4\r\n\r\nbody"
               % (status, location(path).encode()))
    return script


def test_redirected_connections_are_kept_per_origin_and_bounded(peer):
    mirrors = [peer(_answer(b"mirror %d" % i)) for i in range(source.MAX_ORIGINS + 2)]
    front = peer(_moved(lambda path: mirrors[int(path.rsplit("/", 1)[1])].url + path))
    repo = HttpRepo(front.url, attempts=1)
    try:
        for i in range(len(mirrors)):  # the first two mirrors' connections closed for the last ones
            assert repo.fetch_optional(str(i), 100) == b"mirror %d" % i
        assert len(repo._idle) == source.MAX_ORIGINS + 1  # (the front's own, and the others)
        for i in reversed(range(len(mirrors))):  # the last ones' kept, the first one's opened again
            assert repo.fetch_optional(str(i), 100) == b"mirror %d" % i
        assert front.connections == 1
        assert [m.connections for m in mirrors] == [2, 2] + [1] * source.MAX_ORIGINS
        assert len(repo._idle) == source.MAX_ORIGINS + 1
        assert repo.requests == 2 * 2 * len(mirrors)
    finally:
        repo.close()


def test_a_failure_after_a_redirect_is_retried_from_the_first_url(peer):
    answers = iter([b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    mirror = peer(lambda p, c: p.send(c, next(answers)))
    front = peer(_moved(lambda path: mirror.url + "/x", 307))
    repo = HttpRepo(front.url, attempts=2, backoff=0.01)
    try:
        assert repo.fetch_optional("summary", 100) == b"ok"
        assert repo.requests == 4 and front.connections == 1
    finally:
        repo.close()
    failing = peer(lambda p, c: p.send(c, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"))
    front = peer(_moved(lambda path: failing.url + "/y"))
    repo = HttpRepo(front.url, attempts=2, backoff=0.01)
    try:
        with pytest.raises(OstreeError) as e:
            repo.fetch_optional("summary", 100)
    finally:
        repo.close()
    assert str(e.value) == (f"fetching summary from {front.url} failed after 2 attempts: "
                            f"HTTP 503 Busy from {failing.url}/y")


@pytest.mark.parametrize("location, error", [
    ("http://mirror.example/repo/summary",
     "leads to 'http://mirror.example/repo/summary': refused, a redirect from https to plain http would drop TLS"),
    ("//mirror.example:8443/r#f", "https://mirror.example:8443/r"),  # scheme-relative: https kept
    ("https://[::1]:443/r?a=b", "https://[::1]/r?a=b"),
    ("r2", "https://origin.example/repo/r2"),
    ("/r space", "has an invalid Location '/r space'"),
    ("https://h\u00e9/", "has an invalid Location"),
])  # fmt: skip
def test_redirect_targets(location, error):
    origin = ("https", "origin.example", 443)
    if error.startswith("https:"):
        assert source._url(*source._follow(origin, "/repo/summary", [location], "F", "summary")) == error
    else:
        with pytest.raises(OstreeError, match="^fetching summary from F: the redirect from "
                           "https://origin.example/repo/summary " + re.escape(error)):
            source._follow(origin, "/repo/summary", [location], "F", "summary")
    with pytest.raises(OstreeError, match="has 2 Location headers: one is needed"):
        source._follow(origin, "/x", ["/a", "/b"], "F", "summary")
    with pytest.raises(OstreeError, match="has no Location headers: one is needed"):
        source._follow(origin, "/x", [], "F", "summary")


def test_a_path_where_a_url_is_wanted_points_to_pull_local():
    with pytest.raises(OstreeError, match=r"^'/srv/repo' is not an http:// or https:// URL \(a repository on this "
                                          r"machine: `pycfs ostree pull-local`\)$"):
        HttpRepo("/srv/repo")
    with pytest.raises(OstreeError, match=r"^'ftp://h/repo' is not an http:// or https:// URL$"):
        HttpRepo("ftp://h/repo")


def test_a_ref_is_read_from_refs_heads_only_without_a_summary(peer):
    """As ostree ("No such branch in repository summary"): a repository with a summary serves
    its refs from it alone; refs/heads/, which no signature covers, only when it has none."""
    from pycfs.host.ostree.objects import SUMMARY_TYPE
    from pycfs.protocol.gvariant import encode

    main, ghost = b"\1" * 32, b"\2" * 32
    summary = encode(SUMMARY_TYPE, ([("main", (0, main, []))], []))
    served = {"/repo/summary": summary, "/repo/refs/heads/main": main.hex().encode(),
              "/repo/refs/heads/ghost": ghost.hex().encode()}

    def script(p: Peer, c: socket.socket) -> None:
        body = served.get(p.request.split(b" ")[1].decode())
        p.send(c, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n" if body is None else
               b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    p = peer(script)
    for with_summary in (True, False):
        if not with_summary:
            del served["/repo/summary"]
        repo = HttpRepo(p.url, attempts=1)
        try:
            assert repo.resolve("main") == (main, "main")
            if with_summary:
                with pytest.raises(OstreeError, match=rf"^no ref 'ghost' in the summary of {p.url} \(a repository "
                                                      r"with a summary serves its refs from it; `pycfs ostree "
                                                      r"list-refs` lists them\)$"):
                    repo.resolve("ghost")
            else:
                assert repo.resolve("ghost") == (ghost, "ghost")
        finally:
            repo.close()
