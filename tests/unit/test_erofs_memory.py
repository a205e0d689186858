"""Peak memory of an image build grows by a bounded amount per entry (issue 15, goal 5: peak
RSS under 200 MB at every size, 200,000 entries included).

Each build runs in a process of its own and reports its peak RSS (VmHWM: getrusage's
ru_maxrss would carry pytest's own peak over from before the exec);
the growth per entry is taken between two sizes, so the interpreter and imports cancel out.
Before the writer kept its records compact and wrote the image in pieces, `mkcomposefs
--from-file` grew by about 2 KiB per entry and the in-pull build by about 1.8 KiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pycfs.host import dumpfile
from pycfs.host.erofs.writer import choose_version, write_image

# mkcomposefs run as the command runs, reporting the process's peak RSS (KiB) at the end
_MKCOMPOSEFS = """
import sys
from pycfs.tools.cli import main
assert main(["mkcomposefs", "--from-file", sys.argv[1], sys.argv[2]]) == 0
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]))
"""

# a pull's image build: the merged tree of two layers of small files applied entry by
# entry (as ImageTree does), normalised, then written as the pull writes it; peak RSS
# (KiB) before and after the write
_IN_PULL = """
import hashlib, json, sys
from pycfs.host.erofs.writer import image_buffer
from pycfs.host.fsverity import digest_bytes
from pycfs.host.oci.merge import apply_entry, normalize_for_oci
from pycfs.host.oci.layer import Directory as DirEntry, LayerEntry
from pycfs.host.tree import Directory, External, FileSystem, Inline, Stat

n = int(sys.argv[1])
root = Directory(Stat())
for layer in range(2):
    apply_entry(root, LayerEntry(b"/l%d" % layer, Stat(0o755, 0, 0, 1700000000, 0, {}), DirEntry()))
    for i in range(n // 2):
        if i % 500 == 0:
            path = b"/l%d/d%04d" % (layer, i // 500)
            apply_entry(root, LayerEntry(path, Stat(0o755, 0, 0, 1700000000, 0, {}), DirEntry()))
        size = (i * 7919) % 8193
        digest = hashlib.sha256(b"%d %d" % (layer, i)).digest()
        item = Inline(b"x" * size) if size <= 64 else External(digest, size)
        stat = Stat(0o644, 0, 0, 1700000000 + i, 0, {})
        apply_entry(root, LayerEntry(b"%s/f%06d" % (path, i), stat, item))
normalize_for_oci(root)
before = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
image = image_buffer(FileSystem(root), 1)
after = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps([before, after, len(image), digest_bytes(image).hex()]))
"""


def _run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_mkcomposefs_from_file_peak_rss_per_entry(tmp_path: Path):
    from pycfs.tools.dev.gendump import generate

    peaks = {}
    for n in (4_000, 40_000):
        text = generate(n, seed=1)
        (tmp_path / "dump").write_bytes(text)
        peaks[n] = int(_run(_MKCOMPOSEFS, str(tmp_path / "dump"), str(tmp_path / f"{n}.cfs")))
        del text
    per_entry = (peaks[40_000] - peaks[4_000]) / 36_000
    # about 0.70 KiB; 0.81 before the writer's records lost their int objects and directory slots
    assert per_entry < 0.78, f"peak RSS grows by {per_entry:.2f} KiB per entry (bound 0.78; was about 2, then 0.81)"
    # and what it wrote is the image
    fs = dumpfile.parse(generate(4_000, seed=1))
    assert (tmp_path / "4000.cfs").read_bytes() == write_image(fs, choose_version(fs, 0, 1))


def test_in_pull_image_build_peak_rss_per_entry():
    n = 40_000
    before, after, size, digest = json.loads(_run(_IN_PULL, str(n)))
    per_entry = (after - before) / n
    # the image itself is about 0.24 KiB per entry of it
    # about 0.47 KiB; 0.57 before the writer's records lost their int objects and directory slots
    assert per_entry < 0.53, f"the image build adds {per_entry:.2f} KiB of peak RSS per entry (bound 0.53; was about 1.8, then 0.57)"
    assert size % 4096 == 0 and size > n * 32 and len(digest) == 64


def test_pull_stores_its_image_in_pieces_and_repairs_a_damaged_one(tmp_path: Path):
    """The pull writes its image to the object store as it is built; the object is the image
    write_image makes, recorded under images/; a same-size damaged object of that name (which
    the streamed write finds "present") is replaced, not kept."""
    from pycfs.host.oci.image import _store_image
    from pycfs.host.repository import Repository
    from pycfs.tools.dev.gendump import generate

    repo = Repository.init(tmp_path / "repo")
    fs = dumpfile.parse(generate(3_000, seed=2))
    expected = write_image(fs, 1)
    image_id = _store_image(repo, fs, 1)
    assert repo.read_object(image_id) == expected
    assert repo.image_id(image_id.hex()) == image_id
    path = repo.object_path(image_id)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(bytes([expected[5000] ^ 0xFF]))
    assert not repo.object_intact(image_id)
    assert _store_image(repo, fs, 1) == image_id
    assert repo.object_intact(image_id) and repo.read_object(image_id) == expected


def test_repeated_metacopy_and_redirect_found_without_making_every_value():
    """The writer finds the metacopy and redirect xattrs that go to the shared table from
    ids and payloads; they are exactly the (name, value) pairs that several inodes have, as
    counting every inode's made values finds them, and the image reads back to the tree."""
    from collections import Counter

    from pycfs.host.erofs import writer
    from pycfs.host.erofs.reader import read_image
    from pycfs.host.tree import Directory, External, ExternalNoVerity, FileSystem, Leaf, Sparse, Stat, object_path

    a, b, c = (bytes([n]) * 32 for n in (1, 2, 3))
    root = Directory(Stat(0o755))
    files = {
        b"a1": External(a, 5000), b"a2": External(a, 5000),  # same digest, both XX/rest
        b"b1": External(b, 5000),
        b"b2": External(c, 5000, object_path(b)),  # another digest, b's path spelt out
        b"c1": External(c, 5000, b""),  # digest only, no redirect
        b"n1": ExternalNoVerity(b"some/where", 10), b"n2": ExternalNoVerity(b"some/where", 20),
        b"s1": Sparse(30),
    }
    for name, content in files.items():
        root.entries[name] = Leaf(Stat(0o644), content)
    fs = FileSystem(root)
    for version in (1, 2):
        inos = writer._collect_v2(fs) if version == 2 else writer._collect_epoch1(fs, version)
        made = Counter(kv for ino in inos for kv in writer._content_xattrs(ino.node))
        expected = {kv for kv, n in made.items() if n > 1}
        found, _ids = writer._repeated_content_xattrs(inos)
        assert len(found) == len(set(found)) and set(found) == expected
        assert {k for k, _v in expected} == {writer.XATTR_METACOPY, writer.XATTR_REDIRECT}
        assert (writer.XATTR_REDIRECT, b"/" + object_path(b)) in expected
        back = read_image(write_image(fs, version)).fs.root.entries
        assert {n: back[n].content for n in files} == files


# freed C-heap memory before and after syscalls.release_free_heap (VmRSS, KiB)
_TRIM = """
from pycfs.host.syscalls import release_free_heap

def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))

held = [b"x" * 100_000 for _ in range(300)]  # under glibc's mmap threshold: on the C heap
keep = b"x" * 100_000  # allocated after them: the heap's top cannot simply shrink
del held
before = rss()
release_free_heap()
print(before, rss())
"""


def test_free_c_heap_goes_back_before_the_writer_grows():
    """What an import freed on the C heap (30 MB of large buffers here) stays in the
    process's RSS, where Python's small objects never reuse it, until the image build
    gives it back (at 200,000 files: 20 MiB of a pull's peak)."""
    before, after = map(int, _run(_TRIM).split())
    assert before - after > 25_000, f"RSS {before} -> {after} KiB: the freed 30 MB stayed"
