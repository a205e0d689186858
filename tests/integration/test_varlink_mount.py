"""Mount and OciMount of `pycfs varlink serve` (root) through the PyPI `asyncvarlink`
client: the reply's fd is a detached mount, attached here with move_mount onto a
directory; the tree the kernel shows is compared with the image's own description
(imagebuild.flatten of the spec the layers were built from), then unmounted. Nothing
leaks: a detached mount lives exactly as long as an fd to it, so counting the service's
fds and this process's fds (and the mount table) proves no mount is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import imagebuild
from pycfs.host import syscalls

pytestmark = pytest.mark.integration

asyncvarlink = pytest.importorskip("asyncvarlink", reason="asyncvarlink (test extra) is not installed")

OCI = "org.composefs.Oci"
REPO = "org.composefs.Repository"
PYCFS = [sys.executable, "-m", "pycfs.tools.cli"]
SPEC = imagebuild.multilayer_image()


def expected_tree() -> dict[bytes, tuple]:
    """What the image must show, from the spec: path -> (type, mode, uid, gid, content)."""
    tree = imagebuild.flatten(SPEC)
    out: dict[bytes, tuple] = {}
    for path, entry in tree.items():
        if isinstance(entry, imagebuild.Hardlink):
            entry = tree[b"/" + os.fsencode(entry.target).lstrip(b"/")]
        if isinstance(entry, imagebuild.File):
            kind, extra = stat.S_IFREG, entry.sha256()
        elif isinstance(entry, imagebuild.Symlink):
            kind, extra = stat.S_IFLNK, os.fsencode(entry.target)
        elif isinstance(entry, imagebuild.Dir):
            kind, extra = stat.S_IFDIR, None
        else:
            assert isinstance(entry, imagebuild.Device) and entry.kind == "fifo"
            kind, extra = stat.S_IFIFO, None
        out[path] = (kind, entry.mode, entry.uid, entry.gid, extra)
    return out


def mounted_tree(root: Path) -> dict[bytes, tuple]:
    """The kernel's view, as test_oci_mount describes it, cut to what the spec says."""
    from test_oci_mount import describe

    return {b"/" + path: (kind, mode, uid, gid, extra)
            for path, (kind, mode, uid, gid, _mtime, _size, _nlink, extra, _cap) in describe(root).items()}


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def service_fds_back_to(pid: int, count: int) -> bool:
    """The service closes a connection's socket when it sees the client's EOF: wait for it."""
    deadline = time.monotonic() + 10
    while fd_count(pid) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return fd_count(pid) == count


@pytest.fixture(scope="module")
def served():
    if os.geteuid() != 0:
        pytest.skip("Mount needs a root service and a root client (kernel EROFS and overlayfs mounts)")
    # world-searchable, so an unprivileged client can reach the socket
    base = Path(tempfile.mkdtemp(prefix="pycfs-varlink-mount-"))
    base.chmod(0o755)
    try:
        from test_varlink_clients import pulled_repo, serving

        repo, built = pulled_repo(SPEC, base)
        with serving(base / "sock") as proc:
            (base / "sock").chmod(0o666)
            yield proc, base / "sock", repo, built
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


async def call_for_fd(sock: Path, repo: Path, method: str, params: dict, fds: list[int] | None = None) -> int:
    """OpenRepository, then `method` with the handle; returns the one fd of the reply."""
    from asyncvarlink import VarlinkClientProtocol, VarlinkMethodCall, connect_unix_varlink

    transport, proto = await connect_unix_varlink(VarlinkClientProtocol, str(sock))
    try:
        reply, _ = await proto.call(VarlinkMethodCall(f"{REPO}.OpenRepository", {"path": str(repo)}))
        handle = reply.parameters["handle"]
        done = asyncio.get_running_loop().create_future()
        reply, fdarray = await proto.call(VarlinkMethodCall(method, {"handle": handle, **params}), fds,
                                          replyfdsdone=done)
        try:
            assert reply.parameters == {"fd_index": 0}
            assert fdarray is not None and len(fdarray) == 1
            return fdarray[0].take()
        finally:
            done.set_result(None)
            await proto.call(VarlinkMethodCall(f"{REPO}.CloseRepository", {"handle": handle}))
    finally:
        transport.close()


def attach(fd: int, target: Path) -> None:
    try:
        syscalls.move_mount_fd(fd, str(target))
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["Mount", "OciMount-tag", "OciMount-digest"])
def test_mount_fd_attached_shows_the_image(served, tmp_path, how) -> None:
    proc, sock, repo, built = served
    inspected = subprocess.run([*PYCFS, "--repo", str(repo), "oci", "images", "--json"], check=True,
                               capture_output=True, text=True)
    assert built.manifest_digest in inspected.stdout
    if how == "Mount":
        # images/<hex>: the composefs image the OCI image refers to
        from pycfs.host.mount import resolve_image
        from pycfs.host.repository import Repository

        with Repository.open(str(repo)) as r:
            image_hex = resolve_image(r, "img").hex()
        method, params = f"{REPO}.Mount", {"name": image_hex, "options": {}}
    else:
        image = "img" if how == "OciMount-tag" else built.manifest_digest
        method, params = f"{OCI}.OciMount", {"image": image, "bootable": False, "options": {"overlay": False}}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server_fds, our_fds = fd_count(proc.pid), fd_count()

    fd = asyncio.run(call_for_fd(sock, repo, method, params))
    assert service_fds_back_to(proc.pid, server_fds)  # the service kept no reference
    attach(fd, mnt)
    try:
        assert mounts_below(tmp_path) == [str(mnt)]
        assert mounted_tree(mnt) == expected_tree()
        with pytest.raises(OSError):  # read-only
            (mnt / "new-file").write_bytes(b"x")
    finally:
        syscalls.umount(str(mnt))
    assert mounts_below(tmp_path) == []
    assert fd_count() == our_fds and service_fds_back_to(proc.pid, server_fds)


def test_mount_with_overlay_fds_is_writable_into_upperdir(served, tmp_path) -> None:
    _, sock, repo, _ = served
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    dirfds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in (upper, work)]
    try:
        fd = asyncio.run(call_for_fd(sock, repo, f"{OCI}.OciMount", {
            "image": "img", "bootable": False, "options": {"overlay": True, "read_write": True}}, dirfds))
    finally:
        for d in dirfds:
            os.close(d)
    attach(fd, mnt)
    try:
        (mnt / "etc" / "hostname").write_bytes(b"changed\n")
        (mnt / "added").write_bytes(b"new file\n")
        assert (upper / "etc" / "hostname").read_bytes() == b"changed\n"
        assert (upper / "added").read_bytes() == b"new file\n"
        tree = mounted_tree(mnt)
        assert tree[b"/usr/lib/libbig.so"] == expected_tree()[b"/usr/lib/libbig.so"]
    finally:
        syscalls.umount(str(mnt))
    assert mounts_below(tmp_path) == []


def _raw_call(sock: Path, repo: Path, method: str, params: dict, fds: list[int] = ()) -> dict:
    """One call on a fresh connection, as plain varlink JSON with SCM_RIGHTS, between an
    OpenRepository and a CloseRepository (so the service's fd count comes back)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)

    def call(method: str, params: dict, fds: list[int] = ()) -> dict:
        socket.send_fds(s, [json.dumps({"method": method, "parameters": params}).encode() + b"\0"], list(fds))
        reply = b""
        while not reply.endswith(b"\0"):
            piece = s.recv(65536)
            assert piece, "the service closed the connection"
            reply += piece
        return json.loads(reply[:-1])

    try:
        s.connect(str(sock))
        handle = call(f"{REPO}.OpenRepository", {"path": str(repo)})["parameters"]["handle"]
        answer = call(method, {"handle": handle, **params}, fds)
        call(f"{REPO}.CloseRepository", {"handle": handle})
        return answer
    finally:
        s.close()


def test_non_root_caller_is_refused(served) -> None:
    _, sock, repo, _ = served
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an unprivileged client
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            answer = _raw_call(sock, repo, f"{OCI}.OciMount", {"image": "img", "bootable": False, "options": {}})
            os.write(w, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = json.loads(f.read() or b"null")
    os.waitpid(pid, 0)
    assert answer == {"error": "org.varlink.service.PermissionDenied", "parameters": {}}


def test_mount_requests_checked_before_anything_is_mounted(served) -> None:
    proc, sock, repo, _ = served
    server_fds = fd_count(proc.pid)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        cases = [
            (f"{REPO}.Mount", {"name": "refs/none", "options": {}}, [], f"{REPO}.NoSuchRef"),
            (f"{OCI}.OciMount", {"image": "nope", "bootable": False, "options": {}}, [], f"{OCI}.NoSuchImage"),
            (f"{OCI}.OciMount", {"image": "img", "bootable": True, "options": {}}, [], f"{OCI}.InvalidRequest"),
            (f"{OCI}.OciMount", {"image": "img", "bootable": False, "options": {"overlay": True}}, [null],
             f"{OCI}.InvalidRequest"),
            (f"{OCI}.OciMount", {"image": "img", "bootable": False, "options": {}}, [null], f"{OCI}.InvalidRequest"),
            (f"{OCI}.OciMount", {"image": "img", "bootable": False, "options": {"overlay": True}}, [null, null],
             f"{OCI}.InvalidRequest"),  # not directories
            (f"{OCI}.OciMount", {"image": "img", "bootable": False, "options": {"read_write": True}}, [],
             f"{OCI}.InvalidRequest"),
        ]
        for method, params, fds, error in cases:
            answer = _raw_call(sock, repo, method, params, fds)
            assert answer.get("error") == error, (method, params, answer)
    finally:
        os.close(null)
    assert service_fds_back_to(proc.pid, server_fds)
