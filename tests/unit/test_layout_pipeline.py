"""oci:DIR layers through the pipelined import: a thread splits, the object workers adopt the
files it wrote; streams byte-exact, objects named by their digests, nothing left on failure."""

import array
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import trio
import zstandard

from imagebuild import Device, Dir, File, Hardlink, ImageSpec, Opaque, Symlink, Whiteout, build_layout
from pycfs.host.erofs import format as erofs_format
from pycfs.host.erofs.writer import write_image as write_erofs
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.oci import layer as layer_module
from pycfs.host.oci import merge as merge_module
from pycfs.host.oci import streams as streams_module
from pycfs.host.oci.layer import EntryLimitError, PendingFile, close_pieces, layer_stream_name
from pycfs.host.oci.layout import _PieceSource, pull_oci_layout
from pycfs.host.oci.result import PullResult
from pycfs.host.oci.streams import list_images
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.protocol import worker_api as api

# Enough files for several runs of the splitter (64 files each) in the first layer.
SPEC = ImageSpec([
    [Dir("a")] + [File(f"a/f{i}", size=(i * 997) % 9000 + 65, seed=i) for i in range(300)],
    [Dir("b"), File("b/big", size=3 << 20, seed=1000), File("b/tiny", data=b"x" * 64),
     File("b/dup", size=997 + 65, seed=1)],  # same content as a/f1
], gzip=True)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("layout") / "oci"
    return d, build_layout(SPEC, d)


def _fds() -> list[str]:
    """What this process has open (the fd of the listing itself gone by the time it is read)."""
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{f}"))
        except OSError:
            pass
    return sorted(out)


def _objects(repo: Path) -> list[str]:
    return sorted(p.parent.name + p.name for p in (repo / "objects").glob("??/*"))


def _pull_checked(tmp_path: Path, built) -> PullResult:
    """Pull tmp_path/oci into a new repository tmp_path/repo (no image, 2 jobs); each layer
    stream must reassemble to its diff_id. The pull's result."""
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", build_image=False, jobs=2))
        for diff_id in built.diff_ids:
            reader = repo.open_stream(layer_stream_name(diff_id))
            assert "sha256:" + hashlib.sha256(b"".join(iter_stream_bytes(repo, reader))).hexdigest() == diff_id
    return result


def test_pull_stores_every_file_as_its_object(tmp_path, layout):
    path, built = layout
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(path), "x", build_image=False, jobs=2))
        for diff_id in built.diff_ids:
            reader = repo.open_stream(layer_stream_name(diff_id))
            assert "sha256:" + hashlib.sha256(b"".join(iter_stream_bytes(repo, reader))).hexdigest() == diff_id
    files = [e for layer in SPEC.layers for e in layer if isinstance(e, File) and e.length > 64]
    want = sorted({digest_bytes(f.content()).hex() for f in files})
    assert set(want) <= set(_objects(tmp_path / "repo"))  # besides the streams' own objects
    assert result.stats.objects_copied == len(want) and result.stats.objects_already_present == 1
    assert result.stats.files_stored_by_inflater == 0  # one layer over twice the other: the object workers store
    assert not [p for p in (tmp_path / "repo" / "objects").iterdir() if p.is_file()]  # no named temp file


def test_a_layer_alone_stores_every_file_through_the_object_workers(tmp_path):
    """One layer to import: its files go to the object workers (two layers: the inflating
    workers store them, above); the same objects and stream either way."""
    spec = ImageSpec(SPEC.layers[:1], gzip=True)
    built = build_layout(spec, tmp_path / "oci")
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", build_image=False, jobs=2))
        reader = repo.open_stream(layer_stream_name(built.diff_ids[0]))
        assert "sha256:" + hashlib.sha256(b"".join(iter_stream_bytes(repo, reader))).hexdigest() == built.diff_ids[0]
    want = sorted({digest_bytes(f.content()).hex() for f in spec.layers[0] if isinstance(f, File) and f.length > 64})
    assert set(want) <= set(_objects(tmp_path / "repo"))
    assert result.stats.objects_copied == len(want) == 300
    assert result.stats.files_stored_by_inflater == 0


def test_layers_of_like_sizes_are_stored_by_their_inflating_workers(tmp_path):
    """Two layers of about the same size (`inflaters_store`): each inflating worker makes
    its files objects itself, none goes to the object workers; the same objects and streams."""
    spec = ImageSpec([[Dir(d)] + [File(f"{d}/f{i}", size=(i * 997) % 9000 + 65, seed=i + n * 1000) for i in range(150)]
                      for n, d in enumerate(("a", "b"))], gzip=True)
    built = build_layout(spec, tmp_path / "oci")
    result = _pull_checked(tmp_path, built)
    want = {digest_bytes(f.content()).hex() for layer in spec.layers for f in layer if isinstance(f, File)}
    assert want <= set(_objects(tmp_path / "repo"))
    assert result.stats.objects_copied == len(want) == 300
    # the layer done first stored its own; the other may have handed some off (below)
    assert 150 <= result.stats.files_stored_by_inflater <= 300


def test_the_layer_left_inflating_hands_its_files_to_the_idle_inflater(tmp_path, monkeypatch):
    """Inflaters storing their files: once the other layer is inflated, the larger one,
    still inflating (held here until then, its worker blocked on a full socket), hands the
    rest of its files to the inflater now idle, which hashes and links them. Every object
    is named by its content, the streams are the tars."""
    import threading

    from pycfs.host.oci import layout as layout_module

    spec = ImageSpec([[Dir(d)] + [File(f"{d}/f{i}", size=100 + i % 50, seed=i + n * 10_000) for i in range(count)]
                      for n, (d, count) in enumerate((("big", 2400), ("small", 2000)))], gzip=False)
    built = build_layout(spec, tmp_path / "oci")
    other_inflated = threading.Event()
    sources: list[object] = []
    real_init, real_chunk, real_inflated = (layout_module._PieceSource.__init__, layout_module._PieceSource.chunk,
                                            layout_module._Handoff.inflated)

    def init(self, *args, **kw):
        sources.append(self)  # the larger layer first (the pull starts the largest first)
        real_init(self, *args, **kw)

    def chunk(self, *args, **kw):
        if self is sources[0]:
            assert other_inflated.wait(60)
        return real_chunk(self, *args, **kw)

    def inflated(self, diff_id):
        real_inflated(self, diff_id)
        if diff_id == built.diff_ids[1]:
            other_inflated.set()

    monkeypatch.setattr(layout_module._PieceSource, "__init__", init)
    monkeypatch.setattr(layout_module._PieceSource, "chunk", chunk)
    monkeypatch.setattr(layout_module._Handoff, "inflated", inflated)
    result = _pull_checked(tmp_path, built)
    want = {digest_bytes(f.content()).hex() for layer in spec.layers for f in layer if isinstance(f, File)}
    objects = (tmp_path / "repo" / "objects").glob("??/*")
    assert {p.parent.name + p.name: digest_bytes(p.read_bytes()).hex() for p in objects if p.name[0] != "."} \
        .items() >= {w: w for w in want}.items()
    assert result.stats.objects_copied == len(want) == 4400
    # the small layer's 2,000 stored by its inflater, and the first runs of the big one
    assert 2000 <= result.stats.files_stored_by_inflater < 4400 - 1000


@pytest.mark.parametrize("hand_off_unread", [False, True])
def test_a_run_of_pieces_holds_at_most_max_run_fds_files(hand_off_unread):
    """The inflating worker's messages (here of 63, then 64 files) are cut into the host's
    runs at api.MAX_RUN_FDS files, even inside a message: the fds a layer holds in flight
    are CHUNKS_IN_FLIGHT runs of at most that many. Every piece comes, in order; also when
    the worker closed with a HAND_OFF unread (sent as it finished), which the kernel reports
    as a reset before the pieces still queued."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sizes = [100 + i for i in range(63 + 64)]
    records = []
    for i, size in enumerate(sizes):
        records += [(api.piece_record(api.PIECE_INLINE, b"%d;" % i), None),
                    (api.piece_record(api.PIECE_FILE, size=size), os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))]
    records.append((api.piece_record(api.PIECE_INLINE, b"end"), None))
    try:
        for part in (records[: 2 * 63], records[2 * 63 :]):
            (message, fds), = api.pack_runs(part)
            theirs.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    finally:
        for _, fd in records:
            if fd is not None:
                os.close(fd)
    if hand_off_unread:
        ours.send(api.HAND_OFF)
    theirs.close()
    source = _PieceSource(32)
    source.open(ours)
    source.done.set()  # the worker's answer

    async def take() -> list:
        runs = []
        while run := await trio.to_thread.run_sync(source.chunk):
            runs.append(run)
        return runs

    runs = trio.run(take)
    source.close()
    try:
        assert [sum(isinstance(p, PendingFile) for p in run) for run in runs] == [api.MAX_RUN_FDS, 63]
        pieces = [p for run in runs for p in run]
        assert [p.size for p in pieces if isinstance(p, PendingFile)] == sizes
        assert b"".join(p for p in pieces if isinstance(p, bytes)) == b"".join(b"%d;" % i for i in range(127)) + b"end"
        assert source.count == sum(sizes) + len(b"".join(b"%d;" % i for i in range(127)) + b"end")
    finally:
        for run in runs:
            close_pieces(run)


def test_a_blob_cut_short_commits_nothing_and_leaks_no_fd(tmp_path, layout):
    path, built = layout
    blob = path / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]
    cut = tmp_path / "cut"
    os.system(f"cp -r {path} {cut}")
    (cut / blob.relative_to(path)).write_bytes(blob.read_bytes()[: blob.stat().st_size * 2 // 3])
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match=r"has \d+ bytes, its descriptor says \d+"):
            trio.run(lambda: pull_oci_layout(repo, str(cut), "x", build_image=False, jobs=2))
        # The repository keeps its directories open (itself, objects/, objects/XX/); nothing else of it
        # stays open (the files written for the workers show as objects/#INODE (deleted)).
        repo_dir = str(tmp_path / "repo")
        assert [f for f in _fds() if f.startswith(repo_dir) and not re.search(r"/repo(/objects(/[0-9a-f]{2})?)?$", f)] == []
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None


MERGING = ImageSpec([
    [Dir("usr"), Dir("usr/lib", xattrs={"user.d": b"1"}),
     File("usr/lib/big", size=5000, seed=1, xattrs={"security.capability": b"c", "user.x": b"1", "trusted.t": b"2"}),
     File("usr/lib/small", data=b"s"),
     Hardlink("usr/lib/hard", "usr/lib/big"), Dir("etc"), File("etc/conf", size=700, seed=2), Dir("opt"),
     Dir("opt/keep")] + [File(f"opt/keep/f{i}", size=(i * 37) % 200, seed=10 + i) for i in range(150)]
    + [Dir("run"), File("run/x", data=b"x")],
    [Whiteout("etc/conf"), Opaque("opt/keep"), File("opt/keep/new", size=300, seed=3),
     Symlink("usr/lib/sym", "big"), Device("usr/lib/null", major=1, minor=3)],
    [Whiteout("usr/lib/small"), Dir("srv"), File("srv/a", size=90, seed=4), Opaque("srv"), File("srv/b", data=b"b"),
     File("usr/lib/big", size=4000, seed=5)],
], gzip=False)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_image_from_the_entries_parsed_in_the_import(tmp_path, monkeypatch, compression):
    """The image of an oci: pull is built from the entries parsed while the layers are
    written (no layer stream read back), byte for byte the one built from the stored streams."""
    spec = ImageSpec(MERGING.layers, gzip=compression == "gzip")
    built = build_layout(spec, tmp_path / "oci")
    read_back = []
    real_iter = merge_module.iter_layer_entries
    monkeypatch.setattr(merge_module, "iter_layer_entries",
                        lambda reader: read_back.append(reader) or real_iter(reader))
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2))
        assert read_back == [] and set(result.images) == {repo.erofs_default}
        fs = merge_module.build_filesystem(repo, built.diff_ids, dict(result.layers))
        assert len(read_back) == 3
        assert repo.read_object(result.images[repo.erofs_default]) == write_erofs(fs, repo.erofs_default)
        assert sorted(fs.root.lookup(b"/opt/keep").entries) == [b"new"]
        assert fs.root.lookup(b"/usr/lib/hard") is not fs.root.lookup(b"/usr/lib/big")
        assert fs.root.lookup(b"/etc/conf") is None and sorted(fs.root.lookup(b"/srv").entries) == [b"b"]
        # OCI normalisation: only security.capability is kept, on every inode
        assert fs.root.lookup(b"/usr/lib/hard").stat.xattrs == {b"security.capability": b"c"}
        assert fs.root.lookup(b"/usr/lib").stat.xattrs == {}


def test_entries_parsed_in_the_import_stay_out_of_collections_until_the_pull_ends(tmp_path, monkeypatch):
    """The entries parsed while the layers are imported (all alive until the image is
    written) are frozen out of the cyclic collector's generations as they come, and given
    back when the pull ends, whether or not it wrote an image."""
    import gc

    from pycfs.host.oci import layout as layout_module

    build_layout(ImageSpec(MERGING.layers, gzip=False), tmp_path / "oci")
    frozen_at_finish = []  # at the image's build
    real_finish = layout_module.pull_images

    def finish(*args, **kw):
        frozen_at_finish.append(gc.get_freeze_count())
        return real_finish(*args, **kw)

    def fail(*args, **kw):
        frozen_at_finish.append(gc.get_freeze_count())
        raise PycfsError("no image today")

    assert gc.get_freeze_count() == 0
    try:
        with Repository.init(tmp_path / "repo") as repo:
            monkeypatch.setattr(layout_module, "pull_images", finish)
            trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2))
            assert frozen_at_finish[-1] > 200 and gc.get_freeze_count() == 0
        with Repository.init(tmp_path / "repo2") as repo:
            monkeypatch.setattr(layout_module, "pull_images", fail)
            with pytest.raises(PycfsError, match="no image today"):
                trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2))
            assert frozen_at_finish[-1] > 200 and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_the_image_is_written_while_the_workers_exit(tmp_path, monkeypatch):
    """Once every layer is in, both pools (object and inflating workers) are told to exit
    and the image is written meanwhile: they are waited for after it, not before."""
    from pycfs.host.oci import layout as layout_module
    from pycfs.host.workers.pool import WorkerPool

    build_layout(ImageSpec(MERGING.layers, gzip=False), tmp_path / "oci")
    seen: list[str] = []
    real_finish, real_close, real_aclose = layout_module.finish_pull, WorkerPool.close_input, WorkerPool.aclose

    def finish(*args, **kw):
        seen.append("finish")
        return real_finish(*args, **kw)

    def close_input(self) -> None:
        seen.append("close_input")
        real_close(self)

    async def aclose(self, abort: bool = False) -> None:
        await real_aclose(self, abort)
        seen.append("workers gone")

    monkeypatch.setattr(layout_module, "finish_pull", finish)
    monkeypatch.setattr(WorkerPool, "close_input", close_input)
    monkeypatch.setattr(WorkerPool, "aclose", aclose)
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2))
        assert set(result.images) == {repo.erofs_default}
    assert seen[:3] == ["close_input", "close_input", "finish"]
    assert seen.count("workers gone") == 2 and seen.index("workers gone") > seen.index("finish")


def test_the_next_layer_starts_once_the_inflating_worker_is_free(tmp_path, monkeypatch):
    """One inflating worker, several layers: the second layer's inflate starts as soon as the
    worker is done with the first, while the first is still being committed (its syncfs),
    not after."""
    import threading

    from pycfs.host.oci import layout as layout_module
    from pycfs.host.workers.pool import WorkerPool

    build_layout(ImageSpec(MERGING.layers, gzip=False), tmp_path / "oci")
    inflates, second_started = [], threading.Event()
    waited: list[bool] = []
    real_inflate, real_commit = WorkerPool.inflate, layout_module.publish_layer

    async def inflate(self, *args, **kw):
        inflates.append(args)
        if len(inflates) == 2:
            second_started.set()
        return await real_inflate(self, *args, **kw)

    def commit(*args, **kw):
        if not waited:  # the first layer's commit: held until the other layer is inflating
            waited.append(second_started.wait(10))
        return real_commit(*args, **kw)

    monkeypatch.setattr(WorkerPool, "inflate", inflate)
    monkeypatch.setattr(layout_module, "publish_layer", commit)
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", build_image=False, jobs=1))
        assert result.stats.layers == len(inflates) == len(MERGING.layers)
        for diff_id, _ in result.layers:
            assert repo.has_stream(layer_stream_name(diff_id)) is not None
    assert waited == [True]


def test_the_image_is_built_while_the_last_layer_is_made_durable(tmp_path, monkeypatch):
    """Once every layer's stream is stored, the image is built beside the syncfs that makes
    the last one visible, not after it; the image and its streams become visible only after
    that, and the image is the one built from the stored streams."""
    import threading

    from pycfs.host.oci import layout as layout_module

    built = build_layout(ImageSpec(MERGING.layers, gzip=False), tmp_path / "oci")
    image_stored = threading.Event()
    waited: list[bool] = []
    visible_at_last_commit: list[list[str]] = []
    real_images, real_publish = layout_module.pull_images, layout_module.publish_layer
    publishes: list[str] = []

    def pull_images(*args, **kw):
        result = real_images(*args, **kw)
        image_stored.set()
        return result

    def publish(repo, diff_id, *args, **kw):
        publishes.append(diff_id)
        if len(publishes) == len(MERGING.layers):  # the last layer's commit: held until the image is stored
            waited.append(image_stored.wait(10))
            visible_at_last_commit.append([n for top in ("images", "streams") if (repo.path / top).exists()
                                           for n in os.listdir(repo.path / top) if not n.startswith("oci-layer-")])
        return real_publish(repo, diff_id, *args, **kw)

    monkeypatch.setattr(layout_module, "pull_images", pull_images)
    monkeypatch.setattr(layout_module, "publish_layer", publish)
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=1))
        assert waited == [True] and visible_at_last_commit[0] in ([], ["refs"])
        fs = merge_module.build_filesystem(repo, built.diff_ids, dict(result.layers))
        assert repo.read_object(result.images[repo.erofs_default]) == write_erofs(fs, repo.erofs_default)
        assert repo.image_id(result.images[repo.erofs_default].hex()) == result.images[repo.erofs_default]
        assert [t for t, _ in list_images(repo)] == ["x"]


def test_forked_inflaters_are_used_and_the_spare_ones_stopped(tmp_path, monkeypatch, idle_threads_allowed):
    """Inflating workers forked before the event loop (`fork_pull_workers`, as the CLI does for
    an oci: pull) inflate the layers: the inflaters' pool spawns none, and a forked worker
    it has no layer for is stopped and reaped by the end of the pull."""
    from pycfs.host.oci.pull import fork_pull_workers
    from pycfs.host.workers.pool import WorkerPool

    build_layout(ImageSpec(MERGING.layers, gzip=False), tmp_path / "oci")
    inflating, spawned = set(), []
    real_inflate, real_spawn = WorkerPool.inflate, WorkerPool._spawn

    async def inflate(self, *args, **kw):
        inflating.add(id(self))
        return await real_inflate(self, *args, **kw)

    async def spawn(self):
        spawned.append(id(self))
        return await real_spawn(self)

    monkeypatch.setattr(WorkerPool, "inflate", inflate)
    monkeypatch.setattr(WorkerPool, "_spawn", spawn)
    with Repository.init(tmp_path / "repo") as repo:
        forked = fork_pull_workers(repo, 3)
        assert len(forked) == 3
        workers = list(forked)
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2, forked=forked))
        for diff_id, _ in result.layers:
            reader = repo.open_stream(layer_stream_name(diff_id))
            assert "sha256:" + hashlib.sha256(b"".join(iter_stream_bytes(repo, reader))).hexdigest() == diff_id
    assert len(inflating) == 1 and not inflating & set(spawned)
    assert forked == []  # taken out of the list: the two the pool took, and the spare one
    for worker in workers:  # every one reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(worker.proc.pid, os.WNOHANG)


def _put(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest


def _zstd_layout(src: Path, dest: Path, tar_of=lambda i, tar: tar, blob_of=None) -> None:
    """A copy of the gzip layout src with zstd layers (tar_of may change a layer's tar,
    blob_of make a layer's blob of it)."""
    shutil.copytree(src, dest)
    blobs = dest / "blobs" / "sha256"
    index = json.loads((dest / "index.json").read_bytes())
    entry = index["manifests"][0]
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
    cctx = zstandard.ZstdCompressor()
    for i, layer in enumerate(manifest["layers"]):
        tar = tar_of(i, zlib.decompress((blobs / layer["digest"].split(":")[1]).read_bytes(), wbits=31))
        # two frames cut inside an entry: the inflater's batches cross frames and entries
        blob = cctx.compress(tar[: len(tar) // 2 + 123]) + cctx.compress(tar[len(tar) // 2 + 123 :])
        if blob_of is not None:
            blob = blob_of(i, tar) or blob
        layer.update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd", digest=_put(blobs, blob),
                     size=len(blob))
    raw = json.dumps(manifest).encode()
    entry.update(digest=_put(blobs, raw), size=len(raw))
    (dest / "index.json").write_text(json.dumps(index))


def test_zstd_layers_store_every_file_and_name_streams_by_diff_id(tmp_path, layout):
    """The inflating thread hands the splitting thread the tar across frames and batches:
    the streams read back as the tars of the diff_ids, every file is its object."""
    path, built = layout
    _zstd_layout(path, tmp_path / "zstd")
    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "zstd"), "x", jobs=2))
        for diff_id in built.diff_ids:
            reader = repo.open_stream(layer_stream_name(diff_id))
            assert "sha256:" + hashlib.sha256(b"".join(iter_stream_bytes(repo, reader))).hexdigest() == diff_id
        assert result.images
    files = [e for layer in SPEC.layers for e in layer if isinstance(e, File) and e.length > 64]
    assert {digest_bytes(f.content()).hex() for f in files} <= set(_objects(tmp_path / "repo"))


@pytest.mark.parametrize("damage", ["diff_id", "blob"])
def test_a_zstd_layer_not_matching_its_digests_commits_nothing(tmp_path, layout, damage):
    """A blob whose tar is not its diff_id (here: a zero block more after the end marker,
    still a valid tar), or a blob not matching its digest: one error, no layer stream, no fd left."""
    path, built = layout
    cut = tmp_path / "zstd"
    _zstd_layout(path, cut, lambda i, tar: tar + bytes(512) if i == 0 and damage == "diff_id" else tar)
    if damage == "blob":
        manifest_digest = json.loads((cut / "index.json").read_bytes())["manifests"][0]["digest"]
        manifest = json.loads((cut / "blobs/sha256" / manifest_digest.split(":")[1]).read_bytes())
        blob = cut / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
        data = bytearray(blob.read_bytes())
        data[-5] ^= 1  # the last frame's checksum-free tail: decompresses, to other bytes or an error
        blob.write_bytes(data)
    before = _fds()
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match="diff_id" if damage == "diff_id" else "digest|corrupt zstd"):
            trio.run(lambda: pull_oci_layout(repo, str(cut), "x", build_image=False, jobs=2))
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None
        assert list_images(repo) == []
    assert _fds() == before


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_blob_that_is_not_a_regular_file_is_refused_at_once(tmp_path, layout, kind):
    """A fifo would block the open, /dev/zero would feed the pull without end: both are one
    line naming the blob, within seconds, nothing committed."""
    path, built = layout
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    blob = bad / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        blob.symlink_to("/dev/zero")
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match=f"blob {built.layer_digests[0]} is not a regular file"):
            trio.run(lambda: _within(20, pull_oci_layout(repo, str(bad), "x", build_image=False, jobs=2)))
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None


async def _within(seconds: float, job):
    with trio.fail_after(seconds):
        return await job


def test_an_endless_tail_after_the_end_marker_is_refused(tmp_path, layout):
    """A small blob that decompresses to a tar followed by a long run of zeros (a
    decompression bomb) is refused past MAX_TRAILING, without holding it all in memory."""
    path, built = layout
    bomb = tmp_path / "bomb"
    _zstd_layout(path, bomb, lambda i, tar: tar + bytes(64 << 20) if i == 0 else tar)
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match="more than 16 MiB after the tar's end marker"):
            trio.run(lambda: _within(60, pull_oci_layout(repo, str(bomb), "x", build_image=False, jobs=2)))
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None


# Pulls the layout argv[1] into a new repository argv[2]; prints the error and the peak RSS
# (KiB) of the largest child (the object workers, which inflate the layers).
_PULL = """
import resource, sys, trio
from pycfs.host.errors import PycfsError
from pycfs.host.oci.layout import pull_oci_layout
from pycfs.host.repository import Repository
with Repository.init(sys.argv[2]) as repo:
    try:
        trio.run(lambda: pull_oci_layout(repo, sys.argv[1], "x", build_image=False, jobs=2))
    except PycfsError as e:
        print(e)
# VmHWM: the process's own peak (getrusage's would carry pytest's over from before the exec)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_a_zstd_bomb_layer_is_refused_in_bounded_memory(tmp_path, layout):
    """A layer blob whose tar is followed by 1 GiB of zeros (in some 32 KiB more): the pull is refused with
    one line (the tail after the end marker), and no process of it came near holding the GiB
    (the inflating worker grew by the GiB when a zstd input slice was decompressed in one call)."""
    path, built = layout
    blobs = []

    def bomb(i, tar):
        if i == 0:
            c = zstandard.ZstdCompressor(level=19).compressobj()
            blobs.append(c.compress(tar) + b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush())
            return blobs[0]
        return None

    _zstd_layout(path, tmp_path / "bomb", blob_of=bomb)
    r = subprocess.run([sys.executable, "-c", _PULL, str(tmp_path / "bomb"), str(tmp_path / "repo")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    message, peaks = r.stdout.splitlines()
    assert message == (f"layer sha256:{hashlib.sha256(blobs[0]).hexdigest()}: more than 16 MiB after the tar's "
                       "end marker (is the blob damaged?)")
    own, children = map(int, peaks.split())
    assert max(own, children) < 300 << 10, f"peak RSS {own >> 10} MiB, of a worker {children >> 10} MiB"
    with Repository.open(tmp_path / "repo") as repo:
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None


def test_a_cancelled_pull_ends_promptly_commits_nothing_and_leaks_no_fd(tmp_path):
    """Cancelled mid-layer (what Ctrl-C does): the splitting thread, the inflating worker
    and the files in flight all stop within a bounded wait, and nothing is committed."""
    spec = ImageSpec([[Dir("d")] + [File(f"d/f{i}", size=1 << 20, seed=i) for i in range(192)]], gzip=False)
    built = build_layout(spec, tmp_path / "oci")

    async def main() -> float:
        with trio.move_on_after(0.3) as scope:
            await pull_oci_layout(repo, str(tmp_path / "oci"), "x", build_image=False, jobs=2)
        assert scope.cancelled_caught  # still at work when cancelled
        return trio.current_time() - scope.deadline

    with Repository.init(tmp_path / "repo") as repo:
        assert trio.run(main) < 3
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None
        repo_dir = str(tmp_path / "repo")
        assert [f for f in _fds() if f.startswith(repo_dir) and not re.search(r"/repo(/objects(/[0-9a-f]{2})?)?$", f)] == []


def test_a_tar_source_that_cannot_start_leaves_no_thread_behind(tmp_path):
    """The blob's thread starts before the decompressor is made: an unknown compression
    must stop it (before: with more of the blob than its queue holds, it waited for good
    to hand on the next piece)."""
    import threading

    from pycfs.host.workers.service import _TarSource

    (tmp_path / "blob").write_bytes(bytes(6 << 20))
    fd = os.open(tmp_path / "blob", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(PycfsError, match="unsupported layer compression 'lz4'"):
            _TarSource(fd, "lz4", "sha256", "sha256")
        assert not [t for t in threading.enumerate() if t.name == "blob source"]
    finally:
        os.close(fd)


def test_an_image_past_the_entry_bound_is_refused_while_its_layers_are_parsed(tmp_path, monkeypatch, layout):
    """Entries are counted as they are parsed, over all layers: past MAX_IMAGE_ENTRIES the pull
    fails naming a layer, before any tree is built, and tags nothing."""
    monkeypatch.setattr(layer_module, "MAX_IMAGE_ENTRIES", 6)  # the first layer alone holds 301
    monkeypatch.setattr(merge_module, "build_filesystem", lambda *a, **k: pytest.fail("a tree was built"))
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(EntryLimitError, match=r"^layer sha256:[0-9a-f]{64}: the image's layers hold more than 6 "):
            trio.run(lambda: pull_oci_layout(repo, str(layout[0]), "x", jobs=2))
        assert list_images(repo) == []


def test_an_image_listing_too_many_layers_is_refused_before_any_is_read(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(streams_module, "MAX_IMAGE_LAYERS", 1)
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match=r"lists 2 layers, more than the 1 pycfs takes"):
            trio.run(lambda: pull_oci_layout(repo, str(layout[0]), "x", jobs=2))
        assert _objects(tmp_path / "repo") == []


def test_an_image_past_composefs_size_limit_is_refused_before_it_is_stored(tmp_path, monkeypatch, layout):
    """The writer refuses an image larger than readers take (fsck would call it invalid)
    before writing a byte of it: the pull fails naming the image, and tags nothing."""
    monkeypatch.setattr(erofs_format, "MAX_IMAGE_SIZE", 64 << 10)  # SPEC's image is larger
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match=r"^image of config sha256:[0-9a-f]{64}: the format-\d EROFS image would "
                                             r"be \d+ bytes, past composefs's 0 GiB limit \(\d+ inodes\)"):
            trio.run(lambda: pull_oci_layout(repo, str(layout[0]), "x", jobs=2))
        assert list_images(repo) == [] and not list((tmp_path / "repo" / "images").glob("*"))


def test_a_layer_of_more_inline_bytes_than_a_stream_holds_is_refused_naming_it(tmp_path, monkeypatch):
    """Headers and small files with no larger file between them past the layer stream's cap:
    the pull fails in one line naming the layer's blob, and nothing is tagged."""
    from pycfs.host import splitstream

    monkeypatch.setattr(splitstream, "MAX_LAYER_INLINE_RUN", 1 << 20)
    spec = ImageSpec([[Dir("s")] + [File(f"s/f{i}", data=b"x" * 10) for i in range(2500)]], gzip=False)
    built = build_layout(spec, tmp_path / "oci")
    with Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(PycfsError, match=r"^layer sha256:[0-9a-f]{64}: more than 1 MiB of tar headers and small "
                                             "files with no larger file between them"):
            trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "x", jobs=2))
        assert repo.has_stream(layer_stream_name(built.diff_ids[0])) is None
        assert list_images(repo) == []


def test_a_tag_naming_no_manifest_is_left_out_of_the_listing_not_fatal_to_it(tmp_path, layout):
    """One tag edited to name the config stream made `oci images` fail for every tag: the
    others are listed, and that one says what is wrong when it is used."""
    from pycfs.host.oci.streams import resolve_tag

    with Repository.init(tmp_path / "repo") as repo:
        result = trio.run(lambda: pull_oci_layout(repo, str(layout[0]), "x", jobs=1))
        config = next(n for n in os.listdir(tmp_path / "repo/streams") if n.startswith("oci-config-"))
        os.symlink(f"../../{config}", tmp_path / "repo/streams/refs/oci/bad")
        assert list_images(repo) == [("x", result.manifest_digest)]
        with pytest.raises(PycfsError, match=f"^tag 'bad' points at '../../{config}', which is not a manifest stream"):
            resolve_tag(repo, "bad")
