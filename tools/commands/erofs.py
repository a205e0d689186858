"""`pycfs mkcomposefs` and `pycfs composefs-info`: drop-ins for the C tools (C spec 2)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
from typing import TYPE_CHECKING, BinaryIO

# The EROFS modules are imported by the commands as they run (`pycfs --help` needs none).
from pycfs.host.errors import PycfsError

if TYPE_CHECKING:
    from pycfs.host.erofs.reader import LoadedImage
    from pycfs.host.tree import FileSystem


# ---------------------------------------------------------------------------- mkcomposefs


def _versions(args: argparse.Namespace) -> tuple[int, int]:
    # C quirk: giving either flag makes the other one default to 0
    if args.min_version is None and args.max_version is None:
        lo, hi = 0, 1
    else:
        lo = args.min_version or 0
        hi = args.max_version or 0
    if not 0 <= lo <= 1 or not 0 <= hi <= 1:
        raise PycfsError("cannot write file: Invalid argument (format versions are 0 and 1)")
    return lo, max(lo, hi)


# a dumpfile of more is a tree whose image would pass the 1 GiB composefs limit too
_PIPED_DUMPFILE_MAX = 1 << 30


def _load_source(args: argparse.Namespace) -> FileSystem:
    from pycfs.host import dumpfile

    if args.from_file:
        strict = os.environ.get("CFS_PARSE_STRICT") == "1"
        try:
            stdin = args.source == "-"
            with open(sys.stdin.fileno() if stdin else args.source, "rb", closefd=not stdin) as f:
                # read line by line: a big dumpfile is not held whole (a pipe, which the
                # strict check cannot seek, is)
                if strict and not f.seekable():
                    data = f.read(_PIPED_DUMPFILE_MAX + 1)
                    if len(data) > _PIPED_DUMPFILE_MAX:
                        raise PycfsError(f"cannot read {args.source}: a strict parse (CFS_PARSE_STRICT=1) reads a "
                                         f"pipe whole, and this one holds more than {_PIPED_DUMPFILE_MAX} bytes: "
                                         "give the dumpfile as a file")
                    return dumpfile.parse(data, strict=strict)
                return dumpfile.parse_file(f, strict=strict)
        except OSError as e:
            raise PycfsError(f"cannot read {args.source}: {e.strerror}") from None
    from pycfs.host.scan import ScanOptions, scan_directory

    return scan_directory(args.source, ScanOptions(
        digest_store=args.digest_store, use_epoch=args.use_epoch, skip_xattrs=args.skip_xattrs,
        user_xattrs=args.user_xattrs, skip_devices=args.skip_devices, threads=args.threads or 0,
    ))


def cmd_mkcomposefs(args: argparse.Namespace) -> int:
    if args.print_digest_only and args.image is not None:
        raise PycfsError("Cannot specify destination path with --print-digest-only")
    if not args.print_digest_only and args.image is None:
        raise PycfsError("No destination path specified")
    if args.threads is not None and args.threads <= 0:
        raise PycfsError(f"Invalid threads count {args.threads}")
    from pycfs.host.erofs.writer import choose_version, write_image_to

    lo, hi = _versions(args)
    if args.image == "-" and sys.stdout.isatty():
        raise PycfsError("refusing to write the image to a terminal")
    fs = _load_source(args)
    out = _ImageOutput(args.image, args.print_digest or args.print_digest_only)
    try:
        write_image_to(fs, choose_version(fs, lo, hi), out)
        out.close()
    except BaseException as e:
        out.discard()
        if isinstance(e, OSError):
            raise PycfsError(f"cannot write {args.image}: {e.strerror}") from None
        raise
    if out.hasher is not None:
        sys.stdout.write(out.hasher.digest().hex() + "\n")
        sys.stdout.flush()
    return 0


class _ImageOutput:
    """The image, written and hashed piece by piece as it is built (never whole in memory).
    A file is written under a temporary name beside it, synced, and renamed to its name only
    when complete: a kill, a full disk or Ctrl-C half way leaves the previous image (or none),
    never a truncated one, and a refused tree leaves nothing (`discard` removes the temporary
    file). A destination that is not a regular file (/dev/null, a fifo) is written into, as
    C does; `-` is stdout."""

    def __init__(self, path: str | None, digest: bool) -> None:
        from pycfs.host.fsverity import VerityHasher

        self.path = path
        self.file: BinaryIO | None = None
        self.hasher = VerityHasher() if digest else None
        self.temp: str | None = None  # the temporary name, until it is renamed
        self.final = ""

    def start(self, size: int) -> None:
        if self.path == "-":
            self.file = sys.stdout.buffer
        elif self.path is not None:
            self.file, self.temp, self.final = _open_destination(self.path)

    def write(self, piece: bytearray) -> None:
        if self.file is not None:
            self.file.write(piece)
        if self.hasher is not None:
            self.hasher.update(piece)

    def close(self) -> None:
        f, self.file = self.file, None
        if f is sys.stdout.buffer:
            f.flush()
        elif f is not None:
            with f:
                if self.temp is not None:
                    f.flush()
                    os.fsync(f.fileno())
            if self.temp is not None:
                os.rename(self.temp, self.final)
                self.temp = None

    def discard(self) -> None:
        f, self.file = self.file, None
        if f is not None and f is not sys.stdout.buffer:
            with contextlib.suppress(OSError):  # the error being reported matters more
                f.close()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None


def _open_destination(path: str) -> tuple[BinaryIO, str | None, str]:
    """(file to write, its temporary name or None, the name it gets) for the image `path`.
    C writes through a symlink to its target, so the rename replaces the target; it
    truncates an existing file, whose mode the new one takes (a new one: 0666 less the
    umask, as C's)."""
    final = os.path.realpath(path)
    try:
        st: os.stat_result | None = os.stat(final)
    except FileNotFoundError:
        st = None
    # In place, as C writes: what is not a regular file, a file with other names (a rename
    # would part them), and a file in a directory that takes no new name (its own mode
    # may let it be written).
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        return open(final, "wb"), None, final
    directory, name = os.path.split(final)
    while True:
        temp = os.path.join(directory, f".{name[:200]}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            if st is None or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return open(final, "wb"), None, final
    try:
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        return os.fdopen(fd, "wb"), temp, final
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise


# ---------------------------------------------------------------------------- composefs-info

def _load_image(path: str) -> LoadedImage:
    from pycfs.host import syscalls
    from pycfs.host.erofs.reader import MAX_IMAGE_SIZE, ImageFormatError, read_image

    # nothing but a regular file is opened (a fifo would block, a device feed the read
    # without end), and its size is checked before it is read
    try:
        fd, st = syscalls.open_regular(syscalls.AT_FDCWD, os.fsencode(path), follow=True, resolve=0)
    except syscalls.NotRegularFile as e:
        raise PycfsError(f"Failed to load '{path}': it is {e.kind}, not an image file") from None
    except OSError as e:  # openat2's strerror names the call
        raise PycfsError(f"Failed to load '{path}': {os.strerror(e.errno) if e.errno else e}") from None
    try:
        with open(fd, "rb") as f:
            if st.st_size > MAX_IMAGE_SIZE:
                raise PycfsError(f"Failed to load '{path}': image of {st.st_size} bytes exceeds the 1 GiB "
                                 "composefs limit")
            data = f.read(MAX_IMAGE_SIZE + 1)  # one growing meanwhile is refused by read_image
    except OSError as e:
        raise PycfsError(f"Failed to load '{path}': {e.strerror}") from None
    try:
        return read_image(data)
    except ImageFormatError as e:
        raise PycfsError(f"Failed to load '{path}': {e}") from None


def cmd_composefs_info(args: argparse.Namespace) -> int:
    from pycfs.host import dumpfile
    from pycfs.host.erofs.info import format_ls, image_objects
    from pycfs.host.fsverity import digest_path

    filters = [os.fsencode(n) for n in args.filter or []]
    for n in filters:
        if b"/" in n:
            raise PycfsError(f"--filter takes top-level names only, not paths: {os.fsdecode(n)}")
    out = sys.stdout.buffer
    if args.subcommand == "measure-file":
        for path in args.files:
            try:
                out.write(digest_path(path).hex().encode() + b"\n")  # (a regular file only)
            except OSError as e:
                raise PycfsError(f"Failed to measure '{path}': {e.strerror}") from None
        out.flush()
        return 0
    collected: set[bytes] = set()
    for path in args.files:
        loaded = _load_image(path)
        fs = loaded.fs
        if args.subcommand == "dump":
            out.write(dumpfile.write(fs, dir_sizes=loaded.dir_sizes, filter_names=filters or None,
                                     masked=loaded.masked))
        elif args.subcommand == "ls":
            out.write(format_ls(fs, filters or None))
        else:
            collected.update(image_objects(fs))
    if args.subcommand == "objects":
        out.write(b"".join(p + b"\n" for p in sorted(collected)))
    elif args.subcommand == "missing-objects":
        # C: every payload is relative to the object store, a leading '/' too; without
        # --basedir, to the current directory
        base = os.fsencode(args.basedir or ".")
        missing = [p for p in sorted(collected) if not os.path.exists(os.path.join(base, p.lstrip(b"/")))]
        out.write(b"".join(p + b"\n" for p in missing))
    out.flush()
    return 0


INFO_ACTIONS = [
    ("ls", "list every path of the images with its type, target or content digest", "IMAGE"),
    ("objects", "list the backing files (XX/rest) the images refer to, each once", "IMAGE"),
    ("dump", "print the images as composefs-dump(5) files", "IMAGE"),
    ("missing-objects", "list the backing files the images refer to that are missing below --basedir", "IMAGE"),
    ("measure-file", "print the fs-verity digest of each file (what a backing file must be named by)", "FILE"),
]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mkcomposefs", help="build a composefs image from a directory or dumpfile (C-compatible)",
        description="Build a composefs EROFS image, byte-identical to C mkcomposefs 1.0.8.",
    )
    p.add_argument("source", metavar="SOURCE", help="directory, or dumpfile with --from-file ('-' = stdin)")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="output image ('-' = stdout)")
    p.add_argument("--from-file", action="store_true", help="SOURCE is a composefs-dump(5) file")
    p.add_argument("--digest-store", metavar="PATH", help="store content files in this directory")
    p.add_argument("--use-epoch", action="store_true", help="make all mtimes zero")
    p.add_argument("--skip-devices", action="store_true", help="don't store device nodes")
    p.add_argument("--skip-xattrs", action="store_true", help="don't store file xattrs")
    p.add_argument("--user-xattrs", action="store_true", help="only store user.* xattrs")
    p.add_argument("--print-digest", action="store_true", help="print the digest of the image")
    p.add_argument("--print-digest-only", action="store_true", help="print the digest, don't write the image")
    p.add_argument("--min-version", type=int, metavar="N", help="minimal format version (default 0)")
    p.add_argument("--max-version", type=int, metavar="N", help="maximal format version (default 1)")
    p.add_argument("--threads", type=int, metavar="N", help="threads for digests and copies (default: CPUs)")
    p.set_defaults(handler=cmd_mkcomposefs)

    q = subparsers.add_parser(
        "composefs-info", help="inspect composefs images (ls, dump, objects, ...)",
        description="Inspect composefs images like C composefs-info. `pycfs composefs-info ACTION --help` "
        "explains each action.",
    )

    def shared_options(parser: argparse.ArgumentParser, default: object) -> None:
        # Accepted before the action (as C takes them) and after it.
        parser.add_argument("--basedir", metavar="PATH", default=default,
                            help="missing-objects: the object store the images' payloads are relative to "
                            "(default: the current directory)")
        parser.add_argument("--filter", action="append", metavar="NAME", default=default,
                            help="ls, dump: only these top-level names (repeatable)")

    shared_options(q, None)
    actions = q.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    for name, summary, what in INFO_ACTIONS:
        a = actions.add_parser(name, help=summary, description=f"{summary}.")
        a.add_argument("files", nargs="+", metavar=what)
        shared_options(a, argparse.SUPPRESS)
    q.set_defaults(handler=cmd_composefs_info)

