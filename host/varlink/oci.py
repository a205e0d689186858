"""`org.composefs.Oci`: images of a repository handle, and the layer transport methods."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import parse_object
from pycfs.host.oci.image import IMAGE_REF_NAMES, compute_image_id, finish_pull, format_versions
from pycfs.host.oci.layer import LayerEntry, layer_stream_name
from pycfs.host.oci.streams import check_layer_count, parse_digest
from pycfs.host.oci.streams import list_images, open_image, tag_image, untag_image
from pycfs.host.repository import Repository
from pycfs.host.splitstream import StreamTooLarge
from pycfs.host.varlink import idl
from pycfs.host.varlink.layers import (
    FdLayout,
    MAX_FDS_PER_FRAME,
    build_layout,
    seed_from_id,
    split_frames,
)
from pycfs.host.varlink.server import CallContext, Interface, Result, Server
from pycfs.host.varlink.service import Handles, fsck_reply, identity, image_mount_fd
from pycfs.host.varlink.transfer import (
    DiffIdMismatch,
    LayerTransferError,
    check_directory_giver,
    Producer,
    batch_limiter,
    open_objects_dir,
    produce_repo_layer,
    log_producer_failure,
    put_layer,
    run_producer,
)
from pycfs.host.workers.fork import Forked
from pycfs.host.workers.pool import WorkerPool, open_pool
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.splitdirfdstream import SplitDirFdStreamError
from pycfs.protocol.text import shown
from pycfs.protocol.varlink import VarlinkError

IFACE = "org.composefs.Oci"
FEATURES = ["splitdirfdstream-v0"]
MAX_KEPT_ENTRIES = 500_000  # layer entries kept for FinalizeImage, in all: ~60 MB at most
CONFIG_MEDIA_TYPES = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
# Object workers forked before the event loop started (`pycfs.host.workers.fork`), for the
# repository at a path; the first pool of that repository takes them out of the list.
ForkedFor = tuple[str, list[Forked]]


def error(name: str, **parameters: Any) -> VarlinkError:
    return VarlinkError(f"{IFACE}.{name}", parameters)


def check_digest(text: str, what: str) -> str:
    try:
        parse_digest(text, what)
    except PycfsError as e:
        raise error("InvalidDigest", message=str(e)) from None
    return text


def is_container(manifest: dict) -> bool:
    config = manifest.get("config")
    media = config.get("mediaType") if isinstance(config, dict) else None
    return media is None or (isinstance(media, str) and media in CONFIG_MEDIA_TYPES)


def layer_ids_of(manifest: dict, config: dict) -> list[str]:
    """The layers of an image in order: the config's diff_ids for a container image, the
    manifest's layer digests for anything else (artifacts)."""
    if is_container(manifest):
        rootfs = config.get("rootfs")
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    else:
        layers = manifest.get("layers", [])
        ids = [layer.get("digest") for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise PycfsError("the image's layer list is malformed")
    check_layer_count(len(ids), "the image")
    return ids


def agreeing_layer_ids(manifest_raw: bytes, config_raw: bytes) -> tuple[dict, list[str]]:
    """The manifest parsed and the image's layers (`layer_ids_of`), once the manifest is
    seen to name this config (its digest and size) and, for a container image, as many
    layers as the config has diff_ids: a peer could otherwise have a config of its own
    stored under a genuine manifest's digest (whoever pins that digest would run it)."""
    manifest, config = parse_object(manifest_raw, "the manifest"), parse_object(config_raw, "the config")
    ids = layer_ids_of(manifest, config)
    desc = manifest.get("config")
    named = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(named, str):
        raise PycfsError("the manifest names no config digest")
    alg, _ = parse_digest(named, "config digest in the manifest")
    actual = f"{alg}:{hashlib.new(alg, config_raw).hexdigest()}"
    if actual != named or (isinstance(desc, dict) and desc.get("size", len(config_raw)) != len(config_raw)):
        raise PycfsError(f"the manifest names config {named}, but the config sent is {actual} "
                         f"({len(config_raw)} bytes): they are not one image")
    if is_container(manifest):
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) != len(ids):
            raise PycfsError(f"the manifest lists {len(layers) if isinstance(layers, list) else 'no'} layers and the "
                             f"config {len(ids)} diff_ids: they are not one image")
    return manifest, ids


class _Pools:
    """One object-worker pool per repository (not per handle: a client may open one
    repository many times), shared by its PutLayers (several may run at once): starting a
    worker costs CPU (~0.07 s with compiled bytecode, 0.3 s without), once per layer before.
    Workers start with the first object stored and stop when the repository's last handle
    closes, or before a Gc of it (each holds a shared flock of the repository); workers
    forked for a repository before the event loop started (`oci copy`'s destination) are the
    first pool of that repository (their owner stops those no pool took)."""

    def __init__(self, nursery: trio.Nursery, handles: Handles, forked: ForkedFor | None = None) -> None:
        self.nursery = nursery
        self.handles = handles
        # repository identity -> (pool, its batch limiter, set to stop it, set once it stopped)
        self.pools: dict[tuple[int, int], tuple[WorkerPool, trio.CapacityLimiter, trio.Event, trio.Event]] = {}
        handles.on_close.append(self.close)
        handles.before_gc.append(self.stop)
        self.forked = forked
        self._making = trio.Lock()

    def _take_forked(self, repo: Repository) -> list[Forked]:
        """The forked workers for this repository, no longer in the caller's list (a pool's now)."""
        if self.forked is None or os.path.abspath(self.forked[0]) != os.path.abspath(repo.path):
            return []
        workers = list(self.forked[1])
        self.forked[1].clear()
        return workers

    async def get(self, repo: Repository) -> tuple[WorkerPool, trio.CapacityLimiter]:
        # Made once: the first PutLayers of `oci copy`'s lanes come at once, and a second pool
        # made beside the first (then stopped) could have been the one that took the forked
        # workers, leaving the other to spawn its own.
        key = identity(repo)
        async with self._making:
            if key not in self.pools:
                stop, stopped = trio.Event(), trio.Event()
                pool = await self.nursery.start(self._hold, repo, stop, stopped, self._take_forked(repo))
                self.pools[key] = (pool, batch_limiter(pool), stop, stopped)
        pool, limiter, _, _ = self.pools[key]
        return pool, limiter

    def retire(self, repo: Repository) -> trio.Event | None:
        """Stop the repository's pool (the next call starts another)."""
        entry = self.pools.pop(identity(repo), None)
        if entry is None:
            return None
        entry[2].set()
        return entry[3]

    async def stop(self, repo: Repository) -> None:
        """The repository's pool stopped (the next call starts another)."""
        stopped = self.retire(repo)
        if stopped is not None:
            await stopped.wait()

    async def close(self, handle: int) -> None:
        repo = self.handles.repos.get(handle)
        if repo is None or self.handles.shared(repo):
            return  # another handle of the repository may still store objects
        await self.stop(repo)

    @staticmethod
    async def _hold(repo: Repository, stop: trio.Event, stopped: trio.Event, forked: Sequence[Forked],
                    task_status: trio.TaskStatus[WorkerPool]) -> None:
        try:
            async with open_pool(repo=repo, jobs=len(forked) or None, forked=forked) as pool:
                task_status.started(pool)
                await stop.wait()
        except (PycfsError, OSError) as e:  # a failed pool fails its calls; the service goes on
            print(f"pycfs varlink: object workers: {e}", file=sys.stderr)
        finally:
            stopped.set()


class _LayerEntries:
    """The entries of the layers PutLayer stored, per handle, parsed while each was written:
    FinalizeImage builds the image from them instead of reading the streams back (about
    half of its time on the bench image). At most MAX_KEPT_ENTRIES in all handles (a client
    may put layers and never finalize), the oldest layers dropped first; gone with the handle."""

    def __init__(self, handles: Handles) -> None:
        self.kept: dict[tuple[int, bytes], list[LayerEntry]] = {}  # (handle, layer id), oldest first
        self.total = 0
        handles.on_close.append(self.close)

    def _drop(self, key: tuple[int, bytes]) -> list[LayerEntry] | None:
        entries = self.kept.pop(key, None)
        if entries is not None:
            self.total -= len(entries)
        return entries

    def keep(self, handle: int, layer_id: bytes, entries: list[LayerEntry]) -> None:
        self._drop((handle, layer_id))
        self.kept[(handle, layer_id)] = entries
        self.total += len(entries)
        while self.total > MAX_KEPT_ENTRIES:
            self._drop(next(iter(self.kept)))

    def take(self, handle: int, layer_ids: list[bytes]) -> dict[bytes, list[LayerEntry]]:
        """The entries kept for these layers, no longer kept (an image build consumes them)."""
        return {i: e for i in layer_ids if (e := self._drop((handle, i))) is not None}

    async def close(self, handle: int) -> None:
        for key in [k for k in self.kept if k[0] == handle]:
            self._drop(key)


class OciInterface:
    def __init__(self, server: Server, handles: Handles, forked: ForkedFor | None = None,
                 producer_failed: Callable[[Exception], None] = log_producer_failure) -> None:
        self.server = server
        self.producer_failed = producer_failed
        self.handles = handles
        self.pools = _Pools(server.nursery, handles, forked)
        self.entries = _LayerEntries(handles)
        server.add(Interface(IFACE, idl.OCI, {
            "GetInfo": self.get_info,
            "ListImages": self.list_images,
            "Check": self.check,
            "Inspect": self.inspect,
            "Tag": self.tag,
            "Untag": self.untag,
            "ComputeId": self.compute_id,
            "Pull": self.pull,
            "HasLayer": self.has_layer,
            "GetLayer": self.get_layer,
            "PutLayer": self.put_layer,
            "FinalizeImage": self.finalize_image,
            "OciMount": self.oci_mount,
        }))

    def using(self, ctx: CallContext) -> AbstractAsyncContextManager[Repository]:
        """The handle's repository, held shared for the call (see `service.Handles.hold`)."""
        return self.handles.using(ctx, IFACE)

    async def get_info(self, ctx: CallContext) -> Result:
        return {"features": FEATURES}

    # -- images --

    async def list_images(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            wanted = ctx.params.string("filter", optional=True)

            def entries() -> list[dict]:
                out = []
                for tag, digest in list_images(repo):
                    if wanted is not None and wanted not in tag:
                        continue
                    try:
                        image = open_image(repo, tag)
                    except PycfsError as e:
                        # (the others are listed: ImageEntry has no field to say this one is broken)
                        print(f"pycfs varlink: ListImages: image {shown(tag)} left out, it is broken ({e}): "
                              "`pycfs fsck --repair` removes what is damaged", file=sys.stderr)
                        continue
                    manifest, config = image.manifest, image.config
                    out.append({
                        "name": tag, "manifest_digest": digest, "is_container": is_container(manifest),
                        "architecture": str(config.get("architecture") or ""), "os": str(config.get("os") or ""),
                        "created": config.get("created") if isinstance(config.get("created"), str) else None,
                        "layer_count": len(layers) if isinstance(layers := manifest.get("layers"), list) else 0,
                        "referrer_count": 0,
                    })
                return out

            return {"images": await trio.to_thread.run_sync(entries)}

    def _open(self, repo: Repository, image: str) -> Any:
        try:
            return open_image(repo, image)
        except PycfsError:
            if image.startswith("@") or _tag_exists(repo, image):
                raise
            raise error("NoSuchImage", image=image) from None

    async def check(self, ctx: CallContext) -> Result:
        from pycfs.host.fsck import fsck

        async with self.using(ctx) as repo:
            image = ctx.params.string("image", optional=True)
            names = [image] if image is not None else [t for t, _ in list_images(repo)]
            if image is not None:
                self._open(repo, image)

            def check_one(name: str) -> list[str]:
                try:
                    stored = open_image(repo, name)
                    problems = []
                    for diff_id in layer_ids_of(stored.manifest, stored.config):
                        layer = stored.layer_ids.get(diff_id) or repo.has_stream(layer_stream_name(diff_id))
                        if layer is None or not repo.has_object(layer):
                            problems.append(f"{name}: layer {diff_id} is missing")
                            continue
                        reader = repo.open_stream_by_id(layer)
                        problems += [f"{name}: layer {diff_id}: object {o.hex()} is missing"
                                     for o in reader.object_refs if not repo.has_object(o)]
                    for ref, object_id in stored.image_refs.items():
                        if not repo.has_object(object_id):
                            problems.append(f"{name}: {ref} image {object_id.hex()} is missing")
                    return problems
                except PycfsError as e:
                    return [f"{name}: {e}"]

            def run() -> tuple[list[list[str]], dict]:
                return [check_one(n) for n in names], fsck_reply(repo, fsck(repo))

            results, repo_reply = await trio.to_thread.run_sync(run)
            errors = [e for r in results for e in r]
            return {"ok": not errors and repo_reply["ok"], "images_checked": len(names),
                    "images_corrupted": sum(bool(r) for r in results), "errors": errors, "repo": repo_reply}

    async def inspect(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            image = self._open(repo, ctx.params.string("image"))
            erofs = None
            for version in format_versions(repo):
                ref = IMAGE_REF_NAMES.get(version)
                if ref in image.image_refs:
                    erofs = image.image_refs[ref].hex()
                    break
            try:
                manifest, config = image.manifest_raw.decode(), image.config_raw.decode()
            except UnicodeDecodeError:
                raise error("InternalError", message=f"the manifest or config of {image.manifest_digest} is not UTF-8: "
                            "varlink strings cannot carry it") from None
            return {"manifest": manifest, "config": config, "referrers": [],
                    "composefs_erofs": erofs, "composefs_boot_erofs": None}

    async def tag(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            digest, name = ctx.params.string("manifest_digest"), ctx.params.string("name")
            parse_digest(digest, "manifest digest")
            await trio.to_thread.run_sync(tag_image, repo, name, digest)
            return {}

    async def untag(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            await trio.to_thread.run_sync(untag_image, repo, ctx.params.string("name"))
            return {}

    async def compute_id(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            image = ctx.params.string("image")
            if ctx.params.boolean("bootable", optional=True, default=False):
                raise error("InvalidRequest", message="bootable images are not supported by pycfs")
            if ctx.params.string("xattrs", optional=True, default="AllowlistOnly") != "AllowlistOnly":
                raise error("InvalidRequest", message="only AllowlistOnly xattr filtering is supported")
            self._open(repo, image)
            image_id = await trio.to_thread.run_sync(compute_image_id, repo, image)
            return {"image_id": image_id.hex()}

    async def pull(self, ctx: CallContext) -> Result:
        from pycfs.host.varlink.pull import pull_frames

        async with self.using(ctx) as repo:
            if ctx.params.boolean("bootable", optional=True, default=False):
                raise error("InvalidRequest", message="bootable images are not supported by pycfs")
            if ctx.params.string("expected_digest", optional=True) is not None:
                raise error("InvalidRequest", message="expected_digest requires bootable")
            return await pull_frames(ctx, repo)

    async def oci_mount(self, ctx: CallContext) -> Result:
        from pycfs.host.mount import resolve_image

        async with self.using(ctx) as repo:
            image = ctx.params.string("image")
            if ctx.params.boolean("bootable", optional=True, default=False):
                raise error("InvalidRequest", message="bootable images are not supported by pycfs")
            # a bare manifest digest, as cfsctl takes it, or a tag
            name = "@" + image if image.startswith("sha256:") else image
            self._open(repo, name)
            try:
                image_id = await trio.to_thread.run_sync(resolve_image, repo, name)
            except PycfsError as e:
                raise error("InternalError", message=str(e)) from None
            return await image_mount_fd(ctx, repo, image_id, lambda message: error("InvalidRequest", message=message))

    # -- layers --

    async def has_layer(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            diff_id = check_digest(ctx.params.string("diff_id"), "diff_id")
            layer = repo.has_stream(layer_stream_name(diff_id))
            if layer is not None and not repo.stream_verified(layer):
                layer = None  # its tar was never checked against the diff_id: a PutLayer (checked) replaces it
            if layer is not None:  # the client skips its PutLayer: a Gc must leave it to FinalizeImage
                self.handles.keep_layer(ctx.params.integer("handle"), layer)
            return {"present": layer is not None, "layer_verity": layer.hex() if layer is not None else None}

    async def get_layer(self, ctx: CallContext) -> Result:
        # held until the client lets go of the objects (the producer's release), not just the call
        repo, release = await self.handles.hold(ctx, IFACE)
        try:
            params = ctx.params.obj("params")
            assert params is not None
            diff_id = params.string("diff_id", optional=True)
            if diff_id is None:
                raise error("InvalidRequest", message="params.diff_id is required by a repository service")
            check_digest(diff_id, "diff_id")
            name = layer_stream_name(diff_id)
            layer_id = repo.has_stream(name)
            if layer_id is None:
                raise error("NoSuchLayer", diff_id=diff_id)
            seed = seed_from_id(name)
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                objects = open_objects_dir(repo)
            except BaseException:
                close_fds([r, w])
                raise
            try:
                layout = build_layout(r, [objects], seed)
            except BaseException:
                os.close(w)
                raise
        except BaseException:
            release()
            raise
        return await send_layer_frames(ctx, layout, seed, w,
                                       lambda send_all: produce_repo_layer(repo, layer_id, layout.real_slots[0], send_all),
                                       release=release, failed=self.producer_failed)

    async def put_layer(self, ctx: CallContext) -> Result:
        if len(ctx.fds) < 2:
            raise error("InvalidRequest", message=f"expected at least 2 fds (1 pipe + >=1 dir fd), got {len(ctx.fds)}")
        diff_id = check_digest(ctx.params.string("diff_id"), "diff_id")
        async with self.using(ctx) as repo:
            zerocopy = ctx.params.boolean("zerocopy", optional=True, default=False)
            if not diff_id.startswith("sha256:"):
                raise error("InternalError", message=f"PutLayer verifies sha256 diff_ids only, not {diff_id.split(':')[0]}")
            if (not stat.S_ISFIFO(os.fstat(ctx.fds[0]).st_mode)
                    or fcntl.fcntl(ctx.fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY):
                raise error("InvalidRequest", message="fd 0 of PutLayer must be the read end of a pipe")
            handle = ctx.params.integer("handle")
            try:
                check_directory_giver(ctx.conn.peer_uid(), "the PutLayer client")
            except LayerTransferError as e:
                raise VarlinkError("org.varlink.service.PermissionDenied", {"message": str(e)}) from None
            pool, limiter = await self.pools.get(repo)
            fds = ctx.take_fds()
            pipe, dirfds = fds[0], fds[1:]
            already = repo.has_stream(layer_stream_name(diff_id)) is not None
            try:
                put = await put_layer(repo, pool, pipe, dirfds, diff_id, zerocopy, limiter)
            except DiffIdMismatch as e:
                raise error("DiffIdMismatch", expected=e.expected, actual=e.actual) from None
            except (SplitDirFdStreamError, LayerTransferError, StreamTooLarge) as e:
                raise error("InvalidRequest", message=str(e)) from None
            except PycfsError:
                self.pools.retire(repo)  # perhaps a worker died: the next call starts new ones
                raise
            finally:
                close_fds(dirfds)
            layer_id, stats = put.layer_id, put.stats
            self.handles.keep_layer(handle, layer_id)
            if put.entries is not None:
                self.entries.keep(handle, layer_id, put.entries)
            return {"layer_verity": layer_id.hex(), "already_present": already,
                    "objects_reflinked": stats.objects_reflinked, "objects_hardlinked": stats.objects_hardlinked,
                    "objects_copied": stats.objects_copied, "objects_already_present": stats.objects_already_present}

    async def finalize_image(self, ctx: CallContext) -> Result:
        async with self.using(ctx) as repo:
            manifest_raw = ctx.params.string("manifest_json").encode()
            config_raw = ctx.params.string("config_json").encode()
            name = ctx.params.string("name", optional=True)
            refs: list[tuple[str, bytes]] = []
            for item in ctx.params.obj_list("layers"):
                diff_id = check_digest(item.string("diff_id"), "diff_id")
                verity = item.string("layer_verity")
                try:
                    layer_id = repo.id_from_hex(verity)
                except PycfsError as e:
                    raise error("InvalidDigest", message=str(e)) from None
                if repo.has_stream(layer_stream_name(diff_id)) != layer_id:
                    raise error("NoSuchLayer", diff_id=diff_id)
                refs.append((diff_id, layer_id))
            try:
                manifest, wanted = agreeing_layer_ids(manifest_raw, config_raw)
            except PycfsError as e:
                raise error("InvalidRequest", message=str(e)) from None
            if wanted != [d for d, _ in refs]:
                raise error("InvalidRequest", message="layers do not match the image's layer list")
            manifest_digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
            config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()

            parsed = self.entries.take(ctx.params.integer("handle"), [layer_id for _, layer_id in refs])
            finished = await trio.to_thread.run_sync(functools.partial(
                finish_pull, repo, manifest_digest, manifest_raw, config_digest, config_raw, refs, name,
                build_image=is_container(manifest), parsed=parsed))
            self.handles.layers_used(ctx.params.integer("handle"), [layer_id for _, layer_id in refs])
            manifest_id, config_id = finished.manifest_stream_id, finished.config_stream_id
            return {"manifest_digest": manifest_digest, "manifest_verity": manifest_id.hex(),
                    "config_digest": config_digest, "config_verity": config_id.hex()}


def _tag_exists(repo: Repository, tag: str) -> bool:
    from pycfs.host.oci.streams import resolve_tag

    try:
        return resolve_tag(repo, tag) is not None
    except PycfsError:
        return False


async def send_layer_frames(ctx: CallContext, layout: FdLayout, seed: int, pipe_w: int, produce: Producer,
                            release: Callable[[], None] | None = None,
                            failed: Callable[[Exception], None] = log_producer_failure) -> Result:
    """Reply to GetLayer with the layout's fds (in frames with `more`), and start the
    producer in the service's nursery: it outlives the call, feeding a pipe the client took
    (``failed``: see `run_producer`)."""
    keep_r = layout.keepalive_read
    try:
        if ctx.more:
            frames = split_frames(layout.fds, seed)
        elif len(layout.fds) > MAX_FDS_PER_FRAME:
            raise error("FdLimitExceeded", fd_count=len(layout.fds), max_per_frame=MAX_FDS_PER_FRAME)
        else:
            frames = [layout.fds]
        # (raises once the service is stopping: nothing is handed out then)
        ctx.server.nursery.start_soon(run_producer, pipe_w, keep_r, produce, release, failed)
    except BaseException:
        close_fds(layout.fds + [keep_r, pipe_w])
        if release is not None:
            release()
        raise
    sent = 0
    try:
        params = {"dir_count": layout.dir_count}
        for frame in frames[:-1]:
            await ctx.send_continues(params, frame)
            close_fds(frame)
            sent += 1
    except BaseException:
        close_fds([fd for frame in frames[sent:] for fd in frame])
        raise
    return params, frames[-1]

