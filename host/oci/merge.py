"""How an OCI image's layers merge into one tree (composefs-rs, spec 3.7, so image digests
agree with cfsctl's): entries apply in layer order; `.wh.NAME` removes NAME, `.wh..wh..opq`
empties its directory (including what the same layer added before it); a directory over a
directory only replaces the stat; anything else replaces the old entry whole. Then the OCI
normalisation: the root takes /usr's stat, /run is emptied, and xattrs are filtered to
security.capability (plus user.* on request).

Its own module so that a pull whose image is in place (`pycfs.host.oci.image.finish_pull`)
imports none of the tar and tree code it needs.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence

from pycfs.host.errors import PycfsError
from pycfs.host.oci.layer import Directory as DirEntry
from pycfs.host.oci.layer import EntryBudget, EntryLimitError, Hardlink, LayerEntry, iter_layer_entries
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.tree import Directory, FileSystem, Leaf, Stat

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
MAX_DIRS_BY_PATH = 4096  # `apply_entry`'s directories by path: a bounded table, whatever the tree


def implicit_root() -> Directory:
    """The root before any layer entry: what containers-storage makes of a layer without a
    "./" entry (`podman image mount` shows 0555, owner 0), so an image with neither a root
    entry nor /usr (FROM scratch + COPY) does not mount as d---------; its mtime stays 0 (c/storage's
    is the time of the pull). composefs-rs starts from mode 0 but refuses an image without
    /usr, whose stat the root takes: the images it builds do not change."""
    return Directory(Stat(mode=0o555))


class ImageBuildError(PycfsError):
    pass


def _parent_dir(root: Directory, parent_path: bytes, path: bytes) -> Directory:
    """The directory at parent_path. Missing ones are created (mode 0755, as container
    storage does when extracting a tar without directory entries); composefs-rs refuses
    such layers, so images that have them all get the same digest either way."""
    node = root
    for comp in parent_path.split(b"/"):
        if not comp:
            continue
        child = node.entries.get(comp)
        if child is None:
            child = node.entries[comp] = Directory(Stat(mode=0o755))
        elif not isinstance(child, Directory):
            raise ImageBuildError(f"{path.decode(errors='replace')}: a parent is not a directory")
        node = child
    return node


def apply_entry(root: Directory, entry: LayerEntry, dirs: dict[bytes, Directory] | None = None) -> None:
    """Apply one layer entry to the tree being built. ``dirs``: the directories of the tree
    by path, filled and emptied here (the entries of a directory are mostly not together
    in a tar, so the last one alone would not do): saves walking the path of every entry."""
    path = entry.path
    if path == b"":
        if not isinstance(entry.item, DirEntry):
            raise ImageBuildError("layer entry for / is not a directory")
        root.stat = entry.stat
        return
    parent_path, _, name = path.rpartition(b"/")
    parent = dirs.get(parent_path) if dirs is not None else None
    if parent is None:
        parent = _parent_dir(root, parent_path, path)
        if dirs is not None:
            if len(dirs) >= MAX_DIRS_BY_PATH:
                dirs.clear()
            dirs[parent_path] = parent
    entries = parent.entries
    if name.startswith(WHITEOUT_PREFIX):
        if name == OPAQUE_MARKER:
            gone = bool(entries)
            entries.clear()
        else:
            gone = isinstance(entries.pop(name[len(WHITEOUT_PREFIX):], None), Directory)
        if dirs and gone:
            dirs.clear()  # directories may have left the tree
        return
    item = entry.item
    existing = entries.get(name)
    if isinstance(item, DirEntry):
        if isinstance(existing, Directory):
            existing.stat = entry.stat
        else:
            entries[name] = Directory(entry.stat)
        return
    if isinstance(item, Hardlink):
        target = root.lookup(item.target)
        if target is None:
            raise ImageBuildError(f"hardlink {path.decode(errors='replace')} -> "
                                  f"{item.target.decode(errors='replace')}: target does not exist")
        if isinstance(target, Directory):
            raise ImageBuildError(f"hardlink {path.decode(errors='replace')} points at a directory")
        entries[name] = target
    else:
        entries[name] = Leaf(entry.stat, item)
    if dirs and isinstance(existing, Directory):
        dirs.clear()  # replaced by a file: it and what is below it left the tree


def _filter_xattrs(stat: Stat, keep_user: bool) -> None:
    stat.xattrs = {
        k: v for k, v in stat.xattrs.items()
        if k == b"security.capability" or (keep_user and k.startswith(b"user."))
    }


def normalize_for_oci(root: Directory, keep_user_xattrs: bool = False) -> None:
    """composefs-rs `transform_for_oci`, needed for digest stability across tools."""
    usr = root.entries.get(b"usr")
    # composefs-rs refuses images without /usr; such images (scratch images, test images)
    # keep the root metadata their layers gave instead.
    if isinstance(usr, Directory):
        root.stat = usr.stat.copy()
    run = root.entries.get(b"run")
    if isinstance(run, Directory) and isinstance(usr, Directory):
        run.entries.clear()
        run.stat.mtime_sec, run.stat.mtime_nsec = usr.stat.mtime_sec, usr.stat.mtime_nsec
    # Every inode once, in no particular order (no sorting, no paths: this is per file of
    # the image); filtering twice (a hardlinked leaf) changes nothing.
    _filter_xattrs(root.stat, keep_user_xattrs)
    dirs, seen = [root], {id(root)}
    while dirs:
        for node in dirs.pop().entries.values():
            if node.stat.xattrs:
                _filter_xattrs(node.stat, keep_user_xattrs)
            if isinstance(node, Directory) and id(node) not in seen:
                seen.add(id(node))
                dirs.append(node)


def stored_entries(repo: Repository, layer_id: bytes) -> Iterator[LayerEntry]:
    """The entries of one stored layer stream, read back as they are taken."""
    return iter_layer_entries(repo.open_stream_by_id(layer_id, CONTENT_OCI_LAYER))


class ImageTree:
    """An image's merged tree built while a pull imports its layers, in config order: the
    entries of a layer being imported are applied as they are parsed (`apply`, then
    `end_layer`); a layer already stored is only noted (`add_stored`) and read back when
    a later layer needs it applied, or by `filesystem`, so a pull whose image is in place
    never reads one. Any failure (an entry that does not apply, entries that could not be
    parsed) breaks the tree: the image is then built from the stored streams, which
    reports the error.

    The tree's objects (hundreds of thousands, all alive until the image is written) are
    moved out of the cyclic collector's generations as they are applied (`gc.freeze`):
    otherwise each time the tree grows by a quarter a full collection rescans all of it,
    in the thread that competes with the object workers (0.7 CPU-s at 200,000 files).
    `filesystem` gives them back, and `release` (`finish_pull`, a failed or cancelled pull).
    Freezing is process-wide: it also keeps whatever else is alive then (other pulls' trees
    in `varlink serve`, cyclic garbage of the moment) out of collections until a release,
    and one pull's release unfreezes another's tree; both only cost memory or time, never
    correctness."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.root = implicit_root()
        self.broken = False
        self.layers: list[bytes] = []  # layer stream ids, in the order they came
        self._stored: list[bytes] = []  # noted, not yet applied
        self._dirs: dict[bytes, Directory] = {}  # for `apply_entry`
        self.budget = EntryBudget()  # the image's entries: its layers' collectors and `apply` charge it

    def add_stored(self, layer_id: bytes) -> None:
        self.layers.append(layer_id)
        self._stored.append(layer_id)

    def apply(self, entries: Iterable[LayerEntry] | None) -> None:
        """Entries of the layer being imported (None: some could not be parsed)."""
        stored, self._stored = self._stored, []
        if self.broken:
            return
        if entries is None:
            self.broken = True
            return
        try:
            root, dirs = self.root, self._dirs
            for layer_id in stored:
                _apply_layer(root, stored_entries(self.repo, layer_id), dirs, self.budget, f"layer stream {layer_id.hex()}")
            for entry in entries:
                apply_entry(root, entry, dirs)
        except EntryLimitError:
            raise
        except PycfsError:
            self.broken = True
        gc.freeze()

    def release(self) -> None:
        """Give the objects frozen by `apply` back to the collector."""
        gc.unfreeze()

    def end_layer(self, layer_id: bytes) -> None:
        self.layers.append(layer_id)

    def filesystem(self, layer_ids: Sequence[bytes], keep_user_xattrs: bool = False) -> FileSystem | None:
        """The normalised tree of the layers `layer_ids` (config order), or None when broken
        or built from other layers."""
        self.apply(())
        self.release()  # the image writer pauses the collector while it works
        if self.broken or self.layers != list(layer_ids):
            return None
        self.broken = True  # normalised: nothing applies after this
        normalize_for_oci(self.root, keep_user_xattrs)
        return FileSystem(self.root)


def _apply_layer(root: Directory, entries: Iterable[LayerEntry], dirs: dict[bytes, Directory], budget: EntryBudget,
                 where: str) -> None:
    """Apply a layer's entries, charged to the image's budget a thousand at a time; a
    failure names the layer (``where``)."""
    count = 0
    try:
        for entry in entries:
            apply_entry(root, entry, dirs)
            count += 1
            if count == 1000:
                budget.charge(count, where)
                count = 0
    except EntryLimitError:
        raise  # (named already)
    except PycfsError as e:
        raise ImageBuildError(f"{where}: {e}: the image's layers do not stack into one tree (the image is "
                              "damaged or crafted: no EROFS image can be made of it)") from None
    budget.charge(count, where)


def build_filesystem(repo: Repository, diff_ids: Sequence[str], layer_ids: Mapping[str, bytes],
                     keep_user_xattrs: bool = False,
                     parsed: Mapping[bytes, list[LayerEntry]] | None = None) -> FileSystem:
    """The merged tree of the layers (diff_ids in config order, layer_ids: diff_id -> layer
    stream id); ``parsed``: layers already parsed (by layer stream id)."""
    root = implicit_root()
    dirs: dict[bytes, Directory] = {}
    budget = EntryBudget()
    for diff_id in diff_ids:
        layer_id = layer_ids.get(diff_id)
        if layer_id is None:
            raise ImageBuildError(f"the image has no layer stream for {diff_id}: re-pull the image")
        entries: Iterable[LayerEntry] | None = (parsed or {}).get(layer_id)
        _apply_layer(root, stored_entries(repo, layer_id) if entries is None else entries, dirs, budget,
                     f"layer {diff_id}")
    normalize_for_oci(root, keep_user_xattrs)
    return FileSystem(root)
