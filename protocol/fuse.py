"""The FUSE kernel protocol (linux/fuse.h, 7.x), the part a read-only server speaks: request
and reply headers and the structs of the requests it answers, as struct layouts with the
header's field names, each with a reader and a writer.

A request is one read(2) of /dev/fuse: `fuse_in_header` then the opcode's argument. A reply
is one write(2): `fuse_out_header` (error is a negative errno, or 0 and a payload follows).
A notification is a write with unique 0 and the notification code in `error`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, TypeVar

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38  # what this module knows; the kernel takes the lower of its own and this
ROOT_ID = 1

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, READLINK = 1, 2, 3, 5
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR = 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 36, 38, 42, 44
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})  # the kernel waits for no answer to these

# fuse_init_in/out flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24

NOTIFY_STORE = 4  # fuse_notify_code


_S = TypeVar("_S", bound="_Struct")


class _Struct:
    """A fixed layout: `unpack_from(buf, off)` reads one, `pack()` writes it."""

    FORMAT: ClassVar[struct.Struct]

    @classmethod
    def unpack_from(cls: type[_S], buf: bytes | bytearray | memoryview, offset: int = 0) -> _S:
        return cls(*cls.FORMAT.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return self.FORMAT.pack(*vars(self).values())  # the fields, in order


@dataclass
class InHeader(_Struct):
    FORMAT = struct.Struct("<IIQQIIIHH")
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int = 0
    padding: int = 0


@dataclass
class OutHeader(_Struct):
    FORMAT = struct.Struct("<IiQ")
    len: int
    error: int
    unique: int


@dataclass
class InitIn(_Struct):
    """The first four fields; `flags2` follows when flags has INIT_EXT (unused here)."""

    FORMAT = struct.Struct("<IIII")
    major: int
    minor: int
    max_readahead: int
    flags: int


@dataclass
class InitOut(_Struct):
    FORMAT = struct.Struct("<IIIIHHIIHHI28x")
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int = 0
    flags2: int = 0


@dataclass
class Attr(_Struct):
    """fuse_attr: the times are signed (the kernel reads them as time64_t: before 1970 is negative)."""

    FORMAT = struct.Struct("<QQQqqqIIIIIIIIII")
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0


@dataclass
class EntryOut(_Struct):
    """fuse_entry_out without its trailing fuse_attr (written after it, as `Attr`)."""

    FORMAT = struct.Struct("<QQQQII")
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int = 0
    attr_valid_nsec: int = 0


@dataclass
class AttrOut(_Struct):
    """fuse_attr_out without its trailing fuse_attr."""

    FORMAT = struct.Struct("<QII")
    attr_valid: int
    attr_valid_nsec: int = 0
    dummy: int = 0


@dataclass
class ReadIn(_Struct):
    """fuse_read_in: also the argument of READDIR and READDIRPLUS."""

    FORMAT = struct.Struct("<QQIIQII")
    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    padding: int = 0


@dataclass
class GetxattrIn(_Struct):
    """fuse_getxattr_in: also LISTXATTR's; GETXATTR's NUL-terminated name follows."""

    FORMAT = struct.Struct("<II")
    size: int
    padding: int = 0


@dataclass
class GetxattrOut(_Struct):
    FORMAT = struct.Struct("<II")
    size: int
    padding: int = 0


@dataclass
class Kstatfs(_Struct):
    FORMAT = struct.Struct("<QQQQQIII4x24x")
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass
class Dirent(_Struct):
    """fuse_dirent's fixed part: the name follows, the record is padded to 8 bytes; in a
    READDIRPLUS reply each one comes after an `EntryOut` + `Attr` (fuse_direntplus)."""

    FORMAT = struct.Struct("<QQII")
    ino: int
    off: int
    namelen: int
    type: int


@dataclass
class NotifyStoreOut(_Struct):
    FORMAT = struct.Struct("<QQII")
    nodeid: int
    offset: int
    size: int
    padding: int = 0


def dirent_record(fixed: bytes, name: bytes) -> bytes:
    """A directory record: its fixed part, the name, zeros up to the 8-byte boundary."""
    return fixed + name + bytes(-(len(fixed) + len(name)) % 8)


def reply_header(unique: int, error: int, payload_len: int) -> bytes:
    return OutHeader.FORMAT.pack(OutHeader.FORMAT.size + payload_len, error, unique)
