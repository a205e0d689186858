"""``python -m pycfs.helper --storage-root ROOT --driver overlay|vfs [--additional-store DRIVER:ROOT ...]``,
socket on fd 0.

Started by `pycfs.host.helperclient` as ``podman unshare <python> -B -m pycfs.helper ...``.
Hardening (see `pycfs.helper.hardening`) happens before the first request is read; the
imports are kept to what serving needs so start-up stays quick.
"""

from __future__ import annotations

import os
import sys

# Read first, before any slow import: the parent whose death must end this process.
_PPID_AT_START = os.getppid()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pycfs.helper", description=__doc__.splitlines()[0])
    parser.add_argument("--storage-root", required=True, help="containers-storage graph root (absolute)")
    parser.add_argument("--driver", required=True, choices=("overlay", "vfs"))
    parser.add_argument("--additional-store", action="append", default=[], metavar="DRIVER:ROOT",
                        help="an additional image store the caller owns (repeatable)")
    args = parser.parse_args(argv)

    from pycfs.helper.hardening import HardeningError, harden, open_owned_store

    fds: list[int] = []
    try:
        sock = harden(_PPID_AT_START)
        if not os.path.isabs(args.storage_root):
            raise HardeningError(f"--storage-root must be absolute, got {args.storage_root!r}")
        fds.append(os.open(args.storage_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        additional = []
        for spec in args.additional_store:
            driver, _, root = spec.partition(":")
            if driver not in ("overlay", "vfs"):
                raise HardeningError(f"--additional-store {spec!r}: the driver must be overlay or vfs")
            fds.append(open_owned_store(root))
            additional.append((fds[-1], driver))
    except (HardeningError, OSError) as e:
        for fd in fds:
            os.close(fd)
        print(f"pycfs-helper: {e}", file=sys.stderr)
        return 2

    from pycfs.helper.service import HelperService, serve

    try:
        return serve(sock, HelperService(fds[0], args.driver, additional))
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
