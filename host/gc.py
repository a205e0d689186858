"""Garbage collection (`pycfs gc`): delete objects no ref can reach, prune dead links.

Roots are the symlinks under images/refs/ and streams/refs/. From a stream, its own
object, its object_refs and, through named refs, other streams and images are live; from
an image, the image object and every object its metacopy xattrs name. Anything else in
objects/ goes. Runs under flock(LOCK_EX), so it waits for every other opener (imports
hold LOCK_SH), at most LOCK_WAIT, and no import can race with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from pycfs.host.erofs.objects import image_object_ids
from pycfs.host.errors import PycfsError
from pycfs.host.progress import StepProgress
from pycfs.host.repository import Repository, open_dir_nofollow
from pycfs.host.splitstream import names_image


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
    """The object a link of streams/ or images/ names; None for what is no such link (a
    ref to it roots nothing). Any other failure to read it is an error: taking a live
    stream's link for absent would free all it holds."""
    try:
        return repo.parse_object_link(os.readlink(path))
    except PycfsError:
        return None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):  # not a link (fsck reports it), gone
            return None
        raise PycfsError(f"cannot read the link {path}: {e.strerror}") from None


def _first_level(repo: Repository, top: str) -> dict[str, bytes]:
    base = repo.path / top
    found: dict[str, bytes] = {}
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return found
    except OSError as e:
        raise PycfsError(f"cannot list {base}: {e.strerror}") from None
    for name in names:
        if name != "refs":
            object_id = _link_id(repo, str(base / name))
            if object_id is not None:
                found[name] = object_id
    return found


def _ref_links(repo: Repository, top: str) -> list[tuple[str, str]]:
    """The ref links below top; a refs tree with an entry gc cannot see through (a link to a
    directory, a tree past the depth limit) roots what gc cannot know: an error."""
    for entry in repo.walk_refs(top):
        if entry.kind == "dir-link":
            raise PycfsError(f"{entry.path} is a symlink to a directory, which gc does not follow")
        if entry.kind == "too-deep":
            raise PycfsError(f"{entry.path} is nested deeper than refs may be")
    return repo.list_links(top)


def _check_layout(repo: Repository) -> None:
    for top, kind in repo.layout_damage():
        if kind == "symlink":
            raise PycfsError(f"{top} is a symlink, which gc does not follow")
        raise PycfsError(f"{top} is not a directory")


def live_objects(repo: Repository, keep: Iterable[bytes] = ()) -> set[bytes]:
    """Every object id reachable from a ref, or from the streams ``keep`` names that are
    there (a varlink service's layers between a copy's PutLayer and its FinalizeImage): a
    stream's named refs are followed by the object id they hold, whether or not a streams/
    or images/ link names it too (fsck --repair removes the links of what it finds
    incomplete, and a config must still keep its layers). A live stream or image that
    cannot be read is an error: what it holds could not be known."""
    streams = _first_level(repo, "streams")
    images = _first_level(repo, "images")
    image_roots = [os.path.basename(target) for _, target in _ref_links(repo, "images/refs")]
    stream_roots = [os.path.basename(target) for _, target in _ref_links(repo, "streams/refs")]
    pending_images = [images[n] for n in image_roots if n in images]
    pending_streams = [streams[n] for n in stream_roots if n in streams]
    pending_streams += [i for i in keep if repo.has_object(i)]
    live: set[bytes] = set()
    visited: set[bytes] = set()
    while pending_streams:
        object_id = pending_streams.pop()
        if object_id in visited:
            continue
        visited.add(object_id)
        live.add(object_id)
        reader = repo.open_stream_by_id(object_id)
        live.update(reader.object_refs)
        for name, ref in reader.named_refs.items():
            (pending_images if names_image(name) else pending_streams).append(ref)
    for image_id in set(pending_images):
        live.add(image_id)
        live.update(image_object_ids(repo.image_bytes(image_id), repo.alg))
    return live


def gc(repo: Repository, dry_run: bool = False, progress: StepProgress | None = None,
       wait: float | None = None, keep: Iterable[bytes] = ()) -> GcResult:
    """``wait``: how long to wait for the repository's other users (LOCK_WAIT); ``keep``:
    streams kept as if a ref named them (see `live_objects`)."""
    progress = progress or StepProgress()
    if not dry_run:
        repo.require_writable()
        repo.lock_exclusive("gc", progress.note, wait)
    try:
        result = GcResult()
        progress.start("finding live objects", 0)
        try:
            _check_layout(repo)
            live = live_objects(repo, keep)
        except PycfsError as e:
            raise PycfsError(f"gc: cannot tell what is live ({e}); nothing was removed: "
                             "run `pycfs fsck --repair` first") from None
        progress.start("removing unreachable objects", 0)
        result.live_objects = len(live)
        try:
            doomed = _unreachable(repo, live, result)
        except PycfsError as e:
            raise PycfsError(f"gc: {e}; nothing was removed: run `pycfs fsck --repair`") from None
        # The links to what goes, first: a gc killed midway then leaves objects nothing
        # names (the next gc frees them), never links to missing objects for fsck to report.
        going = {repo.id_from_hex(sub + name) for sub, names in doomed.items() if sub for name in names}
        result.links_pruned = _unlink_links_to(repo, going, dry_run)
        if not dry_run and doomed:
            _remove_objects(repo, doomed)
        result.links_pruned += _prune_links(repo, dry_run)
        result.temp_files_removed += _remove_link_leftovers(repo, dry_run)
        return result
    finally:
        if not dry_run:
            repo.unlock_exclusive()


def _unreachable(repo: Repository, live: set[bytes], result: GcResult) -> dict[str, list[str]]:
    """The entries of objects/ to remove, by subdirectory ("" for objects/ itself), counted
    into result. objects/ and its subdirectories are opened from their parents with
    O_NOFOLLOW: gc never lists or deletes through a symlink."""
    doomed: dict[str, list[str]] = {}
    try:
        objects = open_dir_nofollow(repo.dirfd, "objects")
    except FileNotFoundError:
        return doomed
    try:
        with os.scandir(objects) as entries:
            top = sorted(entries, key=lambda e: e.name)
        for entry in top:
            rel_sub = f"objects/{entry.name}"
            if entry.name.startswith(".tmp-object-"):
                if entry.is_dir(follow_symlinks=False):
                    raise PycfsError(f"{rel_sub} is a directory, not a crashed writer's temporary file")
                result.temp_files_removed += 1
                doomed.setdefault("", []).append(entry.name)
                continue
            if entry.is_symlink():
                raise PycfsError(f"{rel_sub} is a symlink, which gc does not follow")
            if not entry.is_dir(follow_symlinks=False):
                raise PycfsError(f"{rel_sub} is not a directory")
            try:
                subdir = open_dir_nofollow(objects, entry.name)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise PycfsError(f"{rel_sub} changed into something else than a directory") from None
            try:
                _unreachable_in(repo, subdir, entry.name, live, result, doomed)
            finally:
                os.close(subdir)
    finally:
        os.close(objects)
    return doomed


def _unreachable_in(repo: Repository, subdir: int, sub: str, live: set[bytes], result: GcResult,
                    doomed: dict[str, list[str]]) -> None:
    with os.scandir(subdir) as entries:
        found = sorted(entries, key=lambda e: e.name)
    for entry in found:
        rel = f"objects/{sub}/{entry.name}"
        try:
            object_id = repo.id_from_hex(sub + entry.name)
        except PycfsError:
            raise PycfsError(f"unexpected entry {rel}") from None
        if object_id in live:
            continue
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise PycfsError(f"{rel} is a directory, not an object")
        result.objects_removed += 1
        result.bytes_removed += st.st_size if stat.S_ISREG(st.st_mode) else 0
        result.removed.append(rel)
        doomed.setdefault(sub, []).append(entry.name)


def _remove_objects(repo: Repository, doomed: dict[str, list[str]]) -> None:
    """Unlink each entry in its directory's fd (a symlink there goes, never what it names)."""
    objects = open_dir_nofollow(repo.dirfd, "objects")
    try:
        for sub, names in doomed.items():
            fd = open_dir_nofollow(objects, sub) if sub else objects
            try:
                for name in names:
                    os.unlink(name, dir_fd=fd)
            finally:
                if fd != objects:
                    os.close(fd)
    finally:
        os.close(objects)


def _unlink_links_to(repo: Repository, going: set[bytes], dry_run: bool) -> int:
    """Remove the streams/ and images/ links naming an object in going (none is live: no ref
    reaches them); how many."""
    return _unlink_all(repo, [f"{top}/{name}" for top in ("streams", "images")
                              for name, object_id in _first_level(repo, top).items() if object_id in going], dry_run)


def _remove_link_leftovers(repo: Repository, dry_run: bool) -> int:
    """A crashed writer's temporary symlinks in the repository's root (a link is made there,
    then renamed into place); gc holds the repository alone, so none is a running one's."""
    with os.scandir(repo.dirfd) as entries:
        left = [e.name for e in entries if e.name.startswith(".symlink-") and e.is_symlink()]
    return _unlink_all(repo, left, dry_run)


def _unlink_all(repo: Repository, paths: list[str], dry_run: bool) -> int:
    """Unlink each (repository-relative) path unless dry_run; how many there were."""
    if not dry_run:
        for rel in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rel, dir_fd=repo.dirfd)
    return len(paths)


def _prune_links(repo: Repository, dry_run: bool) -> int:
    """Remove symlinks that no longer resolve (first levels, then the refs trees)."""
    dead: list[str] = []
    for top in ("images", "streams"):
        base = repo.path / top
        if base.is_dir():
            dead += [f"{top}/{name}" for name in sorted(os.listdir(base))
                     if os.path.islink(base / name) and not os.path.exists(base / name)]
    for top in ("images/refs", "streams/refs"):
        dead += [e.path for e in repo.walk_refs(top) if e.kind == "dangling"]
    if not dry_run:
        for rel in dead:
            os.unlink(rel, dir_fd=repo.dirfd)
    return len(dead)
