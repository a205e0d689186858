"""An image as containers-storage records it: its manifest, its config (checked against the
manifest's config digest) and its layers (the config's diff_ids mapped to c/storage layers).

Callers hold the store's read locks (`pycfs.host.storage.locks.ReadLocks`) while reading.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pycfs.host.jsondoc import parse_object
from pycfs.host.storage.store import ImageLayer, ImageRecord, Storage, StorageError, Store


def _sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ImageSource:
    """What a pull needs of the image, read while the locks are held."""

    store: Store
    image: ImageRecord
    manifest: bytes
    config: bytes
    manifest_digest: str
    config_digest: str
    layers: list[ImageLayer]


def _big_data_if_any(store: Store, image_id: str, key: str) -> bytes | None:
    try:
        return store.big_data(image_id, key)
    except StorageError:
        return None


def _listed_digests(doc: dict) -> set[str] | None:
    """The digests an image index / docker manifest list names; None for any other document."""
    entries = doc.get("manifests")
    if "config" in doc or not isinstance(entries, list):
        return None
    return {e["digest"] for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)}


def _instance_of_list(store: Store, image: ImageRecord, listed: set[str], list_digest: str) -> tuple[bytes, str]:
    """The image's own manifest among those the list names: `manifest` (the instance last
    pulled), else another `manifest-<digest>` it keeps (pulled through the list before)."""
    for digest in (image.instance_digest, *image.digests):
        if digest is None or digest not in listed:
            continue
        raw = _big_data_if_any(store, image.id, "manifest" if digest == image.instance_digest else f"manifest-{digest}")
        if raw is not None and _sha256_digest(raw) == digest:
            return raw, digest
    raise StorageError(f"image {image.describe()} was pulled through manifest list {list_digest}, but none of its "
                       "manifests in containers-storage is one that list names: the store is damaged (pull the "
                       "image with podman again)")


def read_image(storage: Storage, ref: str) -> ImageSource:
    """Find the image and read its manifest, config and layer list (locks held by the caller).

    `NAME@D` reads the manifest D (c/image keeps each as big-data `manifest-D`); when D is the
    manifest list the image was pulled through, the image's own instance is read instead (the
    list has no config and no layers). Without a digest, big-data `manifest` is read."""
    store, image = storage.lookup(ref)
    asked = ref.rsplit("@", 1)[1] if "@" in ref else None
    manifest = None if asked is None else _big_data_if_any(store, image.id, f"manifest-{asked}")
    if manifest is None:
        manifest = store.big_data(image.id, "manifest")
    found = _sha256_digest(manifest)
    known = {asked} if asked is not None else set(image.digests)
    if known and found not in known:
        raise StorageError(f"the manifest of image {image.describe()} is {found}, not "
                           f"{asked or 'one of the digests containers-storage records for it'}: the store is "
                           "damaged (pull the image with podman again)")
    mdoc = parse_object(manifest, f"manifest of image {image.id[:12]}", StorageError)
    listed = _listed_digests(mdoc)
    if listed is not None:
        manifest, found = _instance_of_list(store, image, listed, found)
        mdoc = parse_object(manifest, f"manifest of image {image.id[:12]}", StorageError)
    config_desc = mdoc.get("config")
    config_digest = config_desc.get("digest") if isinstance(config_desc, dict) else None
    if not isinstance(config_digest, str):
        raise StorageError(f"manifest of image {image.id[:12]} has no config digest")
    try:
        config = store.big_data(image.id, config_digest)
    except StorageError:
        config = store.big_data(image.id, "sha256:" + image.id)
    if _sha256_digest(config) != config_digest:
        raise StorageError(f"config of image {image.id[:12]} does not match its digest {config_digest}")
    cdoc = parse_object(config, f"config of image {image.id[:12]}", StorageError)
    rootfs = cdoc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise StorageError(f"config of image {image.id[:12]} has no rootfs.diff_ids list")
    for d in diff_ids:
        if not d.startswith("sha256:") or len(d) != 71 or d[7:].strip("0123456789abcdef"):
            raise StorageError(f"config of image {image.id[:12]}: invalid diff_id {d!r}")
    layers = storage.image_layers(store, image, diff_ids)
    return ImageSource(store, image, manifest, config, found, config_digest, layers)
