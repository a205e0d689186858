"""Reading images.json / layers.json and looking images up like podman (pycfs.host.storage.store)."""

from __future__ import annotations

import json

import pytest

from pycfs.host.storage.store import (
    AmbiguousImage,
    ImageNotFound,
    Storage,
    Store,
    StorageError,
    big_data_name,
    parse_reference,
    split_tag,
)

from storage_trees import FakeStore


def _storage(fake: FakeStore) -> Storage:
    return Storage([Store(fake.root, fake.driver)])


@pytest.fixture(params=["overlay", "vfs"])
def fake(tmp_path, request) -> FakeStore:
    return FakeStore(tmp_path / "storage", request.param)


def test_big_data_names():
    assert big_data_name("manifest") == "manifest"
    assert big_data_name("sha256:abc") == "=" + "c2hhMjU2OmFiYw=="
    assert big_data_name("manifest-sha256:ab") == "=bWFuaWZlc3Qtc2hhMjU2OmFi"


def test_split_tag_and_store_reference():
    assert split_tag("localhost:5000/x") == ("localhost:5000/x", None)
    assert split_tag("localhost:5000/x:1") == ("localhost:5000/x", "1")
    assert parse_reference("[overlay@/srv/st+/run/st]busybox") == ("overlay", "/srv/st", "busybox")
    assert parse_reference("[/srv/st]busybox") == (None, "/srv/st", "busybox")
    assert parse_reference("busybox") == (None, None, "busybox")
    with pytest.raises(StorageError):
        parse_reference("[overlay@relative]x")


def test_lookup_forms(fake):
    base = fake.add_layer({"etc": None, "etc/os": b"base"})
    top = fake.add_layer({"app": b"app" * 40}, parent=base)
    img = fake.add_image([base, top], ["localhost/bookworm:py", "docker.io/library/debian:latest"])
    other = fake.add_image([base], ["localhost/other:1"], {"x": 1})
    s = _storage(fake)
    for ref in ["localhost/bookworm:py", "bookworm:py", "debian", "debian:latest", "library/debian",
                "docker.io/debian", "docker.io/library/debian:latest", img["id"], "sha256:" + img["id"],
                img["id"][:10], "@" + img["manifest_digest"], "debian@" + img["manifest_digest"]]:
        _store, found = s.lookup(ref)
        assert found.id == img["id"], ref
    assert s.lookup("other:1")[1].id == other["id"]
    with pytest.raises(ImageNotFound, match="similar: localhost/other:1"):
        s.lookup("other")  # no tag means :latest
    with pytest.raises(ImageNotFound):
        s.lookup("other@" + img["manifest_digest"])
    with pytest.raises(StorageError, match="invalid digest"):
        s.lookup("x@sha256:1234")


def test_ambiguity_lists_candidates(fake):
    base = fake.add_layer({"a": b"1"})
    a = fake.add_image([base], ["localhost/app:latest"])
    b = fake.add_image([base], ["quay.io/team/app:latest"], {"other": True})
    s = _storage(fake)
    with pytest.raises(AmbiguousImage) as info:
        s.lookup("app")
    msg = str(info.value)
    assert a["id"][:12] in msg and b["id"][:12] in msg and "quay.io/team/app:latest" in msg
    assert s.lookup("quay.io/team/app")[1].id == b["id"]  # exact names are never ambiguous
    prefix = next(n for n in range(1, 64) if a["id"][:n] != b["id"][:n])
    if prefix < 3:
        return
    with pytest.raises(AmbiguousImage):
        s.lookup(a["id"][: prefix - 1])


def test_image_layers_follow_parent_links(fake):
    base = fake.add_layer({"a": b"same content"})
    mid = fake.add_layer({"b": b"mid"}, parent=base)
    top = fake.add_layer({"a": b"same content"}, parent=mid)  # same diff_id as base
    img = fake.add_image([base, mid, top], ["localhost/x:latest"])
    s = _storage(fake)
    store, rec = s.lookup("x")
    diff_ids = json.loads(img["config"])["rootfs"]["diff_ids"]
    layers = s.image_layers(store, rec, diff_ids)
    assert [l.layer.id for l in layers] == [base.id, mid.id, top.id]
    assert [l.diff_id for l in layers] == diff_ids
    if fake.driver == "overlay":
        assert store.lower_layer_ids(top.id) == [mid.id, base.id]
        assert store.layer_dir(top.id) == fake.root / "overlay" / top.id / "diff"
    else:
        assert store.lower_layer_ids(top.id) == []
        assert store.layer_dir(top.id) == fake.root / "vfs" / "dir" / top.id


def test_image_layers_fallback_and_errors(fake):
    base = fake.add_layer({"a": b"1"})
    img = fake.add_image([base], ["localhost/x:latest"])
    s = _storage(fake)
    store, rec = s.lookup("x")
    # A record without a top layer still maps by diff-digest.
    records = json.loads((fake.images_dir / "images.json").read_text())
    records[0]["layer"] = None
    (fake.images_dir / "images.json").write_text(json.dumps(records))
    store, rec = s.lookup("x")
    assert [l.layer.id for l in s.image_layers(store, rec, [base.diff_id])] == [base.id]
    with pytest.raises(StorageError, match="no layer with diff_id sha256:00"):
        s.image_layers(store, rec, ["sha256:" + "0" * 64])
    layers = json.loads((fake.layers_dir / "layers.json").read_text())
    layers[0]["flags"] = {"incomplete": True}
    (fake.layers_dir / "layers.json").write_text(json.dumps(layers))
    with pytest.raises(StorageError):
        Storage([Store(fake.root, fake.driver)]).image_layers(store, rec, [base.diff_id])
    assert img


def test_big_data_and_corrupt_json(fake):
    base = fake.add_layer({"a": b"1"})
    img = fake.add_image([base], ["localhost/x:latest"])
    s = _storage(fake)
    store, rec = s.lookup("x")
    assert store.big_data(rec.id, "manifest") == img["manifest"]
    assert store.big_data(rec.id, "sha256:" + rec.id) == img["config"]
    with pytest.raises(StorageError, match="has no 'nope'"):
        store.big_data(rec.id, "nope")
    (fake.images_dir / "images.json").write_text("[{")
    with pytest.raises(StorageError, match="not valid JSON"):
        s.lookup("x")
    (fake.images_dir / "images.json").write_text('[{"id": "../../etc"}]')
    with pytest.raises(StorageError, match="invalid image id"):
        s.lookup("x")


@pytest.mark.parametrize("content, why", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),  # (before: RecursionError escaped)
    ('[{"id": ' + "1" * 5000 + "}]", "not valid JSON"),  # (before: a bare ValueError escaped)
    ('[{"id": "abc\\n"}]', "invalid image id"),  # ($ of a regex also matched before a final newline)
])
def test_hostile_store_json_is_one_error(fake, content, why):
    fake.add_image([fake.add_layer({"a": b"1"})], ["localhost/x:latest"])
    (fake.images_dir / "images.json").write_text(content)
    with pytest.raises(StorageError, match=why):
        _storage(fake).lookup("x")


def test_store_json_files_must_be_regular_files(fake):
    """A fifo would block the read for ever (a device would feed it without end)."""
    import os
    import threading

    base = fake.add_layer({"a": b"1"})
    fake.add_image([base], ["localhost/x:latest"])
    store, rec = _storage(fake).lookup("x")
    manifest = fake.images_dir / rec.id / big_data_name("manifest")
    layers = fake.layers_dir / "layers.json"
    rescues = []
    for path in (manifest, layers):
        path.unlink()
        os.mkfifo(path)
        # a writer after a while: before, the read blocked until one came (then read nothing)
        rescues.append(threading.Timer(3, lambda p=path: open(p, "wb").close()))
        rescues[-1].start()
    try:
        with pytest.raises(StorageError, match="is not a regular file"):
            store.big_data(rec.id, "manifest")
        with pytest.raises(StorageError, match="is not a regular file"):
            store.layers()
    finally:
        for rescue in rescues:
            rescue.cancel()


def test_additional_store_and_missing_store(tmp_path):
    primary = FakeStore(tmp_path / "primary")
    extra = FakeStore(tmp_path / "extra")
    base = extra.add_layer({"a": b"1"})
    img = extra.add_image([base], ["localhost/ro:latest"])
    primary.images_dir.mkdir(parents=True)
    primary.layers_dir.mkdir(parents=True)
    s = Storage([Store(primary.root, "overlay"), Store(extra.root, "overlay", read_only=True)])
    store, rec = s.lookup("ro")
    assert store.root == extra.root and store.read_only and rec.id == img["id"]
    with pytest.raises(StorageError, match="overlay-images/ is missing"):
        Store(tmp_path / "nothing", "overlay").check()
