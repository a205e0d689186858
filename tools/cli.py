"""`pycfs` command line: global options, then one sub-command module per concern.

Each module in pycfs.tools.commands has `register(subparsers)` that adds its
sub-commands and sets `handler` (a callable taking the parsed args, returning the exit
status). This is the error edge: whatever a command raises ends here as one line on
stderr (exit 1; argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

from pycfs.host.errors import first_error, user_message
from pycfs.host.syscalls import raise_open_file_limit

# Order is the order of `pycfs --help`.
COMMAND_MODULES = ["repo", "oci", "ostree", "erofs", "mount", "varlink"]


def _version() -> str:
    try:
        return importlib.metadata.version("pycfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pycfs",
        description="composefs repositories, images and rootless container-image import.",
    )
    parser.add_argument("--version", action="version", version=f"pycfs {_version()}")
    parser.add_argument(
        "--repo",
        metavar="PATH",
        help="composefs repository (default: $PYCFS_REPO, else ~/.var/lib/composefs; /sysroot/composefs as root)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"pycfs.tools.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    raise_open_file_limit()
    try:
        return int(args.handler(args) or 0)
    except BaseException as exc:  # the one place every failure becomes a line
        e = first_error(exc)
        if isinstance(e, KeyboardInterrupt):
            print("pycfs: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, BrokenPipeError):
            # `pycfs cat X | head`: the reader left, nothing to report.
            sys.stderr.close()
            return 0
        if isinstance(e, SystemExit):
            raise
        if os.environ.get("PYCFS_DEBUG"):
            raise
        print(f"pycfs: error: {user_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
