"""`pycfs oci copy --from unix:SOCKET` from a `pycfs varlink serve --containers-storage`
service run as an unprivileged user on their rootless podman store: layers arrive through
the splitdirfdstream transport, files only container uids may read as InlineData read by
the helper, everything byte-exact (each layer stream hashes to its diff_id)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from test_cstorage_pull import _empty_primary
from test_restrictive_pull import layer_contents

from pycfs.host.oci.layer import layer_stream_name
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes

pytestmark = pytest.mark.integration

RESTRICTIVE = [b"/etc/shadow", b"/home/user/secret.txt", b"/home/user/tiny", b"/srv/locked/readonly.bin",
               b"/root/big-secret.bin"]


def _serve_as(user, sock: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    argv = ["runuser", "-u", user.name, "--", str(user.python), "-m", "pycfs.tools.cli", "varlink", "serve",
            "--containers-storage", "--address", f"unix:{sock}"]
    proc = subprocess.Popen(argv, cwd=user.home, env={**user.environ(), **(env or {})}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the service did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _layer_digest(repo, diff_id: str) -> str:
    with Repository.open(repo, writable=False) as r:
        h = hashlib.sha256()
        for piece in iter_stream_bytes(r, r.open_stream(layer_stream_name(diff_id))):
            h.update(piece)
    return "sha256:" + h.hexdigest()


def test_copy_from_a_containers_storage_service(podman_user, restrictive_loaded, multilayer_loaded) -> None:
    user = podman_user
    work = user.tmpdir("cstor-")
    sock = str(work / "cstor.sock")
    proc = _serve_as(user, sock)
    try:
        for loaded, tag in ((restrictive_loaded, "restrictive"), (multilayer_loaded, "multi")):
            repo = work / f"repo-{tag}"
            user.pycfs("--repo", repo, "init")
            out = user.pycfs("--repo", repo, "oci", "copy", loaded.ref, "--from", f"unix:{sock}", "--name", tag,
                             "--json").stdout
            result = json.loads(out)
            assert result["manifest_digest"] == loaded.built.manifest_digest
            assert result["config_digest"] == loaded.built.config_digest
            assert [layer["diff_id"] for layer in result["layers"]] == loaded.built.diff_ids
            for diff_id in loaded.built.diff_ids:
                assert _layer_digest(repo, diff_id) == diff_id
            fsck = json.loads(user.pycfs("--repo", repo, "fsck", "--json").stdout)
            assert fsck["ok"], fsck
            again = json.loads(user.pycfs("--repo", repo, "oci", "copy", loaded.ref, "--from", f"unix:{sock}",
                                          "--json").stdout)
            assert not any(layer["copied"] for layer in again["layers"])
        # the restrictive files: the user cannot read them, yet they arrived byte-exact
        (diff_id,) = restrictive_loaded.built.diff_ids
        contents = layer_contents(work / "repo-restrictive", diff_id)
        upper = user.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                            restrictive_loaded.ref).stdout.decode().strip()
        for path in RESTRICTIVE:
            probe = user.run(["cat", upper + os.fsdecode(path)], check=False)
            assert probe.returncode != 0 and b"Permission denied" in probe.stderr, path
            truth = user.unshare("cat", upper + os.fsdecode(path)).stdout
            assert hashlib.sha256(contents[path]).digest() == hashlib.sha256(truth).digest(), path
    finally:
        _stop(proc)
        print("service stderr:", proc.stderr.read().decode() if proc.stderr else "")
    assert proc.returncode in (0, 130), proc.returncode  # 130: stopped by the SIGINT above


def test_copy_from_a_service_of_an_additional_store_the_user_owns(podman_user, restrictive_loaded) -> None:
    """The image in an additional image store whose root the user owns: files only container
    uids may read come through the helper beneath that store (the service's helper was
    started for the primary store only, and looked the layer up there)."""
    user = podman_user
    work = user.tmpdir("cstor-add-")
    primary, conf = _empty_primary(user)
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{primary}"\nrootless_storage_path = "{primary}"\n'
                    f'[storage.options]\nadditionalimagestores = ["{user.storage_root}"]\n')
    sock = str(work / "cstor.sock")
    proc = _serve_as(user, sock, {"CONTAINERS_STORAGE_CONF": str(conf)})
    try:
        repo = work / "repo"
        user.pycfs("--repo", repo, "init")
        result = json.loads(user.pycfs("--repo", repo, "oci", "copy", restrictive_loaded.ref, "--from", f"unix:{sock}",
                                       "--name", "r", "--json").stdout)
        assert result["manifest_digest"] == restrictive_loaded.built.manifest_digest
        for diff_id in restrictive_loaded.built.diff_ids:
            assert _layer_digest(repo, diff_id) == diff_id
    finally:
        _stop(proc)
        print("service stderr:", proc.stderr.read().decode() if proc.stderr else "")
