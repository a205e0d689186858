"""Helpers every command module shares: locating/opening the repository, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from pycfs.host.errors import PycfsError

if TYPE_CHECKING:  # imported where a repository is opened: parsing a command line needs none of it
    from pycfs.host.repository import Repository


def default_repo_path() -> str:
    """Like cfsctl: ~/.var/lib/composefs for users, /sysroot/composefs for root; $PYCFS_REPO wins."""
    if "PYCFS_REPO" in os.environ:
        if not os.environ["PYCFS_REPO"]:  # an unset shell variable, more likely than a wish for the default
            raise PycfsError("PYCFS_REPO is set but empty: set it to a repository's path, or unset it for the default")
        return os.environ["PYCFS_REPO"]
    if os.geteuid() == 0:
        return "/sysroot/composefs"
    home = os.environ.get("HOME")
    if not home:
        raise PycfsError("HOME is not set: pass --repo PATH")
    return os.path.join(home, ".var/lib/composefs")


def repo_path(args: argparse.Namespace) -> str:
    if args.repo == "":
        raise PycfsError("--repo is empty: name the repository's path")
    return args.repo or default_repo_path()


def open_repo(args: argparse.Namespace, writable: bool = True) -> Repository:
    from pycfs.host.repository import Repository

    return Repository.open(repo_path(args), writable=writable,
                           waiting=lambda line: print(f"pycfs: {line}", file=sys.stderr, flush=True))


def print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def positive_int(text: str) -> int:
    """argparse type for counts such as --jobs."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def add_helper_option(parser: argparse.ArgumentParser) -> None:
    """The ``--helper auto|always|never`` option (`HelperClient`'s policy), worded the same for
    every command; here rather than in helperclient so that `--help` does not import trio."""
    parser.add_argument(
        "--helper", choices=("auto", "always", "never"), default="auto",
        help="open files you cannot read through a helper in podman's user namespace "
        "(`podman unshare`): auto = when needed and not root (default), always, never",
    )  # fmt: skip
