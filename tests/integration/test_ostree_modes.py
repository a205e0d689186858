"""`pycfs ostree pull-local` from repositories of every mode the `ostree` CLI makes, as root
on a reflinking XFS: the image's tree equals `ostree checkout` of the same commit
(types, modes, owners, xattrs, content, symlink targets), the mounted image equals it too,
bare content is reflinked, and one commit gives one image id whatever mode it came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ostree_trees import (
    commit,
    describe_dir,
    describe_image,
    init_repo,
    make_tree,
    ostree,
    pycfs,
)
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import Repository

pytestmark = pytest.mark.integration

MODES = ["archive", "bare", "bare-user", "bare-user-only"]



@pytest.fixture(scope="module")
def repos(reflink_dir):
    if not os.path.exists("/usr/bin/ostree"):
        pytest.skip("the ostree CLI is not installed (tools/setup.sh)")
    base = Path(tempfile.mkdtemp(dir=reflink_dir, prefix="ostree-modes-"))
    archive = init_repo(base / "archive", "archive")
    commit(archive, make_tree(base / "tree"), "main")
    # bare-user-only keeps no owners, xattrs or setuid bits: commit what it can hold
    commit(archive, make_tree(base / "plain", xattrs=False, setid=False), "main-plain",
           "--owner-uid=0", "--owner-gid=0", "--no-xattrs")
    out = {"archive": (archive, "main")}
    for mode in MODES[1:]:
        ref = "main-plain" if mode == "bare-user-only" else "main"
        repo = init_repo(base / mode, mode)
        ostree("pull-local", f"--repo={repo}", archive, ref)
        out[mode] = (repo, ref)
    return base, out


@pytest.mark.parametrize("mode", MODES)
def test_pull_local_equals_checkout_and_mount(repos, mode):
    base, by_mode = repos
    repo, ref = by_mode[mode]
    cfs = base / f"cfs-{mode}"
    pycfs(cfs, "init")
    result = json.loads(pycfs(cfs, "ostree", "pull-local", repo, ref, "--json").stdout)
    assert result["commit"] == ostree("rev-parse", f"--repo={repo}", ref)
    # checked out from the archive (the same commit; a bare-user-only checkout drops sticky bits)
    checkout = base / f"checkout-{mode}"
    ostree("checkout", f"--repo={by_mode['archive'][0]}", result["commit"], checkout)
    expected = describe_dir(checkout)
    with Repository.open(cfs) as r:
        image = describe_image(r, bytes.fromhex(result["image"]))
    assert image == expected
    if mode == "bare-user-only":
        assert all(uid == 0 and not x for _t, _m, uid, _g, x, _c in image.values())
    else:
        assert image["/etc/secret"][2:4] == (1000, 1000) and image["/README"][4] == (("user.test", b"value"),)
        assert image["/bin/app"][1] == 0o4755
    # large content: reflinked out of a bare repository, from the temporary inflated copy of an archive
    assert set(result["stored"]) == {"reflinked"}, result["stored"]

    mnt = base / f"mnt-{mode}"
    mnt.mkdir()
    pycfs(cfs, "ostree", "mount", ref, mnt)
    try:
        mounted = describe_dir(mnt)
        # one ostree file object, one inode: the hardlinked pair
        links = [os.stat(mnt / "share/data" / n) for n in ("lib.so", "lib.so.1")]
        assert links[0].st_ino == links[1].st_ino and links[0].st_nlink == 2
    finally:
        subprocess.run(["umount", mnt], check=True)
    assert mounted == expected


def test_one_commit_one_image_whatever_the_mode(repos):
    base, by_mode = repos
    images = {}
    for mode in ("archive", "bare", "bare-user"):
        cfs = base / f"cfs-same-{mode}"
        pycfs(cfs, "init")
        repo, ref = by_mode[mode]
        images[mode] = json.loads(pycfs(cfs, "ostree", "pull-local", repo, ref, "--json").stdout)["image"]
    assert len(set(images.values())) == 1, images


def test_changed_bare_object_is_refused_and_nothing_committed(repos):
    """A bare object whose content no longer matches its name (edited in place)."""
    base, by_mode = repos
    repo, ref = by_mode["bare"]
    damaged = base / "bare-damaged"
    subprocess.run(["cp", "-a", "--reflink=auto", repo, damaged], check=True)
    large = max((p for p in (damaged / "objects").rglob("*.file") if p.is_file() and not p.is_symlink()),
                key=lambda p: p.stat().st_size)
    with open(large, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    cfs = base / "cfs-damaged"
    pycfs(cfs, "init")
    err = pycfs(cfs, "ostree", "pull-local", damaged, ref, "--progress", "none", check=False)
    name = large.parent.name + large.name.removesuffix(".file")
    assert err.returncode == 1
    assert err.stderr.splitlines() == [
        (f"pycfs: error: object {name}.file: content does not match its checksum: "
         "the source repository is corrupt or was tampered with")]
    assert pycfs(cfs, "ostree", "images").stdout == ""
    assert not (cfs / "streams" / f"ostree-commit-{ostree('rev-parse', f'--repo={repo}', ref)}").exists()
    # the object workers check the checksum while they hash the copy: the edited content
    # never became an object
    with Repository.open(cfs) as r:
        assert not r.has_object(digest_bytes(large.read_bytes()))


_NO_TRIO = """
import sys
import pycfs.host.workers.fork as fork
from pycfs.tools.cli import main
real = fork.fork_workers
forked = []
def spy(*args, **kwargs):
    forked.extend(real(*args, **kwargs))
    return forked
fork.fork_workers = spy
rc = main(sys.argv[1:])
print(("trio loaded" if "trio" in sys.modules else "no trio") + (", workers forked" if forked else ""), file=sys.stderr)
sys.exit(rc)
"""


def _pull_local(cfs: Path, *args: str | Path) -> tuple[dict, str]:
    """`pycfs ostree pull-local ARGS --json` on cfs: (its result, whether it loaded trio
    and forked object workers: "no trio", "no trio, workers forked", "trio loaded"...)."""
    run = subprocess.run([sys.executable, "-c", _NO_TRIO, "--repo", cfs, "ostree", "pull-local", *args, "--json"],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(run.stdout), run.stderr.splitlines()[-1]


@pytest.mark.parametrize("mode", ["bare", "bare-user"])
def test_small_update_and_re_pull_run_without_the_event_loop(repos, mode):
    """An update bringing less than 1 MiB of new content from a local repository, and a
    re-pull, are done in process; a pull of more goes to forked object workers, and
    without trio too (every file is known once the commit is walked). Either way gives the
    same commit stream and image."""
    base, by_mode = repos
    repo, ref = by_mode[mode]
    tree = base / f"update-{mode}"
    make_tree(tree)
    for i in range(3):  # 600 KB of new content
        (tree / f"new{i}").write_bytes(os.urandom(200_000))
    ostree("commit", f"--repo={repo}", "--branch=update", "--timestamp=2024-01-02T03:04:05Z", tree)
    step = base / f"cfs-step-{mode}"
    whole = base / f"cfs-whole-{mode}"
    for cfs in (step, whole):
        pycfs(cfs, "init")
    first, how = _pull_local(step, repo, ref, "os")
    assert how == "no trio, workers forked" and first["files_fetched"] > 0  # 3.4 MB of content
    update, how = _pull_local(step, repo, "update", "os")
    assert how == "no trio"
    assert update["files_fetched"] == 3 and update["stored"] == {"reflinked": 3}, update
    again, how = _pull_local(step, repo, "update", "os")
    assert how == "no trio" and again["already_present"] and again["image"] == update["image"]
    direct, how = _pull_local(whole, repo, "update")
    assert how == "no trio, workers forked" and (direct["commit"], direct["image"]) == (update["commit"], update["image"])
    with Repository.open(step) as a, Repository.open(whole) as b:
        stream = f"ostree-commit-{update['commit']}"
        assert a.stream_data(stream) == b.stream_data(stream)


def test_changed_bare_object_in_a_small_update_is_refused(repos):
    """The in-process store checks an update's files as the workers do: a bare object
    edited in place is one line naming it, and NAME stays on the commit it named."""
    base, by_mode = repos
    repo, ref = by_mode["bare"]
    damaged = base / "bare-update-damaged"
    subprocess.run(["cp", "-a", "--reflink=auto", repo, damaged], check=True)
    tree = base / "update-damaged"
    make_tree(tree)
    (tree / "new").write_bytes(os.urandom(100_000))
    new = ostree("commit", f"--repo={damaged}", "--branch=update", "--timestamp=2024-01-02T03:04:05Z", tree)
    cfs = base / "cfs-update-damaged"
    pycfs(cfs, "init")
    first, _ = _pull_local(cfs, damaged, ref, "os")
    digest = ostree("ls", f"--repo={damaged}", "-C", new, "/new").split()[-2]
    obj = damaged / "objects" / digest[:2] / f"{digest[2:]}.file"
    with open(obj, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    run = subprocess.run([sys.executable, "-c", _NO_TRIO, "--repo", cfs, "ostree", "pull-local", damaged, "update",
                          "os", "--progress", "none"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        (f"pycfs: error: object {digest}.file: content does not match its checksum: "
         "the source repository is corrupt or was tampered with"), "no trio"]
    assert pycfs(cfs, "ostree", "images").stdout.split() == ["NAME", "COMMIT", "os", first["commit"]]
    assert not (cfs / "streams" / f"ostree-commit-{new}").exists()


def test_small_update_of_many_files_does_not_run_out_of_fds(repos):
    """An update of many small files (under 1 MiB in all) is not held open at once: past
    HERE_FILES it goes to forked object workers, within a limit of 512 fds."""
    base, by_mode = repos
    repo, ref = by_mode["bare-user"]
    tree = base / "update-many"
    make_tree(tree)
    many = tree / "many"
    many.mkdir()
    for i in range(700):  # 140 KB in 700 files, each held by an fd until stored
        (many / f"f{i}").write_bytes(os.urandom(200))
    ostree("commit", f"--repo={repo}", "--branch=update-many", "--timestamp=2024-01-02T03:04:05Z", tree)
    cfs = base / "cfs-update-many"
    pycfs(cfs, "init")
    _pull_local(cfs, repo, ref, "os")

    def low_fd_limit() -> None:
        import resource

        # The hard limit too: the CLI lifts the soft limit to the hard one at its start.
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    run = subprocess.run([sys.executable, "-c", _NO_TRIO, "--repo", cfs, "ostree", "pull-local", repo, "update-many",
                          "os", "--json"], capture_output=True, text=True, timeout=600, preexec_fn=low_fd_limit)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["files_fetched"] == 700 and run.stderr.splitlines()[-1] == "no trio, workers forked"
    with Repository.open(cfs) as r:
        image = describe_image(r, bytes.fromhex(result["image"]))
    expected = describe_dir(tree)
    names = [p for p in expected if p.startswith("/many/")]
    assert len(names) == 700 and [image[p][-1] for p in names] == [expected[p][-1] for p in names]


# `python -c _DAMAGE_EARLY OSTREE_REPO ARGS...`: `pycfs ARGS...`, where the first file the pull
# sends a forked worker before trio starts is edited in OSTREE_REPO (a bare one) just before.
_DAMAGE_EARLY = """
import sys
from pycfs.host.ostree.pullcore import PullCore
from pycfs.tools.cli import main

real = PullCore.fork_workers

def damage_first(self):
    name = self.files[0].hex()
    with open(f"{sys.argv[1]}/objects/{name[:2]}/{name[2:]}.file", "r+b") as f:
        f.seek(100)
        f.write(b"X")
    print(name, file=sys.stderr)
    return real(self)

PullCore.fork_workers = damage_first
sys.exit(main(sys.argv[2:]))
"""


def test_changed_bare_object_sent_to_a_worker_before_the_pool_is_refused(repos):
    """A pull of more files than it stores in process writes each forked worker its first
    files before trio is imported: a bare object among them edited in place is refused by
    that worker as by the pool's, one line naming it, nothing committed or tagged."""
    base, _ = repos
    tree = base / "tree-early"
    (tree / "many").mkdir(parents=True)
    for i in range(600):
        (tree / "many" / f"f{i}").write_bytes(os.urandom(2000))
    repo = init_repo(base / "bare-early", "bare")
    new = commit(repo, tree, "main")
    cfs = base / "cfs-early"
    pycfs(cfs, "init")
    run = subprocess.run([sys.executable, "-c", _DAMAGE_EARLY, repo, "--repo", cfs, "ostree", "pull-local", "--jobs",
                          "2", repo, "main", "--progress", "none"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    damaged = run.stderr.splitlines()[0]
    assert run.stderr.splitlines()[1:] == [
        (f"pycfs: error: object {damaged}.file: content does not match its checksum: "
         "the source repository is corrupt or was tampered with")]
    assert pycfs(cfs, "ostree", "images").stdout == ""
    assert not (cfs / "streams" / f"ostree-commit-{new}").exists()
