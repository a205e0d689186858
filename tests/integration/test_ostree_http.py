"""`pycfs ostree pull URL` against an archive repository served by a real HTTP server on
127.0.0.1 (http.server in a thread of the test, logging every request it answers).

What must show: the image equals `ostree checkout`; every object is fetched once; a second
commit pulled with a base fetches exactly the new objects; server errors and dropped
connections are retried; a server that dies half way or a pull interrupted half way,
re-run, completes without fetching again what was stored; a corrupted, truncated, missing
or malformed object is one line naming it, with nothing committed; a real-world tree.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
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
from gpgkeys import GpgHome
from pycfs.host.ostree.commitstream import load_stream
from pycfs.host.ostree.delta import index_path
from pycfs.host.ostree.objects import Commit
from pycfs.host.repository import Repository
from pycfs.protocol.gvariant import Variant, decode, encode

pytestmark = pytest.mark.integration


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: Server = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?")[0].lstrip("/")
        action = server.arrive(path)
        moved = server.redirect(path) if server.redirect is not None else None
        if moved is not None:
            self.send_response(moved[0])
            self.send_header("Location", moved[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if action == "drop":
            self.close_connection = True  # no response at all: the peer sees a reset
            return
        if callable(action):
            action(self)
            return
        if server.delay and path.endswith(".filez"):
            time.sleep(server.delay)
        super().do_GET()
        server.served(path)


class Server:
    """Serves `root`; `overrides[path]` is "drop", "cut", an HTTP status, bytes to serve, or a list of
    those to use one per request; after `dead_after` .filez answers every request is dropped;
    `redirect(path)`, when set, answers (status, Location) or None to serve the path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.answered: list[str] = []
        self.overrides: dict[str, object] = {}
        self.dead_after: int | None = None
        self.delay = 0.0
        self.redirect: Callable[[str], tuple[int, str] | None] | None = None
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.answered.clear()
            self.overrides.clear()
            self.dead_after = None
            self.delay = 0.0
            self.redirect = None

    def arrive(self, path: str) -> object:
        with self._lock:
            self.requests.append(path)
            filez = sum(p.endswith(".filez") for p in self.answered)
            if self.dead_after is not None and filez >= self.dead_after:
                return "drop"
            action = self.overrides.get(path)
            if isinstance(action, list):
                action = action.pop(0) if action else None
        if action is None or action == "drop":
            return action
        if action == "cut":  # the whole length announced, half the bytes sent, then the connection closed
            data = (self.root / path).read_bytes()

            def cut(h: http.server.BaseHTTPRequestHandler) -> None:
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data[:len(data) // 2])
                h.close_connection = True
            return cut
        if isinstance(action, int):
            return lambda h: h.send_error(action)
        assert isinstance(action, bytes)

        def send(h: http.server.BaseHTTPRequestHandler, data: bytes = action) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        return send

    def served(self, path: str) -> None:
        with self._lock:
            self.answered.append(path)

    def objects_requested(self) -> list[str]:
        return [p for p in self.requests if p.startswith("objects/")]


@contextmanager
def served_copy(repo: Path, tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    """A copy of repo a test may change, and a server of its own for it."""
    work = tmp_path / "repo"
    shutil.copytree(repo, work, symlinks=True)
    srv = Server(work)
    try:
        yield work, srv
    finally:
        srv.close()


def object_files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / "objects").rglob("*.*")}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: the trees carry files owned by other users")
    if shutil.which("ostree") is None:
        pytest.skip("the ostree CLI is not installed (tools/setup.sh)")
    base = tmp_path_factory.mktemp("ostree-http")
    repo = init_repo(base / "repo", "archive")
    v1 = commit(repo, make_tree(base / "tree1"), "main")
    server = Server(repo)
    yield base, repo, v1, server
    server.close()


@pytest.fixture
def server(site):
    site[3].reset()
    return site[3]


def _images(cfs: Path) -> str:
    return pycfs(cfs, "ostree", "images").stdout


def test_http_pull_equals_checkout_and_local_pull(site, server, tmp_path):
    _base, repo, v1, _ = site
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    result = json.loads(pycfs(cfs, "ostree", "pull", server.url, "main", "--json").stdout)
    assert result["commit"] == v1 and result["ref"] == "main"
    # every object of the commit exactly once; before them the ref and a look for a static delta
    assert sorted(server.objects_requested()) == sorted(object_files(repo))
    assert server.requests[:3] == ["summary", "refs/heads/main", index_path(bytes.fromhex(v1))]
    assert len(server.requests) == len(object_files(repo)) + 3
    assert result["requests"] == len(server.requests)
    checkout = tmp_path / "checkout"
    ostree("checkout", f"--repo={repo}", "main", checkout)
    with Repository.open(cfs) as r:
        assert describe_image(r, bytes.fromhex(result["image"])) == describe_dir(checkout)
    local = tmp_path / "local"
    pycfs(local, "init")
    assert json.loads(pycfs(local, "ostree", "pull-local", repo, "main", "--json").stdout)["image"] == result["image"]


def test_a_repository_not_in_archive_mode_is_refused_naming_its_mode(site, tmp_path):
    """A bare, bare-user or bare-user-only repository served over HTTP has no .filez
    objects: `ostree pull` ends on an HTTP 404; pycfs said a file object was missing. Its
    config, read once when the first file is missing, names the mode in one line. An
    archive repository missing a file still says that, as a pull that succeeds reads no
    config."""
    _base, repo, _v1, _ = site
    tree = make_tree(tmp_path / "tree", xattrs=False, setid=False)
    for mode in ("bare", "bare-user", "bare-user-only"):
        served = init_repo(tmp_path / mode, mode)
        commit(served, tree, "main", "--owner-uid=0", "--owner-gid=0")
        srv = Server(served)
        try:
            oracle = init_repo(tmp_path / f"oracle-{mode}", "archive")
            ostree("remote", "add", f"--repo={oracle}", "--no-gpg-verify", "r", srv.url)
            theirs = subprocess.run(["ostree", "pull", f"--repo={oracle}", "r", "main"], capture_output=True, text=True)
            assert theirs.returncode == 1 and "404" in theirs.stderr, theirs.stderr
            srv.requests.clear()
            cfs = tmp_path / f"cfs-{mode}"
            pycfs(cfs, "init")
            failed = pycfs(cfs, "ostree", "pull", srv.url, "main", "--progress", "none", check=False)
            assert failed.stderr == (f"pycfs: error: {srv.url} is a {mode} repository (core.mode in its config), whose "
                                     "files are not .filez objects: over HTTP pycfs pulls archive repositories only, "
                                     "as ostree does; `pycfs ostree pull-local` reads it where it is on disk\n")
            assert srv.requests.count("config") == 1 and _images(cfs) == ""
        finally:
            srv.close()
    with served_copy(repo, tmp_path) as (work, srv):
        missing = next(p for p in sorted(object_files(work)) if p.endswith(".filez"))
        (work / missing).unlink()
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        failed = pycfs(cfs, "ostree", "pull", srv.url, "main", "--progress", "none", check=False)
        name = missing.split("/", 1)[1].replace("/", "").replace(".filez", "")
        assert failed.stderr == f"pycfs: error: object {name}.file is missing from {srv.url}\n"
        assert srv.requests.count("config") == 1


def test_a_deleted_commit_is_said_to_be_deleted(site, tmp_path):
    """A commit `ostree prune --delete-commit` removed, leaving a tombstone, is said to be
    deleted (the tombstone is asked for only once the commit is missing)."""
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (work, srv):
        ostree("config", f"--repo={work}", "set", "core.tombstone-commits", "true")
        commit(work, make_tree(tmp_path / "tree2", version=2), "main", "--timestamp=2025-01-01T00:00:00Z")
        ostree("prune", f"--repo={work}", f"--delete-commit={v1}")
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        srv.requests.clear()
        err = pycfs(cfs, "ostree", "pull", srv.url, v1, "--progress", "none", check=False)
        tombstone = f"objects/{v1[:2]}/{v1[2:]}.tombstone-commit"
        assert err.stderr == (f"pycfs: error: object {v1}.commit is missing from {srv.url}: the commit was deleted "
                              f"there ({tombstone} marks it)\n")
        assert srv.requests[-1] == tombstone


def test_second_commit_with_base_fetches_only_new_objects(site, server, tmp_path):
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (work, srv):
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        pycfs(cfs, "ostree", "pull", srv.url, "main", "sys")
        before = object_files(work)
        v2 = commit(work, make_tree(tmp_path / "tree2", version=2), "main")
        new = object_files(work) - before
        srv.requests.clear()
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "sys", "--json").stdout)
        assert result["commit"] == v2 and result["bases"] == [f"sys was {v1}"]
        assert sorted(srv.objects_requested()) == sorted(new)
        assert sum(p.endswith(".filez") for p in new) == 3  # bin/app, etc/config, share/new.txt
        fresh = tmp_path / "fresh"
        pycfs(fresh, "init")
        plain = json.loads(pycfs(fresh, "ostree", "pull", srv.url, "main", "--json").stdout)
        assert plain["image"] == result["image"]
        # --base-name: the same from a base under another name
        other = tmp_path / "other"
        pycfs(other, "init")
        pycfs(other, "ostree", "pull-local", repo, "main", "old")
        srv.requests.clear()
        pycfs(other, "ostree", "pull", srv.url, "main", "--base-name", "old")
        assert sorted(srv.objects_requested()) == sorted(new)


def test_list_refs_and_refs_from_the_summary(site, server, tmp_path):
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (work, srv):
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        err = pycfs(cfs, "ostree", "list-refs", srv.url, check=False)
        assert err.returncode == 1 and err.stderr == (
            f"pycfs: error: {srv.url} has no summary file: run `ostree summary -u` on the server's repository\n")
        ostree("summary", f"--repo={work}", "-u")
        listed = pycfs(cfs, "ostree", "list-refs", srv.url).stdout.split()
        assert listed == ["REF", "COMMIT", "main", v1]
        (work / "refs" / "heads" / "main").unlink()  # resolved through the summary alone
        srv.requests.clear()
        assert json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "--json").stdout)["commit"] == v1
        assert srv.requests[0] == "summary" and "refs/heads/main" not in srv.requests


def test_static_deltas_from_scratch_and_from_a_base(site, server, tmp_path):
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (work, srv):
        ostree("static-delta", "generate", f"--repo={work}", "--empty", f"--to={v1}")
        ostree("summary", f"--repo={work}", "-u")
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        scratch = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "sys", "--json").stdout)
        assert scratch["delta_parts"] >= 1 and srv.objects_requested() == []
        assert [p.rsplit("/", 1)[-1] for p in srv.requests] == ["summary", "superblock", "0"]
        v2 = commit(work, make_tree(tmp_path / "tree2", version=2), "main")
        ostree("static-delta", "generate", f"--repo={work}", f"--from={v1}", f"--to={v2}")
        ostree("summary", f"--repo={work}", "-u")
        srv.requests.clear()
        update = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "sys", "--json").stdout)
        assert update["commit"] == v2 and update["delta_parts"] >= 1
        assert srv.objects_requested() == [] and any("-" in p for p in srv.requests if p.endswith("superblock"))
        for commit_id, got in ((v1, scratch), (v2, update)):
            plain = tmp_path / f"plain-{commit_id}"
            pycfs(plain, "init")
            srv.requests.clear()
            ref = json.loads(pycfs(plain, "ostree", "pull", "--no-delta", srv.url, commit_id, "--json").stdout)
            assert ref["image"] == got["image"] and ref["delta_parts"] == 0
            assert not any(p.startswith("deltas/") for p in srv.requests)
        checkout = tmp_path / "checkout"
        ostree("checkout", f"--repo={work}", v2, checkout)
        with Repository.open(cfs) as r:
            assert describe_image(r, bytes.fromhex(update["image"])) == describe_dir(checkout)


def test_downgrade_by_static_delta_is_refused_before_its_parts(site, server, tmp_path):
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (work, srv):
        newer = commit(work, make_tree(tmp_path / "tree2", version=2), "newer", "--timestamp=2025-01-01T00:00:00Z")
        ostree("static-delta", "generate", f"--repo={work}", "--empty", f"--to={v1}")
        ostree("summary", f"--repo={work}", "-u")
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        pycfs(cfs, "ostree", "pull", srv.url, "newer", "sys")
        srv.requests.clear()
        out = pycfs(cfs, "ostree", "pull", srv.url, "main", "sys", "--progress", "none", check=False)
        assert out.returncode == 1 and out.stderr.count("\n") == 1
        assert f"commit {v1} (2024-01-02 03:04:05 UTC) is older than commit {newer} (2025-01-01" in out.stderr
        assert [p.rsplit("/", 1)[-1] for p in srv.requests] == ["summary", "superblock"]  # no part, no object
        assert pycfs(cfs, "ostree", "images").stdout.split()[-2:] == ["sys", newer]
        allowed = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "sys", "--allow-downgrade", "--json").stdout)
        assert allowed["commit"] == v1 and allowed["delta_parts"] >= 1


@pytest.fixture
def gpg_keys(tmp_path):
    """Signing keys in a private GNUPGHOME: name -> (fingerprint, keyring holding it); the
    key "doomed" is revoked (and its keyring written) by `revoke_doomed`, after signing;
    "armored" is "good" in an ASCII-armored keyring."""
    gpg = GpgHome(tmp_path)
    try:
        keys = {}
        for name in ("good", "other", "doomed"):
            fpr = gpg.make_key(name)
            keys[name] = (fpr, tmp_path / f"{name}.gpg" if name == "doomed" else gpg.export(f"{name}.gpg", fpr))
        keys["armored"] = (keys["good"][0], gpg.export("good.asc", keys["good"][0], armor=True))

        def revoke_doomed() -> Path:
            gpg.revoke(keys["doomed"][0])
            return gpg.export("doomed.gpg", keys["doomed"][0])
        yield gpg.home, keys, revoke_doomed
    finally:
        gpg.close()


def test_signed_commits(site, tmp_path, gpg_keys):
    _base, repo, _v1, _ = site
    home, keys, revoke_doomed = gpg_keys
    with served_copy(repo, tmp_path) as (work, srv):
        tree = make_tree(tmp_path / "tree", version=3)
        signed = commit(work, tree, "signed", f"--gpg-sign={keys['good'][0]}", f"--gpg-homedir={home}")
        unsigned = commit(work, tree, "unsigned", "--timestamp=2024-02-02T00:00:00Z")
        doomed = commit(work, tree, "doomed", f"--gpg-sign={keys['doomed'][0]}", f"--gpg-homedir={home}")
        revoked = revoke_doomed()  # gpgv says "Good signature" and exits 0; ostree refuses it
        oracle = init_repo(tmp_path / "oracle", "archive")
        ostree("remote", "add", f"--repo={oracle}", f"--gpg-import={revoked}", "r", f"file://{work}")
        refused = subprocess.run(["ostree", "pull", f"--repo={oracle}", "r", "doomed"], capture_output=True, text=True)
        assert refused.returncode == 1 and "Key revoked" in refused.stderr, refused.stderr
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        for ref, keyring, why in (("unsigned", keys["good"][1], f"commit {unsigned} is not signed"),
                                  ("signed", keys["other"][1], f"commit {signed}: no signature verifies"),
                                  ("doomed", revoked, f"commit {doomed}: no signature verifies with the keyring "
                                   f"{revoked} (signed by key {keys['doomed'][0][-16:]} (doomed <doomed@example.com>),"
                                   " which is revoked)\n")):
            srv.requests.clear()
            failed = pycfs(cfs, "ostree", "pull", srv.url, ref, "--gpg-keyring", keyring, "--progress", "none",
                           check=False)
            assert failed.returncode == 1 and failed.stderr.startswith(f"pycfs: error: {why}"), failed.stderr
            assert len(failed.stderr.splitlines()) == 1
            assert not [p for p in srv.objects_requested() if not p.endswith((".commit", ".commitmeta"))]
            assert _images(cfs) == ""
        failed = pycfs(cfs, "ostree", "pull-local", work, "doomed", "--gpg-keyring", revoked, check=False)
        assert failed.returncode == 1 and failed.stderr.endswith("which is revoked)\n"), failed.stderr
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "signed", "--gpg-keyring", keys["good"][1],
                                  "--json").stdout)
        assert result["commit"] == signed
        pycfs(tmp_path / "local", "init")
        local = json.loads(pycfs(tmp_path / "local", "ostree", "pull-local", work, "signed", "--gpg-keyring",
                                 keys["good"][1], "--json").stdout)
        assert local["image"] == result["image"]
        # the same key armored (as distributions ship keys): it was "No public key"
        pycfs(tmp_path / "armored", "init")
        armored = json.loads(pycfs(tmp_path / "armored", "ostree", "pull", srv.url, "signed", "--gpg-keyring",
                                   keys["armored"][1], "--json").stdout)
        assert armored["image"] == result["image"]


def test_signed_summary(site, tmp_path, gpg_keys):
    """With --gpg-keyring, a pull that resolves its ref through the summary, and `list-refs`,
    take the summary only when its summary.sig (as `ostree summary -u --gpg-sign` writes it)
    has a signature gpgv verifies with the keyring: a summary unsigned, signed by another
    key or by a key revoked since, changed after signing, or whose signature was damaged is
    one line naming the summary, with nothing fetched and nothing committed."""
    _base, repo, v1, _ = site
    home, keys, revoke_doomed = gpg_keys
    good = keys["good"][1]
    with served_copy(repo, tmp_path) as (work, srv):
        tree = make_tree(tmp_path / "tree", version=3)
        signed = commit(work, tree, "signed", f"--gpg-sign={keys['good'][0]}", f"--gpg-homedir={home}")
        ostree("static-delta", "generate", f"--repo={work}", "--empty", f"--to={signed}")
        ostree("summary", f"--repo={work}", "-u")  # unsigned
        first = tmp_path / "first"
        pycfs(first, "init")
        plain = json.loads(pycfs(first, "ostree", "pull", srv.url, "signed", "--json").stdout)  # no keyring
        assert plain["commit"] == signed

        def sign(key: str) -> None:
            ostree("summary", f"--repo={work}", "-u", f"--gpg-sign={keys[key][0]}", f"--gpg-homedir={home}")

        def moved() -> None:  # the ref pointed at another commit after signing
            data = (work / "summary").read_bytes()
            assert bytes.fromhex(signed) in data
            (work / "summary").write_bytes(data.replace(bytes.fromhex(signed), bytes.fromhex(v1)))

        def damaged() -> None:  # a byte of the signature packet changed
            data = (work / "summary.sig").read_bytes()
            entries = decode("a{sv}", data)
            assert encode("a{sv}", entries) == data  # so only the changed byte can make it fail
            sigs = [bytes(sig) for k, v in entries if k == "ostree.gpgsigs" for sig in v.value]
            assert len(sigs) == 1
            bad = sigs[0][:-1] + bytes([sigs[0][-1] ^ 0x55])
            (work / "summary.sig").write_bytes(encode("a{sv}", [("ostree.gpgsigs", Variant("aay", [bad]))]))

        not_signed = f"is not signed ({srv.url}summary.sig is missing), but --gpg-keyring {good} asks for a signature"
        for case, prepare, why in (("unsigned", lambda: None, not_signed),
                                   ("other-key", lambda: sign("other"), ": no signature verifies with the keyring"),
                                   ("moved", lambda: (sign("good"), moved()), ": no signature verifies with the keyring"),
                                   ("damaged", lambda: (sign("good"), damaged()),
                                    ": no signature verifies with the keyring"),
                                   ("revoked", lambda: (sign("doomed"), revoke_doomed()),
                                    f": no signature verifies with the keyring {keys['doomed'][1]} (signed by key "
                                    f"{keys['doomed'][0][-16:]} (doomed <doomed@example.com>), which is revoked)\n")):
            prepare()
            assert (work / "summary.sig").exists() == (case != "unsigned")
            cfs = tmp_path / f"cfs-{case}"
            pycfs(cfs, "init")
            srv.requests.clear()
            for argv in (("pull", srv.url, "signed"), ("list-refs", srv.url)):
                failed = pycfs(cfs, "ostree", *argv, "--gpg-keyring", keys["doomed" if case == "revoked" else "good"][1],
                               check=False)
                assert failed.returncode == 1 and len(failed.stderr.splitlines()) == 1, (case, failed.stderr)
                assert failed.stderr.startswith(f"pycfs: error: the summary of {srv.url}{' ' if case == 'unsigned' else ''}"
                                                f"{why}"), (case, failed.stderr)
                assert failed.stdout == ""
            assert srv.objects_requested() == [] and "deltas" not in " ".join(srv.requests), (case, srv.requests)
            assert _images(cfs) == ""
            if case == "unsigned":  # without a keyring the same summary serves
                assert _listed(pycfs(cfs, "ostree", "list-refs", srv.url).stdout) == {"main": v1, "signed": signed}
        # a signed branch withdrawn from the signed summary, its ref file still served
        ghost = commit(work, make_tree(tmp_path / "ghost", version=4), "ghost", f"--gpg-sign={keys['good'][0]}",
                       f"--gpg-homedir={home}")
        (work / "refs/heads/ghost").rename(tmp_path / "ghost.ref")
        sign("good")
        (tmp_path / "ghost.ref").rename(work / "refs/heads/ghost")
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        listed = pycfs(cfs, "ostree", "list-refs", srv.url, "--gpg-keyring", good).stdout
        assert _listed(listed) == {"main": v1, "signed": signed}
        srv.requests.clear()
        failed = pycfs(cfs, "ostree", "pull", srv.url, "ghost", "--gpg-keyring", good, check=False)
        assert failed.returncode == 1 and failed.stderr == (
            f"pycfs: error: no ref 'ghost' in the summary of {srv.url} (a repository with a summary serves its refs "
            "from it; `pycfs ostree list-refs` lists them)\n")
        assert srv.requests == ["summary", "summary.sig"] and _images(cfs) == ""
        assert (work / "refs/heads/ghost").read_text().strip() == ghost
        srv.requests.clear()
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "signed", "--gpg-keyring", good, "--json").stdout)
        assert result["commit"] == signed and result["image"] == plain["image"] and result["delta_parts"] >= 1
        assert srv.requests[:2] == ["summary", "summary.sig"] and "refs/heads/signed" not in srv.requests
        assert _images(cfs).split() == ["NAME", "COMMIT", "signed", signed]


def _listed(table: str) -> dict[str, str]:
    lines = table.splitlines()
    assert lines[0].split() == ["REF", "COMMIT"]
    return dict(line.split() for line in lines[1:])


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_to_another_origin_are_followed(site, server, tmp_path, status):
    """Every request of a pull redirected to the repository on another port (another
    origin): the pull is the checkout, each object fetched once there."""
    _base, repo, v1, _ = site
    with served_copy(repo, tmp_path) as (_work, srv):
        srv.redirect = lambda path: (status, server.url + path)
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "main", "--json").stdout)
        assert result["commit"] == v1
        assert sorted(server.objects_requested()) == sorted(srv.objects_requested()) == sorted(object_files(repo))
        assert result["requests"] == len(srv.requests) + len(server.requests)
    checkout = tmp_path / "checkout"
    ostree("checkout", f"--repo={repo}", "main", checkout)
    with Repository.open(cfs) as r:
        assert describe_image(r, bytes.fromhex(result["image"])) == describe_dir(checkout)


def test_relative_redirects_and_a_moved_ref_only(site, server, tmp_path):
    """A relative Location (`../../current/...`) is resolved against the request's URL; a
    redirect of one file (the ref) does not move the others (as libcurl follows per request)."""
    _base, repo, v1, _ = site
    www = tmp_path / "www"
    www.mkdir()
    (www / "current").symlink_to(repo)
    srv = Server(www)
    try:
        srv.redirect = lambda path: ((303, "../" * path.count("/") + "current/" + path.split("/", 1)[1])
                                     if path.startswith("old/") else None)
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url + "old", "main", "--json").stdout)
        assert result["commit"] == v1
        objects = sorted(object_files(repo))
        assert sorted(p for p in srv.requests if p.startswith("old/objects/")) == ["old/" + p for p in objects]
        assert sorted(p for p in srv.requests if p.startswith("current/objects/")) == ["current/" + p for p in objects]
        checkout = tmp_path / "checkout"
        ostree("checkout", f"--repo={repo}", "main", checkout)
        with Repository.open(cfs) as r:
            assert describe_image(r, bytes.fromhex(result["image"])) == describe_dir(checkout)
        # only the ref moved: the objects are fetched where they were
        srv.requests.clear()
        srv.redirect = lambda path: (302, server.url + path.split("/", 1)[1]) if "/refs/" in path else None
        server.requests.clear()
        other = tmp_path / "other"
        pycfs(other, "init")
        again = json.loads(pycfs(other, "ostree", "pull", srv.url + "current/", "main", "--json").stdout)
        assert again["image"] == result["image"]
        assert server.requests == ["refs/heads/main"]
        assert sorted(p for p in srv.requests if "/objects/" in p) == ["current/" + p for p in objects]
    finally:
        srv.close()


def _hops(n: int, url: str) -> Callable[[str], tuple[int, str] | None]:
    """hop/0/P -> hop/1/P ... -> hop/n/P -> url + P: n + 1 redirects."""
    def redirect(path: str) -> tuple[int, str] | None:
        if not path.startswith("hop/"):
            return None
        _hop, k, rest = path.split("/", 2)
        return (302, f"/hop/{int(k) + 1}/{rest}") if int(k) < n else (302, url + rest)
    return redirect


@pytest.mark.parametrize("case, moved, message", [
    ("loop", lambda url: lambda path: (301, "/" + ("b" if path.startswith("a/") else "a") + path[1:]),
     "redirect loop (back to {u}a/summary after 2 redirects)"),
    ("11 hops", lambda url: _hops(10, url), "more than 10 redirects"),
    ("file", lambda url: lambda path: (302, "file:///etc/passwd"),
     "the redirect from {u}a/summary leads to 'file:///etc/passwd': only http:// and https:// are followed"),
    ("ftp", lambda url: lambda path: (307, "ftp://127.0.0.1/repo/summary"),
     "the redirect from {u}a/summary leads to 'ftp://127.0.0.1/repo/summary': "
     "only http:// and https:// are followed"),
    ("no location", lambda url: lambda path: (308, ""), "the redirect from {u}a/summary has an empty Location"),
    ("bad port", lambda url: lambda path: (301, "http://127.0.0.1:99999/x"),
     "the redirect from {u}a/summary has an invalid Location 'http://127.0.0.1:99999/x'"),
], ids=["loop", "11-hops", "file", "ftp", "no-location", "bad-port"])  # fmt: skip
def test_bad_redirects_are_one_line_naming_the_first_url(site, server, tmp_path, case, moved, message):
    with served_copy(site[1], tmp_path) as (_work, srv):
        srv.redirect = moved(server.url)
        cfs = tmp_path / "cfs"
        pycfs(cfs, "init")
        start = srv.url + ("hop/0" if case == "11 hops" else "a")
        err = pycfs(cfs, "ostree", "pull", start, "main", check=False)
        first = f"{start}/summary"
        assert err.returncode == 1 and err.stderr == (
            f"pycfs: error: fetching summary from {first}: {message.format(u=srv.url)}\n")
        assert len(srv.requests) == (11 if case == "11 hops" else 2 if case == "loop" else 1)
        assert "status: ok" in pycfs(cfs, "fsck").stdout
        # ten redirects are followed
        srv.redirect = _hops(9, server.url)
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url + "hop/0", "main", "--json").stdout)
        assert result["commit"] == site[2]


def _largest(repo: Path, suffix: str = ".filez") -> str:
    return str(max((p for p in (repo / "objects").rglob("*" + suffix)), key=lambda p: p.stat().st_size)
               .relative_to(repo))


def _hexname(path: str) -> str:
    parts = path.split("/")
    return parts[1] + parts[2].split(".")[0]


def test_server_errors_and_resets_are_retried(site, server, tmp_path):
    _base, repo, v1, _ = site
    big = _largest(repo)
    server.overrides[big] = [503, "drop", "cut", 500]
    server.overrides[_largest(repo, ".dirtree")] = ["drop"]
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    result = json.loads(pycfs(cfs, "ostree", "pull", server.url, "main", "--json").stdout)
    assert result["commit"] == v1
    assert server.requests.count(big) == 5
    assert "status: ok" in pycfs(cfs, "fsck").stdout


def _partial(cfs: Path, commit: str) -> set[str]:
    """The objects an interrupted pull kept (its partial stream), by hex name."""
    with Repository.open(cfs) as r:
        return {c.hex() for c in load_stream(r, f"ostree-partial-{commit}").entries}


def _filez(repo: Path) -> set[str]:
    return {_hexname(p) for p in object_files(repo) if p.endswith(".filez")}


def test_server_dies_half_way_then_rerun_fetches_nothing_twice(site, server, tmp_path):
    _base, repo, v1, _ = site
    server.dead_after = 3
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    failed = pycfs(cfs, "ostree", "pull", server.url, "main", check=False)
    assert failed.returncode == 1
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycfs: error: fetching object ") and "after 5 attempts" in lines[0]
    assert _images(cfs) == "" and not list((cfs / "streams").glob("ostree-commit-*"))
    kept = _partial(cfs, v1)
    assert len(kept & _filez(repo)) >= 3 and v1 in kept
    server.reset()
    result = json.loads(pycfs(cfs, "ostree", "pull", server.url, "main", "--json").stdout)
    refetched = {_hexname(p) for p in server.objects_requested()}
    assert not refetched & kept
    assert refetched | kept == {_hexname(p) for p in object_files(repo)}
    assert not (cfs / "streams" / f"ostree-partial-{v1}").exists()
    fresh = tmp_path / "fresh"
    pycfs(fresh, "init")
    assert json.loads(pycfs(fresh, "ostree", "pull", server.url, "main", "--json").stdout)["image"] == result["image"]


def test_interrupted_pull_resumes(site, server, tmp_path):
    _base, repo, _, _ = site
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(200):
        (tree / f"f{i:03}").write_bytes(hashlib.sha256(b"%d" % i).digest() * 40)
    many = commit(repo, tree, "many")
    server.delay = 0.2  # 16 fetches at a time: about 2.5 s for all
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    proc = subprocess.Popen([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(cfs), "ostree", "pull",
                             server.url, "many", "-j", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # interrupt once some content is stored (the workers link objects into objects/XX/; the pull
    # takes them into its commit a batch at a time, as the workers answer)
    while len(list((cfs / "objects").glob("??/*"))) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    # before the last line: the counts of plain progress (no terminal), at most one a second
    *progress, last = err.splitlines()
    assert proc.returncode == 130 and last == "pycfs: interrupted"
    assert all(re.fullmatch(r"metadata \d+, files \d+/\d+ \(\d+\.\d MiB\)", line) for line in progress)
    assert "many" not in _images(cfs)
    kept = _partial(cfs, many) & _filez(repo)
    assert kept
    server.reset()
    result = json.loads(pycfs(cfs, "ostree", "pull", server.url, "many", "--json").stdout)
    assert result["commit"] == many
    refetched = {_hexname(p) for p in server.objects_requested() if p.endswith(".filez")}
    assert not refetched & kept and len(refetched) == 200 - len(kept)


def _craft_bad_tree(repo: Path) -> tuple[str, str]:
    """A commit whose root dirtree is not a GVariant dirtree (but is named by its SHA-256)."""
    garbage = b"\x05\x00not a dirtree\x01"
    tree_id = hashlib.sha256(garbage).digest()
    main = Commit.parse((repo / "objects" / "x").parent.joinpath(*_commit_path(repo, "main")).read_bytes(),
                        bytes.fromhex(ostree("rev-parse", f"--repo={repo}", "main")))
    bad = Commit([], None, [], "bad", "", 0, tree_id, main.root_meta).serialize()
    bad_id = hashlib.sha256(bad).hexdigest()
    for checksum, data, ext in ((tree_id.hex(), garbage, "dirtree"), (bad_id, bad, "commit")):
        path = repo / "objects" / checksum[:2] / f"{checksum[2:]}.{ext}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    (repo / "refs" / "heads" / "bad").write_text(bad_id + "\n")
    return bad_id, tree_id.hex()


def _commit_path(repo: Path, ref: str) -> tuple[str, str]:
    c = ostree("rev-parse", f"--repo={repo}", ref)
    return c[:2], f"{c[2:]}.commit"


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[-10] ^= 0xFF
    return bytes(b)


CASES: dict[str, Callable[[Path], tuple[str, dict[str, object], str, str]]] = {}


def _case(fn):
    CASES[fn.__name__] = fn
    return fn


@_case
def corrupted(repo):
    p = _largest(repo)
    return "main", {p: _flip((repo / p).read_bytes())}, _hexname(p), "corrupt|does not match"


@_case
def truncated(repo):
    p = _largest(repo)
    data = (repo / p).read_bytes()
    return "main", {p: data[:len(data) // 2]}, _hexname(p), "truncated"


@_case
def missing(repo):
    p = _largest(repo, ".dirmeta")
    return "main", {p: 404}, _hexname(p), "is missing from"


@_case
def bad_gvariant(repo):
    _bad, tree = _craft_bad_tree(repo)
    return "bad", {}, tree, "not a valid dirtree object"


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_object_is_one_line_and_nothing_is_committed(site, server, tmp_path, case):
    import re

    _base, repo, _, _ = site
    ref, overrides, name, why = CASES[case](repo)
    server.overrides.update(overrides)
    cfs = tmp_path / "cfs"
    pycfs(cfs, "init")
    # (no progress lines: a slow machine could add one before the error)
    failed = pycfs(cfs, "ostree", "pull", "--progress", "none", server.url, ref, check=False)
    assert failed.returncode == 1 and failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycfs: error: "), failed.stderr
    assert name in lines[0] and re.search(why, lines[0]), lines[0]
    assert _images(cfs) == "" and not list((cfs / "streams").glob("ostree-commit-*"))
    assert not (cfs / "images").exists() or not any((cfs / "images").iterdir())


def test_real_world_tree(site, server, tmp_path):
    """/usr/lib/python3 of this machine, committed with `ostree commit`, pulled over HTTP."""
    source = Path("/usr/lib/python3")
    if not source.is_dir():
        pytest.skip("no /usr/lib/python3 on this machine")
    big = init_repo(tmp_path / "big", "archive")
    checksum = commit(big, source, "usr")
    srv = Server(big)
    try:
        cfs = Path(tempfile.mkdtemp(dir=tmp_path))
        pycfs(cfs, "init")
        result = json.loads(pycfs(cfs, "ostree", "pull", srv.url, "usr", "--json").stdout)
    finally:
        srv.close()
    assert result["commit"] == checksum
    checkout = tmp_path / "checkout"
    ostree("checkout", f"--repo={big}", "usr", checkout)
    expected = describe_dir(checkout)
    with Repository.open(cfs) as r:
        assert describe_image(r, bytes.fromhex(result["image"])) == expected
    assert len(expected) > 1000
    print(f"\n/usr/lib/python3: {len(expected)} entries, {result['content_bytes']} content bytes, "
          f"{result['requests']} requests, {result['seconds']} s")
