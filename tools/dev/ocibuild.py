"""Build OCI image layouts in Python: real images without a registry, for tests and benchmarks.

An image is an `ImageSpec`: a list of layers, each a list of entries (`File`, `Dir`,
`Symlink`, `Hardlink`, `Whiteout`, `Opaque`, `Device`).  `build_layout()` writes an OCI
image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) with gzip layers and
a config whose ``rootfs.diff_ids`` are the sha256 of the uncompressed tars, so
``skopeo copy oci:DIR containers-storage:REF`` accepts it.  `load_into_storage()` does
that copy as a given user.  `flatten()` gives the merged tree a container would see, so
tests can compare what pycfs imported against what the layers mean.

Paths may be ``bytes`` (non-UTF-8 names); they are carried through tarfile with
surrogateescape.  File content is either literal ``data`` or ``size`` + ``seed``
(deterministic pseudo-random bytes generated in chunks, so >100 MiB files need no memory
and rebuild to the same digests in every session).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# 2023-11-14T22:13:20.123456789Z: a non-zero nanosecond part, so tests see whether it survives.
DEFAULT_MTIME_NS = 1_700_000_000_123_456_789

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

_CHUNK = 1 << 20
MIB = 1 << 20

PathLike = str | bytes


def _name(path: PathLike) -> str:
    """Tar member name: relative, no leading '/', bytes decoded with surrogateescape."""
    s = os.fsdecode(path) if isinstance(path, bytes) else path
    return s.lstrip("/")


@dataclass(kw_only=True)
class _Meta:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime_ns: int = DEFAULT_MTIME_NS


@dataclass
class File(_Meta):
    path: PathLike
    data: bytes | None = None
    size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.data is None) == (self.size is None):
            raise ValueError(f"File {self.path!r}: give exactly one of data= or size=")

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else int(self.size or 0)

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        rng = random.Random(self.seed)
        left = int(self.size or 0)
        while left:
            n = min(left, _CHUNK)
            yield rng.randbytes(n)
            left -= n

    def content(self) -> bytes:
        return b"".join(self.chunks())

    def sha256(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()


@dataclass
class Dir(_Meta):
    path: PathLike
    mode: int = field(default=0o755, kw_only=True)


@dataclass
class Symlink(_Meta):
    path: PathLike
    target: PathLike
    mode: int = field(default=0o777, kw_only=True)


@dataclass
class Hardlink:
    """A second name for an earlier entry of the same layer (`target` is that entry's path)."""

    path: PathLike
    target: PathLike


@dataclass
class Whiteout:
    """Deletes `path` from lower layers: written as `dir/.wh.name`."""

    path: PathLike


@dataclass
class Opaque:
    """Hides everything lower layers had in directory `path`: `path/.wh..wh..opq`."""

    path: PathLike


@dataclass
class Device(_Meta):
    path: PathLike
    kind: str = "char"  # "char", "block" or "fifo"
    major: int = 0
    minor: int = 0
    mode: int = field(default=0o666, kw_only=True)


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Device


@dataclass
class ImageSpec:
    layers: list[list[Entry]]
    # Extra keys for the config's "config" object (Env, Cmd, Labels, ...).
    config: dict = field(default_factory=dict)
    gzip: bool = True


@dataclass
class BuiltImage:
    path: Path
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_digests: list[str]
    layer_sizes: list[int]  # compressed blob sizes

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.path}"


class _HashingSink(io.RawIOBase):
    """File-like sink for a streaming tarfile: hashes the raw tar (diff_id), gzips it
    into the blob file and hashes the compressed bytes (blob digest) in one pass."""

    def __init__(self, out, compress: bool) -> None:
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        # wbits=31: gzip container; the header's mtime is 0, so blobs are reproducible.
        self.z = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None

    def writable(self) -> bool:
        return True

    def _emit(self, b: bytes) -> None:
        if b:
            self.blob.update(b)
            self.out.write(b)
            self.size += len(b)

    def write(self, b) -> int:
        b = bytes(b)
        self.diff.update(b)
        self._emit(self.z.compress(b) if self.z else b)
        return len(b)

    def finish(self) -> None:
        if self.z:
            self._emit(self.z.flush())


class _ChunkReader(io.RawIOBase):
    """Read adapter over File.chunks() for tarfile.addfile()."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.it = chunks
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.it)
            except StopIteration:
                break
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _tarinfo(name: str, meta: _Meta) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = meta.mode & 0o7777
    ti.uid, ti.gid = meta.uid, meta.gid
    ti.uname = ti.gname = ""
    sec, ns = divmod(meta.mtime_ns, 1_000_000_000)
    ti.mtime = sec
    pax: dict[str, str] = {}
    if ns:
        # The ustar field holds whole seconds; PAX "mtime" carries the nanoseconds.
        pax["mtime"] = f"{sec}.{ns:09d}"
    for key, value in meta.xattrs.items():
        # tarfile wants str values; surrogateescape round-trips arbitrary bytes
        # (it then marks the header hdrcharset=BINARY).
        pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    return ti


def _write_entry(tf: tarfile.TarFile, e: Entry, metas: dict[str, _Meta]) -> None:
    if isinstance(e, File):
        ti = _tarinfo(_name(e.path), e)
        ti.type = tarfile.REGTYPE
        ti.size = e.length
        tf.addfile(ti, _ChunkReader(e.chunks()))
    elif isinstance(e, Dir):
        ti = _tarinfo(_name(e.path).rstrip("/"), e)
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    elif isinstance(e, Symlink):
        ti = _tarinfo(_name(e.path), e)
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.fsdecode(e.target)
        tf.addfile(ti)
    elif isinstance(e, Hardlink):
        # Like real tars, the link's header repeats its target's metadata: extractors
        # (c/storage too) apply the header's mode and owner to the shared inode.
        target = metas.get(_name(e.target))
        if target is None:
            raise ValueError(f"hardlink {e.path!r}: target {e.target!r} is not earlier in this layer")
        ti = _tarinfo(_name(e.path), target)
        ti.type = tarfile.LNKTYPE
        ti.linkname = _name(e.target)
        tf.addfile(ti)
    elif isinstance(e, Whiteout):
        head, _, base = _name(e.path).rpartition("/")
        ti = _tarinfo((head + "/" if head else "") + WHITEOUT_PREFIX + base, _Meta(mode=0o644))
        tf.addfile(ti)
    elif isinstance(e, Opaque):
        ti = _tarinfo(_name(e.path).rstrip("/") + "/" + OPAQUE_MARKER, _Meta(mode=0o644))
        tf.addfile(ti)
    elif isinstance(e, Device):
        ti = _tarinfo(_name(e.path), e)
        ti.type = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[e.kind]
        ti.devmajor, ti.devminor = e.major, e.minor
        tf.addfile(ti)
    else:
        raise TypeError(f"not an image entry: {e!r}")


def write_layer(entries: list[Entry], out, *, gzip: bool = True) -> tuple[str, str, int]:
    """Write one layer blob to binary file `out`; return (diff_id, blob digest, blob size)."""
    sink = _HashingSink(out, gzip)
    metas: dict[str, _Meta] = {}
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            _write_entry(tf, e, metas)
            if isinstance(e, File):
                metas[_name(e.path)] = e
    sink.finish()
    return "sha256:" + sink.diff.hexdigest(), "sha256:" + sink.blob.hexdigest(), sink.size


def _goarch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}.get(m, m)


def _put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def build_layout(spec: ImageSpec, dest: Path | str) -> BuiltImage:
    """Write `spec` as an OCI image layout in directory `dest` (created; must not hold
    another layout) and return its digests."""
    dest = Path(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    diff_ids, digests, sizes = [], [], []
    for i, entries in enumerate(spec.layers):
        tmp = blobs / f".layer-{i}.tmp"
        with open(tmp, "wb") as f:
            diff_id, digest, size = write_layer(entries, f, gzip=spec.gzip)
        os.replace(tmp, blobs / digest.removeprefix("sha256:"))
        diff_ids.append(diff_id)
        digests.append(digest)
        sizes.append(size)
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": _goarch(),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], **spec.config},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"pycfs imagebuild layer {i}"}
                    for i in range(len(spec.layers))],
    }
    config_digest, config_size = _put_blob(blobs, json.dumps(config, sort_keys=True).encode())
    layer_type = MEDIA_LAYER_GZIP if spec.gzip else MEDIA_LAYER_TAR
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer_type, "digest": d, "size": s} for d, s in zip(digests, sizes)],
    }
    manifest_digest, manifest_size = _put_blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": manifest_size}],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(dest, manifest_digest, config_digest, diff_ids, digests, sizes)


class _User(Protocol):
    def run(self, cmd: list[str], *, check: bool = True, input: bytes | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess: ...


def load_into_storage(user: _User, layout_dir: Path | str, ref: str) -> str:
    """`skopeo copy oci:DIR containers-storage:REF` as `user` (a podman_user fixture);
    returns the image id.  The layout must be readable by that user."""
    layout_dir = Path(layout_dir)
    probe = user.run(["test", "-r", str(layout_dir / "index.json")], check=False)
    if probe.returncode != 0:
        raise PermissionError(f"{layout_dir} is not readable by that user: build layouts "
                              "under a world-readable directory")
    user.run(["skopeo", "copy", "--quiet", f"oci:{layout_dir}", f"containers-storage:{ref}"])
    out = user.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref])
    return out.stdout.decode().strip()


# ---------------------------------------------------------------------------------------
# The merged view


def flatten(spec: ImageSpec) -> dict[bytes, Entry]:
    """The tree a container sees after applying the layers in order (whiteouts and opaque
    markers applied, hardlinks kept as `Hardlink` entries), keyed by absolute path bytes
    (b"/etc/shadow").  Parent directories that no layer lists are not invented."""
    tree: dict[bytes, Entry] = {}

    def key(p: PathLike) -> bytes:
        return b"/" + os.fsencode(_name(p)).rstrip(b"/")

    def drop_below(prefix: bytes, keep_self: bool) -> None:
        for k in [k for k in tree if k.startswith(prefix + b"/") or (not keep_self and k == prefix)]:
            del tree[k]

    for layer in spec.layers:
        # Opaque markers hide only what lower layers had: apply them before this layer's entries.
        for e in layer:
            if isinstance(e, Opaque):
                drop_below(key(e.path), keep_self=True)
        for e in layer:
            if isinstance(e, Whiteout):
                drop_below(key(e.path), keep_self=False)
            elif isinstance(e, Opaque):
                continue
            else:
                k = key(e.path)
                if not isinstance(e, Dir):
                    drop_below(k, keep_self=True)
                tree[k] = e
    return tree


def with_changes(spec: ImageSpec, **kw) -> ImageSpec:
    """A copy of `spec` with fields replaced (e.g. gzip=False)."""
    return dataclasses.replace(spec, **kw)
