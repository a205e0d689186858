"""fsck finds corruption and missing data; gc removes exactly what no ref reaches."""

import errno
import fcntl
import os
import shutil

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


def test_gc_removes_nothing_when_a_streams_link_cannot_be_read(repo, monkeypatch):
    """A link gc could not read (EIO, ENOMEM) was taken for absent: the ref naming that
    stream rooted nothing and gc freed all the stream held."""
    from pycfs.host import gc as gc_module

    sid, kept = layer(repo, "l1", [b"k" * 100], ref="keep")
    real = os.readlink

    def failing(path, *args, **kwargs):
        if str(path).endswith("streams/l1"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gc_module.os, "readlink", failing)
    with pytest.raises(PycfsError, match=r"^gc: cannot tell what is live \(cannot read the link .*streams/l1: "
                                         r"Input/output error\); nothing was removed"):
        gc(repo)
    monkeypatch.undo()
    assert repo.has_object(kept[0]) and repo.has_object(sid) and fsck(repo).ok


def test_gc_gives_up_on_a_user_that_keeps_the_repository_open(repo, monkeypatch):
    """Another opener (a FUSE mount, a varlink service) holding the repository for good:
    one error after the limit, nothing removed, and the lock is gc's opener's again; then,
    once it is gone, gc runs (before: gc waited for good)."""
    from pycfs.host import repository as repository_module

    monkeypatch.setattr(repository_module, "LOCK_WAIT", 0.3)
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


# ---------------------------------------------------------------------------- no walk follows a link


def _oid_name(repo, object_id):
    h = object_id.hex()
    return h[:2], h[2:]


def test_gc_and_fsck_never_list_or_delete_through_a_symlinked_object_subdirectory(repo, tmp_path):
    """objects/aa -> a directory outside holding a file named like an object: gc refuses
    (it listed and unlinked through the link: the file outside was deleted), fsck reports
    it, and --repair removes the link alone."""
    layer(repo, "l1", [b"k" * 100], ref="keep")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ("e" * 62)).write_bytes(b"precious")
    os.symlink(victim, repo.path / "objects/aa")
    with pytest.raises(PycfsError, match=r"^gc: objects/aa is a symlink, which gc does not follow; nothing was "
                                         r"removed: run `pycfs fsck --repair`$"):
        gc(repo)
    assert (victim / ("e" * 62)).read_bytes() == b"precious"
    report = fsck(repo)
    assert [(k, p) for k, p, _ in report.errors] == [("unexpected-file", "objects/aa")]
    report = fsck(repo, repair=True)
    assert report.repaired == ["objects/aa"] and not os.path.lexists(repo.path / "objects/aa")
    assert (victim / ("e" * 62)).read_bytes() == b"precious"
    assert gc(repo).objects_removed == 0 and fsck(repo).ok


def test_a_symlinked_objects_directory_is_reported_and_never_walked(tmp_path):
    """objects -> a directory elsewhere: fsck said nothing and gc (and fsck --repair)
    deleted there; now fsck reports it, gc refuses, reads and stores refuse (they read and
    wrote there), and --repair removes the link alone."""
    with Repository.init(tmp_path / "repo") as r:
        stream_id, _ = layer(r, "l1", [b"k" * 100], ref="keep")
    elsewhere = tmp_path / "elsewhere"
    os.rename(tmp_path / "repo/objects", elsewhere)
    os.symlink(elsewhere, tmp_path / "repo/objects")
    junk = elsewhere / "aa" / ("f" * 62)
    junk.parent.mkdir(exist_ok=True)
    junk.write_bytes(b"junk")
    before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
    for act in (lambda repo: repo.stream_bytes(stream_id), lambda repo: layer(repo, "l2", [b"n" * 100])):
        with Repository.open(tmp_path / "repo") as repo, pytest.raises(
                PycfsError, match=r"^objects in .*/repo is a symlink or not a directory: run `pycfs fsck --repair`$"):
            act(repo)
    with Repository.open(tmp_path / "repo") as repo:
        assert ("layout-not-directory", "objects") in [(k, p) for k, p, _ in fsck(repo).errors]
        with pytest.raises(PycfsError, match=r"^gc: cannot tell what is live \(objects is a symlink, which gc does "
                                             r"not follow\); nothing was removed: run `pycfs fsck --repair` first$"):
            gc(repo)
        assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before
    with Repository.open(tmp_path / "repo") as repo:
        report = fsck(repo, repair=True)
        assert "objects" in report.repaired and not os.path.islink(tmp_path / "repo/objects")
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before


def test_a_symlinked_refs_directory_roots_nothing_anywhere_and_gc_refuses(repo):
    """streams/refs/oci -> ../../tagdir: `oci images` listed its tag through the link while
    gc did not root it and removed the image's objects. Now no listing follows it, fsck
    reports it, gc refuses, and --repair removes the link (not the directory)."""
    from pycfs.host.oci.streams import list_images

    _, ids = layer(repo, "oci-manifest-sha256:" + "1" * 64, [b"m" * 100])
    tagdir = repo.path / "tagdir"
    tagdir.mkdir()
    os.symlink("../streams/oci-manifest-sha256:" + "1" * 64, tagdir / "img")
    os.makedirs(repo.path / "streams/refs")
    os.symlink("../../tagdir", repo.path / "streams/refs/oci")
    assert list_images(repo) == [] and repo.list_links("streams/refs") == []
    report = fsck(repo)
    assert [(k, p) for k, p, _ in report.errors] == [("ref-dir-symlink", "streams/refs/oci")]
    with pytest.raises(PycfsError, match=r"streams/refs/oci is a symlink to a directory, which gc does not follow\); "
                                         r"nothing was removed: run `pycfs fsck --repair` first$"):
        gc(repo)
    assert repo.has_object(ids[0])
    assert fsck(repo, repair=True).repaired == ["streams/refs/oci"]
    assert (tagdir / "img").is_symlink() and fsck(repo).ok


def _nest(top, depth, name="a"):
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.symlink("/nonexistent", "dangling", dir_fd=fd)
    os.close(fd)


def unnest(top, name="a"):
    """Remove what `_nest` made, if it is there: pytest's clean-up of old temporary
    directories (shutil.rmtree, recursive) would fail on it for every later run."""
    fd = os.open(top, os.O_RDONLY)
    depth = 0
    while os.path.isdir(f"/proc/self/fd/{fd}/{name}"):
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, depth = nfd, depth + 1
    while depth:
        for entry in os.listdir(fd):
            os.unlink(entry, dir_fd=fd)
        parent = os.open("..", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, depth = parent, depth - 1
        os.rmdir(name, dir_fd=fd)
    os.close(fd)


def test_refs_nested_1100_deep_are_reported_not_a_recursion_error(repo, request):
    """1,100 nested directories under streams/refs: "internal error: RecursionError" from
    fsck, fsck --repair, gc and the listings (os.walk recurses). Now the walk stops at the
    depth cap: fsck reports the directory there, --repair removes it, gc refuses until then."""
    from pycfs.host.repository import REF_DEPTH_LIMIT

    layer(repo, "l1", [b"k" * 100], ref="keep")
    _nest(repo.path / "streams/refs", 1100)
    request.addfinalizer(lambda: unnest(repo.path / "streams/refs"))
    assert repo.list_links("streams/refs") == [("keep", "../l1")]
    deep = "streams/refs/" + "/".join(["a"] * REF_DEPTH_LIMIT)
    assert [(k, p) for k, p, _ in fsck(repo).errors] == [("ref-too-deep", deep)]
    with pytest.raises(PycfsError, match=rf"\({deep} is nested deeper than refs may be\); nothing was removed"):
        gc(repo, dry_run=True)
    assert fsck(repo, repair=True).repaired == [deep]
    assert fsck(repo).ok and gc(repo).objects_removed == 0
    assert os.path.isdir(repo.path / deep[: -2]) and not os.path.lexists(repo.path / deep)


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_an_object_subdirectory_that_is_no_directory(repo, kind):
    """objects/XX a file or a fifo: "not a directory" from fsck, --repair, a pull, gc, and
    nothing fixed it. Now lookups find no objects there, fsck reports it, --repair removes
    it, and a store makes the directory again."""
    data = b"z" * 300
    oid = repo.ensure_object(data)
    xx, rest = _oid_name(repo, oid)
    w = repo.new_stream(CONTENT_OCI_LAYER)
    w.write_external(oid, len(data))
    repo.write_stream(w, "l1", ref="keep")
    sub = repo.path / "objects" / xx
    os.unlink(sub / rest)
    os.rmdir(sub)
    if kind == "file":
        sub.write_bytes(b"junk")
    else:
        os.mkfifo(sub)
    with Repository.open(repo.path) as fresh:
        assert not fresh.has_object(oid) and not fresh.has_objects([oid]) and fresh.object_size(oid) is None
        with pytest.raises(PycfsError, match=rf"^object sha256:{oid.hex()} is missing from "):
            fresh.read_object(oid)
        with pytest.raises(PycfsError, match=rf"^gc: objects/{xx} is not a directory; nothing was removed: "
                                             r"run `pycfs fsck --repair`$"):
            gc(fresh, dry_run=True)  # (the fixture holds the repository open: no lock for gc)
        assert ("unexpected-file", f"objects/{xx}") in [(k, p) for k, p, _ in fsck(fresh).errors]
        assert fresh.ensure_object(data) == oid  # a pull stores it again, in a directory
        assert fresh.read_object(oid) == data and (repo.path / "objects" / xx).is_dir()
    sub_again = repo.path / "objects" / xx
    os.unlink(sub_again / rest)
    os.rmdir(sub_again)
    sub_again.write_bytes(b"junk")
    repo.close()  # (a repair waits for every other opener, as gc does)
    with Repository.open(repo.path) as fresh:
        report = fsck(fresh, repair=True)
        assert f"objects/{xx}" in report.repaired and not os.path.lexists(sub_again)


def test_an_object_that_is_a_directory_or_a_dangling_link(repo, tmp_path):
    """An object replaced by a directory (holding a link out of the repository) and another by
    a dangling symlink: both counted as present (F_OK), so a pull kept them and `cat` failed
    for good; --repair left the directory. Now neither is present, open_object says what to
    do, --repair removes both (the link's target and what the directory's link names stay),
    and a store puts the object back in place of either."""
    a, b = b"a" * 300, b"b" * 300
    _, (oa, ob) = layer(repo, "l1", [a, b], ref="keep")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    pa, pb = repo.object_path(oa), repo.object_path(ob)
    os.unlink(pa)
    os.makedirs(pa / "sub")
    os.symlink(victim, pa / "sub" / "link")
    os.unlink(pb)
    os.symlink("/nonexistent", pb)
    assert not repo.has_object(oa) and not repo.has_object(ob) and not repo.has_objects([oa])
    assert repo.intact_stream("l1") is None  # a pull imports the layer again
    for oid in (oa, ob):
        with pytest.raises(PycfsError, match=rf"^object sha256:{oid.hex()} in .* is not a regular file: "
                                             r"run `pycfs fsck --repair`$"):
            repo.read_object(oid)
    report = fsck(repo, repair=True)
    assert kinds(report) == ["broken-symlink", "missing-object-ref", "missing-object-ref",
                             "object-not-regular", "object-not-regular"]
    assert not os.path.lexists(pa) and not os.path.lexists(pb) and victim.read_bytes() == b"precious"
    # a store replaces either kind of entry
    os.makedirs(pa / "sub")
    os.symlink("/nonexistent", pb)
    assert repo.ensure_object(a) == oa and repo.ensure_object(b) == ob
    assert repo.read_object(oa) == a and repo.read_object(ob) == b


def test_gc_names_odd_entries_and_removes_nothing(repo):
    """A directory named like an object, a directory named like a temporary file: gc stopped
    with no advice; a dangling symlink named like an object: gc stat()ed it through the link
    and failed. Now gc names the path and says run fsck --repair (removing nothing), or
    unlinks the dead link; fsck reports each and --repair removes them."""
    _, (dropped,) = layer(repo, "l2", [b"d" * 100])
    odd_dir = repo.path / "objects/23" / ("c" * 62)
    odd_dir.mkdir(parents=True)
    with pytest.raises(PycfsError, match=rf"^gc: objects/23/{'c' * 62} is a directory, not an object; nothing was "
                                         r"removed: run `pycfs fsck --repair`$"):
        gc(repo)
    assert repo.has_object(dropped)
    odd_dir.rmdir()
    (repo.path / "objects/.tmp-object-zz").mkdir()
    with pytest.raises(PycfsError, match=r"^gc: objects/.tmp-object-zz is a directory, not a crashed writer's "
                                         r"temporary file; nothing was removed: run `pycfs fsck --repair`$"):
        gc(repo)
    assert fsck(repo, repair=True).repaired == ["objects/.tmp-object-zz"]
    os.symlink("/nonexistent", repo.path / "objects/23" / ("d" * 62))
    result = gc(repo)
    assert result.objects_removed == 3 and not os.path.lexists(repo.path / "objects/23" / ("d" * 62))


@pytest.mark.parametrize("top", ["streams", "images", "objects", "streams/refs"])
def test_a_layout_directory_replaced_by_a_file(repo, top):
    """streams/, images/, objects/ or streams/refs a file: fsck aborted ("not a directory") or
    said ok, and gc with no refs to see removed every object. Now fsck reports it, --repair
    removes it, and gc refuses until then."""
    layer(repo, "l1", [b"k" * 100], ref="keep")
    shutil.rmtree(repo.path / top, ignore_errors=True)
    (repo.path / top).write_bytes(b"junk")
    with Repository.open(repo.path) as fresh:
        report = fsck(fresh)
        assert ("layout-not-directory", top) in [(k, p) for k, p, _ in report.errors]
        with pytest.raises(PycfsError, match=rf"^gc: cannot tell what is live \({top} is not a directory\); nothing "
                                             r"was removed: run `pycfs fsck --repair` first$"):
            gc(fresh, dry_run=True)  # (the fixture holds the repository open: no lock for gc)
    repo.close()  # (a repair waits for every other opener, as gc does)
    with Repository.open(repo.path) as fresh:
        assert top in fsck(fresh, repair=True).repaired
        assert not (fresh.path / top).is_file() and fsck(fresh).ok


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_something_else_than_a_link_where_a_tag_is_kept(repo, kind):
    """A directory at streams/refs/oci/img blocked every pull of img and fsck said ok; a fifo
    was reported and --repair left it. Now fsck reports both and --repair removes them."""
    path = repo.path / "streams/refs/oci/img"
    if kind == "dir":
        (path / "x").mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True)
        os.mkfifo(path)
    assert [(k, p) for k, p, _ in fsck(repo).errors] == [("unexpected-file-type", "streams/refs/oci/img")]
    assert fsck(repo, repair=True).repaired == ["streams/refs/oci/img"]
    assert not os.path.lexists(path) and fsck(repo).ok


def test_a_pull_records_its_image_again_and_fails_on_an_images_file(tmp_path):
    """images/ a file: a re-pull found the image object intact, tagged, and left the image
    unrecorded. Now a re-pull links an intact image whose images/<hex> link is gone, and
    fails (untagged) while images/ is not a directory."""
    import trio

    from imagebuild import File, ImageSpec, build_layout
    from pycfs.host.oci.layout import pull_oci_layout
    from pycfs.host.oci.streams import untag_image

    build_layout(ImageSpec([[File("f", size=5000, seed=1)]]), tmp_path / "oci")
    with Repository.init(tmp_path / "repo") as repo:
        first = trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "img"))
        (image,) = first.images.values()
        link = repo.path / "images" / image.hex()
        os.unlink(link)
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "img"))
        assert repo.image_linked(image) and os.readlink(link) == repo.object_relpath(image).replace("objects", "../objects")
        untag_image(repo, "img")
        shutil.rmtree(repo.path / "images")
        (repo.path / "images").write_bytes(b"junk")
        with pytest.raises(PycfsError, match=r"^images in .* is a symlink or not a directory: run `pycfs fsck --repair`"):
            trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "oci"), "img"))
        assert not (repo.path / "streams/refs/oci/img").is_symlink()


def test_one_damaged_object_takes_its_whole_image_and_tag_with_it_on_repair(tmp_path):
    """--repair removed the damaged object and the links of the layer and image holding it,
    but left the config and manifest streams (which still name them) and the tag: fsck then
    said ok while the tagged image lacked an object, and gc (following named refs only
    through links) removed the rest of that layer. Now the chain is reported, the repair
    removes it and the tag, a second fsck is ok, gc frees the image, and a re-pull restores
    it; an intact image sharing nothing keeps all it holds."""
    import trio

    from imagebuild import File, ImageSpec, build_layout
    from pycfs.host.oci.layout import pull_oci_layout
    from pycfs.host.oci.streams import list_images

    build_layout(ImageSpec([[File("usr/a", size=5000, seed=1), File("usr/b", size=7000, seed=2)]]), tmp_path / "a")
    build_layout(ImageSpec([[File("usr/c", size=6000, seed=3)]]), tmp_path / "b")
    with Repository.init(tmp_path / "repo") as repo:
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "a"), "A"))
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "b"), "B"))
        before = fsck(repo)
        assert before.ok
        damaged = next(p for p in (repo.path / "objects").rglob("*") if p.is_file() and p.stat().st_size == 5000)
        damaged.write_bytes(b"x" * 5000)
        report = fsck(repo, repair=True)
        kinds = sorted({k for k, _, _ in report.errors})
        assert kinds == ["broken-symlink", "image-missing-object", "incomplete-named-ref", "missing-object-ref",
                         "object-digest-mismatch"]  # (the tag: its manifest's link removed)
        assert "streams/refs/oci/A" in report.repaired and "streams/refs/oci/B" not in report.repaired
        assert [name for name, _ in list_images(repo)] == ["B"]
        again = fsck(repo)
        assert again.ok, again.errors
        freed = gc(repo)
        assert freed.objects_removed > 0 and fsck(repo).ok
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "a"), "A"))
        assert fsck(repo).ok and sorted(name for name, _ in list_images(repo)) == ["A", "B"]


def test_an_intact_image_whose_link_is_gone_is_reported_and_linked_again(tmp_path, capsys):
    """A pull killed between storing its image and linking it, or a hand's rm of
    images/<hex>: the tag's image could not be mounted by name, fsck said ok and --repair
    did nothing (gc kept the image: its config names it). Now fsck reports the missing
    link and --repair makes it again."""
    import trio

    from imagebuild import File, ImageSpec, build_layout
    from pycfs.host.mount import resolve_image
    from pycfs.host.oci.layout import pull_oci_layout
    from pycfs.tools.cli import main as cli_main

    build_layout(ImageSpec([[File("usr/a", size=5000, seed=1)]]), tmp_path / "a")
    with Repository.init(tmp_path / "repo") as repo:
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "a"), "A"))
        image_id = resolve_image(repo, "A")
    link = tmp_path / "repo" / "images" / image_id.hex()
    link.unlink()
    assert cli_main(["--repo", str(tmp_path / "repo"), "fsck", "--json"]) == 1
    import json

    report = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["path"]) for e in report["errors"]] == [("image-unlinked", f"images/{image_id.hex()}")]
    assert cli_main(["--repo", str(tmp_path / "repo"), "fsck", "--repair"]) == 0
    assert f"  - linked images/{image_id.hex()}" in capsys.readouterr().out
    assert os.readlink(link) == f"../objects/{image_id.hex()[:2]}/{image_id.hex()[2:]}"
    with Repository.open(tmp_path / "repo") as repo:
        assert fsck(repo).ok and resolve_image(repo, "A") == image_id
        assert gc(repo).objects_removed == 0


@pytest.mark.parametrize("err, judged, owner", [(errno.EMFILE, False, 0), (errno.ENOMEM, False, 0),
                                                 (errno.EACCES, False, 4242), (errno.EACCES, True, 0),
                                                 (errno.EIO, True, 0), (errno.EINVAL, True, 0)])
def test_repair_removes_no_object_it_could_not_read_for_reasons_of_its_own(repo, monkeypatch, err, judged, owner):
    """Run with `ulimit -n 64`, fsck --repair took EMFILE for a broken object and deleted
    2,209 intact objects of a live image. Only what says something of the object (gone, a
    read error of the medium, not a regular file, the owner's own object it may not read)
    makes it bad; anything else stops fsck."""
    from pycfs.host.workers import pool

    _, ids = layer(repo, "l", [b"a" * 5000, b"b" * 6000], ref="keep")
    os.chown(repo.object_path(ids[0]), owner, -1)
    real = pool.digest_files
    victim = str(repo.object_path(ids[0]))
    rel = "objects/{}/{}".format(*_oid_name(repo, ids[0]))

    async def failing(paths, *args, **kwargs):
        got = await real(paths, *args, **kwargs)
        return [OSError(err, os.strerror(err)) if p == victim else g for p, g in zip(paths, got)]

    monkeypatch.setattr(pool, "digest_files", failing)
    if judged:
        report = fsck(repo, repair=True)
        assert ("object-open-failed", rel) in [(k, p) for k, p, _ in report.errors]
        assert not repo.has_object(ids[0])
    else:
        with pytest.raises(PycfsError, match=rf"^fsck: cannot read {rel} in .*: "
                                             rf"{os.strerror(err)} \(.*\); nothing was judged or removed$"):
            fsck(repo, repair=True)
        assert repo.has_object(ids[0]) and repo.has_object(ids[1])


def test_repair_removes_no_stream_it_could_not_read_for_reasons_of_its_own(repo, monkeypatch):
    """The same for streams (and images, layers, what named refs reach): a stream read
    failing with EMFILE was "stream-open-failed" and its link and chain went."""
    sid, _ = layer(repo, "l", [b"a" * 5000], ref="keep")
    real = Repository.stream_bytes

    def failing(self, object_id):
        if object_id == sid:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(self, object_id)

    monkeypatch.setattr(Repository, "stream_bytes", failing)
    with pytest.raises(PycfsError, match=r"^fsck: cannot read streams/l in .*: Too many open files \(raise the "
                                         r"open-file limit, `ulimit -n`, then run fsck again\); nothing was judged"):
        fsck(repo, metadata_only=True, repair=True)
    monkeypatch.undo()
    assert (repo.path / "streams/l").is_symlink() and (repo.path / "streams/refs/keep").is_symlink()
    assert fsck(repo).ok


def test_a_file_in_an_images_link_place_is_removed_and_the_link_made_again(tmp_path):
    """The relink ran before the repair's removals: it found the entry (a file), linked
    nothing, said "linked", and the removal then took the entry: the image stayed unlinked."""
    import trio

    from imagebuild import File, ImageSpec, build_layout
    from pycfs.host.mount import resolve_image
    from pycfs.host.oci.layout import pull_oci_layout

    build_layout(ImageSpec([[File("usr/a", size=5000, seed=1)]]), tmp_path / "a")
    with Repository.init(tmp_path / "repo") as repo:
        trio.run(lambda: pull_oci_layout(repo, str(tmp_path / "a"), "A"))
        image_id = resolve_image(repo, "A")
        link = repo.path / "images" / image_id.hex()
        link.unlink()
        link.write_bytes(b"not a link")
        report = fsck(repo, repair=True)
        assert f"images/{image_id.hex()}" in report.repaired and report.relinked == [f"images/{image_id.hex()}"]
        assert link.is_symlink() and fsck(repo).ok


def test_gc_of_a_fresh_repository_removes_nothing(tmp_path):
    """`pycfs init` then `pycfs gc`: "objects: no such file or directory"."""
    with Repository.init(tmp_path / "repo") as repo:
        shutil.rmtree(repo.path / "objects", ignore_errors=True)
    with Repository.open(tmp_path / "repo") as repo:
        result = gc(repo)
    assert (result.objects_removed, result.links_pruned) == (0, 0)


def test_repair_waits_for_the_other_users_and_an_opener_for_a_repair(repo, monkeypatch):
    """fsck --repair took no lock of its own: it removed a damaged object a pull had just
    stored again, good. Now it holds the repository alone as gc does (or gives up, naming
    it, removing nothing); an opener meanwhile waits for it (silently and for ever, before),
    says so once, and gives up after LOCK_WAIT."""
    from pycfs.host import repository as repository_module

    monkeypatch.setattr(repository_module, "LOCK_WAIT", 0.3)
    _, (oid,) = layer(repo, "l1", [b"q" * 100], ref="keep")
    obj = repo.path / repo.object_relpath(oid)
    obj.write_bytes(b"Q" * 100)
    other = Repository.open(repo.path)
    try:
        with pytest.raises(PycfsError, match=rf"^fsck --repair: {repo.path} stayed in use for 0 s .*; nothing was "
                                             r"removed$"):
            fsck(repo, repair=True)
        assert obj.exists()
    finally:
        other.close()
    repo.lock_exclusive("test", print)
    try:
        said: list[str] = []
        with pytest.raises(PycfsError, match=rf"^{repo.path} stayed locked by a gc or fsck --repair for 0 s: "
                                             r"`fuser -v .*` names it$"):
            Repository.open(repo.path, waiting=said.append)
        assert said == [f"waiting for a gc or fsck --repair to finish with {repo.path}..."]
    finally:
        repo.unlock_exclusive()
    assert f"{repo.object_relpath(oid)}" in fsck(repo, repair=True).repaired


def test_a_gc_killed_midway_leaves_no_link_to_a_removed_object(repo, monkeypatch):
    """gc removed objects, then the links to them: killed in between, fsck reported broken
    links (1,386 in the review's run) and said to pull images again. Now the links go first."""
    from pycfs.host import gc as gc_module

    layer(repo, "keep", [b"k" * 100], ref="keep")
    layer(repo, "l2", [b"d" * 100, b"e" * 100])
    real = gc_module._remove_objects

    def killed(repo, doomed):
        sub, names = next(iter(doomed.items()))
        real(repo, {sub: names[:1]})
        raise KeyboardInterrupt

    monkeypatch.setattr(gc_module, "_remove_objects", killed)
    with pytest.raises(KeyboardInterrupt):
        gc(repo)
    assert not (repo.path / "streams/l2").is_symlink()
    assert fsck(repo).ok
    monkeypatch.setattr(gc_module, "_remove_objects", real)
    assert gc(repo).objects_removed == 2 and fsck(repo).ok


def test_crash_leftovers_are_where_gc_removes_them(repo, monkeypatch):
    """A damaged object replaced by a pull got its temporary name in objects/XX/: killed
    there, gc refused ("unexpected entry") and fsck called it an invalid name; a temporary
    symlink in the repository's root was never removed. Now the replacement's temporary name
    is in objects/ and gc removes both kinds of leftover."""
    from pycfs.host import repository as repository_module

    data = b"r" * 300
    oid = repo.ensure_object(data)
    (repo.path / repo.object_relpath(oid)).write_bytes(b"R" * 300)
    seen: list[list[str]] = []
    real = repository_module.os.replace

    def crash(src, dst, *, src_dir_fd, dst_dir_fd):
        seen.append(sorted(os.listdir(src_dir_fd)))
        assert os.path.samestat(os.fstat(src_dir_fd), os.stat(repo.path / "objects"))
        raise KeyboardInterrupt  # (cleans up: a SIGKILL would leave it where it was)

    monkeypatch.setattr(repository_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        repo.ensure_object(data)
    monkeypatch.setattr(repository_module.os, "replace", real)
    assert any(name.startswith(".tmp-object-") for name in seen[0])
    (repo.path / "objects" / ".tmp-object-left").write_bytes(data)
    os.symlink("objects/x", repo.path / ".symlink-left")
    result = gc(repo)
    assert result.temp_files_removed == 2
    assert not os.path.lexists(repo.path / ".symlink-left") and not (repo.path / "objects/.tmp-object-left").exists()
