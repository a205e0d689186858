"""Splitstream codec: exact bytes, round trips, and a clear error for every malformed input."""

import struct

import pytest
import zstandard
from hypothesis import given, settings, strategies as st
from memtrace import peak_of

from pycfs.host.splitstream import (
    CONTENT_OCI_CONFIG, CONTENT_OCI_LAYER, FILE_RANGE, HEADER, INFO, NAMED_REFS_MAX, SplitStreamError,
    SplitStreamReader, SplitStreamWriter, StreamTooLarge,
)

EMPTY_FRAME = bytes.fromhex("28b52ffd2000010000")


def oid(n: int, size: int = 32) -> bytes:
    return bytes([n]) * size


def build(chunks, named=(), alg="sha256", ctype=CONTENT_OCI_LAYER) -> bytes:
    w = SplitStreamWriter(alg, ctype)
    for c in chunks:
        if isinstance(c, bytes):
            w.write_inline(c)
        else:
            w.write_external(*c)
    for name, i in named:
        w.add_named_ref(name, i)
    return w.finish()


def test_finish_once_lets_go_of_the_pieces():
    w = SplitStreamWriter("sha256", CONTENT_OCI_LAYER)
    w.write_inline(b"head")
    w.write_external(oid(1), 10)
    data = w.finish()
    assert SplitStreamReader(data, "sha256").object_refs == [oid(1)]
    assert (w._object_refs, w._object_index, w._body) == ([], {}, [])
    with pytest.raises(ValueError, match="twice"):
        w.finish()


def test_layout_of_empty_stream():
    data = build([])
    magic, version, flags, alg, lg, info = HEADER.unpack_from(data)
    assert (magic, version, flags, alg, lg) == (b"SplitStream", 0, 0, 1, 12)
    assert FILE_RANGE.unpack(info) == (32, 112)
    sr, orf, body, nr, ctype, size = INFO.unpack_from(data, 32)
    assert ctype == CONTENT_OCI_LAYER
    assert data[96:104] == b"ocilayer"
    assert FILE_RANGE.unpack(sr) == (112, 112) and FILE_RANGE.unpack(orf) == (112, 112)
    # both empty sections are the auto-pledged 9-byte frame, named refs first
    assert FILE_RANGE.unpack(nr) == (112, 121) and FILE_RANGE.unpack(body) == (121, 130)
    assert data[112:121] == EMPTY_FRAME and data[121:] == EMPTY_FRAME and size == 0


def test_nonempty_body_has_no_content_size():
    data = build([b"abc"])
    r = SplitStreamReader(data, "sha256")
    start = FILE_RANGE.unpack(INFO.unpack_from(data, 32)[2])[0]
    assert data[start : start + 5] == bytes.fromhex("28b52ffd00")
    assert list(r.chunks()) == [b"abc"]


def test_adjacent_inline_merges_and_objects_dedup():
    data = build([b"a", b"b", (oid(1), 10), b"c", (oid(2), 5), (oid(1), 10), b"d", b"e"])
    r = SplitStreamReader(data, "sha256")
    assert list(r.chunks()) == [b"ab", 0, b"c", 1, 0, b"de"]
    assert r.object_refs == [oid(1), oid(2)]
    assert r.stream_size == 2 + 10 + 1 + 5 + 10 + 2


def test_named_refs_sorted_and_colons_allowed():
    data = build([], named=[("z", oid(9)), ("config:sha256:abc", oid(3)), ("a", oid(9))], ctype=CONTENT_OCI_CONFIG)
    r = SplitStreamReader(data, "sha256", CONTENT_OCI_CONFIG)
    assert r.stream_refs == [oid(9), oid(3)]
    assert r.named_refs == {"z": oid(9), "config:sha256:abc": oid(3), "a": oid(9)}
    nr = FILE_RANGE.unpack(INFO.unpack_from(data, 32)[3])
    text = zstandard.ZstdDecompressor().decompressobj().decompress(data[nr[0]:nr[1]])
    assert text == b"0:a\x001:config:sha256:abc\x000:z\x00"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=300),
                          st.tuples(st.integers(0, 5), st.integers(0, 10**12))), max_size=30),
       st.sampled_from(["sha256", "sha512"]))
def test_round_trip(items, alg):
    size = 32 if alg == "sha256" else 64
    chunks = [c if isinstance(c, bytes) else (oid(c[0], size), c[1]) for c in items]
    r = SplitStreamReader(build(chunks, alg=alg), alg)
    rebuilt, expect = [], []
    for c in r.chunks():
        rebuilt.append(c if isinstance(c, bytes) else ("ref", r.object_refs[c]))
    for c in chunks:
        if isinstance(c, bytes):
            if expect and isinstance(expect[-1], bytes):
                expect[-1] += c
            else:
                expect.append(c)
        else:
            expect.append(("ref", c[0]))
    assert rebuilt == expect
    assert r.stream_size == sum(len(c) if isinstance(c, bytes) else c[1] for c in chunks)


def test_old_header_layout_accepted():
    new = build([b"xyz"])
    magic, version, flags, alg, lg, info = HEADER.unpack_from(new)
    old = struct.pack("<16sH11sBBB", info, flags, magic, version, alg, lg) + new[32:]
    assert list(SplitStreamReader(old, "sha256").chunks()) == [b"xyz"]


def corrupt(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


GOOD = build([b"hello", (oid(1), 100), b"tail"], named=[("n", oid(2))])


@pytest.mark.parametrize("data,message", [
    (b"short", "shorter than the 32-byte header"),
    (corrupt(GOOD, 0, b"NotAStream!"), "bad magic"),
    (corrupt(GOOD, 11, b"\x01"), "version"),
    (corrupt(GOOD, 15, b"\x0d"), "block size"),
    (corrupt(GOOD, 16, FILE_RANGE.pack(32, 100)), "info section of 68 bytes"),
    (corrupt(GOOD, 16, FILE_RANGE.pack(32, 10**6)), "beyond the end"),
    (corrupt(GOOD, 32, FILE_RANGE.pack(120, 112)), "ends (112) before it starts"),
    (corrupt(GOOD, 48, FILE_RANGE.pack(144, 150)), "not a multiple of the digest size"),
    (GOOD[:-3], "beyond the end"),
])
def test_malformed_header_and_ranges(data, message):
    with pytest.raises(SplitStreamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SplitStreamReader(data, "sha256")


def test_wrong_algorithm_and_content_type():
    with pytest.raises(SplitStreamError, match="does not match"):
        SplitStreamReader(GOOD, "sha512")
    with pytest.raises(SplitStreamError, match="content type"):
        SplitStreamReader(GOOD, "sha256", CONTENT_OCI_CONFIG)


def _with_section(base: bytes, which: int, payload: bytes) -> bytes:
    """Replace section `which` (index into INFO's ranges) with payload appended at the end."""
    ranges = list(INFO.unpack_from(base, 32))
    ranges[which] = FILE_RANGE.pack(len(base), len(base) + len(payload))
    return base[:32] + INFO.pack(*ranges) + base[112:] + payload


def _zstd(raw: bytes) -> bytes:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    return c.compress(raw) + c.flush()


@pytest.mark.parametrize("which,payload,message", [
    (3, _zstd(b"0:unterminated"), "not NUL-terminated"),
    (3, _zstd(b"7:x\0"), "index 7 out of range"),
    (3, _zstd(b"nocolon\0"), "malformed record"),
    (3, _zstd(b"-1:x\0"), "malformed record"),
    (3, _zstd(b"1" * 5000 + b":x\0"), "malformed record"),  # (before: int() raised a bare ValueError)
    (3, _zstd(b"0:\xff\0"), "not UTF-8"),
    (3, _zstd(b"0:x\0")[:-2], "corrupt zstd"),
    (3, b"garbage!", "corrupt zstd"),
])
def test_malformed_named_refs(which, payload, message):
    with pytest.raises(SplitStreamError, match=message):
        SplitStreamReader(_with_section(GOOD, which, payload), "sha256")


@pytest.mark.parametrize("payload,message", [
    (_zstd(struct.pack("<q", 5)), "object index 5 out of range"),
    (_zstd(struct.pack("<q", -10) + b"abc"), "truncated chunk"),
    (_zstd(b"\x01\x02\x03"), "truncated chunk"),
    (_zstd(struct.pack("<q", -3) + b"abc")[:-4], "corrupt zstd"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 20, "corrupt zstd"),
])
def test_malformed_body(payload, message):
    r = SplitStreamReader(_with_section(GOOD, 2, payload), "sha256")
    with pytest.raises(SplitStreamError, match=message):
        list(r.chunks())


def test_concatenated_frames_accepted():
    payload = _zstd(struct.pack("<q", -2) + b"ab") + _zstd(struct.pack("<q", 0))
    r = SplitStreamReader(_with_section(GOOD, 2, payload), "sha256")
    assert list(r.chunks()) == [b"ab", 0]


def test_a_body_that_inflates_a_thousandfold_is_read_in_bounded_pieces():
    # 64 MiB of zeros: chunk after chunk naming object 0, from ~2 KiB of zstd
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))
    r = SplitStreamReader(_with_section(GOOD, 2, bomb), "sha256")
    chunks = r.chunks()
    assert peak_of(lambda: next(chunks)) < 4 << 20  # (before: the 64 MiB at once)
    chunks.close()


def test_an_inline_chunk_beyond_the_declared_stream_size_is_refused_before_it_is_read():
    # GOOD declares 109 bytes; a 32 MiB inline chunk cannot belong to it
    payload = _zstd(struct.pack("<q", -(32 << 20)) + bytes(32 << 20))
    r = SplitStreamReader(_with_section(GOOD, 2, payload), "sha256", name="oci-layer-x")

    def read_all():
        with pytest.raises(SplitStreamError, match=r"^splitstream oci-layer-x: body: an inline chunk of 33554432 "
                                                   r"bytes where the declared stream size \(109\) leaves 109$"):
            list(r.chunks())
    assert peak_of(read_all) < 4 << 20  # (before: buffered and yielded whole)


def test_inline_chunks_together_may_not_exceed_the_declared_stream_size():
    payload = _zstd(struct.pack("<q", -100) + bytes(100) + struct.pack("<q", 0) + struct.pack("<q", -10) + bytes(10))
    r = SplitStreamReader(_with_section(GOOD, 2, payload), "sha256")
    with pytest.raises(SplitStreamError, match=r"inline chunk of 10 bytes where the declared stream size \(109\) leaves 9"):
        list(r.chunks())


def test_named_refs_are_bounded():
    payload = _zstd(b"0:" + b"x" * NAMED_REFS_MAX + b"\0")
    with pytest.raises(SplitStreamError, match=f"^splitstream s: named refs: more than {NAMED_REFS_MAX} bytes$"):
        SplitStreamReader(_with_section(GOOD, 3, payload), "sha256", name="s")


def _with_stream_size(base: bytes, size: int) -> bytes:
    fields = list(INFO.unpack_from(base, 32))
    fields[5] = size
    return base[:32] + INFO.pack(*fields) + base[112:]


def test_a_long_inline_chunk_comes_in_bounded_pieces():
    # 64 MiB of inline zeros the (crafted) stream_size allows
    payload = zstandard.ZstdCompressor(level=3).compress(struct.pack("<q", -(64 << 20)) + bytes(64 << 20) + struct.pack("<q", 0))
    r = SplitStreamReader(_with_stream_size(_with_section(GOOD, 2, payload), 1 << 62), "sha256")
    total = []

    def read_all():
        for chunk in r.chunks():
            total.append(len(chunk) if isinstance(chunk, bytes) else chunk)
    assert peak_of(read_all) < 8 << 20  # (before: 128 MiB, the chunk buffered and yielded whole)
    assert sum(total[:-1]) == 64 << 20 and max(total[:-1]) <= 1 << 20 and total[-1] == 0


def test_a_long_inline_chunk_cut_short_is_an_error():
    payload = _zstd(struct.pack("<q", -(2 << 20)) + bytes(1 << 20))
    r = SplitStreamReader(_with_stream_size(_with_section(GOOD, 2, payload), 2 << 20), "sha256")
    with pytest.raises(SplitStreamError, match=r"^body: truncated chunk \(1048576 bytes missing\)$"):
        list(r.chunks())


def test_a_layer_stream_holds_no_more_than_a_real_layer_would(monkeypatch) -> None:
    """A layer stream is built in memory: a run of inline bytes with no file between (one
    chunk, its length first) and the compressed body are capped; other streams (an ostree
    commit's) are not."""
    import os

    from pycfs.host import splitstream

    monkeypatch.setattr(splitstream, "MAX_LAYER_INLINE_RUN", 1 << 20)
    monkeypatch.setattr(splitstream, "MAX_LAYER_BODY", 2 << 20)
    w = SplitStreamWriter("sha256", CONTENT_OCI_LAYER)
    w.write_inline(bytes(1 << 20))
    with pytest.raises(StreamTooLarge, match="more than 1 MiB of tar headers and small files with no larger file"):
        w.write_inline(b"x")
    w = SplitStreamWriter("sha256", CONTENT_OCI_LAYER)
    with pytest.raises(StreamTooLarge, match="come to more than 2 MiB compressed"):
        for i in range(8):  # incompressible runs, each under the run's cap
            w.write_inline(os.urandom(600 << 10))
            w.write_external(bytes([i]) * 32, 100)
    other = SplitStreamWriter("sha256", CONTENT_OCI_CONFIG)
    for _ in range(8):
        other.write_inline(os.urandom(600 << 10))
    assert len(other.finish()) > 4 << 20
