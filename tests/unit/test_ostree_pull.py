"""`pycfs ostree pull-local` from an archive repository the real `ostree` CLI wrote (no
root needed), and the commands around it: images, inspect, dump, compute-id,
create-image, tag, untag, and gc keeping what ostree refs reach."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ostree_trees import (
    commit,
    describe_dir,
    describe_image,
    have_ostree,
    init_repo,
    make_tree,
    ostree,
    pycfs,
)
from pycfs.host.gc import gc
from pycfs.host.ostree.commitstream import load_commit
from pycfs.host.repository import Repository

pytestmark = pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")



@pytest.fixture(scope="module")
def source(tmp_path_factory):
    base = tmp_path_factory.mktemp("src")
    repo = init_repo(base / "repo", "archive")
    v1 = commit(repo, make_tree(base / "tree1"), "main")
    v2 = commit(repo, make_tree(base / "tree2", version=2), "next")
    checkout = base / "checkout"
    ostree("checkout", f"--repo={repo}", "-U", "main", checkout)
    return repo, v1, v2, checkout


def _plain(description):
    """Type, permission bits and content: a user-mode checkout keeps no owners or xattrs,
    and drops setuid and setgid bits (the integration tests compare all as root)."""
    return {p: (t, m & ~0o6000, c) for p, (t, m, _u, _g, _x, c) in description.items()}


def test_pull_local_archive_gives_the_checkout_tree(source, tmp_path):
    repo, v1, _v2, checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    out = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "main", "--json").stdout)
    assert out["commit"] == v1 and out["ref"] == "main" and not out["already_present"]
    assert out["files_fetched"] > 0 and out["metadata_fetched"] > 0
    with Repository.open(cfs) as r:
        image = describe_image(r, bytes.fromhex(out["image"]))
    assert _plain(image) == _plain(describe_dir(checkout))
    assert image["/README"][4] == (("user.test", b"value"),)
    assert image["/share/data"][4] == (("user.dir", b"d"),)
    assert (image["/bin/app"][1], image["/bin/sgid"][1], image["/tmp"][1]) == (0o4755, 0o2711, 0o1777)
    assert pycfs(cfs, "ostree", "images").stdout.split() == ["NAME", "COMMIT", "main", v1]
    assert pycfs(cfs, "ostree", "compute-id", "main").stdout.strip() == out["image"]
    assert pycfs(cfs, "ostree", "create-image", v1[:10]).stdout.strip() == out["image"]
    # fsck of the whole repository (objects named by their digests, the stream, the image)
    assert "status: ok" in pycfs(cfs, "fsck").stdout


def test_inspect_and_dump(source, tmp_path):
    repo, v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    pycfs(cfs, "ostree", "pull-local", repo, v1, "named")
    lines = pycfs(cfs, "ostree", "inspect", "named").stdout.splitlines()
    assert lines[0] == f"commit {v1}"
    assert "date 2024-01-02 03:04:05 UTC" in lines and lines[-1] == "commit main"
    assert pycfs(cfs, "ostree", "inspect", "--metadata", "named").stdout == "ostree.ref-binding=['main']\n"
    shown = json.loads(pycfs(cfs, "ostree", "inspect", "--json", "named").stdout)
    assert shown == {"commit": v1, "parent": None, "timestamp": 1704164645, "date": "2024-01-02 03:04:05 UTC",
                     "tree": shown["tree"], "dirmeta": shown["dirmeta"], "image": shown["image"],
                     "subject": "commit main", "body": "",
                     "metadata": [{"key": "ostree.ref-binding", "type": "as", "value": ["main"], "text": "['main']"}]}
    assert [f"tree {shown['tree']}", f"dirmeta {shown['dirmeta']}", f"image {shown['image']}"] == lines[2:5]
    dump = pycfs(cfs, "ostree", "dump", "named").stdout
    assert "/share/data/lib-link.so 8 120777" in dump and "user.test=value" in dump


def test_inspect_dates_a_commit_as_ostree_show_does(tmp_path):
    """The stored u64 is read as signed seconds (as `ostree show` reads it): a commit of
    1960 is dated 1960 (it was an OverflowError); so is the downgrade refusal, which
    compares the u64s as ostree does (a 1960 commit is newer than one of 1970 there)."""
    src = init_repo(tmp_path / "src", "archive")
    tree = make_tree(tmp_path / "tree", xattrs=False, setid=False)
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    ids = {}
    for stamp in ("1960-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z"):
        branch = f"t{stamp[:4]}"
        ids[branch] = ostree("commit", f"--repo={src}", f"--branch={branch}", "--no-bindings", f"--timestamp={stamp}",
                             tree)
        shown = next(line for line in ostree("show", f"--repo={src}", branch).splitlines() if line.startswith("Date:"))
        assert shown.split()[1:] == [stamp[:10], stamp[11:19], "+0000"]
        pycfs(cfs, "ostree", "pull-local", src, branch)
        lines = pycfs(cfs, "ostree", "inspect", branch).stdout.splitlines()
        assert lines[1] == f"date {stamp[:10]} {stamp[11:19]} UTC", lines
    (src / "refs" / "heads" / "t1960").write_text(ids["t1970"] + "\n")
    refused = pycfs(cfs, "ostree", "pull-local", src, "t1960", check=False)
    assert refused.stderr == (f"pycfs: error: commit {ids['t1970']} (1970-01-01 00:00:00 UTC) is older than commit "
                              f"{ids['t1960']} (1960-01-01 00:00:00 UTC) that t1960 names now: refusing the downgrade "
                              "(--allow-downgrade permits it)\n")


def test_inspect_metadata_cannot_be_forged(tmp_path):
    """A newline in a string, a comma in a list element, bytes and numbers each print in
    the GVariant text format, one line a key, as `ostree show --print-metadata-key` prints
    the strings, lists and bytes (it byte-swaps numbers: test_gvariant compares those); a
    key that is not a plain name is quoted. --json gives each value with its type."""
    src = init_repo(tmp_path / "src", "archive")
    ostree("commit", f"--repo={src}", "--branch=m", "--no-bindings",
           "--add-metadata-string=description=line one\nostree.ref-binding=[evil]", "--add-metadata-string=list=a, b",
           "--add-metadata=arr=['a, b', 'c']", "--add-metadata=bytes=b'text'", "--add-metadata=n=int64 5",
           "--add-metadata-string=odd key\nx=v", make_tree(tmp_path / "tree", xattrs=False, setid=False))
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    pycfs(cfs, "ostree", "pull-local", src, "m")
    lines = pycfs(cfs, "ostree", "inspect", "--metadata", "m").stdout.splitlines()
    expected = {"description": "'line one\\nostree.ref-binding=[evil]'", "list": "'a, b'", "arr": "['a, b', 'c']",
                "bytes": "b'text'"}
    for key, text in expected.items():
        assert ostree("show", f"--repo={src}", f"--print-metadata-key={key}", "m") == text
    assert sorted(lines) == sorted([*(f"{k}={v}" for k, v in expected.items()), "n=int64 5", "'odd key\\nx'='v'"])
    shown = json.loads(pycfs(cfs, "ostree", "inspect", "--metadata", "--json", "m").stdout)["metadata"]
    assert {m["key"]: (m["type"], m["value"]) for m in shown} == {
        "description": ("s", "line one\nostree.ref-binding=[evil]"), "list": ("s", "a, b"), "arr": ("as", ["a, b", "c"]),
        "bytes": ("ay", b"text\0".hex()), "n": ("x", 5), "odd key\nx": ("s", "v")}


def test_second_pull_under_the_same_name_uses_it_as_base(source, tmp_path):
    repo, v1, v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    first = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "main", "sys", "--json").stdout)
    second = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "next", "sys", "--json").stdout)
    assert second["bases"] == [f"sys was {v1}"]
    # v2 changes bin/app and etc/config and adds share/new.txt: only those are fetched
    assert second["files_fetched"] == 3 and second["files_reused"] == first["files_fetched"] - 2
    fresh = tmp_path / "fresh"
    pycfs(fresh, "init")
    plain = json.loads(pycfs(fresh, "ostree", "pull-local", repo, "next", "--json").stdout)
    assert plain["image"] == second["image"] and plain["commit"] == second["commit"] == v2
    again = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "next", "sys", "--json").stdout)
    assert again["already_present"] and again["files_fetched"] == 0


# The CLI in a fresh process, counting the commit streams it reads; then whether it loaded the EROFS writer.
_COUNT_STREAMS = r"""
import sys
from pycfs.host.ostree.commitstream import CommitObjects
from pycfs.tools.cli import main

read = []
real = CommitObjects.from_stream.__func__
CommitObjects.from_stream = classmethod(lambda cls, reader, name: read.append(name) or real(cls, reader, name))
code = main(sys.argv[1:])
print(code, len(read), "pycfs.host.erofs.writer" in sys.modules)
"""


def test_a_repull_under_the_same_name_reads_its_stream_once_and_writes_no_image(source, tmp_path):
    """The commit NAME names is the one pulled: its stream, loaded for the downgrade check,
    serves the re-pull too, and the image is there (no EROFS writer is loaded)."""
    repo, _v1, v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    first = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "next", "sys", "--json").stdout)

    def repull(*argv):
        out = subprocess.run([sys.executable, "-c", _COUNT_STREAMS, "--repo", cfs, "ostree", "pull-local", repo,
                              *argv, "--json"], capture_output=True, text=True, check=True, cwd="/").stdout
        result, counts = out.rsplit("}", 1)
        return json.loads(result + "}"), counts.split()

    again, counts = repull("next", "sys")
    assert again["already_present"] and again["image"] == first["image"] and again["commit"] == v2
    assert counts == ["0", "1", "False"]
    # under a new name nothing was loaded before: the stream is read once there too
    assert repull("next", "other")[1] == ["0", "1", "False"]


# The CLI in a fresh process with the cyclic collector made eager (a pass every 10
# allocations): the passes that ran while the pull walked the commit, stored files itself
# and built the image's tree, and whether the collector is on again after the pull.
_COUNT_COLLECTIONS = r"""
import gc, sys
from pycfs.host.ostree import image, pullcore
from pycfs.tools.cli import main

inside, passes = [False], []
gc.callbacks.append(lambda phase, info: inside[0] and phase == "start" and passes.append(info["generation"]))

def counted(real):
    def run(*args, **kwargs):
        inside[0] = True
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] = False
    return run

pullcore.PullCore.walk_here = counted(pullcore.PullCore.walk_here)
pullcore.PullCore.store_here = counted(pullcore.PullCore.store_here)
image.build_filesystem = counted(image.build_filesystem)
gc.set_threshold(10)
code = main(sys.argv[1:])
print(code, len(passes), gc.isenabled())
"""


def test_a_local_pull_runs_no_collector_pass_while_it_walks_and_builds(source, tmp_path):
    """The walk, the files stored in process and the tree make thousands of objects and no
    cycles: the collector is paused meanwhile (it rescanned them dozens of times), and on
    again after."""
    repo, _v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    for ref in ("main", "next"):  # a pull, then an update under the same name
        out = subprocess.run([sys.executable, "-c", _COUNT_COLLECTIONS, "--repo", cfs, "ostree", "pull-local", repo,
                              ref, "sys"], capture_output=True, text=True, check=True, cwd="/").stdout
        assert out.splitlines()[-1] == "0 0 True"


def test_pull_local_uses_the_archive_repositorys_static_deltas(source, tmp_path):
    """Deltas `ostree static-delta generate` made (from nothing to v1, v1 to v2), with every
    file object then deleted from the repository: the pulls can only have taken the files
    from the deltas, and give the images a plain pull gives."""
    import shutil

    repo, v1, v2, _checkout = source
    work = tmp_path / "repo"
    shutil.copytree(repo, work, symlinks=True)
    ostree("static-delta", "generate", f"--repo={work}", "--empty", f"--to={v1}")
    ostree("static-delta", "generate", f"--repo={work}", f"--from={v1}", f"--to={v2}")
    ostree("summary", f"--repo={work}", "-u")
    for filez in (work / "objects").rglob("*.filez"):
        filez.unlink()
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    scratch = json.loads(pycfs(cfs, "ostree", "pull-local", work, "main", "sys", "--json").stdout)
    update = json.loads(pycfs(cfs, "ostree", "pull-local", work, "next", "sys", "--json").stdout)
    assert (scratch["commit"], update["commit"]) == (v1, v2)
    assert scratch["delta_parts"] >= 1 and update["delta_parts"] >= 1
    assert update["bases"] == [f"sys was {v1}", f"static delta to {v2}"]  # (the delta from v1: no other exists)
    for got in (scratch, update):
        plain = tmp_path / f"plain-{got['commit']}"
        pycfs(plain, "init")
        ref = json.loads(pycfs(plain, "ostree", "pull-local", "--no-delta", repo, got["commit"], "--json").stdout)
        assert ref["image"] == got["image"] and ref["delta_parts"] == 0
    # without deltas the deleted objects are missing: one line naming one
    bare = tmp_path / "nodelta"
    pycfs(bare, "init")
    err = pycfs(bare, "ostree", "pull-local", "--no-delta", work, "main", check=False)
    assert err.returncode == 1 and err.stderr.startswith("pycfs: error: object ") and ".file is missing" in err.stderr


def test_create_image_and_a_repull_record_an_image_whose_link_was_removed(source, tmp_path):
    """images/<id> removed by hand (the object and the commit stream still there): `mount`
    finds no image by it; create-image and a re-pull record it again (they returned the
    id and wrote nothing)."""
    repo, _v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    image = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "main", "--json").stdout)["image"]
    for restore in (("ostree", "create-image", "main"), ("ostree", "pull-local", repo, "main")):
        (cfs / "images" / image).unlink()
        with Repository.open(cfs) as r:
            assert not r.image_linked(bytes.fromhex(image))
        pycfs(cfs, *restore)
        with Repository.open(cfs) as r:
            assert r.image_linked(bytes.fromhex(image)) and r.image_id(image).hex() == image
    assert "status: ok" in pycfs(cfs, "fsck").stdout


def test_a_deleted_commit_is_said_to_be_deleted(tmp_path):
    """`ostree prune --delete-commit` with core.tombstone-commits leaves a tombstone: the
    commit is said to be deleted, not just missing."""
    src = init_repo(tmp_path / "src", "archive")
    ostree("config", f"--repo={src}", "set", "core.tombstone-commits", "true")
    tree = make_tree(tmp_path / "tree", xattrs=False, setid=False)
    old = ostree("commit", f"--repo={src}", "--branch=main", "--no-bindings", "--timestamp=2024-01-01T00:00:00Z", tree)
    ostree("commit", f"--repo={src}", "--branch=main", "--no-bindings", tree)
    ostree("prune", f"--repo={src}", f"--delete-commit={old}")
    tombstone = f"objects/{old[:2]}/{old[2:]}.tombstone-commit"
    assert (src / tombstone).is_file()
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    err = pycfs(cfs, "ostree", "pull-local", src, old, check=False)
    assert err.stderr == (f"pycfs: error: object {old}.commit is missing from {src}: the commit was deleted there "
                          f"({tombstone} marks it)\n")
    (src / tombstone).unlink()
    err = pycfs(cfs, "ostree", "pull-local", src, old, check=False)
    assert err.stderr == f"pycfs: error: object {old}.commit is missing from {src}\n"


def test_tag_untag_and_gc(source, tmp_path):
    repo, v1, v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    pycfs(cfs, "ostree", "pull-local", repo, "main")
    pycfs(cfs, "ostree", "pull-local", repo, "next")
    assert pycfs(cfs, "ostree", "tag", v1[:12], "a/b").stdout.strip() == f"tagged {v1} as a/b"
    with Repository.open(cfs) as r:
        assert gc(r).objects_removed == 0  # everything is reachable
        assert load_commit(r, "a/b").commit.hex() == v1
    pycfs(cfs, "ostree", "untag", "main")
    pycfs(cfs, "ostree", "untag", "a/b")
    with Repository.open(cfs) as r:
        removed = gc(r)
        assert removed.objects_removed > 0  # v1's stream, image and the content only it has
        objects = load_commit(r, "next")
        assert all(r.has_object(e.external) for e in objects.entries.values() if e.external)
        assert r.has_object(objects.image_id)
    assert pycfs(cfs, "ostree", "images").stdout.split() == ["NAME", "COMMIT", "next", v2]
    err = pycfs(cfs, "ostree", "untag", "main", check=False)
    assert err.returncode == 1 and err.stderr == f"pycfs: error: no ostree ref 'main' in {cfs} (see `pycfs ostree images`)\n"
    err = pycfs(cfs, "ostree", "inspect", "main", check=False)
    assert err.returncode == 1 and err.stderr.startswith("pycfs: error: no ostree commit 'main'")


def test_ref_names_are_shown_escaped_and_a_read_only_repository_refuses_tag_and_untag(source, tmp_path):
    """Names with controls went to the terminal raw (`tagged`, `images`); untag in a
    read-only repository was a raw permission error; untag removed through a symlinked
    refs directory."""
    repo, v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    pycfs(cfs, "ostree", "pull-local", repo, "main")
    assert pycfs(cfs, "ostree", "tag", v1, "evil\x1b[2J").stdout == f"tagged {v1} as evil\\x1b[2J\n"
    assert "evil\\x1b[2J  " + v1 in pycfs(cfs, "ostree", "images").stdout
    meta = json.loads((cfs / "meta.json").read_text())
    meta["features"]["read-only-compatible"].append("x-newer")  # (opens read-only, for root too)
    (cfs / "meta.json").write_text(json.dumps(meta))
    for argv in (("tag", v1, "other"), ("untag", "main")):
        err = pycfs(cfs, "ostree", *argv, check=False)
        assert err.returncode == 1 and err.stderr == (f"pycfs: error: repository {cfs} is read-only for this user "
                                                      "(check its owner and mode, or pass --repo for one of your own)\n")
    assert (cfs / "streams/refs/ostree/main").is_symlink()


def test_downgrade_is_refused_as_ostree_timestamp_check_refuses_it(tmp_path):
    """NAME does not move to an older commit (a replayed old one) unless --allow-downgrade;
    the same second is not older. `ostree pull --timestamp-check` from the same repository
    (a file:// remote) is the oracle for each step."""
    src = init_repo(tmp_path / "src", "archive")
    stamps = {"new": "2024-01-02T00:00:00Z", "old": "2024-01-01T00:00:00Z", "same": "2024-01-02T00:00:00Z"}
    ids = {}
    for version, (branch, stamp) in enumerate(stamps.items(), 1):
        ids[branch] = ostree("commit", f"--repo={src}", f"--branch={branch}", "--no-bindings", f"--timestamp={stamp}",
                             make_tree(tmp_path / branch, version=version, xattrs=False, setid=False))
    oracle = init_repo(tmp_path / "oracle", "archive")
    ostree("remote", "add", f"--repo={oracle}", "--no-gpg-verify", "r", f"file://{src}")
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")

    def step(target: str, *extra: str) -> tuple[bool, bool]:
        """Point src's ref live at `target`, pull it into both: (pycfs took it, ostree took it)."""
        (src / "refs" / "heads" / "live").write_text(ids[target] + "\n")
        ours = pycfs(cfs, "ostree", "pull-local", src, "live", "sys", *extra, check=False)
        if ours.returncode:
            assert ours.stderr.count("\n") == 1 and "Traceback" not in ours.stderr
            assert f"commit {ids[target]} (2024-01-01 00:00:00 UTC) is older than commit" in ours.stderr
            assert "--allow-downgrade" in ours.stderr
        theirs = subprocess.run(["ostree", "pull", f"--repo={oracle}", "r", "live",
                                 *(() if extra else ("--timestamp-check",))], capture_output=True, text=True)
        if theirs.returncode:
            assert "chronologically older" in theirs.stderr
        return ours.returncode == 0, theirs.returncode == 0

    def named() -> str:
        return pycfs(cfs, "ostree", "images").stdout.split()[-1]

    assert step("new") == (True, True) and named() == ids["new"]
    assert step("old") == (False, False) and named() == ids["new"]  # nothing fetched or moved
    assert not pycfs(cfs, "ostree", "images").stdout.count(ids["old"])
    assert step("old", "--allow-downgrade") == (True, True) and named() == ids["old"]
    assert step("new") == (True, True) and named() == ids["new"]
    assert step("old") == (False, False) and named() == ids["new"]  # also when the old commit is stored
    assert step("same") == (True, True) and named() == ids["same"]


def test_commit_bound_to_other_refs_is_refused_as_ostree_refuses_it(tmp_path):
    """A commit `ostree commit --branch=stable` bound to stable comes only as stable (or by
    its checksum); one without bindings comes by any ref. `ostree pull` from the same
    repository (a file:// remote) is the oracle."""
    src = init_repo(tmp_path / "src", "archive")
    bound = ostree("commit", f"--repo={src}", "--branch=stable",
                   make_tree(tmp_path / "t1", xattrs=False, setid=False))
    free = ostree("commit", f"--repo={src}", "--branch=free", "--no-bindings",
                  make_tree(tmp_path / "t2", version=2, xattrs=False, setid=False))
    oracle = init_repo(tmp_path / "oracle", "archive")
    ostree("remote", "add", f"--repo={oracle}", "--no-gpg-verify", "r", f"file://{src}")
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    for target, ok in ((bound, False), (free, True)):
        (src / "refs" / "heads" / "testing").write_text(target + "\n")
        ours = pycfs(cfs, "ostree", "pull-local", src, "testing", check=False)
        theirs = subprocess.run(["ostree", "pull", f"--repo={oracle}", "r", "testing"], capture_output=True, text=True)
        assert (ours.returncode == 0, theirs.returncode == 0) == (ok, ok), (ours.stderr, theirs.stderr)
        if not ok:
            assert "ref binding" in theirs.stderr
            assert ours.stderr == (f"pycfs: error: commit {bound} is bound to stable (ostree.ref-binding), not to "
                                   "testing, the ref the repository serves it as\n")
            assert pycfs(cfs, "ostree", "images").stdout == ""
    assert json.loads(pycfs(cfs, "ostree", "pull-local", src, "stable", "--json").stdout)["commit"] == bound
    assert json.loads(pycfs(cfs, "ostree", "pull-local", src, bound, "pinned", "--json").stdout)["ref"] == "pinned"


def test_remote_and_mirror_refs_are_checked_against_their_name_upstream(tmp_path):
    """refs/remotes/REMOTE/BRANCH (`REMOTE/BRANCH` or ostree's `REMOTE:BRANCH`) and
    refs/mirrors/COLLECTION/BRANCH, as `ostree pull` and `ostree refs -c --create` write
    them, name commits bound to BRANCH: pulled (it was always refused, the binding compared
    with the whole path); a commit bound to another branch is refused naming both."""
    upstream = init_repo(tmp_path / "upstream", "archive")
    ostree("config", f"--repo={upstream}", "set", "core.collection-id", "org.example.Os")
    main = ostree("commit", f"--repo={upstream}", "--branch=os/main", make_tree(tmp_path / "t1", xattrs=False,
                                                                                 setid=False))
    other = ostree("commit", f"--repo={upstream}", "--branch=other", make_tree(tmp_path / "t2", version=2,
                                                                               xattrs=False, setid=False))
    local = init_repo(tmp_path / "local", "archive")
    ostree("remote", "add", f"--repo={local}", "--no-gpg-verify", "--collection-id=org.example.Os", "origin",
           f"file://{upstream}")
    ostree("pull", f"--repo={local}", "origin", "os/main", "other")
    ostree("refs", f"--repo={local}", "-c", "--create=org.example.Os:os/main", main)
    assert ostree("rev-parse", f"--repo={local}", "origin:os/main") == main
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    for ref, name in (("origin/os/main", "origin/os/main"), ("origin:os/main", "origin/os/main"),
                      ("org.example.Os/os/main", "org.example.Os/os/main")):
        out = json.loads(pycfs(cfs, "ostree", "pull-local", local, ref, "--json").stdout)
        assert (out["commit"], out["ref"]) == (main, name), ref
    # the remote's ref moved to a commit of another branch
    (local / "refs" / "remotes" / "origin" / "os" / "main").write_text(other + "\n")
    for ref in ("origin/os/main", "origin:os/main"):
        refused = pycfs(cfs, "ostree", "pull-local", local, ref, "moved", check=False)
        assert refused.stderr == (f"pycfs: error: commit {other} is bound to other (ostree.ref-binding), not to "
                                  f"os/main (asked for as {ref}), the ref the repository serves it as\n")
    for ref in ("nowhere:os/main", "origin:", ":os/main"):
        refused = pycfs(cfs, "ostree", "pull-local", local, ref, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert pycfs(cfs, "ostree", "images").stdout.split()[2:] == ["org.example.Os/os/main", main, "origin/os/main", main]


@pytest.mark.parametrize("as_json", [False, True])
def test_line_progress_says_the_counts(monkeypatch, capsys, as_json):
    """`--progress plain|json` (and no terminal): the counts so far, at most once a second."""
    from pycfs.tools.commands.ostree import _LineProgress

    progress = _LineProgress(as_json=as_json)
    progress.metadata(3)  # within the first second: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_LineProgress, "EVERY", 0.0)
    progress.file_found()
    progress.file_found()
    progress.file_done(3 << 20)
    lines = capsys.readouterr().err.splitlines()
    if as_json:
        last = json.loads(lines[-1])
        assert (last["event"], last["metadata_fetched"], last["files_found"], last["files_done"],
                last["content_bytes"]) == ("progress", 3, 2, 1, 3 << 20)
    else:
        assert lines[-1] == "metadata 3, files 1/2 (3.0 MiB)"
    assert len(lines) == 3


def test_pull_local_progress_none_is_quiet(source, tmp_path):
    repo, v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    done = pycfs(cfs, "ostree", "pull-local", repo, "main", "--json", "--progress", "none")
    assert json.loads(done.stdout)["commit"] == v1 and done.stderr == ""


def test_the_image_is_recorded_only_after_the_sync_that_covers_it(source, tmp_path, monkeypatch):
    """images/<id> and the commit stream appear after the syncfs that makes the image's
    object durable, never before it (a crash then leaves no image link to a lost object)."""
    from pycfs.host import syscalls
    from pycfs.tools.cli import main

    repo, _v1, _v2, _checkout = source
    cfs = tmp_path / "cfs"
    assert main(["--repo", str(cfs), "init"]) == 0
    seen: list[tuple[list[str], list[str]]] = []
    real = syscalls.syncfs

    def names(top: str) -> list[str]:
        return os.listdir(cfs / top) if (cfs / top).exists() else []

    def syncing(fd: int) -> None:
        seen.append(([n for n in names("images") if n != "refs"],
                     [n for n in names("streams") if n.startswith("ostree-commit-")]))
        real(fd)

    monkeypatch.setattr(syscalls, "syncfs", syncing)
    assert main(["--repo", str(cfs), "ostree", "pull-local", str(repo), "main", "--progress=none"]) == 0
    assert seen and all(shown == ([], []) for shown in seen), seen
    assert len([n for n in names("images") if n != "refs"]) == 1 and len(names("streams")) > 1


def _three_hundred_files(tmp_path, mode: str) -> Path:
    """A repository of that mode whose branch b holds f000 ... f299 (3,000 random bytes each)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i:03}").write_bytes(os.urandom(3000))
    repo = init_repo(tmp_path / "repo", mode)
    commit(repo, tree, "b")
    return repo


def test_a_failed_pull_local_keeps_what_it_fetched_for_the_next_try(tmp_path, monkeypatch, capsys):
    """A pull-local (an archive repository: files fetched as dirtrees name them) failing on
    a file cancelled the batches its object workers had in flight and dropped what was
    queued for them: the next try fetched and stored again files stored already (284 of 300
    in the docs review's run; 32 of 199 here). Now what was fetched before the failure is
    stored and kept in the partial stream the next try starts from, but for the batches the
    other fetchers were reading at that moment."""
    from pycfs.host.ostree import pull as pull_module
    from pycfs.host.ostree.objects import OstreeError
    from pycfs.host.ostree.source import LocalRepo
    from pycfs.tools.cli import main as cli_main

    repo = _three_hundred_files(tmp_path, "archive")
    real = LocalRepo.fetch_file
    fetched = [0]

    def fetch(self, *args, **kwargs):
        fetched[0] += 1
        if fetched[0] == 200:
            raise OstreeError("the source went away")
        return real(self, *args, **kwargs)

    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    monkeypatch.setattr(LocalRepo, "fetch_file", fetch)
    assert cli_main(["--repo", str(cfs), "ostree", "pull-local", str(repo), "b", "--progress", "none"]) == 1
    assert "the source went away" in capsys.readouterr().err
    monkeypatch.undo()
    again = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "b", "--json", "--progress", "none").stdout)
    assert again["files_reused"] + again["files_fetched"] == 300
    assert again["files_reused"] >= 199 - pull_module.LOCAL_FETCHERS * pull_module.LOCAL_BATCH, again


def test_a_failed_pull_local_of_a_walked_commit_keeps_what_its_forked_workers_stored(tmp_path):
    """The same where the commit is walked first and forked workers get the files (a bare
    repository): the first worker's request was stored, the second's failed on a missing
    file, and the stored ones were dropped with the workers (and the next try fetched all 300)."""
    repo = _three_hundred_files(tmp_path, "bare-user")
    checksum = ostree("ls", f"--repo={repo}", "-C", "b", "/f199").split()[4]
    obj = repo / "objects" / checksum[:2] / f"{checksum[2:]}.file"
    saved = tmp_path / "saved"
    obj.rename(saved)
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    # (-j: forked workers, not the store in process a commit this small gets)
    failed = pycfs(cfs, "ostree", "pull-local", repo, "b", "-j", "2", "--progress", "none", check=False)
    assert failed.returncode == 1
    assert failed.stderr == f"pycfs: error: object {checksum}.file is missing from {repo}\n"
    saved.rename(obj)
    again = json.loads(pycfs(cfs, "ostree", "pull-local", repo, "b", "--json", "--progress", "none").stdout)
    assert (again["files_reused"], again["files_fetched"]) == (150, 150)
