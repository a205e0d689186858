"""The helper pair with real `podman unshare`, driven as the unprivileged test user.

A small driver script (DRIVER below) runs `HelperClient` as `pycfs-test`; the tests check
what it could read, what it was refused, and how the helper lives and dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LAYER = "5e" * 32
SECRET = b"only a sub-uid may read this, and not even it: mode 0000\n"

DRIVER = r'''
import json, os, signal, sys
import trio
from pycfs.host.errors import PycfsError
from pycfs.host.helperclient import HelperClient

mode, root, layer, *names = sys.argv[1:]
driver = "overlay"


def describe(results, names):
    out = {}
    for name, r in zip(names, results):
        if isinstance(r, OSError):
            out[name] = {"errno": r.errno, "reason": r.reason}
        else:
            data = b""
            while chunk := os.read(r, 1 << 20):
                data += chunk
            st = os.fstat(r)
            out[name] = {"size": st.st_size, "mode": st.st_mode, "uid": st.st_uid, "data": data.hex() if len(data) < 4096 else None,
                         "sha256": __import__("hashlib").sha256(data).hexdigest()}
    return out


def direct(names):
    out = {}
    for name in names:
        try:
            os.close(os.open(os.path.join(root, f"overlay/{layer}/diff", name), os.O_RDONLY | os.O_NONBLOCK))
            out[name] = 0
        except OSError as e:
            out[name] = e.errno
    return out


async def main():
    async with HelperClient(root, driver, policy="auto") as helper:
        if mode == "open":
            res = await helper.open_files(layer, names)
            report = {"direct": direct(names), "helper": describe(res, names), "info": helper.info}
            for r in res:
                if isinstance(r, int):
                    helper.release(r)
            report["budget_restored"] = helper.budget.available == helper.budget.total
            print(json.dumps(report), flush=True)
        elif mode == "linger":
            info = await helper.hello()
            print(json.dumps({"host": os.getpid(), "helper": info["pid"]}), flush=True)
            await trio.sleep(120)
        elif mode == "kill-mid-request":
            info = await helper.hello()
            os.kill(info["pid"], signal.SIGSTOP)  # keeps the request in flight
            async with trio.open_nursery() as n:
                async def killer():
                    await trio.sleep(0.3)
                    os.kill(info["pid"], signal.SIGKILL)
                n.start_soon(killer)
                try:
                    await helper.open_files(layer, names)
                    print(json.dumps({"error": None}))
                except PycfsError as e:
                    print(json.dumps({"error": str(e), "pid": info["pid"]}))


try:
    trio.run(main)
except PycfsError as e:
    print(json.dumps({"fatal": str(e)}))
'''


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, content)
    return out


@pytest.fixture
def driver_script(shared_tmp_path) -> Path:
    p = shared_tmp_path / "drive_helper.py"
    p.write_text(DRIVER)
    os.chmod(p, 0o644)
    return p


@pytest.fixture
def fake_storage(podman_user) -> Path:
    """A graph root holding one overlay layer whose files only sub-uids own, made inside
    the user's namespace: a 0000 file in a 0700 directory, plus the traps for refusals."""
    root = podman_user.tmpdir("storage-")
    diff = f"{root}/overlay/{LAYER}/diff"
    script = f"""
        set -e
        mkdir -p {diff}/private {diff}/somedir
        printf '%s' "$SECRET" > {diff}/private/shadow
        chown 1000:1000 {diff}/private/shadow {diff}/private
        chmod 0000 {diff}/private/shadow
        chmod 0700 {diff}/private
        echo public > {diff}/public
        ln -s /etc/passwd {diff}/escape
        ln -s private/shadow {diff}/inner-link
        mkfifo {diff}/fifo
    """
    podman_user.run(["podman", "unshare", "sh", "-c", script], env={"SECRET": SECRET.decode()})
    return root


def _drive(user, script: Path, *args: str, path: str | None = None) -> dict:
    prefix = ["/usr/bin/env", f"PATH={path}"] if path else []
    p = user.run([*prefix, user.python, script, *args], timeout=120)
    lines = p.stdout.decode().strip().splitlines()
    assert lines, p.stderr.decode()
    return json.loads(lines[-1])


def test_reads_a_0000_subuid_file_the_user_cannot_open(podman_user, fake_storage, driver_script):
    st = os.stat(fake_storage / "overlay" / LAYER / "diff/private/shadow")
    assert st.st_uid not in (0, podman_user.uid) and stat.S_IMODE(st.st_mode) == 0
    before = _snapshot(fake_storage)
    names = ["private/shadow", "public"]
    report = _drive(podman_user, driver_script, "open", str(fake_storage), LAYER, *names)
    assert "fatal" not in report, report
    assert report["direct"] == {"private/shadow": 13, "public": 0}  # EACCES for the user itself
    got = report["helper"]["private/shadow"]
    assert bytes.fromhex(got["data"]) == SECRET
    assert got["uid"] == st.st_uid and stat.S_IMODE(got["mode"]) == 0
    assert bytes.fromhex(report["helper"]["public"]["data"]) == b"public\n"
    assert report["budget_restored"]
    info = report["info"]
    assert info["uid_map"][0] == [0, podman_user.uid, 1]
    assert info["cap_effective"] == info["cap_permitted"] == info["cap_bounding"] == 1 << 2
    assert info["no_new_privs"] == 1
    assert _snapshot(fake_storage) == before


def test_refusals_through_podman_unshare(podman_user, fake_storage, driver_script):
    before = _snapshot(fake_storage)
    expected = {
        "../x": "dotdot-component",
        "/etc/passwd": "absolute-path",
        "escape": "symlink",
        "inner-link": "symlink",
        "fifo": "not-regular",
        "somedir": "directory",
        "private//shadow": "empty-component",
        "missing": "open-failed",
    }
    report = _drive(podman_user, driver_script, "open", str(fake_storage), LAYER, *expected)
    assert {k: v["reason"] for k, v in report["helper"].items()} == expected
    assert report["helper"]["missing"]["errno"] == 2
    assert _snapshot(fake_storage) == before


def test_real_restrictive_layer(podman_user, restrictive_loaded, driver_script):
    upper = podman_user.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", restrictive_loaded.ref)
    diff = Path(upper.stdout.decode().strip())
    assert diff.name == "diff" and diff.parent.parent.name == "overlay"
    layer_id = diff.parent.name
    names = ["etc/shadow", "home/user/secret.txt", "srv/locked/readonly.bin", "srv/shadow-hardlink", "srv/public.txt"]
    report = _drive(podman_user, driver_script, "open", str(podman_user.storage_root), layer_id, *names)
    assert "fatal" not in report, report
    assert report["direct"]["srv/public.txt"] == 0
    for name in names[:4]:
        assert report["direct"][name] == 13, name  # the user alone cannot open these
    for name in names:
        want = hashlib.sha256((diff / name).read_bytes()).hexdigest()  # read as root
        assert report["helper"][name]["sha256"] == want, name
    assert bytes.fromhex(report["helper"]["home/user/secret.txt"]["data"]).startswith(b"only uid 1000 may read")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_killing_the_host_ends_the_helper_within_a_second(podman_user, fake_storage, driver_script):
    cmd = ["runuser", "-u", podman_user.name, "--", str(podman_user.python), str(driver_script),
           "linger", str(fake_storage), LAYER]  # fmt: skip
    p = subprocess.Popen(cmd, env=podman_user.environ(), cwd=podman_user.home, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read().decode()
        pids = json.loads(line)
        assert not _gone(pids["helper"])
        os.kill(pids["host"], signal.SIGKILL)
        killed = time.monotonic()
        while not _gone(pids["helper"]) and time.monotonic() - killed < 1.0:
            time.sleep(0.02)
        assert _gone(pids["helper"]), "the helper outlived its host by more than a second"
    finally:
        p.kill()
        p.wait(timeout=30)


def test_killing_the_helper_mid_request_is_a_clear_error(podman_user, fake_storage, driver_script):
    report = _drive(podman_user, driver_script, "kill-mid-request", str(fake_storage), LAYER, "private/shadow")
    msg = report["error"]
    assert msg and f"helper (pid {report['pid']}) died during open_files" in msg
    assert "run the command again" in msg and "\n" not in msg


def test_missing_podman_says_so(podman_user, fake_storage, driver_script):
    report = _drive(podman_user, driver_script, "open", str(fake_storage), LAYER, "private/shadow", path="/nonexistent")
    assert "`podman` was not found on PATH" in report["fatal"]
    assert "install podman" in report["fatal"]
