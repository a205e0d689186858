"""`org.composefs.Oci.Pull` as a stream of progress frames ending in one `completed`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import trio
from pycfs.host.nursery import open_nursery
from pycfs.host.oci.pull import PullOptions, pull, split_reference
from pycfs.host.oci.streams import check_tag
from pycfs.host.progress import PullProgress
from pycfs.host.repository import Repository
from pycfs.host.varlink.server import CallContext, Result
from pycfs.protocol.varlink import VarlinkError

# at most this many progress frames a second per layer: enough for a bar, few enough to not matter
PROGRESS_INTERVAL = 0.2


class _Frames(PullProgress):
    """pycfs's PullProgress callbacks (called in the trio thread) as queued frames."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.ready = trio.Event()
        self.fetched: dict[str, int] = {}
        self.totals: dict[str, int | None] = {}
        self._last: dict[str, float] = {}

    def _push(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        self.ready.set()

    def waiting_for_lock(self) -> None:
        self._push({"message": "waiting for containers-storage locks (podman is writing)"})

    def layer_started(self, diff_id: str, total_bytes: int | None) -> None:
        self.fetched[diff_id] = 0
        self.totals[diff_id] = total_bytes
        self._push({"started": {"id": diff_id, "total": total_bytes, "unit": "Bytes"}})

    def advance(self, diff_id: str, nbytes: int) -> None:
        self.fetched[diff_id] = self.fetched.get(diff_id, 0) + nbytes
        now = trio.current_time()
        if now - self._last.get(diff_id, 0.0) >= PROGRESS_INTERVAL:
            self._last[diff_id] = now
            self._push({"progress": {"id": diff_id, "fetched": self.fetched[diff_id],
                                     "total": self.totals.get(diff_id)}})

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        if already_present:
            self._push({"skipped": {"id": diff_id}})
        else:
            self._push({"done": {"id": diff_id, "transferred": self.fetched.get(diff_id, 0)}})


async def pull_frames(ctx: CallContext, repo: Repository) -> Result:
    image = ctx.params.string("image")
    name = ctx.params.string("name", optional=True)
    ctx.params.string("local_fetch", optional=True)  # pycfs always reflinks where it can
    storage_root = ctx.params.string("storage_root", optional=True)
    if ctx.params.string("xattrs", optional=True, default="AllowlistOnly") != "AllowlistOnly":
        raise VarlinkError("org.composefs.Oci.InvalidRequest", {"message": "only AllowlistOnly xattr filtering is supported"})
    split_reference(image)
    tag = name or image
    check_tag(tag)
    frames = _Frames()
    options = PullOptions(storage_root=storage_root, helper="never", progress=frames)
    result = None

    async def run() -> None:
        nonlocal result
        result = await pull(repo, image, tag, options)
        frames.ready.set()

    async with open_nursery() as nursery:
        nursery.start_soon(run)
        while result is None:
            await frames.ready.wait()
            frames.ready = trio.Event()
            pending, frames.frames = frames.frames, []
            if ctx.more:
                for frame in pending:
                    await ctx.send_continues(frame)
    if ctx.more:
        for frame in frames.frames:
            await ctx.send_continues(frame)
    stats = asdict(result.stats)
    return {"completed": {
        "manifest_digest": result.manifest_digest, "config_digest": result.config_digest,
        "manifest_verity": result.manifest_stream_id.hex(), "config_verity": result.config_stream_id.hex(),
        "stats": {k: stats[k] for k in ("layers", "layers_already_present", "objects_reflinked", "objects_copied",
                                        "objects_already_present", "bytes_reflinked", "bytes_copied", "bytes_inlined")},
        "boot_image": None, "boot_image_mode": None, "boot_image_format_version": None,
    }}
