"""Repository commands: init, cat, measure, fsck, gc."""

from __future__ import annotations

import argparse
import sys

from pycfs.host.fsverity import digest_path
from pycfs.host.repository import ALGORITHMS, Repository
from pycfs.host.streamcat import write_stream_to_fd
from pycfs.tools.common import open_repo, print_json, repo_path


def cmd_init(args: argparse.Namespace) -> int:
    path = repo_path(args)
    with Repository.init(path, args.algorithm, args.erofs_version) as repo:
        print(f"initialised {repo.path} ({repo.algorithm}, EROFS format {repo.erofs_default}, "
              f"{'fs-verity enforced' if repo.secure else 'insecure: no fs-verity on this filesystem'})")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with open_repo(args, writable=False) as repo:
        reader = repo.open_stream(args.stream)
        sys.stdout.flush()
        write_stream_to_fd(repo, reader, sys.stdout.fileno())
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            print(f"{digest_path(path, args.hash).hex()} {path}")
        except OSError as e:
            print(f"pycfs: error: {path}: {e.strerror}", file=sys.stderr)
            status = 1
    return status


def cmd_fsck(args: argparse.Namespace) -> int:
    from pycfs.host.fsck import fsck

    with open_repo(args, writable=False) as repo:
        report = fsck(repo, metadata_only=args.metadata_only)
    if args.json:
        print_json(report.as_json())
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from pycfs.host.gc import gc

    with open_repo(args, writable=not args.dry_run) as repo:
        result = gc(repo, dry_run=args.dry_run)
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a repository", description="Create a composefs repository "
                       "(re-running with the same settings is a no-op).")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="fsverity-sha256-12",
                   help="object id algorithm (default: %(default)s)")
    p.add_argument("--erofs-version", type=int, choices=(0, 1, 2), default=1,
                   help="default EROFS image format (default: %(default)s, as C mkcomposefs --min-version=1)")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("cat", help="write a stream's original bytes to stdout",
                       description="Reassemble a splitstream (e.g. oci-layer-sha256:HEX, or refs/NAME) "
                       "to stdout: a layer stream gives back the exact tar.")
    p.add_argument("stream", metavar="STREAM")
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser("measure", help="print fs-verity digests of files",
                       description="Print the fs-verity digest (4096-byte blocks, no salt) of each file, "
                       "computed in userspace; equals `fsverity digest`.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--hash", choices=("sha256", "sha512"), default="sha256")
    p.set_defaults(handler=cmd_measure)

    p = sub.add_parser("fsck", help="check the repository for missing or corrupt data",
                       description="Verify every object's digest, every stream and image and their "
                       "references, and every ref symlink. Exit status 1 when anything is wrong.")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--metadata-only", action="store_true", help="skip re-hashing object contents")
    p.set_defaults(handler=cmd_fsck)

    p = sub.add_parser("gc", help="remove objects no ref reaches",
                       description="Delete every object not reachable from streams/refs or images/refs, "
                       "and prune dead symlinks. Waits for running imports (repository lock).")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(handler=cmd_gc)

