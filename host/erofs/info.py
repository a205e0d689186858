"""What `composefs-info ls` and `objects` print for a tree read from an image."""

from __future__ import annotations

from collections.abc import Iterable

from pycfs.host.dumpfile import escape, walk_filtered
from pycfs.host.tree import Directory, External, ExternalNoVerity, FileSystem, Leaf, Symlink


def format_ls(fs: FileSystem, filter_names: Iterable[bytes] | None = None) -> bytes:
    """Every entry but the root, depth-first, byte-sorted: `PATH/\\t` for directories,
    `PATH\\t-> TARGET` for symlinks, `PATH\\t@ PAYLOAD` for files with a backing path, the bare
    path otherwise and for every later name of a hardlinked inode. Paths keep spaces literal."""
    out: list[bytes] = []
    seen: set[int] = set()
    it = walk_filtered(fs.root, set(filter_names) if filter_names else None)
    next(it)
    for path, node in it:
        line = escape(path, keep_space=True)
        if id(node) in seen:
            out.append(line + b"\n")
            continue
        seen.add(id(node))
        if isinstance(node, Directory):
            line += b"/\t"
        elif isinstance(node.content, Symlink):
            line += b"\t-> " + escape(node.content.target)
        elif isinstance(node.content, (External, ExternalNoVerity)) and node.content.backing_path:
            line += b"\t@ " + escape(node.content.backing_path)
        out.append(line + b"\n")
    return b"".join(out)


def image_objects(fs: FileSystem) -> list[bytes]:
    """Sorted unique backing paths (`XX/rest` or whatever the payload says) of regular files."""
    paths = set()
    for _path, node in fs.walk():
        if isinstance(node, Leaf) and isinstance(node.content, (External, ExternalNoVerity)):
            bp = node.content.backing_path
            if bp:
                paths.add(bp)
    return sorted(paths)
