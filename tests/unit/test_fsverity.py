"""fs-verity digests: pinned vectors, incremental == one-shot, and Debian's `fsverity digest` as oracle."""

import errno
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from pycfs.host.fsverity import BLOCK_SIZE, VerityHasher, digest_bytes, digest_path, digest_regular_files

SIZES = [0, 1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 64 * 4096 + 1, 128 * 128 * 4096 + 1]


def test_pinned_vectors():
    assert digest_bytes(b"hello world").hex() == "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
    assert digest_bytes(b"hello world", "sha512").hex() == (
        "18430270729d162d4e469daca123ae61893db4b0583d8f7081e3bf4f92b88ba5"
        "14e7982f10733fb6aa895195c5ae8fd2eb2c47a8be05513ce5a0c51a6f570409"
    )
    assert digest_bytes(b"").hex() == "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
    assert digest_bytes(b"", "sha512").hex().startswith("ccf9e5aea1c2a64efa2f2354a6024b90")


def test_unknown_hash_rejected():
    with pytest.raises(ValueError):
        VerityHasher("md5")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3 * BLOCK_SIZE + 17), cuts=st.lists(st.integers(0, 3 * BLOCK_SIZE), max_size=6),
       alg=st.sampled_from(["sha256", "sha512"]))
def test_incremental_equals_one_shot(data, cuts, alg):
    h = VerityHasher(alg)
    prev = 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        h.update(data[prev:cut])
        prev = cut
    assert h.digest() == digest_bytes(data, alg)


def test_one_bit_changes_digest():
    data = bytearray(os.urandom(3 * BLOCK_SIZE))
    before = digest_bytes(data)
    data[5000] ^= 1
    assert digest_bytes(data) != before


needs_fsverity = pytest.mark.skipif(shutil.which("fsverity") is None,
                                    reason="Debian's fsverity (package fsverity) is not installed")


def fsverity_digest(path, alg):
    out = subprocess.run(["fsverity", "digest", "--hash-alg", alg, "--compact", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[0]


@needs_fsverity
@pytest.mark.parametrize("alg", ["sha256", "sha512"])
@pytest.mark.parametrize("size", SIZES)
def test_matches_fsverity_digest(tmp_path, size, alg):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    expected = fsverity_digest(path, alg)
    assert digest_path(str(path), alg).hex() == expected
    assert digest_regular_files([path], alg) == [bytes.fromhex(expected)]


@needs_fsverity
def test_100mib_matches_fsverity_digest(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    assert digest_path(str(path)).hex() == fsverity_digest(path, "sha256")


@needs_fsverity
@pytest.mark.parametrize("size", [1 << 30, (1 << 30) + 4097])
def test_1gib_sparse_matches_fsverity_digest(tmp_path, size):
    """A tree of four levels over holes read as zeros, the tail past the last hole real data."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(size - 5000)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(5000))
    assert digest_regular_files([path]) == [bytes.fromhex(fsverity_digest(path, "sha256"))]


def test_many_files_in_order_with_failures_and_a_bounded_window(tmp_path, monkeypatch):
    """Files are opened (and their reads asked for) ahead of the hashing, at most
    AHEAD_FILES / AHEAD_BYTES ahead; each failure stays with its name; no fd is left."""
    from fdcount import open_fd_count

    import pycfs.host.fsverity as fsverity

    monkeypatch.setattr(fsverity, "AHEAD_FILES", 5)
    monkeypatch.setattr(fsverity, "AHEAD_BYTES", 3 * BLOCK_SIZE)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    contents = [os.urandom(n) for n in (0, 1, 5000, 3 * BLOCK_SIZE + 1, 40, 9000) * 6]
    paths = []
    for i, data in enumerate(contents):
        (tmp_path / f"f{i}").write_bytes(data)
        paths.append(tmp_path / f"f{i}")
    odd = {3: tmp_path / "fifo", 10: tmp_path / "dir", 17: tmp_path / "missing"}
    for i, path in odd.items():
        paths.insert(i, path)
    base = open_fd_count()
    seen = []
    real = fsverity.digest_fd
    monkeypatch.setattr(fsverity, "digest_fd", lambda fd, alg, size, **kw: seen.append(open_fd_count() - base) or
                        real(fd, alg, size, **kw))
    got = fsverity.digest_regular_files(paths)
    assert open_fd_count() == base
    assert max(seen) <= 5 and max(seen) > 1
    expected = iter(contents)
    for i, result in enumerate(got):
        if i in odd:
            assert isinstance(result, OSError)
            assert result.errno == {3: errno.EINVAL, 10: errno.EISDIR, 17: errno.ENOENT}[i]
        else:
            assert result == digest_bytes(next(expected))
    assert next(expected, None) is None


def test_measure_file_reads_only_a_regular_file(tmp_path):
    """`composefs-info measure-file` of a fifo waited for a writer for ever, of /dev/zero
    read for ever: one line each, nothing read."""
    import sys

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f").write_bytes(b"x" * 5000)
    os.symlink("f", tmp_path / "link")
    for path, why in ((tmp_path / "fifo", "not a regular file"), ("/dev/zero", "not a regular file"),
                      (tmp_path, "Is a directory")):
        r = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "composefs-info", "measure-file", str(path)],
                           capture_output=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr.decode()) == (1, b"", f"pycfs: error: Failed to measure '{path}': {why}\n")
    assert digest_path(str(tmp_path / "link")) == digest_path(str(tmp_path / "f")) == digest_bytes(b"x" * 5000)


@pytest.mark.parametrize("size", [100, (1 << 20) + 100])  # one read, and a loop of reads
def test_digest_fd_ends_where_told(tmp_path, size):
    from pycfs.host.fsverity import CHANGED, digest_fd

    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert digest_fd(fd, size=size, ends=True) == digest_bytes(b"x" * size)
        assert digest_fd(fd, size=size - 1) == digest_bytes(b"x" * (size - 1))  # a prefix, unasked
        with pytest.raises(OSError) as e:  # grown since its size was taken
            digest_fd(fd, size=size - 1, ends=True)
        assert e.value.errno == CHANGED
        with pytest.raises(OSError, match=f"file ended after {size} of {size + 1} bytes"):
            digest_fd(fd, size=size + 1, ends=True)
    finally:
        os.close(fd)
