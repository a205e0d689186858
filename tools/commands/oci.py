"""`pycfs oci ...`: OCI images in the repository (pull, import-layer, images, inspect, create-image, compute-id, mount)."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING

# Imported by each command as it runs (`pycfs --help` and other commands need none of them).
from pycfs.host.errors import PycfsError, user_message
from pycfs.protocol.text import printable

if TYPE_CHECKING:
    from pycfs.host.oci.result import PullResult
    from pycfs.host.repository import Repository


def _print_pull(repo: Repository, result: PullResult) -> None:
    s = result.stats
    print(f"layers: {s.layers - s.layers_already_present} imported, {s.layers_already_present} already present; "
          f"objects: {s.summary()}", file=sys.stderr)
    print(f"manifest {result.manifest_digest}")
    print(f"config {result.config_digest}")
    for version, image_id in sorted(result.images.items()):
        print(f"image {repo.alg}:{image_id.hex()} (EROFS v{version})")
    if result.tag is not None:
        print(f"tagged {printable(result.tag)}")
    print(f"took {result.seconds:.2f}s", file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    from pycfs.host.oci.pull import PullOptions, fork_pull_workers, split_reference
    from pycfs.host.oci.repull import pull_if_stored
    from pycfs.host.oci.streams import check_tag
    from pycfs.tools.common import open_repo, print_json
    from pycfs.tools.progress import pull_progress

    split_reference(args.image)
    tag = args.name or args.image
    check_tag(tag)
    with open_repo(args) as repo, ExitStack() as stack:
        options = PullOptions(storage_root=args.storage_root, verify_diffid=args.verify_diffid, helper=args.helper,
                              create_image=not args.no_image, jobs=args.jobs, progress=pull_progress(args, stack))
        result = pull_if_stored(repo, args.image, tag, options)
        if result is None:
            # The event loop, and through the pull the object workers and the helper client,
            # only when there is something to import: a re-pull of a stored image needs none.
            # The workers are forked first, before trio starts: see there.
            options.forked = fork_pull_workers(repo, args.jobs)
            try:
                if options.looked is not None:
                    # Under the locks repull's look holds: the workers store the first
                    # layer's first files while trio is imported and the pull starts.
                    from pycfs.host.oci.headstart import head_start

                    options.head = head_start(*options.looked, options.forked)
                import trio

                from pycfs.host.oci.pull import pull

                result = trio.run(pull, repo, args.image, tag, options)
            finally:
                from pycfs.host.workers.fork import discard

                discard(options.forked)  # those no pool took
                if options.head is not None:
                    options.head.close()
        if args.json:
            print_json(result.to_json())
        else:
            _print_pull(repo, result)
    return 0


def cmd_import_layer(args: argparse.Namespace) -> int:
    from pycfs.host.oci.layer import import_layer
    from pycfs.host.oci.streams import parse_digest
    from pycfs.tools.common import open_repo

    parse_digest(args.diff_id, "diff_id")
    with open_repo(args) as repo, ExitStack() as stack:
        if args.file == "-":
            f = sys.stdin.buffer
        else:
            try:
                f = stack.enter_context(open(args.file, "rb"))
            except OSError as e:
                raise PycfsError(f"cannot open {args.file}: {e.strerror}") from None
        stream_id, layer = import_layer(repo, args.diff_id, f, ref=args.name)
        if layer is None:
            print(f"already present: oci-layer-{args.diff_id}", file=sys.stderr)
        else:
            print(f"imported {layer.size} bytes; objects: {layer.stats.summary()}", file=sys.stderr)
        print(f"{repo.alg}:{stream_id.hex()}")
    return 0


def _image_summary(repo: Repository, tag: str) -> dict:
    from pycfs.host.oci.streams import open_image

    image = open_image(repo, tag)
    config = image.config
    return {
        "tag": tag,
        "manifest": image.manifest_digest,
        "config": image.config_digest,
        "created": config.get("created"),
        "architecture": config.get("architecture"),
        "os": config.get("os"),
        "layers": len(image.diff_ids),
        "images": {name: object_id.hex() for name, object_id in sorted(image.image_refs.items())},
    }


def _listed(repo: Repository, tag: str, manifest_digest: str) -> dict:
    """The tag's summary, or what is wrong with it (one broken image leaves the others listed)."""
    try:
        return _image_summary(repo, tag)
    except PycfsError as e:  # (an OSError, say no access, is the whole listing's)
        return {"tag": tag, "manifest": manifest_digest, "error": user_message(e)}


def cmd_images(args: argparse.Namespace) -> int:
    from pycfs.host.oci.streams import list_images
    from pycfs.tools.common import open_repo, print_json

    with open_repo(args, writable=False) as repo:
        images = [_listed(repo, tag, digest) for tag, digest in list_images(repo)]
    broken = sum("error" in i for i in images)
    if args.json:
        print_json({"images": images})
    elif not images:
        print("no tagged images", file=sys.stderr)
    else:
        # (a tag is anyone's text, a varlink client's say: controls in it are shown escaped)
        tags = [printable(i["tag"]) for i in images]
        width = max(len("TAG"), *map(len, tags))
        print(f"{'TAG':<{width}}  {'MANIFEST':<19}  {'CONFIG':<19}  LAYERS  EROFS")
        for tag, i in zip(tags, images):
            if "error" in i:
                print(f"{tag:<{width}}  {i['manifest'][:19]}  BROKEN: {printable(i['error'])}")
                continue
            erofs = ",".join(n.removeprefix("composefs.") for n in i["images"]) or "-"
            print(f"{tag:<{width}}  {i['manifest'][:19]}  {i['config'][:19]}  {i['layers']:>6}  {erofs}")
    if broken:
        print(f"pycfs: error: {broken} of {len(images)} tagged images {'is' if broken == 1 else 'are'} broken "
              "(see its row): run `pycfs fsck --repair`, then pull it again", file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pycfs.host.oci.streams import open_image
    from pycfs.tools.common import open_repo, print_json

    with open_repo(args, writable=False) as repo:
        image = open_image(repo, args.image)
    if args.manifest or args.config:
        sys.stdout.buffer.write((image.manifest_raw if args.manifest else image.config_raw) + b"\n")
        return 0
    print_json({
        "manifest_digest": image.manifest_digest,
        "config_digest": image.config_digest,
        "manifest_verity": image.manifest_stream_id.hex(),
        "config_verity": image.config_stream_id.hex(),
        "layers": [{"diff_id": d, "verity": image.layer_ids[d].hex() if d in image.layer_ids else None}
                   for d in image.diff_ids],
        "images": {name: object_id.hex() for name, object_id in sorted(image.image_refs.items())},
        "manifest": image.manifest,
        "config": image.config,
    })
    return 0


def cmd_create_image(args: argparse.Namespace) -> int:
    from pycfs.host.oci.image import create_image
    from pycfs.tools.common import open_repo

    with open_repo(args) as repo:
        for version, image_id in sorted(create_image(repo, args.image).items()):
            print(f"{repo.alg}:{image_id.hex()} (EROFS v{version})")
    return 0


def cmd_compute_id(args: argparse.Namespace) -> int:
    from pycfs.host.oci.image import compute_image_id
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        print(f"{repo.alg}:{compute_image_id(repo, args.image, args.erofs_version).hex()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # populate: the sub-commands (and the modules their options come from) only for `pycfs oci ...`
    sub.add_parser("oci", help="OCI images: pull, import layers, list, inspect, build images",
                   description="OCI container images in the repository.", populate=_populate)


def _populate(oci: argparse.ArgumentParser) -> None:
    from pycfs.host.oci.pull import TRANSPORTS
    from pycfs.tools.commands.mount import MOUNT_DESCRIPTION, add_mount_arguments
    from pycfs.tools.common import add_helper_option, positive_int
    from pycfs.tools.progress import add_progress_option

    osub = oci.add_subparsers(dest="oci_command", metavar="OCI_COMMAND", required=True)

    p = osub.add_parser(
        "pull", help="pull an image, tag it and build its composefs image",
        description="Import an image's layers, config and manifest into the repository, tag it, and write its "
        "composefs (EROFS) image. Sources: containers-storage:[[DRIVER@ROOT+RUNROOT]]REF imports from podman's "
        "local storage (REF: name, short name, image ID or unique prefix, NAME@sha256:DIGEST), reflinking file "
        "content where the filesystems allow; oci:DIR[:TAG] reads an OCI image layout, verifying every blob.")
    p.add_argument("image", metavar="IMAGE", help=" or ".join(f"{t}:..." for t in TRANSPORTS))
    p.add_argument("name", metavar="NAME", nargs="?", help="tag to create (default: IMAGE as given)")
    p.add_argument("--storage-root", metavar="DIR",
                   help="containers-storage graphroot (default: from storage.conf, as podman)")
    p.add_argument("--verify-diffid", action="store_true",
                   help="containers-storage: re-hash each rebuilt layer tar against its diff_id before committing")
    add_helper_option(p)
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N",
                   help="processes hashing and storing files (default: one per CPU)")
    p.add_argument("--no-image", action="store_true", help="skip writing the composefs image")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (progress then goes to stderr as JSON lines)")
    add_progress_option(p)
    p.set_defaults(handler=cmd_pull)

    p = osub.add_parser("import-layer", help="import a tar layer as oci-layer-DIFF_ID",
                        description="Split a tar layer (plain, gzip or zstd; detected) into the stream "
                        "oci-layer-DIFF_ID. Nothing is committed unless the uncompressed tar's digest is DIFF_ID. "
                        "Prints the stream's object id.")
    p.add_argument("diff_id", metavar="DIFF_ID", help="sha256:<hex> of the uncompressed tar")
    p.add_argument("file", metavar="FILE", help="the layer file, or - for stdin")
    p.add_argument("name", metavar="NAME", nargs="?", help="also create the ref streams/refs/NAME")
    p.set_defaults(handler=cmd_import_layer)

    p = osub.add_parser("images", help="list tagged images", description="List the repository's tagged images.")
    p.add_argument("--json", action="store_true", help='JSON: {"images": [...]}')
    p.set_defaults(handler=cmd_images)

    p = osub.add_parser("inspect", help="show an image's manifest, config and streams",
                        description="Show a tagged image (or @sha256:MANIFEST_DIGEST) as JSON.")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--manifest", action="store_true", help="print the stored manifest JSON as is")
    g.add_argument("--config", action="store_true", help="print the stored config JSON as is")
    p.set_defaults(handler=cmd_inspect)

    p = osub.add_parser("create-image", help="write the composefs image of a pulled image",
                        description="Merge the image's layers (whiteouts, opaque directories, hardlinks) into one "
                        "tree and write it as EROFS in the repository's format(s), recorded in the config stream. "
                        "`oci pull` does this already; this re-does it on demand.")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    p.set_defaults(handler=cmd_create_image)

    p = osub.add_parser("compute-id", help="print the composefs image digest without writing",
                        description="Print the fs-verity digest the image's EROFS would have (the composefs "
                        "digest for mounting and kernel arguments); writes nothing.")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    p.add_argument("--erofs-version", type=int, choices=(0, 1, 2), help="format (default: the repository's)")
    p.set_defaults(handler=cmd_compute_id)

    p = osub.add_parser("mount", help="mount a pulled image's composefs image (kernel as root, FUSE otherwise)",
                        description=MOUNT_DESCRIPTION + " IMAGE is a tag from `pycfs oci images`.")
    add_mount_arguments(p)

    register_copy(osub)


def register_copy(osub: argparse._SubParsersAction) -> None:
    """`oci copy` (issue 12): one block, so the rest of this module can change alongside."""
    from pycfs.tools.progress import add_progress_option, emit_json, progress_mode

    class Progress:
        """Layers as they start and finish: rich bars (mode "rich"), plain lines or JSON lines on stderr."""

        def __init__(self, mode: str, bar: object | None) -> None:
            self.mode = mode
            self.bar = bar
            self.tasks: dict[str, object] = {}  # layers move side by side

        def layer_started(self, diff_id: str) -> None:
            if self.bar is not None:
                self.tasks[diff_id] = self.bar.add_task(diff_id[7:19], total=None)  # type: ignore[attr-defined]
            elif self.mode == "json":
                emit_json("layer_started", diff_id=diff_id)

        def layer_done(self, diff_id: str, already_present: bool) -> None:
            if self.mode == "json":
                emit_json("layer_done", diff_id=diff_id, already_present=already_present)
                return
            text = f"{diff_id[7:19]}: {'already present' if already_present else 'copied'}"
            if self.bar is not None:
                self.bar.remove_task(self.tasks.pop(diff_id))  # type: ignore[attr-defined]
                self.bar.console.print(text)  # type: ignore[attr-defined]
            else:
                print(text, file=sys.stderr)

    def cmd_copy(args: argparse.Namespace) -> int:
        import trio

        from pycfs.host.oci.copy import copy, fork_destination_workers
        from pycfs.host.oci.streams import check_tag
        from pycfs.host.repository import Repository
        from pycfs.host.workers.fork import discard
        from pycfs.tools.common import print_json, repo_path

        if args.name is not None:
            check_tag(args.name)
        with Repository.open(repo_path(args)) as repo:  # fails early, clearly
            repo.require_writable()
            dest = str(repo.path)
        # before the progress bar's thread and trio start (see fork_destination_workers)
        forked = fork_destination_workers(dest)
        try:
            with ExitStack() as stack:
                mode = progress_mode(args)
                progress = None
                if mode != "none":
                    bar = None
                    if mode == "rich":
                        from rich.progress import SpinnerColumn, TextColumn

                        from pycfs.tools.progress import rich_bars

                        bar = stack.enter_context(rich_bars(SpinnerColumn(), TextColumn("{task.description}")))
                    progress = Progress(mode, bar)
                result = trio.run(copy, args.source, args.from_repo, dest, args.image, args.name, args.zerocopy,
                                  progress, args.storage_root, forked)
        finally:
            discard(forked)  # those no pool took
        if args.json:
            print_json(result.to_json())
            return 0
        copied = sum(entry["copied"] for entry in result.layers)
        print(f"layers: {copied} copied, {len(result.layers) - copied} already present; objects: "
              f"{result.objects_reflinked} reflinked, {result.objects_hardlinked} hardlinked, "
              f"{result.objects_copied} copied, {result.objects_already_present} already present", file=sys.stderr)
        print(f"manifest {result.manifest_digest} (verity {result.manifest_verity})")
        print(f"config {result.config_digest} (verity {result.config_verity})")
        if args.name is not None:
            print(f"tagged {printable(args.name)}")
        print(f"took {result.seconds:.2f}s", file=sys.stderr)
        return 0

    p = osub.add_parser(
        "copy", help="copy an image from another composefs repository (reflinking file content)",
        description="Copy IMAGE from the repository --from into this one (--repo) over the composefs varlink "
        "layer API: layers already here are skipped, the others move as GetLayer/PutLayer, with file content "
        "reflinked from the source's objects where the filesystem allows (else hardlinked with --zerocopy, else "
        "copied), then the manifest and config (same digests) and the composefs image. Works across hash "
        "algorithms (sha256 -> sha512: objects are re-digested) except with --zerocopy.")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest> in the source")
    p.add_argument("--from", dest="source", required=True, metavar="SRC",
                   help="source repository path (served in process), or unix:SOCKET of `pycfs varlink serve` "
                   "(a repository service, or a containers-storage one: then IMAGE is a containers-storage name)")
    p.add_argument("--from-repo", metavar="PATH",
                   help="with --from unix:SOCKET of a repository service: the repository path as the service sees it")
    p.add_argument("--storage-root", metavar="DIR",
                   help="with --from unix:SOCKET of `pycfs varlink serve --containers-storage`: the graphroot IMAGE is "
                   "looked up in (default: from storage.conf, as podman)")
    p.add_argument("--name", metavar="TAG", help="tag the copy (default: no tag; the image is then @sha256:MANIFEST_DIGEST until the next gc removes it)")
    p.add_argument("--zerocopy", action="store_true",
                   help="share file content (reflink, else hardlink) or fail; needs one filesystem and one hash algorithm")
    p.add_argument("--json", action="store_true", help="print the result (digests, verities, counts) as JSON "
                   "(progress then goes to stderr as JSON lines)")
    add_progress_option(p)
    p.set_defaults(handler=cmd_copy)
