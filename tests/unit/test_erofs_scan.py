"""Directory sources: `mkcomposefs DIR IMAGE` semantics (C spec 5) and the dir_synth vectors."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------------- a source changing under the walk


OUTSIDE = b"S" * 10  # the walk must never read this: it is not in the source
OUTSIDE_BIG = b"S" * 5000


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "secret").write_bytes(OUTSIDE)
    (out / "big-secret").write_bytes(OUTSIDE_BIG)
    (out / "dir" / "private-key").write_bytes(OUTSIDE)
    return out


def _swap_after_lstat(monkeypatch, name: str, swap, listing: bool = True) -> list[bool]:
    """Run swap() once, right after the walk has learnt what the entry called name is and
    before it reads it: what a racing process could do. The walk learns it from the
    directory's listing (d_type; not with ``listing`` False), or from an lstat (by path in
    the old walk, from the directory's fd for entries the listing does not settle)."""
    done: list[bool] = []

    def once(names) -> None:
        if not done and name in names:
            done.append(True)
            swap()

    real_lstat, real_stat, real_scandir = os.lstat, os.stat, os.scandir

    def lstat(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        once([os.fsdecode(path).rsplit("/", 1)[-1]])
        return st

    def stat(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if "dir_fd" in kw:
            once([os.fsdecode(path)])
        return st

    def scandir(path):
        if not (listing and isinstance(path, int)):
            return real_scandir(path)
        with real_scandir(path) as it:
            entries = contextlib.nullcontext(list(it))
        once([e.name for e in entries.enter_result])
        return entries
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    return done


def _unblocking(fifo: Path):
    """A thread that opens the fifo for writing until told to stop: code that opened it to
    read then sees EOF rather than blocking the test for ever."""
    import threading

    stop = threading.Event()

    def writer() -> None:
        while not stop.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return stop


@pytest.mark.parametrize("size", [10, 5000])
@pytest.mark.parametrize("store", [False, True])
def test_file_swapped_for_symlink_outside_is_not_read(tmp_path, outside, monkeypatch, size, store):
    """The walk describes the symlink it finds (or refuses): never the outside file's bytes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "v").write_bytes(b"A" * size)
    target = outside / ("secret" if size <= 64 else "big-secret")

    def swap() -> None:
        os.symlink(target, tmp_path / "t")
        os.replace(tmp_path / "t", src / "v")
    done = _swap_after_lstat(monkeypatch, "v", swap)
    store_dir = tmp_path / "store"
    fs = scan_directory(str(src), ScanOptions(digest_store=str(store_dir) if store else None))
    assert done == [True]
    assert fs.root.entries[b"v"].content == Symlink(os.fsencode(target))
    if store:
        assert not list(store_dir.rglob("*"))


def test_directory_swapped_for_symlink_outside_is_not_listed(tmp_path, outside, monkeypatch):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "mine").write_bytes(b"mine")

    def swap() -> None:
        os.rename(src / "d", tmp_path / "moved")
        os.symlink(outside / "dir", src / "d")
    done = _swap_after_lstat(monkeypatch, "d", swap)
    fs = scan_directory(str(src))
    assert done == [True]
    assert fs.root.entries[b"d"].content == Symlink(os.fsencode(outside / "dir"))
    assert [p for p, _ in fs.walk()] == [b"/", b"/d"]


def test_symlink_swapped_for_a_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("somewhere", src / "l")

    def swap() -> None:
        (tmp_path / "t").write_bytes(b"now a file")
        os.replace(tmp_path / "t", src / "l")
    done = _swap_after_lstat(monkeypatch, "l", swap, listing=False)
    with pytest.raises(ScanError, match=f"^{src}/l changed while being read$"):
        scan_directory(str(src))
    assert done == [True]


def test_file_swapped_for_fifo_does_not_block(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "v").write_bytes(b"A" * 10)

    def swap() -> None:
        os.mkfifo(tmp_path / "t")
        os.replace(tmp_path / "t", src / "v")
    done = _swap_after_lstat(monkeypatch, "v", swap)
    stop = _unblocking(src / "v")  # the old walk blocked in open() until a writer came
    try:
        fs = scan_directory(str(src))
    finally:
        stop.set()
    assert done == [True]
    assert isinstance(fs.root.entries[b"v"].content, Fifo)


@pytest.mark.parametrize("store", [False, True])
def test_file_replaced_by_a_bigger_one_gives_no_mixed_size_and_digest(tmp_path, monkeypatch, store):
    """The size the image holds is that of the bytes its digest is of, or the scan fails."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "v").write_bytes(b"A" * 100)

    def swap() -> None:
        (tmp_path / "t").write_bytes(b"B" * 200)
        os.replace(tmp_path / "t", src / "v")
    done = _swap_after_lstat(monkeypatch, "v", swap)
    opts = ScanOptions(digest_store=str(tmp_path / "store") if store else None)
    try:
        fs = scan_directory(str(src), opts)
    except ScanError as e:
        assert str(e) == f"{src}/v changed while being read"
    else:
        content = fs.root.entries[b"v"].content
        assert content in (External(digest_bytes(b"A" * 100), 100), External(digest_bytes(b"B" * 200), 200))
    assert done == [True]


@pytest.mark.parametrize("threads", [0, 2])  # hashed in this process, and by worker processes
def test_file_grown_before_it_is_hashed(tmp_path, monkeypatch, threads):
    import pycfs.host.workers.pool as pool

    src = tmp_path / "src"
    src.mkdir()
    (src / "v").write_bytes(b"A" * 100)
    (src / "w").write_bytes(b"W" * 100)
    real = pool.digest_files

    async def growing(paths, *a, **kw):
        with open(src / "v", "ab") as f:  # the same inode, 100 bytes more
            f.write(b"B" * 100)
        return await real(paths, *a, **kw)
    monkeypatch.setattr(pool, "digest_files", growing)
    with pytest.raises(ScanError, match=f"^{src}/v changed while being read$"):
        scan_directory(str(src), ScanOptions(threads=threads))
    monkeypatch.setattr(pool, "digest_files", real)
    fs = scan_directory(str(src), ScanOptions(threads=threads))
    assert fs.root.entries[b"v"].content == External(digest_bytes(b"A" * 100 + b"B" * 100), 200)
    assert fs.root.entries[b"w"].content == External(digest_bytes(b"W" * 100), 100)


def test_store_failure_leaves_no_copies(tmp_path, small_tree):
    store = tmp_path / "store"
    store.mkdir()
    in_the_way = digest_bytes(pat(5000, 1)).hex()[:2]
    (store / in_the_way).write_bytes(b"")
    with pytest.raises(ScanError, match=f"^cannot store objects in {store}/{in_the_way}: it is not a directory$"):
        scan_directory(str(small_tree), ScanOptions(digest_store=str(store)))
    assert sorted(p.name for p in store.iterdir()) == [in_the_way]


def test_special_files_xattrs_read_from_the_entry(tmp_path):
    """Symlinks, fifos: their xattrs (trusted.*, root only) through their O_PATH fds."""
    if os.geteuid() != 0:
        pytest.skip("trusted.* xattrs need root")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("target", src / "l")
    os.mkfifo(src / "p")
    os.setxattr(src / "l", "trusted.l", b"1", follow_symlinks=False)
    os.setxattr(src / "p", "trusted.p", b"2", follow_symlinks=False)
    e = scan_directory(str(src)).root.entries
    assert e[b"l"].content == Symlink(b"target") and e[b"l"].stat.xattrs == {b"trusted.l": b"1"}
    assert isinstance(e[b"p"].content, Fifo) and e[b"p"].stat.xattrs == {b"trusted.p": b"2"}
