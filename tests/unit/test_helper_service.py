"""The helper service against a temporary storage tree.

In-process: `serve` on one end of a socketpair (a thread), a plain jsonrpc-fdpass client on
the other. As subprocesses: `python -m pycfs.helper` refusing to run outside a user
namespace, and (root with `unshare -r`) the hardened helper driven by `HelperClient`, whose
launcher is then `unshare -r` instead of `podman unshare`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from pycfs.helper.service import HelperService, serve
from pycfs.host.errors import PycfsError
from pycfs.host import stuck
from pycfs.host.helperclient import HelperClient, HelperPathError
from pycfs.protocol import helper_api as api
from pycfs.protocol.fdpass import close_fds, recv_with_fds, send_with_fds
from pycfs.protocol.jsonrpc import Decoder, Message, encode

LAYER = "ab" * 32
OTHER = "cd" * 32


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def build_layer(d: Path) -> None:
    (d / "etc").mkdir(parents=True)
    (d / "etc/hostname").write_bytes(b"pycfs-host\n")
    (d / "secret").write_bytes(b"s3cret")
    os.chmod(d / "secret", 0)
    (d / "sub/deeper").mkdir(parents=True)
    (d / "sub/deeper/file").write_bytes(b"deep")
    (d / "link-out").symlink_to("/etc/passwd")
    (d / "link-in").symlink_to("etc/hostname")
    (d / "dir-link").symlink_to("sub")
    os.mkfifo(d / "fifo")
    (d / os.fsdecode(b"caf\xe9")).write_bytes(b"latin")  # not UTF-8


@pytest.fixture
def storage(tmp_path) -> Path:
    root = tmp_path / "storage"
    build_layer(root / "overlay" / LAYER / "diff")
    build_layer(root / "vfs" / "dir" / LAYER)
    (tmp_path / "outside").write_bytes(b"outside the storage")
    return root


def snapshot(root: Path) -> dict:
    """Everything about the tree a write could change (not atime: reads may touch it)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            extra = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, extra)
    return out


class Client:
    """A minimal blocking jsonrpc-fdpass client."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = Decoder(max_fds=api.MAX_FDS_PER_MESSAGE)
        self.next_id = 0

    def send_raw(self, data: bytes, fds: list[int] = ()) -> None:
        send_with_fds(self.sock, data, fds)

    def receive(self) -> Message | None:
        while True:
            m = self.dec.next_message()
            if m is not None:
                return m
            data, fds = recv_with_fds(self.sock)
            if not data:
                self.dec.feed_eof()
                return self.dec.next_message()
            self.dec.feed(data, fds)

    def call(self, method: str, params=None) -> Message:
        self.next_id += 1
        req = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            req["params"] = params
        self.send_raw(encode(req))
        m = self.receive()
        assert m is not None and m.obj["id"] == self.next_id
        return m


@pytest.fixture
def served(storage):
    """(client, exit-status holder) talking to an in-process service on `storage`."""
    before = open_fd_count()
    a, b = socket.socketpair()
    root_fd = os.open(storage, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    status: list[int] = []
    services = {}

    def run(driver: str = "overlay"):
        def service_process():
            status.append(serve(b, HelperService(root_fd, driver)))
            b.close()  # as the helper's exit would

        t = threading.Thread(target=service_process)
        t.start()
        services["thread"] = t
        return Client(a), status

    yield run
    a.close()
    services["thread"].join(timeout=10)
    assert not services["thread"].is_alive()
    b.close()
    os.close(root_fd)
    assert open_fd_count() == before, "fds leaked"


def open_files(client: Client, paths: list[str], layer: str = LAYER) -> tuple[list[dict], list[int]]:
    m = client.call(api.OPEN_FILES, {"layer": layer, "paths": paths})
    assert "result" in m.obj, m.obj
    return m.obj["result"]["results"], m.fds


REFUSALS = {
    "../x": "dotdot-component",
    "sub/../../outside": "dotdot-component",
    "/etc/passwd": "absolute-path",
    "link-out": "symlink",
    "dir-link/deeper/file": "symlink",
    "link-in": "symlink",
    "fifo": "not-regular",
    "sub": "directory",
    ".": "directory",
    "a\0b": "nul-byte",
    "etc//hostname": "empty-component",
    "etc/": "empty-component",
    "": "empty-path",
    "x" * 5000: "too-long",
    "\ud800": "bad-encoding",
    "missing": "open-failed",
}


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_opens_regular_files_read_only(served, storage, driver):
    client, _ = served(driver)
    before = snapshot(storage)
    names = ["etc/hostname", "secret", "./sub/deeper/file", os.fsdecode(b"caf\xe9")]
    results, fds = open_files(client, names)
    try:
        assert results == [{"fd": 0}, {"fd": 1}, {"fd": 2}, {"fd": 3}]
        assert [os.pread(fd, 100, 0) for fd in fds] == [b"pycfs-host\n", b"s3cret", b"deep", b"latin"]
        for fd in fds:
            assert not os.get_inheritable(fd)
            assert os.get_blocking(fd)
            with pytest.raises(OSError) as e:
                os.write(fd, b"x")
            assert e.value.errno == errno.EBADF
    finally:
        close_fds(fds)
    assert snapshot(storage) == before


def test_each_refusal_has_its_own_reason_and_storage_is_untouched(served, storage):
    client, _ = served()
    before = snapshot(storage)
    names = list(REFUSALS)
    results, fds = open_files(client, names)
    assert fds == []
    got = {name: r["reason"] for name, r in zip(names, results)}
    assert got == REFUSALS
    by_name = dict(zip(names, results))
    assert by_name["../x"]["errno"] == errno.EXDEV
    assert by_name["link-out"]["errno"] == errno.ELOOP
    assert by_name["fifo"]["errno"] == errno.ENXIO
    assert by_name["sub"]["errno"] == errno.EISDIR
    assert by_name["missing"]["errno"] == errno.ENOENT
    assert all(r["message"] for r in results)
    # Every kind of refusal has its own reason token.
    assert len(set(REFUSALS.values())) == 11
    assert snapshot(storage) == before


def test_mixed_batch_keeps_order_and_fd_indices(served):
    client, _ = served()
    names = ["../x", "etc/hostname", "fifo", "secret", "missing", "etc/hostname"]
    results, fds = open_files(client, names)
    try:
        assert [r.get("fd") for r in results] == [None, 0, None, 1, None, 2]
        assert len(fds) == 3
        assert os.pread(fds[1], 10, 0) == b"s3cret"
    finally:
        close_fds(fds)


def test_request_level_errors(served):
    client, _ = served()
    m = client.call(api.OPEN_FILES, {"layer": OTHER, "paths": ["etc/hostname"]})
    assert m.obj["error"]["code"] == api.ERR_UNKNOWN_LAYER
    for bad_layer in ("AB" * 32, "ab" * 31, "../../etc", 5):
        m = client.call(api.OPEN_FILES, {"layer": bad_layer, "paths": ["x"]})
        assert m.obj["error"]["code"] == -32602, bad_layer
    m = client.call(api.OPEN_FILES, {"layer": LAYER, "paths": ["x"] * (api.MAX_PATHS_PER_REQUEST + 1)})
    assert m.obj["error"]["code"] == -32602 and "limit" in m.obj["error"]["data"]
    m = client.call(api.OPEN_FILES, {"layer": LAYER, "paths": "etc/hostname"})
    assert m.obj["error"]["code"] == -32602
    m = client.call(api.OPEN_FILES, {"layer": LAYER})
    assert m.obj["error"]["code"] == -32602
    m = client.call("write_file", {"path": "x"})
    assert m.obj["error"]["code"] == -32601
    for bad_store in (1, -1, "0", True):  # only the primary store is served here
        m = client.call(api.OPEN_FILES, {"layer": LAYER, "paths": ["etc/hostname"], "store": bad_store})
        assert m.obj["error"]["code"] == -32602 and "store" in m.obj["error"]["data"], bad_store
    assert m.fds == []


def test_hello_and_shutdown(served):
    client, status = served()
    info = client.call(api.HELLO).obj["result"]
    assert info["version"] == api.PROTOCOL_VERSION and "open-files" in info["features"]
    assert info["pid"] == os.getpid() and info["driver"] == "overlay"
    assert info["uid_map"] and all(len(row) == 3 for row in info["uid_map"])
    assert client.call(api.SHUTDOWN).obj["result"] is None
    assert client.receive() is None  # the service returned and its end closed
    assert status == [0]


def test_notification_gets_no_reply_and_its_fds_are_closed(served):
    client, _ = served()
    before = open_fd_count()
    client.send_raw(encode({"jsonrpc": "2.0", "method": api.OPEN_FILES, "params": {"layer": LAYER, "paths": ["secret"]}}))
    m = client.call(api.HELLO)  # the next reply is hello's: the notification got none
    assert "result" in m.obj
    assert open_fd_count() == before


def test_garbage_from_the_host_ends_the_service_with_an_error_reply(served):
    client, status = served()
    client.send_raw(b'{"jsonrpc": "2.0", "method": nope}')
    m = client.receive()
    assert m.obj["error"]["code"] == -32700 and m.obj["id"] is None
    assert client.receive() is None
    assert status == [3]


@pytest.mark.parametrize("request_id", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_request_id_is_a_protocol_error_not_a_crash(served, request_id):
    """JSON has no NaN or infinities; the helper once crashed answering such an id (its
    encoder refuses them). Now the message itself is refused, in an error reply."""
    client, status = served()
    client.send_raw(b'{"jsonrpc": "2.0", "method": "hello", "id": ' + request_id + b"}")
    m = client.receive()
    assert m.obj["error"]["code"] == -32700 and m.obj["id"] is None
    assert "not a finite number" in m.obj["error"]["message"]
    assert client.receive() is None
    assert status == [3]


def test_fds_sent_to_the_service_are_refused_and_closed(served):
    client, status = served()
    r, w = os.pipe()
    try:
        client.send_raw(encode({"jsonrpc": "2.0", "method": api.HELLO, "id": 1}, 2), [r, w])
    finally:
        os.close(r)
        os.close(w)
    m = client.receive()
    assert m.obj["error"]["code"] == -32050
    assert client.receive() is None
    assert status == [3]


def test_eof_ends_the_service_cleanly(served):
    client, status = served()
    client.call(api.HELLO)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.receive() is None
    assert status == [0]


# ---- python -m pycfs.helper as a process ----


def run_helper(storage: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    a, b = socket.socketpair()
    with a, b:
        p = subprocess.Popen(
            [*launcher, sys.executable, "-B", "-m", "pycfs.helper", "--storage-root", str(storage), "--driver", "overlay"],
            stdin=b, stderr=subprocess.PIPE, cwd="/",
        )  # fmt: skip
        b.close()
        _out, err = p.communicate(timeout=30)
    return subprocess.CompletedProcess(p.args, p.returncode, None, err)


def in_initial_user_namespace() -> bool:
    return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]


def userns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode == 0


needs_userns = pytest.mark.skipif(not userns_available(), reason="`unshare -r` (unprivileged user namespaces) unavailable")


@pytest.mark.skipif(not in_initial_user_namespace(), reason="already inside a user namespace")
def test_helper_refuses_to_run_outside_a_user_namespace(storage):
    p = run_helper(storage, [])
    assert p.returncode == 2
    assert b"not running inside a user namespace" in p.stderr


@needs_userns
def test_helper_refuses_a_non_socket_stdin(storage):
    p = subprocess.run(
        ["unshare", "-r", sys.executable, "-B", "-m", "pycfs.helper", "--storage-root", str(storage), "--driver", "overlay"],
        stdin=subprocess.DEVNULL, capture_output=True, cwd="/", timeout=30,
    )  # fmt: skip
    assert p.returncode == 2 and b"fd 0 is not a socket" in p.stderr


def client_for(storage: Path, **kw) -> HelperClient:
    kw.setdefault("launcher", ("unshare", "-r"))
    return HelperClient(storage, "overlay", policy="always", **kw)


@needs_userns
def test_hardened_helper_through_helperclient(storage):
    before_tree = snapshot(storage)

    async def main():
        async with client_for(storage, max_open_fds=600) as helper:
            info = helper.info
            assert info["cap_effective"] == info["cap_permitted"] == info["cap_bounding"] == 1 << 2  # DAC_READ_SEARCH
            assert info["no_new_privs"] == 1
            names = ["etc/hostname", "../x", "secret", "fifo"] * 150  # 600 paths, 2 requests
            results = await helper.open_files(LAYER, names)
            assert helper.budget.available == 600 - 300
            fds = [r for r in results if isinstance(r, int)]
            errs = [r for r in results if isinstance(r, OSError)]
            assert len(fds) == 300 and len(errs) == 300
            assert {(type(e), e.reason) for e in errs} == {(HelperPathError, "dotdot-component"), (HelperPathError, "not-regular")}
            assert os.pread(results[2], 10, 0) == b"s3cret"
            assert errs[0].errno == errno.EXDEV and errs[0].filename == "../x"
            for fd in fds:
                helper.release(fd)
            assert helper.budget.available == 600
            with pytest.raises(PycfsError, match="no such layer"):
                await helper.open_files(OTHER, ["etc/hostname"])
            with pytest.raises(ValueError, match="split the list"):
                await helper.open_files(LAYER, ["etc/hostname"] * 601)
            return info["pid"]

    before = open_fd_count()
    pid = trio.run(main)
    assert open_fd_count() == before
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert snapshot(storage) == before_tree


@needs_userns
def test_the_helper_opens_files_in_the_additional_stores_the_user_owns(tmp_path, storage):
    """An additional image store whose root you own (its files your sub-uids', as the
    primary's) is served, confined beneath its own root as the primary is; one owned by
    another user is neither passed to the helper nor accepted by it (it was: neither, and
    a closed file in any additional store was an error)."""
    extra = tmp_path / "extra"
    build_layer(extra / "vfs" / "dir" / OTHER)
    foreign = tmp_path / "foreign"
    build_layer(foreign / "overlay" / LAYER / "diff")
    os.chown(foreign, 1000, 1000)

    async def main():
        async with client_for(storage, additional_stores=[(extra, "vfs"), (foreign, "overlay")]) as helper:
            assert helper.serves(storage) and helper.serves(extra) and not helper.serves(foreign)
            results = await helper.open_files(OTHER, ["secret", "../x", "link-out"], extra)
            assert os.pread(results[0], 10, 0) == b"s3cret"
            assert [(type(r), r.reason) for r in results[1:]] == [(HelperPathError, "dotdot-component"),
                                                                  (HelperPathError, "symlink")]
            helper.release(results[0])
            with pytest.raises(PycfsError, match="no such layer"):  # OTHER is in the additional store only
                await helper.open_files(OTHER, ["secret"])
            with pytest.raises(ValueError, match="not a store it serves"):
                await helper.open_files(LAYER, ["secret"], foreign)

    trio.run(main)
    a, b = socket.socketpair()
    with a, b:
        refused = subprocess.run(["unshare", "-r", sys.executable, "-B", "-m", "pycfs.helper", "--storage-root",
                                  str(storage), "--driver", "overlay", "--additional-store", f"overlay:{foreign}"],
                                 stdin=b, capture_output=True, cwd="/", timeout=30)
    assert refused.returncode == 2 and b"is not owned by the user the helper runs for" in refused.stderr


@needs_userns
def test_budget_makes_open_files_wait_for_release(storage):
    async def main():
        async with client_for(storage, max_open_fds=4) as helper:
            first = await helper.open_files(LAYER, ["secret"] * 4)
            done = trio.Event()

            async def second():
                got = await helper.open_files(LAYER, ["secret", "etc/hostname"])
                for fd in got:
                    helper.release(fd)
                done.set()

            async with trio.open_nursery() as n:
                n.start_soon(second)
                await trio.sleep(0.3)
                assert not done.is_set()  # all 4 slots are taken
                helper.release(first[0])
                await trio.sleep(0.3)
                assert not done.is_set()  # 1 free, 2 needed
                helper.release(first[1])
            assert done.is_set()
            for fd in first[2:]:
                helper.release(fd)

    trio.run(main)


@needs_userns
def test_killing_the_helper_mid_request_is_a_clear_error(storage):
    async def main():
        async with client_for(storage) as helper:
            pid = helper.helper_pid
            os.kill(pid, signal.SIGSTOP)  # it will not answer: the request stays in flight
            async with trio.open_nursery() as n:

                async def killer():
                    await trio.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)

                n.start_soon(killer)
                with pytest.raises(PycfsError) as e:
                    await helper.open_files(LAYER, ["secret"])
            msg = str(e.value)
            assert f"helper (pid {pid}) died during open_files" in msg and "run the command again" in msg
            assert "\n" not in msg
            with pytest.raises(PycfsError):  # stays failed
                await helper.open_files(LAYER, ["secret"])

    trio.run(main)


@needs_userns
def test_a_stuck_helper_is_killed_and_named(storage, monkeypatch):
    """A helper that neither answers nor runs (stopped here; in life blocked on a stalled
    filesystem): after STUCK_LIMIT one error naming it, and it is gone (before: the request
    waited for good)."""
    monkeypatch.setattr(stuck, "STUCK_LIMIT", 0.5)

    async def main():
        async with client_for(storage) as helper:
            pid = helper.helper_pid
            os.kill(pid, signal.SIGSTOP)
            with trio.fail_after(15), pytest.raises(PycfsError) as e:
                await helper.open_files(LAYER, ["secret"])
            assert str(e.value).startswith(f"the user-namespace helper (pid {pid}) failed during open_files: it made "
                                           "no progress for 0 s with requests waiting")
            assert "\n" not in str(e.value)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    trio.run(main)


def test_launcher_failure_quotes_its_output_and_says_what_to_do(storage):
    fake = ("sh", "-c", 'echo "Error: cannot use command \\"podman unshare\\" with the remote podman client" >&2; exit 125', "sh")

    async def main():
        async with client_for(storage, launcher=fake):
            pass

    with pytest.raises(PycfsError) as e:
        trio.run(main)
    msg = str(e.value)
    assert "failed to start the helper (" in msg and "exit status 125)" in msg
    assert "with the remote podman client" in msg
    assert "podman unshare pycfs" in msg and "--helper=never" in msg


def test_missing_podman_is_named(storage):
    async def main():
        async with HelperClient(storage, "overlay", policy="auto", launcher=("/nonexistent/podman", "unshare")) as h:
            if os.geteuid() == 0:
                assert not h.enabled
                with pytest.raises(PycfsError, match="disabled: running as root"):
                    await h.open_files(LAYER, ["secret"])
                h.policy = "always"
            await h.open_files(LAYER, ["secret"])

    with pytest.raises(PycfsError, match="`/nonexistent/podman` was not found on PATH.*install podman"):
        trio.run(main)


def test_policy_never_and_bad_arguments(storage):
    async def main():
        async with HelperClient(storage, "overlay", policy="never") as h:
            assert not h.enabled
            with pytest.raises(PycfsError, match="--helper=never"):
                await h.open_files(LAYER, ["secret"])
            with pytest.raises(ValueError, match="layer id"):
                await h.open_files("nope", ["secret"])

    trio.run(main)
    with pytest.raises(ValueError):
        HelperClient(storage, "overlay", policy="sometimes")
    with pytest.raises(ValueError):
        HelperClient(storage, "btrfs")


def test_a_peer_speaking_garbage_is_reported(storage):
    garbage = (sys.executable, "-c", "import os, time; os.write(0, b'<html>'); time.sleep(30)")

    async def main():
        async with client_for(storage, launcher=garbage):
            pass

    with pytest.raises(PycfsError, match="expected a JSON object"):
        trio.run(main)


@needs_userns
def test_long_undecodable_names_are_batched_within_the_message_limit(storage):
    # 600 names of 4000 undecodable bytes: ~24 kB of JSON escapes each, 14 MB in all,
    # more than one request may carry.
    names = [b"/".join([bytes([0x80 + i % 64]) * 200] * 19) + b"/%04d" % i for i in range(600)]
    assert all(len(n) < api.MAX_PATH_BYTES for n in names)

    async def main():
        async with client_for(storage, max_open_fds=600) as helper:
            results = await helper.open_files(LAYER, names)
            assert [r.errno for r in results] == [errno.ENOENT] * 600
            assert [os.fsencode(r.filename) for r in results] == names
            assert helper.budget.available == 600

    trio.run(main)


def test_helper_imports_stay_small():
    """The helper starts on every pull that needs it: no event loop, and nothing from host/."""
    code = (
        "import sys, pycfs.helper.__main__, pycfs.helper.service, pycfs.helper.hardening;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'rich', 'zstandard')"
        " or m.startswith('pycfs.host')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


@needs_userns
def test_a_start_cancelled_before_its_hello_is_forgotten(storage, tmp_path):
    """The first `podman unshare` hangs; its start is cancelled (a pull that no longer needs
    the helper): the launcher is killed, and the next need starts a helper afresh."""
    marker = tmp_path / "hung-once"
    launcher = ("sh", "-c", f'if [ -e {marker} ]; then exec unshare -r "$@"; fi; touch {marker}; exec sleep 600', "sh")

    async def main():
        async with HelperClient(storage, "overlay", policy="auto", launcher=launcher) as helper:
            helper.policy = "always"  # as root too
            with trio.move_on_after(1):
                await helper.hello()
            assert marker.exists() and helper.info is None and helper._proc is None
            assert not [p for p in _children_cmdlines() if "sleep" in p]
            fd = (await helper.open_files(LAYER, ["secret"]))[0]
            assert isinstance(fd, int) and os.read(fd, 100) == b"s3cret"
            helper.release(fd)

    trio.run(main)


def _children_cmdlines() -> list[str]:
    """The command lines of this process's children."""
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return out
