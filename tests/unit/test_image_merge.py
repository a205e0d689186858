"""Merging layer entries into an image tree (`apply_entry`): its table of directories by
path must never change the tree it builds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from pycfs.host.oci.merge import ImageBuildError, apply_entry, build_filesystem
from pycfs.host.oci.layer import Directory as DirEntry
from pycfs.host.oci.layer import Hardlink, LayerEntry
from pycfs.host.tree import Directory, Inline, Leaf, Stat

NAMES = [b"a", b"b"]


def entry(path: bytes, kind: str, n: int = 0) -> LayerEntry:
    stat = Stat(0o755 if kind == "dir" else 0o644, n, 0, 1_700_000_000 + n)
    item = {"dir": DirEntry(), "file": Inline(b"%d" % n), "link": Hardlink(b"/a")}[kind]
    return LayerEntry(path, stat, item)


def dump(root: Directory) -> list[tuple]:
    out = []
    for path, node in root.walk():
        s = node.stat
        what = "dir" if isinstance(node, Directory) else node.content if isinstance(node, Leaf) else node
        out.append((path, s.mode, s.uid, s.mtime_sec, what))
    return out


def merged(entries: list[LayerEntry], dirs: dict | None) -> list[tuple] | str:
    root = Directory(Stat())
    try:
        for e in entries:
            apply_entry(root, e, dirs)
    except ImageBuildError as e:
        return str(e)
    return dump(root)


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map(lambda p: b"/" + b"/".join(p))
ops = st.lists(
    st.tuples(paths, st.sampled_from(["dir", "file", "link", "whiteout", "opaque"]), st.integers(0, 9)), max_size=30
)


def as_entries(raw: list[tuple[bytes, str, int]]) -> list[LayerEntry]:
    out = []
    for path, kind, n in raw:
        parent, _, name = path.rpartition(b"/")
        if kind == "whiteout":
            out.append(entry(parent + b"/.wh." + name, "file", n))
        elif kind == "opaque":
            out.append(entry(path + b"/.wh..wh..opq", "file", n))
        else:
            out.append(entry(path, kind, n))
    return out


@settings(max_examples=400)
@given(ops)
def test_directories_by_path_never_change_the_tree(raw: list[tuple[bytes, str, int]]) -> None:
    entries = as_entries(raw)
    assert merged(entries, {}) == merged(entries, None)


def test_a_directory_gone_from_the_tree_is_not_written_into() -> None:
    """Each way a directory leaves the tree (whiteout, opaque parent, a file in its place)
    while the table holds it: what comes after lands in the tree, not in the lost one."""
    cases = [
        [entry(b"/a", "dir"), entry(b"/a/x", "file"), entry(b"/.wh.a", "file"), entry(b"/a/y", "file", 1)],
        [entry(b"/a", "dir"), entry(b"/a/b", "dir"), entry(b"/a/b/x", "file"), entry(b"/a/.wh..wh..opq", "file"),
         entry(b"/a/b/y", "file", 1)],
        [entry(b"/a", "dir"), entry(b"/a/x", "file"), entry(b"/a", "file", 2), entry(b"/a/y", "file", 1)],
    ]
    for entries in cases:
        with_table, without = merged(entries, {}), merged(entries, None)
        assert with_table == without
    assert (b"/a/y", 0o644, 1, 1_700_000_001, Inline(b"1")) in merged(cases[0], {})
    assert (b"/a/b/y", 0o644, 1, 1_700_000_001, Inline(b"1")) in merged(cases[1], {})
    assert "a parent is not a directory" in merged(cases[2], {})


def test_layers_that_do_not_stack_are_refused_naming_the_layer_and_why() -> None:
    layers = {"sha256:" + "1" * 64: [entry(b"/a", "file")], "sha256:" + "2" * 64: [entry(b"/a/x", "file", 1)]}
    ids = {diff_id: bytes([n]) * 32 for n, diff_id in enumerate(layers)}
    with pytest.raises(ImageBuildError) as e:
        build_filesystem(None, list(layers), ids, parsed={ids[d]: layers[d] for d in layers})  # type: ignore[arg-type]
    assert str(e.value) == (f"layer sha256:{'2' * 64}: /a/x: a parent is not a directory: the image's layers do "
                            "not stack into one tree (the image is damaged or crafted: no EROFS image can be "
                            "made of it)")


@pytest.mark.parametrize("layer, root", [
    ([entry(b"/app", "dir"), entry(b"/app/x", "file")], (0o555, 0, 0)),  # FROM scratch + COPY: was mode 0
    ([LayerEntry(b"", Stat(0o700, 5, 0, 7), DirEntry()), entry(b"/app", "dir")], (0o700, 5, 7)),  # "./": its own
    ([entry(b"/usr", "dir", 3), entry(b"/app", "dir")], (0o755, 3, 1_700_000_003)),  # /usr's (composefs-rs)
])  # fmt: skip
def test_the_root_without_an_entry_is_what_containers_storage_makes(layer, root) -> None:
    """An image with no "./" entry and no /usr mounted as d--------- (mode 0, as composefs-rs
    starts, which refuses such images): its root is now what c/storage makes (0555, `podman
    image mount` shows it), mtime 0. A root entry or /usr decides as before."""
    from pycfs.host.oci.merge import ImageTree

    diff_id, layer_id = "sha256:" + "1" * 64, b"\1" * 32
    fs = build_filesystem(None, [diff_id], {diff_id: layer_id}, parsed={layer_id: layer})  # type: ignore[arg-type]
    assert (fs.root.stat.mode, fs.root.stat.uid, fs.root.stat.mtime_sec) == root
    tree = ImageTree(None)  # type: ignore[arg-type]
    tree.apply(layer)
    tree.end_layer(layer_id)
    built = tree.filesystem([layer_id])
    assert built is not None and (built.root.stat.mode, built.root.stat.uid, built.root.stat.mtime_sec) == root
