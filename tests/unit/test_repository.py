"""Repository: meta.json, feature rules, object stores, symlinks, streams and refs."""

import json
import os
import stat

import pytest

from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository, RepositoryError
from pycfs.host.splitstream import CONTENT_OCI_LAYER
from pycfs.host.streamcat import iter_stream_bytes

from test_fsck_gc import _nest, unnest

META_V1 = (
    '{\n  "version": 1,\n  "algorithm": "fsverity-sha256-12",\n  "features": {\n    "compatible": [],\n'
    '    "read-only-compatible": [\n      "v1_erofs"\n    ],\n    "incompatible": []\n  },\n'
    '  "erofs_formats": {\n    "default": 1\n  }\n}\n'
)


@pytest.fixture
def repo(tmp_path):
    with Repository.init(tmp_path / "repo") as r:
        yield r


def test_init_writes_cfsctl_meta_json(tmp_path):
    Repository.init(tmp_path / "r").close()
    assert (tmp_path / "r" / "meta.json").read_text() == META_V1
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o700


def test_reinit_same_is_noop_and_different_is_error(tmp_path):
    Repository.init(tmp_path / "r").close()
    Repository.init(tmp_path / "r").close()
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.init(tmp_path / "r", "fsverity-sha512-12")


def test_sha512_repository(tmp_path):
    with Repository.init(tmp_path / "r", "fsverity-sha512-12") as r:
        oid = r.ensure_object(b"x" * 100)
        assert len(oid) == 64 and oid == digest_bytes(b"x" * 100, "sha512")
        assert r.object_path(oid).read_bytes() == b"x" * 100


def test_open_errors(tmp_path):
    with pytest.raises(RepositoryError, match="no repository"):
        Repository.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no meta.json"):
        Repository.open(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text("{bad")
    with pytest.raises(RepositoryError, match="not valid JSON"):
        Repository.open(tmp_path / "empty")


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, field", [
    ({"features": []}, "features"),
    ({"features": {"incompatible": "x"}}, "features.incompatible"),
    ({"features": {"incompatible": [[1]]}}, "features.incompatible"),
    ({"features": {"read-only-compatible": None}}, "features.read-only-compatible"),
    ({"erofs_formats": {"default": "x"}}, "erofs_formats"),
    ({"erofs_formats": {"default": 7}}, "erofs_formats"),
    ({"erofs_formats": {"default": True}}, "erofs_formats"),
    ({"erofs_formats": {"default": 1, "extra": 2}}, "erofs_formats"),
    ({"erofs_formats": [1]}, "erofs_formats"),
    ({"algorithm": 5}, "algorithm"),
])
def test_a_meta_json_of_wrong_types_is_one_error_naming_it(tmp_path, changes, field):
    """Each was a TypeError or ValueError (an internal error) in every command, or at a pull."""
    p = tmp_path / "r"
    Repository.init(p).close()
    _edit_meta(p, **changes)
    with pytest.raises(RepositoryError, match=rf"^{p}/meta.json: {field} is .*, not .*: the file is damaged"):
        Repository.open(p)


def test_a_meta_json_with_extra_formats_only_opens_with_the_default_format(tmp_path):
    p = tmp_path / "r"
    Repository.init(p).close()
    _edit_meta(p, erofs_formats={"extra": [1]}, features={})
    with Repository.open(p) as r:
        assert r.erofs_default == 2


def test_feature_rules(tmp_path):
    p = tmp_path / "r"
    Repository.init(p).close()
    _edit_meta(p, features={"compatible": ["shiny"], "read-only-compatible": [], "incompatible": []})
    with Repository.open(p) as r:
        assert r.writable
    _edit_meta(p, features={"compatible": [], "read-only-compatible": ["future"], "incompatible": []})
    with Repository.open(p) as r:
        assert not r.writable
        with pytest.raises(RepositoryError, match="read-only"):
            r.ensure_object(b"data")
    _edit_meta(p, features={"compatible": [], "read-only-compatible": [], "incompatible": ["future"]})
    with pytest.raises(RepositoryError, match="unknown incompatible"):
        Repository.open(p)
    _edit_meta(p, version=2, features={})
    with pytest.raises(RepositoryError, match="format version 2"):
        Repository.open(p)
    _edit_meta(p, version=1, algorithm="fsverity-md5-12")
    with pytest.raises(RepositoryError, match="unsupported algorithm"):
        Repository.open(p)


def test_ensure_object_dedups(repo):
    a = repo.ensure_object(b"content")
    b = repo.ensure_object(b"content")
    assert a == b == digest_bytes(b"content")
    assert repo.object_path(a).read_bytes() == b"content"
    assert len(os.listdir(repo.path / "objects" / a.hex()[:2])) == 1


def test_object_writer_streams_and_dedups(repo):
    w = repo.object_writer()
    for _ in range(10):
        w.write(b"0123456789" * 1000)
    oid, present = w.finish()
    assert not present and oid == digest_bytes(b"0123456789" * 10000)
    w = repo.object_writer()
    w.write(b"0123456789" * 10000)
    assert w.finish() == (oid, True)


def test_store_from_fd_copies_then_finds_present(repo, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300000))
    fd = os.open(src, os.O_RDONLY)
    try:
        first = repo.store_object_from_fd(fd)
        second = repo.store_object_from_fd(fd)
    finally:
        os.close(fd)
    assert first.how in ("copied", "reflinked") and second.how == "present"
    assert first.object_id == digest_bytes(src.read_bytes()) and first.size == 300000
    assert repo.object_path(first.object_id).read_bytes() == src.read_bytes()


def test_named_tempfile_fallback(repo):
    repo._tmpfile_ok = False  # what a filesystem without O_TMPFILE leads to
    oid = repo.ensure_object(b"fallback")
    assert repo.object_path(oid).read_bytes() == b"fallback"
    assert not [n for n in os.listdir(repo.path / "objects") if n.startswith(".tmp")]


def test_streams_refs_and_relative_symlinks(repo):
    body = repo.ensure_object(b"B" * 500)
    w = repo.new_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"head")
    w.write_external(body, 500)
    sid = repo.write_stream(w, "oci-layer-sha256:" + "ab" * 32, ref="oci/my%2Fimage")
    link = repo.path / "streams" / ("oci-layer-sha256:" + "ab" * 32)
    assert os.readlink(link) == f"../objects/{sid.hex()[:2]}/{sid.hex()[2:]}"
    assert os.readlink(repo.path / "streams/refs/oci/my%2Fimage") == "../../oci-layer-sha256:" + "ab" * 32
    assert repo.has_stream("oci-layer-sha256:" + "ab" * 32) == sid
    assert repo.has_stream("oci-layer-sha256:" + "cd" * 32) is None
    reader = repo.open_stream("refs/oci/my%2Fimage")
    assert b"".join(iter_stream_bytes(repo, reader)) == b"head" + b"B" * 500
    # re-pointing a ref replaces the link atomically
    w2 = repo.new_stream(CONTENT_OCI_LAYER)
    w2.write_inline(b"other")
    repo.write_stream(w2, "other", ref="oci/my%2Fimage")
    assert os.readlink(repo.path / "streams/refs/oci/my%2Fimage") == "../../other"
    assert not [n for n in os.listdir(repo.path) if n.startswith(".symlink-")]


def test_intact_streams_longest_intact_run(repo):
    """The streams from the first that are each intact: every object it lists is present
    (looked up once for all) and the stream's own object hashes to its name."""
    names, bodies = [], []
    for i in range(4):
        body = repo.ensure_object(bytes([i]) * 300)
        w = repo.new_stream(CONTENT_OCI_LAYER)
        w.write_inline(b"h%d" % i)
        w.write_external(body, 300)
        names.append(f"oci-layer-sha256:{i:064x}")
        bodies.append(body)
        repo.write_stream(w, names[-1])
    ids = [repo.has_stream(n) for n in names]
    assert repo.intact_streams(names) == ids
    assert repo.intact_streams([names[2], names[0], names[2]]) == [ids[2], ids[0], ids[2]]
    assert repo.intact_stream(names[1]) == ids[1]
    assert repo.intact_streams([names[0], "oci-layer-sha256:" + "e" * 64, *names[1:]]) == ids[:1]
    assert repo.intact_streams([]) == []
    repo.object_path(bodies[2]).unlink()  # the third stream lists an object that is gone
    assert repo.intact_streams(names) == ids[:2]
    assert repo.intact_stream(names[2]) is None and repo.intact_stream(names[3]) == ids[3]
    damaged = repo.object_path(ids[1])
    damaged.chmod(0o644)
    damaged.write_bytes(damaged.read_bytes()[:-1])
    assert repo.intact_streams(names) == ids[:1]
    assert repo.intact_streams([names[3], names[0]]) == [ids[3], ids[0]]


def test_images_and_refs(repo):
    iid = repo.link_image(repo.ensure_object(b"\0" * 4096), ref="mine")
    assert os.readlink(repo.path / "images" / iid.hex()) == f"../objects/{iid.hex()[:2]}/{iid.hex()[2:]}"
    assert os.readlink(repo.path / "images/refs/mine") == f"../{iid.hex()}"
    assert repo.image_id("mine") == iid == repo.image_id(iid.hex())
    with pytest.raises(RepositoryError, match="no image"):
        repo.image_id("nope")


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "/abs", "a\0b", "."])
def test_hostile_names_rejected(repo, name):
    with pytest.raises(RepositoryError, match="invalid"):
        repo.set_stream_ref(name, "x")


def test_has_object_looks_without_creating_directories(repo):
    oid = repo.ensure_object(b"x" * 100)
    absent = bytes(32)  # objects/00/ does not exist (the odds of a real id there: 1/256)
    assert repo.has_object(oid) and repo.object_size(oid) == 100
    if oid[:1] != b"\0":
        assert not repo.has_object(absent) and not (repo.path / "objects/00").exists()
    os.unlink(repo.object_path(oid))
    assert not repo.has_object(oid)  # the subdirectory's fd is open: still a real lookup


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["a FIFO", "/dev/zero's device", "a directory"])
def test_object_intact_only_for_a_regular_file(repo, kind):
    """An object replaced by anything but a regular file is not intact, at once: a device
    that reads without end (/dev/zero) once kept the check hashing for good."""
    oid = repo.ensure_object(b"y" * 5000)
    assert repo.object_intact(oid)
    path = repo.object_path(oid)
    os.unlink(path)
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a directory":
        os.mkdir(path)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    assert not repo.object_intact(oid)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["a FIFO", "/dev/zero"])
def test_stream_leading_to_anything_but_a_regular_file_is_refused(repo, kind):
    """streams/<name> is a link: one to a FIFO once blocked the open for good, one to a
    device read it without end."""
    if kind == "a FIFO":
        os.mkfifo(repo.path / "fifo")
        target = str(repo.path / "fifo")
    else:
        target = "/dev/zero"
    (repo.path / "streams").mkdir(exist_ok=True)
    os.symlink(target, repo.path / "streams/bad")
    with pytest.raises(RepositoryError, match=r"^streams/bad in .* leads to '.*', not to an object: run `pycfs fsck "
                                              r"--repair`"):
        repo.stream_data("bad")


def test_a_stream_link_is_read_not_followed(repo, tmp_path):
    """A stream's link edited to lead out of the repository, to a file with an object's
    name: what is read is that object, beneath objects/, not the file; a ref leading
    anywhere but to a stream's link is refused."""
    w = repo.new_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"the real stream")
    real = repo.write_stream(w, "s", "tags/s")
    outside = tmp_path / "outside" / real.hex()[:2]
    outside.mkdir(parents=True)
    (outside / real.hex()[2:]).write_bytes(b"another stream")
    os.unlink(repo.path / "streams/s")
    os.symlink(outside / real.hex()[2:], repo.path / "streams/s")
    assert repo.stream_data("s") == repo.stream_data("refs/tags/s") == repo.read_object(real)
    os.unlink(repo.path / "streams/refs/tags/s")
    os.symlink("../../../objects/" + real.hex()[:2] + "/" + real.hex()[2:], repo.path / "streams/refs/tags/s")
    with pytest.raises(RepositoryError, match=r"^streams/refs/tags/s in .* leads to '../../../objects/.*, not to a "
                                              r"stream: run `pycfs fsck --repair`"):
        repo.stream_data("refs/tags/s")


def test_a_link_naming_an_object_too_large_for_its_kind_is_refused_unread(repo, monkeypatch):
    """A stream or image link naming a big file's object (a damaged or edited link): refused
    from its size before a byte is read (a 512 MiB object took 546 MB in every command)."""
    from pycfs.host import repository as repository_module
    from pycfs.host.erofs import format as erofs_format

    monkeypatch.setattr(repository_module, "MAX_STREAM_OBJECT", 1 << 20)
    monkeypatch.setattr(erofs_format, "MAX_IMAGE_SIZE", 1 << 20)
    big = repo.ensure_object(b"b" * ((1 << 20) + 1))
    os.makedirs(repo.path / "streams", exist_ok=True)
    os.symlink(f"../{repo.object_relpath(big)}", repo.path / "streams/big")
    read: list[int] = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: read.append(1) or real_fdopen(*a, **k))
    with pytest.raises(RepositoryError, match=rf"^object sha256:{big.hex()} holds 1048577 bytes, more than a "
                                              r"splitstream can \(1048576\): what names it is damaged \(run `pycfs "
                                              r"fsck --repair`\)"):
        repo.stream_data("big")
    with pytest.raises(RepositoryError, match="holds 1048577 bytes, more than an EROFS image can"):
        repo.image_bytes(big)
    assert read == []
    assert repo.read_object(big) == b"b" * ((1 << 20) + 1)  # read as what it is, it is whole


# ---------------------------------------------------------------------------- walking refs, odd entries


def test_walk_refs_follows_no_link_and_stops_at_the_depth_cap(repo, tmp_path, request):
    """One walk for every listing: links sorted with their kind, a link to a directory and the
    directory at the depth cap not entered; 1,100 levels walked with a bounded number of fds
    (os.walk recursed: RecursionError)."""
    from pycfs.host.repository import REF_DEPTH_LIMIT, RefEntry

    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    os.symlink("../x", outside / "sub" / "hidden")
    refs = repo.path / "streams/refs"
    (refs / "ns").mkdir(parents=True)
    os.symlink("../../x", refs / "ns/a")
    os.symlink("/nonexistent", refs / "dead")
    os.symlink(outside, refs / "dirlink")
    os.mkfifo(refs / "fifo")
    (repo.path / "streams/x").write_bytes(b"")
    _nest(refs, 1100, "d")
    request.addfinalizer(lambda: unnest(refs, "d"))
    before = len(os.listdir("/proc/self/fd"))
    entries = repo.walk_refs("streams/refs")
    assert len(os.listdir("/proc/self/fd")) == before
    deep = "streams/refs/" + "/".join(["d"] * REF_DEPTH_LIMIT)
    assert [e for e in entries if e.path.split("/")[2] != "d"] == [
        RefEntry("streams/refs/dead", "dangling", "/nonexistent"),
        RefEntry("streams/refs/dirlink", "dir-link", str(outside)),
        RefEntry("streams/refs/fifo", "other"),
        RefEntry("streams/refs/ns", "dir"),
        RefEntry("streams/refs/ns/a", "link", "../../x"),
    ]
    assert [e for e in entries if e.kind == "too-deep"] == [RefEntry(deep, "too-deep")]
    assert repo.list_links("streams/refs") == [("dead", "/nonexistent"), ("ns/a", "../../x")]
    # a top that is a link is one entry, and nothing is listed through it
    os.symlink("refs/ns", repo.path / "streams/linked")
    assert repo.walk_refs("streams/linked") == [RefEntry("streams/linked", "dir-link", "refs/ns")]
    assert repo.list_links("streams/linked") == []


def test_a_ref_name_deeper_than_the_cap_is_refused(repo):
    from pycfs.host.repository import REF_DEPTH_LIMIT

    repo.write_stream(repo.new_stream(CONTENT_OCI_LAYER), "s")
    repo.set_stream_ref("/".join(["a"] * REF_DEPTH_LIMIT), "s")
    with pytest.raises(RepositoryError, match=rf"more than {REF_DEPTH_LIMIT} components$"):
        repo.set_stream_ref("/".join(["a"] * (REF_DEPTH_LIMIT + 1)), "s")
    assert repo.list_links("streams/refs") == [("/".join(["a"] * REF_DEPTH_LIMIT), "../" * REF_DEPTH_LIMIT + "s")]


def test_remove_entry_removes_any_depth_and_never_follows_a_link(tmp_path):
    from pycfs.host.repository import remove_entry

    victim = tmp_path / "victim"
    (victim / "inner").mkdir(parents=True)
    (victim / "inner" / "f").write_bytes(b"precious")
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("top", dir_fd=fd)
    cur = os.open("top", os.O_RDONLY, dir_fd=fd)
    for _ in range(1500):
        os.symlink(str(victim), "link", dir_fd=cur)
        os.mkfifo("fifo", dir_fd=cur)
        os.mkdir("d", dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    remove_entry(fd, "top")
    os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["victim"] and (victim / "inner" / "f").read_bytes() == b"precious"


def test_only_a_regular_file_is_an_object_and_a_store_replaces_anything_else(repo, monkeypatch):
    """A directory, a symlink or a fifo by an object's name is no object for any lookup (one
    by one or by listing); a streamed store (whose commit met EEXIST and took it as
    present) puts the object in its place."""
    from pycfs.host import repository as repository_module

    datas = [bytes([i]) * 5000 for i in range(3)]
    ids = [digest_bytes(d) for d in datas]
    for oid, kind in zip(ids, ["dir", "link", "fifo"]):
        path = repo.object_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            (path / "x").mkdir(parents=True)
        elif kind == "link":
            os.symlink("/etc/passwd", path)
        else:
            os.mkfifo(path)
    for oid in ids:
        assert not repo.has_object(oid) and repo.object_size(oid) is None
    assert not repo.has_objects(ids[:1])
    monkeypatch.setattr(repository_module, "LISTING_BYTES_PER_LOOKUP", 1 << 30)  # by listing
    for oid in ids:
        assert not repo.has_objects([oid])
    monkeypatch.setattr(repository_module, "LOOKUP_MISSES_BEFORE_SKIPPING", 0)  # no lookup: the commit's EEXIST
    for data, oid in zip(datas, ids):
        w = repo.object_writer()
        w.write(data)
        assert w.finish() == (oid, False)
        assert repo.read_object(oid) == data and stat.S_ISREG(os.lstat(repo.object_path(oid)).st_mode)
    assert repo.has_objects(ids)


def test_a_link_is_never_written_through_a_symlinked_directory(repo, tmp_path):
    """streams/refs/oci made a link to a directory elsewhere: a tag was written there (gc and
    fsck no longer follow it, but the write did); now refused, nothing made outside."""
    w = repo.new_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"s")
    repo.write_stream(w, "s")
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo.path / "streams/refs").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, repo.path / "streams/refs/oci")
    with pytest.raises(RepositoryError, match=r"^streams/refs/oci in .* is a symlink or not a directory: run `pycfs "
                                              r"fsck --repair`"):
        repo.set_stream_ref("oci/t", "s")
    assert os.listdir(outside) == []
    repo.set_stream_ref("other/t", "s")  # (a real directory, made as before)
    assert os.readlink(repo.path / "streams/refs/other/t") == "../../s"


def test_a_tag_is_never_read_or_removed_through_a_symlinked_directory(repo, tmp_path):
    """streams/refs/oci made a link to a directory elsewhere: `untag victim` removed the file
    of that name there, and a tag was read from there; now both are refused in one line."""
    from pycfs.host.oci.streams import resolve_tag, untag_image

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    os.symlink("../../oci-manifest-sha256:" + "a" * 64, outside / "t")
    (repo.path / "streams/refs").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, repo.path / "streams/refs/oci")
    why = r"^a directory of streams/refs/oci/\w+ in .* is a symlink or not a directory: run `pycfs fsck --repair`"
    with pytest.raises(RepositoryError, match=why):
        untag_image(repo, "victim")
    with pytest.raises(RepositoryError, match=why):
        resolve_tag(repo, "t")
    assert (outside / "victim").read_bytes() == b"keep me"
