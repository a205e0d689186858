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

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.nursery import open_nursery
from pycfs.host.varlink.client import Client
from pycfs.host.varlink.oci import layer_ids_of
from pycfs.host.varlink.serve import open_service
from pycfs.host.varlink.transport import connect, socketpair
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.varlink import VarlinkError

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."


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


async def _in_process_service(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    async with open_service() as server:
        task_status.started(server)
        await trio.sleep_forever()


@asynccontextmanager
async def open_endpoint(address: str | None, repo: str) -> AsyncIterator[Endpoint]:
    """Repository `repo` behind the service at `unix:PATH`, or (address None) behind an
    in-process service on a socketpair: the same varlink and SCM_RIGHTS path either way."""
    async with open_nursery() as nursery:
        if address is not None:
            conn = await connect(address)
        else:
            service = await nursery.start(_in_process_service)
            conn, server_sock = socketpair()
            nursery.start_soon(service.serve_connection, server_sock)
        client = Client(conn)
        try:
            reply = await client.call(REPO + "OpenRepository", {"path": repo})
            yield Endpoint(client, reply.parameters["handle"], reply.parameters.get("hash_algorithm") or "")
        finally:
            client.close()
            nursery.cancel_scope.cancel()


async def copy_layer(src: Endpoint, dst: Endpoint, diff_id: str, zerocopy: bool) -> dict:
    """GetLayer on the source, PutLayer on the destination; the lifetime fds are held
    until PutLayer returns (the source keeps its directories usable until then)."""
    fds: list[int] = []
    dir_count = None
    try:
        async for reply in src.client.call_more(OCI + "GetLayer", {
            "handle": src.handle, "params": {"diff_id": diff_id, "storage": None,
                                             "consumer_has_cap_dac_override": False}}):
            fds += reply.fds
            count = reply.parameters.get("dir_count")
            if not isinstance(count, int) or count < 1 or (dir_count is not None and count != dir_count):
                raise PycfsError(f"source sent a bad dir_count {count!r} for layer {diff_id}")
            dir_count = count
        assert dir_count is not None
        if len(fds) < dir_count + 2:
            raise PycfsError(f"source sent {len(fds)} fds for layer {diff_id}, need at least {dir_count + 2}")
        reply = await dst.client.call(OCI + "PutLayer", {"handle": dst.handle, "diff_id": diff_id,
                                                         "zerocopy": zerocopy}, fds[: 1 + dir_count])
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
    try:
        layer_ids = layer_ids_of(json.loads(manifest_json), json.loads(config_json))
    except (ValueError, AttributeError) as e:
        raise PycfsError(f"source image {image!r} has an unreadable manifest or config: {e}") from None
    totals = {"objects_reflinked": 0, "objects_hardlinked": 0, "objects_copied": 0, "objects_already_present": 0}
    layers = []
    for diff_id in layer_ids:
        if progress is not None:
            progress.layer_started(diff_id)
        has = (await dst.client.call(OCI + "HasLayer", {"handle": dst.handle, "diff_id": diff_id})).parameters
        if has.get("present"):
            layers.append({"diff_id": diff_id, "layer_verity": has["layer_verity"], "copied": False})
        else:
            put = await copy_layer(src, dst, diff_id, zerocopy)
            for key in totals:
                totals[key] += int(put.get(key) or 0)
            layers.append({"diff_id": diff_id, "layer_verity": put["layer_verity"], "copied": True})
        if progress is not None:
            progress.layer_done(diff_id, not layers[-1]["copied"])
    final = (await dst.client.call(OCI + "FinalizeImage", {
        "handle": dst.handle, "manifest_json": manifest_json, "config_json": config_json,
        "layers": [{"diff_id": entry["diff_id"], "layer_verity": entry["layer_verity"]} for entry in layers],
        "name": name})).parameters
    return CopyResult(final["manifest_digest"], final["manifest_verity"], final["config_digest"], final["config_verity"],
                      layers, **totals, seconds=time.monotonic() - started)


async def copy(source: str, source_repo: str | None, destination: str, image: str, name: str | None,
               zerocopy: bool, progress: CopyProgress | None = None) -> CopyResult:
    """Copy `image` from `source` (a repository path, or `unix:PATH` of a service holding
    `source_repo`) into the repository at `destination`."""
    if source.startswith("unix:"):
        if source_repo is None:
            raise PycfsError(f"--from {source}: name the repository as the service sees it with --from-repo PATH")
        address: str | None = source
    else:
        address, source_repo = None, source
    try:
        async with open_endpoint(address, source_repo) as src, open_endpoint(None, destination) as dst:
            return await copy_image(src, dst, image, name, zerocopy, progress)
    except VarlinkError as e:
        raise PycfsError(f"oci copy {image}: {e}") from None
