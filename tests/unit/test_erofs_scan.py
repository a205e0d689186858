"""Directory sources: `mkcomposefs DIR IMAGE` semantics (C spec 5) and the dir_synth vectors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pycfs.host import dumpfile
from pycfs.host.erofs.writer import choose_version, write_image
from pycfs.host.fsverity import digest_bytes
from pycfs.host.scan import ScanError, ScanOptions, scan_directory
from pycfs.host.tree import External, Fifo, Inline, Symlink
from vectors import C_VECTORS, c_manifest

VECTORS = C_VECTORS
MANIFEST = c_manifest()


def pat(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    top = tmp_path / "src"
    (top / "sub").mkdir(parents=True)
    for n in (0, 1, 64, 65, 5000):
        (top / f"f{n}").write_bytes(pat(n, 1))
    (top / "sub" / "dup").write_bytes(pat(5000, 1))
    os.link(top / "f65", top / "sub" / "hl")
    os.symlink("f1", top / "sym")
    os.mkfifo(top / "fifo")
    os.utime(top / "f1", ns=(0, 1_700_000_000_123_456_789))
    return top


def test_scan_kinds(small_tree):
    fs = scan_directory(str(small_tree))
    e = fs.root.entries
    assert e[b"f0"].content == Inline(b"")
    assert e[b"f1"].content == Inline(pat(1, 1))
    assert e[b"f64"].content == Inline(pat(64, 1))
    assert e[b"f65"].content == External(digest_bytes(pat(65, 1)), 65)
    assert e[b"f5000"].content == e[b"sub"].entries[b"dup"].content
    # hardlinks are not detected (C behaviour): two inodes
    assert e[b"sub"].entries[b"hl"] is not e[b"f65"]
    assert e[b"sub"].entries[b"hl"].content == e[b"f65"].content
    assert e[b"sym"].content == Symlink(b"f1")
    assert isinstance(e[b"fifo"].content, Fifo)
    assert (e[b"f1"].stat.mtime_sec, e[b"f1"].stat.mtime_nsec) == (1_700_000_000, 123_456_789)
    epoch = scan_directory(str(small_tree), ScanOptions(use_epoch=True))
    assert all((n.stat.mtime_sec, n.stat.mtime_nsec) == (0, 0) for _p, n in epoch.walk())


def test_threads_do_not_change_the_image(small_tree):
    images = {write_image(scan_directory(str(small_tree), ScanOptions(threads=t)), 0) for t in (1, 2, 8)}
    assert len(images) == 1


def test_digest_store_layout(small_tree, tmp_path):
    store = tmp_path / "store"
    fs = scan_directory(str(small_tree), ScanOptions(digest_store=str(store)))
    files = sorted(p for p in store.rglob("*") if p.is_file())
    expected = sorted({digest_bytes(pat(65, 1)).hex(), digest_bytes(pat(5000, 1)).hex()})
    assert [f"{p.parent.name}{p.name}" for p in files] == expected
    for p in files:
        assert p.stat().st_mode & 0o7777 == 0o644
        assert digest_bytes(p.read_bytes()).hex() == p.parent.name + p.name
    assert fs.root.entries[b"f65"].content.id.hex() in expected
    assert not list(store.rglob(".tmp*"))


def test_scan_errors(tmp_path):
    with pytest.raises(ScanError, match="not a directory"):
        (tmp_path / "f").write_bytes(b"")
        scan_directory(str(tmp_path / "f"))
    with pytest.raises(ScanError, match="cannot stat"):
        scan_directory(str(tmp_path / "missing"))
    with pytest.raises(ScanError, match="Invalid argument"):
        scan_directory(str(tmp_path), ScanOptions(skip_xattrs=True, user_xattrs=True))


# ---------------------------------------------------------------------------- C vectors


@pytest.fixture(scope="module")
def synth_tree(tmp_path_factory) -> Path:
    tar = VECTORS / "synth_tree.tar"
    if os.geteuid() != 0:
        pytest.skip("extracting synth_tree.tar with owners, devices and trusted.* xattrs needs root")
    if not shutil.which("tar"):
        pytest.skip("tar is not installed")
    dest = tmp_path_factory.mktemp("synth")
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tar)],
                   cwd=dest, check=True)
    return dest / "synth_tree"


FLAGS = {
    "dir_synth": {}, "dir_synth_threads1": {"threads": 1}, "dir_synth_epoch": {"use_epoch": True},
    "dir_synth_skipxattrs": {"skip_xattrs": True}, "dir_synth_userxattrs": {"user_xattrs": True},
    "dir_synth_skipdevices": {"skip_devices": True}, "dir_synth_v1": {},
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_dir_synth_vectors(name, synth_tree):
    case = next(c for c in MANIFEST["directory_cases"] if c["name"] == name)
    fs = scan_directory(str(synth_tree), ScanOptions(**FLAGS[name]))
    lo, hi = (1, 1) if name == "dir_synth_v1" else (0, 1)
    image = write_image(fs, choose_version(fs, lo, hi))
    assert hashlib.sha256(image).hexdigest() == case["sha256"], (
        dumpfile.write(fs).decode(errors="replace"))
    assert digest_bytes(image).hex() == case["fsverity"]


def test_dir_synth_store_objects(synth_tree, tmp_path):
    store = tmp_path / "objects_synth"
    fs = scan_directory(str(synth_tree), ScanOptions(digest_store=str(store)))
    case = next(c for c in MANIFEST["directory_cases"] if c["name"] == "dir_synth_store")
    assert hashlib.sha256(write_image(fs, choose_version(fs, 0, 1))).hexdigest() == case["sha256"]
    expected = [line.split()[:3] for line in (VECTORS / "dir_synth_store.objects").read_text().splitlines()
                if not line.startswith("#")]
    got = sorted([str(p.relative_to(store)), f"{p.stat().st_mode & 0o777777:o}", str(p.stat().st_size)]
                 for p in store.rglob("*") if p.is_file())
    assert got == sorted(expected)
