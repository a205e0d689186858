"""`oci copy --from unix:SOCK` against a hostile source service (a real AF_UNIX socket, a
small server in a thread): every wait is bounded, every fd it sends is closed, every
message it makes us print is cut, and what it answers is checked."""

from __future__ import annotations

import array
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from pycfs.host.errors import PycfsError
from pycfs.host.oci.copy import copy
from pycfs.host.repository import Repository

DIFF_ID = "sha256:" + "d" * 64
CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [DIFF_ID]}})
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": "sha256:" + hashlib.sha256(CONFIG.encode()).hexdigest(),
                                  "size": len(CONFIG)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                   "digest": "sha256:" + "e" * 64, "size": 2}]})

# Each method's usual answer; a test's `answer` may reply otherwise (or not at all).
USUAL = {"GetInfo": {"features": ["splitdirfdstream-v0"]}, "OpenRepository": {"handle": 1, "hash_algorithm": "sha256"},
         "Inspect": {"manifest": MANIFEST, "config": CONFIG}}

Send = Callable[..., None]
Answer = Callable[[str, Send, threading.Event], bool]  # True: answered


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _serve(conn: socket.socket, answer: Answer, stop: threading.Event) -> None:
    def send(obj: dict, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        data = json.dumps(obj).encode() + b"\0"
        if fds:
            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        else:
            conn.sendall(data)

    buf = b""
    try:
        while not stop.is_set():
            while b"\0" not in buf:
                data = conn.recv(1 << 16)
                if not data:
                    return
                buf += data
            raw, _, buf = buf.partition(b"\0")
            method = json.loads(raw)["method"].rsplit(".", 1)[-1]
            if not answer(method, send, stop):
                send({"parameters": USUAL.get(method, {})} if method in USUAL
                     else {"error": "org.composefs.Oci.NoSuchLayer", "parameters": {"diff_id": DIFF_ID}})
    except OSError:
        pass  # the client went away
    finally:
        conn.close()


@contextmanager
def hostile(tmp_path: Path, answer: Answer) -> Iterator[str]:
    """unix:SOCK of a service answering as `answer` says (else as USUAL)."""
    path = str(tmp_path / "hostile.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    stop = threading.Event()
    threads = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            t = threading.Thread(target=_serve, args=(conn, answer, stop), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"unix:{path}"
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(10)
        for t in threads:
            t.join(10)


def run_copy(tmp_path: Path, address: str, limit: float = 20) -> PycfsError:
    """The copy's error (it must fail, within `limit` seconds), nothing tagged."""
    dest = tmp_path / "dest"
    if not dest.exists():
        Repository.init(dest).close()

    async def main() -> None:
        with trio.fail_after(limit):
            await copy(address, "/src", str(dest), "img", "t", False)

    with pytest.raises(PycfsError) as e:
        trio.run(main)
    with Repository.open(dest, writable=False) as repo:
        assert repo.has_stream(f"oci-layer-{DIFF_ID}") is None
    return e.value


@pytest.fixture
def quick_replies(monkeypatch):
    from pycfs.host.varlink import client

    monkeypatch.setattr(client, "REPLY_TIMEOUT", 0.5)


def test_a_source_that_never_answers_is_given_up_naming_it_and_the_method(tmp_path, quick_replies) -> None:
    def silent(method: str, send: Send, stop: threading.Event) -> bool:
        stop.wait(30)
        return True

    with hostile(tmp_path, silent) as address:
        error = run_copy(tmp_path, address)
    assert f"the varlink service {address} did not answer org.composefs.Oci.GetInfo within 0.5 s" in str(error)


def test_a_get_layer_that_stops_after_one_frame_is_given_up(tmp_path, quick_replies) -> None:
    def stall(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        null = os.open("/dev/null", os.O_RDONLY)
        send({"parameters": {"dir_count": 2}, "continues": True}, [null])
        os.close(null)
        stop.wait(30)
        return True

    before = open_fds()
    with hostile(tmp_path, stall) as address:
        error = run_copy(tmp_path, address)
    assert open_fds() == before  # (the server's own are closed by now)
    assert "did not answer org.composefs.Oci.GetLayer within 0.5 s" in str(error)


@pytest.mark.parametrize("with_fds", [True, False])
def test_a_get_layer_that_never_ends_is_refused_naming_the_layer_and_the_service(tmp_path, with_fds) -> None:
    """(Before: frames for ever; with fds on each, the client ran out of fds in half a
    second and said "file descriptors were lost in transit", naming neither.)"""
    def endless(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        nulls = [os.open("/dev/null", os.O_RDONLY) for _ in range(200 if with_fds else 0)]
        try:
            while not stop.is_set():
                send({"parameters": {"dir_count": 2}, "continues": True}, nulls)
        finally:
            for fd in nulls:
                os.close(fd)
        return True

    before = open_fds()
    with hostile(tmp_path, endless) as address:
        error = run_copy(tmp_path, address)
    assert open_fds() == before
    assert str(error).startswith(f"oci copy img: layer {DIFF_ID} from {address}: ")
    assert "GetLayer frames with" in str(error)


def test_a_huge_dir_count_is_refused(tmp_path) -> None:
    def huge(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        send({"parameters": {"dir_count": 10**12}})
        return True

    with hostile(tmp_path, huge) as address:
        error = run_copy(tmp_path, address)
    assert f"layer {DIFF_ID} from {address}: a bad dir_count 1000000000000" in str(error)


def test_fds_on_replies_that_carry_none_are_closed(tmp_path) -> None:
    """GetInfo, OpenRepository and Inspect with 250 fds each (before: all kept open, 750
    fds more after one copy)."""
    def with_fds(method: str, send: Send, stop: threading.Event) -> bool:
        if method not in USUAL:
            return False
        nulls = [os.open("/dev/null", os.O_RDONLY) for _ in range(250)]
        send({"parameters": USUAL[method]}, nulls)
        for fd in nulls:
            os.close(fd)
        return True

    Repository.init(tmp_path / "dest").close()
    before = open_fds()
    with hostile(tmp_path, with_fds) as address:
        error = run_copy(tmp_path, address)
    assert open_fds() == before
    assert "NoSuchLayer" in str(error)  # (as far as GetLayer)


def test_a_huge_error_text_is_cut(tmp_path) -> None:
    def loud(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        send({"error": "org.composefs.Oci.Weird\x1b[31m", "parameters": {"message": "x\n" * 150_000 + "\x1b]0;pwned\x07"}})
        return True

    with hostile(tmp_path, loud) as address:
        error = str(run_copy(tmp_path, address))
    assert len(error) < 400 and "\n" not in error and "\x1b" not in error
    assert error == "oci copy img: " + "x\\x0a" * 40 + "... (300010 characters)"


def test_a_hash_algorithm_of_the_wrong_type_is_refused(tmp_path) -> None:
    def odd(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "OpenRepository":
            return False
        send({"parameters": {"handle": 1, "hash_algorithm": ["x"] * 3}})
        return True

    with hostile(tmp_path, odd) as address:
        error = run_copy(tmp_path, address)
    assert "answered OpenRepository without a valid 'hash_algorithm' (got ['x', 'x', 'x'])" in str(error)


def _layer_from(directory: Path, write: Callable[[int, threading.Event], None]) -> Answer:
    """A GetLayer answer: a pipe `write` feeds (its write end, and `stop`), one slot holding
    `directory`, a keepalive."""
    def answer(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        r, w = os.pipe()
        keep_r, keep_w = os.pipe()
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)

        def feed() -> None:
            try:
                write(w, stop)
            except OSError:
                pass  # the consumer gave up
            finally:
                os.close(w)

        threading.Thread(target=feed, daemon=True).start()
        send({"parameters": {"dir_count": 1}}, [r, dirfd, keep_w])
        for fd in (r, dirfd, keep_w, keep_r):
            os.close(fd)
        return True

    return answer


@pytest.fixture
def source_dir(tmp_path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"f" * 100)
    return tmp_path / "d"


def test_an_endless_stream_is_refused_naming_the_layer(tmp_path, source_dir, monkeypatch) -> None:
    """One file referenced again and again, for ever (memory flat: before, it never ended)."""
    from pycfs.host.varlink import transfer
    from pycfs.protocol.splitdirfdstream import encode_file_backed_data

    monkeypatch.setattr(transfer, "MAX_LAYER_FILES", 1000)

    def endless(w: int, stop: threading.Event) -> None:
        ref = encode_file_backed_data(0, 100, b"f") * 100
        while not stop.is_set():
            os.write(w, ref)

    with hostile(tmp_path, _layer_from(source_dir, endless)) as address:
        error = str(run_copy(tmp_path, address, limit=60))
    assert error.startswith(f"oci copy img: layer {DIFF_ID} from {address}: the stream goes on past 1000 files or "
                            "1024 GiB, more than a real layer holds: nothing was committed"), error


def test_a_silent_stream_is_refused_naming_the_layer(tmp_path, source_dir, monkeypatch) -> None:
    from pycfs.host.varlink import transfer

    monkeypatch.setattr(transfer, "SILENCE_LIMIT", 0.5)

    def silent(w: int, stop: threading.Event) -> None:
        os.write(w, b"\0\x10\0\0\0")  # a chunk's start, then nothing and no EOF
        stop.wait(30)

    with hostile(tmp_path, _layer_from(source_dir, silent)) as address:
        error = str(run_copy(tmp_path, address))
    assert error.startswith(f"oci copy img: layer {DIFF_ID} from {address}: the stream's producer sent nothing for "
                            "0 s without closing the pipe"), error


def test_a_long_name_in_the_stream_is_cut_in_the_message(tmp_path, source_dir) -> None:
    from pycfs.protocol.splitdirfdstream import encode_file_backed_data

    def long_name(w: int, stop: threading.Event) -> None:
        os.write(w, encode_file_backed_data(0, 100, b"a/" * 2000))

    with hostile(tmp_path, _layer_from(source_dir, long_name)) as address:
        error = str(run_copy(tmp_path, address))
    assert f"cannot open {'a/' * 40!r}... (4000 characters) (dirfd 0): openat2: No such file or directory" in error, error
    assert len(error) < 400


def test_an_o_path_directory_fd_is_refused(tmp_path) -> None:
    """An O_PATH fd needs no right to read or enter the directory (anyone can make one of a
    0700 root directory): before, a copy running as root read the file beneath it into an
    object anyone can read."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "secret").write_bytes(b"s" * 137)
    from pycfs.protocol.splitdirfdstream import encode_file_backed_data

    def answer(method: str, send: Send, stop: threading.Event) -> bool:
        if method != "GetLayer":
            return False
        r, w = os.pipe()
        os.write(w, encode_file_backed_data(0, 137, b"secret"))
        os.close(w)
        keep_r, keep_w = os.pipe()
        dirfd = os.open(secret_dir, os.O_PATH | os.O_DIRECTORY)
        send({"parameters": {"dir_count": 1}}, [r, dirfd, keep_w])
        for fd in (r, dirfd, keep_w, keep_r):
            os.close(fd)
        return True

    with hostile(tmp_path, answer) as address:
        error = str(run_copy(tmp_path, address))
    assert f"layer {DIFF_ID} from {address}: dirfd slot 0 is an O_PATH fd: pass a directory opened for reading" in error
    stored = [p.read_bytes() for p in (tmp_path / "dest").rglob("*") if p.is_file()]
    assert stored and b"s" * 137 not in stored  # the secret was never stored


def test_a_source_service_of_another_uid_is_refused(tmp_path) -> None:
    """Its directories would be opened with this process's rights (root here), not its own:
    a service of another uid (not root) is refused before anything is asked of it."""
    path = tmp_path / "other.sock"
    # bound as root, listening as uid 65534: SO_PEERCRED says 65534
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, socket, time
s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r})
os.setgid(65534); os.setuid(65534)
s.listen(4)
print("ready", flush=True)
c, _ = s.accept(); time.sleep(30)
"""], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        error = str(run_copy(tmp_path, f"unix:{path}"))
    finally:
        child.kill()
        child.wait()
    assert error == (f"the service at unix:{path} runs as uid 65534, this process as uid 0: files beneath the "
                     "directories it passes would be opened with uid 0's rights, so only uid 0 or root may pass "
                     "them (run both as one user)")


def test_put_layer_from_a_client_of_another_uid_is_refused(tmp_path, monkeypatch) -> None:
    from pycfs.host.varlink import transport
    from pycfs.host.varlink.client import Client
    from pycfs.host.varlink.serve import open_service
    from pycfs.protocol.varlink import VarlinkError

    Repository.init(tmp_path / "dest").close()
    monkeypatch.setattr(transport.Connection, "peer_uid", lambda self: 4321)
    r, w = os.pipe()
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)

    async def main() -> None:
        async with open_service() as server:
            conn, sock = transport.socketpair()
            server.nursery.start_soon(server.serve_connection, sock)
            client = Client(conn)
            try:
                handle = (await client.call("org.composefs.Repository.OpenRepository",
                                            {"path": str(tmp_path / "dest")})).parameters["handle"]
                with pytest.raises(VarlinkError) as e:
                    await client.call("org.composefs.Oci.PutLayer", {"handle": handle, "diff_id": DIFF_ID},
                                      [r, dirfd])
            finally:
                client.close()
        assert e.value.name == "org.varlink.service.PermissionDenied"
        assert e.value.parameters["message"].startswith("the PutLayer client runs as uid 4321, this process as uid 0")

    try:
        trio.run(main)
    finally:
        for fd in (r, w, dirfd):
            os.close(fd)
