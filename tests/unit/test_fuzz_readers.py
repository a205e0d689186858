"""Property-based fuzzing of the readers of untrusted bytes: the tar-split reader, the
jsonrpc-fdpass framing, the splitstream reader, the dumpfile parser, the EROFS reader,
ostree's objects, commit streams and delta parts, the splitdirfdstream decoder, and the
JSON documents of an image (any shape).
Each takes valid input mutated (bytes flipped, inserted, cut) or arbitrary bytes, and must
either succeed or raise its module's own error (all derive from PycfsError): no other
exception, no hang (a deadline per example), no leaked fd.

CI runs a bounded number of examples; `tools/fuzz` runs many more (PYCFS_FUZZ_EXAMPLES)."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdcount import open_fd_count
from pycfs.host.dumpfile import DumpfileError
from pycfs.host.dumpfile import parse as parse_dumpfile
from pycfs.host.erofs.format import FormatError
from pycfs.host.erofs.reader import ImageFormatError, check_image, read_image
from pycfs.host.errors import PycfsError
from pycfs.host.splitstream import SplitStreamError, SplitStreamReader, SplitStreamWriter
from pycfs.host.storage.tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, iter_entries, write_entries
from pycfs.protocol.jsonrpc import Decoder, ProtocolError, encode

EXAMPLES = int(os.environ.get("PYCFS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "composefs-c"


def test_every_error_type_is_a_pycfs_error():
    from pycfs.host.oci.tar import TarError
    from pycfs.host.ostree.objects import OstreeError
    from pycfs.protocol.splitdirfdstream import SplitDirFdStreamError

    for error in (TarSplitError, ProtocolError, SplitStreamError, DumpfileError, ImageFormatError, FormatError,
                  OstreeError, TarError, SplitDirFdStreamError):
        assert issubclass(error, PycfsError), error


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few bytes replaced, inserted or removed, and perhaps cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("set", "insert", "delete")))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _tar_split_seed() -> bytes:
    out = io.BytesIO()
    write_entries([Segment(b"h" * 512), FileEntry(b"./etc/a", 5, crc64_iso(b"hello")), Segment(b"\0" * 11),
                   FileEntry("ünï".encode() + b"\xff", 0, None), Segment(b"\0" * 1024)], out)
    return out.getvalue()


TAR_SPLIT = _tar_split_seed()


@FUZZ
@given(st.one_of(mutated(TAR_SPLIT), mutated(gzip.decompress(TAR_SPLIT)).map(gzip.compress), st.binary(max_size=300)))
def test_tar_split_reader(data):
    try:
        for entry in iter_entries(io.BytesIO(data), "fuzz"):
            assert isinstance(entry, (Segment, FileEntry))
    except TarSplitError:
        pass


FRAMES = (encode({"jsonrpc": "2.0", "method": "open_files", "params": {"layer": "a" * 64, "paths": ["x", "ü"]}, "id": 1})
          + encode({"jsonrpc": "2.0", "result": {"results": [{"fd": 0}]}, "id": 2}, 1)
          + encode({"jsonrpc": "2.0", "error": {"code": -32600, "message": "m"}, "id": None}))


@FUZZ
@given(mutated(FRAMES), st.lists(st.integers(1, 64), max_size=6), st.lists(st.integers(0, 3), max_size=6))
def test_jsonrpc_fdpass_framing(data, cuts, fd_counts):
    """Fed in random pieces, each with some real fds attached: messages or ProtocolError,
    and every fd is closed once the messages and the decoder are."""
    before = open_fd_count()
    decoder = Decoder(max_message=4096, max_fds=4)
    messages = []
    try:
        pos = 0
        for i, cut in enumerate([*cuts, len(data)]):
            piece, pos = data[pos : pos + cut], pos + cut
            fds = []
            for _ in range(fd_counts[i] if i < len(fd_counts) else 0):
                r, w = os.pipe()
                os.close(w)
                fds.append(r)
            decoder.feed(piece, fds)
            while (msg := decoder.next_message()) is not None:
                assert isinstance(msg.obj, dict)
                messages.append(msg)
            if pos >= len(data):
                break
        decoder.feed_eof()
        while (msg := decoder.next_message()) is not None:
            messages.append(msg)
    except ProtocolError:
        pass
    finally:
        for msg in messages:
            msg.close()
        decoder.close()
    assert open_fd_count() == before


def _splitstream_seed() -> bytes:
    writer = SplitStreamWriter("sha256", 0x12345)
    writer.write_inline(b"header bytes " * 10)
    writer.write_external(bytes(range(32)), 4096)
    writer.write_inline(b"tail")
    return writer.finish()


SPLITSTREAM = _splitstream_seed()


@FUZZ
@given(st.one_of(mutated(SPLITSTREAM), st.binary(max_size=200)))
def test_splitstream_reader(data):
    try:
        reader = SplitStreamReader(data, "sha256")
        for chunk in reader.chunks():
            assert isinstance(chunk, (bytes, int))
    except SplitStreamError:
        pass


DUMP = (VECTORS / "mixed_rootfs.dump").read_bytes()


@FUZZ
@given(st.one_of(mutated(DUMP), st.binary(max_size=300)), st.booleans())
def test_dumpfile_parser(data, strict):
    try:
        parse_dumpfile(data, strict=strict)
    except DumpfileError:
        pass


IMAGE = (VECTORS / "mixed_rootfs.cfs").read_bytes()


@FUZZ
@given(mutated(IMAGE))
def test_erofs_reader(data):
    """... and check_image (a FUSE mount's start-up) refuses what read_image refuses, with
    its message, and accepts what it accepts."""
    try:
        read_image(data)
    except (ImageFormatError, FormatError) as e:
        try:
            check_image(data)
        except (ImageFormatError, FormatError) as checked:
            assert (type(checked), str(checked)) == (type(e), str(e))
        else:
            raise AssertionError(f"check_image accepted an image read_image refuses: {e}") from None
    else:
        check_image(data)


# ---- ostree objects, commit streams and static deltas (a peer's or a damaged store's bytes)

CSUM = bytes(range(32))


def _ostree_seeds() -> list[bytes]:
    from pycfs.host.ostree.objects import Commit, DirMeta, DirTree, FileHeader
    from pycfs.protocol.gvariant import Variant

    commit = Commit([("version", Variant("s", "1")), ("ostree.ref-binding", Variant("as", ["main"]))], CSUM, [],
                    "subject", "body", 1700000000, b"\1" * 32, b"\2" * 32)
    tree = DirTree([("a", b"\3" * 32), ("b", b"\4" * 32)], [("d", b"\5" * 32, b"\6" * 32)])
    meta = DirMeta(0, 0, 0o40755, [(b"user.x\0", b"v")])
    header = FileHeader(5, 0, 0, 0o100644, "", [(b"user.a\0", b"b")]).archive_header() + b"hello"
    link = FileHeader(0, 0, 0, 0o120777, "target", []).archive_header()
    return [commit.serialize(), tree.serialize(), meta.serialize(), header, link]


OSTREE_SEEDS = _ostree_seeds()


@FUZZ
@given(st.one_of(*(mutated(seed) for seed in OSTREE_SEEDS), st.binary(max_size=200)))
def test_ostree_object_parsers(data):
    from pycfs.host.ostree.objects import Commit, DirMeta, DirTree, OstreeError, split_archive_header

    for parse in (Commit.parse, DirTree.parse, DirMeta.parse, split_archive_header):
        try:
            parse(data, CSUM)
        except OstreeError:
            pass


def _commit_stream_seed() -> bytes:
    from pycfs.host.ostree.commitstream import CommitObjects, Entry
    from pycfs.host.ostree.objects import FileHeader

    objects = CommitObjects(CSUM)
    objects.add(CSUM, Entry(OSTREE_SEEDS[0]))
    objects.add(b"\7" * 32, Entry(OSTREE_SEEDS[3]))
    objects.add(b"\x80" * 32, Entry(OSTREE_SEEDS[4]))
    objects.add(b"\x90" * 32, Entry(FileHeader(1000, 0, 0, 0o100644, "", []).archive_header(), bytes(32)))
    return objects.to_stream("sha256").finish()


COMMIT_STREAM = _commit_stream_seed()


@FUZZ
@given(mutated(COMMIT_STREAM))
def test_commit_stream_reader(data):
    from pycfs.host.ostree.commitstream import CommitObjects
    from pycfs.host.ostree.objects import OstreeError

    try:
        objects = CommitObjects.from_stream(SplitStreamReader(data, "sha256"), "fuzz")
        for checksum in list(objects.entries):
            objects.file_header(checksum)
    except (OstreeError, SplitStreamError):
        pass


def _delta_part_seed() -> bytes:
    from pycfs.host.ostree.delta import PART_TYPE
    from pycfs.protocol.gvariant import encode

    mode = int.from_bytes((0o100644).to_bytes(4, "little"), "big")
    return b"\0" + encode(PART_TYPE, ([(0, 0, mode)], [[]], b"hello world", b"S\x00\x00\x05\x00o\x00\x00\x05w\x05\x06c"))


DELTA_PART = _delta_part_seed()


@FUZZ
@given(mutated(DELTA_PART))
def test_delta_part_applier(data):
    from pycfs.host.ostree.delta import PartApplier, decompress_part
    from pycfs.host.ostree.objects import Kind, OstreeError

    stored = []
    try:
        payload = decompress_part(data, "fuzz")
        PartApplier("fuzz", payload, [(Kind.FILE, CSUM), (Kind.FILE, b"\1" * 32)], lambda c: b"base",
                    lambda c, fetched: stored.append(fetched), lambda k, c, d: None, 1024, "/tmp").run()
    except OstreeError:
        pass


# ---- JSON documents of an image (an OCI layout's, a varlink peer's): any shape

_KEYS = st.sampled_from(["mediaType", "digest", "size", "annotations", "platform", "config", "layers", "rootfs",
                         "diff_ids", "manifests", "os", "architecture", "org.opencontainers.image.ref.name"])
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 70), st.floats(allow_nan=False),
                  st.sampled_from(["sha256:" + "a" * 64, "application/vnd.oci.image.layer.v1.tar", "linux"]),
                  st.text(max_size=6))
JSON_VALUE = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_KEYS, kids, max_size=5),
                          max_leaves=25)


@FUZZ
@given(st.dictionaries(_KEYS, JSON_VALUE, max_size=6), st.dictionaries(_KEYS, JSON_VALUE, max_size=6))
def test_image_json_of_any_shape(manifest, config):
    import json

    from pycfs.host.oci.layout import Descriptor, OciLayout, image_layers
    from pycfs.host.varlink.oci import layer_ids_of

    digest = "sha256:" + "b" * 64
    for call in (lambda: image_layers(manifest, json.dumps(config).encode(), digest),
                 lambda: Descriptor.from_json(manifest, "fuzz"),
                 lambda: OciLayout.__new__(OciLayout)._pick_platform(manifest, digest),
                 lambda: layer_ids_of(manifest, config)):
        try:
            call()
        except PycfsError:
            pass


# ---- splitdirfdstream (a varlink PutLayer client's pipe)

def _splitdirfdstream_seed() -> bytes:
    from pycfs.protocol import splitdirfdstream as sd

    return (sd.encode_metadata(b"m" * 40) + sd.encode_inline_data(b"inline")
            + sd.encode_file_backed_data(2, 4096, b"usr/lib/x") + sd.encode_metadata(b"tail"))


SPLITDIRFDSTREAM = _splitdirfdstream_seed()


@FUZZ
@given(st.one_of(mutated(SPLITDIRFDSTREAM), st.binary(max_size=100)), st.lists(st.integers(1, 40), max_size=5))
def test_splitdirfdstream_decoder(data, cuts):
    from pycfs.protocol import splitdirfdstream as sd

    decoder = sd.Decoder()
    try:
        pos = 0
        for cut in [*cuts, len(data)]:
            decoder.feed(data[pos:pos + cut])
            pos += cut
            for chunk in decoder.chunks():
                if isinstance(chunk, sd.FileBackedData):
                    sd.validate_filename(chunk.name)
        decoder.eof()
    except sd.SplitDirFdStreamError:
        pass
