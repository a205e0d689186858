"""The store's adaptive lookup: objects are looked up before the clone (or seal) only while
lookups find them; after LOOKUP_MISSES_BEFORE_SKIPPING misses in a row the link's EEXIST says
"present" instead, and a hit or an EEXIST turns lookups back on. Whatever the policy does,
every store reports the same object and the same "present"/"reflinked"/"copied".

The leased store clones its source; this ext4 cannot, so FICLONE (the edge, not the thing
under test) is a byte copy here. tests/integration/test_leased_store.py runs the real one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pycfs.host import repository as repository_module
from pycfs.host import syscalls
from pycfs.host.fsverity import digest_bytes
from pycfs.host.repository import LOOKUP_MISSES_BEFORE_SKIPPING, Repository

SKIP_AFTER = LOOKUP_MISSES_BEFORE_SKIPPING


class Counts:
    def __init__(self) -> None:
        self.lookups = 0
        self.clones = 0


@pytest.fixture
def counts(monkeypatch) -> Counts:
    counts = Counts()
    has_object = Repository.has_object

    def counted_lookup(self: Repository, object_id: bytes) -> bool:
        counts.lookups += 1
        return has_object(self, object_id)

    def copying_clone(dst_fd: int, src_fd: int) -> None:
        counts.clones += 1
        size, done = os.fstat(src_fd).st_size, 0
        while done < size:
            n = os.copy_file_range(src_fd, dst_fd, size - done, done, done)
            assert n > 0
            done += n

    monkeypatch.setattr(Repository, "has_object", counted_lookup)
    monkeypatch.setattr(syscalls, "ficlone", copying_clone)
    return counts


def _contents(n: int, tag: str = "") -> list[bytes]:
    return [f"{tag} file {i}\n".encode() * (i % 7 + 1) for i in range(n)]


def _open_repo(path: Path) -> Repository:
    repo = Repository.open(path) if path.exists() else Repository.init(path)
    repo.enable_source_leases()
    return repo


def _store_all(repo: Repository, contents: list[bytes], where: Path) -> list[tuple[bytes, str]]:
    """Store each content from a file of its own (the leased path); (object id, how) each."""
    results = []
    for i, data in enumerate(contents):
        path = where / f"src-{os.getpid()}-{i}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            stored = repo.store_object_from_fd(fd)
        finally:
            os.close(fd)
            path.unlink()
        assert stored.size == len(data)
        results.append((stored.object_id, stored.how))
    return results


def _stored_files(repo: Repository) -> int:
    return sum(len(files) for _, _, files in os.walk(repo.path / "objects"))


def test_a_store_of_new_files_stops_looking_up_after_the_misses(tmp_path, counts):
    contents = _contents(200)
    with _open_repo(tmp_path / "repo") as repo:
        results = _store_all(repo, contents, tmp_path)
        assert counts.lookups == SKIP_AFTER
        assert counts.clones == 200
        assert results == [(digest_bytes(d), "reflinked") for d in contents]
        assert [repo.read_object(i) for i, _ in results] == contents


def test_a_store_where_every_object_exists_looks_each_up_and_clones_none(tmp_path, counts):
    contents = _contents(200)
    with _open_repo(tmp_path / "repo") as repo:
        _store_all(repo, contents, tmp_path)
    counts.lookups = counts.clones = 0
    with _open_repo(tmp_path / "repo") as repo:  # a new process: it starts looking up
        results = _store_all(repo, contents, tmp_path)
    assert counts.lookups == 200 and counts.clones == 0
    assert results == [(digest_bytes(d), "present") for d in contents]
    assert _stored_files(repo) == 200


def test_the_first_present_object_turns_lookups_back_on(tmp_path, counts):
    new, old = _contents(100, "new"), _contents(50, "old")
    with _open_repo(tmp_path / "repo") as repo:
        _store_all(repo, old, tmp_path)
    counts.lookups = counts.clones = 0
    with _open_repo(tmp_path / "repo") as repo:
        results = _store_all(repo, new + old + _contents(10, "newer"), tmp_path)
    # 100 new: SKIP_AFTER lookups, 100 clones. The first old one is cloned in vain and its
    # link says present; the other 49 are looked up and found. 10 new after them: looked up
    # (missed, fewer than SKIP_AFTER in a row) and cloned.
    assert counts.lookups == SKIP_AFTER + 49 + 10
    assert counts.clones == 100 + 1 + 10
    assert [how for _, how in results] == ["reflinked"] * 100 + ["present"] * 50 + ["reflinked"] * 10
    assert _stored_files(repo) == 160  # the wasted clone left nothing behind


def _adopt(repo: Repository, data: bytes) -> tuple[bytes, str]:
    """Store data as `inflate` does: written into an anonymous file, then adopted."""
    fd = repo.new_object_file()
    assert fd is not None
    repository_module.write_all(fd, data)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    try:
        stored = repo.adopt_object_file(ro, len(data))
    finally:
        os.close(ro)
    return stored.object_id, stored.how


def _write(repo: Repository, data: bytes) -> tuple[bytes, bool]:
    """Store data as a tar entry is: through an ObjectWriter."""
    writer = repo.object_writer()
    writer.write(data)
    return writer.finish()


@pytest.mark.parametrize(("store", "new", "present"), [(_adopt, "copied", "present"), (_write, False, True)])
def test_written_objects_skip_lookups_too_and_a_wasted_seal_leaves_nothing(tmp_path, counts, store, new, present):
    contents = _contents(80)
    with Repository.init(tmp_path / "repo") as repo:
        first = [store(repo, d) for d in contents]
        assert counts.lookups == SKIP_AFTER
        counts.lookups = 0
        again = [store(repo, d) for d in contents]
        assert counts.lookups == len(contents) - 1  # the first one found out at its link
        assert [repo.read_object(digest_bytes(d)) for d in contents] == contents
    assert first == [(digest_bytes(d), new) for d in contents]
    assert again == [(digest_bytes(d), present) for d in contents]
    assert _stored_files(repo) == len(contents)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, 11), min_size=1, max_size=40), skip_after=st.integers(1, 5))
def test_results_are_the_same_with_and_without_skipping(order, skip_after, counts, monkeypatch):
    """Any sequence of new and repeated contents, across two processes' worth of instances:
    the same ids and hows as a store that always looks up."""
    pool = _contents(12, "pool")
    contents = [pool[i] for i in order]
    runs = {}
    for threshold in (skip_after, 1 << 30):
        monkeypatch.setattr(repository_module, "LOOKUP_MISSES_BEFORE_SKIPPING", threshold)
        with tempfile.TemporaryDirectory() as d:
            where = Path(d)
            with _open_repo(where / "repo") as repo:
                first = _store_all(repo, contents[: len(contents) // 2], where)
            with _open_repo(where / "repo") as repo:
                second = _store_all(repo, contents, where)
                stored = _stored_files(repo)
        runs[threshold] = (first, second, stored)
    assert runs[skip_after] == runs[1 << 30]
    assert runs[skip_after][2] == len(set(order))
