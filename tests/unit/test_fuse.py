"""The FUSE server over real images (built by the EROFS writer) and real objects in a
repository, driven with requests encoded as the kernel sends them: no kernel mount needed.
What the kernel's overlay mount shows for the same images is checked in
tests/integration/test_fuse_mount.py."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import pytest

import crafted_images as crafted
import imagebuild
from pycfs.host import syscalls
from pycfs.host.erofs.reader import ImageFormatError, read_image
from pycfs.host.erofs.writer import write_image
from pycfs.host.errors import PycfsError
from pycfs.host.fuse import readahead
from pycfs.host.fuse.image import FuseError, FuseMountError, load_image
from pycfs.host.fuse.operations import ComposefsOperations
from pycfs.host.fuse.readahead import Pusher, ReadAhead
from pycfs.host.fuse.server import FuseServer
from pycfs.host.mount import unmount
from pycfs.host.repository import Repository
from pycfs.protocol import fuse
from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Sparse,
    Stat,
    Symlink,
)

BIG = bytes(range(256)) * 1000 + b"tail"  # 256,004 bytes: several large reads
MEDIUM = b"medium object content " * 20
USER = 1000
# user::rw- user:1000:r-- group::--- mask::r-- other::---
ACL = bytes.fromhex("02000000" "01000600ffffffff" "02000400e8030000" "04000000ffffffff" "10000400ffffffff"
                    "20000000ffffffff")


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
    """An image loaded as `pycfs mount` loads it, with requests encoded as the kernel sends
    them and the replies decoded from what the server writes (to a file standing in for
    /dev/fuse: each reply must be exactly one write)."""

    def __init__(self, tmp_path: Path, version: int, acl: bool = False,
                 tree: Callable[[Repository], FileSystem] = build_tree,
                 craft: Callable[[bytes], bytes] = lambda image: image) -> None:
        self.repo = Repository.init(tmp_path / "repo")
        self.fs = tree(self.repo)
        if acl:
            self.fs.root.entries[b"etc"].entries[b"shadow"].stat.xattrs[b"system.posix_acl_access"] = ACL
        self.image_id = self.repo.link_image(self.repo.ensure_object(craft(write_image(self.fs, version))))
        self.ops = ComposefsOperations(load_image(self.repo, self.image_id))
        self.replies = os.open(tmp_path / "replies", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.server = FuseServer(self.ops, self.replies)
        self.unique = 0
        Mounted.opened.append(self)

    opened: ClassVar[list[Mounted]] = []  # closed after each test (_close_mounted)

    def close(self) -> None:
        self.server.close()
        self.ops.close()
        os.close(self.ops.image.objects_fd)  # the server's process holds it until it exits
        os.close(self.replies)
        self.repo.close()

    def request(self, opcode: int, nodeid: int, body: bytes = b"", uid: int = 0) -> bytes:
        """The reply's payload; FuseError for an error reply."""
        self.unique += 1
        start = os.lseek(self.replies, 0, os.SEEK_CUR)
        self.server.answer(opcode, self.unique, nodeid, uid, memoryview(body))
        reply = os.pread(self.replies, 4 << 20, start)
        head = fuse.OutHeader.unpack_from(reply)
        assert (head.len, head.unique) == (len(reply), self.unique)
        if head.error:
            raise FuseError(-head.error)
        return reply[fuse.OutHeader.FORMAT.size:]

    def lookup(self, parent: int, name: bytes) -> fuse.Attr | None:
        reply = self.request(fuse.LOOKUP, parent, name + b"\0")
        entry = fuse.EntryOut.unpack_from(reply)
        assert entry.entry_valid >= 365 * 86400 and entry.attr_valid >= 365 * 86400  # cached for good
        if entry.nodeid == 0:
            return None  # a cacheable negative entry
        attr = fuse.Attr.unpack_from(reply, fuse.EntryOut.FORMAT.size)
        assert attr.ino == entry.nodeid
        return attr

    def ino(self, path: str) -> int:
        ino = fuse.ROOT_ID
        for part in path.strip("/").split("/"):
            if part:
                attr = self.lookup(ino, part.encode())
                assert attr, path
                ino = attr.ino
        return ino

    def attr(self, path: str) -> fuse.Attr:
        reply = self.request(fuse.GETATTR, self.ino(path), bytes(16))
        return fuse.Attr.unpack_from(reply, fuse.AttrOut.FORMAT.size)

    def listdir(self, path: str, size: int = 4096) -> list[tuple[bytes, fuse.Attr]]:
        """READDIRPLUS from offset 0 until an empty reply, each reply at most `size` bytes."""
        ino, offset, out = self.ino(path), 0, []
        while True:
            reply = self.request(fuse.READDIRPLUS, ino, fuse.ReadIn(0, offset, size).pack())
            assert len(reply) <= size
            if not reply:
                return out
            pos = 0
            while pos < len(reply):
                entry = fuse.EntryOut.unpack_from(reply, pos)
                attr = fuse.Attr.unpack_from(reply, pos + fuse.EntryOut.FORMAT.size)
                d = fuse.Dirent.unpack_from(reply, pos + fuse.EntryOut.FORMAT.size + fuse.Attr.FORMAT.size)
                name_at = pos + fuse.EntryOut.FORMAT.size + fuse.Attr.FORMAT.size + fuse.Dirent.FORMAT.size
                assert entry.nodeid == attr.ino == d.ino and d.type == stat.S_IFMT(attr.mode) >> 12
                out.append((reply[name_at:name_at + d.namelen], attr))
                offset = d.off
                pos = name_at + d.namelen + (-(name_at + d.namelen - pos) % 8)
            assert pos == len(reply)

    def names(self, path: str) -> list[bytes]:
        return [name for name, _ in self.listdir(path)]

    def read(self, ino: int, off: int, size: int) -> bytes:
        return self.request(fuse.READ, ino, fuse.ReadIn(0, off, size).pack())

    def read_all(self, path: str, chunk: int = 128 * 1024) -> bytes:
        ino, out, off = self.ino(path), [], 0
        while True:
            data = self.read(ino, off, chunk)
            if not data:
                return b"".join(out)
            out.append(data)
            off += len(data)

    def getxattr(self, ino: int, name: bytes, uid: int = 0) -> bytes:
        size = fuse.GetxattrOut.unpack_from(self.request(fuse.GETXATTR, ino, bytes(8) + name + b"\0", uid)).size
        if size == 0:  # the kernel asks for the value only when it has a length
            return b""
        value = self.request(fuse.GETXATTR, ino, fuse.GetxattrIn(size).pack() + name + b"\0", uid)
        assert len(value) == size
        return value

    def listxattr(self, ino: int, uid: int = 0) -> list[bytes]:
        size = fuse.GetxattrOut.unpack_from(self.request(fuse.LISTXATTR, ino, bytes(8), uid)).size
        if size == 0:
            return []
        names = self.request(fuse.LISTXATTR, ino, fuse.GetxattrIn(size).pack(), uid)
        return names.split(b"\0")[:-1]


@pytest.fixture(autouse=True)
def _close_mounted():
    """Each test's images closed after it: their fds would stay open for the whole run."""
    yield
    while Mounted.opened:
        Mounted.opened.pop().close()


@pytest.fixture(params=[0, 1, 2], ids=["v0", "v1", "v2"])
def mounted(request, tmp_path) -> Mounted:
    return Mounted(tmp_path, request.param)


def test_tree_metadata(mounted):
    assert mounted.names("/") == [b"dev", b"etc", b"odd", b"usr"]  # no whiteout stubs
    assert [n for n in mounted.names("/dev") if n != b"gone"] == [b"fifo", b"loop0", b"null"]  # whiteouts: below
    tool = mounted.attr("/usr/tool")
    assert stat.S_ISREG(tool.mode) and stat.S_IMODE(tool.mode) == 0o4755
    assert (tool.size, tool.nlink, tool.uid, tool.gid) == (len(BIG), 2, 0, 0)
    assert (tool.mtime, tool.mtimensec) == (1_700_000_005, 999_999_999) or \
        mounted.ops.image.reader.header.composefs_version == 2
    assert mounted.attr("/usr/tool-hardlink").ino == tool.ino
    medium = mounted.attr("/usr/medium")
    assert (medium.uid, medium.gid, stat.S_IMODE(medium.mode)) == (1000, 1000, 0o640)
    null, loop0 = mounted.attr("/dev/null"), mounted.attr("/dev/loop0")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(loop0.mode) and loop0.rdev == os.makedev(7, 0)
    assert stat.S_ISFIFO(mounted.attr("/dev/fifo").mode)
    assert mounted.request(fuse.READLINK, mounted.ino("/usr/link")) == b"../etc/hostname"
    assert mounted.lookup(mounted.ino("/usr"), b"..").ino == fuse.ROOT_ID
    assert mounted.lookup(fuse.ROOT_ID, b"missing") is None
    # READDIRPLUS gives what LOOKUP gives, across replies too small for the whole directory
    listed = mounted.listdir("/usr", size=300)
    assert [n for n, _ in listed] == [b"link", b"medium", b"sparse", b"tool", b"tool-hardlink"]
    assert all(attr == mounted.lookup(mounted.ino("/usr"), name) for name, attr in listed)
    with pytest.raises(FuseError) as e:
        mounted.request(fuse.READDIRPLUS, mounted.ino("/etc/hostname"), fuse.ReadIn(0, 0, 4096).pack())
    assert e.value.errno == errno.ENOTDIR


def test_whiteouts_as_overlay_shows_them(tmp_path):
    """v2 stores a whiteout as chr 0:0, which overlayfs hides; epoch 1 stores it escaped as an
    empty regular file with the (unescaped on reading) whiteout xattr, which overlayfs shows."""
    v1 = Mounted(tmp_path / "v1", 1)
    assert b"gone" in v1.names("/dev")
    gone = v1.attr("/dev/gone")
    assert stat.S_ISREG(gone.mode) and gone.size == 0
    assert v1.getxattr(gone.ino, b"trusted.overlay.whiteout") == b""
    assert v1.getxattr(v1.ino("/dev"), b"trusted.overlay.whiteouts") == b""
    v2 = Mounted(tmp_path / "v2", 2)
    assert v2.names("/dev") == [b"fifo", b"loop0", b"null"]


def test_content(mounted):
    assert mounted.read_all("/usr/tool") == BIG
    assert mounted.read_all("/usr/tool", chunk=4096) == BIG
    assert mounted.read_all("/usr/tool", chunk=1 << 20) == BIG  # one large read
    assert mounted.read_all("/usr/tool-hardlink") == BIG
    assert mounted.read_all("/usr/medium") == MEDIUM
    assert mounted.read_all("/etc/hostname") == b"host\n"
    assert mounted.read_all("/etc/shadow") == b"secret\n"  # modes are the kernel's business
    assert mounted.read_all("/usr/sparse") == bytes(10_000)
    tool = mounted.ino("/usr/tool")
    assert mounted.read(tool, 1000, 10) == BIG[1000:1010]
    assert mounted.read(tool, len(BIG) - 2, 10) == b"il"
    assert mounted.read(tool, len(BIG) + 10, 10) == b""
    # the kernel opens without asking (and so keeps pages and caches listings)
    for opcode in (fuse.OPEN, fuse.OPENDIR):
        with pytest.raises(FuseError) as e:
            mounted.request(opcode, tool, bytes(8))
        assert e.value.errno == errno.ENOSYS
    with pytest.raises(FuseError) as e:
        mounted.read(mounted.ino("/usr"), 0, 10)
    assert e.value.errno == errno.EINVAL


def test_init_negotiates_cached_read_only_serving(mounted):
    ready = []
    mounted.server._on_ready = lambda: ready.append(True)
    offered = (1 << 31) - 1  # every flag this kernel ABI has
    reply = fuse.InitOut.unpack_from(mounted.request(fuse.INIT, 0, fuse.InitIn(7, 40, 131072, offered).pack()))
    assert (reply.major, reply.minor, reply.max_readahead) == (7, fuse.KERNEL_MINOR_VERSION, 131072)
    for flag in (fuse.NO_OPEN_SUPPORT, fuse.NO_OPENDIR_SUPPORT, fuse.CACHE_SYMLINKS, fuse.DO_READDIRPLUS,
                 fuse.MAX_PAGES):
        assert reply.flags & flag
    assert not reply.flags & fuse.POSIX_ACL  # no ACL in the image: the kernel need not ask for any
    assert reply.flags & ~offered == 0 and reply.max_pages * 4096 == 1 << 20
    assert ready == [True]
    with pytest.raises(FuseError) as e:
        mounted.request(fuse.INIT, 0, fuse.InitIn(8, 0, 0, 0).pack())
    assert e.value.errno == errno.EPROTO
    # requests the server has no business with: ENOSYS, and the kernel stops sending them
    with pytest.raises(FuseError) as e:
        mounted.request(16, fuse.ROOT_ID, bytes(40))  # WRITE
    assert e.value.errno == errno.ENOSYS
    end = os.lseek(mounted.replies, 0, os.SEEK_CUR)
    mounted.server.answer(fuse.FORGET, 99, 5, 0, memoryview(bytes(8)))
    assert os.fstat(mounted.replies).st_size == end  # no reply at all


def test_posix_acls_are_enforced_when_the_image_has_some(tmp_path):
    m = Mounted(tmp_path, 1, acl=True)
    reply = fuse.InitOut.unpack_from(m.request(fuse.INIT, 0, fuse.InitIn(7, 40, 131072, (1 << 31) - 1).pack()))
    assert reply.flags & fuse.POSIX_ACL
    assert m.getxattr(m.ino("/etc/shadow"), b"system.posix_acl_access", USER) == ACL


def test_xattrs(mounted):
    tool = mounted.ino("/usr/tool")
    assert mounted.getxattr(tool, b"user.k", USER) == b"v"
    assert mounted.listxattr(tool, USER) == [b"user.k"]  # metacopy/redirect stay hidden
    with pytest.raises(FuseError) as e:
        mounted.getxattr(tool, b"trusted.overlay.metacopy")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(FuseError) as e:  # a buffer too small for the list
        mounted.request(fuse.LISTXATTR, tool, fuse.GetxattrIn(1).pack(), USER)
    assert e.value.errno == errno.ERANGE
    f = mounted.ino("/odd/f")
    # the image's own trusted.overlay.* (escaped when written) shows unescaped, to root only
    assert mounted.getxattr(f, b"trusted.overlay.redirect") == b"/x"
    assert b"trusted.overlay.redirect" in mounted.listxattr(f)
    assert mounted.listxattr(f, USER) == []
    assert mounted.getxattr(mounted.ino("/odd"), b"trusted.overlay.opaque") == b"y"
    assert fuse.Kstatfs.unpack_from(mounted.request(fuse.STATFS, fuse.ROOT_ID)).bsize == 4096


def _stores(data: bytes) -> list[tuple[int, int, bytes]]:
    """The FUSE_NOTIFY_STORE messages (inode, offset, bytes) written one after another."""
    stores, pos = [], 0
    while pos < len(data):
        head = fuse.OutHeader.unpack_from(data, pos)
        store = fuse.NotifyStoreOut.unpack_from(data, pos + 16)
        assert (head.unique, head.error, head.len) == (0, fuse.NOTIFY_STORE, 16 + 24 + store.size)
        stores.append((store.nodeid, store.offset, data[pos + 40:pos + head.len]))
        pos += head.len
    return stores


PATHS = ("/usr/tool", "/usr/medium", "/usr/sparse", "/etc/hostname", "/etc/shadow", "/odd/f")


def _pushed(m: Mounted, reads: list[tuple[str, int, int]], paths: Iterable[str] = PATHS) -> list[tuple[str, int, bytes]]:
    """The stores (path, offset, bytes) the read-ahead makes for the reads the server
    answers, each read's pushes done before the next read (so what is pushed is certain)."""
    with tempfile.TemporaryFile() as out:
        ahead = ReadAhead(m.ops, out.fileno())
        for path, off, size in reads:
            ino = m.ino(path)
            ahead.after_read(ino, off, off + len(m.read(ino, off, size)))
            while ahead.step():
                pass
        ahead.close()
        data = os.pread(out.fileno(), 1 << 24, 0)
    by_ino = {m.ino(p): p for p in paths}
    return [(by_ino[ino], off, b) for ino, off, b in _stores(data)]


def test_read_ahead_pushes_the_rest_of_a_file_but_a_tripwire_page(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "PUSH_AHEAD", 100_000)
    m = Mounted(tmp_path, 1)
    # each read queues the window after it, less what was queued already; a window of more
    # than a few pages leaves out the page in its middle, which the reader must ask for
    stores = _pushed(m, [("/usr/tool", 0, 4096), ("/usr/tool", 4096, 4096), ("/usr/tool", 53_248, 4096)])
    assert [(p, off, len(b)) for p, off, b in stores] == [
        ("/usr/tool", 4096, 53_248 - 4096), ("/usr/tool", 57_344, 104_096 - 57_344),  # 53,248: the tripwire
        ("/usr/tool", 104_096, 4096),  # too short to leave a page out
        ("/usr/tool", 108_192, 131_072 - 108_192), ("/usr/tool", 135_168, 157_344 - 135_168)]
    assert all(b == BIG[off:off + len(b)] for _, off, b in stores)


def test_read_ahead_pushes_the_next_files_of_a_directory_read_in_order(tmp_path):
    m = Mounted(tmp_path, 1)
    # /usr: link, medium, sparse, tool, tool-hardlink. One first read is no order yet; the
    # second, after it in the directory, is: the files after it are pushed, each inode once
    stores = _pushed(m, [("/usr/medium", 0, 4096), ("/usr/sparse", 0, 4096)])
    assert stores == [("/usr/tool", 0, BIG)]
    # from the last file of a directory on to the next directories' files (/ is dev, etc, odd,
    # usr; odd/f is empty)
    assert _pushed(Mounted(tmp_path / "walk", 1), [("/etc/hostname", 0, 4096), ("/etc/shadow", 0, 4096)]) == [
        ("/usr/medium", 0, MEDIUM), ("/usr/tool", 0, BIG)]
    # to an earlier directory, or backwards in one: no order
    assert _pushed(m, [("/usr/medium", 0, 4096), ("/etc/hostname", 0, 4096)]) == []
    assert _pushed(m, [("/usr/sparse", 0, 4096), ("/usr/medium", 0, 4096)]) == []
    # in order, from a later offset: not the start of reading the next file
    assert _pushed(m, [("/usr/medium", 0, 4096), ("/usr/sparse", 4096, 4096)]) == []


def test_read_ahead_leaves_a_reader_that_caught_up_the_piece_ahead_of_it(tmp_path, monkeypatch):
    """A reader that got into a range before it was pushed reads the next piece itself; the
    push goes on after that piece rather than racing the reader's reads over the same pages."""
    monkeypatch.setattr(readahead, "PUSH_AHEAD", 240_000)
    m = Mounted(tmp_path, 1)
    tool = m.ino("/usr/tool")
    with tempfile.TemporaryFile() as out:
        ahead = ReadAhead(m.ops, out.fileno())
        ahead._splicer.limit = 32 * 1024  # pieces of 32 KiB, as if the pipe were that small
        ahead.after_read(tool, 0, 4096)  # queues 4,096-122,880 and 126,976-244,096 (a tripwire page between)
        ahead.after_read(tool, 4096, 40_960)  # the reader got to 40,960 before anything was pushed
        while ahead.step():
            pass
        ahead.close()
        stores = _stores(os.pread(out.fileno(), 1 << 24, 0))
    assert [(off, len(b)) for _, off, b in stores] == [
        (73_728, 32_768), (106_496, 16_384),  # from a piece after the reader's: (40,960 + 32,768) // 4096 * 4096
        (126_976, 32_768), (159_744, 32_768), (192_512, 32_768), (225_280, 18_816),
        (244_096, 256_004 - 244_096)]  # the second read's window: to the end
    assert all(b == BIG[off:off + len(b)] for _, off, b in stores)


def twelve_files(repo: Repository) -> FileSystem:
    fs = FileSystem()
    fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
    d = fs.root.entries[b"d"] = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
    for i in range(12):
        data = b"file %02d " % i * 100
        d.entries[b"f%02d" % i] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), External(repo.ensure_object(data), len(data)))
    return fs


TWELVE = [f"/d/f{i:02d}" for i in range(12)]


def test_read_ahead_walk_keeps_files_ahead_and_learns_where_the_reader_is_from_a_tripwire(tmp_path, monkeypatch):
    """A reader served from the page cache sends nothing: the walk keeps PUSH_FILES ahead of
    it, and leaves the file where half of them are ahead to the reader, whose READ of it is
    the signal to take the next ones."""
    monkeypatch.setattr(readahead, "PUSH_FILES", 4)
    m = Mounted(tmp_path, 1, tree=twelve_files)
    first = lambda i: (TWELVE[i], 0, 4096)
    pushed = lambda reads: [(p, off) for p, off, b in _pushed(m, reads, TWELVE) if b == b"file %s " % p[-2:].encode() * 100]
    f = lambda *ns: [(TWELVE[n], 0) for n in ns]
    # f02, f03, f05 ahead; f04 the tripwire. Its READ: f06, f08 (f05 is still ahead); f07's: f09, f11
    assert pushed([first(0), first(1)]) == f(2, 3, 5)
    assert pushed([first(0), first(1), first(4), first(7)]) == f(2, 3, 5, 6, 8, 9, 11)
    # a reader past everything the walk took (it skipped the tripwire): the walk goes on from it
    assert pushed([first(0), first(1), first(9)]) == f(2, 3, 5, 10, 11)
    # a reader out of order is no walk; in order again, a new walk, and what was pushed stays pushed
    assert pushed([first(0), first(1), first(0)]) == f(2, 3, 5)
    assert pushed([first(0), first(1), first(0), first(4)]) == f(2, 3, 5, 6, 8)


def test_read_ahead_process_pushes_for_the_reads_the_loop_answers(tmp_path):
    """The real thing: the read-ahead forked as the server forks it, told about the reads the
    server answers through its pipe, stopped and reaped."""
    m = Mounted(tmp_path, 1)
    with tempfile.TemporaryFile() as out:
        m.ops.tree.load()  # as the server does before it mounts: the process knows the whole tree
        pusher = m.server._pusher = Pusher(m.ops, out.fileno())
        pusher.start()
        pid = pusher.pid
        try:
            m.read_all("/usr/medium")
            m.read_all("/usr/sparse")  # in order: /usr/tool is pushed
            deadline = time.monotonic() + 30
            while os.fstat(out.fileno()).st_size < 40 + len(BIG):
                assert time.monotonic() < deadline, "nothing pushed"
                time.sleep(0.01)
        finally:
            pusher.stop(lambda timeout: (time.sleep(timeout), True)[1])
        assert pusher.pid is None
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped
        stores = _stores(os.pread(out.fileno(), 1 << 24, 0))
    assert stores == [(m.ino("/usr/tool"), 0, BIG)]
    assert m.read_all("/usr/tool") == BIG  # reads go on without it


def test_server_reads_on_when_its_read_ahead_process_dies(tmp_path):
    m = Mounted(tmp_path, 1)
    m.ops.tree.load()
    with tempfile.TemporaryFile() as out:
        pusher = m.server._pusher = Pusher(m.ops, out.fileno())
        pusher.start()
        assert pusher.pid is not None
        os.kill(pusher.pid, signal.SIGKILL)
        os.waitid(os.P_PID, pusher.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
        for _ in range(3):  # the first write after its death finds the pipe broken
            assert m.read_all("/usr/medium") == MEDIUM
        assert pusher._events is None
        pusher.stop(lambda timeout: (time.sleep(timeout), True)[1])  # reaps it
        assert pusher.pid is None


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
        with pytest.raises(FuseError) as e:
            m.read_all("/usr/medium")
        assert e.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("/usr/medium: object ") and "EIO" in lines[0], lines
    assert m.read_all("/usr/tool") == BIG  # everything else is served
    assert m.attr("/usr/medium").size == len(MEDIUM)


@pytest.mark.parametrize("chunk", [4096, 128 * 1024], ids=["read", "spliced"])
def test_object_shrunk_after_open_is_eio_not_a_short_reply(tmp_path, caplog, chunk):
    """A short reply would make the kernel shrink the file: an object that lost bytes after
    its first read (kept open) gives EIO, with nothing of the reply written."""
    m = Mounted(tmp_path, 1)
    tool = m.ino("/usr/tool")
    assert m.read(tool, 0, 10) == BIG[:10]  # the object is open now
    path = _object_file(m, BIG)
    path.chmod(0o644)
    os.truncate(path, 200_000)
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    for _ in range(2):
        with pytest.raises(FuseError) as e:
            m.read(tool, 200_000 - 100, chunk)
        assert e.value.errno == errno.EIO
    assert [r.getMessage() for r in caplog.records] == [
        f"/usr/tool: object {m.ops.tree.node(m.ops.tree.nid(tool)).internal[b'trusted.overlay.redirect'].decode()} "
        "is shorter than the image says; reading it gives EIO"]
    assert m.read(tool, 1000, 10) == BIG[1000:1010]  # what is there is still served
    assert m.read_all("/usr/medium") == MEDIUM


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
    junk = m.repo.link_image(m.repo.ensure_object(b"\0" * 8192))
    with pytest.raises(FuseMountError, match=r"is not a valid composefs image: bad composefs magic"):
        load_image(m.repo, junk)


@pytest.mark.parametrize("case", sorted(crafted.REFUSED))
def test_an_image_the_reader_refuses_is_refused_before_it_is_served(tmp_path, case):
    """The start-up checks the image without making its tree: each damage read_image
    refuses, it refuses with read_image's message."""
    make, message = crafted.REFUSED[case]
    image = make()
    with pytest.raises(ImageFormatError, match=message) as read:
        read_image(image)
    repo = Repository.init(tmp_path / "repo")
    try:
        image_id = repo.link_image(repo.ensure_object(image))
        with pytest.raises(FuseMountError) as e:
            load_image(repo, image_id)
        assert str(e.value) == f"image {image_id.hex()} is not a valid composefs image: {read.value}"
    finally:
        repo.close()


def _acl_tree(where: str) -> Callable[[Repository], FileSystem]:
    """build_tree with an ACL (or a name like one) at `where`."""
    def tree(repo: Repository) -> FileSystem:
        fs = build_tree(repo)
        r = fs.root.entries
        if where == "file-access":
            r[b"usr"].entries[b"tool"].stat.xattrs[b"system.posix_acl_access"] = ACL
        elif where == "dir-default":
            r[b"odd"].stat.xattrs[b"system.posix_acl_default"] = ACL
        elif where == "root-access":
            fs.root.stat.xattrs[b"system.posix_acl_access"] = ACL
        elif where == "not-an-acl":
            r[b"etc"].entries[b"hostname"].stat.xattrs[b"user.system.posix_acl_access"] = ACL
        elif where == "whiteout":  # written as a file marked a whiteout: the tree shows it
            r[b"dev"].entries[b"gone"].stat.xattrs[b"system.posix_acl_access"] = ACL
        return fs
    return tree


@pytest.mark.parametrize("where, version, acls", [
    ("none", 1, False), ("file-access", 1, True), ("dir-default", 0, True), ("root-access", 2, True),
    ("not-an-acl", 1, False), ("whiteout", 1, True),
])
def test_acls_are_found_where_the_tree_shows_them(tmp_path, where, version, acls):
    """The start-up finds an ACL exactly where read_image's tree shows one (what it
    decided on before it checked without a tree)."""
    m = Mounted(tmp_path, version, tree=_acl_tree(where))
    tree = read_image(m.repo.image_bytes(m.image_id)).fs
    assert any(key.startswith(b"system.posix_acl_") for _, node in tree.walk() for key in node.stat.xattrs) is acls
    assert m.ops.image.acls is acls


def test_umount_of_nothing_says_so(tmp_path):
    with pytest.raises(PycfsError, match="nothing is mounted at"):
        unmount(str(tmp_path))


def test_a_directory_with_many_names_is_loaded_once():
    """C mkcomposefs writes a hardlinked directory as a second name: twelve levels of
    directories each named twice by the one above are 2^12 paths, and the mount's walks
    (ACLs, the decode of every inode) visit each directory once."""
    from pycfs.host.erofs.reader import check_image
    from pycfs.host.fuse.image import ImageReader, ImageTree, _has_acls
    from pycfs.host.tree import Directory, FileSystem, Inline, Leaf, Stat

    root = d = Directory(Stat(0o755))
    for _ in range(12):
        d.entries[b"a"] = d.entries[b"b"] = d = Directory(Stat(0o755))
    d.entries[b"f"] = Leaf(Stat(0o644, xattrs={b"system.posix_acl_access": b"\2\0\0\0"}), Inline(b"x"))
    image = write_image(FileSystem(root), 0)
    assert _has_acls(check_image(image))
    tree = ImageTree(ImageReader(image))
    listed: list[int] = []
    real = tree.entries
    tree.entries = lambda nid: (listed.append(nid), real(nid))[1]  # type: ignore[method-assign]
    tree.load()
    assert len(listed) == len(set(listed)) == 13


def small_tree(repo: Repository) -> FileSystem:
    """A file of 1969, a symlink of 4000 bytes (one data block), a file whose image entry
    has no digest, a file whose name has a newline, and a good file."""
    fs = FileSystem()
    r = fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
    r.entries[b"old"] = Leaf(Stat(0o644, 0, 0, -5, 250), Inline(b"from 1969\n"))
    r.entries[b"link"] = Leaf(Stat(0o777, 0, 0, 1_700_000_000, 0), Symlink(b"t" * 4000))
    r.entries[b"nodigest"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0),
                                  ExternalNoVerity(repo.object_path(repo.ensure_object(MEDIUM)).relative_to(
                                      repo.path / "objects").as_posix().encode(), len(MEDIUM)))
    r.entries[b"x\npycfs mount: all objects verified"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0),
                                                             External(bytes(range(32)), 10))
    r.entries[b"good"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), External(repo.ensure_object(BIG), len(BIG)))
    return fs


@pytest.mark.parametrize("version", [0, 1, 2])
def test_times_before_1970_are_served(tmp_path, version):
    """The kernel reads fuse_attr's times as signed: a file of 1969 is served with its mtime
    (packed unsigned, every request about it failed and the mount could not even start)."""
    m = Mounted(tmp_path, version, tree=small_tree)
    m.ops.tree.load()
    old = m.attr("/old")
    if version < 2:  # format 2 stores one mtime for all: the build time
        assert (old.mtime, old.mtimensec) == (-5, 250)
    assert [name for name, _ in m.listdir("/")][:1] == [b"good"]
    assert m.read_all("/old") == b"from 1969\n"


def test_symlink_target_longer_than_linux_allows_is_eio(tmp_path, caplog):
    """A crafted symlink of 6000 bytes: the kernel refuses a READLINK reply over 4095 bytes
    (EINVAL), which ended the server; it is EIO with one line, the rest is served."""
    m = Mounted(tmp_path, 1, tree=small_tree, craft=lambda image: imagebuild.patched_inode(image, b"/link", size=6000))
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    link = m.ino("/link")
    assert m.attr("/link").size == 6000
    for _ in range(2):
        with pytest.raises(FuseError) as e:
            m.request(fuse.READLINK, link)
        assert e.value.errno == errno.EIO
    assert [r.getMessage() for r in caplog.records] == [
        "/link: symlink target of 6000 bytes, longer than Linux allows (4095); reading it gives EIO"]
    assert m.read_all("/good") == BIG


def test_a_reply_the_kernel_refuses_fails_that_request_only(tmp_path, caplog, monkeypatch):
    """/dev/fuse answers a reply it cannot take with EINVAL: the request is failed with EIO
    (the kernel's, or the server's own error reply), one line is logged, and serving goes on."""
    m = Mounted(tmp_path, 1)
    link = m.ino("/usr/link")
    writes: list[int] = []
    real = os.writev

    def refusing(fd: int, buffers: list) -> int:
        writes.append(sum(map(len, buffers)))
        if len(writes) == 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", refusing)
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    with pytest.raises(FuseError) as e:
        m.request(fuse.READLINK, link)
    assert e.value.errno == errno.EIO  # the server's error reply, here where nothing ended the request
    assert writes == [fuse.OutHeader.FORMAT.size + len(b"../etc/hostname"), fuse.OutHeader.FORMAT.size]
    assert [r.getMessage() for r in caplog.records] == [
        f"/usr/link: the kernel refused the reply to request {fuse.READLINK}; it gets EIO"]
    assert m.request(fuse.READLINK, link) == b"../etc/hostname"


def test_an_entry_without_a_digest_is_refused_where_the_repository_has_fs_verity(tmp_path, caplog):
    """overlayfs's verity=require refuses a file whose image entry has no digest: so does the
    server in a repository with fs-verity (it served the object unchecked)."""
    m = Mounted(tmp_path, 1, tree=small_tree)
    assert m.read_all("/nodigest") == MEDIUM  # no fs-verity: served as the kernel mount serves it
    m = Mounted(tmp_path / "secure", 1, tree=small_tree)
    m.ops.image.verity_alg = 1  # as a repository with fs-verity has it (tmpfs has none)
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    for _ in range(2):
        with pytest.raises(FuseError) as e:
            m.read(m.ino("/nodigest"), 0, 4096)
        assert e.value.errno == errno.EIO
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("/nodigest: object ") and line.endswith(
        " has no fs-verity digest in the image, which this repository requires; reading it gives EIO")


def test_a_name_with_a_newline_cannot_forge_a_log_line(tmp_path, caplog):
    m = Mounted(tmp_path, 1, tree=small_tree)
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    with pytest.raises(FuseError):
        m.read(m.ino("/x\npycfs mount: all objects verified"), 0, 10)
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and line.startswith("/x\\x0apycfs mount: all objects verified: object ")


def test_an_object_that_is_a_fifo_is_never_opened(tmp_path, caplog):
    """Only a regular file is opened: the open of a fifo (a writer waiting for a reader) or a
    device (a tape rewinds) has effects of its own."""
    m = Mounted(tmp_path, 1)
    path = _object_file(m, MEDIUM)
    path.unlink()
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)))  # waits for a reader
    writer.start()
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    try:
        with pytest.raises(FuseError):
            m.read_all("/usr/medium")
        time.sleep(0.2)
        assert writer.is_alive()  # no reader ever came
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        writer.join()
    assert [r.getMessage() for r in caplog.records][-1].endswith("is not a regular file but a fifo; reading it gives EIO")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_objects_are_never_looked_up_across_a_mount(tmp_path, caplog):
    """A mount below objects/ (the server's own mount, even, where it deadlocked looking up
    through itself) is not crossed: the file is EIO."""
    m = Mounted(tmp_path, 1)
    path = _object_file(m, MEDIUM)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / path.name).write_bytes(MEDIUM)
    syscalls.mount(str(elsewhere), str(path.parent), "none", 4096)  # MS_BIND
    caplog.set_level(logging.INFO, logger="pycfs.fuse")
    try:
        assert path.read_bytes() == MEDIUM
        with pytest.raises(FuseError) as e:
            m.read_all("/usr/medium")
        assert e.value.errno == errno.EIO
    finally:
        syscalls.umount(str(path.parent), syscalls.MNT_DETACH)
    assert [r.getMessage() for r in caplog.records][-1].endswith(
        "Invalid cross-device link); reading it gives EIO")
    assert m.read_all("/usr/tool") == BIG


def test_a_shared_xattr_is_decoded_once(tmp_path):
    """300 files with one 32 KB xattr (stored once, shared): one value in memory, not 300
    copies (3000 such files made the server 124 MB)."""
    value = os.urandom(32 * 1024)

    def tree(repo: Repository) -> FileSystem:
        fs = FileSystem()
        fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        for i in range(300):
            fs.root.entries[b"f%03d" % i] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0, {b"user.big": value}), Inline(b""))
        return fs

    m = Mounted(tmp_path, 1, tree=tree)
    m.ops.tree.load()
    nodes = [m.ops.tree.node(nid) for _, nid in m.ops.tree.entries(m.ops.tree.root_nid)]
    assert len(nodes) == 300 and all(n.xattrs[b"user.big"] is nodes[0].xattrs[b"user.big"] for n in nodes)
    assert nodes[0].xattrs[b"user.big"] == value == m.getxattr(m.ino("/f123"), b"user.big")
    assert all(n.raw.xattrs == () for n in nodes)  # the stored form is dropped once decoded
    leaves = read_image(m.ops.image.reader.data).fs.root.entries.values()
    assert len({id(leaf.stat.xattrs[b"user.big"]) for leaf in leaves}) == 1
