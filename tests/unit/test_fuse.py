"""The FUSE server's handlers over real images (built by the EROFS writer) and real objects in
a repository, called directly: no kernel mount needed. What the kernel's overlay mount shows
for the same images is checked in tests/integration/test_fuse_mount.py."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from pycfs.host.erofs.writer import write_image
from pycfs.host.errors import PycfsError
from pycfs.host.fusemount import ComposefsOperations, FuseMountError, load_image
from pycfs.host.mount import unmount
from pycfs.host.repository import Repository
from pycfs.host.tree import BlockDevice, CharDevice, Directory, External, Fifo, FileSystem, Inline, Leaf, Sparse, Stat, Symlink

BIG = bytes(range(256)) * 1000 + b"tail"  # 256,004 bytes: several large reads
MEDIUM = b"medium object content " * 20
USER = SimpleNamespace(uid=1000)
ROOT = SimpleNamespace(uid=0)


def build_tree(repo: Repository) -> FileSystem:
    big, medium = repo.ensure_object(BIG), repo.ensure_object(MEDIUM)
    fs = FileSystem()
    r = fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 5))
    etc = r.entries[b"etc"] = Directory(Stat(0o755, 0, 0, 1_700_000_001, 0))
    etc.entries[b"hostname"] = Leaf(Stat(0o644, 0, 0, 1_700_000_002, 7), Inline(b"host\n"))
    etc.entries[b"shadow"] = Leaf(Stat(0o000, 0, 42, 1_700_000_003, 0), Inline(b"secret\n"))
    usr = r.entries[b"usr"] = Directory(Stat(0o755, 0, 0, 1_700_000_004, 0))
    tool = Leaf(Stat(0o4755, 0, 0, 1_700_000_005, 999_999_999, {b"user.k": b"v"}), External(big, len(BIG)))
    usr.entries[b"tool"] = tool
    usr.entries[b"tool-hardlink"] = tool
    usr.entries[b"medium"] = Leaf(Stat(0o640, 1000, 1000, 1_700_000_006, 0), External(medium, len(MEDIUM)))
    usr.entries[b"link"] = Leaf(Stat(0o777, 0, 0, 1_700_000_007, 0), Symlink(b"../etc/hostname"))
    usr.entries[b"sparse"] = Leaf(Stat(0o644, 0, 0, 1_700_000_008, 0), Sparse(10_000))
    dev = r.entries[b"dev"] = Directory(Stat(0o755, 0, 0, 1_700_000_009, 0))
    dev.entries[b"null"] = Leaf(Stat(0o666, 0, 0, 1_700_000_010, 0), CharDevice(os.makedev(1, 3)))
    dev.entries[b"loop0"] = Leaf(Stat(0o660, 0, 6, 1_700_000_011, 0), BlockDevice(os.makedev(7, 0)))
    dev.entries[b"fifo"] = Leaf(Stat(0o600, 0, 0, 1_700_000_012, 0), Fifo())
    dev.entries[b"gone"] = Leaf(Stat(0o644, 0, 0, 1_700_000_013, 0), CharDevice(0))  # a whiteout
    odd = r.entries[b"odd"] = Directory(Stat(0o755, 0, 0, 1_700_000_014, 0, {b"trusted.overlay.opaque": b"y"}))
    odd.entries[b"f"] = Leaf(Stat(0o644, 0, 0, 1_700_000_015, 0, {b"trusted.overlay.redirect": b"/x"}), Inline(b""))
    return fs


class Mounted:
    """An image loaded as `pycfs mount` loads it, with handlers called as the kernel would."""

    def __init__(self, tmp_path: Path, version: int) -> None:
        self.repo = Repository.init(tmp_path / "repo")
        self.fs = build_tree(self.repo)
        self.image_id = self.repo.write_image(write_image(self.fs, version))
        self.ops = ComposefsOperations(load_image(self.repo, self.image_id))

    def call(self, name: str, *args):
        return trio.run(getattr(self.ops, name), *args)

    def ino(self, path: str) -> int:
        ino = pyfuse3.ROOT_INODE
        for part in path.strip("/").split("/"):
            if part:
                ino = self.call("lookup", ino, part.encode(), ROOT).st_ino
                assert ino, path
        return ino

    def attr(self, path: str) -> pyfuse3.EntryAttributes:
        return self.call("getattr", self.ino(path), ROOT)

    def names(self, path: str) -> list[bytes]:
        return [name for name, _ in self.ops.tree.entries(self.ops.tree.nid(self.ino(path)))]

    def read_all(self, path: str, chunk: int = 128 * 1024) -> bytes:
        fh = self.call("open", self.ino(path), os.O_RDONLY, ROOT).fh
        out, off = [], 0
        while True:
            data = self.call("read", fh, off, chunk)
            if not data:
                break
            out.append(data)
            off += len(data)
        self.call("release", fh)
        return b"".join(out)


@pytest.fixture(params=[0, 1, 2], ids=["v0", "v1", "v2"])
def mounted(request, tmp_path) -> Mounted:
    return Mounted(tmp_path, request.param)


def test_tree_metadata(mounted):
    assert mounted.names("/") == [b"dev", b"etc", b"odd", b"usr"]  # no whiteout stubs
    assert [n for n in mounted.names("/dev") if n != b"gone"] == [b"fifo", b"loop0", b"null"]  # whiteouts: below
    tool = mounted.attr("/usr/tool")
    assert stat.S_ISREG(tool.st_mode) and stat.S_IMODE(tool.st_mode) == 0o4755
    assert (tool.st_size, tool.st_nlink, tool.st_uid, tool.st_gid) == (len(BIG), 2, 0, 0)
    assert tool.st_mtime_ns == 1_700_000_005_999_999_999 or mounted.ops.image.reader.header.composefs_version == 2
    assert mounted.attr("/usr/tool-hardlink").st_ino == tool.st_ino
    medium = mounted.attr("/usr/medium")
    assert (medium.st_uid, medium.st_gid, stat.S_IMODE(medium.st_mode)) == (1000, 1000, 0o640)
    assert mounted.attr("/dev/null").st_rdev == os.makedev(1, 3) and stat.S_ISCHR(mounted.attr("/dev/null").st_mode)
    assert mounted.attr("/dev/loop0").st_rdev == os.makedev(7, 0) and stat.S_ISBLK(mounted.attr("/dev/loop0").st_mode)
    assert stat.S_ISFIFO(mounted.attr("/dev/fifo").st_mode)
    assert mounted.call("readlink", mounted.ino("/usr/link"), ROOT) == b"../etc/hostname"
    assert mounted.call("lookup", mounted.ino("/usr"), b"..", ROOT).st_ino == pyfuse3.ROOT_INODE
    assert mounted.call("lookup", pyfuse3.ROOT_INODE, b"missing", ROOT).st_ino == 0  # a cacheable negative entry
    with pytest.raises(pyfuse3.FUSEError) as e:
        mounted.call("opendir", mounted.ino("/etc/hostname"), ROOT)
    assert e.value.errno == errno.ENOTDIR


def test_whiteouts_as_overlay_shows_them(tmp_path):
    """v2 stores a whiteout as chr 0:0, which overlayfs hides; epoch 1 stores it escaped as an
    empty regular file with the (unescaped on reading) whiteout xattr, which overlayfs shows."""
    v1 = Mounted(tmp_path / "v1", 1)
    assert b"gone" in v1.names("/dev")
    gone = v1.attr("/dev/gone")
    assert stat.S_ISREG(gone.st_mode) and gone.st_size == 0
    assert v1.call("getxattr", gone.st_ino, b"trusted.overlay.whiteout", ROOT) == b""
    assert v1.call("getxattr", v1.ino("/dev"), b"trusted.overlay.whiteouts", ROOT) == b""
    v2 = Mounted(tmp_path / "v2", 2)
    assert v2.names("/dev") == [b"fifo", b"loop0", b"null"]


def test_content(mounted):
    assert mounted.read_all("/usr/tool") == BIG
    assert mounted.read_all("/usr/tool", chunk=4096) == BIG
    assert mounted.read_all("/usr/tool-hardlink") == BIG
    assert mounted.read_all("/usr/medium") == MEDIUM
    assert mounted.read_all("/etc/hostname") == b"host\n"
    assert mounted.read_all("/etc/shadow") == b"secret\n"  # modes are the kernel's business
    assert mounted.read_all("/usr/sparse") == bytes(10_000)
    fh = mounted.call("open", mounted.ino("/usr/tool"), os.O_RDONLY, ROOT)
    assert fh.keep_cache
    assert mounted.call("read", fh.fh, 1000, 10) == BIG[1000:1010]
    assert mounted.call("read", fh.fh, len(BIG) - 2, 10) == b"il"
    mounted.call("release", fh.fh)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as e:
            mounted.call("open", mounted.ino("/usr/tool"), flags, ROOT)
        assert e.value.errno == errno.EROFS


def test_xattrs(mounted):
    tool = mounted.ino("/usr/tool")
    assert mounted.call("getxattr", tool, b"user.k", USER) == b"v"
    assert mounted.call("listxattr", tool, USER) == [b"user.k"]  # metacopy/redirect stay hidden
    with pytest.raises(pyfuse3.FUSEError) as e:
        mounted.call("getxattr", tool, b"trusted.overlay.metacopy", ROOT)
    assert e.value.errno == pyfuse3.ENOATTR
    f = mounted.ino("/odd/f")
    # the image's own trusted.overlay.* (escaped when written) shows unescaped, to root only
    assert mounted.call("getxattr", f, b"trusted.overlay.redirect", ROOT) == b"/x"
    assert b"trusted.overlay.redirect" in mounted.call("listxattr", f, ROOT)
    assert mounted.call("listxattr", f, USER) == []
    assert mounted.call("getxattr", mounted.ino("/odd"), b"trusted.overlay.opaque", ROOT) == b"y"


def _object_file(m: Mounted, data: bytes) -> Path:
    return m.repo.object_path(m.repo.ensure_object(data))


@pytest.mark.parametrize("damage", ["missing", "truncated", "grown", "fifo", "symlink", "directory"])
def test_broken_object_is_eio_for_that_file_only(tmp_path, caplog, damage):
    m = Mounted(tmp_path, 1)
    path = _object_file(m, MEDIUM)
    path.unlink()
    if damage == "truncated":
        path.write_bytes(MEDIUM[:-1])
    elif damage == "grown":
        path.write_bytes(MEDIUM + b"x")
    elif damage == "fifo":
        os.mkfifo(path)  # opening it must not hang the server
    elif damage == "symlink":
        path.symlink_to(_object_file(m, BIG))
    elif damage == "directory":
        path.mkdir()
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    for _ in range(2):
        with pytest.raises(pyfuse3.FUSEError) as e:
            m.read_all("/usr/medium")
        assert e.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("/usr/medium: object ") and "EIO" in lines[0], lines
    assert m.read_all("/usr/tool") == BIG  # everything else is served
    assert m.attr("/usr/medium").st_size == len(MEDIUM)


def test_corrupt_image_is_refused(tmp_path):
    m = Mounted(tmp_path, 1)
    image = m.repo.object_path(m.image_id)
    data = bytearray(image.read_bytes())
    data[1200] ^= 0xFF
    image.chmod(0o644)
    image.write_bytes(bytes(data))
    with pytest.raises(FuseMountError, match=r"^image [0-9a-f]{64} is corrupt: its fs-verity digest differs"):
        load_image(m.repo, m.image_id)
    # correctly named, but not an image
    junk = m.repo.write_image(b"\0" * 8192)
    with pytest.raises(FuseMountError, match=r"is not a valid composefs image: bad composefs magic"):
        load_image(m.repo, junk)


def test_umount_of_nothing_says_so(tmp_path):
    with pytest.raises(PycfsError, match="nothing is mounted at"):
        unmount(str(tmp_path))
