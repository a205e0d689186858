"""The composefs image of an OCI image and the end of every pull: the layers merged into one
tree (`pycfs.host.oci.merge`), written as EROFS and recorded in the image's config stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import VerityHasher
from pycfs.host.oci.result import IMAGE_REF_NAMES
from pycfs.host.oci.streams import (
    IMAGE_REF_PREFIX, config_diff_ids, config_stream_name, open_image, publish_image_streams, read_json_stream,
    store_config_stream, store_manifest_stream, tag_image,
)
from pycfs.host.repository import Repository

if TYPE_CHECKING:
    from pycfs.host.oci.layer import LayerEntry
    from pycfs.host.oci.merge import ImageTree
    from pycfs.host.tree import FileSystem


def format_versions(repo: Repository) -> list[int]:
    """EROFS formats to build: the repository's default, then its extras."""
    formats = repo.meta.get("erofs_formats") or {}
    versions = [repo.erofs_default] + sorted(set(formats.get("extra", [])))
    return list(dict.fromkeys(versions))


def compute_image_id(repo: Repository, ref: str, version: int | None = None) -> bytes:
    """The fs-verity digest the image of ref would have, writing nothing."""
    from pycfs.host.erofs.writer import write_image_to
    from pycfs.host.oci.merge import build_filesystem

    image = open_image(repo, ref)
    fs = build_filesystem(repo, image.diff_ids, image.layer_ids)
    hasher = VerityHasher(repo.alg)
    write_image_to(fs, version if version is not None else repo.erofs_default, _Pieces(hasher.update))
    return hasher.digest()


def _image_versions(repo: Repository) -> list[int]:
    versions = format_versions(repo)
    missing = [v for v in versions if v not in IMAGE_REF_NAMES]
    if missing:
        from pycfs.host.oci.merge import ImageBuildError

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
                  tree: ImageTree | None = None, *, name: str) -> dict[int, bytes]:
    """The images of the merged layers, stored; a writer's refusal names the image (``name``)."""
    # Imported here: a pull whose image is in place (most re-pulls) builds no tree.
    from pycfs.host.oci.merge import build_filesystem

    fs = tree.filesystem([layer_ids.get(d, b"") for d in diff_ids]) if tree is not None else None
    if fs is None:
        fs = build_filesystem(repo, diff_ids, layer_ids, parsed=parsed)
    images = {}
    for v in versions:
        try:
            images[v] = _store_image(repo, fs, v)
        except PycfsError as e:
            raise PycfsError(f"{name}: {e}") from None
    return images


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
    image_ids = _write_images(repo, image.diff_ids, image.layer_ids, versions, None,
                              name=f"image of config {image.config_digest}")
    layers = [(d, image.layer_ids[d]) for d in image.diff_ids]
    _write_image_streams(repo, image.manifest_digest, image.manifest_raw, image.config_digest, image.config_raw,
                         layers, PullImages(image_ids, image.image_refs, True))
    return image_ids


def _write_image_streams(repo: Repository, manifest_digest: str, manifest_raw: bytes, config_digest: str,
                         config_raw: bytes, layers: list[tuple[str, bytes]], images: PullImages) -> tuple[bytes, bytes]:
    """The config stream (naming the images) and the manifest stream, stored, then made
    visible after one crash barrier (a syncfs each cost 10-35 ms at the end of a pull),
    with the images when they were written here; (config stream id, manifest stream id)."""
    config_id = store_config_stream(repo, config_digest, config_raw, layers, _image_refs(images.images, images.recorded))
    manifest_id = store_manifest_stream(repo, manifest_digest, manifest_raw, config_digest, config_id, layers)
    # Images found in place are recorded again when their images/<hex> link is gone.
    to_link = [i for i in images.images.values() if images.written or not repo.image_linked(i)]
    publish_image_streams(repo, (config_digest, config_id), (manifest_digest, manifest_id), to_link)
    return config_id, manifest_id


@dataclass
class FinishedImage:
    config_stream_id: bytes
    manifest_stream_id: bytes
    images: dict[int, bytes]  # EROFS format version -> image id


@dataclass
class PullImages:
    """An image's EROFS images, stored (`pull_images`, `create_image`) and not yet recorded."""

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
                                    versions, parsed, tree, name=f"image of config {config_digest}"), recorded, True)


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
                                                  layers, images)
    if tag is not None:
        tag_image(repo, tag, manifest_digest)
    return FinishedImage(config_id, manifest_id, images.images)
