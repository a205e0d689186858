"""Read-only view of a containers/storage graphroot (overlay or vfs driver).

What is read, per driver D (`overlay` or `vfs`):
- `D-images/images.json`: image records (id, names, digest, big-data digests, top layer);
  `D-images/<id>/<big-data>`: the manifest and config, named by c/storage's rule (a key of
  only `[.0-9a-z]` verbatim, any other key as `=` + base64(key)).
- `D-layers/layers.json`: layer records (id, parent, diff-digest, diff-size, flags);
  `D-layers/<id>.tar-split.gz`: how to rebuild the layer tar.
- layer contents: overlay `overlay/<id>/diff` (ancestors named in `overlay/<id>/lower` as
  `l/<link>` entries, `overlay/l/<link>` -> `../<id>/diff`), vfs `vfs/dir/<id>` (a full tree).

Image lookup follows podman: exact name, short name (`bookworm:py` finds
`localhost/bookworm:py`), a name without tag means `:latest`, full or unique-prefix image ID,
and `[name]@sha256:<manifest digest>`. Callers hold the store's read locks while reading.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import loads, read_document
from pycfs.host.storage.config import StorageConfig, detect_driver
from pycfs.host.storage.locks import ReadLocks
from pycfs.host.syscalls import RESOLVE_CONFINED
from pycfs.protocol.text import listed, shown

if TYPE_CHECKING:
    from pycfs.host.storage.tarsplit import FileEntry, Segment

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX64_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_HEX_PREFIX_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{3,63})$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_BIG_DATA_PLAIN_RE = re.compile(r"^[.0-9a-z]*$")
_LINK_RE = re.compile(r"^[A-Za-z0-9]+$")
# An overlay layer's `lower` file: "l/<26 characters>" per lower layer, ':'-separated;
# c/storage stacks at most 500 (its maxDepth), which take under 16 KiB.
MAX_LOWER_LAYERS = 500
MAX_LOWER_FILE = 64 << 10
MAX_NAMES_COMPARED = 10_000


class StorageError(PycfsError):
    """containers-storage is missing, corrupt, or lacks what was asked for."""


# The JSON files read whole into memory (the record lists, an image's manifest and config):
# a layers.json record takes about a KiB, so this holds tens of thousands.
MAX_JSON_FILE = 64 << 20


@dataclass(frozen=True)
class ImageRecord:
    id: str
    names: tuple[str, ...] = ()
    digest: str | None = None
    # The manifest digests the image is known by, derived as c/storage derives them (it writes
    # no list): `digest` (a manifest list's when pulled through one), then the big-data
    # digests of `manifest` (the instance last pulled) and of every `manifest-<digest>`.
    digests: tuple[str, ...] = ()
    # The big-data digest of `manifest`, when recorded.
    instance_digest: str | None = None
    top_layer: str | None = None

    def describe(self) -> str:
        return f"{self.id[:12]} ({listed(list(self.names), 3) if self.names else '<none>'})"


@dataclass(frozen=True)
class LayerRecord:
    id: str
    parent: str | None = None
    diff_digest: str | None = None
    diff_size: int | None = None
    incomplete: bool = False
    # Its uidset or gidset (the ids its files use, as c/storage records them) holds one other
    # than 0: in rootless storage such a file may be closed to the user. False when unrecorded.
    foreign_ids: bool = False


@dataclass(frozen=True)
class ImageLayer:
    """One layer of an image: the config's diff_id, and where c/storage keeps it."""

    diff_id: str
    store: Store
    layer: LayerRecord


def big_data_name(key: str) -> str:
    """File name c/storage uses for an image's big-data item `key`."""
    if key and _BIG_DATA_PLAIN_RE.match(key):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


def _check_id(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in (".", ".."):
        raise StorageError(f"{where}: invalid {what} {value!r}")
    return value


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _manifest_digests(value: object) -> dict[str, str]:
    """The big-data digests of an image's manifests (keys `manifest` and `manifest-*`, as
    c/storage counts them), `manifest` first; digests not of the sha256 form are left out (no
    reference can name them)."""
    if not isinstance(value, dict):
        return {}
    found = {k: v for k, v in value.items()
             if isinstance(k, str) and k.startswith("manifest") and isinstance(v, str) and _DIGEST_RE.match(v)}
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "manifest", kv[0])))


def split_tag(name: str) -> tuple[str, str | None]:
    """('repo', 'tag') from 'repo:tag'; a ':' before the last '/' is a registry port."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def _docker_hub_forms(name: str) -> set[str]:
    """docker.io/x and docker.io/library/x are the same repository."""
    forms = {name}
    if name.startswith("docker.io/") and name.count("/") == 1:
        forms.add("docker.io/library/" + name[len("docker.io/") :])
    return forms


@dataclass
class Store:
    """One graphroot with one driver; `read_only` for additional image stores."""

    root: Path
    driver: str
    read_only: bool = False

    @property
    def images_dir(self) -> Path:
        return self.root / f"{self.driver}-images"

    @property
    def layers_dir(self) -> Path:
        return self.root / f"{self.driver}-layers"

    def lock_paths(self) -> list[Path]:
        return [self.images_dir / "images.lock", self.layers_dir / "layers.lock"]

    def read(self, path: Path, limit: int) -> bytes:
        """The store's file at path (beneath its root), at most limit bytes: `read_document`
        following no symlink on the way (podman makes none among these files; an edited
        store's could lead anywhere). FileNotFoundError passes through."""
        with self.beneath() as root:
            return read_document(path.relative_to(self.root), limit, StorageError, dir_fd=root, follow=False,
                                 name=str(path), resolve=RESOLVE_CONFINED)

    @contextlib.contextmanager
    def beneath(self) -> Iterator[int]:
        """An O_PATH fd of the store's root, to open its files beneath."""
        try:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot open containers-storage at {self.root}: {e.strerror}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def check(self) -> None:
        for d in (self.images_dir, self.layers_dir):
            if not d.is_dir():
                raise StorageError(f"no containers-storage ({self.driver} driver) at {self.root}: {d.name}/ is missing")

    def _read_json_array(self, path: Path) -> list:
        try:
            data = self.read(path, MAX_JSON_FILE)
        except FileNotFoundError:
            return []  # c/storage creates these lazily; a fresh store has none
        value = loads(data, str(path), StorageError) if data.strip() else []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise StorageError(f"{path} is not a JSON array of objects")
        return value

    def images(self) -> list[ImageRecord]:
        path = self.images_dir / "images.json"
        out = []
        for raw in self._read_json_array(path):
            top = raw.get("layer")
            digest = raw.get("digest") if isinstance(raw.get("digest"), str) else None
            manifests = _manifest_digests(raw.get("big-data-digests"))
            out.append(
                ImageRecord(
                    id=_check_id(raw.get("id"), "image id", str(path)),
                    names=_str_list(raw.get("names")),
                    digest=digest,
                    digests=tuple(dict.fromkeys(d for d in (digest, *manifests.values()) if d)),
                    instance_digest=manifests.get("manifest"),
                    top_layer=_check_id(top, "layer id", str(path)) if top else None,
                )
            )
        return out

    def layers(self) -> dict[str, LayerRecord]:
        """layers.json, read afresh on every call (it changes whenever podman writes)."""
        path = self.layers_dir / "layers.json"
        layers = {}
        for raw in self._read_json_array(path):
            lid = _check_id(raw.get("id"), "layer id", str(path))
            parent = raw.get("parent")
            flags = raw.get("flags") if isinstance(raw.get("flags"), dict) else {}
            size = raw.get("diff-size")
            layers[lid] = LayerRecord(
                id=lid,
                parent=_check_id(parent, "parent layer id", str(path)) if parent else None,
                diff_digest=raw.get("diff-digest") if isinstance(raw.get("diff-digest"), str) else None,
                diff_size=size if isinstance(size, int) and size >= 0 else None,
                incomplete=bool(flags.get("incomplete")),
                foreign_ids=any(isinstance(ids, list) and any(i != 0 for i in ids)
                                for ids in (raw.get("uidset"), raw.get("gidset"))),
            )
        return layers

    def big_data(self, image_id: str, key: str) -> bytes:
        path = self.images_dir / _check_id(image_id, "image id", "lookup") / big_data_name(key)
        try:
            return self.read(path, MAX_JSON_FILE)
        except FileNotFoundError as e:
            raise StorageError(
                f"image {image_id[:12]} has no {key!r} in {self.images_dir} ({path.name} missing)"
            ) from e

    def tar_split_path(self, layer_id: str) -> Path:
        return self.layers_dir / f"{_check_id(layer_id, 'layer id', 'lookup')}.tar-split.gz"

    @contextlib.contextmanager
    def tar_split_entries(self, layer_id: str) -> Iterator[Iterator[Segment | FileEntry]]:
        """The layer's tar-split entries (`open_entries`), its file opened beneath the root."""
        from pycfs.host.storage.tarsplit import open_entries  # (a re-pull reads no tar-split: 4 ms of imports)

        path = self.tar_split_path(layer_id)
        with self.beneath() as root, open_entries(str(path.relative_to(self.root)), root, str(path)) as entries:
            yield entries

    def layer_dir(self, layer_id: str) -> Path:
        """Directory holding the layer's files (its own changes for overlay, a full tree for vfs)."""
        _check_id(layer_id, "layer id", "lookup")
        if self.driver == "overlay":
            return self.root / "overlay" / layer_id / "diff"
        return self.root / "vfs" / "dir" / layer_id

    def lower_layer_ids(self, layer_id: str) -> list[str]:
        """Overlay ancestors of a layer, parent first, from its `lower` file (empty for vfs or a base layer)."""
        if self.driver != "overlay":
            return []
        lower = self.root / "overlay" / _check_id(layer_id, "layer id", "lookup") / "lower"
        try:
            raw = self.read(lower, MAX_LOWER_FILE)
        except FileNotFoundError:
            return []
        try:
            entries = list(filter(None, raw.decode("ascii").strip().split(":")))
        except UnicodeDecodeError:
            raise StorageError(f"{lower} is not a list of layer links: the store is damaged") from None
        if len(entries) > MAX_LOWER_LAYERS:
            raise StorageError(f"{lower} lists {len(entries)} lower layers, more than overlay stacks "
                               f"({MAX_LOWER_LAYERS}): the store is damaged")
        ids = []
        for entry in entries:
            if not entry.startswith("l/") or not _LINK_RE.match(entry[2:]):
                raise StorageError(f"{lower}: unsupported lower entry {entry!r}")
            link = self.root / "overlay" / entry
            try:
                target = os.readlink(link)
            except OSError as e:
                raise StorageError(f"cannot resolve {link}: {e.strerror}") from e
            parts = target.rstrip("/").split("/")
            if len(parts) < 2 or parts[-1] != "diff":
                raise StorageError(f"{link} points to {target!r}, not a layer's diff directory")
            ids.append(_check_id(parts[-2], "layer id", str(link)))
        return ids


class ImageNotFound(StorageError):
    pass


class AmbiguousImage(StorageError):
    pass


class Storage:
    """The primary store plus additional (read-only) image stores, searched in that order."""

    def __init__(self, stores: list[Store]) -> None:
        if not stores:
            raise StorageError("no containers-storage to read")
        self.stores = stores

    @classmethod
    def from_config(cls, config: StorageConfig) -> Storage:
        primary = Store(config.graphroot, config.driver)
        primary.check()
        stores = [primary]
        for extra in config.additional_image_stores:
            if not extra.is_dir():
                raise StorageError(f"additional image store {extra} does not exist")
            stores.append(Store(extra, detect_driver(extra, None), read_only=True))
        return cls(stores)

    @property
    def primary(self) -> Store:
        return self.stores[0]

    def read_locks(self) -> ReadLocks:
        """The read locks (not yet taken) that keep podman from changing any of the stores."""
        return ReadLocks([(p, s.read_only) for s in self.stores for p in s.lock_paths()])

    def all_images(self) -> list[tuple[Store, ImageRecord]]:
        seen: set[str] = set()
        out = []
        for store in self.stores:
            for image in store.images():
                if image.id not in seen:
                    seen.add(image.id)
                    out.append((store, image))
        return out

    def lookup(self, ref: str) -> tuple[Store, ImageRecord]:
        """The one image `ref` names; ImageNotFound / AmbiguousImage list the candidates."""
        if not ref:
            raise ImageNotFound("empty image reference")
        images = self.all_images()
        found = _match(ref, images)
        ids = {img.id for _, img in found}
        if len(ids) == 1:
            return found[0]
        where = ", ".join(str(s.root) for s in self.stores)
        if len(ids) > 1:
            raise AmbiguousImage(f"image reference {shown(ref)} is ambiguous in containers-storage: "
                                 f"{listed([img.describe() for _, img in found])}")
        import difflib  # only for this message: every pull would pay for it otherwise

        names = sorted({n for _, img in images for n in img.names})
        # difflib compares the reference with every name: a store of a million names (a damaged
        # images.json) took a minute under the locks; past this many, the first few are listed
        close = (difflib.get_close_matches(ref, names, n=5, cutoff=0.3) if len(names) <= MAX_NAMES_COMPARED
                 else []) or names[:5]
        hint = f"; similar: {listed(close, 5)}" if close else "; the store has no named images"
        raise ImageNotFound(f"image {shown(ref)} not found in containers-storage ({where}); {len(images)} images{hint}")

    def image_layers(self, store: Store, image: ImageRecord, diff_ids: list[str]) -> list[ImageLayer]:
        """Map the config's diff_ids (base first) to c/storage layers.

        The image's top layer and its parent links give the exact layers; layers.json's
        diff-digest is the fallback (and the check).
        """
        chain: list[LayerRecord] = []
        layers = store.layers()
        lid = image.top_layer
        while lid:
            rec = layers.get(lid)
            if rec is None or len(chain) > len(layers):
                chain = []
                break
            chain.append(rec)
            lid = rec.parent
        chain.reverse()
        if len(chain) == len(diff_ids) and all(
            rec.diff_digest in (None, d) for rec, d in zip(chain, diff_ids)
        ):
            pairs = [(d, store, rec) for d, rec in zip(diff_ids, chain)]
        else:
            by_digest: dict[str, tuple[Store, LayerRecord]] = {}
            for s in [store] + [x for x in self.stores if x is not store]:
                for rec in (layers if s is store else s.layers()).values():
                    if rec.diff_digest and not rec.incomplete:
                        by_digest.setdefault(rec.diff_digest, (s, rec))
            pairs = []
            for d in diff_ids:
                if d not in by_digest:
                    raise StorageError(f"image {image.id[:12]}: no layer with diff_id {d} in containers-storage")
                pairs.append((d, *by_digest[d]))
        out = []
        for d, s, rec in pairs:
            if rec.incomplete:
                raise StorageError(f"layer {rec.id[:12]} of image {image.id[:12]} is incomplete (an interrupted pull?)")
            out.append(ImageLayer(d, s, rec))
        return out


def _repo_matches(wanted: str, name: str) -> bool:
    """Whether image name `name` (repo:tag) is in repository `wanted` (full or short)."""
    repo, _ = split_tag(name)
    return bool(_docker_hub_forms(repo) & _docker_hub_forms(wanted)) or repo.endswith("/" + wanted)


def _match(ref: str, images: list[tuple[Store, ImageRecord]]) -> list[tuple[Store, ImageRecord]]:
    m = _HEX64_RE.match(ref)
    if m:
        return [(s, i) for s, i in images if i.id == m.group(1)]
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise StorageError(f"invalid digest in {ref!r}: expected sha256:<64 hex digits>")
        hits = [(s, i) for s, i in images if digest in i.digests]
        if name:
            repo, _ = split_tag(name)
            hits = [(s, i) for s, i in hits if any(_repo_matches(repo, n) for n in i.names)]
        return hits
    repo, tag = split_tag(ref)
    full = f"{repo}:{tag or 'latest'}"
    wanted = {f"{r}:{tag or 'latest'}" for r in _docker_hub_forms(repo)}
    exact = [(s, i) for s, i in images if wanted & set(i.names)]
    if exact:
        return exact
    short = [(s, i) for s, i in images if any(n.endswith("/" + full) for n in i.names)]
    if short:
        return short
    m = _HEX_PREFIX_RE.match(ref)
    if m:
        return [(s, i) for s, i in images if i.id.startswith(m.group(1))]
    return []


def parse_reference(text: str) -> tuple[str | None, str | None, str]:
    """Split c/image's `[driver@graphroot+runroot]name` store prefix off an image reference.

    Returns (driver or None, graphroot or None, name). The runroot is not needed for reading.
    """
    if not text.startswith("["):
        return None, None, text
    end = text.find("]")
    if end < 0:
        raise StorageError(f"invalid containers-storage reference {text!r}: '[' without ']'")
    spec, ref = text[1:end], text[end + 1 :]
    driver, _, rest = spec.rpartition("@")
    root = rest.split("+", 1)[0]
    if not root.startswith("/"):
        raise StorageError(f"invalid containers-storage reference {text!r}: the store path must be absolute")
    return driver or None, root, ref
