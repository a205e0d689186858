"""Garbage collection (`pycfs gc`): delete objects no ref can reach, prune dead links.

Roots are the symlinks under images/refs/ and streams/refs/. From a stream, its own
object, its object_refs and, through named refs, other streams and images are live; from
an image, the image object and every object its metacopy xattrs name. Anything else in
objects/ goes. Runs under flock(LOCK_EX), so it waits for every other opener (imports
hold LOCK_SH), at most WAIT_LIMIT, and no import can race with it.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field

from pycfs.host.erofs.objects import image_object_ids
from pycfs.host.errors import PycfsError
from pycfs.host.progress import StepProgress
from pycfs.host.repository import Repository

# How long gc waits for the repository's other users: a pull holds it for its length, a
# FUSE mount or a varlink service with the repository open for as long as they run.
WAIT_LIMIT = 600.0
_POLL = 0.1


@dataclass
class GcResult:
    objects_removed: int = 0
    bytes_removed: int = 0
    links_pruned: int = 0
    temp_files_removed: int = 0
    live_objects: int = 0
    removed: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "objects_removed": self.objects_removed,
            "bytes_removed": self.bytes_removed,
            "links_pruned": self.links_pruned,
            "temp_files_removed": self.temp_files_removed,
            "live_objects": self.live_objects,
        }


def _link_id(repo: Repository, path: str) -> bytes | None:
    try:
        return repo.parse_object_link(os.readlink(path))
    except (OSError, PycfsError):
        return None


def _first_level(repo: Repository, top: str) -> dict[str, bytes]:
    base = repo.path / top
    found: dict[str, bytes] = {}
    if base.is_dir():
        for name in os.listdir(base):
            if name != "refs":
                object_id = _link_id(repo, str(base / name))
                if object_id is not None:
                    found[name] = object_id
    return found


def live_objects(repo: Repository) -> set[bytes]:
    """Every object id reachable from a ref."""
    streams = _first_level(repo, "streams")
    images = _first_level(repo, "images")
    stream_names_by_id = {oid: name for name, oid in streams.items()}
    live: set[bytes] = set()
    image_roots = [os.path.basename(target) for _, target in repo.list_links("images/refs")]
    stream_roots = [os.path.basename(target) for _, target in repo.list_links("streams/refs")]

    pending_images = [images[n] for n in image_roots if n in images]
    visited: set[str] = set()
    pending_streams = [n for n in stream_roots if n in streams]
    while pending_streams:
        name = pending_streams.pop()
        if name in visited:
            continue
        visited.add(name)
        object_id = streams[name]
        live.add(object_id)
        reader = repo.open_stream_by_id(object_id)
        live.update(reader.object_refs)
        for ref in reader.named_refs.values():
            live.add(ref)
            if ref in stream_names_by_id:
                pending_streams.append(stream_names_by_id[ref])
            elif ref.hex() in images:  # composefs.image* refs name EROFS images
                pending_images.append(ref)
    for image_id in pending_images:
        live.add(image_id)
        live.update(image_object_ids(repo.image_bytes(image_id), repo.alg))
    return live


def gc(repo: Repository, dry_run: bool = False, progress: StepProgress | None = None) -> GcResult:
    progress = progress or StepProgress()
    if not dry_run:
        repo.require_writable()
        _lock_exclusive(repo, progress)
    try:
        result = GcResult()
        progress.start("finding live objects", 0)
        try:
            live = live_objects(repo)
        except PycfsError as e:
            raise PycfsError(f"gc: cannot tell what is live ({e}); nothing was removed: "
                             "run `pycfs fsck --repair` first") from None
        progress.start("removing unreachable objects", 0)
        result.live_objects = len(live)
        objects = repo.path / "objects"
        if objects.is_dir():
            for sub in sorted(os.listdir(objects)):
                subdir = objects / sub
                if sub.startswith(".tmp-object-"):
                    result.temp_files_removed += 1
                    if not dry_run:
                        os.unlink(subdir)
                    continue
                for name in sorted(os.listdir(subdir)):
                    try:
                        object_id = repo.id_from_hex(sub + name)
                    except PycfsError:
                        raise PycfsError(f"gc: unexpected file objects/{sub}/{name}; run `pycfs fsck`") from None
                    if object_id in live:
                        continue
                    path = subdir / name
                    result.objects_removed += 1
                    result.bytes_removed += path.stat().st_size
                    result.removed.append(f"objects/{sub}/{name}")
                    if not dry_run:
                        os.unlink(path)
        result.links_pruned = _prune_links(repo, dry_run)
        return result
    finally:
        if not dry_run:
            fcntl.flock(repo.dirfd, fcntl.LOCK_SH)


def _lock_exclusive(repo: Repository, progress: StepProgress) -> None:
    """The repository's lock for gc alone, waiting at most WAIT_LIMIT for its other users."""
    deadline = time.monotonic() + WAIT_LIMIT
    waited = False
    while True:
        try:
            fcntl.flock(repo.dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            # (a failed conversion may have dropped this opener's shared lock: take it back)
            fcntl.flock(repo.dirfd, fcntl.LOCK_SH)
            raise PycfsError(f"gc: {repo.path} stayed in use for {WAIT_LIMIT:.0f} s (a pull, a FUSE mount or a "
                             f"varlink service has it open: `fuser -v {repo.path}` names them); nothing was removed")
        if not waited:
            progress.note(f"waiting for other users of {repo.path} to finish (a pull or mount holds its lock)...")
            waited = True
        time.sleep(_POLL)


def _prune_links(repo: Repository, dry_run: bool) -> int:
    """Remove symlinks that no longer resolve (first levels, then the refs trees)."""
    pruned = 0
    for top in ("images", "streams", "images/refs", "streams/refs"):
        base = repo.path / top
        if not base.is_dir():
            continue
        walker = os.walk(base) if top.endswith("refs") else [(str(base), [], os.listdir(base))]
        for dirpath, dirnames, filenames in walker:
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full) and not os.path.exists(full):
                    pruned += 1
                    if not dry_run:
                        os.unlink(full)
    return pruned
