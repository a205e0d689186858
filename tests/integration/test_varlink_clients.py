"""`pycfs varlink serve` as a real process, driven by varlink clients no one here wrote:
the PyPI `varlink` reference client (introspection, repository calls, errors by name) and
`asyncvarlink` (fd passing: GetLayer, the tar rebuilt here from the spec's chunk layout,
sha256 == diff_id). Plus socket activation and a long hostile loop against the process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imagebuild

pytestmark = pytest.mark.integration

varlink = pytest.importorskip("varlink", reason="the PyPI varlink client (test extra) is not installed")
asyncvarlink = pytest.importorskip("asyncvarlink", reason="asyncvarlink (test extra) is not installed")

OCI = "org.composefs.Oci"
REPO = "org.composefs.Repository"
PYCFS = [sys.executable, "-m", "pycfs.tools.cli"]

IMAGE = imagebuild.ImageSpec(layers=[
    [imagebuild.Dir("usr"), imagebuild.Dir("usr/share"), imagebuild.File("usr/share/small", data=b"x" * 10),
     imagebuild.File("usr/share/sixty-four", data=b"y" * 64)],
    [imagebuild.File("usr/share/big", size=256 << 10, seed=3), imagebuild.File("usr/share/other", size=70000, seed=4),
     imagebuild.File("etc-like", data=b"z" * 65)],
], gzip=False)


def wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def pulled_repo(spec: imagebuild.ImageSpec, base: Path) -> tuple[Path, imagebuild.BuiltImage]:
    """base/repo holding spec's image, tagged img, pulled with the CLI from an OCI layout."""
    built = imagebuild.build_layout(spec, base / "layout")
    repo = base / "repo"
    subprocess.run([*PYCFS, "--repo", str(repo), "init"], check=True, capture_output=True)
    subprocess.run([*PYCFS, "--repo", str(repo), "oci", "pull", f"oci:{built.path}", "img"], check=True,
                   capture_output=True)
    return repo, built


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("varlink")
    repo, built = pulled_repo(IMAGE, base)
    with serving(base / "sock") as proc:
        yield proc, base / "sock", repo, built


@contextlib.contextmanager
def serving(sock: Path) -> Iterator[subprocess.Popen]:
    """`pycfs varlink serve` on sock until the block ends (then SIGINT, as a user would)."""
    proc = subprocess.Popen([*PYCFS, "varlink", "serve", "--address", f"unix:{sock}"], stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_reference_client(served) -> None:
    _, sock, repo, built = served
    with varlink.Client(f"unix:{sock}") as client:
        with client.open("org.varlink.service") as service:
            info = service.GetInfo()
            assert info["interfaces"] == ["org.varlink.service", REPO, OCI]
            for name in (REPO, OCI):
                parsed = varlink.Interface(service.GetInterfaceDescription(name)["description"])
                assert parsed.name == name
            assert {"GetLayer", "PutLayer", "FinalizeImage", "HasLayer"} <= set(
                varlink.Interface(service.GetInterfaceDescription(OCI)["description"]).members)
        with client.open(REPO, namespaced=True) as r:
            opened = r.OpenRepository(path=str(repo))
            assert opened.handle >= 1 and opened.hash_algorithm == "sha256"
            fsck = r.Fsck(handle=opened.handle)
            assert fsck.ok and fsck.objects_checked > 0 and fsck.objects_corrupted == 0 and fsck.errors == []
            assert r.Fsck(handle=opened.handle, metadata_only=True).objects_checked == 0
            with pytest.raises(varlink.VarlinkError) as e:
                r.Fsck(handle=999)
            assert e.value.error() == f"{REPO}.InvalidHandle" and e.value.parameters() == {"handle": 999}
            with pytest.raises(varlink.VarlinkError) as e:
                r.OpenRepository(path=str(repo), user=True)
            assert e.value.error() == f"{REPO}.InvalidSpec"
            with pytest.raises(varlink.VarlinkError) as e:
                r.ImageObjects(handle=opened.handle, name="refs/does-not-exist")
            assert e.value.error() == f"{REPO}.NoSuchRef"
            assert e.value.parameters() == {"reference": "refs/does-not-exist"}
        with client.open(OCI, namespaced=True) as o:
            images = o.ListImages(handle=opened.handle).images
            assert [(i.name, i.manifest_digest, i.layer_count) for i in images] == [("img", built.manifest_digest, 2)]
            assert o.ListImages(handle=opened.handle, filter="nope").images == []
            inspected = o.Inspect(handle=opened.handle, image="img")
            assert hashlib.sha256(inspected.manifest.encode()).hexdigest() == built.manifest_digest.split(":")[1]
            assert json.loads(inspected.config)["rootfs"]["diff_ids"] == built.diff_ids
            with pytest.raises(varlink.VarlinkError) as e:
                o.Inspect(handle=opened.handle, image="does-not-exist")
            assert e.value.error() == f"{OCI}.NoSuchImage"
            has = o.HasLayer(handle=opened.handle, diff_id=built.diff_ids[1])
            assert has.present and len(has.layer_verity) == 64


def rebuild_tar(stream: bytes, dirfds: list[int]) -> bytes:
    """The byte stream from splitdirfdstream chunks, written here from the format's
    description (type byte; u32 length + bytes; or u64 length, u32 dirfd index, u32 name
    length, name) so the service's own codec is not its own judge."""
    out = bytearray()
    pos = 0
    while pos < len(stream):
        kind = stream[pos]
        if kind in (0, 1):
            (n,) = struct.unpack_from("<I", stream, pos + 1)
            out += stream[pos + 5 : pos + 5 + n]
            pos += 5 + n
        else:
            assert kind == 2, kind
            length, index, name_len = struct.unpack_from("<QII", stream, pos + 1)
            name = stream[pos + 17 : pos + 17 + name_len]
            pos += 17 + name_len
            fd = os.open(name, os.O_RDONLY, dir_fd=dirfds[index])
            try:
                data = os.pread(fd, length, 0)
            finally:
                os.close(fd)
            assert len(data) == length
            out += data
    return bytes(out)


def test_asyncvarlink_get_layer_with_fds(served) -> None:
    _, sock, repo, built = served
    from asyncvarlink import VarlinkClientProtocol, VarlinkMethodCall, connect_unix_varlink

    async def fetch(diff_id: str) -> tuple[bytes, int, int]:
        transport, proto = await connect_unix_varlink(VarlinkClientProtocol, str(sock))
        try:
            reply, _ = await proto.call(VarlinkMethodCall(f"{REPO}.OpenRepository", {"path": str(repo)}))
            handle = reply.parameters["handle"]
            fds: list[int] = []
            frames = 0
            call = VarlinkMethodCall(f"{OCI}.GetLayer", {"handle": handle, "params": {"diff_id": diff_id}}, more=True)
            async for reply, fdarray in proto.call_more(call):
                frames += 1
                dir_count = reply.parameters["dir_count"]
                fds += [fdarray[i].take() for i in range(len(fdarray))] if fdarray else []
        finally:
            transport.close()
        try:
            stream = b""
            while piece := await asyncio.to_thread(os.read, fds[0], 1 << 16):
                stream += piece
            tar = rebuild_tar(stream, fds[1 : 1 + dir_count])
        finally:
            for fd in fds:
                os.close(fd)
        return tar, frames, len(fds) - 1 - dir_count

    for diff_id in built.diff_ids:
        tar, frames, lifetime = asyncio.run(fetch(diff_id))
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        assert frames >= 3 and lifetime >= 1  # the transport's hardening is on in production


def _server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_hostile_calls_with_fds(served) -> None:
    proc, sock, repo, _ = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    buf = b""

    def call(method: str, params: dict, fds: list[int] = ()) -> dict:
        nonlocal buf
        data = json.dumps({"method": method, "parameters": params}).encode() + b"\0"
        if fds:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            s.sendall(data)
        while b"\0" not in buf:
            piece = s.recv(65536)
            assert piece, "server closed the connection"
            buf += piece
        raw, _, buf = buf.partition(b"\0")
        return json.loads(raw)

    handle = call(f"{REPO}.OpenRepository", {"path": str(repo)})["parameters"]["handle"]
    warm = call(f"{OCI}.PutLayer", {"handle": handle, "diff_id": "sha256:bad", "zerocopy": False}, [0, 1])
    assert warm["error"] == f"{OCI}.InvalidDigest"
    before = _server_fds(proc.pid)
    null = os.open("/dev/null", os.O_RDONLY)
    r, w = os.pipe()
    os.close(w)  # an empty stream: EOF at once
    zero = "sha256:" + "0" * 64
    expected = [
        ({"diff_id": "sha256:nothex", "zerocopy": False}, [r, null], "InvalidDigest"),
        ({"diff_id": zero, "zerocopy": False}, [null, null, null], "InvalidRequest"),  # not a pipe
        ({"diff_id": zero, "zerocopy": False}, [r], "InvalidRequest"),  # too few fds
        ({"diff_id": zero, "zerocopy": False}, [r, null], "DiffIdMismatch"),  # empty stream, wrong digest
    ]
    try:
        for i in range(10_000):
            params, fds, name = expected[i % len(expected)]
            reply = call(f"{OCI}.PutLayer", {"handle": handle, **params}, fds)
            assert reply.get("error") == f"{OCI}.{name}", (i, reply)
    finally:
        os.close(null)
        os.close(r)
    assert _server_fds(proc.pid) == before
    s.close()
    listing = subprocess.run([*PYCFS, "--repo", str(repo), "fsck"], capture_output=True, text=True)
    assert listing.returncode == 0 and not (repo / "streams" / f"oci-layer-{zero}").exists()


def _activated(sock_fd: int) -> subprocess.Popen:
    """The service started as systemd would: the socket as fd 3, LISTEN_PID naming the
    process that serves (set just before exec, which keeps the pid)."""
    code = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    return subprocess.Popen([sys.executable, "-c", code, str(sock_fd), *PYCFS[1:], "varlink", "serve"],
                            pass_fds=(sock_fd,), stderr=subprocess.PIPE)


def test_socket_activation_listening_and_connected(tmp_path, served) -> None:
    _, _, repo, _ = served
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "activated.sock"))
    listener.listen()
    proc = _activated(listener.fileno())
    listener.close()
    try:
        for _ in range(2):  # two clients in a row: it keeps accepting
            with varlink.Client(f"unix:{tmp_path / 'activated.sock'}") as client, client.open(REPO) as r:
                assert r.OpenRepository(path=str(repo))["hash_algorithm"] == "sha256"
    except OSError:
        proc.kill()
        raise AssertionError(f"activated service ({proc.wait()}): {proc.stderr.read().decode() if proc.stderr else ''}") from None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)

    ours, theirs = socket.socketpair()
    proc = _activated(theirs.fileno())
    theirs.close()
    ours.sendall(json.dumps({"method": f"{OCI}.GetInfo"}).encode() + b"\0")
    ours.settimeout(20)
    reply = b""
    while not reply.endswith(b"\0"):
        reply += ours.recv(4096)
    assert json.loads(reply[:-1]) == {"parameters": {"features": ["splitdirfdstream-v0"]}}
    ours.close()
    assert proc.wait(20) == 0  # one connection served, then done

    plain = subprocess.run([*PYCFS, "varlink", "serve"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")})
    assert plain.returncode == 1
    assert plain.stderr.strip() == "pycfs: error: no --address given and not socket-activated (LISTEN_FDS)"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_second_service_does_not_take_a_live_address_and_a_stopped_one_removes_its_socket(tmp_path, stop) -> None:
    """A second `varlink serve` on the same address unlinked the live socket and bound its
    own (the first then served no new client); a stopped service left its socket file."""
    sock = tmp_path / "s.sock"
    with serving(sock) as first:
        second = subprocess.run([*PYCFS, "varlink", "serve", "--address", f"unix:{sock}"], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr == (f"pycfs: error: a service is listening on {sock} already: stop it first, or choose "
                                 "another address\n")
        with varlink.Client(f"unix:{sock}") as client, client.open("org.varlink.service") as service:
            assert service.GetInfo()["product"] == "pycfs"  # still the first's
        first.send_signal(stop)
        first.wait(10)
    assert not os.path.lexists(sock)
    sock.write_bytes(b"")  # (not a socket: never replaced)
    refused = subprocess.run([*PYCFS, "varlink", "serve", "--address", f"unix:{sock}"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "exists and is not a socket" in refused.stderr
