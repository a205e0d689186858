"""Hypothesis strategy for composefs dumpfiles: every file type, whiteouts, hardlinks, long
names and symlinks, multi-block directories, external files up to 2^53 bytes, extended
inodes, xattrs (shared ones too), escapes in every field."""

from __future__ import annotations

from hypothesis import strategies as st
from pycfs.host.dumpfile import escape

HEX = "0123456789abcdef"

names = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.text("abcdefgh", min_size=1, max_size=3).map(str.encode),  # collisions -> shared dirs
    st.integers(200, 255).map(lambda n: b"n" * n),
).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))

# keys composefs itself sets or hides on read are left out: they do not round-trip by design
xattr_keys = st.one_of(
    st.sampled_from([b"user.a", b"user.b", b"trusted.t", b"security.selinux", b"security.ima",
                     b"system.posix_acl_access", b"trusted.overlay.mine", b"user.overlay.x", b"odd.k"]),
    st.binary(min_size=1, max_size=20).map(lambda b: b"user." + b),
).filter(lambda k: b"\0" not in k)
xattrs = st.dictionaries(xattr_keys, st.one_of(st.just(b""), st.binary(max_size=40),
                                              st.sampled_from([b"shared-1", b"shared-2"])), max_size=4)
stats = st.tuples(
    st.integers(0, 0o7777),  # permission bits
    st.sampled_from([0, 1, 1000, 65535, 65536, 2**32 - 2]),  # uid (65536 on: extended inode; -1 the kernel shows as 65534)
    st.sampled_from([0, 5, 100000]),  # gid
    st.one_of(st.just((1700000000, 0)), st.tuples(st.integers(-(2**40), 2**40), st.integers(0, 999_999_999))),
    xattrs,
)
digests = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def leaf_fields(draw) -> tuple[int, bytes, int, bytes, bytes, bytes]:
    """(type bits, SIZE, RDEV, PAYLOAD, CONTENT, DIGEST) of a non-directory."""
    kind = draw(st.sampled_from(["inline", "external", "noverity", "sparse", "symlink", "chr",
                                 "whiteout", "blk", "fifo", "sock"]))
    if kind == "inline":
        data = draw(st.one_of(st.binary(max_size=100), st.integers(0, 5000).map(lambda n: b"q" * n)))
        return 0o100000, b"%d" % len(data), 0, b"-", escape(data, lone_dash=True) if data else b"-", b"-"
    if kind in ("external", "noverity", "sparse"):
        size = draw(st.one_of(st.integers(1, 2**20), st.sampled_from([2**32, 2**40 + 1, 2**53])))
        if kind == "external":
            d = draw(digests)
            payload = draw(st.sampled_from([f"{d[:2]}/{d[2:]}".encode(), b"other/path", b""]))
            return 0o100000, b"%d" % size, 0, escape(payload) if payload else b"", b"-", d.encode()
        if kind == "noverity":
            return 0o100000, b"%d" % size, 0, escape(draw(st.binary(min_size=1, max_size=30).filter(
                lambda b: b"\0" not in b)), lone_dash=True), b"-", b"-"
        return 0o100000, b"%d" % size, 0, b"-", b"-", b"-"
    if kind == "symlink":
        target = draw(st.one_of(st.binary(min_size=1, max_size=60), st.integers(1, 4095).map(lambda n: b"t" * n))
                      .filter(lambda b: b"\0" not in b))
        return 0o120000, b"%d" % len(target), 0, escape(target, lone_dash=True), b"-", b"-"
    if kind in ("chr", "blk"):
        rdev = draw(st.sampled_from([259, 1, 2**32 - 1, 0x800001]))
        return (0o20000 if kind == "chr" else 0o60000), b"0", rdev, b"-", b"-", b"-"
    if kind == "whiteout":
        return 0o20000, b"0", 0, b"-", b"-", b"-"
    return (0o10000 if kind == "fifo" else 0o140000), b"0", 0, b"-", b"-", b"-"


def _line(path: bytes, size: bytes, mode: int, nlink: int, stat, rdev: int, payload: bytes,
          content: bytes, digest: bytes) -> bytes:
    perm, uid, gid, (sec, nsec), xs = stat
    fields = [escape(path, lone_dash=True), size, b"%o" % (mode | perm), b"%d" % nlink, b"%d" % uid,
              b"%d" % gid, b"%d" % rdev, b"%d.%d" % (sec, nsec), payload, content, digest]
    fields += [escape(k, equal=True) + b"=" + escape(v, equal=True) for k, v in xs.items()]
    return b" ".join(fields) + b"\n"


@st.composite
def dumpfiles(draw, max_entries: int = 40) -> bytes:
    """Dumpfile text: parents before children, each hardlink line after its target."""
    lines = [_line(b"/", b"0", 0o40000, 2, draw(stats), 0, b"-", b"-", b"-")]
    dirs = [b"/"]
    leaves: list[bytes] = []
    taken: set[bytes] = {b"/"}
    n = draw(st.integers(0, max_entries))
    for _ in range(n):
        parent = draw(st.sampled_from(dirs))
        path = (parent if parent != b"/" else b"") + b"/" + draw(names)
        if path in taken:
            continue
        taken.add(path)
        what = draw(st.sampled_from(["dir", "leaf", "leaf", "leaf", "link"] if leaves else ["dir", "leaf"]))
        if what == "dir":
            dirs.append(path)
            lines.append(_line(path, b"0", 0o40000, 2, draw(stats), 0, b"-", b"-", b"-"))
        elif what == "leaf":
            mode, size, rdev, payload, content, digest = draw(leaf_fields())
            leaves.append(path)
            lines.append(_line(path, size, mode, draw(st.integers(1, 3)), draw(stats), rdev, payload, content, digest))
        else:
            target = draw(st.sampled_from(leaves))
            lines.append(b"%s 0 @100644 1 0 0 0 0.0 %s - -\n" % (escape(path, lone_dash=True), escape(target)))
    if draw(st.booleans()):  # a directory with enough entries for several dirent blocks
        lines.append(_line(b"/big", b"0", 0o40000, 2, draw(stats), 0, b"-", b"-", b"-"))
        count = draw(st.integers(100, 250))
        lines += [b"/big/entry-%06d 0 100644 1 0 0 0 1700000000.0 - - -\n" % i for i in range(count)]
    return b"".join(lines)
