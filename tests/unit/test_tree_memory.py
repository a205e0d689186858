"""The merged tree of a pull stays small per entry (issue 15, goal 5: peak RSS under 200 MB
with 200,000 files): leaves of equal metadata share one Stat (`SharedStats`)."""

from __future__ import annotations

import hashlib
import tarfile
import tracemalloc

from pycfs.host.oci.merge import apply_entry, normalize_for_oci
from pycfs.host.oci.layer import LayerEntryCollector
from pycfs.host.tree import Directory, External, Inline, Leaf, SharedStats, Stat

MTIME = 1_700_000_000.25  # a fraction: the PAX header carries the nanoseconds


def _pieces(n: int, per_dir: int = 500, mtimes: int = 1) -> list[bytes | tuple[bytes]]:
    """A layer's pieces as its stream holds them: directories, then files of 0-8 KiB (those
    over 64 bytes as object ids), ``mtimes`` distinct mtimes among them."""
    pieces: list[bytes | tuple[bytes]] = []

    def header(name: str, kind: bytes, size: int = 0, mode: int = 0o644, mtime: float = MTIME) -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode, info.mtime = kind, size, mode, mtime
        return info.tobuf(tarfile.PAX_FORMAT)

    pieces.append(header("d", tarfile.DIRTYPE, mode=0o755))
    for i in range(n):
        if i % per_dir == 0:
            pieces.append(header(f"d/{i // per_dir:04d}", tarfile.DIRTYPE, mode=0o755))
        size = (i * 7919) % 8193
        pieces.append(header(f"d/{i // per_dir:04d}/f{i:06d}", tarfile.REGTYPE, size, mtime=MTIME + i % mtimes))
        if size > 64:
            pieces += [(hashlib.sha256(b"%d" % i).digest(),), bytes(-size % 512)]
        else:
            pieces.append(b"x" * size + bytes(-size % 512))
    pieces.append(bytes(1024))
    return pieces


def _tree(pieces: list[bytes | tuple[bytes]]) -> Directory:
    """The tree a pull builds from a layer's pieces: entries applied as they are parsed."""
    collector = LayerEntryCollector()
    root = Directory(Stat())
    for start in range(0, len(pieces), 3000):
        collector.feed(pieces[start:start + 3000])
        for entry in collector.take() or ():
            apply_entry(root, entry)
    collector.close()
    for entry in collector.take() or ():
        apply_entry(root, entry)
    return root


def test_tree_of_a_layer_costs_bounded_bytes_per_file():
    n = 20_000
    pieces = _pieces(n)
    tracemalloc.start()
    try:
        root = _tree(pieces)
        normalize_for_oci(root)
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    files = [leaf for d in root.entries[b"d"].entries.values() for leaf in d.entries.values()]
    assert len(files) == n
    per_file = size / n
    # names, leaves, dict slots and object ids; a Stat of its own per file made it about 470
    assert per_file < 380, f"the merged tree costs {per_file:.0f} bytes per file (bound 380; was about 470)"
    # and the tree says what the layer says
    assert len({id(f.stat) for f in files}) == 1
    first = files[0]
    assert (first.stat.mode, first.stat.mtime_sec, first.stat.mtime_nsec, first.stat.xattrs) == (0o644, 1_700_000_000,
                                                                                                 250_000_000, {})
    assert first.content == Inline(b"") and files[1].content == External(hashlib.sha256(b"1").digest(), 7919)


def test_equal_metadata_shares_a_stat_and_directories_keep_their_own():
    root = _tree(_pieces(3000, per_dir=100, mtimes=7))
    dirs = list(root.entries[b"d"].entries.values())
    files = [leaf for d in dirs for leaf in d.entries.values()]
    assert all(isinstance(f, Leaf) for f in files)
    by_mtime: dict[int, set[int]] = {}
    for f in files:
        by_mtime.setdefault(f.stat.mtime_sec, set()).add(id(f.stat))
    assert sorted(by_mtime) == [1_700_000_000 + k for k in range(7)]
    assert all(len(ids) == 1 for ids in by_mtime.values())
    # directories of equal metadata are still distinct Stats: normalisation changes /run's
    assert len({id(d.stat) for d in dirs}) == len(dirs) == 30
    assert all(d.stat == dirs[0].stat for d in dirs)


def test_shared_stats_table_is_bounded_and_stays_right_when_full():
    table = SharedStats(limit=4)
    xattrs = ((b"security.capability", b"\x01"),)
    got = [table.get(0o644, 0, 0, t, 0, xattrs if t % 2 else ()) for t in range(10)]
    assert [(s.mtime_sec, s.xattrs) for s in got] == [(t, dict(xattrs) if t % 2 else {}) for t in range(10)]
    assert len(table._stats) <= 4
    assert table.get(0o644, 0, 0, 9, 0, xattrs) is got[9]  # still held
    again = table.get(0o644, 0, 0, 0, 0)
    assert again == got[0] and again is not got[0]  # dropped when the table started afresh


def test_image_tree_keeps_its_objects_out_of_collections_until_it_is_written(tmp_path):
    """ImageTree freezes what it has applied (full collections would rescan the growing
    tree over and over while the pull imports) and gives it back when the image is
    built, or when the pull ends without one (finish_pull, whatever happened)."""
    import gc

    from pycfs.host.oci.image import finish_pull
    from pycfs.host.oci.merge import ImageTree
    from pycfs.host.repository import Repository

    repo = Repository.init(tmp_path / "repo")

    assert gc.get_freeze_count() == 0
    pieces = _pieces(5000)
    collector, tree = LayerEntryCollector(), ImageTree(None)  # type: ignore[arg-type] # no stored layers
    try:
        collector.feed(pieces[:len(pieces) // 2])
        tree.apply(collector.take())
        frozen = gc.get_freeze_count()
        leaves = [leaf for d in tree.root.entries[b"d"].entries.values() for leaf in d.entries.values()]
        assert frozen > len(leaves) > 2000
        collector.feed(pieces[len(pieces) // 2:])
        collector.close()
        tree.apply(collector.take())
        assert gc.get_freeze_count() > frozen
        tree.end_layer(b"layer")
        fs = tree.filesystem([b"layer"])
        assert gc.get_freeze_count() == 0
        assert fs is not None and len(fs.root.entries[b"d"].entries) == 10

        tree = ImageTree(repo)
        tree.apply(_tree_entries(pieces[:100]))
        assert gc.get_freeze_count() > 0
        config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
        finished = finish_pull(repo, "sha256:" + hashlib.sha256(b"{}").hexdigest(), b"{}",
                               "sha256:" + hashlib.sha256(config).hexdigest(), config, [], None,
                               build_image=False, tree=tree)  # no image: the tree is not used
        assert finished.images == {} and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def _tree_entries(pieces: list[bytes | tuple[bytes]]) -> list:
    collector = LayerEntryCollector()
    collector.feed(pieces)
    return collector.take() or []
