"""`pycfs` command line: global options, then one sub-command module per concern.

Each module in pycfs.tools.commands has `register(subparsers)` that adds its
sub-commands and sets `handler` (a callable taking the parsed args, returning the exit
status). This is the error edge: whatever a command raises ends here as one line on
stderr (exit 1; argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from pycfs.host.errors import first_error, user_message

# Order is the order of `pycfs --help`.
COMMAND_MODULES = ["repo", "oci", "ostree", "erofs", "mount", "varlink"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that may add its arguments on first use (``populate``): `pycfs --help`
    then lists a command without importing what the command needs."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return super().parse_known_args(args, namespace)


class _Version(argparse.Action):
    """--version, without importlib.metadata (it costs a no-op command a third of its start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from pycfs.host import __version__

        print(f"pycfs {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pycfs",
        description="composefs repositories, images and rootless container-image import.",
    )
    parser.add_argument("--version", action=_Version)
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
    from pycfs.host.syscalls import raise_open_file_limit

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
