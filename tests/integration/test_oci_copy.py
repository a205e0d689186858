"""`pycfs oci copy` between repositories, as a user runs it: same algorithm (identical
streams and image), sha256 -> sha512 (a valid image whose mounted tree is the same),
--zerocopy on one reflinking XFS (disk barely grows), a second copy (nothing moves), and
a source behind a running `pycfs varlink serve`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagebuild

pytestmark = pytest.mark.integration

PYCFS = [sys.executable, "-m", "pycfs.tools.cli"]


def pycfs(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PYCFS, "--repo", str(repo), *args], check=check, capture_output=True, text=True)


def inspect(repo: Path, image: str) -> dict:
    return json.loads(pycfs(repo, "oci", "inspect", image).stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, imagebuild.BuiltImage]:
    base = tmp_path_factory.mktemp("copy-src")
    built = imagebuild.build_layout(imagebuild.multilayer_image(), base / "layout")
    pycfs(base / "repo", "init")
    pycfs(base / "repo", "oci", "pull", f"oci:{built.path}", "img")
    return base / "repo", built


def copy(dest: Path, src: str, *extra: str) -> dict:
    return json.loads(pycfs(dest, "oci", "copy", "img", "--from", src, "--json", *extra).stdout)


def test_copy_same_algorithm_is_identical_and_second_copy_moves_nothing(source, tmp_path) -> None:
    src, built = source
    dest = tmp_path / "dest"
    pycfs(dest, "init")
    first = copy(dest, str(src), "--name", "copied")
    assert first["manifest_digest"] == built.manifest_digest and first["config_digest"] == built.config_digest
    assert all(layer["copied"] for layer in first["layers"]) and first["objects_copied"] > 0
    ours, theirs = inspect(dest, "copied"), inspect(src, "img")
    for key in ("manifest_digest", "config_digest", "manifest_verity", "config_verity", "layers", "images",
                "manifest", "config"):
        assert ours[key] == theirs[key], key
    assert pycfs(dest, "oci", "compute-id", "copied").stdout == pycfs(src, "oci", "compute-id", "img").stdout
    fsck = json.loads(pycfs(dest, "fsck", "--json").stdout)
    assert fsck["ok"] and fsck["objects"] > 0
    # the layer streams give back the very same tars
    for diff_id in built.diff_ids:
        tar = subprocess.run([*PYCFS, "--repo", str(dest), "cat", f"oci-layer-{diff_id}"], check=True,
                             capture_output=True).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
    second = copy(dest, str(src), "--name", "copied")
    assert not any(layer["copied"] for layer in second["layers"])
    assert (second["objects_reflinked"], second["objects_copied"], second["objects_hardlinked"]) == (0, 0, 0)
    assert second["manifest_verity"] == first["manifest_verity"]


def describe(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            extra = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                                 None if stat.S_ISDIR(st.st_mode) else st.st_size, extra)
    return out


def mounted_tree(repo: Path, image: str, mnt: Path) -> dict[str, tuple]:
    mnt.mkdir()
    pycfs(repo, "mount", image, str(mnt))
    try:
        return describe(mnt)
    finally:
        pycfs(repo, "umount", str(mnt))


def test_copy_across_algorithms(source, tmp_path) -> None:
    src, built = source
    dest = tmp_path / "sha512"
    pycfs(dest, "init", "--algorithm", "fsverity-sha512-12")
    result = copy(dest, str(src), "--name", "copied")
    assert result["manifest_digest"] == built.manifest_digest
    assert len(result["manifest_verity"]) == 128 and len(result["config_verity"]) == 128
    assert all(len(layer["layer_verity"]) == 128 for layer in result["layers"])
    fsck = json.loads(pycfs(dest, "fsck", "--json").stdout)
    assert fsck["ok"] and fsck["objects"] > 0 and fsck["images"] == 1
    refused = pycfs(dest, "oci", "copy", "img", "--from", str(src), "--zerocopy", check=False)
    assert refused.returncode == 1 and "zerocopy" in refused.stderr and "hash algorithm" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stderr.startswith("pycfs: error: ")
    if os.geteuid() != 0:
        pytest.skip("comparing the mounted trees needs root (EROFS and overlayfs mounts)")
    theirs = mounted_tree(src, "img", tmp_path / "mnt-src")
    ours = mounted_tree(dest, "copied", tmp_path / "mnt-dest")
    assert ours == theirs and len(ours) > 20


def test_copy_from_a_running_service(source, tmp_path) -> None:
    src, built = source
    sock = tmp_path / "src.sock"
    proc = subprocess.Popen([*PYCFS, "varlink", "serve", "--address", f"unix:{sock}"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        dest = tmp_path / "dest"
        pycfs(dest, "init")
        missing = pycfs(dest, "oci", "copy", "img", "--from", f"unix:{sock}", check=False)
        assert missing.returncode == 1 and "--from-repo" in missing.stderr
        nowhere = pycfs(dest, "oci", "copy", "img", "--from", f"unix:{sock}", "--from-repo", str(tmp_path / "none"),
                        check=False)
        # the service's own words, not its error's qualified name
        assert nowhere.returncode == 1 and nowhere.stderr.startswith(
            f"pycfs: error: oci copy img: cannot open repository {tmp_path / 'none'}: "), nowhere.stderr
        assert nowhere.stderr.count("\n") == 1 and "org.composefs" not in nowhere.stderr
        result = copy(dest, f"unix:{sock}", "--from-repo", str(src), "--name", "served")
        assert result["manifest_digest"] == built.manifest_digest
        assert inspect(dest, "served")["layers"] == inspect(src, "img")["layers"]
        assert json.loads(pycfs(dest, "fsck", "--json").stdout)["ok"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


BIG = imagebuild.ImageSpec(layers=[
    [imagebuild.Dir("usr"), imagebuild.File("usr/a", size=24 * imagebuild.MIB, seed=11),
     imagebuild.File("usr/b", size=24 * imagebuild.MIB + 123, seed=12)],
    [imagebuild.File("usr/c", size=16 * imagebuild.MIB, seed=13), imagebuild.File("usr/tiny", data=b"t" * 10)],
], gzip=False)


def _used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_zerocopy_on_one_reflink_xfs_adds_almost_nothing(reflink_dir, tmp_path) -> None:
    base = reflink_dir / f"copy-{os.getpid()}"
    base.mkdir()
    try:
        built = imagebuild.build_layout(BIG, tmp_path / "layout")
        image_bytes = 64 * imagebuild.MIB
        pycfs(base / "a", "init")
        pycfs(base / "a", "oci", "pull", f"oci:{built.path}", "img")
        pycfs(base / "b", "init")
        before = _used_bytes(base)
        result = copy(base / "b", str(base / "a"), "--zerocopy", "--name", "img")
        added = _used_bytes(base) - before
        assert result["objects_reflinked"] == 3 and result["objects_copied"] == 0
        assert added < image_bytes / 100, f"zerocopy added {added} bytes for a {image_bytes}-byte image"
        assert json.loads(pycfs(base / "b", "fsck", "--json").stdout)["ok"]
        assert inspect(base / "b", "img")["images"] == inspect(base / "a", "img")["images"]
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_a_damaged_source_object_is_refused_in_one_line_and_its_layer_not_committed(tmp_path) -> None:
    """An object of the source cut short (its name no longer its content): the layer that
    holds it arrives with another digest than its diff_id; the copy says so in one line,
    naming the layer and what to do; that layer is not committed and nothing is tagged."""
    built, src, dest, victim = _pulled_with_victim(tmp_path)
    os.truncate(victim, victim.stat().st_size // 2)
    line = _failed_copy(src, dest)
    prefix = "pycfs: error: oci copy img: layer sha256:"
    assert line.startswith(prefix) and f" from {src} came as sha256:" in line, line
    assert line.endswith("that layer was not committed and no image was tagged (check the source with "
                         "`pycfs fsck --verify-layers`)"), line
    _nothing_committed(dest, built, line[len(prefix) - len("sha256:"):].split()[0])


def test_a_missing_source_object_is_named_in_one_line(tmp_path) -> None:
    """An object of the source deleted: the in-process source cannot send that layer whole;
    the copy's one line names the missing object (not only the short stream's digest), the
    layer is not committed and nothing is tagged."""
    built, src, dest, victim = _pulled_with_victim(tmp_path)
    victim.unlink()
    line = _failed_copy(src, dest)
    prefix = "pycfs: error: oci copy img: layer sha256:"
    assert line.startswith(prefix), line
    assert f" from {src}: object {victim.parent.name + victim.name} of layer stream " in line, line
    assert line.endswith(" is missing: the source is damaged; that layer was not committed and no image was "
                         "tagged (check the source with `pycfs fsck`)"), line
    _nothing_committed(dest, built, line[len(prefix) - len("sha256:"):].split()[0])


def _pulled_with_victim(tmp_path: Path) -> tuple[imagebuild.BuiltImage, Path, Path, Path]:
    """A source repository with the multilayer image pulled, an empty destination, and the
    source's largest object (to damage)."""
    built = imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path / "layout")
    src, dest = tmp_path / "src", tmp_path / "dest"
    pycfs(src, "init")
    pycfs(src, "oci", "pull", f"oci:{built.path}", "img")
    pycfs(dest, "init")
    victim = max((p for p in (src / "objects").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return built, src, dest, victim


def _failed_copy(src: Path, dest: Path) -> str:
    """The one line a copy of img from src that fails prints (exit 1)."""
    p = pycfs(dest, "oci", "copy", "img", "--from", str(src), "--progress", "none", check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def _nothing_committed(dest: Path, built: imagebuild.BuiltImage, diff_id: str) -> None:
    """The failed layer is one of the image's, not in dest, and no manifest was stored."""
    assert diff_id in built.diff_ids
    streams = {p.name for p in (dest / "streams").iterdir()} if (dest / "streams").exists() else set()
    assert f"oci-layer-{diff_id}" not in streams and not any(n.startswith("oci-manifest-") for n in streams)
