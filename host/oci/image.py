"""The composefs image of an OCI image: layers merged into one tree, written as EROFS.

Merging follows composefs-rs (spec 3.7) so image digests agree with cfsctl's:
entries apply in layer order; `.wh.NAME` removes NAME, `.wh..wh..opq` empties its
directory (including what the same layer added before it); a directory over a directory
only replaces the stat; anything else replaces the old entry whole. Then the OCI
normalisation: the root takes /usr's stat, /run is emptied, and xattrs are filtered to
security.capability (plus user.* on request).
"""

from __future__ import annotations

from collections.abc import Mapping

from pycfs.host.erofs.writer import write_image as write_erofs
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.oci.layer import Directory as DirEntry
from pycfs.host.oci.layer import Hardlink, LayerEntry, iter_layer_entries
from pycfs.host.oci.streams import (
    IMAGE_REF_PREFIX, StoredImage, open_image, write_config_stream, write_manifest_stream,
)
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.tree import Directory, FileSystem, Leaf, Stat

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
# The config stream has a slot per format: V2 is plain `composefs.image`, V1 `.v1`; V0 has none.
IMAGE_REF_NAMES = {2: IMAGE_REF_PREFIX, 1: IMAGE_REF_PREFIX + ".v1"}


class ImageBuildError(PycfsError):
    pass


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


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


def apply_entry(root: Directory, entry: LayerEntry) -> None:
    """Apply one layer entry to the tree being built."""
    if entry.path == b"":
        if not isinstance(entry.item, DirEntry):
            raise ImageBuildError("layer entry for / is not a directory")
        root.stat = entry.stat
        return
    parent_path, name = _split(entry.path)
    parent = _parent_dir(root, parent_path, entry.path)
    if name.startswith(WHITEOUT_PREFIX):
        if name == OPAQUE_MARKER:
            parent.entries.clear()
        else:
            parent.entries.pop(name[len(WHITEOUT_PREFIX):], None)
        return
    item = entry.item
    if isinstance(item, DirEntry):
        existing = parent.entries.get(name)
        if isinstance(existing, Directory):
            existing.stat = entry.stat
        else:
            parent.entries[name] = Directory(entry.stat)
        return
    if isinstance(item, Hardlink):
        target = root.lookup(item.target)
        if target is None:
            raise ImageBuildError(f"hardlink {entry.path.decode(errors='replace')} -> "
                                  f"{item.target.decode(errors='replace')}: target does not exist")
        if isinstance(target, Directory):
            raise ImageBuildError(f"hardlink {entry.path.decode(errors='replace')} points at a directory")
        parent.entries[name] = target
        return
    parent.entries[name] = Leaf(entry.stat, item)


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
    seen: set[int] = set()
    for _path, node in root.walk():
        if id(node) not in seen:
            seen.add(id(node))
            _filter_xattrs(node.stat, keep_user_xattrs)


def parse_layer(repo: Repository, layer_id: bytes) -> list[LayerEntry]:
    """The entries of one stored layer stream: most of an image build's work, and the part
    that a pull can do for one layer while it imports the next."""
    return list(iter_layer_entries(repo.open_stream_by_id(layer_id, CONTENT_OCI_LAYER)))


def build_filesystem(repo: Repository, image: StoredImage, keep_user_xattrs: bool = False,
                     parsed: Mapping[bytes, list[LayerEntry]] | None = None) -> FileSystem:
    """The merged tree; ``parsed``: layers already parsed (by layer stream id)."""
    root = Directory(Stat())
    for diff_id in image.diff_ids:
        layer_id = image.layer_ids.get(diff_id)
        if layer_id is None:
            raise ImageBuildError(f"config stream of {image.config_digest} has no layer {diff_id}: re-pull the image")
        entries = (parsed or {}).get(layer_id)
        if entries is None:
            entries = iter_layer_entries(repo.open_stream_by_id(layer_id, CONTENT_OCI_LAYER))
        for entry in entries:
            apply_entry(root, entry)
    normalize_for_oci(root, keep_user_xattrs)
    return FileSystem(root)


def format_versions(repo: Repository) -> list[int]:
    """EROFS formats to build: the repository's default, then its extras."""
    formats = repo.meta.get("erofs_formats") or {}
    versions = [repo.erofs_default] + sorted(set(formats.get("extra", [])))
    return list(dict.fromkeys(versions))


def compute_image_id(repo: Repository, ref: str, version: int | None = None) -> bytes:
    """The fs-verity digest the image of ref would have, writing nothing."""
    image = open_image(repo, ref)
    fs = build_filesystem(repo, image)
    return digest_bytes(write_erofs(fs, version if version is not None else repo.erofs_default), repo.alg)


def create_image(repo: Repository, ref: str, parsed: Mapping[bytes, list[LayerEntry]] | None = None) -> dict[int, bytes]:
    """Write the EROFS image(s) of ref and record them in its config stream (rewriting the
    manifest stream to point at the new config stream; tags name the manifest stream, so
    they follow). Returns {format version: image id}. ``parsed``: see `build_filesystem`."""
    image = open_image(repo, ref)
    versions = format_versions(repo)
    missing = [v for v in versions if v not in IMAGE_REF_NAMES]
    if missing:
        raise ImageBuildError(f"the repository's EROFS format {missing[0]} has no slot in OCI config streams; "
                              "use a repository initialised with --erofs-version 1 or 2")
    existing = {v: image.image_refs.get(IMAGE_REF_NAMES[v]) for v in versions}
    if all(i is not None and repo.has_object(i) for i in existing.values()):
        return existing  # built by an earlier pull: layers are immutable, so is the image
    fs = build_filesystem(repo, image, parsed=parsed)
    image_ids = {v: repo.write_image(write_erofs(fs, v)) for v in versions}
    layers = [(d, image.layer_ids[d]) for d in image.diff_ids]
    kept = [(n, i) for n, i in image.image_refs.items() if n not in IMAGE_REF_NAMES.values()]
    image_refs = [(IMAGE_REF_NAMES[v], image_ids[v]) for v in (2, 1) if v in image_ids] + kept
    config_id = write_config_stream(repo, image.config_digest, image.config_raw, layers, image_refs)
    write_manifest_stream(repo, image.manifest_digest, image.manifest_raw, image.config_digest, config_id, layers)
    return image_ids
