"""`pycfs ostree ...`: ostree commits in the repository (pull, pull-local, images, inspect,
dump, compute-id, create-image, mount, tag, untag)."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING

# Each command imports what it runs (`pycfs --help` and the other commands need none of it).
from pycfs.host.errors import PycfsError
from pycfs.protocol.text import printable

if TYPE_CHECKING:
    from pycfs.host.ostree.pullcore import PullResult


class _LineProgress:
    """Without a terminal (or with `--progress plain|json`): the counts as a line on stderr at
    most once a second, plain or JSON; the result's own line says the end."""

    EVERY = 1.0  # seconds between lines

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.fetched = self.found = self.done = self.bytes = 0
        self.said = time.monotonic()

    def show(self, stack: ExitStack) -> None:
        pass

    def metadata(self, fetched: int) -> None:
        self.fetched = fetched
        self._maybe_say()

    def file_found(self) -> None:
        self.found += 1
        self._maybe_say()

    def file_done(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        self._maybe_say()

    def _maybe_say(self) -> None:
        now = time.monotonic()
        if now - self.said < self.EVERY:
            return
        self.said = now
        if self.as_json:
            from pycfs.tools.progress import emit_json

            emit_json("progress", metadata_fetched=self.fetched, files_found=self.found, files_done=self.done,
                      content_bytes=self.bytes)
        else:
            print(f"metadata {self.fetched}, files {self.done}/{self.found} ({self.bytes / (1 << 20):.1f} MiB)",
                  file=sys.stderr, flush=True)


class _RichProgress:
    """On a terminal: metadata objects fetched, files fetched of those found so far (with
    bytes and rate). Counted from the start, shown from `show` on (it starts rich's refresh
    thread, which must not exist yet when the object workers are forked)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        from pycfs.tools.progress import rich_bars

        self.progress = rich_bars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[size]}"),
            TimeElapsedColumn())
        self.meta = self.progress.add_task("metadata", total=None, size="")
        self.files = self.progress.add_task("files", total=0, size="")
        self.bytes = 0
        self.found = 0
        self.started = time.monotonic()

    def show(self, stack: ExitStack) -> None:
        stack.enter_context(self.progress)

    def metadata(self, fetched: int) -> None:
        self.progress.update(self.meta, completed=fetched)

    def file_found(self) -> None:
        self.found += 1
        self.progress.update(self.files, total=self.found)

    def file_done(self, nbytes: int) -> None:
        self.bytes += nbytes
        mib = self.bytes / (1 << 20)
        rate = mib / max(time.monotonic() - self.started, 1e-3)
        self.progress.update(self.files, advance=1, size=f"{mib:.1f} MiB {rate:.1f} MiB/s")


def _print_pull(result: PullResult, as_json: bool) -> None:
    from pycfs.tools.common import print_json

    if as_json:
        print_json(result.to_json())
        return
    s = result.stats
    print(f"commit {result.commit.hex()}")
    print(f"image {result.image_id.hex()}")
    if result.ref is not None:
        print(f"tagged {printable(result.ref)}")
    else:
        print("no ref written (REF was a checksum and no NAME was given): `pycfs gc` will remove the commit; "
              f"keep it with `pycfs ostree tag {result.commit.hex()[:12]} NAME`", file=sys.stderr)
    if result.already_present:
        print("commit already present: nothing fetched", file=sys.stderr)
        return
    stored = ", ".join(f"{n} {how}" for how, n in sorted(s.stored.items())) or "none"
    print(f"objects: {s.metadata_fetched} metadata + {s.files_fetched} files fetched "
          f"({s.content_bytes / (1 << 20):.1f} MiB content; stored: {stored}; {s.inlined} inline), "
          f"{s.metadata_reused} metadata + {s.files_reused} files from bases"
          + (f"; {s.delta_parts} static delta parts" if s.delta_parts else "")
          + (f"; {s.requests} HTTP requests" if s.requests is not None else ""), file=sys.stderr)
    for base in s.bases:
        print(f"base: {base}", file=sys.stderr)
    print(f"took {result.seconds:.2f}s", file=sys.stderr)


def _run_pull(args: argparse.Namespace, local: bool) -> int:
    # The pull's modules, imported with the cyclic collector off: ~0.05 s of imports make
    # thousands of long-lived objects and no garbage, which its passes (~3 ms) would scan
    # for nothing; frozen then, the passes while the pull starts skip them (and the count
    # the imports made is zeroed: no pass right on re-enabling), until the pull's own pause
    # (`gc_paused`) unfreezes everything at its end.
    gc.disable()
    try:
        from pycfs.host.ostree.pullcore import PullOptions, PullResult, prepare_pull
        from pycfs.host.ostree.source import HttpRepo, LocalRepo
        from pycfs.tools.common import open_repo
        from pycfs.tools.progress import progress_mode
    finally:
        gc.freeze()
        gc.enable()
    source = LocalRepo(args.ostree_repo) if local else HttpRepo(args.url)
    with open_repo(args) as repo, ExitStack() as stack:
        stack.callback(source.close)
        options = PullOptions(name=args.name, base_name=args.base_name, jobs=args.jobs,
                              deltas=not args.no_delta, gpg_keyring=args.gpg_keyring,
                              allow_downgrade=args.allow_downgrade)
        mode = progress_mode(args)
        progress: _RichProgress | _LineProgress | None = (
            None if mode == "none" else _RichProgress() if mode == "rich" else _LineProgress(as_json=mode == "json"))
        options.progress = progress
        # An update of a few files or a re-pull ends here. Trio only for a larger job whose
        # files are not all known yet (over HTTP, an archive's static delta), or whose
        # workers could not be forked.
        prepared = prepare_pull(repo, source, args.ref, options)
        if isinstance(prepared, PullResult):
            result = prepared
        else:
            # while this is the only thread: the workers store their first files meanwhile
            forked = prepared.fork_workers()
            if progress is not None:
                try:
                    progress.show(stack)
                except BaseException:  # the workers are no one's yet
                    from pycfs.host.workers.fork import discard

                    discard(forked)
                    raise
            if forked:
                result = prepared.store_forked(forked)
            else:
                import trio

                from pycfs.host.ostree.pull import run_prepared

                result = trio.run(run_prepared, prepared)
    _print_pull(result, args.json)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    return _run_pull(args, local=False)


def cmd_pull_local(args: argparse.Namespace) -> int:
    return _run_pull(args, local=True)


def cmd_images(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import list_refs
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        refs = list_refs(repo)
    _print_refs(refs, args.json, "commits", "NAME")
    return 0


def _print_refs(refs: list[tuple[str, bytes]], as_json: bool, key: str, column: str) -> None:
    from pycfs.tools.common import print_json

    if as_json:
        print_json({key: [{"name": n, "commit": c.hex()} for n, c in refs]})
    elif not refs:
        print(f"no {key}" if key == "refs" else "no ostree commits", file=sys.stderr)
    else:
        names = [printable(n) for n, _ in refs]  # (a ref name may hold controls or bytes not UTF-8)
        width = max(len(column), *(len(n) for n in names))
        print(f"{column:<{width}}  COMMIT")
        for n, (_, c) in zip(names, refs):
            print(f"{n:<{width}}  {c.hex()}")


def cmd_list_refs(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.source import HttpRepo

    source = HttpRepo(args.url)
    source.summary_keyring = args.gpg_keyring
    try:
        refs = source.list_refs()
    finally:
        source.close()
    if refs is None:
        raise PycfsError(f"{args.url} has no summary file: run `ostree summary -u` on the server's repository")
    _print_refs(refs, args.json, "refs", "REF")
    return 0


def _metadata_key(key: str) -> str:
    """A metadata key as is when it is a plain name (as ostree's are: `ostree.ref-binding`),
    else as a quoted string: no key can forge a line or another `key=`."""
    import re

    from pycfs.protocol.gvariant import to_text

    return key if re.fullmatch(r"[A-Za-z0-9._:/+-]+", key) else to_text("s", key)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import load_commit
    from pycfs.host.ostree.image import commit_of
    from pycfs.host.ostree.objects import commit_date, commit_seconds
    from pycfs.protocol.gvariant import to_json, to_text
    from pycfs.tools.common import open_repo, print_json

    with open_repo(args, writable=False) as repo:
        objects = load_commit(repo, args.source)
        commit = commit_of(objects)
    if args.json:
        metadata = [{"key": key, "type": value.type, "value": to_json(value.type, value.value),
                     "text": to_text(value.type, value.value)} for key, value in commit.metadata]
        if args.metadata:
            print_json({"metadata": metadata})
            return 0
        print_json({"commit": objects.commit.hex(), "parent": commit.parent.hex() if commit.parent else None,
                    "timestamp": commit_seconds(commit.timestamp),
                    "date": commit_date(commit.timestamp), "tree": commit.root_tree.hex(),
                    "dirmeta": commit.root_meta.hex(),
                    "image": objects.image_id.hex() if objects.image_id is not None else None,
                    "subject": commit.subject, "body": commit.body, "metadata": metadata})
        return 0
    if args.metadata:
        for key, value in commit.metadata:
            print(f"{_metadata_key(key)}={to_text(value.type, value.value)}")
        return 0
    print(f"commit {objects.commit.hex()}")
    if commit.parent is not None:
        print(f"parent {commit.parent.hex()}")
    print(f"date {commit_date(commit.timestamp)}")
    print(f"tree {commit.root_tree.hex()}")
    print(f"dirmeta {commit.root_meta.hex()}")
    if objects.image_id is not None:
        print(f"image {objects.image_id.hex()}")
    if commit.subject:
        print(f"\n{_text_lines(commit.subject)}")
    if commit.body:
        print(f"\n{_text_lines(commit.body)}")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from pycfs.host import dumpfile
    from pycfs.host.ostree.commitstream import load_commit
    from pycfs.host.ostree.image import build_filesystem
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        fs = build_filesystem(load_commit(repo, args.source))
    sys.stdout.buffer.write(dumpfile.write(fs))
    return 0


def cmd_compute_id(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import load_commit
    from pycfs.host.ostree.image import compute_image_id
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        print(compute_image_id(repo, load_commit(repo, args.source)).hex())
    return 0


def cmd_create_image(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import load_commit
    from pycfs.host.ostree.image import ensure_image
    from pycfs.tools.common import open_repo

    with open_repo(args) as repo:
        objects = load_commit(repo, args.source)
        # rewriting the stream moves no ref: refs name the stream, not its object
        print(ensure_image(repo, objects, None).hex())
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from pycfs.host.mount import mount_image
    from pycfs.host.ostree.commitstream import load_commit
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        objects = load_commit(repo, args.source)
        if objects.image_id is None or not repo.has_object(objects.image_id):
            raise PycfsError(f"ostree commit {objects.commit.hex()} has no composefs image: "
                             f"run `pycfs ostree create-image {args.source}`")
        mount_image(repo, objects.image_id.hex(), args.mountpoint, suid=args.suid)
    print(f"mounted commit {objects.commit.hex()} (image {objects.image_id.hex()}) at {args.mountpoint}")
    return 0


def _text_lines(text: str) -> str:
    """A commit's subject or body for a terminal: its lines kept, controls shown escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))


def cmd_tag(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import REF_PREFIX, check_ref_name, encode_ref, resolve, stream_name
    from pycfs.tools.common import open_repo

    check_ref_name(args.name)
    with open_repo(args) as repo:
        repo.require_writable()
        commit = resolve(repo, args.source)
        repo.set_stream_ref(REF_PREFIX + encode_ref(args.name), stream_name(commit))
    print(f"tagged {commit.hex()} as {printable(args.name)}")
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    from pycfs.host.ostree.commitstream import REF_PREFIX, check_ref_name, encode_ref
    from pycfs.tools.common import open_repo

    check_ref_name(args.name)
    with open_repo(args) as repo:
        repo.require_writable()
        # (its directories entered following no symlink, as every link pycfs removes)
        if not repo.remove_link(f"streams/refs/{REF_PREFIX}{encode_ref(args.name)}"):
            raise PycfsError(f"no ostree ref {args.name!r} in {repo.path} (see `pycfs ostree images`)")
    return 0


def _pull_options(p: argparse.ArgumentParser) -> None:
    from pycfs.tools.common import positive_int
    from pycfs.tools.progress import add_progress_option

    p.add_argument("ref", metavar="REF", help="branch name, or a 64-digit commit checksum (pull-local: also "
                   "REMOTE/BRANCH or REMOTE:BRANCH of refs/remotes, COLLECTION-ID/BRANCH of refs/mirrors)")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="ref to create or move (default: REF when it is a branch name). A NAME that already "
                   "names a commit serves as the base: objects it has are not fetched again")
    p.add_argument("--base-name", metavar="NAME", help="use this stored commit (ref, id or prefix) as the base")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="let NAME move to a commit with an older timestamp than the one it names (refused by "
                   "default, as a replayed old commit could be)")
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N",
                   help="processes hashing and storing file content (default: one per CPU)")
    p.add_argument("--gpg-keyring", metavar="FILE",
                   help="require a commit signature (detached metadata) that gpgv verifies with this keyring "
                   "(binary or ASCII-armored, as `gpg --export [--armor]` writes it), by a key neither revoked nor "
                   "expired; nothing is fetched from an unsigned commit. A "
                   "summary file (refs, deltas) must then be signed by this keyring too (summary.sig, as "
                   "`ostree summary -u --gpg-sign` writes it): an unsigned or wrongly signed one is refused")
    p.add_argument("--json", action="store_true", help="print the result and statistics as JSON "
                   "(progress then goes to stderr as JSON lines)")
    add_progress_option(p)


def register(sub: argparse._SubParsersAction) -> None:
    # populate: the sub-commands, and the modules they run, only for `pycfs ostree ...`
    sub.add_parser("ostree", help="ostree commits: pull, list, inspect, mount",
                   description="Import ostree commits into the repository as commit streams with "
                   "composefs (EROFS) images.", populate=_populate)


def _populate(top: argparse.ArgumentParser) -> None:
    osub = top.add_subparsers(dest="ostree_command", metavar="OSTREE_COMMAND", required=True)

    p = osub.add_parser("pull", help="pull a commit from an archive repository over HTTP",
                        description="Fetch a commit from an ostree archive repository at URL (http:// or https://): "
                        "metadata and files concurrently, every object verified against its checksum, retries "
                        "with backoff on server errors and dropped connections. An interrupted pull resumes "
                        "without fetching what it stored. Then writes the EROFS image and the ref.")
    p.add_argument("url", metavar="URL")
    _pull_options(p)
    p.add_argument("--no-delta", action="store_true",
                   help="fetch object by object even where the server has a static delta")
    p.set_defaults(handler=cmd_pull)

    p = osub.add_parser("pull-local", help="pull a commit from a local ostree repository",
                        description="Import a commit from an ostree repository on disk (archive, bare, bare-user or "
                        "bare-user-only). File content from bare repositories is reflinked where the filesystem "
                        "allows, and verified on the stored copy. An archive repository's static delta (in its "
                        "summary or delta-indexes/) is used as over HTTP.")
    p.add_argument("ostree_repo", metavar="OSTREE_REPO")
    _pull_options(p)
    p.add_argument("--no-delta", action="store_true",
                   help="read object by object even where an archive repository has a static delta")
    p.set_defaults(handler=cmd_pull_local)

    p = osub.add_parser("list-refs", help="list the refs of a remote repository",
                        description="List the refs in the summary file of the archive repository at URL.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--gpg-keyring", metavar="FILE",
                   help="require a summary signature (summary.sig, as `ostree summary -u --gpg-sign` writes it) "
                   "that gpgv verifies with this keyring (binary or ASCII-armored, as `gpg --export [--armor]` "
                   "writes it)")
    p.add_argument("--json", action="store_true", help='JSON: {"refs": [{"name", "commit"}, ...]}')
    p.set_defaults(handler=cmd_list_refs)

    p = osub.add_parser("images", help="list ostree refs and their commits",
                        description="List the repository's ostree refs.")
    p.add_argument("--json", action="store_true", help='JSON: {"commits": [{"name", "commit"}, ...]}')
    p.set_defaults(handler=cmd_images)

    def source_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", metavar="COMMIT", help="ref name, commit checksum, or a unique prefix of one")

    p = osub.add_parser("inspect", help="show a commit", description="Show a stored commit: checksum, parent, "
                        "date, root tree and dirmeta, image, subject and body (or its metadata).")
    source_arg(p)
    p.add_argument("--metadata", action="store_true",
                   help="print only the commit metadata, as KEY=VALUE lines, VALUE in GVariant text format (as "
                   "`ostree show --print-metadata-key=KEY` prints it: strings quoted, ['a', 'b'], b'bytes', "
                   "int64 5); a KEY other than letters, digits and ._:/+- is quoted too")
    p.add_argument("--json", action="store_true",
                   help='JSON: {"commit", "parent", "timestamp", "date", "tree", "dirmeta", "image", "subject", '
                   '"body", "metadata": [{"key", "type", "value", "text"}, ...]} (with --metadata: the metadata '
                   'alone); "text" is the GVariant text, "value" the value as JSON (byte arrays as hex)')
    p.set_defaults(handler=cmd_inspect)

    p = osub.add_parser("dump", help="print a commit's tree as a composefs dumpfile",
                        description="Print the tree of a stored commit in composefs dumpfile format.")
    source_arg(p)
    p.set_defaults(handler=cmd_dump)

    p = osub.add_parser("compute-id", help="print the composefs image id of a commit",
                        description="Print the fs-verity digest of the commit's EROFS image; writes nothing.")
    source_arg(p)
    p.set_defaults(handler=cmd_compute_id)

    p = osub.add_parser("create-image", help="(re)write a commit's composefs image",
                        description="Write the commit's EROFS image if it is missing and record it in the commit "
                        "stream. Pulls do this already.")
    source_arg(p)
    p.set_defaults(handler=cmd_create_image)

    p = osub.add_parser("mount", help="mount a commit's image (root)",
                        description="Mount the commit's composefs image read-only at MOUNTPOINT (needs root).")
    source_arg(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    from pycfs.tools.commands.mount import add_suid_argument

    add_suid_argument(p)
    p.set_defaults(handler=cmd_mount)

    p = osub.add_parser("tag", help="name a stored commit", description="Create or move ref NAME to a stored commit.")
    source_arg(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_tag)

    p = osub.add_parser("untag", help="remove a ref", description="Remove ref NAME; `pycfs gc` then frees what "
                        "nothing else uses.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_untag)
