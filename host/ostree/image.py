"""The composefs tree and EROFS image of a stored ostree commit (spec ostree.md 3.4).

Directories take their dirmeta's mode, owner and xattrs; files their header's. Every
mtime is 0, as ostree checks files out. Each file object becomes one inode, so the names
that share an ostree checksum are hardlinks of each other. xattr names lose the trailing
NUL ostree stores with them: the image then carries the xattrs the checkout has (composefs-rs
keeps the NUL, so images of commits with xattrs get other ids there).
"""

from __future__ import annotations

from typing import TypeVar

from pycfs.host.fsverity import digest_bytes
from pycfs.host.ostree.commitstream import (
    REF_PREFIX, CommitObjects, encode_ref, has_commit, stream_name, write_commit_stream,
)
from pycfs.host.ostree.objects import (
    Commit,
    DirMeta,
    DirTree,
    Kind,
    OstreeError,
    verify_metadata,
)
from pycfs.host.repository import Repository
from pycfs.host.tree import Directory, External, FileSystem, Inline, Leaf, Stat, Symlink, gc_paused

# Dirtrees are shared by checksum, so a commit of a few kilobytes can list one dirtree many
# times in another, and that one many times in a third: millions of directories (96 KB built
# 3 million, 2.6 GB). The entries once every dirtree is expanded are counted over the
# distinct ones before the tree is built, a directory as DIR_WEIGHT (built and written, one
# costs ~840 bytes, a name of a shared file ~120), and capped at MAX_ENTRIES: ~200 MB at
# most, 3 times a Debian /usr (~300k entries, ~25k directories).
MAX_ENTRIES = 1_500_000
DIR_WEIGHT = 8


def _xattrs(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {name[:-1]: value for name, value in pairs}


P = TypeVar("P", Commit, DirTree, DirMeta)


def _parsed(objects: CommitObjects, checksum: bytes, kind: Kind, cls: type[P]) -> P:
    """A metadata object, verified and parsed (once: a pull hands over what it parsed)."""
    known = objects.parsed.get(checksum)
    if isinstance(known, cls):
        return known
    data = objects.metadata(checksum, kind)
    verify_metadata(data, checksum, kind)
    return cls.parse(data, checksum)


def _dir_stat(objects: CommitObjects, checksum: bytes) -> Stat:
    meta = _parsed(objects, checksum, Kind.DIRMETA, DirMeta)
    return Stat(mode=meta.mode & 0o7777, uid=meta.uid, gid=meta.gid, xattrs=_xattrs(meta.xattrs))


def commit_of(objects: CommitObjects) -> Commit:
    return _parsed(objects, objects.commit, Kind.COMMIT, Commit)


def _expanded_entries(objects: CommitObjects, root_tree: bytes) -> int:
    """The entries under root_tree once every dirtree is expanded, a directory as DIR_WEIGHT
    (at most MAX_ENTRIES + 1), each distinct dirtree counted once: children first, without
    recursion (a chain of dirtrees can be deep)."""
    counts: dict[bytes, int] = {}
    pending: list[tuple[bytes, DirTree | None]] = [(root_tree, None)]
    while pending:
        tree_id, tree = pending.pop()
        if tree_id in counts:
            continue
        if tree is None:  # first met: its sub-dirtrees are counted before it
            tree = _parsed(objects, tree_id, Kind.DIRTREE, DirTree)
            pending.append((tree_id, tree))
            pending += [(sub, None) for _name, sub, _meta in tree.dirs if sub not in counts]
        else:
            total = len(tree.files) + DIR_WEIGHT * len(tree.dirs) + sum(counts[sub] for _name, sub, _meta in tree.dirs)
            counts[tree_id] = min(total, MAX_ENTRIES + 1)
    return counts[root_tree]


def build_filesystem(objects: CommitObjects) -> FileSystem:
    commit = commit_of(objects)
    if _expanded_entries(objects, commit.root_tree) > MAX_ENTRIES:
        raise OstreeError(f"commit {objects.commit.hex()} has more than {MAX_ENTRIES} entries (a directory counting "
                          f"as {DIR_WEIGHT}) once the directories it shares are expanded: no image is built of it")
    stats: dict[bytes, Stat] = {}  # by dirmeta, parsed once: most directories share a handful

    def dir_stat(checksum: bytes) -> Stat:
        st = stats.get(checksum)
        if st is None:
            st = stats[checksum] = _dir_stat(objects, checksum)
        return st.copy()  # each directory its own

    root = Directory(dir_stat(commit.root_meta))
    leaves: dict[bytes, Leaf] = {}
    pending = [(root, commit.root_tree)]
    while pending:
        directory, tree_id = pending.pop()
        tree = _parsed(objects, tree_id, Kind.DIRTREE, DirTree)
        for name, checksum in tree.files:
            leaf = leaves.get(checksum)
            if leaf is None:
                header, external, content = objects.file_header(checksum)
                st = Stat(mode=header.mode & 0o7777, uid=header.uid, gid=header.gid, xattrs=_xattrs(header.xattrs))
                if header.is_symlink:
                    leaf = Leaf(st, Symlink(header.symlink_target.encode("utf-8", "surrogateescape")))
                elif external is not None:
                    leaf = Leaf(st, External(external, header.size))
                else:
                    leaf = Leaf(st, Inline(content))
                leaves[checksum] = leaf
            directory.entries[name.encode()] = leaf
        for name, sub_tree, sub_meta in tree.dirs:
            child = Directory(dir_stat(sub_meta))
            directory.entries[name.encode()] = child
            pending.append((child, sub_tree))
    return FileSystem(root)


def image_bytes(repo: Repository, objects: CommitObjects, version: int | None = None) -> bytes:
    # imported here: a re-pull whose image exists writes none (the writer is ~10 ms of imports)
    from pycfs.host.erofs.writer import write_image as write_erofs

    with gc_paused():  # the tree's thousands of objects hold no cycles (the writer pauses it too)
        return write_erofs(build_filesystem(objects), repo.erofs_default if version is None else version)


def compute_image_id(repo: Repository, objects: CommitObjects) -> bytes:
    """The id the commit's image has (or would have), writing nothing."""
    return digest_bytes(image_bytes(repo, objects), repo.alg)


def ensure_image(repo: Repository, objects: CommitObjects, ref: str | None) -> bytes:
    """Write the image and the commit stream that names it (then the ref, last); a stored
    commit whose image is there and recorded as one (images/<id>) only gets the ref."""
    image_id = objects.image_id
    if image_id is not None and repo.has_object(image_id):
        if repo.image_linked(image_id):
            if has_commit(repo, objects.commit):
                if ref is not None:
                    repo.set_stream_ref(REF_PREFIX + encode_ref(ref), stream_name(objects.commit))
                return image_id
            written = []
        else:  # its images/<id> was removed (mount names the image by it): recorded again
            written = [image_id]
    else:
        image_id = objects.image_id = repo.ensure_object(image_bytes(repo, objects))
        written = [image_id]  # recorded as an image once the sync covers it
    write_commit_stream(repo, objects, ref, written)
    return image_id
