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
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# Order is the order of `pycfs --help`.
COMMAND_MODULES = ["repo", "oci", "ostree", "erofs", "mount", "varlink"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that may add its arguments on first use (``populate``): `pycfs --help`
    then lists a command without importing what the command needs."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 command: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate
        self._command = command

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        self._args = list(sys.argv[1:] if args is None else args)
        known, extras = super().parse_known_args(args, namespace)
        if extras and self._command:
            # A sub-command's own: argparse would hand them up to `pycfs`, whose usage
            # line then shows instead of the command's.
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return known, extras

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
        command=False,
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
    try:
        args = build_parser().parse_args(argv)
        from pycfs.host.syscalls import raise_open_file_limit

        raise_open_file_limit()
        return int(args.handler(args) or 0)
    except SystemExit:
        raise  # argparse's usage error (printed), --help and --version
    except BaseException as exc:  # the one place every failure becomes a line
        return failed(exc)


def failed(exc: BaseException) -> int:
    """The line for what ended a command, on stderr, and the status it exits with."""
    from pycfs.host.errors import first_error, user_message
    from pycfs.tools.stdio import SIGPIPE_STATUS, StdoutGone

    e = first_error(exc)
    if isinstance(e, KeyboardInterrupt):
        print(f"pycfs: {'terminated' if _terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if _terminated else signal.SIGINT)
    if isinstance(e, StdoutGone):
        return SIGPIPE_STATUS  # `pycfs fsck | head -1`: no line, but not success either
    if isinstance(e, SystemExit):
        raise e
    if os.environ.get("PYCFS_DEBUG"):
        raise exc
    print(f"pycfs: error: {user_message(e)}", file=sys.stderr)
    return 1


_terminated = False
_PID = os.getpid()


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds as Ctrl-C does (every command's cleanup runs: temporary files, locks,
    workers), through SIGINT's handler of the moment, trio's while it runs (it delivers
    the interrupt at a checkpoint)."""
    global _terminated
    if os.getpid() != _PID:  # a forked worker inherited this: it dies as SIGTERM's default has it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (started with `&` by a script): SIGTERM still ends it
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            # trio took no hold of an ignored SIGINT: an interrupt raised here would unwind
            # none of its tasks, so SIGTERM acts as it would without pycfs (no cleanup)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        handler = signal.default_int_handler
    handler(signal.SIGINT, frame)


def run() -> NoReturn:
    """The `pycfs` command: `main`, then out without the interpreter's teardown.

    Freeing every object of a pull one by one takes 10-50 ms after the work is done (more for
    larger images), and a re-pull or a no-op command is worth only a few times that. Nothing
    is left to it: files are written and closed, synced where it matters, and children reaped
    by the command itself; what is buffered for stdout and stderr is flushed here."""
    try:
        if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:  # (as Python leaves an ignored SIGINT ignored)
            signal.signal(signal.SIGTERM, _terminate)
        from pycfs.tools.stdio import set_up

        set_up()  # before anything opens a file
        status = main()
    except SystemExit as exc:
        if not (exc.code is None or isinstance(exc.code, int)):
            raise  # a message for the interpreter to print
        status = exc.code or 0
    except BaseException as exc:  # Ctrl-C before main's handler, or a closed stdout
        status = failed(exc)
    try:
        sys.stdout.flush()
    except BaseException as exc:  # what the command left buffered could not be written
        status = status or failed(exc)
    sys.stderr.flush()  # (it drops what it cannot write)
    if _terminated and status == 128 + signal.SIGTERM:
        # Cleaned up, it dies of the signal, as the convention for a handled SIGTERM has it:
        # a shell still says 143, and systemd counts `systemctl stop` of a service as clean
        # (an exit status of 143 would mark it failed).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    os._exit(status)


if __name__ == "__main__":
    run()
