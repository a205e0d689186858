"""Property-based fuzzing of the readers of untrusted bytes: the tar-split reader, the
jsonrpc-fdpass framing, the splitstream reader, the dumpfile parser and the EROFS reader.
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
from pycfs.host.erofs.reader import ImageFormatError, read_image
from pycfs.host.errors import PycfsError
from pycfs.host.splitstream import SplitStreamError, SplitStreamReader, SplitStreamWriter
from pycfs.host.storage.tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, iter_entries, write_entries
from pycfs.protocol.jsonrpc import Decoder, ProtocolError, encode

EXAMPLES = int(os.environ.get("PYCFS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "composefs-c"


def test_every_error_type_is_a_pycfs_error():
    for error in (TarSplitError, ProtocolError, SplitStreamError, DumpfileError, ImageFormatError, FormatError):
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
    try:
        read_image(data)
    except (ImageFormatError, FormatError):
        pass
