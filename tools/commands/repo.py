"""Repository commands: init, cat, measure, fsck, gc."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

from pycfs.host.errors import PycfsError
from pycfs.protocol.text import printable
from pycfs.tools.common import open_repo, positive_int, print_json, repo_path
from pycfs.tools.progress import Counter, add_progress_option, progress_mode
from pycfs.tools.stdio import SIGPIPE_STATUS, WRITE_ERRNOS, StdoutGone, output_error


def cmd_init(args: argparse.Namespace) -> int:
    from pycfs.host.repository import Repository

    path = repo_path(args)
    with Repository.init(path, args.algorithm, args.erofs_version) as repo:
        print(f"initialised {repo.path} ({repo.algorithm}, EROFS format {repo.erofs_default}, "
              f"{'fs-verity enforced' if repo.secure else 'insecure: no fs-verity on this filesystem'})")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from pycfs.host.streamcat import write_stream_to_fd

    with open_repo(args, writable=False) as repo:
        reader = repo.open_stream(args.stream)
        sys.stdout.flush()
        try:
            write_stream_to_fd(repo, reader, sys.stdout.fileno())
        except OSError as e:
            if e.errno in WRITE_ERRNOS:  # (sendfile's errors are its reading's or its writing's)
                raise output_error(e) from None
            raise
    return 0


OUTPUT_RUN = 1024


def cmd_measure(args: argparse.Namespace) -> int:
    from pycfs.host.fsverity import digest_regular_files, small_job

    paths = list(args.files)
    if args.files_from is not None:
        paths += _names_from(args.files_from)
    if not paths:
        raise PycfsError("no files to measure: name them, or pass --files-from LIST")
    if args.jobs is None and small_job(paths):  # faster hashed here than by workers started for it
        digests = digest_regular_files(paths, args.hash)
    else:
        from pycfs.host.workers.batching import default_jobs
        from pycfs.host.workers.fork import absolute_names, fork_digest_workers

        # Forked, and sent their first files, before trio is even imported (see
        # pycfs.host.workers.fork): they hash while this process imports the pool.
        names = absolute_names(paths)
        forked = fork_digest_workers(names, args.jobs or default_jobs(), args.hash)
        from functools import partial

        import trio

        from pycfs.host.workers.pool import digest_files

        digests = trio.run(partial(digest_files, names, args.hash, args.jobs, forked=forked))
    # Written a run of lines at a time, not a print per file (17,130 prints took 37 ms, joined
    # runs 9), in runs of at most OUTPUT_RUN (a whole 200,000-file output joined would be ~60 MB).
    # Bytes: a name is written as it was given, UTF-8 or not.
    status = 0
    out = sys.stdout.buffer
    lines: list[bytes] = []

    def write_run() -> None:
        out.write(b"".join(lines))
        lines.clear()

    sys.stdout.flush()
    try:
        for path, digest in zip(paths, digests):
            if isinstance(digest, OSError):
                write_run()
                out.flush()  # the error line after the lines before it, on a shared pipe
                print(f"pycfs: error: {printable(path)}: {digest.strerror}", file=sys.stderr)
                status = 1
                continue
            lines.append(b"%s %s\n" % (digest.hex().encode(), os.fsencode(path)))
            if len(lines) == OUTPUT_RUN:
                write_run()
        write_run()
    except StdoutGone:
        return status or SIGPIPE_STATUS  # (the reader left: an unreadable file is still the status)
    return status


def _names_from(listing: str) -> list[str]:
    """The names in LIST (or stdin), one a line, read as bytes: a name need not be UTF-8
    (decoded as the command line's are, so that it opens and prints as given)."""
    try:
        if listing == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(listing, "rb") as f:
                data = f.read()
    except OSError as e:
        raise PycfsError(f"cannot read {printable(listing)}: {e.strerror}") from None
    return [os.fsdecode(line) for line in data.split(b"\n") if line.strip()]


def cmd_fsck(args: argparse.Namespace) -> int:
    from pycfs.host.fsck import fsck

    with open_repo(args, writable=args.repair) as repo, ExitStack() as stack:
        report = fsck(repo, metadata_only=args.metadata_only, verify_layers=args.verify_layers, repair=args.repair,
                      progress=Counter(progress_mode(args), stack), jobs=args.jobs)
    # After a repair the report still lists what was found; success means all of it was dealt with.
    status = 0 if report.ok or (args.repair and (report.repaired or report.relinked)) else 1
    try:
        if args.json:
            print_json(report.as_json())
        else:
            print("\n".join(report.lines()))
    except StdoutGone:  # `pycfs fsck | head -1`: a damaged repository still says so in the status
        return status or SIGPIPE_STATUS
    return status


def cmd_gc(args: argparse.Namespace) -> int:
    from pycfs.host.gc import gc

    with open_repo(args, writable=not args.dry_run) as repo, ExitStack() as stack:
        result = gc(repo, dry_run=args.dry_run, progress=Counter(progress_mode(args), stack))
    if args.json:
        print_json(result.as_json() | {"dry_run": args.dry_run})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for path in result.removed if args.dry_run else []:
        print(path)
    print(f"{verb} {result.objects_removed} objects ({result.bytes_removed} bytes), "
          f"{result.links_pruned} dead links, {result.temp_files_removed} temporary files; "
          f"{result.live_objects} objects live")
    return 0


def _populate_init(p: argparse.ArgumentParser) -> None:
    from pycfs.host.repository import ALGORITHMS

    p.add_argument("--algorithm", choices=ALGORITHMS, default="fsverity-sha256-12",
                   help="object id algorithm (default: %(default)s)")
    p.add_argument("--erofs-version", type=int, choices=(0, 1, 2), default=1,
                   help="default EROFS image format (default: %(default)s, as C mkcomposefs --min-version=1)")
    p.set_defaults(handler=cmd_init)


def register(sub: argparse._SubParsersAction) -> None:
    # populate: the repository code (its ALGORITHMS) only for `pycfs init`, not for every command line
    sub.add_parser("init", help="create a repository", description="Create a composefs repository "
                   "(re-running with the same settings is a no-op).", populate=_populate_init)

    p = sub.add_parser("cat", help="write a stream's original bytes to stdout",
                       description="Reassemble a splitstream (e.g. oci-layer-sha256:HEX, or refs/NAME) "
                       "to stdout: a layer stream gives back the exact tar.")
    p.add_argument("stream", metavar="STREAM")
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser("measure", help="print fs-verity digests of files",
                       description="Print the fs-verity digest (4096-byte blocks, no salt) of each file, "
                       "computed in userspace; equals `fsverity digest`. Files are hashed in parallel, "
                       "one worker process per CPU; the output keeps their order.")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--files-from", metavar="LIST", help="also measure the files named in LIST, one per line (- for stdin)")
    p.add_argument("--hash", choices=("sha256", "sha512"), default="sha256")
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N", help="worker processes (default: one per CPU)")
    p.set_defaults(handler=cmd_measure)

    p = sub.add_parser("fsck", help="check the repository for missing or corrupt data",
                       description="Verify every object's digest, every stream and image and their "
                       "references, and every ref symlink. Exit status 1 when anything is wrong.")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--metadata-only", action="store_true", help="skip re-hashing object contents")
    p.add_argument("--verify-layers", action="store_true",
                   help="also reassemble every layer stream and check its tar's digest against its diff_id")
    p.add_argument("--repair", action="store_true",
                   help="remove what cannot be trusted (corrupt objects, broken streams and images, dangling refs) "
                   "so that pulling the affected images again rebuilds them; says what it removed")
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N", help="hashing processes (default: one per CPU)")
    add_progress_option(p)
    p.set_defaults(handler=cmd_fsck)

    p = sub.add_parser("gc", help="remove objects no ref reaches",
                       description="Delete every object not reachable from streams/refs or images/refs, "
                       "and prune dead symlinks. Waits for running imports (repository lock).")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    add_progress_option(p)
    p.set_defaults(handler=cmd_gc)

