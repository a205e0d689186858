"""`pycfs mount` through FUSE shows what the kernel mount and podman show.

Oracles: the kernel's own EROFS + overlayfs mount of the same image (as root), and podman's
view of the image (`podman unshare` + `podman image mount`) for a pulled multi-layer image with
restrictive files, walked as the unprivileged test user (whose FUSE mount goes through
fusermount3) and as root of that user's podman namespace (a FUSE mount inside a user
namespace). Plus what damage does: EIO for a file whose object is missing or wrong, a corrupt
image refused at mount, and a killed server whose mount point `pycfs umount` still cleans.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagebuild
from imagebuild import MIB, ImageSpec
from pycfs.host.erofs.reader import read_image
from pycfs.host.erofs.writer import write_image
from pycfs.host.mount import resolve_image
from pycfs.host.repository import Repository
from pycfs.host.tree import BlockDevice, CharDevice, Directory, External, Fifo, FileSystem, Inline, Leaf, Stat, Symlink

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fuse_available():
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs /dev/fuse and fusermount3 (tools/setup.sh installs fuse3)")
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not open to users (tools/setup.sh makes it so, as udev does)")

REF = "localhost/pycfs-fuse-test:latest"


def walk(root: str) -> dict:
    """Every entry below root as the caller sees it (also run as the test user, from source)."""
    import hashlib
    import os
    import stat

    out: dict = {}

    def visit(path: bytes, rel: bytes) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out[rel.hex()] = None  # listed, yet no such entry (overlayfs: whiteouts in unmerged dirs)
            return
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size, "nlink": st.st_nlink,
             "mtime": st.st_mtime_ns, "ino": st.st_ino, "rdev": st.st_rdev, "xattrs": {}}
        try:
            keys = sorted(os.listxattr(path, follow_symlinks=False))
        except OSError as err:
            keys, e["xattr_errno"] = [], err.errno
        for k in keys:
            try:
                e["xattrs"][k] = os.getxattr(path, k, follow_symlinks=False).hex()
            except OSError as err:
                e["xattrs"][k] = f"errno {err.errno}"
        names: list[bytes] = []
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(path).hex()
        elif stat.S_ISREG(st.st_mode):
            try:
                with open(path, "rb") as f:
                    e["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as err:
                e["errno"] = err.errno
        elif stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(path))
            except OSError as err:
                e["errno"] = err.errno
        out[rel.hex()] = e
        for name in names:
            visit(os.path.join(path, name), rel + b"/" + name)

    visit(os.fsencode(root), b"")
    return out


WALK_SCRIPT = inspect.getsource(walk) + "\nimport json, sys\njson.dump(walk(sys.argv[1]), sys.stdout)\n"


def same_inodes(tree: dict) -> set[frozenset]:
    """Paths of non-directories grouped by inode number: hardlinks."""
    groups: dict[int, set] = {}
    for rel, e in tree.items():
        if not stat.S_ISDIR(e["mode"]):
            groups.setdefault(e["ino"], set()).add(rel)
    return {frozenset(g) for g in groups.values()}


def metadata(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("ino", "xattr_errno")}


def pycfs_root(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), *args],
                          capture_output=True, check=check, timeout=120)


# ---------------------------------------------------------------------------------------
# FUSE against the kernel's mount, as root


def edge_tree(repo: Repository, version: int) -> FileSystem:
    """Everything a composefs image can hold, including what overlayfs treats specially (but
    no size without an object: the kernel answers EIO for those)."""
    big = os.urandom(3 * MIB + 123)
    mid = b"an object of a few hundred bytes\n" * 20
    long = 4097 if version < 2 else 3000  # format 2 keeps file data within the inode's block
    fs = FileSystem()
    r = fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 1))
    d = r.entries[b"d"] = Directory(Stat(0o750, 1000, 1000, 1_700_000_001, 2, {b"user.dir": b"1"}))
    big_leaf = Leaf(Stat(0o4755, 0, 0, 1_700_000_002, 3, {b"security.capability": imagebuild.CAP_NET_BIND_SERVICE_V2}),
                    External(repo.ensure_object(big), len(big)))
    d.entries[b"big"] = big_leaf
    r.entries[b"big-hardlink"] = big_leaf
    d.entries[b"mid"] = Leaf(Stat(0o600, 1000, 1000, 1_600_000_000, 999_999_999), External(repo.ensure_object(mid), len(mid)))
    d.entries[b"inline"] = Leaf(Stat(0o644, 0, 0, 1_700_000_003, 0, {b"user.a": b"\x00\xff"}), Inline(b"x" * long))
    d.entries[b"empty"] = Leaf(Stat(0o644, 0, 0, 1_700_000_004, 0), Inline(b""))
    d.entries[b"1969"] = Leaf(Stat(0o644, 0, 0, -5, 250), Inline(b"before the epoch\n"))  # a negative mtime
    d.entries[b"abs-link"] = Leaf(Stat(0o777, 0, 0, 1_700_000_006, 0), Symlink(b"/d/big"))
    d.entries[b"long-link"] = Leaf(Stat(0o777, 0, 0, 1_700_000_007, 0), Symlink(b"a/" * (long // 3) + b"b"))
    dev = r.entries[b"dev"] = Directory(Stat(0o755, 0, 0, 1_700_000_008, 0))
    dev.entries[b"null"] = Leaf(Stat(0o666, 0, 0, 1_700_000_009, 0), CharDevice(os.makedev(1, 3)))
    dev.entries[b"sda"] = Leaf(Stat(0o660, 0, 6, 1_700_000_010, 0), BlockDevice(os.makedev(8, 300)))
    dev.entries[b"fifo"] = Leaf(Stat(0o600, 0, 0, 1_700_000_011, 0), Fifo())
    dev.entries[b"whiteout"] = Leaf(Stat(0o644, 0, 0, 1_700_000_012, 0), CharDevice(0))
    o = r.entries[b"overlay-xattrs"] = Directory(Stat(0o755, 0, 0, 1_700_000_013, 0, {b"trusted.overlay.opaque": b"y"}))
    o.entries[b"f"] = Leaf(Stat(0o644, 0, 0, 1_700_000_014, 0, {b"trusted.overlay.redirect": b"/elsewhere",
                                                               b"user.overlay.x": b"y", b"trusted.other": b"t"}),
                           Inline(b"file with the image's own overlay xattrs\n"))
    many = r.entries[b"many"] = Directory(Stat(0o755, 0, 0, 1_700_000_015, 0))
    for i in range(600):  # directory blocks beyond the first, and readdir continuing at an offset
        many.entries[b"entry-%04d-" % i + b"n" * 40] = Leaf(Stat(0o644, i, i, 1_700_000_016, i), Inline(b"%d\n" % i))
    return fs


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.skip("the kernel's EROFS and overlay mounts need root")


@pytest.mark.parametrize("version", [0, 1, 2])
def test_fuse_equals_kernel_mount(as_root, tmp_path, version):
    repo_path = tmp_path / "repo"
    with Repository.init(repo_path) as repo:
        image_id = repo.link_image(repo.ensure_object(write_image(edge_tree(repo, version), version)), "edge")
    kernel, fuse = tmp_path / "kernel", tmp_path / "fuse mount"  # mountinfo escapes the space
    kernel.mkdir()
    fuse.mkdir()
    pycfs_root(repo_path, "mount", "--fuse", "no", "edge", str(kernel))
    try:
        out = pycfs_root(repo_path, "mount", "--fuse", "yes", "edge", str(fuse)).stdout.decode()
        try:
            assert f"mounted image {image_id.hex()} at {fuse} (FUSE, server pid" in out
            assert fuse_type(fuse) == "fuse.pycfs"
            theirs, ours = walk(str(kernel)), walk(str(fuse))
        finally:
            pycfs_root(repo_path, "umount", str(fuse))
    finally:
        pycfs_root(repo_path, "umount", str(kernel))
    assert fuse_type(fuse) is None
    # overlayfs lists a directory it does not merge as the layer has it, whiteouts included,
    # though looking them up fails: FUSE hides them from the listing too
    ghosts = {rel for rel, e in theirs.items() if e is None}
    assert ghosts == ({b"/dev/whiteout".hex()} if version == 2 else set())
    theirs = {rel: e for rel, e in theirs.items() if e is not None}
    assert sorted(ours) == sorted(theirs)
    for rel, want in theirs.items():
        assert metadata(ours[rel]) == metadata(want), bytes.fromhex(rel)
    assert same_inodes(ours) == same_inodes(theirs)
    # the premise holds: the walk met what makes this image hard
    assert "sha256" in ours[b"/d/big".hex()] and "sha256" in ours[b"/d/mid".hex()]
    assert (b"/dev/whiteout".hex() in ours) == (version < 2)  # escaped in epoch 1, shown as stored
    assert "trusted.overlay.redirect" in ours[b"/overlay-xattrs/f".hex()]["xattrs"]
    assert ours[b"/d/1969".hex()]["mtime"] < 0 or version == 2  # format 2: one mtime, the build time


def test_what_the_kernel_refuses_fails_one_request_not_the_server(as_root, tmp_path):
    """A crafted symlink of 6000 bytes: the kernel refuses a READLINK reply that long (it
    ended the server, and the mount with it): readlink gives EIO, the rest is served."""
    repo_path = tmp_path / "repo"
    with Repository.init(repo_path) as repo:
        fs = FileSystem()
        fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        fs.root.entries[b"f"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), Inline(b"0123456789"))
        fs.root.entries[b"s"] = Leaf(Stat(0o777, 0, 0, 1_700_000_000, 0), Symlink(b"t" * 4000))
        image = imagebuild.patched_inode(write_image(fs, 1), b"/s", size=6000)
        repo.link_image(repo.ensure_object(image), "long")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = pycfs_root(repo_path, "mount", "--fuse", "yes", "long", str(mnt)).stdout.decode()
    pid = int(re.search(r"server pid (\d+)", out).group(1))
    try:
        for _ in range(2):
            with pytest.raises(OSError) as e:
                os.readlink(mnt / "s")
            assert e.value.errno == errno.EIO
        assert (mnt / "f").read_bytes() == b"0123456789"
        assert pid_alive(pid) and fuse_type(mnt) == "fuse.pycfs"
    finally:
        pycfs_root(repo_path, "umount", str(mnt))


def _one_file_image(repo_path, name: str) -> None:
    """A new repository at repo_path holding an image, named name, of one file f ("x")."""
    with Repository.init(repo_path) as repo:
        fs = FileSystem()
        fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        fs.root.entries[b"f"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), Inline(b"x"))
        repo.link_image(repo.ensure_object(write_image(fs, 1)), name)


def test_the_server_keeps_no_fd_of_the_caller(as_root, tmp_path):
    """`pycfs mount ... 9>&1 | cat`: the daemonised server kept every fd it inherited, so the
    reader of a pipe `pycfs mount` had open never saw its end."""
    repo_path = tmp_path / "repo"
    _one_file_image(repo_path, "fds")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r, w = os.pipe()
    try:
        p = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo_path), "mount", "--fuse", "yes",
                            "fds", str(mnt)], capture_output=True, timeout=120, pass_fds=[w], check=True)
        os.close(w)
        w = -1
        pid = int(re.search(r"server pid (\d+)", p.stdout.decode()).group(1))
        try:
            assert (mnt / "f").read_bytes() == b"x"
            ready, _, _ = select.select([r], [], [], 10)
            assert ready and os.read(r, 1) == b"", "the server holds the caller's pipe open"
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert f"pipe:[{os.fstat(r).st_ino}]" not in held
            assert str(repo_path / "objects") in held and "/dev/fuse" in held
        finally:
            pycfs_root(repo_path, "umount", str(mnt))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _digests(paths: list[Path], chunk: int) -> dict[str, str]:
    out = {}
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while block := f.read(chunk):
                h.update(block)
        out[path.name] = h.hexdigest()
    return out


def test_fuse_read_ahead_serves_what_the_kernel_mount_serves(as_root, tmp_path):
    """The server pushes file content into the kernel's page cache ahead of the reads (the
    rest of a big file, the next files of a directory read in order). Whatever the order, the
    read size and the readers at once, every byte is the kernel mount's."""
    repo_path = tmp_path / "repo"
    sizes = [0, 1, 4095, 4096, 4097, 65_536, 131_072, 131_073, 300_000, 1 << 20, (1 << 20) + 1] * 12
    with Repository.init(repo_path) as repo:
        fs = FileSystem()
        r = fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        d = r.entries[b"files"] = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        for i, size in enumerate(sizes):
            data = os.urandom(size)
            content = External(repo.ensure_object(data), size) if size else Inline(b"")
            d.entries[b"f%03d" % i] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), content)
        big = os.urandom(9 * MIB + 7)
        r.entries[b"big"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), External(repo.ensure_object(big), len(big)))
        repo.link_image(repo.ensure_object(write_image(fs, 1)), "ahead")
    kernel, fuse = tmp_path / "kernel", tmp_path / "fuse"
    kernel.mkdir()
    fuse.mkdir()
    pycfs_root(repo_path, "mount", "--fuse", "no", "ahead", str(kernel))
    try:
        pycfs_root(repo_path, "mount", "--fuse", "yes", "ahead", str(fuse))
        try:
            names = sorted(os.listdir(kernel / "files"))
            want = _digests([kernel / "files" / n for n in names], 1 << 20)
            assert _digests([fuse / "big"], 1 << 20)["big"] == hashlib.sha256(big).hexdigest()  # 1 MiB reads
            assert _digests([fuse / "files" / n for n in names], 128 * 1024) == want  # in order: pushed ahead
            assert _digests([fuse / "files" / n for n in names], 4096) == want  # again, from the page cache
        finally:
            pycfs_root(repo_path, "umount", str(fuse))
        # a fresh mount, two readers at once in opposite orders, one of them in small reads:
        # the stores of one wait on the other's pending reads, and nothing hangs
        pycfs_root(repo_path, "mount", "--fuse", "yes", "ahead", str(fuse))
        try:
            script = ("import hashlib, json, os, sys\n"
                      "out = {}\n"
                      "for n in sys.argv[3:]:\n"
                      "    with open(os.path.join(sys.argv[1], n), 'rb', buffering=0) as f:\n"
                      "        h = hashlib.sha256()\n"
                      "        while b := f.read(int(sys.argv[2])): h.update(b)\n"
                      "    out[n] = h.hexdigest()\n"
                      "json.dump(out, sys.stdout)\n")
            readers = [subprocess.Popen([sys.executable, "-c", script, str(fuse / "files"), str(chunk), *order],
                                        stdout=subprocess.PIPE)
                       for chunk, order in ((1 << 20, names), (4096, names[::-1]))]
            for p in readers:
                out, _ = p.communicate(timeout=120)
                assert p.returncode == 0 and json.loads(out) == want
        finally:
            pycfs_root(repo_path, "umount", str(fuse))
    finally:
        pycfs_root(repo_path, "umount", str(kernel))


RANDOM_READER = """
import hashlib, json, os, random, sys
rng, out = random.Random(int(sys.argv[2])), []
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
for _ in range(int(sys.argv[3])):
    off, n = rng.randrange(size + 10), rng.choice([1, 4095, 4096, 65_537, 300_000, (1 << 20) + 3, 3 << 20])
    out.append(hashlib.sha256(os.pread(fd, n, off)).hexdigest())
json.dump(out, sys.stdout)
"""


def _expected_random_reads(data: bytes, seed: int, count: int) -> list[str]:
    rng, out = random.Random(seed), []
    for _ in range(count):
        off, n = rng.randrange(len(data) + 10), rng.choice([1, 4095, 4096, 65_537, 300_000, (1 << 20) + 3, 3 << 20])
        out.append(hashlib.sha256(data[off:off + n]).hexdigest())
    return out


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_fuse_random_reads_while_read_ahead_runs_and_its_process_ends_with_the_server(as_root, tmp_path):
    """Reads larger than a READ (1 MiB), unaligned, at random offsets, by three processes at
    once, of a file whose pages the read-ahead is pushing (leaving tripwire pages out): every
    byte is the object's. The read-ahead is a child of the server, reaped when it unmounts,
    and killed with it."""
    repo_path = tmp_path / "repo"
    big = random.Random(7).randbytes(20 * MIB + 12_345)
    with Repository.init(repo_path) as repo:
        fs = FileSystem()
        fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        fs.root.entries[b"big"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000, 0), External(repo.ensure_object(big), len(big)))
        repo.link_image(repo.ensure_object(write_image(fs, 1)), "random")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for attempt in range(2):
        out = pycfs_root(repo_path, "mount", "--fuse", "yes", "random", str(mnt)).stdout.decode()
        pid = int(re.search(r"server pid (\d+)", out).group(1))
        try:
            with open(mnt / "big", "rb") as f:  # a sequential start: the read-ahead pushes the rest
                assert f.read(256 * 1024) == big[:256 * 1024]
            readers = [subprocess.Popen([sys.executable, "-c", RANDOM_READER, str(mnt / "big"), str(seed), "60"],
                                        stdout=subprocess.PIPE) for seed in (1, 2, 3)]
            for seed, p in zip((1, 2, 3), readers):
                result, _ = p.communicate(timeout=120)
                assert p.returncode == 0 and json.loads(result) == _expected_random_reads(big, seed, 60)
            assert hashlib.sha256((mnt / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
            children = _children(pid)
            assert len(children) == 1  # the read-ahead process
            if attempt == 0:
                pycfs_root(repo_path, "umount", str(mnt))
            else:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) or pid_alive(children[0]):
                assert time.monotonic() < deadline, "the server or its read-ahead outlived the mount"
                time.sleep(0.05)
        finally:
            if fuse_type(mnt) is not None:
                pycfs_root(repo_path, "umount", str(mnt))
        assert fuse_type(mnt) is None


def test_a_served_image_keeps_gc_waiting(as_root, tmp_path):
    """The server holds the repository's shared lock while it serves (it held none: the
    command's repository closed before the server forked, so gc removed what it served)."""
    import fcntl

    repo_path = tmp_path / "repo"
    _one_file_image(repo_path, "locked")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pycfs_root(repo_path, "mount", "--fuse", "yes", "locked", str(mnt))
    probe = os.open(repo_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            pycfs_root(repo_path, "umount", str(mnt))
        deadline = time.monotonic() + 10
        while True:  # (the server exits just after the unmount)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the server kept the lock after the unmount"
                time.sleep(0.05)
    finally:
        os.close(probe)


def test_server_ends_when_unmounted_while_another_namespace_keeps_a_copy(as_root, tmp_path):
    """A mount namespace made while the FUSE mount exists (a rootless podman's pause process,
    `unshare -m`) keeps a copy of it, and with it the kernel's connection: `pycfs umount`
    must still end the server rather than leave it waiting for requests."""
    repo_path = tmp_path / "repo"
    _one_file_image(repo_path, "ns")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = pycfs_root(repo_path, "mount", "--fuse", "yes", "ns", str(mnt)).stdout.decode()
    pid = int(re.search(r"server pid (\d+)", out).group(1))
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while not any(str(mnt) in line for line in Path(f"/proc/{holder.pid}/mountinfo").read_text().splitlines()):
            assert time.monotonic() < deadline, "unshare made no copy of the mount"
            time.sleep(0.05)
        assert (mnt / "f").read_bytes() == b"x"
        pycfs_root(repo_path, "umount", str(mnt))
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            assert time.monotonic() < deadline, "the server outlived its mount"
            time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait()
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def fuse_type(path: Path) -> str | None:
    """Filesystem type mounted at path, read from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].replace("\\040", " ") == str(path):
            return fields[fields.index("-") + 1]
    return None


# ---------------------------------------------------------------------------------------
# The unprivileged user's mount against podman's view


def fuse_test_image() -> ImageSpec:
    """The multi-layer image (whiteouts, opaque dir, hardlinks, xattrs, a fifo) with the
    restrictive image's layer on top (0000, 0600/0700 of container uid 1000, a 0000 dir)."""
    layers = imagebuild.multilayer_image().layers + imagebuild.restrictive_image(big_size=3 * MIB + 5).layers
    return ImageSpec(layers, config={"Labels": {"pycfs.test": "fuse"}})


def newest_mtime_ns() -> int:
    """No entry of the image is newer: a later directory mtime is containers-storage's."""
    return max(getattr(e, "mtime_ns", 0) for layer in fuse_test_image().layers for e in layer)


@pytest.fixture(scope="module")
def fuse_loaded(podman_user, session_dir) -> None:
    built = imagebuild.build_layout(fuse_test_image(), session_dir / "layout-fuse")
    imagebuild.load_into_storage(podman_user, built.path, REF)


@pytest.fixture(scope="module")
def podman_view(podman_user, fuse_loaded) -> dict:
    """The image's rootfs as podman mounts it, walked as root of the user's namespace."""
    script = 'mnt=$(podman image mount "$2") || exit 1; "$0" -c "$1" "$mnt"; rc=$?; podman image unmount "$2" >/dev/null; exit $rc'
    out = podman_user.unshare("sh", "-c", script, podman_user.python, WALK_SCRIPT, REF).stdout
    return json.loads(out)


@pytest.fixture
def pulled(podman_user, fuse_loaded) -> Path:
    """A fresh repository of the user's with the image pulled (tag `fuse`)."""
    repo = podman_user.tmpdir("fuse-repo-") / "repo"
    podman_user.pycfs("--repo", repo, "init")
    podman_user.pycfs("--repo", repo, "oci", "pull", f"containers-storage:{REF}", "fuse")
    return repo


class UserMount:
    """A FUSE mount made by the user; always removed, whatever the test did to its server."""

    def __init__(self, user, repo: Path, *unshare: str) -> None:
        self.user, self.repo, self.unshare = user, repo, list(unshare)
        self.mnt = user.tmpdir("fuse-mnt-")
        self.pid: int | None = None

    def pycfs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.unshare, self.user.python, "-m", "pycfs.tools.cli", "--repo", self.repo, *args]
        return self.user.run(cmd, check=check)

    def mount(self, *extra: str) -> str:
        out = self.pycfs("oci", "mount", *extra, "fuse", str(self.mnt)).stdout.decode()
        self.pid = int(re.search(r"server pid (\d+)", out).group(1))
        return out

    def __enter__(self) -> UserMount:
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None and self.pycfs("umount", str(self.mnt), check=False).returncode != 0:
            self.pycfs("umount", str(self.mnt), check=False)
        if self.pid is not None:
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def user_may(e: dict, bit: int, uid: int, gids: set[int]) -> bool:
    """The kernel's mode check (no ACLs in these images) for a user who is not root."""
    mode = e["mode"]
    if e["uid"] == uid:
        return bool(mode >> 6 & bit)
    if e["gid"] in gids:
        return bool(mode >> 3 & bit)
    return bool(mode & bit)


def comparable(e: dict, newest_ns: int) -> dict:
    e = metadata(e)
    e.pop("xattrs")  # the user sees no trusted.*, podman's namespace root sees overlay's own
    e.pop("errno", None)  # content and readability are checked against the mode below
    e.pop("sha256", None)
    if stat.S_ISDIR(e["mode"]):
        # podman's overlayfs reports its merged directories with size 4096 and one link
        e.pop("size")
        e.pop("nlink")
        if e["mtime"] > newest_ns:
            # containers-storage made this directory at extraction time (a layer changed
            # inside it without a tar entry for it); the image keeps the tar's stat
            e.pop("mtime")
    return e


def check_against_podman(ours: dict, theirs: dict, visible: set[str], may_read) -> None:
    newest_ns = newest_mtime_ns()
    assert sorted(ours) == sorted(visible)
    for rel in visible - {""}:  # composefs derives the root's metadata from /usr (spec 3.7)
        want, got = theirs[rel], ours[rel]
        want_cmp, got_cmp = comparable(want, newest_ns), comparable(got, newest_ns)
        if "mtime" not in want_cmp:
            got_cmp.pop("mtime")
        assert got_cmp == want_cmp, bytes.fromhex(rel)
        if stat.S_ISREG(want["mode"]):
            if may_read(want):
                assert got.get("sha256") == want["sha256"], bytes.fromhex(rel)
            else:
                assert got.get("errno") == errno.EACCES, bytes.fromhex(rel)
        # OCI images keep only some xattrs (spec: transform_for_oci drops user.*)
        cap = "security.capability"
        assert got["xattrs"].get(cap) == want["xattrs"].get(cap), bytes.fromhex(rel)
    assert same_inodes({r: ours[r] for r in visible}) == same_inodes({r: theirs[r] for r in visible})


def visible_to(theirs: dict, root: dict, uid: int, gids: set[int]) -> set[str]:
    """Paths a walk can reach: every directory above must be listable (r) and searchable (x)."""
    entries = dict(theirs)
    entries[""] = root
    out = set()
    for rel in entries:
        parts = bytes.fromhex(rel).split(b"/")
        ancestors = [b"/".join(parts[:i]).hex() for i in range(1, len(parts))]
        if all(user_may(entries[a], 4, uid, gids) and user_may(entries[a], 1, uid, gids) for a in ancestors):
            out.add(rel)
    return out


def test_rootless_fuse_mount_equals_podman(podman_user, fuse_loaded, pulled, podman_view):
    user = podman_user
    gids = set(os.getgrouplist(user.name, user.gid))
    with UserMount(user, pulled) as m:
        out = m.mount()  # --fuse auto, as a user
        assert "(FUSE, server pid" in out
        ours = json.loads(user.run([user.python, "-c", WALK_SCRIPT, m.mnt]).stdout)
        assert fuse_type(m.mnt) == "fuse.pycfs"
        m.pycfs("umount", str(m.mnt))
        assert fuse_type(m.mnt) is None
    visible = visible_to(podman_view, ours[""], user.uid, gids)
    check_against_podman(ours, podman_view, visible, lambda e: user_may(e, 4, user.uid, gids))
    # the premise: the restrictive parts really are there, hidden or unreadable for the user
    hidden = set(podman_view) - visible
    assert b"/home/user/secret.txt".hex() in hidden and b"/srv/locked/readonly.bin".hex() in hidden
    assert ours[b"/etc/shadow".hex()]["errno"] == errno.EACCES
    assert ours[b"/root".hex()]["errno"] == errno.EACCES
    assert "sha256" in ours[b"/usr/bin/tool".hex()] and ours[b"/usr/bin/tool".hex()]["nlink"] == 2
    assert b"/etc/removed-later".hex() not in ours


def test_fuse_mount_inside_user_namespace(podman_user, fuse_loaded, pulled, podman_view):
    """Root of the user's podman namespace: no kernel EROFS there, so auto means FUSE, and that
    root may read everything, so every entry and every file's content must match."""
    user = podman_user
    with UserMount(user, pulled, "podman", "unshare") as m:
        m.mount()
        ours = json.loads(user.unshare(user.python, "-c", WALK_SCRIPT, m.mnt).stdout)
    check_against_podman(ours, podman_view, set(podman_view), lambda e: True)
    secret = ours[b"/root/big-secret.bin".hex()]
    assert secret["size"] == 3 * MIB + 5 and secret["sha256"] == podman_view[b"/root/big-secret.bin".hex()]["sha256"]


# ---------------------------------------------------------------------------------------
# Damage


def object_of(repo: Path, image_path: bytes) -> Path:
    """As root: the object file behind a path of the pulled image's composefs image."""
    with Repository.open(repo, writable=False) as r:
        fs = read_image(r.read_object(resolve_image(r, "fuse"))).fs
        leaf = fs.root.lookup(image_path)
        assert isinstance(leaf.content, External), image_path
        return r.object_path(leaf.content.id)


def test_broken_objects_give_eio_for_those_files_only(podman_user, pulled):
    user = podman_user
    object_of(pulled, b"/usr/lib/libbig.so").unlink()
    with open(object_of(pulled, b"/data/xattrs"), "r+b") as f:
        f.truncate(10)
    argv = [user.python, "-m", "pycfs.tools.cli", "--repo", pulled, "mount", "--foreground", "fuse"]
    mnt = user.tmpdir("fuse-mnt-")
    proc = subprocess.Popen(list(map(str, [*argv, mnt])), cwd=user.home, env=user.environ(), user=user.uid,
                            group=user.gid, extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline().decode()
        assert "(FUSE; serving until unmounted)" in first, (first, proc.stderr.read() if proc.poll() else "")
        for path in ("usr/lib/libbig.so", "data/xattrs", "usr/lib/libbig.so"):
            p = user.run(["cat", mnt / path], check=False)
            assert p.returncode != 0 and b"Input/output error" in p.stderr, path
        tool_bytes = user.run(["cat", mnt / "usr/bin/tool"]).stdout  # the rest is served
        assert hashlib.sha256(tool_bytes).digest() == hashlib.sha256(imagebuild_file("usr/bin/tool")).digest()
        assert user.run(["stat", "-c", "%s", mnt / "usr/lib/libbig.so"]).stdout.strip() == str(1 * MIB + 1).encode()
        user.pycfs("umount", mnt)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            user.pycfs("umount", mnt, check=False)
    assert proc.returncode == 0
    lines = err.decode().splitlines()
    assert len(lines) == 2, lines  # one line per broken file, however often it is opened
    assert lines[0].startswith("pycfs mount: /usr/lib/libbig.so: object ") and "is missing" in lines[0]
    assert lines[1].startswith("pycfs mount: /data/xattrs: object ") and "has 10 bytes, the image says 116" in lines[1]


def imagebuild_file(path: str) -> bytes:
    """The content the image builder gave a file of fuse_test_image (its last layer's copy)."""
    return imagebuild.flatten(fuse_test_image())[b"/" + path.encode()].content()


def test_mount_failures_are_one_line(podman_user, pulled, shared_tmp_path):
    user = podman_user
    # a mount point the user may not write to: fusermount3 refuses, after the fork
    p = user.pycfs("--repo", pulled, "oci", "mount", "fuse", shared_tmp_path, check=False)
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == (f"pycfs: error: FUSE mount at {shared_tmp_path} failed: fusermount3: user has no write "
                        f"access to mountpoint {shared_tmp_path}"), lines
    assert fuse_type(shared_tmp_path) is None
    # the bytes of the image no longer hash to its name
    with Repository.open(pulled, writable=False) as r:
        image = r.object_path(resolve_image(r, "fuse"))
    data = bytearray(image.read_bytes())
    data[2000] ^= 0x55  # in the inode table; any byte would do
    os.chmod(image, 0o644)
    image.write_bytes(bytes(data))
    mnt = user.tmpdir("fuse-mnt-")
    p = user.pycfs("--repo", pulled, "mount", "fuse", mnt, check=False)
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 1 and len(lines) == 1, lines
    assert re.fullmatch(r"pycfs: error: image [0-9a-f]{64} is corrupt: its fs-verity digest differs from its name "
                        r"\(run `pycfs fsck`\)", lines[0]), lines
    assert fuse_type(mnt) is None


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    return (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little", signed=ident < 0)
        for tag, perm, ident in entries)


def test_posix_acls_in_the_image_are_enforced_for_the_user(podman_user, shared_tmp_path):
    """An image with ACLs has the kernel ask for them (an image without any does not: each
    permission check would be a request); either way the user gets what the ACLs say."""
    user = podman_user
    repo_path = shared_tmp_path / "repo"
    with Repository.init(repo_path) as repo:
        fs = FileSystem()
        r = fs.root = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        granted = _acl((0x01, 6, -1), (0x02, 4, user.uid), (0x04, 0, -1), (0x10, 4, -1), (0x20, 0, -1))
        r.entries[b"granted"] = Leaf(Stat(0o640, 0, 0, 1_700_000_000, 0, {b"system.posix_acl_access": granted}),
                                     External(repo.ensure_object(b"for you\n"), 8))
        r.entries[b"denied"] = Leaf(Stat(0o640, 0, 0, 1_700_000_000, 0), External(repo.ensure_object(b"not\n"), 4))
        repo.link_image(repo.ensure_object(write_image(fs, 1)), "acl")
    for path in [repo_path, *repo_path.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    mnt = user.tmpdir("fuse-acl-")
    user.pycfs("--repo", repo_path, "mount", "--fuse", "yes", "acl", mnt)
    try:
        assert user.run(["cat", mnt / "granted"]).stdout == b"for you\n"  # 0640 root:root, yet the ACL says r
        p = user.run(["cat", mnt / "denied"], check=False)
        assert p.returncode != 0 and b"Permission denied" in p.stderr
    finally:
        user.pycfs("umount", mnt)


def test_killed_server_leaves_a_mount_point_umount_cleans(podman_user, pulled):
    user = podman_user
    with UserMount(user, pulled) as m:
        m.mount()
        assert user.run(["cat", m.mnt / "etc/hostname"]).stdout == b"pycfs-test-layer2\n"
        os.kill(m.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        p = user.run(["ls", m.mnt], check=False)
        assert p.returncode != 0 and b"Transport endpoint is not connected" in p.stderr
        assert fuse_type(m.mnt) == "fuse.pycfs"
        m.pycfs("umount", str(m.mnt))
        assert fuse_type(m.mnt) is None
        assert user.run(["ls", "-A", m.mnt]).stdout == b""  # an ordinary empty directory again
        # and it can be mounted again
        m.mount()
        assert user.run(["cat", m.mnt / "etc/hostname"]).stdout == b"pycfs-test-layer2\n"
