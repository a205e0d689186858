"""What a pull did, the same for every transport: counters and the resulting streams."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pycfs.host.oci.image import FinishedImage
    from pycfs.host.storage.image import ImageSource

# The config stream's named ref of each EROFS format's image: V2 is plain `composefs.image`,
# V1 `.v1`; V0 has none. `oci images --json` and `oci pull --json` both name images by them.
IMAGE_REF_NAMES = {2: "composefs.image", 1: "composefs.image.v1"}


def human_size(n: int) -> str:
    """Binary units with two decimals, as composefs-rs prints sizes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class ImportStats:
    """How file content reached the repository. `copied` means bytes were written (from a
    decompressed tar, or a copy where reflinking was impossible); `reflinked` shares extents."""

    layers: int = 0
    layers_already_present: int = 0
    objects_reflinked: int = 0
    objects_copied: int = 0
    objects_already_present: int = 0
    bytes_reflinked: int = 0
    bytes_copied: int = 0
    bytes_already_present: int = 0
    bytes_inlined: int = 0
    files_inlined: int = 0
    files_via_helper: int = 0
    files_stored_by_inflater: int = 0  # oci:DIR: by the worker that split the layer

    def count(self, how: str, size: int) -> None:
        """Record one stored object; how is a StoreResult.how ("reflinked", "copied", "present")."""
        if how == "reflinked":
            self.objects_reflinked += 1
            self.bytes_reflinked += size
        elif how == "copied":
            self.objects_copied += 1
            self.bytes_copied += size
        else:
            self.objects_already_present += 1
            self.bytes_already_present += size

    def add(self, other: ImportStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> str:
        return (
            f"{self.objects_reflinked} reflinked ({human_size(self.bytes_reflinked)}), "
            f"{self.objects_copied} copied ({human_size(self.bytes_copied)}), "
            f"{self.objects_already_present} already present ({human_size(self.bytes_already_present)}); "
            f"{self.files_inlined} small files inline ({human_size(self.bytes_inlined)} with the tar headers)"
        )


@dataclass
class PullResult:
    tag: str | None
    manifest_digest: str
    config_digest: str
    manifest_stream_id: bytes
    config_stream_id: bytes
    layers: list[tuple[str, bytes]]  # (diff_id, layer stream id), base first
    stats: ImportStats = field(default_factory=ImportStats)
    seconds: float = 0.0
    source_id: str | None = None  # the image ID in containers-storage
    names: list[str] = field(default_factory=list)  # its names there
    images: dict[int, bytes] = field(default_factory=dict)  # EROFS format version -> image id

    def to_json(self) -> dict:
        return {
            "tag": self.tag,
            "image_id": self.source_id,
            "names": self.names,
            "manifest": self.manifest_digest,
            "config": self.config_digest,
            "manifest_verity": self.manifest_stream_id.hex(),
            "config_verity": self.config_stream_id.hex(),
            "layers": [{"diff_id": d, "verity": v.hex()} for d, v in self.layers],
            "images": {IMAGE_REF_NAMES[v]: i.hex() for v, i in sorted(self.images.items()) if v in IMAGE_REF_NAMES},
            "stats": asdict(self.stats),
            "seconds": round(self.seconds, 3),
        }


def containers_storage_result(source: ImageSource, finished: FinishedImage, layers: list[tuple[str, bytes]],
                              stats: ImportStats, tag: str | None, started: float) -> PullResult:
    """What a pull from containers-storage did (`started`: its time.monotonic() at the start),
    whether it imported layers or found them all stored (pycfs.host.oci.repull)."""
    return PullResult(
        tag=tag,
        manifest_digest=source.manifest_digest,
        config_digest=source.config_digest,
        manifest_stream_id=finished.manifest_stream_id,
        config_stream_id=finished.config_stream_id,
        layers=layers,
        stats=stats,
        seconds=time.monotonic() - started,
        source_id=source.image.id,
        names=list(source.image.names),
        images=finished.images,
    )
