"""Tar layer → splitstream → tar: byte identity, the exact cut points of spec 3.2,
diff_id checking, strict errors, and reading entries back (spec 3.6)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes, digest_fd
from pycfs.host.oci import layer as layer_module
from pycfs.host.oci.merge import build_filesystem
from pycfs.host.oci.layer import (
    MAX_INLINE_ENTRY_CONTENT,
    EntryBudget,
    EntryLimitError,
    decompressing_reader,
    Directory,
    Hardlink,
    LayerDigestError,
    LayerEntryCollector,
    import_layer,
    layer_entry,
    iter_layer_entries,
    layer_stream_name,
    PendingFile,
    StoredFile,
    TarSplitter,
    normalize_path,
    open_layer,
    split_tar,
    write_pieces,
)
from pycfs.host.oci.result import ImportStats
from pycfs.host.oci.tar import ZERO_BLOCK, TarError, TarHeader, TarReader, pax_entry, roundup_block, simple_entry
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OCI_LAYER, SplitStreamReader, SplitStreamWriter
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.host.tree import SharedStats, BlockDevice, CharDevice, External, Fifo, Inline, Symlink
import itertools
from vectors import C_VECTORS


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    with Repository.init(tmp_path / "repo") as r:
        yield r


def diff_id_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store(repo: Repository, data: bytes) -> SplitStreamReader:
    """Import an uncompressed tar and open its stream."""
    diff_id = diff_id_of(data)
    import_layer(repo, diff_id, io.BufferedReader(io.BytesIO(data)))
    return open_layer(repo, diff_id)


def cat(repo: Repository, reader: SplitStreamReader) -> bytes:
    return b"".join(iter_stream_bytes(repo, reader))


def chunk_list(repo: Repository, reader: SplitStreamReader) -> list[tuple[str, bytes]]:
    return [("inline", c) if isinstance(c, bytes) else ("object", repo.read_object(reader.object_refs[c]))
            for c in reader.chunks()]


def expected_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """The spec 3.2 cut rule computed independently, from Python's own tar parser:
    only the content of regular members larger than 64 bytes is external."""
    cuts = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf.getmembers():
            if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) and m.size > 64:
                cuts.append((m.offset_data, m.offset_data + m.size))
    out: list[tuple[str, bytes]] = []
    pos = 0
    for start, end in cuts:
        if start > pos:
            out.append(("inline", data[pos:start]))
        out.append(("object", data[start:end]))
        pos = end
    if pos < len(data):
        out.append(("inline", data[pos:]))
    return out


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return bio.getvalue()


def reg(name: str, data: bytes, **kw) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


# ---------------------------------------------------------------------------- cut points


@pytest.mark.parametrize("fmt", FORMATS)
def test_inline_threshold_and_cut_points(repo: Repository, fmt: int) -> None:
    sizes = [0, 1, 63, 64, 65, 511, 512, 513, 4096, 100_000]
    members = [reg(f"f{n}", os.urandom(n)) for n in sizes]
    data = make_tar(members, fmt)
    reader = store(repo, data)
    assert cat(repo, reader) == data
    chunks = chunk_list(repo, reader)
    assert chunks == expected_chunks(data)
    # exactly the files > 64 bytes are objects, in order; inline and object chunks alternate
    assert [c for kind, c in chunks if kind == "object"] == [d for _, d in members if len(d) > 64]
    assert all(a[0] != b[0] for a, b in itertools.pairwise(chunks))
    assert reader.content_type == CONTENT_OCI_LAYER
    assert reader.stream_size == len(data)
    assert reader.named_refs == {} and reader.stream_refs == []


def test_same_content_is_one_object(repo: Repository) -> None:
    blob = os.urandom(1000)
    data = make_tar([reg("a", blob), reg("b", os.urandom(100)), reg("c", blob)], tarfile.PAX_FORMAT)
    reader = store(repo, data)
    assert len(reader.object_refs) == 2
    assert [c for c in reader.chunks() if isinstance(c, int)] == [0, 1, 0]
    assert cat(repo, reader) == data


def test_pax_size_overrides_header_size(repo: Repository) -> None:
    content = os.urandom(100)
    # header says 0, PAX says 100: the 100 bytes are file content and become an object
    big = pax_entry([(b"size", b"100")]) + simple_entry(b"big", b"", size=0) + content + bytes(412)
    # header says 100, PAX says 10: only 10 bytes of content, inline
    small = pax_entry([(b"size", b"10")]) + TarHeader(name=b"small", size=100, mode=0o644).pack() + b"s" * 10 + bytes(502)
    data = big + small + ZERO_BLOCK * 2
    reader = store(repo, data)
    assert chunk_list(repo, reader) == [("inline", big[:1536]), ("object", content), ("inline", data[1536 + 100:])]
    entries = list(iter_layer_entries(reader))
    assert [(e.path, e.item) for e in entries] == [(b"/big", External(reader.object_refs[0], 100)),
                                                  (b"/small", Inline(b"s" * 10))]


def test_non_regular_content_is_inline(repo: Repository) -> None:
    """A hardlink or directory with a size field: its content is skipped over, inline."""
    odd = TarHeader(name=b"hl", typeflag=b"1", linkname=b"x", size=700, mode=0o644).pack() + b"h" * 700 + bytes(324)
    data = simple_entry(b"x", b"y" * 80) + odd + ZERO_BLOCK * 2
    reader = store(repo, data)
    assert [k for k, _ in chunk_list(repo, reader)] == ["inline", "object", "inline"]
    assert cat(repo, reader) == data


@pytest.mark.parametrize("typeflag", [b"5", b"1", b"2", b"3", b"6", b"V"])
def test_non_file_content_past_the_bound_is_refused_before_it_is_read(repo: Repository, typeflag: bytes) -> None:
    """A directory (or link, device, ...) declaring more content than MAX_INLINE_ENTRY_CONTENT
    is refused at its header: the splitter would hold it all in memory."""
    size = MAX_INLINE_ENTRY_CONTENT + 1
    odd = TarHeader(name=b"d", typeflag=typeflag, linkname=b"x", size=size, mode=0o755).pack()
    data = odd + bytes(roundup_block(size)) + ZERO_BLOCK * 2
    with pytest.raises(TarError, match=rf"entry of type {typeflag!r} b'd' at offset 0 declares {size} bytes"):
        store(repo, data)


def test_trailing_bytes_after_end_marker_are_kept(repo: Repository) -> None:
    data = simple_entry(b"a", b"z" * 200) + ZERO_BLOCK * 2 + bytes(9216) + b"trailing garbage"
    reader = store(repo, data)
    assert chunk_list(repo, reader)[-1] == ("inline", data[512 + 200 :])
    assert cat(repo, reader) == data


def test_padding_is_copied_not_synthesized(repo: Repository) -> None:
    data = simple_entry(b"a", b"z" * 100)
    data = data[:612] + b"P" * 412 + ZERO_BLOCK * 2  # non-zero padding
    reader = store(repo, data)
    assert cat(repo, reader) == data


def test_stream_id_is_deterministic(tmp_path: Path) -> None:
    data = make_tar([reg("a", os.urandom(3000)), reg("b", b"small")], tarfile.GNU_FORMAT)
    ids = []
    for name in ("r1", "r2"):
        with Repository.init(tmp_path / name) as r:
            ids.append(import_layer(r, diff_id_of(data), io.BufferedReader(io.BytesIO(data)))[0])
            # re-importing finds the stream and does not read the input
            again = import_layer(r, diff_id_of(data), io.BufferedReader(io.BytesIO(b"")))
            assert again == (ids[-1], None)
    assert ids[0] == ids[1]


# ---------------------------------------------------------------------------- diff_id and errors


def test_wrong_diff_id_commits_nothing(repo: Repository) -> None:
    data = make_tar([reg("a", os.urandom(5000))], tarfile.PAX_FORMAT)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(LayerDigestError, match=f"expected diff_id {wrong}, the tar stream is {diff_id_of(data)} "
                                               r"\(nothing was committed; `pycfs gc` frees the files it stored\)$"):
        import_layer(repo, wrong, io.BufferedReader(io.BytesIO(data)), ref="myref")
    assert repo.has_stream(layer_stream_name(wrong)) is None
    assert repo.has_stream(layer_stream_name(diff_id_of(data))) is None
    assert not (repo.path / "streams").exists()


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nope"])
def test_malformed_diff_id_is_refused(repo: Repository, bad: str) -> None:
    with pytest.raises(PycfsError, match="invalid diff_id"):
        import_layer(repo, bad, io.BufferedReader(io.BytesIO(b"")))


def _import(repo: Repository, blob: bytes, diff_id: str = "sha256:" + "1" * 64):
    return import_layer(repo, diff_id, io.BufferedReader(io.BytesIO(blob)))


def test_truncated_tar_is_an_error(repo: Repository) -> None:
    data = make_tar([reg("a", os.urandom(5000))], tarfile.PAX_FORMAT)
    with pytest.raises(TarError, match="truncated tar: entry content"):
        _import(repo, data[:3000])
    with pytest.raises(TarError, match="truncated tar header"):
        _import(repo, data[:100])
    assert not (repo.path / "streams").exists()


def test_bad_checksum_is_an_error(repo: Repository) -> None:
    data = bytearray(make_tar([reg("a", b"x"), reg("b", b"y")], tarfile.USTAR_FORMAT))
    data[1024 + 5] ^= 0x20
    with pytest.raises(TarError, match="bad tar header checksum at offset 1024"):
        _import(repo, bytes(data))


def test_corrupt_gzip_is_an_error(repo: Repository) -> None:
    data = make_tar([reg("a", os.urandom(20000))], tarfile.PAX_FORMAT)
    gz = bytearray(gzip.compress(data))
    gz[len(gz) // 2] ^= 0xFF
    with pytest.raises(PycfsError, match="corrupt gzip layer"):
        _import(repo, bytes(gz))
    with pytest.raises(PycfsError, match="corrupt gzip layer"):
        _import(repo, gzip.compress(data)[:-20])


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.binary(max_size=3000), min_size=1, max_size=4), padding=st.integers(0, 600),
       reads=st.integers(1, 5000))
def test_gzip_reader_reads_what_the_gzip_module_reads(parts: list[bytes], padding: int, reads: int) -> None:
    """Concatenated members, zero padding after them, any read size: the oracle is the
    stdlib's gzip.decompress; each read returns at most what was asked."""
    blob = b"".join(gzip.compress(p, compresslevel=1 + i % 9) for i, p in enumerate(parts)) + bytes(padding)
    reader = decompressing_reader(io.BytesIO(blob), "gzip")
    out = []
    while piece := reader.read(reads):
        assert len(piece) <= reads
        out.append(piece)
    assert b"".join(out) == gzip.decompress(blob) == b"".join(parts)


def test_gzip_reader_refuses_what_follows_a_member_if_not_another_one() -> None:
    reader = decompressing_reader(io.BytesIO(gzip.compress(b"a" * 100) + b"\0\0garbage"), "gzip")
    assert reader.read(1000) == b"a" * 100
    with pytest.raises(PycfsError, match="corrupt gzip layer"):
        reader.read(1000)


def test_gzip_reader_holds_one_read_of_a_bomb() -> None:
    """A member that inflates 1000-fold comes out n bytes at a time."""
    reader = decompressing_reader(io.BytesIO(gzip.compress(bytes(64 << 20))), "gzip")
    tracemalloc.start()
    try:
        total = 0
        while piece := reader.read(1 << 20):
            total += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 64 << 20 and peak < 8 << 20


def test_corrupt_zstd_is_an_error(repo: Repository) -> None:
    data = make_tar([reg("a", os.urandom(20000))], tarfile.PAX_FORMAT)
    zst = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(PycfsError, match="corrupt zstd layer: truncated frame"):
        _import(repo, zst[: len(zst) // 2])
    with pytest.raises(PycfsError, match="corrupt zstd layer"):
        _import(repo, zst[:4] + b"\xff" * 20 + zst[24:])


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=300_000), cuts=st.lists(st.integers(0, 300_000), max_size=3),
       sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=8))
def test_zstd_frames_read_back_exactly_at_any_read_size(data: bytes, cuts: list[int], sizes: list[int]) -> None:
    """Concatenated frames, each read of `sizes` (cycled) against the plain bytes: whole
    outputs handed on, and parts of them."""
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    blob = b"".join(zstandard.ZstdCompressor(level=1).compress(data[a:b]) for a, b in itertools.pairwise(bounds))
    reader = decompressing_reader(io.BytesIO(blob), "zstd")
    got = bytearray()
    for n in itertools.cycle(sizes):
        piece = reader.read(n)
        if not piece:
            break
        assert len(piece) <= n
        got += piece
    assert bytes(got) == data and reader.read(-1) == b""


def test_zstd_frames_cross_the_reads_of_the_blob() -> None:
    """3 MiB of incompressible frames: reads of odd sizes and a frame boundary straddle the
    reader's 1 MiB reads of the blob."""
    data = os.urandom(3 << 20)
    blob = zstandard.ZstdCompressor().compress(data[:1500001]) + zstandard.ZstdCompressor().compress(data[1500001:])
    reader = decompressing_reader(io.BytesIO(blob), "zstd")
    got = bytearray()
    while piece := reader.read(100_003):
        got += piece
    assert bytes(got) == data


# Reads a zstd blob (argv[1]) through the layer's reader in 1 MiB reads; prints the peak RSS
# growth of the reading (KiB), the largest read and the total.
_READ_ZSTD = """
import sys
from pycfs.host.oci.layer import decompressing_reader
blob = open(sys.argv[1], "rb")
reader = decompressing_reader(blob, "zstd")
before = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
total = largest = 0
while piece := reader.read(1 << 20):
    total += len(piece)
    largest = max(largest, len(piece))
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) - before, largest, total)
"""


def test_zstd_bomb_is_read_in_bounded_pieces_with_bounded_memory(tmp_path: Path) -> None:
    """32 KiB that expand to 1 GiB of zeros (one frame): every read is at most what was asked
    and the reading process grows by less than 100 MiB (it grew by the whole GiB when one
    input slice was decompressed in one call)."""
    c = zstandard.ZstdCompressor(level=19).compressobj()
    blob = b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush()
    assert len(blob) < 64 << 10
    (tmp_path / "bomb.zst").write_bytes(blob)
    r = subprocess.run([sys.executable, "-c", _READ_ZSTD, str(tmp_path / "bomb.zst")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    growth, largest, total = map(int, r.stdout.split())
    assert total == 1 << 30 and largest == 1 << 20
    assert growth < 100 << 10, f"reading the bomb grew the process by {growth >> 10} MiB"


def _read_all_zstd(blob: bytes, n: int = 7777) -> bytes:
    reader = decompressing_reader(io.BytesIO(blob), "zstd")
    out = bytearray()
    while piece := reader.read(n):
        out += piece
    return bytes(out)


def test_zstd_skippable_frames_between_and_after_frames_are_passed_over() -> None:
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    skip = struct.pack("<II", 0x184D2A5A, 3) + b"abc"
    blob = skip + cctx.compress(b"one" * 5000) + skip + cctx.compress(b"two" * 5000) + skip
    assert _read_all_zstd(blob) == b"one" * 5000 + b"two" * 5000


def test_zstd_cut_anywhere_inside_a_frame_is_a_truncated_frame() -> None:
    """Every cut of a two-frame blob (content size, checksum, several blocks) but the frame
    boundaries is the truncated-frame error, never a short stream."""
    data = os.urandom(150_000) + bytes(200_000) + b"abc" * 30_000
    first = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    blob = first + zstandard.ZstdCompressor(write_content_size=False).compress(data[:1000])
    whole = {0: b"", len(first): data, len(blob): data + data[:1000]}
    for cut in sorted({*range(40), *range(len(first) - 40, len(first) + 40), *range(len(blob) - 40, len(blob) + 1),
                       *random.Random(1).sample(range(len(blob)), 200)}):
        if cut in whole:
            assert _read_all_zstd(blob[:cut]) == whole[cut]
            continue
        with pytest.raises(PycfsError, match="^corrupt zstd layer: truncated frame$"):
            _read_all_zstd(blob[:cut], 1 << 20)


def test_zstd_garbage_after_the_frames_is_an_error_naming_its_offset() -> None:
    frame = zstandard.ZstdCompressor().compress(b"x" * 100)
    with pytest.raises(PycfsError, match=f"^corrupt zstd layer: no zstd frame at offset {len(frame)} "):
        _read_all_zstd(frame + bytes(512))


@pytest.mark.parametrize("compress", [lambda d: d, gzip.compress, lambda d: zstandard.ZstdCompressor().compress(d),
                                      lambda d: gzip.compress(d[:7000]) + gzip.compress(d[7000:]),
                                      lambda d: zstandard.ZstdCompressor().compress(d[:7000])
                                      + zstandard.ZstdCompressor().compress(d[7000:])],
                         ids=["plain", "gzip", "zstd", "gzip-2-members", "zstd-2-frames"])
def test_compression_is_detected(repo: Repository, compress) -> None:
    data = make_tar([reg("a", os.urandom(10000)), reg("b", b"q" * 65)], tarfile.PAX_FORMAT)
    _stream_id, layer = _import(repo, compress(data), diff_id_of(data))
    assert layer.size == len(data)
    assert cat(repo, open_layer(repo, diff_id_of(data))) == data


def test_big_file_is_streamed_not_held(repo: Repository) -> None:
    """A 64 MiB member passes through in bounded memory."""
    size = 64 << 20
    header = TarHeader(name=b"big", size=size, mode=0o644).pack()

    class Source(io.RawIOBase):
        def __init__(self) -> None:
            self.parts = [header] + [bytes(1 << 20)] * (size >> 20) + [ZERO_BLOCK * 2]
            self.digest = hashlib.sha256()
            for p in self.parts:
                self.digest.update(p)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            if not self.parts:
                return 0
            n = min(len(b), len(self.parts[0]))
            b[:n] = self.parts[0][:n]
            self.parts[0] = self.parts[0][n:]
            if not self.parts[0]:
                self.parts.pop(0)
            return n

    src = Source()
    diff_id = "sha256:" + src.digest.hexdigest()
    tracemalloc.start()
    try:
        import_layer(repo, diff_id, io.BufferedReader(src, 1 << 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    reader = open_layer(repo, diff_id)
    assert len(reader.object_refs) == 1 and repo.object_size(reader.object_refs[0]) == size


# ---------------------------------------------------------------------------- reading entries back


@pytest.mark.parametrize(
    "raw, norm",
    [(b"etc", b"/etc"), (b"./etc/", b"/etc"), (b"/", b""), (b"./", b""), (b".", b""), (b"a//b/./c/", b"/a/b/c"),
     (b"/abs/x", b"/abs/x")],
)
def test_normalize_path(raw: bytes, norm: bytes) -> None:
    assert normalize_path(raw) == norm


@given(st.lists(st.sampled_from([b"a", b"", b".", b"..", b".a", b"a.", b"..a", b"a b"]), max_size=6))
def test_normalize_path_matches_its_definition(parts: list[bytes]) -> None:
    """The shortcut for plain paths gives what the component rule gives, for any mix of
    empty, dot and dot-led components."""
    raw = b"/".join(parts)
    kept = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in kept:
        with pytest.raises(TarError, match=r"'\.\.'"):
            normalize_path(raw)
    else:
        assert normalize_path(raw) == b"".join(b"/" + p for p in kept)


def test_normalize_path_refuses_dotdot() -> None:
    with pytest.raises(TarError, match=r"'\.\.'"):
        normalize_path(b"a/../../etc")


def _ti(name: str, type_: bytes, **kw) -> tuple[tarfile.TarInfo, None]:
    t = tarfile.TarInfo(name)
    t.type = type_
    for k, v in kw.items():
        setattr(t, k, v)
    return t, None


def _every_kind_tar(big: bytes) -> bytes:
    """A PAX tar with an entry of every kind, xattrs and a PAX mtime; `big` is an object."""
    ti = _ti
    members = [
        ti("./", tarfile.DIRTYPE, mode=0o755),
        ti("./etc", tarfile.DIRTYPE, mode=0o700, uid=1, gid=2, mtime=1234),
        reg("./etc/small", b"tiny", mode=0o600),
        reg("./etc/big", big, mode=0o4755, uid=4_000_000_000, gid=3),
        ti("./etc/hard", tarfile.LNKTYPE, linkname="./etc/big"),
        ti("./etc/sym", tarfile.SYMTYPE, linkname="../x//y/"),
        ti("./dev-c", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        ti("./dev-b", tarfile.BLKTYPE, devmajor=259, devminor=65536),
        ti("./wh", tarfile.CHRTYPE, devmajor=0, devminor=0, mode=0),
        ti("./fifo", tarfile.FIFOTYPE),
    ]
    members[2][0].pax_headers = {"mtime": "1700000000.5", "SCHILY.xattr.user.b": "2", "SCHILY.xattr.user.a": "1"}
    return make_tar(members, tarfile.PAX_FORMAT)


def test_entries_of_every_kind(repo: Repository) -> None:
    big = os.urandom(1000)
    reader = store(repo, _every_kind_tar(big))
    got = list(iter_layer_entries(reader))
    assert [(e.path, e.item) for e in got] == [
        (b"", Directory()),
        (b"/etc", Directory()),
        (b"/etc/small", Inline(b"tiny")),
        (b"/etc/big", External(reader.object_refs[0], 1000)),
        (b"/etc/hard", Hardlink(b"/etc/big")),
        (b"/etc/sym", Symlink(b"../x//y/")),
        (b"/dev-c", CharDevice(os.makedev(1, 3))),
        (b"/dev-b", BlockDevice(os.makedev(259, 65536))),
        (b"/wh", CharDevice(0)),
        (b"/fifo", Fifo()),
    ]
    etc, small, big_e = got[1].stat, got[2].stat, got[3].stat
    assert (etc.mode, etc.uid, etc.gid, etc.mtime_sec, etc.mtime_nsec) == (0o700, 1, 2, 1234, 0)
    assert (small.mtime_sec, small.mtime_nsec) == (1700000000, 500000000)
    assert list(small.xattrs.items()) == [(b"user.a", b"1"), (b"user.b", b"2")]  # sorted
    assert (big_e.mode, big_e.uid, big_e.gid) == (0o4755, 4_000_000_000, 3)
    assert repo.read_object(reader.object_refs[0]) == big


def _layer_stream(parts: list[bytes | tuple[bytes, int]], repo: Repository) -> SplitStreamReader:
    w = SplitStreamWriter(repo.alg, CONTENT_OCI_LAYER)
    for p in parts:
        if isinstance(p, tuple):
            w.write_external(repo.ensure_object(p[0]), p[1])
        else:
            w.write_inline(p)
    return SplitStreamReader(w.finish(), repo.alg)


def test_reader_enforces_the_threshold(repo: Repository) -> None:
    small = simple_entry(b"f", b"x" * 64)
    with pytest.raises(TarError, match="an object where tar headers or small-file content belong"):
        list(iter_layer_entries(_layer_stream([small[:512], (b"x" * 64, 64), small[576:]], repo)))
    big = simple_entry(b"f", b"x" * 65)
    with pytest.raises(TarError, match="inline data where the content object of a file > 64 bytes belongs"):
        list(iter_layer_entries(_layer_stream([big], repo)))


def _feed(collector: LayerEntryCollector, reader: SplitStreamReader, cuts: list[int], advance_every: int) -> None:
    """Feed a stored stream's pieces to a collector as a writer would, the inline bytes cut
    at `cuts` (offsets into each inline chunk, taken modulo its length), advancing every
    `advance_every` pieces."""
    fed = 0
    for chunk in reader.chunks():
        if isinstance(chunk, int):
            collector.add_external(reader.object_refs[chunk])
            fed += 1
        else:
            points = sorted({c % len(chunk) for c in cuts} | {0, len(chunk)})
            for a, b in itertools.pairwise(points):
                collector.add_inline(chunk[a:b])
                fed += 1
                if fed % advance_every == 0:
                    collector.advance()
        if fed % advance_every == 0:
            collector.advance()
    collector.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 1 << 14), max_size=12), advance_every=st.integers(1, 7),
       extra=st.lists(st.tuples(st.binary(min_size=0, max_size=200), st.booleans()), max_size=6))
def test_collector_gives_the_entries_read_back(repo: Repository, cuts, advance_every, extra) -> None:
    """Entries parsed from the pieces as they are written, in whatever pieces and with
    `advance` at whatever points, are the entries read back from the stored stream."""
    members = [reg(f"./x{i}" + ("/" * dirlike), data) for i, (data, dirlike) in enumerate(extra)]
    tar = _every_kind_tar(b"b" * 1000)[:-1024] + make_tar(members, tarfile.PAX_FORMAT)
    reader = store(repo, tar)
    collector = LayerEntryCollector()
    _feed(collector, reader, cuts, advance_every)
    assert collector.entries is not None
    assert collector.entries == list(iter_layer_entries(open_layer(repo, diff_id_of(tar))))


@pytest.mark.parametrize("parts", [
    [simple_entry(b"f", b"x" * 64)[:512], (b"x" * 64, 64), simple_entry(b"f", b"x" * 64)[576:]],
    [simple_entry(b"f", b"x" * 65)],
    [simple_entry(b"f", b"x" * 65)[:512], (b"x" * 65, 65)],  # no padding, no end marker
    [TarHeader(name=b"odd", typeflag=b"V", mode=0o644).pack() + ZERO_BLOCK * 2],
    [pax_entry([(b"uid", b"7" * 5000)]) + simple_entry(b"f") + ZERO_BLOCK * 2],  # past int()'s digit limit
])
def test_collector_gives_up_where_reading_back_fails(repo: Repository, parts) -> None:
    """A stream the reader refuses leaves the collector without entries (the image build
    then reads the stream back and reports the error), never with a part of them."""
    reader = _layer_stream(parts, repo)
    with pytest.raises(TarError):
        list(iter_layer_entries(reader))
    collector = LayerEntryCollector()
    _feed(collector, _layer_stream(parts, repo), [100], 1)
    assert collector.entries is None


def _split_collecting(repo: Repository, tar: bytes, defer: bool, max_files: int) -> tuple[bytes, list | None]:
    """Split tar a few files a chunk, the PendingFiles adopted as the object workers do and
    each chunk fed to a LayerEntryCollector as an oci:DIR pull does: (the stream's id, the
    entries collected)."""
    splitter = TarSplitter(repo, io.BytesIO(tar), defer=defer)
    writer = SplitStreamWriter(repo.alg, CONTENT_OCI_LAYER)
    collector = LayerEntryCollector()
    while pieces := splitter.chunk(max_files=max_files):
        for i, p in enumerate(pieces):
            if isinstance(p, PendingFile):
                result = repo.adopt_object_file(p.fd, p.size)
                os.close(p.fd)
                pieces[i] = StoredFile(result.object_id, p.size, result.how)
        write_pieces(writer, pieces, ImportStats())
        collector.feed([p if isinstance(p, bytes) else (p.object_id,) for p in pieces])
    collector.close()
    return repo.write_stream(writer, "collected"), collector.entries


@pytest.mark.parametrize(("defer", "max_files"), [(True, 1), (True, 3), (False, 2)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(st.tuples(st.binary(min_size=0, max_size=200), st.booleans()), max_size=6))
def test_splitter_collects_the_entries_read_back(repo: Repository, defer, max_files, extra) -> None:
    """The entries collected from a split's pieces, a chunk at a time, its files' objects
    filled in once stored, are the entries read back from the stored stream."""
    members = [reg("./y0", b"0" * 65), reg("./y1", b"1" * 3000)]  # objects in one chunk
    members += [reg(f"./x{i}" + ("/" * dirlike), data) for i, (data, dirlike) in enumerate(extra)]
    tar = _every_kind_tar(b"b" * 1000)[:-1024] + make_tar(members, tarfile.PAX_FORMAT)
    stream_id, entries = _split_collecting(repo, tar, defer, max_files)
    assert entries is not None and any(isinstance(e.item, External) for e in entries)
    assert entries == list(iter_layer_entries(repo.open_stream_by_id(stream_id, CONTENT_OCI_LAYER)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(65, 3 << 20), min_size=1, max_size=4), hash_files=st.booleans())
@example(sizes=[100, (1 << 20) + 1000, 3 << 20], hash_files=True)  # files across the 1 MiB reads
def test_files_hashed_as_written_are_named_by_what_they_hold(repo: Repository, sizes, hash_files) -> None:
    """With hash_files, each deferred file's object_id, taken from the bytes as they were
    written (in one piece or across the splitter's 1 MiB reads), is the digest of the file
    read back, and adopting it by that id names the object so; without, there is none."""
    contents = [random.Random(n).randbytes(n) for n in sizes]
    tar = make_tar([reg(f"f{i}", data) for i, data in enumerate(contents)], tarfile.PAX_FORMAT)
    splitter = TarSplitter(repo, io.BytesIO(tar), defer=True, hash_files=hash_files)
    files = [p for pieces in iter(splitter.chunk, []) for p in pieces if isinstance(p, PendingFile)]
    try:
        assert [p.size for p in files] == sizes
        for p, data in zip(files, contents):
            assert p.object_id == (digest_fd(p.fd, repo.alg, p.size) if hash_files else None)
            result = repo.adopt_object_file(p.fd, p.size, p.object_id)
            assert result.object_id == digest_bytes(data, repo.alg) and repo.read_object(result.object_id) == data
    finally:
        for p in files:
            os.close(p.fd)


def test_splitter_gives_up_collecting_where_reading_back_fails(repo: Repository) -> None:
    """An entry an image cannot hold (here a socket) leaves the splitter without entries,
    never with a part of them, and the layer is still split byte for byte."""
    tar = (simple_entry(b"a", b"x" * 100) + TarHeader(name=b"odd", typeflag=b"V", mode=0o644).pack()
           + simple_entry(b"b", b"y" * 100) + ZERO_BLOCK * 2)
    stream_id, entries = _split_collecting(repo, tar, True, 1)
    assert entries is None
    assert b"".join(iter_stream_bytes(repo, repo.open_stream_by_id(stream_id, CONTENT_OCI_LAYER))) == tar


def test_reader_rejects_other_streams_and_types(repo: Repository) -> None:
    w = SplitStreamWriter(repo.alg, 0x1234)
    w.write_inline(b"x")
    with pytest.raises(TarError, match="not a tar layer"):
        list(iter_layer_entries(SplitStreamReader(w.finish(), repo.alg)))
    sock = TarHeader(name=b"odd", typeflag=b"V", mode=0o644).pack() + ZERO_BLOCK * 2
    with pytest.raises(TarError, match="unsupported type b'V'"):
        list(iter_layer_entries(_layer_stream([sock], repo)))


# ---------------------------------------------------------------------------- random archives


names = st.text(alphabet="abcxyz-_.é/", min_size=1, max_size=300).map(lambda s: s.strip("/").replace("//", "/")).filter(
    lambda s: s and all(p not in ("", ".", "..") for p in s.split("/")))
member = st.one_of(
    st.tuples(st.just("file"), names, st.one_of(st.integers(0, 130), st.integers(500, 1100), st.integers(0, 20000))),
    st.tuples(st.just("dir"), names, st.just(0)),
    st.tuples(st.just("symlink"), names, st.integers(1, 200)),
    st.tuples(st.just("fifo"), names, st.just(0)),
    st.tuples(st.just("chr"), names, st.integers(0, 300)),
)


def _random_tar(fmt: int, spec: list[tuple[str, str, int]], uid: int, xattr: bool) -> bytes:
    members = []
    for i, (kind, name, n) in enumerate(spec):
        if fmt == tarfile.USTAR_FORMAT:
            name = name.encode()[-90:].decode(errors="ignore").strip("/") or f"n{i}"
        ti = tarfile.TarInfo(name)
        ti.uid, ti.mtime, ti.mode = uid, 1_600_000_000 + i, 0o640
        data = None
        if kind == "file":
            data = hashlib.shake_256(name.encode() + bytes([i % 256])).digest(n) if n else b""
            ti.size = n
        elif kind == "dir":
            ti.type = tarfile.DIRTYPE
        elif kind == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, ("t" * n if fmt != tarfile.USTAR_FORMAT else "t" * min(n, 100))
        elif kind == "fifo":
            ti.type = tarfile.FIFOTYPE
        else:
            ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, n, n * 7
        if xattr and fmt == tarfile.PAX_FORMAT:
            ti.pax_headers = {"SCHILY.xattr.user.i": str(i), "mtime": f"{1_600_000_000 + i}.{i:03d}"}
        members.append((ti, data))
        if kind == "file" and i % 3 == 0:
            hl = tarfile.TarInfo(f"hl{i}")
            hl.type, hl.linkname = tarfile.LNKTYPE, name
            members.append((hl, None))
    return make_tar(members, fmt)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FORMATS), st.lists(member, max_size=12), st.sampled_from([0, 1000, 70000, 2**21 - 1]),
       st.booleans())
def test_random_archives_round_trip(repo: Repository, fmt: int, spec, uid: int, xattr: bool) -> None:
    data = _random_tar(fmt, spec, uid, xattr)
    reader = store(repo, data)
    assert cat(repo, reader) == data
    assert chunk_list(repo, reader) == expected_chunks(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = tf.getmembers()
        entries = list(iter_layer_entries(reader))
        assert len(entries) == len(members)
        for m, e in zip(members, entries):
            assert e.path == normalize_path(os.fsencode(m.name))
            assert (e.stat.mode, e.stat.uid, e.stat.mtime_sec) == (m.mode, m.uid, int(m.mtime))
            assert e.stat.xattrs == {k[13:].encode(): v.encode() for k, v in m.pax_headers.items()
                                     if k.startswith("SCHILY.xattr.")}
            if m.isreg():
                content = tf.extractfile(m).read()
                if m.size > 64:
                    assert isinstance(e.item, External) and repo.read_object(e.item.id) == content
                else:
                    assert e.item == Inline(content)
            elif m.islnk():
                assert e.item == Hardlink(normalize_path(os.fsencode(m.linkname)))
            elif m.issym():
                assert e.item == Symlink(os.fsencode(m.linkname))
            elif m.ischr():
                assert e.item == CharDevice(os.makedev(m.devmajor, m.devminor))


# ---------------------------------------------------------------------------- GNU tar


needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")


def _gnu_tar(src: Path, *opts: str) -> bytes:
    return subprocess.run(["tar", "-C", str(src), "-c", "--sort=name", *opts, "."], check=True,
                          capture_output=True).stdout


def _tree(root: Path) -> Path:
    (root / "d" / ("L" * 120)).mkdir(parents=True)
    deep = root / "d" / ("L" * 120) / ("M" * 150)
    deep.mkdir()
    (deep / ("N" * 200)).write_bytes(os.urandom(70_000))  # path > 255 bytes
    (root / ("s" * 101)).write_bytes(b"short" * 5)  # name > 100
    (root / "big").write_bytes(os.urandom(300_000))
    os.link(root / "big", root / "big-hardlink")
    os.symlink("d/" + "L" * 120 + "/" + "M" * 150, root / ("sym" * 40))  # long link target
    (root / "exactly64").write_bytes(b"6" * 64)
    (root / "exactly65").write_bytes(b"6" * 65)
    os.mkfifo(root / "fifo")
    return root


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_gnu_tar_layers_round_trip(repo: Repository, tmp_path: Path, fmt: str) -> None:
    src = _tree(tmp_path / "src")
    opts = [f"--format={fmt}"]
    if fmt == "ustar":  # no room for names > 100 (or paths > 255) there
        opts += ["--exclude=./d", "--exclude=./" + "s" * 101, "--exclude=./" + "sym" * 40]
    data = _gnu_tar(src, *opts)
    reader = store(repo, data)
    assert hashlib.sha256(cat(repo, reader)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert chunk_list(repo, reader) == expected_chunks(data)
    entries = {e.path: e for e in iter_layer_entries(reader)}
    assert isinstance(entries[b"/big-hardlink"].item, Hardlink) or isinstance(entries[b"/big"].item, Hardlink)
    if fmt != "ustar":
        deep = b"/d/" + b"L" * 120 + b"/" + b"M" * 150 + b"/" + b"N" * 200
        assert isinstance(entries[deep].item, External) and entries[deep].item.size == 70_000
        assert entries[b"/" + b"sym" * 40].item == Symlink(b"d/" + b"L" * 120 + b"/" + b"M" * 150)


@needs_gnu_tar
def test_gnu_tar_posix_xattrs(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "withx"
    f.write_bytes(os.urandom(500))
    try:
        os.setxattr(f, "user.pycfs", b"v\x00al")
    except OSError as e:
        pytest.skip(f"{tmp_path} has no user xattrs: {e}")
    data = _gnu_tar(src, "--format=posix", "--xattrs", "--xattrs-include=*")
    reader = store(repo, data)
    assert cat(repo, reader) == data
    e = {e.path: e for e in iter_layer_entries(reader)}[b"/withx"]
    assert e.stat.xattrs == {b"user.pycfs": b"v\x00al"}
    assert e.stat.mtime_nsec == os.stat(f).st_mtime_ns % 1_000_000_000


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_round_trips(repo: Repository, tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data" * 100)
    (src / "plain").write_bytes(b"p" * 1000)
    data = _gnu_tar(src, f"--format={fmt}", "--sparse")
    reader = store(repo, data)
    assert cat(repo, reader) == data  # the stream reproduces the tar byte for byte
    # the sparse map and data segments stay inline: the one object is the plain file
    assert [repo.read_object(i) for i in reader.object_refs] == [b"p" * 1000]
    with pytest.raises(TarError, match="sparse file: the layer stream keeps it"):
        list(iter_layer_entries(reader))


# ---------------------------------------------------------------------------- pinned vector


VECTOR_TAR = C_VECTORS / "synth_tree.tar"


def test_vector_tar_round_trips(repo: Repository) -> None:
    data = VECTOR_TAR.read_bytes()
    reader = store(repo, data)
    assert cat(repo, reader) == data
    entries = {e.path: e for e in iter_layer_entries(reader)}
    conf = entries[b"/synth_tree/etc/conf"]
    assert conf.item == Inline(b"key=value\n")
    assert conf.stat.xattrs == {b"trusted.secret": b"s3", b"user.color": b"blue"}
    assert entries[b"/synth_tree/null"].item == CharDevice(os.makedev(1, 3))
    assert isinstance(entries[b"/synth_tree/files/size-000065"].item, External)


def test_split_commits_nothing_and_counts(repo: Repository) -> None:
    blob = os.urandom(3000)
    data = make_tar([reg("a", blob), reg("b", blob), reg("c", b"tiny"), reg("d", os.urandom(65))], tarfile.GNU_FORMAT)
    layer = split_tar(repo, io.BytesIO(data))
    assert layer.diff_id == diff_id_of(data) and layer.size == len(data)
    s = layer.stats
    assert (s.objects_copied, s.objects_already_present) == (2, 1)
    assert (s.bytes_copied, s.bytes_already_present) == (3000 + 65, 3000)
    assert s.bytes_copied + s.bytes_already_present + s.bytes_inlined == len(data)
    assert not (repo.path / "streams").exists()  # objects are garbage until a stream names them


# ---------------------------------------------------------------------------- entry bound


def test_collectors_charge_the_image_budget_once_per_listing(monkeypatch) -> None:
    """Entries parsed count against the image's bound, a layer listed twice twice; past it
    the parse stops with one line naming the layer."""
    monkeypatch.setattr(layer_module, "MAX_IMAGE_ENTRIES", 8)
    data = make_tar([reg(f"f{i}", b"x") for i in range(3)], tarfile.PAX_FORMAT)
    budget = EntryBudget()
    LayerEntryCollector(budget, 1, "layer A").feed([data])
    with pytest.raises(EntryLimitError, match="^layer B: the image's layers hold more than 8 entries"):
        LayerEntryCollector(budget, 2, "layer B").feed([data])


def test_an_image_listing_a_stored_layer_past_the_bound_is_refused(repo: Repository, monkeypatch) -> None:
    monkeypatch.setattr(layer_module, "MAX_IMAGE_ENTRIES", 5)
    data = make_tar([reg(f"f{i}", b"x") for i in range(3)], tarfile.PAX_FORMAT)
    diff_id = diff_id_of(data)
    store(repo, data)
    ids = {diff_id: repo.has_stream(layer_stream_name(diff_id))}
    assert len(build_filesystem(repo, [diff_id], ids).root.entries) == 3
    with pytest.raises(EntryLimitError, match=rf"^layer {diff_id}: the image's layers hold more than 5 entries"):
        build_filesystem(repo, [diff_id, diff_id], ids)


# ---------------------------------------------------------------------------- Linux's name limits


def _pax_member(records: list[tuple[bytes, bytes]], typeflag: bytes = b"0", linkname: bytes = b"") -> bytes:
    return pax_entry(records) + TarHeader(name=b"x", typeflag=typeflag, linkname=linkname, mode=0o644).pack()


BIG = b"n" * (16 << 20)  # a PAX record's most

PAST_LINUX = {
    "component": (_pax_member([(b"path", b"d/" + b"c" * 256)]), r"tar entry b'd/ccc.*'\.\.\. \(258 bytes\) has a component longer than Linux's NAME_MAX"),
    "path": (_pax_member([(b"path", b"d/" * 2048)]), r"tar entry b'd/d/.*\(4096 bytes\) is longer than Linux's PATH_MAX"),
    "deep": (_pax_member([(b"path", b"a/" * (1 << 20))]), r"tar entry b'a/a/.*\(2097152 bytes\) is longer"),
    "nul": (_pax_member([(b"path", b"a\0b")]), r"tar entry b'a\\x00b' holds a NUL byte"),
    "hardlink": (_pax_member([(b"linkpath", b"t" * 300)], b"1"), r"tar entry b'x': hardlink target b'ttt.*\(300 bytes\) has a component"),
    "symlink": (_pax_member([(b"linkpath", BIG[: 16 << 10])], b"2"), r"tar entry b'x': symlink target b'nnn.*\(16384 bytes\) is not one Linux takes"),
    "empty symlink": (TarHeader(name=b"x", typeflag=b"2", mode=0o777).pack(), r"tar entry b'x': symlink target b'' is not one Linux takes"),
    "xattr name": (_pax_member([(b"SCHILY.xattr.user." + b"k" * 251, b"v")]), r"tar entry b'x': xattr b'user.kkk.*\(256 bytes\) with a value of 1 bytes is past"),
    "xattr value": (_pax_member([(b"SCHILY.xattr.user.k", BIG[:65537])]), r"tar entry b'x': xattr b'user.k' with a value of 65537 bytes is past Linux's limits"),
}


@pytest.mark.parametrize("member", PAST_LINUX.values(), ids=PAST_LINUX.keys())
def test_names_past_linux_limits_are_refused_naming_the_layer(member: tuple[bytes, str]) -> None:
    """Paths, link targets and xattrs Linux could not hold are refused as parsed, in a line
    naming the layer and the entry cut short, so no name up to 16 MiB is kept until the
    image writer."""
    data, message = member
    collector = LayerEntryCollector(where="layer sha256:ab")
    with pytest.raises(TarError, match=rf"^layer sha256:ab: {message}.*the layer is damaged or crafted$") as e:
        collector.feed([data + ZERO_BLOCK * 2])
    assert len(str(e.value)) < 400


def test_names_at_linux_limits_are_taken() -> None:
    data = (_pax_member([(b"path", (b"c" * 255 + b"/") * 15 + b"e" * 255)])  # 4095 bytes
            + _pax_member([(b"linkpath", b"t" * 4095), (b"SCHILY.xattr.user." + b"k" * 250, BIG[:65536])], b"2"))
    collector = LayerEntryCollector()
    collector.feed([data + ZERO_BLOCK * 2])
    collector.close()
    assert collector.entries is not None and [len(e.path) for e in collector.entries] == [4096, 2]


def test_a_stored_layer_past_linux_limits_is_refused_naming_it(repo: Repository) -> None:
    data = _pax_member([(b"path", b"c" * 256)]) + ZERO_BLOCK * 2
    diff_id = diff_id_of(data)
    store(repo, data)
    with pytest.raises(PycfsError, match=rf"^layer {diff_id}: tar entry b'ccc.*\(256 bytes\) has a component longer"):
        build_filesystem(repo, [diff_id], {diff_id: repo.has_stream(layer_stream_name(diff_id))})


@pytest.mark.parametrize("member, message", [
    (pax_entry([(b"uid", b"4294967296")]) + TarHeader(name=b"x", mode=0o4755).pack(), r"uid/gid 4294967296/0, outside"),
    (pax_entry([(b"gid", b"4294967296")]) + TarHeader(name=b"x", mode=0o2755).pack(), r"uid/gid 0/4294967296, outside"),
    (TarHeader(name=b"x", typeflag=b"3", devmajor=-1, devminor=-1).pack(), r"device number -1:-1"),
    (TarHeader(name=b"x", typeflag=b"4", devmajor=1, devminor=-1).pack(), r"device number 1:-1"),
])
def test_ids_and_device_numbers_out_of_range_are_refused(member: bytes, message: str) -> None:
    """A uid of 2^32 is not root, nor -1:-1 device fff:fffff: refused, naming the entry."""
    collector = LayerEntryCollector()
    collector.feed([member + ZERO_BLOCK * 2])
    collector.close()
    assert collector.entries is None  # the read-back reports it:
    with pytest.raises(TarError, match=rf"^tar entry b'x' has {message}"):
        layer_entry(TarReader(io.BytesIO(member).read).next(), b"", SharedStats())  # type: ignore[arg-type]
