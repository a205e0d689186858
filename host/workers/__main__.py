"""``python -m pycfs.host.workers [--repo PATH] [--alg sha256|sha512]``, socket on fd 0.

Started by `pycfs.host.workers.pool`; not a command for people. It dies with its parent
(PR_SET_PDEATHSIG) and exits at EOF on the socket.
"""

from __future__ import annotations

import os
import sys

_PPID_AT_START = os.getppid()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pycfs.host.workers", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", help="store files as objects of this repository")
    parser.add_argument("--alg", default="sha256", choices=("sha256", "sha512"), help="digest only: the hash")
    args = parser.parse_args(argv)

    from pycfs.helper.hardening import HardeningError, die_with_parent, take_socket

    try:
        die_with_parent(_PPID_AT_START)
        sock = take_socket()
    except HardeningError as e:
        print(f"pycfs-worker: {e}", file=sys.stderr)
        return 2

    from pycfs.host.errors import PycfsError
    from pycfs.host.workers.service import WorkerService
    from pycfs.protocol import worker_api as api
    from pycfs.protocol.rpcserver import serve, trusted_dispatch

    repo = None
    if args.repo:  # only then: a digest-only worker starts faster without the repository code
        from pycfs.host.repository import Repository

        try:
            repo = Repository.open(args.repo)
        except PycfsError as e:
            print(f"pycfs-worker: {e}", file=sys.stderr)
            return 2
        repo.enable_source_leases()
    try:
        service = WorkerService(repo.alg if repo else args.alg, repo)
        return serve(sock, trusted_dispatch(service.methods()), name="pycfs-worker", max_message=api.MAX_MESSAGE_BYTES,
                     max_fds=api.MAX_FILES_PER_REQUEST)
    finally:
        if repo is not None:
            repo.close()
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
