"""Ready-made test images. The builder is pycfs.tools.dev.ocibuild; its names are re-exported
here so tests can say `imagebuild.File`, `imagebuild.build_layout`, ..."""

from __future__ import annotations

from pycfs.host.erofs import format as F
from pycfs.host.erofs.reader import ImageReader
from pycfs.tools.dev.ocibuild import (
    MIB,
    BuiltImage,
    Device,
    Dir,
    Entry,
    File,
    Hardlink,
    ImageSpec,
    Opaque,
    Symlink,
    Whiteout,
    build_layout,
    flatten,
    load_into_storage,
    with_changes,
)

__all__ = [
    "CAP_NET_BIND_SERVICE_V2",
    "MIB",
    "BuiltImage",
    "Device",
    "Dir",
    "Entry",
    "File",
    "Hardlink",
    "ImageSpec",
    "Opaque",
    "Symlink",
    "Whiteout",
    "build_layout",
    "flatten",
    "load_into_storage",
    "multilayer_image",
    "patched_inode",
    "restrictive_image",
    "with_changes",
]

# ---------------------------------------------------------------------------------------
# Ready-made images


# v2 security.capability: cap_net_bind_service (bit 10) permitted, effective flag set.
CAP_NET_BIND_SERVICE_V2 = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


def multilayer_image(*, capability: bool = True) -> ImageSpec:
    """Three layers exercising what a layer importer must get right: whiteouts, an opaque
    directory, hardlinks, symlinks, user.* (and security.capability) xattrs, large random
    and tiny files around the 64-byte inline threshold, non-UTF-8 names, ns mtimes, a fifo."""
    base: list[Entry] = [
        Dir("etc"), Dir("usr"), Dir("usr/bin"), Dir("usr/lib"), Dir("var"), Dir("var/cache"),
        Dir("opt"), Dir("opt/app"), Dir("data"),
        File("etc/hostname", data=b"pycfs-test\n"),
        File("etc/os-release", data=b'ID=pycfs\nPRETTY_NAME="pycfs test image"\n'),
        File("etc/removed-later", data=b"this file is whited out by layer 2\n"),
        File("usr/bin/tool", size=3 * MIB + 17, seed=1, mode=0o755),
        File("usr/lib/libbig.so", size=5 * MIB, seed=2, mode=0o644),
        File("data/small64", data=b"s" * 64),
        File("data/small65", data=b"t" * 65),
        File("data/empty", data=b""),
        File("data/xattrs", data=b"file with user xattrs, longer than sixty-four bytes......\n" * 2,
             xattrs={"user.pycfs.test": b"value-1", "user.pycfs.binary": b"\x00\xff\x01"}),
        Hardlink("data/small65-link", "data/small65"),
        Hardlink("usr/bin/tool-hardlink", "usr/bin/tool"),
        Symlink("usr/bin/tool-symlink", "tool"),
        Symlink("etc/absolute-link", "/usr/lib/libbig.so"),
        Symlink("data/dangling", "does/not/exist"),
        File("var/cache/a", data=b"cache a\n"), File("var/cache/b", size=4096, seed=3),
        Dir("var/cache/sub"), File("var/cache/sub/c", data=b"cache c\n"),
        File(b"data/latin1-caf\xe9", data=b"non-UTF-8 file name\n"),
        Dir(b"data/dir-\xff\xfe"), File(b"data/dir-\xff\xfe/inside", data=b"inside a non-UTF-8 dir\n"),
        File("data/ns-mtime", data=b"mtime with nanoseconds\n", mtime_ns=1_600_000_000_000_000_001),
        Device("data/fifo", kind="fifo", mode=0o644),
        File("opt/app/setuid", size=100, seed=4, mode=0o4755),
    ]
    if capability:
        base.append(File("usr/bin/ping-like", size=200, seed=5, mode=0o755,
                         xattrs={"security.capability": CAP_NET_BIND_SERVICE_V2}))
    middle: list[Entry] = [
        Whiteout("etc/removed-later"),
        Opaque("var/cache"),
        File("var/cache/new", data=b"only file left in the opaque directory\n"),
        File("etc/hostname", data=b"pycfs-test-layer2\n"),  # replaces the lower copy
        File("opt/app/data.bin", size=2 * MIB + 3, seed=6, mtime_ns=1_700_000_001_999_999_999),
        Hardlink("opt/app/data-link.bin", "opt/app/data.bin"),
        Symlink("opt/app/current", "data.bin"),
    ]
    top: list[Entry] = [
        Whiteout("data/dangling"),
        Whiteout("usr/bin/tool-symlink"),
        Dir("srv", mode=0o750, uid=1000, gid=1000),
        File("srv/owned", data=b"owned by uid 1000, gid 1001, more than sixty-four bytes of content.\n",
             uid=1000, gid=1001, mode=0o640),
        File("usr/lib/libbig.so", size=1 * MIB + 1, seed=7),  # a changed big file
        File("data/small64", data=b"S" * 64),
    ]
    return ImageSpec([base, middle, top], config={"Cmd": ["/usr/bin/tool"], "Labels": {"pycfs.test": "multilayer"}})


def restrictive_image(*, big_size: int = 100 * MIB + 4097) -> ImageSpec:
    """Files the unprivileged host cannot open directly: the helper must hand them over.
    `big_size` is the size of the restrictive big file (default just over 100 MiB)."""
    layer: list[Entry] = [
        Dir("etc"), Dir("home"), Dir("root", mode=0o700), Dir("srv"),
        File("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        File("etc/shadow", data=b"root:*:19000:0:99999:7:::\nuser:$6$notreal$hash:19000:0:99999:7:::\n",
             mode=0o000),
        Dir("home/user", mode=0o700, uid=1000, gid=1000),
        File("home/user/secret.txt", data=b"only uid 1000 may read this; it is longer than 64 bytes.\n",
             mode=0o600, uid=1000, gid=1000),
        File("home/user/tiny", data=b"tiny secret\n", mode=0o600, uid=1000, gid=1000),
        Dir("srv/locked", mode=0o000),
        File("srv/locked/readonly.bin", size=8192, seed=11, mode=0o400),
        Hardlink("srv/shadow-hardlink", "etc/shadow"),
        # owned by container uid 1000: container root is the user itself and could read it
        File("root/big-secret.bin", size=big_size, seed=12, mode=0o600, uid=1000, gid=1000),
        File("srv/public.txt", data=b"world-readable file beside the locked ones, more than 64 bytes.\n"),
    ]
    return ImageSpec([layer], config={"Labels": {"pycfs.test": "restrictive"}})


def patched_inode(image: bytes, path: bytes, **fields: int) -> bytes:
    """An EROFS image with fields of the inode at path rewritten (a crafted image: a
    symlink's size beyond what Linux allows, say)."""
    reader = ImageReader(image)
    nid = reader.sb.root_nid
    for part in path.strip(b"/").split(b"/"):
        nid = {name: child for name, child, _ in reader.dirents(reader.inode(nid))}[part]
    data = bytearray(image)
    fmt = int.from_bytes(data[nid * 32:nid * 32 + 2], "little")
    cls = F.ExtendedInode if F.inode_is_extended(fmt) else F.CompactInode
    inode = cls.unpack_from(data, nid * 32)
    for name, value in fields.items():
        setattr(inode, name, value)
    inode.pack_into(data, nid * 32)
    return bytes(data)
