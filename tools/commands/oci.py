"""`pycfs oci ...`: OCI images in the repository.

`pull` dispatches on the transport prefix of the image reference through PULL_TRANSPORTS;
a new transport is one entry there: an async function (repo, source after the prefix,
tag) -> PullResult.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

import trio

from pycfs.host.errors import PycfsError
from pycfs.host.oci.layer import import_layer, parse_digest
from pycfs.host.oci.layout import pull_oci_layout
from pycfs.host.oci.streams import PullResult, check_tag
from pycfs.host.repository import Repository
from pycfs.tools.common import open_repo

PullFn = Callable[[Repository, str, str], Awaitable[PullResult]]

PULL_TRANSPORTS: dict[str, PullFn] = {
    "oci": pull_oci_layout,
}


def cmd_import_layer(args: argparse.Namespace) -> int:
    parse_digest(args.diff_id, "diff_id")
    with open_repo(args) as repo:
        if args.file == "-":
            stream_id, layer = import_layer(repo, args.diff_id, sys.stdin.buffer, ref=args.name)
        else:
            try:
                f = open(args.file, "rb")
            except OSError as e:
                raise PycfsError(f"cannot open {args.file}: {e.strerror}") from None
            with f:
                stream_id, layer = import_layer(repo, args.diff_id, f, ref=args.name)
        if layer is None:
            print(f"already present: oci-layer-{args.diff_id}", file=sys.stderr)
        else:
            s = layer.stats
            print(f"imported {layer.size} bytes: {s.objects_new} new objects, {s.objects_present} already present, "
                  f"{s.bytes_external} bytes in objects, {s.bytes_inline} inline", file=sys.stderr)
        print(f"{repo.alg}:{stream_id.hex()}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    transport, sep, source = args.image.partition(":")
    if not sep or transport not in PULL_TRANSPORTS:
        raise PycfsError(f"unsupported image reference {args.image!r}: use one of "
                         f"{', '.join(t + ':...' for t in PULL_TRANSPORTS)}")
    tag = args.name or args.image
    check_tag(tag)
    with open_repo(args) as repo:
        result = trio.run(PULL_TRANSPORTS[transport], repo, source, tag)
    counters = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.stats.items())
    print(f"layers: {result.layers_imported} imported, {result.layers_present} already present"
          + (f"; {counters}" if counters else ""), file=sys.stderr)
    print(f"manifest {result.manifest_digest}")
    print(f"config {result.config_digest} (stream {repo.alg}:{result.config_stream_id.hex()})")
    print(f"tagged {result.tag}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    oci = sub.add_parser("oci", help="OCI images: import layers, pull, ...",
                         description="OCI container images in the repository.")
    osub = oci.add_subparsers(dest="oci_command", metavar="OCI_COMMAND", required=True)

    p = osub.add_parser("import-layer", help="import a tar layer as oci-layer-DIFF_ID",
                        description="Split a tar layer (plain, gzip or zstd; detected) into the stream "
                        "oci-layer-DIFF_ID. Nothing is committed unless the uncompressed tar's digest is DIFF_ID. "
                        "Prints the stream's object id.")
    p.add_argument("diff_id", metavar="DIFF_ID", help="sha256:<hex> of the uncompressed tar")
    p.add_argument("file", metavar="FILE", help="the layer file, or - for stdin")
    p.add_argument("name", metavar="NAME", nargs="?", help="also create the ref streams/refs/NAME")
    p.set_defaults(handler=cmd_import_layer)

    p = osub.add_parser("pull", help="pull an image and tag it",
                        description="Import an image's layers, config and manifest into the repository and tag it. "
                        "Sources: " + ", ".join(f"{t}:..." for t in PULL_TRANSPORTS) + " (oci:DIR[:TAG] is an OCI image layout).")
    p.add_argument("image", metavar="IMAGE", help="e.g. oci:DIR[:TAG]")
    p.add_argument("name", metavar="NAME", nargs="?", help="tag to create (default: IMAGE as given)")
    p.set_defaults(handler=cmd_pull)


# ---------------------------------------------------------------------------------------
# containers-storage pulls, `oci images`, `oci inspect` (pycfs.host.oci.cstorage, streams)

from pycfs.host.oci.streams import list_images, open_image  # noqa: E402
from pycfs.tools.common import print_json  # noqa: E402

CSTORAGE_TRANSPORT = "containers-storage"


def _storage_for(source: str, storage_root: str | None):
    """(Storage, image name) for the part of a containers-storage: reference after the prefix."""
    from pycfs.host.storage.config import load_storage_config
    from pycfs.host.storage.store import Storage, parse_reference

    driver, root, name = parse_reference(source)
    config = load_storage_config(storage_root or root, driver=driver)
    return Storage.from_config(config), name


async def _pull_cstorage_transport(repo: Repository, source: str, tag: str) -> PullResult:
    """PULL_TRANSPORTS entry: defaults for everything (storage.conf, helper started when needed)."""
    from pycfs.host.helperclient import HelperClient
    from pycfs.host.oci.cstorage import pull_image

    storage, name = _storage_for(source, None)
    async with HelperClient(storage.primary.root, storage.primary.driver, policy="auto") as helper:
        r = await pull_image(repo, storage, name, tag, helper=helper if helper.enabled else None)
    return PullResult(tag, r.manifest_digest, r.config_digest, r.manifest_stream, r.config_stream,
                      r.stats.layers - r.stats.layers_already_present, r.stats.layers_already_present,
                      {k: v for k, v in vars(r.stats).items() if k not in ("layers", "layers_already_present")})


PULL_TRANSPORTS[CSTORAGE_TRANSPORT] = _pull_cstorage_transport


class _PlainPullProgress:
    """Without a terminal: one line per layer and the lock wait on stderr, no bars."""

    def waiting_for_lock(self) -> None:
        print("waiting for containers-storage locks (podman is writing)...", file=sys.stderr)

    def layer_started(self, diff_id: str, total_bytes: int) -> None:
        pass

    def advance(self, diff_id: str, nbytes: int) -> None:
        pass

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        print(f"{diff_id}: {'already present' if already_present else 'imported'}", file=sys.stderr)


class _RichPullProgress:
    """One bar per layer on stderr (pycfs.host.oci.cstorage.PullProgress)."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, object] = {}

    def waiting_for_lock(self) -> None:
        self.progress.console.print("waiting for containers-storage locks (podman is writing)...")

    def layer_started(self, diff_id: str, total_bytes: int) -> None:
        self.tasks[diff_id] = self.progress.add_task(diff_id[7:19], total=total_bytes)

    def advance(self, diff_id: str, nbytes: int) -> None:
        self.progress.advance(self.tasks[diff_id], nbytes)

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        if already_present:
            self.progress.console.print(f"{diff_id[7:19]}: already present")
        else:
            self.progress.console.print(f"{diff_id[7:19]}: imported")


def cmd_pull_cstorage(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from pycfs.host.oci.cstorage import pull_image

    source = args.image[len(CSTORAGE_TRANSPORT) + 1 :]
    tag = args.name or args.image
    check_tag(tag)
    storage, name = _storage_for(source, args.storage_root)
    with open_repo(args) as repo, ExitStack() as stack:
        progress = None if args.json else _PlainPullProgress()
        if not args.json and sys.stderr.isatty():
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            bars = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                                TransferSpeedColumn(), transient=True))
            progress = _RichPullProgress(bars)

        async def run():
            from pycfs.host.helperclient import HelperClient

            async with HelperClient(storage.primary.root, storage.primary.driver, policy=args.helper) as helper:
                return await pull_image(repo, storage, name, tag, verify_diffid=args.verify_diffid,
                                        helper=helper if helper.enabled else None, progress=progress)

        result = trio.run(run)
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"manifest {result.manifest_digest}")
    print(f"config   {result.config_digest}")
    print(f"verity   {repo.alg}:{result.config_stream.hex()}")
    print(f"tagged   {result.tag}")
    print(f"objects  {result.stats.summary()}")
    print(f"took     {result.seconds:.2f}s", file=sys.stderr)
    return 0


def cmd_pull_any(args: argparse.Namespace) -> int:
    if args.image.startswith(CSTORAGE_TRANSPORT + ":"):
        return cmd_pull_cstorage(args)
    if args.json:
        tag = args.name or args.image
        check_tag(tag)
        transport, _, source = args.image.partition(":")
        if transport not in PULL_TRANSPORTS:
            return cmd_pull(args)  # its error message lists the transports
        with open_repo(args) as repo:
            r = trio.run(PULL_TRANSPORTS[transport], repo, source, tag)
        print_json({"tag": r.tag, "manifest": r.manifest_digest, "config": r.config_digest,
                    "config_verity": r.config_stream_id.hex(), "manifest_verity": r.manifest_stream_id.hex(),
                    "layers_imported": r.layers_imported, "layers_present": r.layers_present, "stats": r.stats})
        return 0
    return cmd_pull(args)


def _image_summary(repo: Repository, tag: str) -> dict:
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


def cmd_images(args: argparse.Namespace) -> int:
    with open_repo(args, writable=False) as repo:
        images = [_image_summary(repo, tag) for tag, _ in list_images(repo)]
    if args.json:
        print_json({"images": images})
        return 0
    if not images:
        print("no tagged images", file=sys.stderr)
        return 0
    width = max(len(i["tag"]) for i in images)
    print(f"{'TAG':<{width}}  {'MANIFEST':<19}  {'CONFIG':<19}  LAYERS  EROFS")
    for i in images:
        erofs = ",".join(n.removeprefix("composefs.") for n in i["images"]) or "-"
        print(f"{i['tag']:<{width}}  {i['manifest'][:19]}  {i['config'][:19]}  {i['layers']:>6}  {erofs}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_repo(args, writable=False) as repo:
        image = open_image(repo, args.image)
        if args.manifest or args.config:
            sys.stdout.buffer.write(image.manifest_raw if args.manifest else image.config_raw)
            sys.stdout.buffer.write(b"\n")
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


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


_register_base = register


def register(sub: argparse._SubParsersAction) -> None:
    _register_base(sub)
    osub = _subcommands(sub.choices["oci"])
    p = osub.choices["pull"]
    p.description += (" containers-storage:[[DRIVER@ROOT+RUNROOT]]REF imports from podman's local storage "
                      "(REF: name, short name, image ID or prefix, NAME@sha256:DIGEST), reflinking file "
                      "content.")
    p.add_argument("--storage-root", metavar="DIR",
                   help="containers-storage graphroot (default: from storage.conf, as podman)")
    p.add_argument("--verify-diffid", action="store_true",
                   help="re-hash each rebuilt layer tar and check it against its diff_id before committing")
    p.add_argument("--helper", choices=("auto", "always", "never"), default="auto",
                   help="user-namespace helper for files you cannot open: auto (start when needed), always, never")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_pull_any)

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
