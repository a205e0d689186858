"""composefs-dump(5) text: parser and writer, compatible with the C tools (spec 4, C spec 3).

`parse(data)` builds a `FileSystem` the way C `mkcomposefs --from-file` does, including its
quirks (verbatim NLINK of leaves, size-0 files dropping payload/digest, digests ignored on
inline files, `@` hardlink lines resolved after the whole file so forward references and
chains work). Errors are `DumpfileError` with the 1-based line number and the C tool's reason
text. `write(fs)` prints a tree like `composefs-info dump` (hardlinks in the C form, with the
target's fields) or, with `hardlinks="rust"`, in the composefs-rs placeholder form.
"""

from __future__ import annotations

import functools
import io
import re
import stat as _stat
from typing import BinaryIO, NoReturn
from collections.abc import Iterable

from pycfs.host.errors import PycfsError
from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Inode,
    Leaf,
    LeafContent,
    Socket,
    Sparse,
    Stat,
    Symlink,
    gc_paused,
    object_path,
)

INLINE_CONTENT_MAX = 5000  # LCFS_INLINE_CONTENT_MAX
SYMLINK_MAX = 4095  # PATH_MAX - 1
NAME_MAX = 255
XATTR_BUDGET = 32767  # LCFS_INODE_EXTERNAL_XATTR_MAX, of xattr_budget()


class DumpfileError(PycfsError):
    """Invalid dumpfile input; `reason` is the C tool's message, `line` 1-based (0 = whole file),
    `entry` the line's PATH field as written, when there is one (C's reasons seldom say)."""

    def __init__(self, line: int, reason: str, entry: bytes = b"") -> None:
        self.line = line
        self.reason = reason
        where = f"dumpfile line {line}" if line else "dumpfile"
        if entry:
            where += f" ({_show(entry[:200])})"
        super().__init__(f"{where}: {reason}")


# ---------------------------------------------------------------------------- escaping

_ESC_TABLE: dict[int, bytes] = {}
for _b in range(256):
    if _b == 0x5C:
        _ESC_TABLE[_b] = b"\\\\"
    elif _b == 0x0A:
        _ESC_TABLE[_b] = b"\\n"
    elif _b == 0x0D:
        _ESC_TABLE[_b] = b"\\r"
    elif _b == 0x09:
        _ESC_TABLE[_b] = b"\\t"
    else:
        _ESC_TABLE[_b] = b"\\x%02x" % _b
# isgraph() in the C locale is 0x21..0x7e; backslash is the escape character itself
_NEEDS_ESC = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_NEEDS_ESC_EQ = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")
_NEEDS_ESC_KEEP_SPACE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")


def _esc_match(m: re.Match) -> bytes:
    return _ESC_TABLE[m.group()[0]]


def escape(data: bytes, *, equal: bool = False, lone_dash: bool = False, keep_space: bool = False) -> bytes:
    """Escape one field. `lone_dash`: empty -> `-`, a literal `-` -> `\\x2d` (paths, payloads,
    content). `equal`: also escape `=` (xattr keys and values). `keep_space`: leave spaces
    literal (composefs-info ls paths)."""
    if lone_dash:
        if not data:
            return b"-"
        if data == b"-":
            return b"\\x2d"
    rx = _NEEDS_ESC_EQ if equal else _NEEDS_ESC_KEEP_SPACE if keep_space else _NEEDS_ESC
    return rx.sub(_esc_match, data)


_UNESC = re.compile(rb"\\(x(.?.?)|.|$)", re.S)
_SIMPLE_UNESC = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_HEX = re.compile(rb"[0-9a-fA-F]{2}")


def unescape(field: bytes) -> bytes:
    """Undo `escape` (accepts `\\\\ \\n \\r \\t \\xHH`, hex in any case). Raises ValueError."""
    if b"\\" not in field:
        return field

    def repl(m: re.Match) -> bytes:
        esc = m.group(1)
        if esc.startswith(b"x"):
            hx = m.group(2)
            if len(hx) < 2:
                raise ValueError("No hex characters after hex escape")
            if not _HEX.fullmatch(hx):
                raise ValueError("Invalid hex characters after hex escape")
            return bytes((int(hx, 16),))
        if not esc:
            raise ValueError("No character after escape")
        try:
            return _SIMPLE_UNESC[esc]
        except KeyError:
            raise ValueError(f"Unsupported escape type {esc.decode('latin-1')}") from None

    return _UNESC.sub(repl, field)


def _unescape_optional(field: bytes) -> bytes | None:
    """PAYLOAD/CONTENT: a bare `-` means absent."""
    if field == b"-":
        return None
    return unescape(field)


# ---------------------------------------------------------------------------- parser

_VALID_TYPES = {
    _stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK, _stat.S_IFCHR, _stat.S_IFBLK,
    _stat.S_IFIFO, _stat.S_IFSOCK,
}
# strtoull: leading white space, an optional sign, digits, nothing after them
_INT_RE = re.compile(rb"[ \t\n\v\f\r]*[+-]?[0-9]+")
_OCT_RE = re.compile(rb"[ \t\n\v\f\r]*[+-]?[0-7]+")
_U64 = 1 << 64
PAYLOAD_MAX = 4095  # C: "Invalid payload" from 4096 bytes on
XATTR_NAME_MAX = 255
XATTR_TEXT_MAX = 65535  # the xattr part of a line
EXTERNAL_SIZE_MAX = 1024 << 43  # 1024 chunk indexes of the largest chunk (2^43 bytes)
XATTR_DICTS_SHARED = 4096  # distinct xattr texts whose dicts one parse shares
# The longest line a valid entry needs is about 130 KB: a deep path of a few KB, the
# 4095-byte payload and 5000 bytes of content, each up to 4x escaped (`\xHH`), the 64 KB of
# xattr text and the numbers. 1 MiB leaves room for absurdly deep paths.
LINE_MAX = 1 << 20


def _show_field(field: bytes) -> str:
    return field.decode("utf-8", "backslashreplace")


def _parse_int(field: bytes, *, octal: bool = False) -> int:
    """strtoull semantics, except that a value beyond 64 bits is an error (C saturates it)."""
    if not (_OCT_RE if octal else _INT_RE).fullmatch(field):
        raise ValueError(f"Invalid integer {_show_field(field)}".rstrip())
    v = int(field, 8 if octal else 10)
    if not -_U64 < v < _U64:
        raise ValueError(f"Integer out of range {_show_field(field.strip())}")
    return v % _U64


def _parse_u64(field: bytes) -> int:
    # plain digits (nearly every field) skip the regular expression
    if field.isdigit():
        v = int(field)
        if v < _U64:
            return v
    return _parse_int(field)


def _parse_u32(field: bytes) -> int:
    """UID, GID, NLINK: C keeps the low 32 bits of anything (so -1 or 2^32 turn into other
    ids); such a value is refused instead."""
    v = int(field) if field.isdigit() else _parse_int(field)
    if v >= 1 << 32:
        raise ValueError(f"Integer out of range {_show_field(field.strip())}")
    return v


def _parse_mode(field: bytes) -> int:
    """A mode is 32 bits (st_mode): a larger one is refused, as _parse_u32 refuses ids."""
    try:
        v = int(field, 8) if field.isdigit() and len(field) < 22 else _parse_int(field, octal=True)
    except ValueError:  # an 8 or 9
        v = _parse_int(field, octal=True)
    if v >= 1 << 32:
        raise ValueError(f"Integer out of range {_show_field(field.strip())}")
    return v


def _parse_mtime(field: bytes) -> tuple[int, int]:
    """SEC.NSEC; both parts are integers (so `5`, `5.` and `.5` are C's "Invalid integer")."""
    sec_s, _dot, nsec_s = field.partition(b".")
    sec = _parse_u64(sec_s)
    nsec = _parse_u64(nsec_s)
    if sec >= 1 << 63:  # strtoull wrap of a negative value, stored in a signed time_t
        sec -= _U64
    if nsec >= 1 << 32:  # C would keep the low 32 bits
        raise ValueError(f"Integer out of range {_show_field(nsec_s.strip())}")
    return sec, nsec


def _parse_digest(field: bytes) -> bytes | None:
    if field in (b"-", b""):
        return None
    if len(field) == 64 and field.isalnum():
        try:
            return bytes.fromhex(field.decode("ascii"))
        except ValueError:
            pass
    # C would read uninitialised memory for a short digest; reject anything but full hex
    if not re.fullmatch(rb"[0-9a-fA-F]{64}", field):
        raise ValueError(f"Invalid digest {_show_field(field)}")
    return bytes.fromhex(field.decode())


def _cstr(data: bytes) -> bytes:
    """C keeps a path, payload or xattr name as a C string: a `\\x00` escape ends it."""
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]


def _split_path(path: bytes) -> list[bytes]:
    """Components of a non-root dumpfile path: leading '/'s skipped, runs of '/' collapsed,
    but a trailing '/' (or a path of only '/'s but the root's) leaves an empty final name."""
    comps = path.lstrip(b"/").split(b"/")
    return [c for c in comps[:-1] if c] + [comps[-1]]


class _PendingLink:
    """Placeholder for an `@` line until all lines are read."""

    __slots__ = ("line", "path", "target")

    def __init__(self, line: int, path: bytes, target: bytes) -> None:
        self.line = line
        self.path = path
        self.target = target


def parse(data: bytes, *, strict: bool = False) -> FileSystem:
    """Parse dumpfile bytes into a FileSystem (C mkcomposefs semantics); see `parse_file`."""
    return parse_file(io.BytesIO(data), strict=strict)


def parse_file(f: BinaryIO, *, strict: bool = False) -> FileSystem:
    """Parse a dumpfile read from `f` line by line into a FileSystem (C mkcomposefs
    semantics): a big dumpfile is never held whole, nor as a list of its lines.

    `strict` is C's `CFS_PARSE_STRICT=1`: symlink SIZE must match, RDEV must be 0 on
    non-devices, the last line needs its newline (checked first, so `f` must then be
    seekable). Inodes whose xattrs are written alike share one xattr dict: treat the
    tree's xattr dicts as read-only (`Stat.copy` copies).
    """
    if strict:
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        if end > start:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(start)
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + 1
                raise DumpfileError(lines, "Missing trailing newline")
        f.seek(start)
    with gc_paused():
        # each line is read with a bound, before anything is unescaped: one endless line
        # would otherwise be held (and unescaped) whole
        return _parse_lines(iter(functools.partial(f.readline, LINE_MAX + 1), b""), strict)


def _parse_lines(lines: Iterable[bytes], strict: bool) -> FileSystem:
    fs = FileSystem()
    root: Directory | None = None
    pending: list[tuple[Directory, bytes, _PendingLink]] = []
    homes: dict[int, tuple[Directory, bytes]] = {}
    dirs: dict[bytes, Directory] = {}  # canonical path -> directory, for the parent lookup
    xattr_dicts: dict[bytes, dict[bytes, bytes]] = {}  # the xattr text of a line -> its dict
    # one int object per permission value: most are over 256, which Python does not share
    # by itself (32 bytes a line)
    perms: dict[int, int] = {}

    for lineno, line in enumerate(lines, 1):
        if line[-1:] == b"\n":
            line = line[:-1]
        elif len(line) > LINE_MAX:
            raise DumpfileError(lineno, f"line is longer than {LINE_MAX} bytes, more than any entry needs",
                                _entry(line[:1024]))
        try:
            path, comps, node, link_target = _parse_line(line, strict, xattr_dicts, perms)
        except ValueError as e:
            raise DumpfileError(lineno, str(e), _entry(line)) from None
        if comps is None:  # the root
            if root is not None:
                raise DumpfileError(lineno, "Can't have multiple roots", _entry(line))
            if not isinstance(node, Directory):
                raise DumpfileError(lineno, "Root must be a directory")
            root = node
            fs.root = root
            continue
        if root is None:
            raise DumpfileError(lineno, "Root node not present", _entry(line))
        name = comps[-1]
        parent = root if len(comps) == 1 else dirs.get(path[:len(path) - len(name) - 1])
        if parent is None:
            _missing_parent(root, comps, path, lineno)
        if type(node) is Directory:
            dirs[path] = node
        if not name or len(name) > NAME_MAX or name in parent.entries:
            raise DumpfileError(lineno, "Can't add child", _entry(line))
        if link_target is not None:
            placeholder = _PendingLink(lineno, path, link_target)
            parent.entries[name] = placeholder
            pending.append((parent, name, placeholder))
        else:
            parent.entries[name] = node
            homes[id(node)] = (parent, name)

    if root is None:
        raise DumpfileError(0, "No files in dump file")
    _resolve_links(root, pending, homes, fs)
    return fs


def _entry(line: bytes) -> bytes:
    """A line's PATH field as written, to name the entry in an error."""
    return line.split(b" ", 1)[0]


def _missing_parent(root: Directory, comps: list[bytes], path: bytes, lineno: int) -> NoReturn:
    """The error for a line whose parent is not a directory listed before it."""
    parent: object = root
    for comp in comps[:-1]:
        parent = parent.entries.get(comp) if isinstance(parent, Directory) else None
        if parent is None:
            raise DumpfileError(lineno, f"Parent directory missing for {_show(path)}")
    raise DumpfileError(lineno, f"Parent must be a directory for {_show(path)}")


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _parse_line(line: bytes, strict: bool, xattr_dicts: dict[bytes, dict[bytes, bytes]], perms: dict[int, int]):
    nul = line.find(b"\0")
    if nul >= 0:
        raise ValueError(f"Invalid embedded NUL character at position {nul}")
    if line.endswith(b"\r"):
        # C would take the CR as part of the last field
        raise ValueError("Line ends in a carriage return: CRLF line ends are not supported")
    fields = line.split(b" ", 11)
    if len(fields) < 11:
        fields += [b""] * (11 - len(fields))
    raw_path = fields[0]
    if b"\\" in raw_path:
        raw_path = _cstr(unescape(raw_path))
    if not raw_path:
        raise ValueError("Invalid empty path")
    if raw_path == b"/":
        comps = None
        path = raw_path
    else:
        if raw_path[0] == 0x2F and b"//" not in raw_path and raw_path[-1] != 0x2F:
            comps = raw_path[1:].split(b"/")  # already canonical (nearly every line)
            path = raw_path
        else:
            comps = _split_path(raw_path)
            path = b"/" + b"/".join(comps)
        if comps[-1] in (b".", b".."):
            raise ValueError(f"Invalid . or .. in path: {_show(raw_path)}")

    mode_field = fields[2]
    is_link = mode_field.startswith(b"@")
    mode = _parse_mode(mode_field[1:] if is_link else mode_field)
    ftype = _stat.S_IFMT(mode)
    if ftype not in _VALID_TYPES:
        raise ValueError(f"Invalid mode {mode:o}")
    payload = _unescape_optional(fields[8])
    if payload is not None:
        payload = _cstr(payload)

    if is_link:
        # only PATH and PAYLOAD count; the other fields may be C's copies of the target's
        # values or composefs-rs' `-` placeholders
        if ftype == _stat.S_IFDIR:
            raise ValueError("Directories can't be hardlinked")
        if not payload:
            # C links an empty PAYLOAD to the root directory; that is not meant by anyone
            raise ValueError("No target path for the hardlink")
        target = b"/" if payload == b"/" else b"/" + b"/".join(_split_path(payload))
        return path, comps, None, target

    size_f, nlink_f, uid_f, gid_f, rdev_f = fields[1], fields[3], fields[4], fields[5], fields[6]
    sec_f, _dot, nsec_f = fields[7].partition(b".")
    if (size_f.isdigit() and nlink_f.isdigit() and uid_f.isdigit() and gid_f.isdigit() and rdev_f.isdigit()
            and sec_f.isdigit() and nsec_f.isdigit()):  # plain digits: no calls, no regular expressions
        size, nlink, uid, gid, rdev = int(size_f), int(nlink_f), int(uid_f), int(gid_f), int(rdev_f)
        mtime_sec, mtime_nsec = int(sec_f), int(nsec_f)
        in_range = (size | rdev) < _U64 and (nlink | uid | gid | mtime_nsec) < 1 << 32 and mtime_sec < 1 << 63
    else:
        in_range = False
    if not in_range:  # the general rules, in C's order, for their messages
        size = _parse_u64(size_f)
        nlink = _parse_u32(nlink_f)
        uid = _parse_u32(uid_f)
        gid = _parse_u32(gid_f)
        rdev = _parse_u64(rdev_f)
        mtime_sec, mtime_nsec = _parse_mtime(fields[7])
    if len(fields[9]) > 4 * INLINE_CONTENT_MAX:
        # too long however it is escaped: said without building it
        rest, escapes = _UNESC.subn(b"", fields[9])
        raise ValueError(f"Inline content size {len(rest) + escapes} exceeds maximum {INLINE_CONTENT_MAX}")
    content = _unescape_optional(fields[9])
    if content is not None:
        # an empty field is empty content (only `-` is none), checked on every file type
        if len(content) > INLINE_CONTENT_MAX:
            raise ValueError(f"Inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}")
        if len(content) != size:
            raise ValueError(f"Invalid content size {len(content)}, must match size {size}")
    digest = _parse_digest(fields[10])
    # one dict for all the lines of the same xattrs (most repeat a few SELinux labels, or
    # have none), up to a bound for dumpfiles where each line's are its own
    text = fields[11] if len(fields) > 11 else b""
    xattrs = xattr_dicts.get(text)
    if xattrs is None:
        xattrs = dict(_parse_xattrs(text)) if text else {}
        if len(xattr_dicts) < XATTR_DICTS_SHARED:
            xattr_dicts[text] = xattrs
    st = Stat(perms.setdefault(perm := mode & 0o7777, perm), uid, gid, mtime_sec, mtime_nsec, xattrs)
    if ftype == _stat.S_IFDIR:
        return path, comps, Directory(st), None
    if strict and rdev != 0 and ftype not in (_stat.S_IFCHR, _stat.S_IFBLK):
        raise ValueError("Non-zero devnum on non-device")
    if ftype == _stat.S_IFLNK:
        if not payload or len(payload) > SYMLINK_MAX:
            raise ValueError("Invalid symlink")
        if strict and size != len(payload):
            raise ValueError(f"Invalid symlink size {len(payload)}, must match size {size}")
        return path, comps, Leaf(st, Symlink(payload), nlink), None
    if payload is not None and len(payload) > PAYLOAD_MAX:
        raise ValueError("Invalid payload")
    kind: LeafContent
    if ftype == _stat.S_IFREG:
        kind = _regular_content(size, payload, content, digest)
    elif ftype == _stat.S_IFCHR:
        # C stores the low 32 bits of RDEV (so 2^32 is a whiteout); SIZE only picks the
        # inode layout of a special file
        kind = CharDevice(rdev & 0xFFFFFFFF, dump_size=size)
    elif ftype == _stat.S_IFBLK:
        kind = BlockDevice(rdev & 0xFFFFFFFF, dump_size=size)
    elif ftype == _stat.S_IFIFO:
        kind = Fifo(dump_size=size)
    else:
        kind = Socket(dump_size=size)
    return path, comps, Leaf(st, kind, nlink), None


def _regular_content(size: int, payload: bytes | None, content: bytes | None, digest: bytes | None):
    if content:
        return Inline(content)  # a digest on inline content is ignored (as C does)
    if size == 0:
        return Inline(b"")  # C keeps neither payload nor digest for empty files
    if size > EXTERNAL_SIZE_MAX:
        # the writer refuses it too; said here, the user learns the line
        raise ValueError(f"cannot write file: File too large ({size} bytes, at most 2^53)")
    if digest is not None:
        if payload is None:
            payload = b""
        return External(digest, size, None if payload == object_path(digest) else payload)
    if payload:
        return ExternalNoVerity(payload, size)
    return Sparse(size)


def xattr_budget(xattrs: dict[bytes, bytes]) -> int:
    """What C counts against LCFS_INODE_EXTERNAL_XATTR_MAX for one inode's xattrs."""
    return 12 + sum(7 + len(k) + len(v) for k, v in xattrs.items())


@functools.lru_cache(maxsize=4096)  # most lines repeat one of a few SELinux labels
def _parse_xattrs(rest: bytes) -> tuple[tuple[bytes, bytes], ...]:
    if len(rest) > XATTR_TEXT_MAX:
        raise ValueError(f"Xattrs of {len(rest)} bytes exceed the {XATTR_TEXT_MAX} bytes a line may hold")
    items = rest.split(b" ")
    if items[-1] == b"":
        items.pop()  # one trailing space ends the line; any other empty item is an error
    xattrs: dict[bytes, bytes] = {}
    for item in items:
        key, eq, value = item.partition(b"=")
        if not eq:
            raise ValueError("Missing = in xattr")
        key = _cstr(unescape(key))
        if not key or len(key) > XATTR_NAME_MAX:
            raise ValueError("Can't set xattr")
        xattrs[key] = unescape(value)
    if xattr_budget(xattrs) > XATTR_BUDGET:
        raise ValueError("Can't set xattr")
    return tuple(xattrs.items())


def _link_target(root: Directory, link: _PendingLink, resolved: dict[int, Inode]) -> Inode:
    """The inode an `@` line names, through chains of `@` lines. `resolved` (id of a
    placeholder -> its inode) is filled for every link of the chain, so each link is followed
    once however long the chains (20,000 links in one chain were quadratic)."""
    chain: list[_PendingLink] = []
    on_chain: set[int] = set()
    node: Inode | _PendingLink = link
    while isinstance(node, _PendingLink):
        done = resolved.get(id(node))
        if done is not None:
            node = done
            break
        if id(node) in on_chain:
            last = chain[-1]
            raise DumpfileError(last.line, f"Hardlink loop at {_show(last.path)}: Too many levels of symbolic links")
        chain.append(node)
        on_chain.add(id(node))
        if node.target == node.path:
            raise DumpfileError(node.line, f"Self-referential hardlink {_show(node.path)}")
        found = root.lookup(node.target)
        if found is None:
            raise DumpfileError(node.line, f"No target at {_show(node.target)} for hardlink")
        node = found
    for step in chain:
        resolved[id(step)] = node
    return node


def _resolve_links(root: Directory, pending, homes, fs: FileSystem) -> None:
    resolved: dict[int, Inode] = {}
    targets = [(parent, name, _link_target(root, link, resolved), link) for parent, name, link in pending]
    for parent, name, node, link in targets:
        home = homes.get(id(node))
        if isinstance(node, Directory) and (home is None or home[0] is not parent):
            # C writes a directory loop (a link to the root or an ancestor) or a directory
            # whose `..` is wrong (one in another directory), which fsck.erofs refuses; a
            # second name beside the directory (C's quirk vector) is sound and kept
            raise DumpfileError(link.line, f"Hardlink to directory {_show(link.target)} from another directory: "
                                "a directory can only have a second name in its own parent", link.path)
        parent.entries[name] = node
        if home is not None:
            # the non-`@` line: C numbers the inode there (a directory too, C accepting a
            # hardlink to one)
            fs.primary_links[id(node)] = home


# ---------------------------------------------------------------------------- writer


def _fmt_mtime(st: Stat) -> bytes:
    return b"%d.%d" % (st.mtime_sec, st.mtime_nsec)


def _xattr_fields(xattrs: dict[bytes, bytes], sort: bool) -> list[bytes]:
    items = sorted(xattrs.items()) if sort else xattrs.items()
    return [escape(k, equal=True) + b"=" + escape(v, equal=True) for k, v in items]


def _leaf_fields(leaf: Leaf) -> tuple[int, int, bytes | None, bytes | None, bytes | None]:
    """(size, rdev, payload, content, digest_hex) of a leaf."""
    c = leaf.content
    if isinstance(c, Inline):
        return len(c.data), 0, None, c.data, None
    if isinstance(c, External):
        return c.size, 0, c.backing_path, None, c.id.hex().encode()
    if isinstance(c, ExternalNoVerity):
        return c.size, 0, c.payload, None, None
    if isinstance(c, Sparse):
        return c.size, 0, None, None, None
    if isinstance(c, Symlink):
        return len(c.target), 0, c.target, None, None
    if isinstance(c, (CharDevice, BlockDevice)):
        return 0, c.rdev, None, None, None
    return 0, 0, None, None, None


def write(
    fs: FileSystem,
    *,
    hardlinks: str = "c",
    dir_sizes: dict[int, int] | None = None,
    sort_xattrs: bool = False,
    filter_names: Iterable[bytes] | None = None,
    masked: dict[int, External | ExternalNoVerity] | None = None,
) -> bytes:
    """Serialise a tree as dumpfile text.

    hardlinks="c": later names of a leaf are `@MODE` lines with the leaf's own fields and the
    first name as PAYLOAD (composefs-info dump). hardlinks="rust": `PATH 0 @120000 - - - - 0.0
    FIRST - -` (composefs-rs). `dir_sizes` (id(dir) -> size) supplies the directory sizes the
    C tool prints (the image reader records them); 0 otherwise. `filter_names` keeps only
    these top-level names (composefs-info --filter). `masked` (id(leaf) -> content, from the
    image reader) gives the size, payload and digest C prints for a regular file that a user
    `trusted.overlay.whiteout` turned into a whiteout.
    """
    if hardlinks not in ("c", "rust"):
        raise ValueError(f"unknown hardlink style {hardlinks!r}")
    counts = fs.link_counts()
    sizes = dir_sizes or {}
    keep = set(filter_names) if filter_names is not None else None
    first_path: dict[int, bytes] = {}
    out: list[bytes] = []
    for path, node in walk_filtered(fs.root, keep):
        epath = escape(path, lone_dash=True)
        seen = first_path.get(id(node))
        if seen is None:
            first_path[id(node)] = path
        if isinstance(node, Directory):
            st = node.stat
            if seen is not None:
                # a directory reached through a second name (C quirk_hardlink_to_dir)
                mode_s = b"@%o" % node.st_mode if hardlinks == "c" else b"@120000"
                if hardlinks == "rust":
                    out.append(b"%s 0 @120000 - - - - 0.0 %s - -\n" % (epath, escape(seen, lone_dash=True)))
                    continue
                fields = [epath, b"%d" % sizes.get(id(node), 0), mode_s, b"%d" % node.nlink(),
                          b"%d" % st.uid, b"%d" % st.gid, b"0", _fmt_mtime(st),
                          escape(seen, lone_dash=True), b"-", b"-"]
            else:
                fields = [epath, b"%d" % sizes.get(id(node), 0), b"%o" % node.st_mode, b"%d" % node.nlink(),
                          b"%d" % st.uid, b"%d" % st.gid, b"0", _fmt_mtime(st), b"-", b"-", b"-"]
            fields += _xattr_fields(st.xattrs, sort_xattrs)
            out.append(b" ".join(fields) + b"\n")
            continue
        st = node.stat
        size, rdev, payload, content, digest = _leaf_fields(node)
        hidden = masked.get(id(node)) if masked else None
        if hidden is not None:
            size, _rdev, payload, _content, digest = _leaf_fields(Leaf(st, hidden))
        nlink = node.nlink if node.nlink is not None else counts.get(id(node), 1)
        if seen is not None:
            if hardlinks == "rust":
                out.append(b"%s 0 @120000 - - - - 0.0 %s - -\n" % (epath, escape(seen, lone_dash=True)))
                continue
            mode_s = b"@%o" % node.st_mode
            payload = seen
        else:
            mode_s = b"%o" % node.st_mode
        fields = [
            epath, b"%d" % size, mode_s, b"%d" % nlink, b"%d" % st.uid, b"%d" % st.gid,
            b"%d" % rdev, _fmt_mtime(st),
            escape(payload, lone_dash=True) if payload is not None else b"-",
            escape(content, lone_dash=True) if content is not None else b"-",
            digest if digest is not None else b"-",
        ]
        fields += _xattr_fields(st.xattrs, sort_xattrs)
        out.append(b" ".join(fields) + b"\n")
    return b"".join(out)


def walk_filtered(root: Directory, keep: set[bytes] | None):
    """Depth-first walk; with `keep`, only the root and these top-level names (and below)."""
    if keep is None:
        yield from root.walk()
        return
    it = root.walk()
    yield next(it)
    for path, node in it:
        top = path[1:].split(b"/", 1)[0]
        if top in keep:
            yield path, node
