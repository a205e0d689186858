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
from typing import Any, NoReturn

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
        self._args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # argparse checks for a missing sub-command before it reports options it did not
        # know: `pycfs --bogus` would say "arguments are required: COMMAND". The option
        # is the mistake to name.
        if message.startswith("the following arguments are required"):
            unknown = [a for a in getattr(self, "_args", ())
                       if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in self._option_string_actions]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(message)


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


def run() -> NoReturn:
    """The `pycfs` command: `main`, then out without the interpreter's teardown.

    Freeing every object of a pull one by one takes 10-50 ms after the work is done (more for
    larger images), and a re-pull or a no-op command is worth only a few times that. Nothing
    is left to it: files are written and closed, synced where it matters, and children reaped
    by the command itself; what is buffered for stdout and stderr is flushed here."""
    try:
        status = main()
    except SystemExit as exc:
        if not (exc.code is None or isinstance(exc.code, int)):
            raise  # a message for the interpreter to print
        status = exc.code or 0
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:
            continue  # started without it, or main closed it (the reader left)
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader left: as in main, nothing to report
        except (OSError, ValueError):
            status = status or 1  # output lost (a full disk, a closed stream)
    os._exit(status)


if __name__ == "__main__":
    run()
