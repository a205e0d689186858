"""Test helpers for ostree: the real `ostree` CLI (the oracle), a source tree with every
kind of entry ostree can hold, and a comparable description of trees from a checkout
directory or from a composefs image."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from pycfs.host.erofs.reader import read_image
from pycfs.host.repository import Repository
from pycfs.host.tree import Directory, External, Inline, Leaf, Symlink

LARGE = 3 << 20 | 123  # several read chunks, not a multiple of anything


def pycfs(repo: Path, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    """The pycfs CLI on repository `repo` (text output)."""
    return subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=600)


def have_ostree() -> bool:
    return shutil.which("ostree") is not None


def ostree(*args: str | os.PathLike) -> str:
    return subprocess.run(["ostree", *map(str, args)], check=True, capture_output=True, text=True).stdout.strip()


def make_tree(root: Path, version: int = 1, xattrs: bool = True, setid: bool = True) -> Path:
    """Symlinks, suid/sgid/sticky, xattrs, a hardlink, empty dirs, empty, small and large files,
    and (as root) files and a directory owned by uid 1000.
    `version` changes a few files (and adds one) so a second commit shares most objects;
    bare-user-only repositories take neither xattrs nor setuid/setgid bits."""
    root.mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "empty.d").mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "share" / "data").mkdir(parents=True)
    (root / "README").write_text("readme, small enough to be inline\n")
    (root / "empty").write_bytes(b"")
    (root / "bin" / "app").write_bytes(bytes((i * 7 + 13 + version) % 256 for i in range(256 * 1024)))
    os.chmod(root / "bin" / "app", 0o4755 if setid else 0o755)
    (root / "bin" / "sgid").write_bytes(b"#!/bin/sh\necho sgid, with more than sixty-four bytes of content in it\n")
    os.chmod(root / "bin" / "sgid", 0o2711 if setid else 0o711)
    (root / "etc" / "config").write_text(f"version={version}\n")
    (root / "etc" / "secret").write_bytes(b"s" * 100)
    os.chmod(root / "etc" / "secret", 0o600)
    big = hashlib.sha256(b"seed").digest() * (LARGE // 32 + 1)
    (root / "share" / "data" / "large.bin").write_bytes(big[:LARGE])
    (root / "share" / "data" / "lib.so").write_bytes(bytes(i % 251 for i in range(65536)))
    os.link(root / "share" / "data" / "lib.so", root / "share" / "data" / "lib.so.1")
    os.symlink("lib.so.1", root / "share" / "data" / "lib-link.so")
    os.symlink("../share/data/missing", root / "bin" / "dangling")
    if xattrs:
        os.setxattr(root / "README", "user.test", b"value")
        os.setxattr(root / "share" / "data", "user.dir", b"d")
        os.setxattr(root / "bin" / "app", "user.empty", b"")
    if version >= 2:
        (root / "share" / "new.txt").write_text("new in version 2, long enough to be an object of its own\n" * 3)
    os.chmod(root / "share", 0o750)
    if os.geteuid() == 0:
        os.chown(root / "etc" / "secret", 1000, 1000)
        os.chown(root / "share" / "data", 1000, 100)
    return root


def commit(repo: Path, tree: Path, branch: str, *extra: str) -> str:
    return ostree("commit", f"--repo={repo}", f"--branch={branch}", "--subject", f"commit {branch}",
                  "--timestamp=2024-01-02T03:04:05Z", *extra, tree)


def init_repo(path: Path, mode: str) -> Path:
    ostree("init", f"--repo={path}", f"--mode={mode}")
    return path


def describe_dir(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, xattrs, content sha256 | link target) for a directory tree."""
    out: dict[str, tuple] = {"/": _describe_path(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out["/" + str(p.relative_to(root))] = _describe_path(p)
    return out


def _describe_path(p: Path) -> tuple:
    st = os.lstat(p)
    xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                          for n in os.listxattr(p, follow_symlinks=False)))
    if stat.S_ISLNK(st.st_mode):
        content = os.readlink(p)
    elif stat.S_ISREG(st.st_mode):
        content = hashlib.sha256(p.read_bytes()).hexdigest()
    else:
        content = None
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs, content)


def describe_image(repo: Repository, image_id: bytes) -> dict[str, tuple]:
    """The same description for a composefs image, file content read from the repository."""
    fs = read_image(repo.read_object(image_id)).fs
    out: dict[str, tuple] = {}
    for path, node in fs.walk():
        xattrs = tuple(sorted((k.decode(), v) for k, v in node.stat.xattrs.items()))
        content: str | None = None
        if isinstance(node, Leaf):
            c = node.content
            if isinstance(c, Symlink):
                content = c.target.decode()
            elif isinstance(c, Inline):
                content = hashlib.sha256(c.data).hexdigest()
            elif isinstance(c, External):
                content = hashlib.sha256(repo.read_object(c.id)).hexdigest()
        type_bits = stat.S_IFDIR if isinstance(node, Directory) else node.type_bits
        out[path.decode()] = (type_bits, node.stat.mode & 0o7777, node.stat.uid, node.stat.gid, xattrs, content)
    return out
