"""fsck finds corruption and missing data; gc removes exactly what no ref reaches."""

import fcntl
import os

import pytest

from pycfs.host.erofs.writer import write_image
from pycfs.host.fsck import fsck
from pycfs.host.errors import PycfsError
from pycfs.host.gc import gc
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_LAYER
from pycfs.host.tree import Directory, External, FileSystem, Leaf, Stat


@pytest.fixture
def repo(tmp_path):
    with Repository.init(tmp_path / "repo") as r:
        yield r


def layer(repo, name, blobs, ref=None):
    w = repo.new_stream(CONTENT_OCI_LAYER)
    ids = []
    for b in blobs:
        oid = repo.ensure_object(b)
        ids.append(oid)
        w.write_inline(b"hdr")
        w.write_external(oid, len(b))
    return repo.write_stream(w, name, ref=ref), ids


def kinds(report):
    return sorted(k for k, _, _ in report.errors)


def test_clean_repository_is_ok(repo):
    layer(repo, "l1", [b"a" * 100, b"b" * 200], ref="r1")
    report = fsck(repo)
    assert report.ok and report.objects_checked == 3 and report.streams_checked == 1


def test_flipped_byte_and_deleted_object(repo):
    _, (a, b) = layer(repo, "l1", [b"a" * 100, b"b" * 200], ref="r1")
    path = repo.object_path(a)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    os.unlink(repo.object_path(b))
    report = fsck(repo)
    assert kinds(report) == ["missing-object-ref", "object-digest-mismatch"]
    paths = {p for _, p, _ in report.errors}
    assert f"objects/{a.hex()[:2]}/{a.hex()[2:]}" in paths and "streams/l1" in paths


def test_broken_links_and_bad_stream(repo):
    layer(repo, "l1", [b"x" * 80], ref="r1")
    os.symlink("../nowhere", repo.path / "streams/refs/dangling")
    bad = repo.ensure_object(b"not a splitstream at all")
    os.symlink(f"../objects/{bad.hex()[:2]}/{bad.hex()[2:]}", repo.path / "streams/bogus")
    (repo.path / "streams/plainfile").write_text("x")
    report = fsck(repo)
    assert kinds(report) == ["broken-symlink", "entry-not-symlink", "stream-open-failed"]
    assert not fsck(repo, metadata_only=True).ok


def test_a_link_leading_out_of_objects_is_reported_and_repaired(repo, tmp_path):
    """A stream link edited to a file elsewhere with an object's name: pycfs reads the
    object by the id at its end, never that file, but the link is not what pycfs makes:
    fsck reports it and --repair removes it (a re-pull makes it again)."""
    sid, _ = layer(repo, "l1", [b"x" * 80], ref="r1")
    outside = tmp_path / "outside" / sid.hex()[:2]
    outside.mkdir(parents=True)
    (outside / sid.hex()[2:]).write_bytes(b"elsewhere")
    os.unlink(repo.path / "streams/l1")
    os.symlink(outside / sid.hex()[2:], repo.path / "streams/l1")
    report = fsck(repo, metadata_only=True)
    assert report.errors == [("bad-symlink", "streams/l1", f"target {outside / sid.hex()[2:]} is not the object's "
                                                           "place in objects/")]
    fsck(repo, metadata_only=True, repair=True)
    assert not os.path.lexists(repo.path / "streams/l1") and (outside / sid.hex()[2:]).read_bytes() == b"elsewhere"
    assert fsck(repo, metadata_only=True).ok


def test_gc_keeps_reachable_removes_rest(repo):
    _, kept = layer(repo, "l1", [b"k" * 100], ref="keep")
    sid2, dropped = layer(repo, "l2", [b"d" * 100])  # no ref: garbage
    # a config stream reaching l1 through a named ref, itself referenced
    cfg_obj = repo.ensure_object(b"{}")
    w = repo.new_stream(CONTENT_OCI_CONFIG)
    w.add_named_ref("sha256:aa", repo.has_stream("l1"))
    w.write_external(cfg_obj, 2)
    repo.write_stream(w, "cfg", ref="cfgref")
    dry = gc(repo, dry_run=True)
    assert dry.objects_removed == 2 and repo.has_object(dropped[0])
    result = gc(repo)
    assert result.objects_removed == 2  # l2's stream object and its blob
    assert not repo.has_object(dropped[0]) and not repo.has_object(sid2)
    assert repo.has_object(kept[0]) and repo.has_object(cfg_obj)
    assert not (repo.path / "streams/l2").is_symlink() and result.links_pruned == 1
    assert fsck(repo).ok
    # removing the refs makes everything garbage
    os.unlink(repo.path / "streams/refs/keep")
    os.unlink(repo.path / "streams/refs/cfgref")
    gc(repo)
    assert sum(len(files) for _, _, files in os.walk(repo.path / "objects")) == 0


def test_gc_gives_up_on_a_user_that_keeps_the_repository_open(repo, monkeypatch):
    """Another opener (a FUSE mount, a varlink service) holding the repository for good:
    one error after the limit, nothing removed, and the lock is gc's opener's again; then,
    once it is gone, gc runs (before: gc waited for good)."""
    from pycfs.host import gc as gc_module

    monkeypatch.setattr(gc_module, "WAIT_LIMIT", 0.3)
    _, dropped = layer(repo, "l2", [b"d" * 100])
    other = Repository.open(repo.path)
    try:
        with pytest.raises(PycfsError, match=rf"^gc: {repo.path} stayed in use for 0 s \(a pull, a FUSE mount or a "
                                             r"varlink service has it open: `fuser -v .*` names them\); nothing was removed$"):
            gc(repo)
        assert repo.has_object(dropped[0])
    finally:
        other.close()
    # gc's opener holds its shared lock again: with the other gone, an exclusive one
    # elsewhere still cannot be had
    probe = os.open(repo.path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    assert gc(repo).objects_removed == 2


def test_gc_keeps_objects_of_referenced_images(repo):
    content = repo.ensure_object(b"c" * 5000)
    orphan = repo.ensure_object(b"o" * 5000)
    root = Directory(Stat(mode=0o755))
    root.entries[b"file"] = Leaf(Stat(mode=0o644), External(content, 5000))
    image = repo.link_image(repo.ensure_object(write_image(FileSystem(root), 1)), ref="img")
    result = gc(repo)
    assert repo.has_object(content) and repo.has_object(image) and not repo.has_object(orphan)
    assert result.objects_removed == 1
    os.unlink(repo.object_path(content))
    report = fsck(repo)
    assert kinds(report) == ["image-missing-object"]


@pytest.mark.parametrize("command", [["fsck"], ["gc", "--dry-run"]])
def test_progress_bars_go_to_the_terminal_on_stderr_not_to_piped_stdout(repo, command):
    """With stderr on a terminal and the result piped, rich's bars are drawn on stderr and
    stdout carries the result alone (rich's default console is stdout)."""
    import sys

    from procs import run_with_stderr_on_terminal

    layer(repo, "l", [os.urandom(5000) for _ in range(20)], ref="ref")
    rc, out, shown = run_with_stderr_on_terminal(
        [sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo.path), *command])
    assert rc == 0, shown.decode(errors="replace")
    assert out.strip() and not out.startswith(b"\n") and b"\x1b" not in out  # the result alone
    assert b"\x1b[?25l" in shown  # rich hid the cursor for its live display there
