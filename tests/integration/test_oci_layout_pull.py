"""`pycfs oci pull oci:DIR[:TAG]` and `pycfs oci import-layer`, end to end through the CLI:
layouts from tests/imagebuild.py, image indexes, zstd layers, corrupt blobs, and images
made by podman (`podman save`) and skopeo (from containers-storage)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest
import zstandard

import imagebuild
from pycfs.host.oci.layer import layer_stream_name
from pycfs.host.oci.streams import encode_tag, list_images, open_image
from pycfs.host.oci.layout import host_platform
from pycfs.host.repository import Repository

pytestmark = pytest.mark.integration


def pycfs(repo: Path, *args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), *args],
                       capture_output=True, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"pycfs {' '.join(args)} exited {p.returncode}: {p.stderr.decode()}")
    return p


def cat_sha256(repo: Path, stream: str) -> str:
    return "sha256:" + hashlib.sha256(pycfs(repo, "cat", stream).stdout).hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    pycfs(path, "init")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> imagebuild.BuiltImage:
    return imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path_factory.mktemp("layout") / "img")


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/")


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return digest, len(data)


def _copy_layout(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def check_pulled(repo_path: Path, tag: str, built: imagebuild.BuiltImage) -> None:
    """Everything a pull must leave behind, checked from the outside."""
    for diff_id in built.diff_ids:
        assert cat_sha256(repo_path, layer_stream_name(diff_id)) == diff_id
    with Repository.open(repo_path) as r:
        assert (tag, built.manifest_digest) in list_images(r)
        img = open_image(r, tag)
        assert img.manifest_raw == _blob(built.path, built.manifest_digest).read_bytes()
        assert img.config_digest == built.config_digest
        assert img.config_raw == _blob(built.path, built.config_digest).read_bytes()
        layer_ids = {d: r.has_stream(layer_stream_name(d)) for d in built.diff_ids}
        assert img.layer_ids == layer_ids and list(img.image_refs) == ["composefs.image.v1"]
        image_id = img.image_refs["composefs.image.v1"]
        assert r.image_id(image_id.hex()) == image_id  # written to images/ by the pull
        manifest_stream = r.open_stream(f"oci-manifest-{built.manifest_digest}")
        assert manifest_stream.named_refs == {f"config:{built.config_digest}": img.config_stream_id, **layer_ids}
        # stream_refs in insertion order: config first, then the layers in config order
        assert manifest_stream.stream_refs == [img.config_stream_id, *dict.fromkeys(layer_ids[d] for d in built.diff_ids)]
        config_stream = r.open_stream(f"oci-config-{built.config_digest}")
        assert config_stream.stream_refs == [*dict.fromkeys(layer_ids[d] for d in built.diff_ids), image_id]
        assert len(config_stream.object_refs) == 1 and config_stream.stream_size == len(img.config_raw)


def test_pull_layout(repo: Path, built: imagebuild.BuiltImage) -> None:
    ref = f"oci:{built.path}"
    out = pycfs(repo, "oci", "pull", ref)
    assert f"manifest {built.manifest_digest}" in out.stdout.decode()
    assert "layers: 3 imported, 0 already present" in out.stderr.decode()
    check_pulled(repo, ref, built)
    link = repo / "streams/refs/oci" / encode_tag(ref)
    assert os.readlink(link) == f"../../oci-manifest-{built.manifest_digest}"
    assert "%2F" in link.name

    # again, under a name: nothing is imported, the same streams are tagged
    before = sorted(p.name for p in (repo / "streams").iterdir())
    out = pycfs(repo, "oci", "pull", ref, "my/image:1")
    assert "layers: 0 imported, 3 already present" in out.stderr.decode()
    assert sorted(p.name for p in (repo / "streams").iterdir()) == before
    check_pulled(repo, "my/image:1", built)


def test_pull_is_deterministic_across_repositories(tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    ids = []
    for name in ("a", "b"):
        path = tmp_path / name
        pycfs(path, "init")
        pycfs(path, "oci", "pull", f"oci:{built.path}", "t")
        ids.append(sorted((p.name, os.readlink(p)) for p in (path / "streams").iterdir() if p.is_symlink()))
    assert ids[0] == ids[1] and len(ids[0]) == 5  # 3 layers, config, manifest


def test_index_with_tags_and_platforms(repo: Path, tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    layout = _copy_layout(built.path, tmp_path / "multi")
    manifest_size = _blob(layout, built.manifest_digest).stat().st_size
    want_os, want_arch = host_platform()
    other = "s390x" if want_arch != "s390x" else "amd64"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            # a foreign platform listed first; its (missing) manifest must never be read
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "e" * 64, "size": 5,
             "platform": {"os": want_os, "architecture": other}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": built.manifest_digest,
             "size": manifest_size, "platform": {"os": want_os, "architecture": want_arch}},
        ],
    }
    index_digest, index_size = _put(layout, json.dumps(index).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index_size,
         "annotations": {"org.opencontainers.image.ref.name": "multi"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": built.manifest_digest,
         "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "direct"}},
    ]}))
    pycfs(repo, "oci", "pull", f"oci:{layout}:multi", "via-index")
    check_pulled(repo, "via-index", built)
    pycfs(repo, "oci", "pull", f"oci:{layout}:direct")
    check_pulled(repo, f"oci:{layout}:direct", built)

    p = pycfs(repo, "oci", "pull", f"oci:{layout}", check=False)
    assert p.returncode == 1 and "holds 2 images: name one" in p.stderr.decode() and "direct, multi" in p.stderr.decode()
    p = pycfs(repo, "oci", "pull", f"oci:{layout}:nope", check=False)
    assert p.returncode == 1 and "no image tagged 'nope'" in p.stderr.decode()

    index["manifests"].pop()
    index_digest, index_size = _put(layout, json.dumps(index).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index_size}]}))
    p = pycfs(repo, "oci", "pull", f"oci:{layout}", check=False)
    assert p.returncode == 1 and f"has no manifest for {want_os}/{want_arch} (has: {want_os}/{other})" in p.stderr.decode()


def _rewrite_layers(layout: Path, built: imagebuild.BuiltImage, transform) -> str:
    """Re-encode every layer blob with transform(tar) -> (bytes, media type); returns the new manifest digest."""
    manifest = json.loads(_blob(layout, built.manifest_digest).read_bytes())
    for desc in manifest["layers"]:
        tar = gzip.decompress(_blob(layout, desc["digest"]).read_bytes())
        data, desc["mediaType"] = transform(tar)
        desc["digest"], desc["size"] = _put(layout, data)
    digest, size = _put(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size}]}))
    return digest


@pytest.mark.parametrize("kind", ["zstd", "plain"])
def test_other_layer_compressions(repo: Path, tmp_path: Path, built: imagebuild.BuiltImage, kind: str) -> None:
    layout = _copy_layout(built.path, tmp_path / kind)
    if kind == "zstd":
        transform = lambda t: (zstandard.ZstdCompressor().compress(t), "application/vnd.oci.image.layer.v1.tar+zstd")
    else:
        transform = lambda t: (t, "application/vnd.oci.image.layer.v1.tar")
    digest = _rewrite_layers(layout, built, transform)
    pycfs(repo, "oci", "pull", f"oci:{layout}", "x")
    for diff_id in built.diff_ids:
        assert cat_sha256(repo, layer_stream_name(diff_id)) == diff_id
    with Repository.open(repo) as r:
        assert list_images(r) == [("x", digest)]


def _no_image_left(repo: Path) -> None:
    with Repository.open(repo) as r:
        assert list_images(r) == []
    names = [p.name for p in (repo / "streams").iterdir()] if (repo / "streams").exists() else []
    assert not [n for n in names if n.startswith(("oci-config-", "oci-manifest-"))]


def test_corrupt_layer_blob_fails_cleanly(repo: Path, tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    layout = _copy_layout(built.path, tmp_path / "corrupt")
    blob = _blob(layout, built.layer_digests[0])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(data)
    p = pycfs(repo, "oci", "pull", "--progress=none", f"oci:{layout}", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("pycfs: error: ") and err.count("\n") == 1, err
    assert "corrupt gzip layer" in err or "does not match its digest" in err or "tar" in err
    _no_image_left(repo)
    assert not (repo / "streams" / layer_stream_name(built.diff_ids[0])).exists()


def test_blob_with_valid_gzip_but_wrong_digest(repo: Path, tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    """A re-compressed layer under the old digest: the tar is right, the blob is not (its
    size already says so, before a byte is read)."""
    layout = _copy_layout(built.path, tmp_path / "recompressed")
    blob = _blob(layout, built.layer_digests[1])
    blob.write_bytes(gzip.compress(gzip.decompress(blob.read_bytes()), compresslevel=9, mtime=1))
    p = pycfs(repo, "oci", "pull", f"oci:{layout}", check=False)
    assert p.returncode == 1
    assert (f"blob {built.layer_digests[1]} has {blob.stat().st_size} bytes, its descriptor says "
            f"{built.layer_sizes[1]}") in p.stderr.decode()
    _no_image_left(repo)
    assert not (repo / "streams" / layer_stream_name(built.diff_ids[1])).exists()


def test_corrupt_config_and_missing_layout(repo: Path, tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    layout = _copy_layout(built.path, tmp_path / "badconfig")
    cfg = _blob(layout, built.config_digest)
    cfg.write_bytes(cfg.read_bytes().replace(b"multilayer", b"MULTILAYER"))
    p = pycfs(repo, "oci", "pull", f"oci:{layout}", check=False)
    assert p.returncode == 1 and f"config {built.config_digest}: blob content does not match its digest" in p.stderr.decode()
    _no_image_left(repo)
    p = pycfs(repo, "oci", "pull", f"oci:{tmp_path}/nonexistent", check=False)
    assert p.returncode == 1 and "is not an OCI image layout" in p.stderr.decode()
    p = pycfs(repo, "oci", "pull", "docker://x/y", check=False)
    assert p.returncode == 1 and "unsupported image reference" in p.stderr.decode()


def test_import_layer_cli(repo: Path, built: imagebuild.BuiltImage) -> None:
    gz = _blob(built.path, built.layer_digests[0]).read_bytes()
    diff_id = built.diff_ids[0]
    out = pycfs(repo, "oci", "import-layer", diff_id, "-", "layer0", input=gz).stdout.decode().strip()
    with Repository.open(repo) as r:
        assert out == "sha256:" + r.has_stream(layer_stream_name(diff_id)).hex()
    assert cat_sha256(repo, layer_stream_name(diff_id)) == diff_id
    assert cat_sha256(repo, "refs/layer0") == diff_id
    wrong = "sha256:" + "a" * 64
    p = pycfs(repo, "oci", "import-layer", wrong, "-", input=gz, check=False)
    assert p.returncode == 1 and f"expected diff_id {wrong}, the tar stream is {diff_id}" in p.stderr.decode()
    assert not (repo / "streams" / layer_stream_name(wrong)).exists()


# ---------------------------------------------------------------------------- podman / skopeo


def _require_root_podman() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: uses root podman storage")
    missing = [t for t in ("podman", "skopeo") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def _tiny_tar() -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("etc/hello", b"hello from a tarfile-made layer\n"), ("bin/blob", os.urandom(200_000)),
                           ("usr/" + "long/" * 30 + "name", b"x" * 65)]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o755
            ti.pax_headers = {"SCHILY.xattr.user.k": "v"}
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("bin/link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "blob"
        tf.addfile(ti)
    return bio.getvalue()


@pytest.fixture
def podman_image(tmp_path: Path):
    _require_root_podman()
    tar = tmp_path / "tiny.tar"
    tar.write_bytes(_tiny_tar())
    ref = f"localhost/pycfs-layout-test-{os.getpid()}:1"
    subprocess.run(["podman", "import", "--quiet", str(tar), ref], check=True, capture_output=True)
    yield ref
    subprocess.run(["podman", "rmi", "--force", ref], capture_output=True)


def test_podman_save_layers(repo: Path, tmp_path: Path, podman_image: str) -> None:
    # OCI layout written by podman: pull it
    oci_dir = tmp_path / "saved-oci"
    subprocess.run(["podman", "save", "--quiet", "--format", "oci-dir", "-o", str(oci_dir), podman_image],
                   check=True, capture_output=True)
    pycfs(repo, "oci", "pull", f"oci:{oci_dir}", "saved")
    with Repository.open(repo) as r:
        img = open_image(r, "saved")
    assert img.diff_ids and all(cat_sha256(repo, layer_stream_name(d)) == d for d in img.diff_ids)

    # docker-archive written by podman: import its layer tars one by one
    archive = tmp_path / "saved.tar"
    subprocess.run(["podman", "save", "--quiet", "--format", "docker-archive", "-o", str(archive), podman_image],
                   check=True, capture_output=True)
    with tarfile.open(archive) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))[0]
        config = json.load(tf.extractfile(manifest["Config"]))
        for member, diff_id in zip(manifest["Layers"], config["rootfs"]["diff_ids"]):
            layer = tmp_path / "layer.tar"
            layer.write_bytes(tf.extractfile(member).read())
            pycfs(repo, "oci", "import-layer", diff_id, str(layer))
            assert cat_sha256(repo, layer_stream_name(diff_id)) == diff_id
    assert config["rootfs"]["diff_ids"] == img.diff_ids


def test_skopeo_layout_from_containers_storage_matches(tmp_path: Path, built: imagebuild.BuiltImage) -> None:
    """Layers regenerated by c/storage (tar-split) are the same bytes, so the same streams."""
    _require_root_podman()
    ref = f"localhost/pycfs-layout-roundtrip-{os.getpid()}:1"
    out = tmp_path / "from-storage"
    try:
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{built.path}", f"containers-storage:{ref}"],
                       check=True, capture_output=True)
        subprocess.run(["skopeo", "copy", "--quiet", f"containers-storage:{ref}", f"oci:{out}"],
                       check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", "--force", ref], capture_output=True)
    streams = []
    for name, src in (("a", built.path), ("b", out)):
        path = tmp_path / name
        pycfs(path, "init")
        pycfs(path, "oci", "pull", f"oci:{src}", "img")
        with Repository.open(path) as r:
            img = open_image(r, "img")
            assert img.diff_ids == built.diff_ids
            streams.append(img.layer_ids)
    assert streams[0] == streams[1]


# ---------------------------------------------------------------------------- GNU tar through the CLI


def _gnu_tree(root: Path) -> Path:
    deep = root / ("L" * 120) / ("M" * 150)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(os.urandom(10_000))  # path > 255 bytes
    (root / ("n" * 101)).write_bytes(b"x" * 65)  # name > 100 bytes
    (root / "big").write_bytes(os.urandom(1_000_000))
    os.link(root / "big", root / "big-link")
    os.symlink("big", root / "sym")
    try:
        os.setxattr(root / "big", "user.pycfs", b"xattr value")
    except OSError:
        pass  # the archive is still a valid posix tar without it
    return root


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
@pytest.mark.parametrize("opts", [["--format=gnu"], ["--format=posix", "--xattrs", "--xattrs-include=*"]],
                         ids=["gnu", "posix-xattrs"])
def test_gnu_tar_cat_sha256(repo: Path, tmp_path: Path, opts: list[str]) -> None:
    src = _gnu_tree(tmp_path / "src")
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(layer), *opts, "."], check=True)
    diff_id = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    for variant, data in (("plain", layer.read_bytes()), ("gzip", gzip.compress(layer.read_bytes()))):
        pycfs(repo, "oci", "import-layer", diff_id, "-", input=data)
        assert cat_sha256(repo, layer_stream_name(diff_id)) == diff_id, variant


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_cli_errors_are_one_line(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    good = subprocess.run(["tar", "-C", str(src), "-c", "."], check=True, capture_output=True).stdout
    bad_sum = bytearray(good)
    bad_sum[512 + 3] ^= 1
    cases = {
        "truncated": (good[:2000], "truncated tar: entry content at offset 2000"),
        "checksum": (bytes(bad_sum), "bad tar header checksum at offset 512"),
        "gzip": (gzip.compress(good)[:-10], "corrupt gzip layer"),
    }
    for name, (data, message) in cases.items():
        p = pycfs(repo, "oci", "import-layer", "sha256:" + hashlib.sha256(data).hexdigest(), "-", input=data, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.startswith("pycfs: error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
    assert not (repo / "streams").exists()


# ---------------------------------------------------------------------------- streams and tags


@pytest.mark.parametrize("tag, encoded", [
    ("docker://quay.io/x/y:tag", "docker:%2F%2Fquay.io%2Fx%2Fy:tag"),
    ("a%b/c", "a%25b%2Fc"),
    ("%2F", "%252F"),
    ("plain:1", "plain:1"),
])
def test_tag_encoding(tag: str, encoded: str) -> None:
    from pycfs.host.oci.streams import decode_tag
    assert encode_tag(tag) == encoded and decode_tag(encoded) == tag


def test_tag_decoding_quirks() -> None:
    from pycfs.host.oci.streams import decode_tag
    assert decode_tag("a%2fb") == "a%2fb"  # case-sensitive
    assert decode_tag("x%2") == "x%2" and decode_tag("%") == "%" and decode_tag("%41") == "%41"


@pytest.mark.parametrize("bad", ["", "@sha256:" + "a" * 64, ".", "..", "x" * 300, "a\0b"])
def test_invalid_tags(bad: str) -> None:
    from pycfs.host.errors import PycfsError
    from pycfs.host.oci.streams import check_tag
    with pytest.raises(PycfsError, match="invalid tag"):
        check_tag(bad)


def test_config_and_manifest_stream_shape(tmp_path: Path) -> None:
    from pycfs.host.oci.streams import (
        publish_image_streams, resolve_image, resolve_tag, store_config_stream, store_manifest_stream, tag_image,
        untag_image,
    )
    from pycfs.host.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_MANIFEST, SplitStreamWriter

    with Repository.init(tmp_path / "r") as r:
        layers = []
        for i in range(2):
            w = SplitStreamWriter(r.alg, 0x726579616C69636F)
            w.write_inline(b"layer %d" % i)
            diff_id = "sha256:" + f"{i}" * 64
            layers.append((diff_id, r.write_stream(w, layer_stream_name(diff_id))))
        config = b"{}"
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        config_id = store_config_stream(r, config_digest, config, layers[::-1])
        publish_image_streams(r, (config_digest, config_id), None)
        cs = r.open_stream(f"oci-config-{config_digest}", CONTENT_OCI_CONFIG)
        assert cs.object_refs == [r.ensure_object(config)] and r.read_object(cs.object_refs[0]) == b"{}"
        assert list(cs.chunks()) == [0] and cs.stream_size == 2
        assert cs.stream_refs == [layers[1][1], layers[0][1]]  # insertion (config) order
        assert cs.named_refs == dict(layers)
        manifest = b'{"schemaVersion": 2}'
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        manifest_id = store_manifest_stream(r, manifest_digest, manifest, config_digest, config_id, layers)
        publish_image_streams(r, None, (manifest_digest, manifest_id))
        ms = r.open_stream(f"oci-manifest-{manifest_digest}", CONTENT_OCI_MANIFEST)
        assert ms.stream_refs == [config_id, layers[0][1], layers[1][1]]
        assert ms.named_refs == {f"config:{config_digest}": config_id, **dict(layers)}
        from pycfs.host.errors import PycfsError
        with pytest.raises(PycfsError, match="manifest digest mismatch"):
            store_manifest_stream(r, "sha256:" + "f" * 64, manifest, config_digest, config_id, layers)
        tag_image(r, "a/b", manifest_digest)
        assert os.readlink(r.path / "streams/refs/oci/a%2Fb") == f"../../oci-manifest-{manifest_digest}"
        assert resolve_tag(r, "a/b") == manifest_digest == resolve_image(r, "@" + manifest_digest)
        assert list_images(r) == [("a/b", manifest_digest)]
        untag_image(r, "a/b")
        assert resolve_tag(r, "a/b") is None and list_images(r) == []
        with pytest.raises(PycfsError, match="no image tagged"):
            resolve_image(r, "a/b")
