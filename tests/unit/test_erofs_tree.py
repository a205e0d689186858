"""The in-memory tree model (host/tree.py)."""

from __future__ import annotations

from pycfs.host.tree import (
    BlockDevice,
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Socket,
    Sparse,
    Stat,
    Symlink,
    object_path,
)


def _tree() -> tuple[FileSystem, Leaf]:
    shared = Leaf(Stat(0o644), Inline(b"data"))
    b = Directory(Stat(0o755), {b"z": shared, b"a": Leaf(Stat(0o600), Fifo())})
    root = Directory(Stat(0o755), {b"b": b, b"\x01": shared, b"c": Leaf(Stat(0o777), Symlink(b"b/z"))})
    return FileSystem(root), shared


def test_walk_is_depth_first_byte_sorted():
    fs, _ = _tree()
    assert [p for p, _n in fs.walk()] == [b"/", b"/\x01", b"/b", b"/b/a", b"/b/z", b"/c"]


def test_walk_visits_a_directory_under_two_names_once():
    fs, _ = _tree()
    fs.root.entries[b"d"] = fs.root.entries[b"b"]
    paths = [p for p, _n in fs.walk()]
    assert paths == [b"/", b"/\x01", b"/b", b"/b/a", b"/b/z", b"/c", b"/d"]
    assert fs.root.nlink() == 3


def test_lookup_and_link_counts():
    fs, shared = _tree()
    assert fs.root.lookup(b"/b/z") is shared and fs.root.lookup(b"b//z") is shared
    assert fs.root.lookup(b"/c/x") is None and fs.root.lookup(b"/nope") is None
    assert fs.link_counts()[id(shared)] == 2
    assert fs.is_primary(shared, fs.root, b"\x01") is None
    fs.primary_links[id(shared)] = (fs.root.entries[b"b"], b"z")
    assert fs.is_primary(shared, fs.root.entries[b"b"], b"z") is True
    assert fs.is_primary(shared, fs.root, b"\x01") is False


def test_modes_sizes_and_kinds():
    d = b"\x12" * 32
    cases = [
        (Inline(b"abc"), 0o100644, 3), (External(d, 9), 0o100644, 9), (ExternalNoVerity(b"p", 7), 0o100644, 7),
        (Sparse(5), 0o100644, 5), (Symlink(b"xy"), 0o120644, 2), (CharDevice(259), 0o20644, 0),
        (BlockDevice(1), 0o60644, 0), (Fifo(), 0o10644, 0), (Socket(), 0o140644, 0),
    ]
    for content, mode, size in cases:
        leaf = Leaf(Stat(0o644), content)
        assert (leaf.st_mode, leaf.size) == (mode, size)
    assert Leaf(Stat(), CharDevice(0)).is_whiteout() and not Leaf(Stat(), CharDevice(1)).is_whiteout()
    assert External(d, 9).backing_path == object_path(d) == b"12/" + b"12" * 31
    assert External(d, 9, b"").backing_path == b""
    assert Directory(Stat(0o1777)).st_mode == 0o41777


def test_stat_copy_is_deep_for_xattrs():
    st = Stat(0o644, xattrs={b"user.a": b"1"})
    cp = st.copy()
    cp.xattrs[b"user.b"] = b"2"
    assert st.xattrs == {b"user.a": b"1"}
