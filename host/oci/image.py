"""The composefs image of an OCI image: layers merged into one tree, written as EROFS.

Merging follows composefs-rs (spec 3.7) so image digests agree with cfsctl's:
entries apply in layer order; `.wh.NAME` removes NAME, `.wh..wh..opq` empties its
directory (including what the same layer added before it); a directory over a directory
only replaces the stat; anything else replaces the old entry whole. Then the OCI
normalisation: the root takes /usr's stat, /run is emptied, and xattrs are filtered to
security.capability (plus user.* on request).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import VerityHasher
from pycfs.host.oci.layer import Directory as DirEntry
from pycfs.host.oci.layer import Hardlink, LayerEntry, iter_layer_entries
from pycfs.host.oci.streams import (
    IMAGE_REF_PREFIX, config_diff_ids, config_stream_name, open_image, publish_image_streams, read_json_stream,
    store_config_stream, store_manifest_stream, tag_image,
)
from pycfs.host.oci.result import IMAGE_REF_NAMES
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.tree import Directory, FileSystem, Leaf, Stat

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
MAX_DIRS_BY_PATH = 4096  # `apply_entry`'s directories by path: a bounded table, whatever the tree


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
        self.root = Directory(Stat())
        self.broken = False
        self.layers: list[bytes] = []  # layer stream ids, in the order they came
        self._stored: list[bytes] = []  # noted, not yet applied
        self._dirs: dict[bytes, Directory] = {}  # for `apply_entry`

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
                for entry in stored_entries(self.repo, layer_id):
                    apply_entry(root, entry, dirs)
            for entry in entries:
                apply_entry(root, entry, dirs)
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


def build_filesystem(repo: Repository, diff_ids: Sequence[str], layer_ids: Mapping[str, bytes],
                     keep_user_xattrs: bool = False,
                     parsed: Mapping[bytes, list[LayerEntry]] | None = None) -> FileSystem:
    """The merged tree of the layers (diff_ids in config order, layer_ids: diff_id -> layer
    stream id); ``parsed``: layers already parsed (by layer stream id)."""
    root = Directory(Stat())
    dirs: dict[bytes, Directory] = {}
    for diff_id in diff_ids:
        layer_id = layer_ids.get(diff_id)
        if layer_id is None:
            raise ImageBuildError(f"the image has no layer stream for {diff_id}: re-pull the image")
        entries: Iterable[LayerEntry] | None = (parsed or {}).get(layer_id)
        for entry in stored_entries(repo, layer_id) if entries is None else entries:
            apply_entry(root, entry, dirs)
    normalize_for_oci(root, keep_user_xattrs)
    return FileSystem(root)


def format_versions(repo: Repository) -> list[int]:
    """EROFS formats to build: the repository's default, then its extras."""
    formats = repo.meta.get("erofs_formats") or {}
    versions = [repo.erofs_default] + sorted(set(formats.get("extra", [])))
    return list(dict.fromkeys(versions))


def compute_image_id(repo: Repository, ref: str, version: int | None = None) -> bytes:
    """The fs-verity digest the image of ref would have, writing nothing."""
    from pycfs.host.erofs.writer import write_image_to

    image = open_image(repo, ref)
    fs = build_filesystem(repo, image.diff_ids, image.layer_ids)
    hasher = VerityHasher(repo.alg)
    write_image_to(fs, version if version is not None else repo.erofs_default, _Pieces(hasher.update))
    return hasher.digest()


def _image_versions(repo: Repository) -> list[int]:
    versions = format_versions(repo)
    missing = [v for v in versions if v not in IMAGE_REF_NAMES]
    if missing:
        raise ImageBuildError(f"the repository's EROFS format {missing[0]} has no slot in OCI config streams; "
                              "use a repository initialised with --erofs-version 1 or 2")
    return versions


def _sound_images(repo: Repository, refs: Mapping[str, bytes], versions: Sequence[int]) -> dict[int, bytes] | None:
    """The recorded images of every wanted version when each is present and intact (an image
    is small: re-hashing it costs milliseconds and catches truncation or damage), else None."""
    found = {v: refs.get(IMAGE_REF_NAMES[v]) for v in versions}
    if all(i is not None and repo.object_intact(i) for i in found.values()):
        return {v: i for v, i in found.items() if i is not None}
    return None


class _Pieces:
    """An image sink passing the pieces on, in order."""

    def __init__(self, write: Callable[[bytearray], object]) -> None:
        self.write = write

    def start(self, size: int) -> None:
        pass


def _store_image(repo: Repository, fs: FileSystem, version: int) -> bytes:
    """Write the image of `fs` to the object store as it is built (a big image is never
    whole in memory); returns its id. Recorded as an image (images/<hex>) by
    `publish_image_streams`, after the crash barrier that makes it durable."""
    # Imported here: a re-pull with its image in place (most of them) never writes one.
    from pycfs.host.erofs.writer import image_buffer, write_image_to

    out = repo.object_writer()
    try:
        write_image_to(fs, version, _Pieces(out.write))
    except BaseException:
        out.abort()
        raise
    object_id, present = out.finish()
    if present and not repo.object_intact(object_id):
        # a damaged object of that name, which the pull repairs: ensure_object replaces it
        return repo.ensure_object(image_buffer(fs, version))
    return object_id


def _write_images(repo: Repository, diff_ids: Sequence[str], layer_ids: Mapping[str, bytes],
                  versions: Sequence[int], parsed: Mapping[bytes, list[LayerEntry]] | None,
                  tree: ImageTree | None = None) -> dict[int, bytes]:
    fs = tree.filesystem([layer_ids.get(d, b"") for d in diff_ids]) if tree is not None else None
    if fs is None:
        fs = build_filesystem(repo, diff_ids, layer_ids, parsed=parsed)
    return {v: _store_image(repo, fs, v) for v in versions}


def _image_refs(image_ids: Mapping[int, bytes], others: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    kept = [(n, i) for n, i in others.items() if n not in IMAGE_REF_NAMES.values()]
    return [(IMAGE_REF_NAMES[v], image_ids[v]) for v in (2, 1) if v in image_ids] + kept


def create_image(repo: Repository, ref: str) -> dict[int, bytes]:
    """(Re)write the EROFS image(s) of a stored image when missing or damaged, and record them
    in its config stream (rewriting the manifest stream to point at the new config stream;
    tags name the manifest stream, so they follow). Returns {format version: image id}."""
    image = open_image(repo, ref)
    versions = _image_versions(repo)
    sound = _sound_images(repo, image.image_refs, versions)
    if sound is not None:
        return sound  # layers are immutable, so is the image
    image_ids = _write_images(repo, image.diff_ids, image.layer_ids, versions, None)
    layers = [(d, image.layer_ids[d]) for d in image.diff_ids]
    _write_image_streams(repo, image.manifest_digest, image.manifest_raw, image.config_digest, image.config_raw,
                         layers, image_ids, image.image_refs, True)
    return image_ids


def _write_image_streams(repo: Repository, manifest_digest: str, manifest_raw: bytes, config_digest: str,
                         config_raw: bytes, layers: list[tuple[str, bytes]], images: Mapping[int, bytes],
                         recorded: Mapping[str, bytes], written: bool) -> tuple[bytes, bytes]:
    """The config stream (naming the images) and the manifest stream, stored, then made
    visible after one crash barrier (a syncfs each cost 10-35 ms at the end of a pull),
    with the images when ``written`` here; (config stream id, manifest stream id)."""
    config_id = store_config_stream(repo, config_digest, config_raw, layers, _image_refs(images, recorded))
    manifest_id = store_manifest_stream(repo, manifest_digest, manifest_raw, config_digest, config_id, layers)
    publish_image_streams(repo, (config_digest, config_id), (manifest_digest, manifest_id),
                          list(images.values()) if written else [])
    return config_id, manifest_id


@dataclass
class FinishedImage:
    config_stream_id: bytes
    manifest_stream_id: bytes
    images: dict[int, bytes]  # EROFS format version -> image id


@dataclass
class PullImages:
    """A pull's EROFS images, stored (`pull_images`) and not yet recorded."""

    images: dict[int, bytes]  # EROFS format version -> image id
    recorded: dict[str, bytes]  # the image refs of the config stream found in place
    written: bool  # images written here: recorded with the streams, after their barrier


def pull_images(repo: Repository, config_digest: str, config_raw: bytes, layers: list[tuple[str, bytes]], *,
                build_image: bool = True, parsed: Mapping[bytes, list[LayerEntry]] | None = None,
                tree: ImageTree | None = None, on_phase: Callable[[str], None] | None = None) -> PullImages:
    """The first part of `finish_pull`: the EROFS image(s) (unless ``build_image`` is false,
    or an intact one is recorded already), stored and not recorded. It needs the layer
    streams stored (their ids), not visible: a pull may run it while its last layer's commit
    waits for its syncfs."""
    recorded: dict[str, bytes] = {}
    config_id = repo.has_stream(config_stream_name(config_digest))
    if config_id is not None:
        try:
            reader = repo.open_stream_by_id(config_id)
            if read_json_stream(repo, reader, config_digest, "config") == config_raw:
                recorded = {n: i for n, i in reader.named_refs.items() if n.startswith(IMAGE_REF_PREFIX)}
        except PycfsError:
            pass  # a damaged config stream is simply rewritten
    if not build_image:
        return PullImages({v: i for v, n in IMAGE_REF_NAMES.items()
                           if (i := recorded.get(n)) is not None and repo.has_object(i)}, recorded, False)
    versions = _image_versions(repo)
    found = _sound_images(repo, recorded, versions)
    if found is not None:
        return PullImages(found, recorded, False)
    if on_phase is not None:
        on_phase("image")
    return PullImages(_write_images(repo, config_diff_ids(config_raw, f"config {config_digest}"), dict(layers),
                                    versions, parsed, tree), recorded, True)


def finish_pull(repo: Repository, manifest_digest: str, manifest_raw: bytes, config_digest: str,
                config_raw: bytes, layers: list[tuple[str, bytes]], tag: str | None, *, build_image: bool = True,
                parsed: Mapping[bytes, list[LayerEntry]] | None = None, tree: ImageTree | None = None,
                on_phase: Callable[[str], None] | None = None, images: PullImages | None = None) -> FinishedImage:
    """The end of every pull, once the layer streams are stored: the EROFS image(s)
    (`pull_images`, unless ``images`` were made already), then the config stream with its
    image refs and the manifest stream, each written once and made visible with the images
    after one syncfs, then the tag, last: a failure anywhere before leaves no tag.
    ``layers``: (diff_id, layer stream id) in config order, all visible; ``parsed``: layers
    already parsed (see `build_filesystem`); ``tree``: their tree, built during the pull
    (`ImageTree`)."""
    try:
        if images is None:
            images = pull_images(repo, config_digest, config_raw, layers, build_image=build_image, parsed=parsed,
                                 tree=tree, on_phase=on_phase)
    finally:
        if tree is not None:
            tree.release()  # whether or not an image was written from it
    if on_phase is not None:
        on_phase("streams")
    config_id, manifest_id = _write_image_streams(repo, manifest_digest, manifest_raw, config_digest, config_raw,
                                                  layers, images.images, images.recorded, images.written)
    if tag is not None:
        tag_image(repo, tag, manifest_digest)
    return FinishedImage(config_id, manifest_id, images.images)
