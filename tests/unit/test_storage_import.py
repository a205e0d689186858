"""The containers-storage importer (pycfs.host.oci.cstorage) on hand-made storage trees."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import socket
import stat
import threading
import time

import pytest
import trio

from fdcount import open_fd_count
from pycfs.host.errors import PycfsError
from pycfs.host.fsck import fsck
from pycfs.host.oci import cstorage
from pycfs.host.erofs.writer import write_image as write_erofs
from pycfs.host.fsverity import digest_bytes
from pycfs.host.oci import merge as merge_module
from pycfs.host.oci.merge import build_filesystem
from pycfs.host.oci.layer import Hardlink, LayerEntry, import_layer
from pycfs.host.oci.result import PullResult
from pycfs.host.oci.streams import list_images
from pycfs.host.progress import PullProgress
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.storage.store import Storage, Store
from pycfs.host.storage.tarsplit import FileEntry, Segment, crc64_iso, iter_entries, write_entries
from pycfs.host.streamcat import iter_stream_bytes

from storage_trees import FakeStore, Link

BIG = bytes(range(256)) * 40 + b"tail"  # > 64 bytes: an object
SMALL = b"small file content"  # inline


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "repo")


def _pull(repo, fake, ref="localhost/img:latest", tag=None, **kw) -> PullResult:
    storage = Storage([Store(fake.root, fake.driver)])
    return trio.run(lambda: cstorage.pull_image(repo, storage, ref, tag, **kw))


def _cat(repo, diff_id) -> bytes:
    return b"".join(iter_stream_bytes(repo, repo.open_stream(f"oci-layer-{diff_id}")))


def _two_layers(fake: FakeStore):
    base = fake.add_layer({"etc": None, "etc/big": BIG, "etc/small": SMALL, "etc/exact64": b"6" * 64,
                           "etc/65": b"5" * 65, "empty": b""})
    top = fake.add_layer({"etc": None, "etc/big": BIG[::-1], "new.bin": BIG + b"!"}, parent=base)
    fake.add_image([base, top], ["localhost/img:latest"])
    return base, top


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_layers_rebuild_byte_exact_and_match_the_tar_path(tmp_path, repo, driver):
    fake = FakeStore(tmp_path / "storage", driver)
    base, top = _two_layers(fake)
    result = _pull(repo, fake, tag="img", verify_diffid=True)
    assert [d for d, _ in result.layers] == [base.diff_id, top.diff_id]
    for layer in (base, top):
        assert _cat(repo, layer.diff_id) == layer.tar
    s = result.stats
    assert (s.layers, s.layers_already_present) == (2, 0)
    # Objects: etc/big, etc/65, etc/big (reversed), new.bin; inline: small, exact64.
    assert s.objects_copied + s.objects_reflinked + s.objects_already_present == 4
    assert s.files_inlined == 2
    assert s.bytes_inlined == len(base.tar) + len(top.tar) - (len(BIG) * 2 + 65 + len(BIG) + 1)
    os.readlink(repo.path / "streams/refs/oci/img")

    # The tar import path cuts the same way: identical stream ids.
    other = Repository.init(tmp_path / "other")
    for layer, (_, stream_id) in zip((base, top), result.layers):
        tar_id, _ = import_layer(other, layer.diff_id, io.BytesIO(layer.tar), compression="none")
        assert tar_id == stream_id

    again = _pull(repo, fake, tag="img")
    assert again.stats.layers_already_present == 2
    assert again.stats.objects_copied == again.stats.objects_reflinked == again.stats.bytes_inlined == 0
    assert again.config_stream_id == result.config_stream_id and again.manifest_stream_id == result.manifest_stream_id


def _make_stub(path, size: int, redirect: bytes | None = None) -> None:
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: no data blocks, like overlay's metacopy upper file
    os.setxattr(path, "user.overlay.metacopy", b"")
    if redirect is not None:
        os.setxattr(path, "user.overlay.redirect", redirect)


def _xattrs_supported(path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def test_metacopy_stub_takes_content_from_lower_layer(tmp_path, repo):
    fake = FakeStore(tmp_path / "storage")
    base = fake.add_layer({"etc": None, "etc/big": BIG, "etc/moved": BIG + b"m"})
    top = fake.add_layer({"etc": None, "etc/big": BIG, "etc/renamed": BIG + b"m"}, parent=base)
    fake.add_image([base, top], ["localhost/img:latest"])
    diff = fake.root / "overlay" / top.id / "diff"
    if not _xattrs_supported(diff):
        pytest.skip(f"no user xattrs on {diff}")
    _make_stub(diff / "etc/big", len(BIG))
    _make_stub(diff / "etc/renamed", len(BIG) + 1, redirect=b"/etc/moved")
    _pull(repo, fake, verify_diffid=True)
    assert _cat(repo, top.diff_id) == top.tar


@pytest.mark.parametrize("redirect, message", [
    (None, r"^etc/big .* is an overlay metacopy stub whose data is in no layer below it"),
    # (a refused redirect named neither its file nor its layer)
    (b"../../../../etc/passwd", r"^etc/big \(layer {layer}, {diff}\): overlay redirect: .* the store is damaged"),
])
def test_a_stub_without_data_below_or_redirected_out_is_an_error_naming_it(tmp_path, repo, redirect, message):
    fake = FakeStore(tmp_path / "storage")
    base = fake.add_layer({"etc": None})
    top = fake.add_layer({"etc": None, "etc/big": BIG}, parent=base)
    fake.add_image([base, top], ["localhost/img:latest"])
    diff = fake.root / "overlay" / top.id / "diff"
    if not _xattrs_supported(diff):
        pytest.skip(f"no user xattrs on {diff}")
    _make_stub(diff / "etc/big", len(BIG), redirect=redirect)
    with pytest.raises(PycfsError, match=message.format(layer=top.id[:12], diff=re.escape(str(diff)))):
        _pull(repo, fake)
    assert repo.has_stream(f"oci-layer-{top.diff_id}") is None


def _single(tmp_path, files):
    fake = FakeStore(tmp_path / "storage")
    layer = fake.add_layer(files)
    fake.add_image([layer], ["localhost/img:latest"])
    return fake, layer, fake.root / "overlay" / layer.id / "diff"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "big").write_bytes(BIG + b"x"), r"big .* has 10245 bytes but the layer's tar-split says 10244"),
    (lambda d: (d / "big").unlink(), r"big .* is missing from the layer directory"),
    (lambda d: ((d / "big").unlink(), os.symlink("/etc/passwd", d / "big")), r"big .* is a symlink"),
    (lambda d: (d / "small").write_bytes(SMALL.upper()), r"small .* does not match the tar-split checksum"),
    (lambda d: ((d / "big").unlink(), (d / "big").mkdir()), r"big .* is a directory, not a regular file"),
])
def test_damaged_layer_files_are_clear_errors(tmp_path, repo, damage, message):
    fake, layer, diff = _single(tmp_path, {"big": BIG, "small": SMALL})
    damage(diff)
    with pytest.raises(PycfsError, match=message):
        _pull(repo, fake)
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None


def test_same_size_change_caught_by_verify_diffid(tmp_path, repo):
    """Content and the tar-split's CRC changed together: only the diff_id can tell."""
    fake, layer, diff = _single(tmp_path, {"big": BIG})
    (diff / "big").write_bytes(BIG[::-1])
    path = fake.layers_dir / f"{layer.id}.tar-split.gz"
    entries = [FileEntry(e.name, e.size, crc64_iso(BIG[::-1])) if isinstance(e, FileEntry) and e.name == b"big" else e
               for e in iter_entries(io.BytesIO(path.read_bytes()))]
    with open(path, "wb") as f:
        write_entries(entries, f)
    with pytest.raises(PycfsError, match="not its diff_id"):
        _pull(repo, fake, verify_diffid=True)
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None


def test_diff_size_mismatch_and_missing_tar_split(tmp_path, repo):
    fake, layer, _diff = _single(tmp_path, {"big": BIG})
    import json
    records = json.loads((fake.layers_dir / "layers.json").read_text())
    records[0]["diff-size"] += 512
    (fake.layers_dir / "layers.json").write_text(json.dumps(records))
    with pytest.raises(PycfsError, match="rebuilt tar is .* bytes, c/storage recorded"):
        _pull(repo, fake)
    (fake.layers_dir / f"{layer.id}.tar-split.gz").unlink()
    with pytest.raises(PycfsError, match="has no tar-split"):
        _pull(repo, fake)


def test_a_tar_split_describing_more_than_the_recorded_size_stops_at_once(tmp_path, repo):
    """One 10 KB file named 2,000 times in a small tar-split (c/storage recorded the tar's
    real size): refused as the entries pass that size, before their files are opened and
    stored (each was opened and hashed, 13 s for 200,000, before the size was compared)."""
    fake, layer, _diff = _single(tmp_path, {"big": BIG})
    path = fake.layers_dir / f"{layer.id}.tar-split.gz"
    entries = list(iter_entries(io.BytesIO(path.read_bytes())))
    at = next(i for i, e in enumerate(entries) if isinstance(e, FileEntry) and e.size)
    with open(path, "wb") as out:
        write_entries(entries[:at] + [entries[at]] * 2000 + entries[at + 1:], out)
    with pytest.raises(PycfsError, match=rf"^the tar-split of layer {layer.id[:12]} describes more than the "
                                         rf"{len(layer.tar)} bytes c/storage recorded for its tar: the store is damaged"):
        _pull(repo, fake)
    assert [p for p in (tmp_path / "repo" / "objects").rglob("*") if p.is_file()] == []


def test_config_digest_checked(tmp_path, repo):
    fake, _layer, _diff = _single(tmp_path, {"big": BIG})
    image_id = fake.images[0]["id"]
    from pycfs.host.storage.store import big_data_name
    (fake.images_dir / image_id / big_data_name("sha256:" + image_id)).write_bytes(b'{"rootfs": {}}')
    with pytest.raises(PycfsError, match="does not match its digest"):
        _pull(repo, fake)


class _RecordingProgress(PullProgress):
    def __init__(self):
        self.events = []
        self.bytes = {}

    def layers(self, layers):
        self.events.append(("layers", [d for d, _ in layers]))

    def phase(self, name):
        self.events.append(("phase", name))

    def waiting_for_lock(self):
        self.events.append("wait")

    def layer_started(self, diff_id, total):
        self.events.append(("start", diff_id, total))
        self.bytes[diff_id] = 0

    def advance(self, diff_id, n):
        self.bytes[diff_id] += n

    def layer_done(self, diff_id, present):
        self.events.append(("done", diff_id, present))


def test_progress_reports_every_byte(tmp_path, repo):
    fake = FakeStore(tmp_path / "storage")
    base, top = _two_layers(fake)
    progress = _RecordingProgress()
    _pull(repo, fake, progress=progress)
    # The top layer's import starts once the base's files are all dealt out (whether before
    # the base is done is the scheduler's business); the layers start and end in order.
    events = progress.events
    assert events[0] == ("layers", [base.diff_id, top.diff_id]) and events[-1] == ("phase", "streams")
    assert sorted(events[1:-1]) == sorted([("start", base.diff_id, len(base.tar)), ("start", top.diff_id, len(top.tar)),
                                           ("done", base.diff_id, False), ("done", top.diff_id, False)])
    order = [e[:2] for e in events[1:-1]]
    assert order.index(("start", base.diff_id)) < order.index(("start", top.diff_id)) < order.index(("done", top.diff_id))
    assert order.index(("done", base.diff_id)) < order.index(("done", top.diff_id))
    assert progress.bytes == {base.diff_id: len(base.tar), top.diff_id: len(top.tar)}
    assert hashlib.sha256(_cat(repo, top.diff_id)).hexdigest() == top.diff_id[7:]


@pytest.mark.parametrize("at_once", [1, 2])
def test_layer_imports_in_flight_are_bounded(tmp_path, repo, monkeypatch, at_once):
    """Four layers: a layer's import starts while the one before drains, with at most
    LAYERS_IN_FLIGHT begun and not done; the layers end in order, and are exact."""
    monkeypatch.setattr(cstorage, "LAYERS_IN_FLIGHT", at_once)
    fake = FakeStore(tmp_path / "storage")
    layers, parent = [], None
    for i in range(4):
        parent = fake.add_layer({f"d{i}": None, **{f"d{i}/f{j}": bytes([i, j]) * (50 + 40 * j) for j in range(6)}},
                                parent=parent)
        layers.append(parent)
    fake.add_image(layers, ["localhost/img:latest"])
    progress = _RecordingProgress()
    _pull(repo, fake, progress=progress, parse_layers=True)
    begun = most = 0
    for event in progress.events:
        begun += {"start": 1, "done": -1}.get(event[0], 0)
        most = max(most, begun)
    assert most == at_once
    assert [e[1] for e in progress.events if e[0] == "done"] == [l.diff_id for l in layers]
    assert all(_cat(repo, l.diff_id) == l.tar for l in layers)


def test_one_worker_and_a_repeated_layer_and_parsed_entries(tmp_path, repo):
    """jobs=1; a diff_id twice in one image imports once; the image built from the layers
    parsed during the import is the one built from the stored streams."""
    fake = FakeStore(tmp_path / "storage", "overlay")
    files = {"etc": None, "etc/big": BIG, "etc/small": SMALL}
    base = fake.add_layer(files)
    again = fake.add_layer(files, parent=base)
    assert again.diff_id == base.diff_id
    fake.add_image([base, again], ["localhost/img:latest"])
    result = _pull(repo, fake, jobs=1, parse_layers=True)
    (stream_id,) = {s for _, s in result.layers}
    assert [d for d, _ in result.layers] == [base.diff_id, base.diff_id]
    assert (result.stats.layers, result.stats.layers_already_present) == (2, 1)
    assert _cat(repo, base.diff_id) == base.tar
    assert result.images and result.images == {
        v: digest_bytes(write_erofs(build_filesystem(repo, [base.diff_id] * 2, {base.diff_id: stream_id}), v), repo.alg)
        for v in result.images}


def test_an_image_listing_more_layers_than_pycfs_takes_is_refused_storing_nothing(tmp_path, repo, monkeypatch):
    """Each listing of a layer is merged (a layer listed 100,000 times took 145 CPU-s): the
    containers-storage pull refuses past MAX_IMAGE_LAYERS, naming the image, before a byte."""
    from pycfs.host.oci import streams

    monkeypatch.setattr(streams, "MAX_IMAGE_LAYERS", 2)
    fake = FakeStore(tmp_path / "storage", "overlay")
    base = fake.add_layer({"etc": None, "etc/big": BIG})
    fake.add_image([base] * 3, ["localhost/img:latest"])
    with pytest.raises(PycfsError, match=r"^the config of 'localhost/img:latest' in containers-storage lists 3 "
                                         r"layers, more than the 2 pycfs takes \(rebuild the image with fewer"):
        _pull(repo, fake, tag="img")
    assert [p for p in (tmp_path / "repo" / "objects").rglob("*") if p.is_file()] == []
    assert list_images(repo) == []


def _merging_image(fake: FakeStore):
    """Three layers: hardlinks, whiteouts, opaque directories (one emptying what its own
    layer added before it), inline and object files, /usr and /run for the OCI rules."""
    base = fake.add_layer({
        "usr": None, "usr/lib": None, "usr/lib/big": BIG, "usr/lib/small": SMALL, "usr/lib/hard": Link("usr/lib/big"),
        "etc": None, "etc/conf": BIG + b"c", "opt": None, "opt/keep": None, "opt/keep/a": BIG + b"a",
        "opt/keep/b": SMALL, "run": None, "run/x": SMALL,
    })
    middle = fake.add_layer({
        "etc": None, "etc/.wh.conf": b"", "opt": None, "opt/keep": None, "opt/keep/.wh..wh..opq": b"",
        "opt/keep/new": BIG * 2, "usr": None, "usr/bin": None, "usr/bin/tool": BIG[::-1],
        "usr/bin/tool2": Link("usr/bin/tool"),
    }, parent=base)
    top = fake.add_layer({
        "usr": None, "usr/lib": None, "usr/lib/.wh.small": b"", "srv": None, "srv/a": BIG + b"s",
        "srv/.wh..wh..opq": b"", "srv/b": SMALL + b"b", "usr/lib/big": b"replaced " * 20,
    }, parent=middle)
    fake.add_image([base, middle, top], ["localhost/img:latest"])
    return [base, middle, top]


def _fds_outside(repo) -> list[str]:
    """What this process's fds lead to, but the repository's own directories."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # (listdir's own fd)
            continue
        if not target.startswith(str(repo.path)):
            out.append(target)
    return sorted(out)


def test_a_later_layer_failing_while_one_before_drains_commits_nothing_of_it(tmp_path, repo, monkeypatch):
    """Imports overlap (a layer starts while the one before drains): the top layer's damaged
    file fails the pull; the layers below are whole or absent, the top one absent, no image
    is tagged and no fd is left open."""
    monkeypatch.setattr(cstorage, "CHUNK_ENTRIES", 2)  # many chunks: the layers overlap for longer
    fake = FakeStore(tmp_path / "storage", "overlay")
    base, middle, top = _merging_image(fake)
    (fake.root / "overlay" / top.id / "diff" / "srv/a").write_bytes(BIG + b"S")  # same size, other bytes
    before = _fds_outside(repo)
    with pytest.raises(PycfsError, match=r"cannot store srv/a .* does not match the layer.s tar-split checksum"):
        _pull(repo, fake, parse_layers=True)
    assert _fds_outside(repo) == before  # (the repository keeps its directories' fds)
    assert repo.has_stream(f"oci-layer-{top.diff_id}") is None
    for layer in (base, middle):
        assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None or _cat(repo, layer.diff_id) == layer.tar
    assert not (repo.path / "streams/refs").exists() or not any((repo.path / "streams/refs").rglob("*"))


@pytest.mark.parametrize("chunk_entries", [2, cstorage.CHUNK_ENTRIES])
def test_image_from_the_entries_parsed_in_the_import(tmp_path, repo, monkeypatch, chunk_entries):
    """A pull builds its image from the entries parsed while the layers are written, never
    reading an imported layer's stream back, and that image is byte for byte the one built
    from the stored streams; a layer already stored is read back, with the same result."""
    monkeypatch.setattr(cstorage, "CHUNK_ENTRIES", chunk_entries)  # entries cut by chunk ends
    fake = FakeStore(tmp_path / "storage", "overlay")
    layers = _merging_image(fake)
    diff_ids = [layer.diff_id for layer in layers]
    read_back = []
    real_iter = merge_module.iter_layer_entries
    monkeypatch.setattr(merge_module, "iter_layer_entries",
                        lambda reader: read_back.append(reader) or real_iter(reader))

    result = _pull(repo, fake, parse_layers=True)
    assert read_back == [] and set(result.images) == {repo.erofs_default}
    fs = build_filesystem(repo, diff_ids, dict(result.layers))
    assert len(read_back) == 3
    for version, image_id in result.images.items():
        assert repo.read_object(image_id) == write_erofs(fs, version)
    root = fs.root
    assert root.lookup(b"/etc/conf") is None and root.lookup(b"/usr/lib/small") is None
    assert sorted(root.lookup(b"/opt/keep").entries) == [b"new"]
    assert sorted(root.lookup(b"/srv").entries) == [b"b"]
    assert root.lookup(b"/usr/bin/tool") is root.lookup(b"/usr/bin/tool2")
    assert root.lookup(b"/usr/lib/hard").content.id != root.lookup(b"/usr/lib/big").content.id
    assert root.lookup(b"/run").entries == {}

    other = Repository.init(tmp_path / "other")
    import_layer(other, layers[0].diff_id, io.BytesIO(layers[0].tar), compression="none")
    read_back.clear()
    again = _pull(other, fake, parse_layers=True)
    assert len(read_back) == 1 and again.stats.layers_already_present == 1
    assert again.images == result.images


def test_the_image_is_written_while_the_workers_exit(tmp_path, repo, monkeypatch):
    """Once every file is stored, the object workers are told to exit and the c/storage
    locks are let go, and the image is written meanwhile: the pool is waited for after
    it, not before (~30-50 ms of worker exits a pull no longer waits for first)."""
    from pycfs.host.workers.pool import WorkerPool

    fake = FakeStore(tmp_path / "storage", "overlay")
    _two_layers(fake)
    storage = Storage([Store(fake.root, fake.driver)])
    locks = storage.read_locks()
    seen: list[tuple] = []
    real_finish, real_close, real_aclose = cstorage.finish_pull, WorkerPool.close_input, WorkerPool.aclose

    def finish(*args, **kw):
        seen.append(("finish", locks.held))
        return real_finish(*args, **kw)

    def close_input(self) -> None:
        seen.append(("close_input",))
        real_close(self)

    async def aclose(self, abort: bool = False) -> None:
        await real_aclose(self, abort)
        seen.append(("workers gone",))

    monkeypatch.setattr(cstorage, "finish_pull", finish)
    monkeypatch.setattr(WorkerPool, "close_input", close_input)
    monkeypatch.setattr(WorkerPool, "aclose", aclose)
    result = trio.run(lambda: cstorage.pull_image(repo, storage, "localhost/img:latest", parse_layers=True,
                                                  locks=locks))
    assert seen[:2] == [("close_input",), ("finish", False)] and seen[-1] == ("workers gone",)
    assert set(result.images) == {repo.erofs_default} and not locks.held


def test_image_tree_gives_way_to_the_stored_streams_when_broken(tmp_path, repo):
    """An entry that does not apply, or entries that could not be parsed, break the tree
    built during the pull, as does a layer list other than the image's: the image is then
    built from the stored streams (which reports the error), never from a partial tree."""
    fake = FakeStore(tmp_path / "storage", "overlay")
    layers = _merging_image(fake)
    result = _pull(repo, fake)
    ids = [stream_id for _, stream_id in result.layers]
    entries = list(merge_module.stored_entries(repo, ids[0]))
    dangling = LayerEntry(b"/x", entries[1].stat, Hardlink(b"/nowhere"))
    for bad in ([*entries, dangling], None):
        tree = merge_module.ImageTree(repo)
        tree.apply(bad)
        tree.end_layer(ids[0])
        assert tree.broken and tree.filesystem(ids[:1]) is None
    tree = merge_module.ImageTree(repo)
    tree.add_stored(ids[0])
    tree.apply(merge_module.stored_entries(repo, ids[1]))
    tree.end_layer(ids[1])
    assert tree.filesystem(ids[:1]) is None  # not the layers it was built from
    tree = merge_module.ImageTree(repo)
    for layer_id in ids:
        tree.add_stored(layer_id)
    fs = tree.filesystem(ids)
    assert fs is not None and write_erofs(fs, 1) == write_erofs(build_filesystem(repo, [l.diff_id for l in layers],
                                                                                 dict(result.layers)), 1)


@pytest.mark.parametrize("chunk_entries,in_flight", [(1, 1), (3, 1), (5, 2)])
def test_layers_stream_through_small_chunks(tmp_path, repo, monkeypatch, chunk_entries, in_flight):
    """The tar-split read a few entries at a time, with little read-ahead: the same streams."""
    monkeypatch.setattr(cstorage, "CHUNK_ENTRIES", chunk_entries)
    monkeypatch.setattr(cstorage, "CHUNKS_IN_FLIGHT", in_flight)
    fake = FakeStore(tmp_path / "storage", "overlay")
    files = {"d": None, **{f"d/f{i}": bytes([i]) * (i * 37) for i in range(12)}}
    layer = fake.add_layer(files)
    fake.add_image([layer], ["localhost/img:latest"])
    result = _pull(repo, fake, verify_diffid=True)
    assert _cat(repo, layer.diff_id) == layer.tar
    other = Repository.init(tmp_path / "other")
    tar_id, _ = import_layer(other, layer.diff_id, io.BytesIO(layer.tar), compression="none")
    assert result.layers == [(layer.diff_id, tar_id)]


_COUNT_BATCHES = """
import json, sys
from pathlib import Path

import trio
from pycfs.host.oci import cstorage
from pycfs.host.repository import Repository
from pycfs.host.storage.store import Storage, Store
from pycfs.host.workers.pool import WorkerPool

sent = []
store = WorkerPool.store

async def counting(self, fds, *args, **kwargs):
    sent.append(len(fds))
    return await store(self, fds, *args, **kwargs)

WorkerPool.store = counting
storage = Storage([Store(Path(sys.argv[2]), "overlay")])
with Repository.open(sys.argv[1]) as repo:
    trio.run(lambda: cstorage.pull_image(repo, storage, "localhost/img:latest", jobs=2))
print(json.dumps(sorted(sent)))
"""


def test_batches_follow_the_open_file_limit(tmp_path, repo):
    """Files go to the object workers `batch_files()` at a time: an eighth of the soft
    open-file limit (50 at 400), within one message's fds (252 at any higher limit), so
    the coordinators' batches in flight stay within half the limit; the layer is exact.
    In a process of its own: this one may have more fds open than the low limit allows."""
    import resource
    import subprocess
    import sys

    fake = FakeStore(tmp_path / "storage", "overlay")
    layer = fake.add_layer({"d": None, **{f"d/f{i:03}": BIG + i.to_bytes(2, "big") for i in range(120)}})
    fake.add_image([layer], ["localhost/img:latest"])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = subprocess.run([sys.executable, "-c", _COUNT_BATCHES, str(repo.path), str(fake.root)], check=True,
                         capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))).stdout
    assert json.loads(out) == [20, 50, 50]
    assert _cat(repo, layer.diff_id) == layer.tar


def test_helper_gate_starts_the_helper_once_for_concurrent_callers(tmp_path):
    """Coordinators meet denied files at the same time: one lets the locks go and starts the
    helper, the others wait for it; the locks are let go and taken back exactly once."""
    fake = FakeStore(tmp_path / "storage", "overlay")
    layer = fake.add_layer({"f": b"x" * 100})
    fake.add_image([layer], ["localhost/img:latest"])
    storage = Storage([Store(fake.root, fake.driver)])
    source = cstorage.read_image(storage, "localhost/img:latest")
    calls = []

    class Locks:
        def release(self):
            calls.append("release")

        async def acquire(self, on_wait=None):
            calls.append("acquire")

    class Helper:
        info = None

        async def hello(self):
            calls.append("hello")
            await trio.sleep(0.01)
            self.info = {"pid": 1}
            return self.info

        async def open_files(self, layer_id, paths, store=None):
            calls.append("open")
            return []

    gate = cstorage._HelperGate(Helper(), Locks(), storage, source, "localhost/img:latest", None)

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(gate.open_files, "a" * 64, [b"f"])

    trio.run(main)
    assert calls == ["release", "hello", "acquire"] + ["open"] * 4


def test_tar_split_corrupt_half_way_commits_nothing_and_leaks_nothing(tmp_path, repo, monkeypatch):
    """Chunks before the bad line are already stored when the error comes: the pull fails
    naming the line, no layer stream appears, the repository checks clean, no fd stays open,
    and a re-run after the tar-split is repaired completes."""
    monkeypatch.setattr(cstorage, "CHUNK_ENTRIES", 4)
    fake = FakeStore(tmp_path / "storage", "overlay")
    layer = fake.add_layer({"d": None, **{f"d/f{i:02d}": bytes([i]) * (100 + i) for i in range(30)}})
    fake.add_image([layer], ["localhost/img:latest"])
    path = fake.layers_dir / f"{layer.id}.tar-split.gz"
    good = path.read_bytes()
    lines = gzip.decompress(good).split(b"\n")
    lines[40] = b'{"type": 1, "name": "d/f15", "size": "not a number"}'
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    before = open_fd_count()
    with pytest.raises(PycfsError, match=r"tar-split.gz: line 41: .*invalid size"):
        _pull(repo, fake)
    assert open_fd_count() == before
    assert not list((repo.path / "streams").glob("oci-layer-*"))
    assert fsck(repo).ok
    path.write_bytes(good)
    result = _pull(repo, fake)
    assert _cat(repo, layer.diff_id) == layer.tar and result.stats.layers == 1


# ---- nothing but a regular file is ever opened -----------------------------------------


@contextlib.contextmanager
def _unblock_fifo_after(path, after: float = 10):
    """Should an open of the fifo at `path` block, open its write end after `after` seconds
    so the test ends (a blocked open in a thread cannot be cancelled)."""
    done = threading.Event()

    def run():
        if not done.wait(after):
            with contextlib.suppress(OSError):  # ENXIO: nobody blocked in opening it
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _bind_socket(path) -> None:
    cwd = os.getcwd()
    os.chdir(path.parent)  # a socket's path must fit in 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")


@pytest.mark.parametrize("kind, make", [
    ("a fifo", os.mkfifo),
    ("a socket", _bind_socket),
    # /dev/tty's numbers: opening it without a terminal fails with ENXIO, so an open shows.
    ("a character device", lambda p: (_need_root(), os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(5, 0)))),
    ("a block device", lambda p: (_need_root(), os.mknod(p, 0o666 | stat.S_IFBLK, os.makedev(7, 255)))),
])
def test_special_files_where_content_is_expected_are_refused_unopened(tmp_path, repo, kind, make):
    """A fifo, socket or device node in place of a file with data: one error naming the
    layer and the path, at once (a fifo once hung the pull in open() for good)."""
    fake, layer, diff = _single(tmp_path, {"big": BIG, "small": SMALL})
    for name in ("big", "small"):
        (diff / name).unlink()
        make(diff / name)
    started = time.monotonic()
    with _unblock_fifo_after(diff / "big"), pytest.raises(
            PycfsError, match=rf"(big|small) \(layer {layer.id[:12]}, .*\) is {kind}, not a regular file"):
        _pull(repo, fake)
    assert time.monotonic() - started < 5
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None


def _patch_header(fake, layer, name: bytes, fields: dict[int, bytes]) -> None:
    """Rewrite fields (offset in the ustar header: bytes) of the tar header before `name`
    in the layer's tar-split."""
    path = fake.layers_dir / f"{layer.id}.tar-split.gz"
    entries = list(iter_entries(io.BytesIO(path.read_bytes())))
    at = next(i for i, e in enumerate(entries) if isinstance(e, FileEntry) and e.name == name)
    header = bytearray(entries[at - 1].data)
    for offset, value in fields.items():
        start = len(header) - 512 + offset
        header[start : start + len(value)] = value
    entries[at - 1] = Segment(bytes(header))
    with open(path, "wb") as f:
        write_entries(entries, f)


def test_header_only_entry_with_a_size_is_refused_unopened(tmp_path, repo):
    """A tar entry that is a fifo (no data, whatever its size field says) but whose tar-split
    entry has a size: refused from the tar-split alone, the layer file never opened."""
    fake, layer, diff = _single(tmp_path, {"big": BIG})
    _patch_header(fake, layer, b"big", {156: b"6"})
    (diff / "big").unlink()
    os.mkfifo(diff / "big")
    with _unblock_fifo_after(diff / "big"), pytest.raises(
            PycfsError, match=rf"big \(layer {layer.id[:12]}, .*\) is a fifo in the layer's tar, "
                              r"yet its tar-split entry gives it 10244 bytes"):
        _pull(repo, fake)
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None


# ---- a wrong layer is never committed ----------------------------------------------------


def _same_size_change(d):
    (d / "big").write_bytes(BIG[::-1])


def _hardlink_to_other(d):
    (d / "big").unlink()
    os.link(d / "other", d / "big")


def _dir_is_symlink(d):
    """overlay/<id>/diff replaced by a symlink to a look-alike tree elsewhere."""
    elsewhere = d.parent.parent.parent.parent / "elsewhere"
    elsewhere.mkdir()
    for p in d.iterdir():
        (elsewhere / p.name).write_bytes(p.read_bytes())
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    d.symlink_to(elsewhere)


@pytest.mark.parametrize("damage, message", [
    (_same_size_change, r"cannot store big \(layer .*\): its content does not match the layer's tar-split checksum"),
    (_hardlink_to_other, r"cannot store big \(layer .*\): its content does not match the layer's tar-split checksum"),
    (_dir_is_symlink, r"layer directory .*/diff is or passes through a symlink, or is no directory: refused"),
])
def test_wrong_content_fails_the_layer_without_verify_diffid(tmp_path, repo, damage, message):
    """Same-size edits pass every size check; the tar-split's per-file CRC-64, checked on the
    bytes stored, catches them (these pulls once exited 0). A symlinked layer directory is
    refused before anything is read through it."""
    other = bytes(reversed(range(256))) * 40 + b"TAIL"
    fake, layer, diff = _single(tmp_path, {"big": BIG, "other": other})
    damage(diff)
    with pytest.raises(PycfsError, match=message):
        _pull(repo, fake)
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is None
    assert not (repo.path / "streams/refs").exists() or not list((repo.path / "streams/refs").rglob("*"))


def test_a_file_missing_from_its_layer_is_not_taken_from_below(tmp_path, repo):
    """The upper layer lists etc/big but its directory lacks it: the lower layer's file of
    the same name (here even the same content) is not a stand-in; only an overlay metacopy
    stub sends the lookup down."""
    fake = FakeStore(tmp_path / "storage")
    base = fake.add_layer({"etc": None, "etc/big": BIG})
    top = fake.add_layer({"etc": None, "etc/big": BIG, "etc/new": SMALL}, parent=base)
    fake.add_image([base, top], ["localhost/img:latest"])
    (fake.root / "overlay" / top.id / "diff" / "etc/big").unlink()
    with pytest.raises(PycfsError, match=rf"etc/big \(layer {top.id[:12]}, .*\) is missing from the layer directory"):
        _pull(repo, fake)
    assert repo.has_stream(f"oci-layer-{top.diff_id}") is None


def test_verify_diffid_rechecks_a_layer_already_present(tmp_path, repo):
    """A stored layer stream that is intact (its objects present) but not the layer's tar:
    --verify-diffid re-hashes it and imports the layer again; without, it is taken."""
    fake, layer, _ = _single(tmp_path, {"big": BIG})
    wrong = repo.new_stream(CONTENT_OCI_LAYER)
    wrong.write_inline(layer.tar[:-1] + b"!")
    repo.write_stream(wrong, f"oci-layer-{layer.diff_id}")
    assert _pull(repo, fake).stats.layers_already_present == 1
    result = _pull(repo, fake, verify_diffid=True)
    assert result.stats.layers_already_present == 0
    assert _cat(repo, layer.diff_id) == layer.tar


class _WarmHelper:
    """A helper opener that records calls; its hello fails with `fail`."""

    def __init__(self, calls: list, fail: bool = False, hang: bool = False) -> None:
        self.info: dict | None = None
        self.calls = calls
        self.fail = fail
        self.hang = hang

    async def hello(self) -> dict:
        self.calls.append("hello")
        if self.fail:
            raise PycfsError("podman unshare failed")
        if self.hang:
            try:
                await trio.sleep_forever()
            finally:
                self.calls.append("hello given up")
        self.info = {"pid": 2}
        return self.info

    async def open_files(self, layer_id, paths, store=None):
        self.calls.append(("open", list(paths)))
        return []

    def release(self, fd: int) -> None:
        raise AssertionError("no fd was handed out")

    async def aclose(self) -> None:
        self.stops = getattr(self, "stops", 0) + 1
        stopping = getattr(self, "stopping", None)
        if stopping is not None:
            stopping.set()


def test_the_helper_stops_while_the_image_is_written(tmp_path, repo, monkeypatch):
    """Once every file is stored the helper is stopped beside the image build, not after
    it: its exit, and `podman unshare`'s tidy-up, overlap the finish."""
    fake, layer, _ = _single(tmp_path, {"big": BIG, "small": SMALL})
    helper = _WarmHelper([])
    helper.stopping = threading.Event()
    real = cstorage.finish_pull

    def finishing(*args, **kwargs):
        assert helper.stopping.wait(10), "the helper was not stopped while the image was written"
        return real(*args, **kwargs)

    monkeypatch.setattr(cstorage, "finish_pull", finishing)
    result = _pull(repo, fake, helper=helper, parse_layers=True)
    assert helper.stops == 1 and set(result.images) == {repo.erofs_default}
    assert _cat(repo, layer.diff_id) == layer.tar


@pytest.mark.parametrize("fail", [False, True])
def test_helper_starts_as_soon_as_the_tar_split_shows_a_file_closed_to_the_user(tmp_path, repo, monkeypatch, fail):
    """A file of another uid that only its owner may read (mode 0600, uid 1000 in its tar
    header): the reader starts the helper when it reads that entry, before any file is
    opened, so the helper's start-up overlaps the import. Here the user can read the file
    after all: nothing is asked of the helper, and a helper that fails to start does not
    fail the pull."""
    monkeypatch.setattr(cstorage, "CHUNK_ENTRIES", 4)
    fake = FakeStore(tmp_path / "storage", "overlay")
    files = {"d": None, **{f"d/f{i:02d}": bytes([i]) * (100 + i) for i in range(20)}}
    layer = fake.add_layer(files)
    fake.add_image([layer], ["localhost/img:latest"])
    _patch_header(fake, layer, b"d/f05", {100: b"0000600\0", 108: b"0001750\0"})
    calls: list = []
    _record_opens(monkeypatch, calls)
    result = _pull(repo, fake, helper=_WarmHelper(calls, fail))
    assert calls.count("hello") == 1
    # Started when the reader took f05's chunk (two files a chunk), before f08's was read.
    assert calls.index("hello") < calls.index(b"d/f08")
    assert sorted(c for c in calls if c != "hello") == [f"d/f{i:02d}".encode() for i in range(20)]
    assert result.stats.files_via_helper == 0
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is not None


def _record_opens(monkeypatch, calls: list) -> None:
    """Append each layer file's relative path to `calls` as the import opens it."""
    real_open = cstorage.LayerFiles.open

    def open_file(self, relpath, size):
        calls.append(relpath)
        return real_open(self, relpath, size)

    monkeypatch.setattr(cstorage.LayerFiles, "open", open_file)


def test_no_helper_start_for_world_readable_files_of_another_uid(tmp_path, repo):
    calls: list = []
    fake, layer, _ = _single(tmp_path, {"big": BIG, "small": SMALL})
    _patch_header(fake, layer, b"big", {100: b"0000644\0", 108: b"0001750\0"})
    _pull(repo, fake, helper=_WarmHelper(calls))
    assert calls == []
    assert repo.has_stream(f"oci-layer-{layer.diff_id}") is not None


def _record_ids(fake, uidset, gidset) -> None:
    """Give the fake store's (only) layer record c/storage's uidset and gidset."""
    path = fake.layers_dir / "layers.json"
    records = json.loads(path.read_text())
    for key, ids in (("uidset", uidset), ("gidset", gidset)):
        if ids is not None:
            records[0][key] = ids
    path.write_text(json.dumps(records))


@pytest.mark.parametrize("uidset, gidset, foreign", [
    (None, None, False), ([0], [0], False), ([0, 1000], [0], True), ([0], [0, 5], True), ("0", None, False),
])  # fmt: skip
def test_layer_records_say_whether_files_use_other_ids(tmp_path, uidset, gidset, foreign):
    fake, _, _ = _single(tmp_path, {"big": BIG})
    _record_ids(fake, uidset, gidset)
    source = cstorage.read_image(Storage([Store(fake.root, fake.driver)]), "localhost/img:latest")
    assert source.layers[0].layer.foreign_ids is foreign


def test_helper_starts_with_the_import_when_c_storage_records_other_ids(tmp_path, repo, monkeypatch):
    """A layer whose uidset names uid 1000: the helper is started before the first file is
    opened, though every header here is the user's own (nothing is asked of it then)."""
    fake, layer, _ = _single(tmp_path, {"big": BIG, "small": SMALL})
    _record_ids(fake, [0, 1000], [0])
    calls: list = []
    _record_opens(monkeypatch, calls)
    result = _pull(repo, fake, helper=_WarmHelper(calls))
    assert calls[0] == "hello" and sorted(calls[1:]) == [b"big", b"small"]
    assert result.stats.files_via_helper == 0 and _cat(repo, layer.diff_id) == layer.tar


def test_a_helper_start_no_file_needed_is_not_waited_for(tmp_path, repo, monkeypatch):
    """c/storage records other ids, so the helper is started early, but `podman unshare`
    hangs and no file needs it: the pull gives the start up once its layers are imported
    (it used to wait up to HELLO_TIMEOUT), and still looks the image up again under the
    re-taken locks, since they were let go while the start ran."""
    fake, layer, _ = _single(tmp_path, {"big": BIG, "small": SMALL})
    _record_ids(fake, [0, 1000], [0])
    calls: list = []
    _record_opens(monkeypatch, calls)
    real_read_image = cstorage.read_image

    def read_image(storage, ref):
        calls.append("read_image")
        return real_read_image(storage, ref)

    monkeypatch.setattr(cstorage, "read_image", read_image)
    storage = Storage([Store(fake.root, fake.driver)])

    async def pull() -> PullResult:
        with trio.fail_after(20):  # the old code waited for ever here
            return await cstorage.pull_image(repo, storage, "localhost/img:latest", helper=_WarmHelper(calls, hang=True))

    result = trio.run(pull)
    assert calls[:2] == ["read_image", "hello"] and calls[-2:] == ["hello given up", "read_image"]
    assert sorted(calls[2:-2]) == [b"big", b"small"]
    assert result.stats.files_via_helper == 0 and _cat(repo, layer.diff_id) == layer.tar


def test_an_image_changed_while_the_helper_started_is_not_tagged(tmp_path, repo, monkeypatch):
    """The helper's start lets the c/storage locks go; the image is looked up again once it
    ended. When podman changed the image meanwhile the pull fails before anything is tagged
    (the image build used to run beside that look, and tag first)."""
    from pycfs.host.oci.streams import list_images

    fake, _, _ = _single(tmp_path, {"big": BIG, "small": SMALL})
    _record_ids(fake, [0, 1000], [0])
    calls: list = []
    real_read_image = cstorage.read_image
    reads = 0

    def read_image(storage, ref):
        nonlocal reads
        reads += 1
        image = real_read_image(storage, ref)
        return image if reads == 1 else dataclasses.replace(image, layers=[])  # podman changed it

    monkeypatch.setattr(cstorage, "read_image", read_image)
    storage = Storage([Store(fake.root, fake.driver)])

    async def pull() -> PullResult:
        with trio.fail_after(20):
            return await cstorage.pull_image(repo, storage, "localhost/img:latest", "img", parse_layers=True,
                                             helper=_WarmHelper(calls, hang=True))

    with pytest.raises(PycfsError, match="changed in containers-storage while the helper started"):
        trio.run(pull)
    assert reads == 2 and list_images(repo) == []


def _layout_of(path, layers) -> None:
    """A minimal OCI layout of these (uncompressed) layers' tars, tagged "latest"."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(l.tar)} for l in layers]}).encode()
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _pulled_unchecked(tmp_path, repo, edited: bool):
    """A one-layer store pulled without --verify-diffid, its file's tar header made setuid
    (checksum fixed: it passes the per-file checks) when ``edited``: (store, layer, the
    layer stream's object id, marked unchecked)."""
    fake, layer, _diff = _single(tmp_path, {"big": BIG})
    if edited:
        header = {100: b"0004755\0"}  # the mode, setuid
        _patch_header(fake, layer, b"big", header)
        entries = list(iter_entries(io.BytesIO((fake.layers_dir / f"{layer.id}.tar-split.gz").read_bytes())))
        at = next(i for i, e in enumerate(entries) if isinstance(e, FileEntry) and e.name == b"big")
        raw = bytearray(entries[at - 1].data)
        h = len(raw) - 512
        raw[h + 148:h + 156] = b" " * 8
        raw[h + 148:h + 156] = b"%06o\0 " % sum(raw[h:h + 512])
        _patch_header(fake, layer, b"big", {148: bytes(raw[h + 148:h + 156])})
    _pull(repo, fake)
    stored = repo.has_stream(f"oci-layer-{layer.diff_id}")
    assert stored is not None and not repo.stream_verified(stored)
    return fake, layer, stored


@pytest.mark.parametrize("edited", [False, True])
def test_fsck_verify_layers_finds_an_unchecked_layer_and_repair_marks_it_checked(tmp_path, repo, edited):
    """`fsck --verify-layers` re-hashes a layer stream imported unchecked: an edited one is a
    diff_id mismatch (--repair removes it); a genuine one is noted and --repair clears its
    mark (it was kept for ever before: only a checked pull of the layer cleared it)."""
    _fake, layer, stored = _pulled_unchecked(tmp_path, repo, edited)
    rel = f"streams/oci-layer-{layer.diff_id}"
    report = fsck(repo, verify_layers=True)
    assert report.layers_verified == 1 and report.marks_cleared == [] and not repo.stream_verified(stored)
    if edited:
        assert [(k, p) for k, p, _ in report.errors] == [("layer-diffid-mismatch", rel)]
        assert report.unverified_ok == []
        report = fsck(repo, verify_layers=True, repair=True)
        assert rel in report.repaired and repo.has_stream(f"oci-layer-{layer.diff_id}") is None
        return
    assert report.ok and report.unverified_ok == [rel]
    assert "`pycfs fsck --verify-layers --repair` marks them checked" in "\n".join(report.lines())
    report = fsck(repo, verify_layers=True, repair=True)
    assert report.ok and report.marks_cleared == [rel] and report.repaired == [] and repo.stream_verified(stored)
    assert fsck(repo, verify_layers=True).unverified_ok == []


@pytest.mark.parametrize("edited", [False, True])
def test_a_layer_imported_unchecked_is_not_reused_by_a_checked_source(tmp_path, repo, edited):
    """A tar header edited in containers-storage (a file made setuid, its checksum fixed)
    passes the per-file checks; the layer stream the default pull (no --verify-diffid) made
    of it was taken as that diff_id by a later oci:DIR pull of the genuine layer ("already
    present") and by HasLayer. Now such a stream is marked unchecked: the checked source
    imports the layer again, which replaces an edited stream or, for the same bytes, clears
    the mark."""
    from pycfs.host.oci.layout import pull_oci_layout
    from pycfs.host.varlink.client import Client
    from pycfs.host.varlink.serve import open_service
    from pycfs.host.varlink.transport import socketpair

    _fake, layer, stored = _pulled_unchecked(tmp_path, repo, edited)

    async def has_layer() -> bool:
        async with open_service() as server:
            conn, sock = socketpair()
            server.nursery.start_soon(server.serve_connection, sock)
            client = Client(conn)
            handle = (await client.call("org.composefs.Repository.OpenRepository",
                                        {"path": str(tmp_path / "repo")})).parameters["handle"]
            present = (await client.call("org.composefs.Oci.HasLayer", {"handle": handle,
                                                                          "diff_id": layer.diff_id})).parameters
            client.close()
            return present["present"]

    assert trio.run(has_layer) is False
    _layout_of(tmp_path / "oci", [layer])
    result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "genuine", jobs=1))
    assert result.stats.layers_already_present == 0
    assert _cat(repo, layer.diff_id) == layer.tar  # the genuine tar, whatever the store held
    again = repo.has_stream(f"oci-layer-{layer.diff_id}")
    assert repo.stream_verified(again) and (again != stored) is edited
    assert trio.run(has_layer) is True
