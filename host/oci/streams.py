"""OCI config/manifest splitstreams, their named refs, and tags (spec 3.1, 3.3, 3.4).

Config and manifest JSON are stored as one object each (never inline, whatever their size)
so the exact original bytes, and hence their sha256, are kept. Their streams carry named
refs that make the whole image reachable for GC:

    oci-config-<digest>    named refs: <diff_id> -> layer stream, composefs.image* -> EROFS
    oci-manifest-<digest>  named refs: config:<config digest> -> config stream, <diff_id> -> layer stream

A tag is the symlink streams/refs/oci/<encoded tag> -> ../../oci-manifest-<digest>.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import MAX_JSON_DOCUMENT, parse_object
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_MANIFEST, SplitStreamReader, SplitStreamWriter
from pycfs.protocol.text import is_clean_text

TAG_DIR = "oci"
MANIFEST_PREFIX = "oci-manifest-"
CONFIG_PREFIX = "oci-config-"
CONFIG_REF_PREFIX = "config:"
IMAGE_REF_PREFIX = "composefs.image"
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}


def parse_digest(digest: str, what: str = "digest") -> tuple[str, str]:
    """Split and check an OCI digest string `sha256:<hex>` → (algorithm, hex)."""
    alg, sep, hexpart = digest.partition(":")
    if not sep or DIGEST_ALGORITHMS.get(alg) != len(hexpart) or hexpart.strip("0123456789abcdef"):
        raise PycfsError(f"invalid {what} {digest!r}: expected sha256:<64 lowercase hex> or sha512:<128 hex>")
    return alg, hexpart


def config_stream_name(digest: str) -> str:
    return CONFIG_PREFIX + digest


def manifest_stream_name(digest: str) -> str:
    return MANIFEST_PREFIX + digest


# ---------------------------------------------------------------------------- tags


def encode_tag(tag: str) -> str:
    """`%` → `%25` first, then `/` → `%2F`: a tag becomes one file name."""
    return tag.replace("%", "%25").replace("/", "%2F")


def decode_tag(encoded: str) -> str:
    """Single pass: `%2F` → `/`, `%25` → `%`, anything else (also `%2f`) kept as is."""
    out = []
    i = 0
    while i < len(encoded):
        three = encoded[i : i + 3]
        if three == "%2F":
            out.append("/")
            i += 3
        elif three == "%25":
            out.append("%")
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    return "".join(out)


def check_tag(tag: str) -> None:
    if not is_clean_text(tag):
        raise PycfsError(f"invalid tag {tag!r}: holds a NUL or is not UTF-8 text")
    encoded = encode_tag(tag)
    if not tag or tag.startswith("@") or encoded in (".", "..") or len(encoded.encode()) > 255:
        raise PycfsError(
            f"invalid tag {tag!r}: must be non-empty, not start with '@' (digest syntax), and fit a file name"
        )


def tag_image(repo: Repository, tag: str, manifest_digest: str) -> None:
    """Point tag at the (already written) manifest stream, replacing any previous target."""
    check_tag(tag)
    if repo.has_stream(manifest_stream_name(manifest_digest)) is None:
        raise PycfsError(f"cannot tag {tag!r}: no manifest stream for {manifest_digest}")
    repo.set_stream_ref(f"{TAG_DIR}/{encode_tag(tag)}", manifest_stream_name(manifest_digest))


def untag_image(repo: Repository, tag: str) -> None:
    check_tag(tag)
    if not repo.remove_link(f"streams/refs/{TAG_DIR}/{encode_tag(tag)}"):
        raise PycfsError(f"no image tagged {tag!r}")


def resolve_tag(repo: Repository, tag: str) -> str | None:
    """The manifest digest a tag points at, or None if there is no such tag."""
    check_tag(tag)
    target = repo.read_link(f"streams/refs/{TAG_DIR}/{encode_tag(tag)}")
    return None if target is None else _manifest_digest_of_link(tag, target)


def _manifest_digest_of_link(tag: str, target: str) -> str:
    base = target.rsplit("/", 1)[-1]
    if not base.startswith(MANIFEST_PREFIX):
        raise PycfsError(f"tag {tag!r} points at {target!r}, which is not a manifest stream")
    return base[len(MANIFEST_PREFIX) :]


def list_images(repo: Repository) -> list[tuple[str, str]]:
    """(tag, manifest digest) of every tagged image, sorted by tag."""
    images = []
    for name, target in repo.list_links(f"streams/refs/{TAG_DIR}"):
        if "/" in name or not is_clean_text(name):
            continue  # not a tag: tags are encoded into a single file name of UTF-8 text (fsck reports it)
        tag = decode_tag(name)
        base = target.rsplit("/", 1)[-1]
        if base.startswith(MANIFEST_PREFIX):  # else not an image's tag (fsck reports it): the others are listed
            images.append((tag, base[len(MANIFEST_PREFIX):]))
    return sorted(images)


def resolve_image(repo: Repository, image: str) -> str:
    """A tag or `@sha256:<hex>` → manifest digest (the stream must exist)."""
    if image.startswith("@"):
        digest = image[1:]
        parse_digest(digest, "manifest digest")
    else:
        found = resolve_tag(repo, image)
        if found is None:
            raise PycfsError(f"no image tagged {image!r} in {repo.path}")
        digest = found
    if repo.has_stream(manifest_stream_name(digest)) is None:
        raise PycfsError(f"manifest stream {manifest_stream_name(digest)} is missing from {repo.path}")
    return digest


# ---------------------------------------------------------------------------- streams


def _store_json_stream(repo: Repository, content_type: int, raw: bytes, named_refs: Sequence[tuple[str, bytes]]) -> bytes:
    writer = SplitStreamWriter(repo.alg, content_type)
    for ref_name, stream_id in named_refs:
        writer.add_named_ref(ref_name, stream_id)
    writer.write_external(repo.ensure_object(raw), len(raw))
    return repo.store_stream(writer)


def store_config_stream(repo: Repository, digest: str, raw: bytes, layers: Sequence[tuple[str, bytes]],
                        image_refs: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """`oci-config-<digest>` stored, not yet visible (`publish_image_streams`): layers are
    (diff_id, layer stream id) in config order, then the EROFS image refs
    (`composefs.image`, `composefs.image.v1`, ...)."""
    _check_digest(raw, digest, "config")
    return _store_json_stream(repo, CONTENT_OCI_CONFIG, raw, [*layers, *image_refs])


def store_manifest_stream(repo: Repository, digest: str, raw: bytes, config_digest: str, config_id: bytes,
                          layers: Sequence[tuple[str, bytes]]) -> bytes:
    """`oci-manifest-<digest>` stored, not yet visible: `config:<digest>` first, then
    (diff_id, layer stream id)."""
    _check_digest(raw, digest, "manifest")
    refs = [(CONFIG_REF_PREFIX + config_digest, config_id), *layers]
    return _store_json_stream(repo, CONTENT_OCI_MANIFEST, raw, refs)


def publish_image_streams(repo: Repository, config: tuple[str, bytes] | None, manifest: tuple[str, bytes] | None,
                          images: Sequence[bytes] = ()) -> None:
    """Make stored config and manifest streams ((digest, stream id) each) and EROFS images
    visible after one crash barrier. Durable refs: layer streams (each synced by its own
    write_stream before it was visible), other config streams (the same), and objects
    written here (images, the JSON), which the repository tracks."""
    streams = [(config_stream_name(config[0]), config[1])] if config is not None else []
    if manifest is not None:
        streams.append((manifest_stream_name(manifest[0]), manifest[1]))
    repo.publish_streams(streams, images=images, refs_durable=True)


def _check_digest(raw: bytes, digest: str, what: str) -> None:
    alg, hexpart = parse_digest(digest, f"{what} digest")
    actual = hashlib.new(alg, raw).hexdigest()
    if actual != hexpart:
        raise PycfsError(f"{what} digest mismatch: expected {digest}, the bytes are {alg}:{actual}")


def read_json_stream(repo: Repository, reader: SplitStreamReader, digest: str, what: str) -> bytes:
    """The raw JSON bytes of a config/manifest stream (exactly one object ref), digest-checked."""
    if len(reader.object_refs) != 1:
        raise PycfsError(f"{what} stream for {digest} has {len(reader.object_refs)} object refs, expected 1")
    raw = repo.read_object(reader.object_refs[0], MAX_JSON_DOCUMENT + 1)  # (its digest is checked once read)
    if len(raw) > MAX_JSON_DOCUMENT:
        raise PycfsError(f"{what} stream for {digest}: its object is larger than {MAX_JSON_DOCUMENT} bytes, "
                         f"no {what} is; the repository is damaged (run `pycfs fsck`)")
    _check_digest(raw, digest, what)
    return raw


@dataclass
class StoredImage:
    """A tagged (or digest-named) image as stored in the repository."""

    manifest_digest: str
    manifest_raw: bytes
    manifest_stream_id: bytes
    config_digest: str
    config_raw: bytes
    config_stream_id: bytes
    layer_ids: dict[str, bytes]  # diff_id -> layer stream id
    image_refs: dict[str, bytes] = field(default_factory=dict)  # composefs.image* -> EROFS id

    @property
    def manifest(self) -> dict:
        return parse_object(self.manifest_raw, f"manifest {self.manifest_digest}")

    @property
    def config(self) -> dict:
        return parse_object(self.config_raw, f"config {self.config_digest}")

    @property
    def diff_ids(self) -> list[str]:
        return config_diff_ids(self.config_raw, f"config {self.config_digest}")


# Layers an image may list: each listing is merged, stored layer or not (a layer listed
# 100,000 times took 145 CPU-s); Docker refuses images deeper than 125 layers ("max depth exceeded").
MAX_IMAGE_LAYERS = 1000


def check_layer_count(count: int, what: str) -> None:
    """Refuse an image listing more than MAX_IMAGE_LAYERS layers (``what`` lists them)."""
    if count > MAX_IMAGE_LAYERS:
        raise PycfsError(f"{what} lists {count} layers, more than the {MAX_IMAGE_LAYERS} pycfs takes "
                         "(rebuild the image with fewer layers)")


def config_diff_ids(config_raw: bytes, what: str) -> list[str]:
    """An image config's rootfs.diff_ids ([] when it has none, as an artifact's config)."""
    rootfs = parse_object(config_raw, what).get("rootfs", {})
    diff_ids = rootfs.get("diff_ids", []) if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise PycfsError(f"{what}: rootfs.diff_ids is not a list of digests")
    check_layer_count(len(diff_ids), what)
    return diff_ids


def open_image(repo: Repository, image: str) -> StoredImage:
    """Load manifest and config of a tag or `@sha256:<hex>` with the refs their streams carry."""
    manifest_digest = resolve_image(repo, image)
    manifest_reader = repo.open_stream(manifest_stream_name(manifest_digest), CONTENT_OCI_MANIFEST)
    manifest_raw = read_json_stream(repo, manifest_reader, manifest_digest, "manifest")
    config_refs = [n for n in manifest_reader.named_refs if n.startswith(CONFIG_REF_PREFIX)]
    if len(config_refs) != 1:
        raise PycfsError(f"manifest stream for {manifest_digest} has {len(config_refs)} config refs, expected 1")
    config_digest = config_refs[0][len(CONFIG_REF_PREFIX) :]
    config_id = manifest_reader.named_refs[config_refs[0]]
    config_reader = repo.open_stream_by_id(config_id, CONTENT_OCI_CONFIG)
    config_raw = read_json_stream(repo, config_reader, config_digest, "config")
    layers = {n: i for n, i in config_reader.named_refs.items() if not n.startswith(IMAGE_REF_PREFIX)}
    images = {n: i for n, i in config_reader.named_refs.items() if n.startswith(IMAGE_REF_PREFIX)}
    return StoredImage(manifest_digest, manifest_raw, repo.has_stream(manifest_stream_name(manifest_digest)) or b"",
                       config_digest, config_raw, config_id, layers, images)
