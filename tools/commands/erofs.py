"""`pycfs mkcomposefs` and `pycfs composefs-info`: drop-ins for the C tools (C spec 2)."""

from __future__ import annotations

import argparse
import contextlib
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
                    return dumpfile.parse(f.read(), strict=strict)
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
    """The image, written and hashed piece by piece as it is built (never whole in memory);
    the file is opened once the tree is accepted, so a refused one leaves none, and removed
    when writing fails (`discard`), so a full disk or Ctrl-C leaves no partial image."""

    def __init__(self, path: str | None, digest: bool) -> None:
        from pycfs.host.fsverity import VerityHasher

        self.path = path
        self.file: BinaryIO | None = None
        self.hasher = VerityHasher() if digest else None
        self.remove_on_failure = False

    def start(self, size: int) -> None:
        if self.path == "-":
            self.file = sys.stdout.buffer
        elif self.path is not None:
            self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
            self.remove_on_failure = stat.S_ISREG(os.fstat(self.file.fileno()).st_mode)  # never /dev/full

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
            f.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # the error being reported matters more
            self.close()
        if self.remove_on_failure and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# ---------------------------------------------------------------------------- composefs-info

def _load_image(path: str) -> LoadedImage:
    from pycfs.host.erofs.reader import ImageFormatError, read_image

    try:
        with open(path, "rb") as f:
            data = f.read()
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
                out.write(digest_path(path).hex().encode() + b"\n")
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

