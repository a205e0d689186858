"""``python -m pycfs.helper --storage-root ROOT --driver overlay|vfs``, socket on fd 0.

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
    args = parser.parse_args(argv)

    from pycfs.helper.hardening import HardeningError, harden

    try:
        sock = harden(_PPID_AT_START)
        if not os.path.isabs(args.storage_root):
            raise HardeningError(f"--storage-root must be absolute, got {args.storage_root!r}")
        root_fd = os.open(args.storage_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (HardeningError, OSError) as e:
        print(f"pycfs-helper: {e}", file=sys.stderr)
        return 2

    from pycfs.helper.service import HelperService, serve

    try:
        return serve(sock, HelperService(root_fd, args.driver))
    finally:
        os.close(root_fd)
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
