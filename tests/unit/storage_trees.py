"""Hand-made containers-storage trees for unit tests (overlay and vfs layouts, no podman)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pycfs.host.storage.store import big_data_name
from pycfs.host.storage.tarsplit import FileEntry, Segment, crc64_iso, write_entries


@dataclass(frozen=True)
class Link:
    """A hard link to `target` (an earlier name of the same layer)."""

    target: str


def _tar_pieces(files: dict[str, bytes | Link | None]) -> tuple[bytes, list[Segment | FileEntry]]:
    """A tar of `files` (names -> content, None content = directory, Link = hard link) and its
    tar-split entries."""
    buf = io.BytesIO()
    spans = []  # (name, content offset, size)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
                spans.append((name, buf.tell(), 0))
            elif isinstance(content, Link):
                info.type = tarfile.LNKTYPE
                info.linkname = content.target
                tf.addfile(info)
                spans.append((name, buf.tell(), 0))
            else:
                info.size = len(content)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(content))
                spans.append((name, buf.tell() - _padded(len(content)), len(content)))
    data = buf.getvalue()
    entries: list[Segment | FileEntry] = []
    pos = 0
    for name, start, size in spans:
        entries.append(Segment(data[pos:start]))
        content = files[name]
        content = content if isinstance(content, bytes) else b""
        entries.append(FileEntry(name.encode(), size, crc64_iso(content) if size else None))
        pos = start + size
    entries.append(Segment(data[pos:]))
    return data, entries


def _padded(n: int) -> int:
    return (n + 511) // 512 * 512


@dataclass
class FakeLayer:
    id: str
    diff_id: str
    tar: bytes
    files: dict[str, bytes | Link | None]


@dataclass
class FakeStore:
    root: Path
    driver: str = "overlay"
    layers: list[FakeLayer] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)

    @property
    def images_dir(self) -> Path:
        return self.root / f"{self.driver}-images"

    @property
    def layers_dir(self) -> Path:
        return self.root / f"{self.driver}-layers"

    def add_layer(self, files: dict[str, bytes | Link | None], parent: FakeLayer | None = None,
                  layer_id: str | None = None) -> FakeLayer:
        tar, entries = _tar_pieces(files)
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        lid = layer_id or hashlib.sha256((diff_id + (parent.id if parent else "")).encode()).hexdigest()
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        with open(self.layers_dir / f"{lid}.tar-split.gz", "wb") as f:
            write_entries(entries, f)
        if self.driver == "overlay":
            d = self.root / "overlay" / lid / "diff"
            link = hashlib.sha256(lid.encode()).hexdigest()[:26].upper()
            (self.root / "overlay" / "l").mkdir(parents=True, exist_ok=True)
            os.symlink(f"../{lid}/diff", self.root / "overlay" / "l" / link)
            (self.root / "overlay" / lid / "link").parent.mkdir(parents=True, exist_ok=True)
            (self.root / "overlay" / lid / "link").write_text(link)
            if parent is not None:
                chain = [parent.id] + self.lower_ids(parent.id)
                links = [(self.root / "overlay" / c / "link").read_text() for c in chain]
                (self.root / "overlay" / lid / "lower").write_text(":".join(f"l/{x}" for x in links))
        else:
            d = self.root / "vfs" / "dir" / lid
            if parent is not None:
                _copy_tree(self.root / "vfs" / "dir" / parent.id, d)
        d.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            p = d / name
            if content is None:
                p.mkdir(parents=True, exist_ok=True)
            elif isinstance(content, Link):
                os.link(d / content.target, p)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(content)
        layer = FakeLayer(lid, diff_id, tar, files)
        rec = {"id": lid, "diff-digest": diff_id, "diff-size": len(tar)}
        if parent is not None:
            rec["parent"] = parent.id
        self.layers.append(layer)
        self._records = getattr(self, "_records", []) + [rec]
        (self.layers_dir / "layers.json").write_text(json.dumps(self._records))
        return layer

    def lower_ids(self, lid: str) -> list[str]:
        lower = self.root / "overlay" / lid / "lower"
        if not lower.exists():
            return []
        out = []
        for entry in lower.read_text().split(":"):
            out.append(os.readlink(self.root / "overlay" / entry).split("/")[-2])
        return out

    def add_image(self, layers: list[FakeLayer], names: list[str], config_extra: dict | None = None) -> dict:
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
                             **(config_extra or {})}).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = json.dumps({"schemaVersion": 2, "config": {"digest": config_digest, "size": len(config)},
                               "layers": []}).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        image_id = config_digest[7:]
        d = self.images_dir / image_id
        d.mkdir(parents=True, exist_ok=True)
        (d / big_data_name(config_digest)).write_bytes(config)
        (d / big_data_name("manifest")).write_bytes(manifest)
        (d / big_data_name(f"manifest-{manifest_digest}")).write_bytes(manifest)
        # As podman writes it: no `digests` (c/storage derives them from the big-data digests)
        rec = {"id": image_id, "digest": manifest_digest, "names": names,
               "layer": layers[-1].id if layers else None,
               "big-data-names": [config_digest, f"manifest-{manifest_digest}", "manifest"],
               "big-data-digests": {config_digest: config_digest, f"manifest-{manifest_digest}": manifest_digest,
                                    "manifest": manifest_digest}}
        self.images.append(rec)
        (self.images_dir / "images.json").write_text(json.dumps(self.images))
        return {**rec, "config": config, "manifest": manifest, "manifest_digest": manifest_digest}


def _copy_tree(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
