"""`oci copy`: an image from one composefs repository to another over the varlink layer API.

Both ends are varlink services: a repository path gets an in-process service on a
socketpair, `unix:PATH` is a running one (`pycfs varlink serve`). Per layer the
destination is asked first (HasLayer); a missing layer moves as GetLayer (source) ->
PutLayer (destination): the bytes flow through a pipe from the source's producer to the
destination, the client only relays fds, and the destination reflinks file content
straight from the source's objects/. FinalizeImage then stores the exact manifest and
config, builds the composefs image and tags it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.streams import check_layer_count, parse_digest
from pycfs.host.varlink.client import Client
from pycfs.host.varlink.layers import MAX_DIR_COUNT, MAX_LIFETIME_FDS
from pycfs.host.varlink.oci import ForkedFor, agreeing_layer_ids
from pycfs.host.varlink.serve import open_service
from pycfs.host.varlink.transfer import check_directory_giver, log_producer_failure
from pycfs.host.varlink.transport import ConnectionClosed, connect, socketpair
from pycfs.host.workers.fork import Forked, fork_workers
from pycfs.host.workers.batching import default_jobs
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.text import clipped
from pycfs.protocol.varlink import VarlinkError, VarlinkProtocolError

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."


class LayerRefused(PycfsError):
    """A layer the copy refused: the message names it and the source."""


class CopyProgress(Protocol):
    def layer_started(self, diff_id: str) -> None: ...
    def layer_done(self, diff_id: str, already_present: bool) -> None: ...


@dataclass
class CopyResult:
    manifest_digest: str
    manifest_verity: str
    config_digest: str
    config_verity: str
    layers: list[dict] = field(default_factory=list)  # diff_id, layer_verity, copied
    objects_reflinked: int = 0
    objects_hardlinked: int = 0
    objects_copied: int = 0
    objects_already_present: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__, seconds=round(self.seconds, 3))


@dataclass
class Endpoint:
    client: Client
    handle: int
    algorithm: str
    # Another connection to the same service (handles are service-wide: the same handle
    # works on it), for layers moved side by side; None: this one connection only.
    new_client: Callable[[], Awaitable[Client]] | None = None
    name: str = "the source"  # the service, for messages


    @asynccontextmanager
    async def lane(self, first: bool) -> AsyncIterator[Endpoint]:
        """This endpoint (`first`), else the same repository on a connection of its own."""
        if first or self.new_client is None:
            yield self
            return
        client = await self.new_client()
        try:
            yield Endpoint(client, self.handle, self.algorithm, name=self.name)
        finally:
            client.close()


async def _in_process_service(forked: ForkedFor | None, producer_failed: Callable[[Exception], None],
                              task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    async with open_service(forked, producer_failed) as server:
        task_status.started(server)
        await trio.sleep_forever()


@asynccontextmanager
async def open_endpoint(address: str | None, repo: str, forked: list[Forked] | None = None,
                        producer_failed: Callable[[Exception], None] = log_producer_failure) -> AsyncIterator[Endpoint]:
    """Repository `repo` behind the service at `unix:PATH`, or (address None) behind an
    in-process service on a socketpair: the same varlink and SCM_RIGHTS path either way
    (``forked``: object workers forked for `repo`, which its first PutLayer takes;
    ``producer_failed``: hears why an in-process GetLayer's stream ended short)."""
    async with open_nursery() as nursery:
        if address is not None:
            async def new_client() -> Client:
                return Client(await connect(address))
        else:
            service = await nursery.start(_in_process_service, (repo, forked) if forked else None, producer_failed)

            async def new_client() -> Client:
                conn, server_sock = socketpair()
                nursery.start_soon(service.serve_connection, server_sock)
                return Client(conn)
        client = await new_client()
        try:
            reply = await client.call(REPO + "OpenRepository", {"path": repo})
            yield Endpoint(client, _field(reply.parameters, "handle", int, "OpenRepository"),
                           _algorithm(reply.parameters), new_client, repo)
        finally:
            client.close()
            nursery.cancel_scope.cancel()


async def copy_layer(src: Endpoint, dst: Endpoint, diff_id: str, zerocopy: bool,
                     storage: dict | None = None) -> dict:
    """GetLayer on the source, PutLayer on the destination; the lifetime fds are held
    until PutLayer returns (the source keeps its directories usable until then). The reply
    may carry what the transport needs, no more: the pipe, dir_count directory slots (at
    most MAX_DIR_COUNT) and MAX_LIFETIME_FDS lifetime fds, in as many frames at most (a
    source sending frames for ever, each with fds, ran the client out of fds)."""
    fds: list[int] = []
    dir_count = None
    frames = 0

    def bad(what: str) -> LayerRefused:
        return LayerRefused(f"layer {diff_id} from {src.name}: {what}; the service is broken or hostile: "
                            "nothing of that layer was committed")

    try:
        try:
            async for reply in src.client.call_more(OCI + "GetLayer", {
                "handle": src.handle, "params": {"diff_id": diff_id, "storage": storage,
                                                 "consumer_has_cap_dac_override": os.geteuid() == 0}}):
                fds += reply.fds
                frames += 1
                count = reply.parameters.get("dir_count")
                if type(count) is not int or not 1 <= count <= MAX_DIR_COUNT or dir_count not in (None, count):
                    raise bad(f"a bad dir_count {count!r:.40} (at most {MAX_DIR_COUNT}, the same in every frame)")
                dir_count = count
                most = 1 + dir_count + MAX_LIFETIME_FDS
                if len(fds) > most or frames > most:
                    raise bad(f"{frames} GetLayer frames with {len(fds)} fds where dir_count {dir_count} needs "
                              f"at most {most} of either")
        except (VarlinkProtocolError, ConnectionClosed) as e:
            raise bad(str(e)) from None
        assert dir_count is not None
        if len(fds) < dir_count + 2:
            raise PycfsError(f"source sent {len(fds)} fds for layer {diff_id}, need at least {dir_count + 2}")
        try:
            reply = await dst.client.call(OCI + "PutLayer", {"handle": dst.handle, "diff_id": diff_id,
                                                             "zerocopy": zerocopy}, fds[: 1 + dir_count])
        except VarlinkError as e:
            message = e.parameters.get("message")
            if e.name != OCI + "InvalidRequest" or not isinstance(message, str):
                raise
            # the destination refused what the source sent (its words say why)
            raise LayerRefused(f"layer {diff_id} from {src.name}: {clipped(message, 400)}") from None
        return reply.parameters
    finally:
        close_fds(fds)


async def copy_image(src: Endpoint, dst: Endpoint, image: str, name: str | None, zerocopy: bool,
                     progress: CopyProgress | None = None) -> CopyResult:
    started = time.monotonic()
    if zerocopy and src.algorithm != dst.algorithm:
        raise PycfsError(f"--zerocopy requires matching hash algorithms; source uses {src.algorithm} but "
                         f"destination uses {dst.algorithm} (copy without --zerocopy: objects are re-digested)")
    inspected = (await src.client.call(OCI + "Inspect", {"handle": src.handle, "image": image})).parameters
    manifest_json, config_json = inspected.get("manifest"), inspected.get("config")
    if not isinstance(manifest_json, str) or not isinstance(config_json, str) or not manifest_json or not config_json:
        raise PycfsError(f"source returned no manifest/config for {image!r}")
    if image.startswith("@"):  # asked for by digest: what came must be that manifest
        alg, _ = parse_digest(image[1:], "image digest")
        sent = f"{alg}:{hashlib.new(alg, manifest_json.encode()).hexdigest()}"
        if sent != image[1:]:
            raise PycfsError(f"the source sent manifest {sent} for {image!r}: it is not the image asked for "
                             "(the source is damaged or not to be trusted)")
    try:
        _, layer_ids = agreeing_layer_ids(manifest_json.encode(), config_json.encode())
    except PycfsError as e:
        raise PycfsError(f"source image {image!r}: {e}") from None
    return await _copy_layers(src, dst, manifest_json, config_json, [(d, None) for d in layer_ids], name, zerocopy,
                              progress, started)


async def _copy_layers(src: Endpoint, dst: Endpoint, manifest_json: str, config_json: str,
                       layers: Sequence[tuple[str, dict | None]], name: str | None, zerocopy: bool,
                       progress: CopyProgress | None, started: float) -> CopyResult:
    """Each (diff_id, storage locator) not in the destination moves, up to `layers_at_once`
    side by side (the end of one layer, when the workers wait for its last files to be
    hashed, overlaps the start of the next); then FinalizeImage."""
    totals = {"objects_reflinked": 0, "objects_hardlinked": 0, "objects_copied": 0, "objects_already_present": 0}
    done: list[dict] = []
    # diff_id -> (the positions it fills, its storage locator): an image may name one layer
    # twice, and it moves once
    missing: dict[str, tuple[list[int], dict | None]] = {}
    for index, (diff_id, storage) in enumerate(layers):
        done.append({"diff_id": diff_id, "layer_verity": None, "copied": False})
        if diff_id in missing:
            missing[diff_id][0].append(index)
            continue
        has = (await dst.client.call(OCI + "HasLayer", {"handle": dst.handle, "diff_id": diff_id})).parameters
        done[index]["layer_verity"] = has.get("layer_verity")
        if has.get("present"):
            if progress is not None:
                progress.layer_started(diff_id)
                progress.layer_done(diff_id, True)
        else:
            missing[diff_id] = ([index], storage)

    async def lane(first: bool, queue: trio.MemoryReceiveChannel[tuple[str, list[int], dict | None]]) -> None:
        async with src.lane(first) as lane_src, dst.lane(first) as lane_dst:
            async for diff_id, indices, storage in queue:
                if progress is not None:
                    progress.layer_started(diff_id)
                put = await copy_layer(lane_src, lane_dst, diff_id, zerocopy, storage)
                for key in totals:
                    totals[key] += _field(put, key, int, "PutLayer") if put.get(key) is not None else 0
                verity = _field(put, "layer_verity", str, "PutLayer")
                for index in indices:
                    done[index] = {"diff_id": diff_id, "layer_verity": verity, "copied": True}
                if progress is not None:
                    progress.layer_done(diff_id, False)

    send, receive = trio.open_memory_channel[tuple[str, list[int], dict | None]](len(missing))
    async with send:
        for diff_id, (indices, storage) in missing.items():
            send.send_nowait((diff_id, indices, storage))
    async with receive, open_nursery() as nursery:
        for i in range(min(layers_at_once(), len(missing))):
            nursery.start_soon(lane, i == 0, receive.clone())
    final = (await dst.client.call(OCI + "FinalizeImage", {
        "handle": dst.handle, "manifest_json": manifest_json, "config_json": config_json,
        "layers": [{"diff_id": entry["diff_id"], "layer_verity": entry["layer_verity"]} for entry in done],
        "name": name})).parameters
    manifest_digest, manifest_verity, config_digest, config_verity = (
        _field(final, key, str, "FinalizeImage")
        for key in ("manifest_digest", "manifest_verity", "config_digest", "config_verity"))
    return CopyResult(manifest_digest, manifest_verity, config_digest, config_verity, done, **totals,
                      seconds=time.monotonic() - started)


def _field(parameters: dict, name: str, kind: type, method: str, optional: bool = False) -> Any:
    """A reply's field of the given JSON type (a peer's answer, so checked); ``optional``:
    null or absent is None."""
    value = parameters.get(name)
    if type(value) is not kind and not (optional and value is None):
        raise PycfsError(f"the varlink service answered {method} without a valid {name!r} (got {value!r:.80})")
    return value


def _algorithm(opened: dict) -> str:
    """OpenRepository's hash_algorithm ("": not said)."""
    return _field(opened, "hash_algorithm", str, "OpenRepository", optional=True) or ""


def fork_destination_workers(destination: str) -> list[Forked]:
    """The destination's object workers, forked now, before trio starts (see
    `pycfs.host.workers.fork`): a copy that moves a layer needs them, and a spawned one
    spends ~0.07 s of CPU starting Python and importing what the host has loaded."""
    return fork_workers(destination, default_jobs())


def layers_at_once() -> int:
    """Layers moved side by side: one per core (the object workers' policy, see
    `default_jobs`); their files share the destination's one pool of workers."""
    return default_jobs()


async def copy_from_containers_storage(src: Endpoint, dst: Endpoint, image: str, storage_root: str | None,
                                       name: str | None, zerocopy: bool, progress: CopyProgress | None) -> CopyResult:
    """The image's manifest, config and layer list come from containers-storage, read here
    (as podman finds it); only file content comes through the layer service."""
    from pycfs.host.oci.cstorage import read_image
    from pycfs.host.storage.config import load_storage_config
    from pycfs.host.storage.locks import ReadLocks
    from pycfs.host.storage.store import Storage

    started = time.monotonic()
    storage = Storage.from_config(load_storage_config(storage_root))
    locks = ReadLocks([(p, s.read_only) for s in storage.stores for p in s.lock_paths()])
    await locks.acquire()
    try:
        source = await trio.to_thread.run_sync(read_image, storage, image.removeprefix("containers-storage:"))
    finally:
        locks.release()
    check_layer_count(len(source.layers), f"the config of {image!r} in containers-storage")
    try:
        manifest_json, config_json = source.manifest.decode(), source.config.decode()
    except UnicodeDecodeError:
        raise PycfsError(f"the manifest or config of {image!r} is not UTF-8: varlink cannot carry it") from None
    layers = [(layer.diff_id, {"storage_path": str(layer.store.root), "layer_id": layer.layer.id})
              for layer in source.layers]
    return await _copy_layers(src, dst, manifest_json, config_json, layers, name, zerocopy, progress, started)


async def copy(source: str, source_repo: str | None, destination: str, image: str, name: str | None,
               zerocopy: bool, progress: CopyProgress | None = None, storage_root: str | None = None,
               forked: list[Forked] | None = None) -> CopyResult:
    """Copy `image` into the repository at `destination` from `source`: a repository path,
    or `unix:PATH` of a service (a repository service holding `source_repo`, or a
    containers-storage layer service, which `storage_root` or storage.conf locates).
    ``forked``: object workers forked for `destination` (`fork_destination_workers`), taken
    out of the list by the pool that stores its objects; the caller discards what is left."""
    # Why a layer of an in-process source ended short (an object missing, unreadable): the
    # cause to name, where PutLayer can only see a stream of the wrong digest.
    short: list[Exception] = []
    try:
        if not source.startswith("unix:"):
            async with open_endpoint(None, source, producer_failed=short.append) as src, \
                    open_endpoint(None, destination, forked) as dst:
                return await copy_image(src, dst, image, name, zerocopy, progress)
        async def new_client() -> Client:
            conn = await connect(source)
            try:
                # its directories are opened here, with this process's rights
                check_directory_giver(conn.peer_uid(), f"the service at {source}")
            except BaseException:
                conn.close()
                raise
            return Client(conn, timed=True)

        client = await new_client()
        try:
            features = (await client.call(OCI + "GetInfo")).parameters.get("features") or []
            if not isinstance(features, list) or "splitdirfdstream-v0" not in features:
                raise PycfsError(f"{source} does not offer the splitdirfdstream-v0 layer transport")
            async with open_endpoint(None, destination, forked) as dst:
                if "source-containers-storage" in features:
                    return await copy_from_containers_storage(Endpoint(client, 0, dst.algorithm, new_client, source), dst, image,
                                                              storage_root, name, zerocopy, progress)
                if source_repo is None:
                    raise PycfsError(f"--from {source}: name the repository as the service sees it with --from-repo PATH")
                reply = await client.call(REPO + "OpenRepository", {"path": source_repo})
                src = Endpoint(client, _field(reply.parameters, "handle", int, "OpenRepository"),
                               _algorithm(reply.parameters), new_client, source)
                return await copy_image(src, dst, image, name, zerocopy, progress)
        finally:
            client.close()
    except LayerRefused as e:
        raise PycfsError(f"oci copy {image}: {e}") from None
    except VarlinkError as e:
        if short:
            layer = f" layer {clipped(str(e.parameters.get('expected')), 80)}" if e.name == OCI + "DiffIdMismatch" else ""
            raise PycfsError(f"oci copy {image}:{layer} from {source}: {short[0]}: the source is damaged; that layer "
                             "was not committed and no image was tagged (check the source with `pycfs fsck`)") from None
        if e.name == OCI + "NoSuchImage":
            raise PycfsError(f"no image {image!r} in {source_repo or source} (see `pycfs oci images` there)") from None
        if e.name == OCI + "DiffIdMismatch":
            expected, actual = (clipped(str(e.parameters.get(k)), 80) for k in ("expected", "actual"))
            raise PycfsError(f"oci copy {image}: layer {expected} from {source_repo or source} came as {actual}: the "
                             "source is damaged or changed during the copy; that layer was not committed and no image "
                             "was tagged (check the source with `pycfs fsck --verify-layers`)") from None
        message = e.parameters.get("message")  # the service's own words, else the error's name and fields
        raise PycfsError(f"oci copy {image}: {clipped(message if isinstance(message, str) and message else str(e))}") from None
