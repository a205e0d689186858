"""Untrusted JSON (an OCI layout, containers-storage, a varlink peer) and varlink peers that
misbehave: every failure is one PycfsError, and nothing waits on a peer for ever."""

from __future__ import annotations

import json
import os
import threading

import pytest
import trio
from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import loads, parse_object
from pycfs.host.oci.layout import Descriptor, OciLayout, image_layers
from pycfs.host.varlink.client import Client
from pycfs.host.varlink.oci import layer_ids_of
from pycfs.host.varlink.serve import open_service
from pycfs.host.varlink.transport import socketpair
from pycfs.protocol.varlink import Decoder, VarlinkProtocolError

DIGEST = "sha256:" + "a" * 64
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" * 5000  # int() refuses more than 4300 digits with a bare ValueError


@pytest.mark.parametrize("raw, why", [(DEEP, "nests too deeply"), (HUGE_INT, "not valid JSON"),
                                      (b"\xff", "not valid JSON"), ("[]", "not a JSON object")])
def test_parse_object_is_one_error(raw, why):
    with pytest.raises(PycfsError, match=why):
        parse_object(raw, "doc")


def test_loads_takes_what_json_takes():
    assert loads('{"a": [1, 2.5, null]}', "doc") == {"a": [1, 2.5, None]}


def _descriptor(**fields) -> dict:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "size": 1, **fields}


@pytest.mark.parametrize("fields, why", [
    ({"annotations": ["x"]}, "annotations that are not an object of strings"),
    ({"annotations": {"org.opencontainers.image.ref.name": 5}}, "annotations that are not an object of strings"),
    ({"platform": "linux"}, "a platform that is not an object"),
    ({"size": True}, "non-negative size"),
])
def test_descriptor_fields_of_the_wrong_type_are_refused(fields, why):
    with pytest.raises(PycfsError, match=why):
        Descriptor.from_json(_descriptor(**fields), "index.json")


LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": DIGEST, "size": 1}
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 1}


@pytest.mark.parametrize("manifest, config, why", [
    ({"config": CONFIG, "layers": 5}, {"rootfs": {"diff_ids": []}}, "'layers' is not a list"),
    ({"config": CONFIG, "layers": [LAYER]}, {"rootfs": "x"}, "rootfs.diff_ids is not a list of digests"),
    ({"config": CONFIG, "layers": [LAYER]}, {"rootfs": ["x"]}, "rootfs.diff_ids is not a list of digests"),
    ({"config": CONFIG, "layers": [LAYER]}, {"rootfs": {"diff_ids": [7]}}, "rootfs.diff_ids is not a list of digests"),
    ({"config": CONFIG, "layers": [LAYER]}, {"rootfs": {"diff_ids": []}}, "rootfs.diff_ids does not match"),
    ({"config": CONFIG, "layers": [LAYER]}, {}, "rootfs.diff_ids does not match"),
])
def test_image_layers_of_the_wrong_shape_are_refused(manifest, config, why):
    with pytest.raises(PycfsError, match=why):
        image_layers(manifest, json.dumps(config).encode(), DIGEST)


def test_an_index_whose_manifests_is_not_a_list_is_refused():
    layout = OciLayout.__new__(OciLayout)
    with pytest.raises(PycfsError, match="'manifests' is not a list"):
        layout._pick_platform({"manifests": 7}, DIGEST)


def test_layout_documents_must_be_regular_files(tmp_path):
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    os.mkfifo(tmp_path / "index.json")
    # a writer after a while: before, the read blocked until one came (then read nothing)
    rescue = threading.Timer(3, lambda: open(tmp_path / "index.json", "wb").close())
    rescue.start()
    try:
        with pytest.raises(PycfsError, match="index.json is a fifo, not a regular file"):
            OciLayout(tmp_path)
    finally:
        rescue.cancel()


@pytest.mark.parametrize("manifest, config", [({"config": {"mediaType": "x"}, "layers": 3}, {}),
                                              ({"config": {"mediaType": ["x"]}, "layers": 3}, {}),
                                              ({"layers": [LAYER]}, {"rootfs": 1})])
def test_layer_ids_of_a_malformed_image_is_one_error(manifest, config):
    with pytest.raises(PycfsError, match="layer list is malformed"):
        layer_ids_of(manifest, config)


def test_an_image_listing_more_layers_than_pycfs_takes_is_refused_at_its_layer_list():
    """FinalizeImage and oci copy read an image's layers here: a layer listed 1,001 times
    would be merged 1,001 times."""
    with pytest.raises(PycfsError, match="^the image lists 1001 layers, more than the 1000 pycfs takes"):
        layer_ids_of({}, {"rootfs": {"diff_ids": [DIGEST] * 1001}})
    assert layer_ids_of({}, {"rootfs": {"diff_ids": [DIGEST] * 1000}}) == [DIGEST] * 1000


def test_varlink_decoder_refuses_a_huge_number():
    with pytest.raises(VarlinkProtocolError, match="not JSON"):
        Decoder().feed(b'{"parameters": {"x": ' + HUGE_INT.encode() + b"}}\0", [])


def test_a_varlink_client_sending_a_huge_number_does_not_stop_the_service():
    """(Before: the ValueError escaped the connection's task and ended the whole service.)"""

    async def main() -> None:
        with trio.fail_after(30):
            async with open_service() as server:
                conn, sock = socketpair()
                server.nursery.start_soon(server.serve_connection, sock)
                await conn.sock.send(b'{"method": "org.composefs.Oci.GetInfo", "parameters": {"x": '
                                     + HUGE_INT.encode() + b"}}\0")
                assert await conn.receive() is None  # dropped
                conn.close()
                conn, sock = socketpair()
                server.nursery.start_soon(server.serve_connection, sock)
                client = Client(conn)
                assert (await client.call("org.composefs.Oci.GetInfo")).parameters["features"]
                client.close()

    trio.run(main)


def test_a_varlink_client_that_never_reads_is_dropped(monkeypatch):
    """Calls pipelined without reading a reply: the service's sends block once the socket
    is full; past SEND_TIMEOUT the connection goes (before: its task waited for ever)."""
    from pycfs.host.varlink import server as server_module

    monkeypatch.setattr(server_module, "SEND_TIMEOUT", 0.5)

    async def main() -> None:
        with trio.fail_after(15):
            async with open_service() as server:
                conn, sock = socketpair()
                done = trio.Event()

                async def serve() -> None:
                    await server.serve_connection(sock)
                    done.set()

                server.nursery.start_soon(serve)
                call = b'{"method": "org.varlink.service.GetInfo"}\0'
                try:
                    with trio.move_on_after(5):
                        while not done.is_set():  # (the service stops reading once its sends block)
                            with trio.move_on_after(0.2):
                                try:
                                    await conn.sock.send(call * 64)
                                except OSError:  # dropped
                                    break
                    await done.wait()
                finally:
                    conn.close()  # (a failing test's way out: the shielded send then fails)

    trio.run(main)


def test_a_layer_consumer_that_never_reads_releases_the_source(monkeypatch):
    """GetLayer's producer holds the source's locks until it is done: a consumer that takes
    none of the stream must not hold them for ever (before: it did)."""
    from pycfs.host.varlink import transfer

    monkeypatch.setattr(transfer, "STALL_LIMIT", 0.5)
    released = []

    async def endless(send_all) -> None:
        while True:
            await send_all(bytes(1 << 16))

    async def main() -> None:
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        keep_r, keep_w = os.pipe2(os.O_CLOEXEC)
        os.close(keep_w)  # (the consumer is done with the directory fds at once)
        try:
            with trio.fail_after(15):
                await transfer.run_producer(pipe_w, keep_r, endless, lambda: released.append(True))
        finally:
            os.close(pipe_r)

    trio.run(main)
    assert released == [True]


@pytest.mark.parametrize("path", ["a\0b", "a\ud800b"])
def test_a_string_parameter_that_is_not_text_is_an_invalid_parameter(path):
    """JSON carries a NUL or a lone surrogate in a string; no path takes one (before: the
    ValueError or UnicodeEncodeError reached the service as an internal error, a traceback)."""

    async def main() -> None:
        with trio.fail_after(30):
            async with open_service() as server:
                conn, sock = socketpair()
                server.nursery.start_soon(server.serve_connection, sock)
                for method in ("OpenRepository", "InitRepository"):
                    # (json.dumps escapes both, as \\u0000 and \\ud800; our encoder would refuse the surrogate)
                    call = {"method": "org.composefs.Repository." + method, "parameters": {"path": path}}
                    await conn.sock.send(json.dumps(call).encode() + b"\0")
                    reply, _fds = await conn.receive()
                    assert reply == {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "path"}}
                conn.close()

    trio.run(main)


def test_oci_copy_from_a_service_whose_answers_lack_fields_is_one_error(tmp_path):
    """(Before: a KeyError from `reply.parameters["handle"]`.)"""
    from pycfs.host.oci.copy import copy
    from pycfs.host.repository import Repository
    from pycfs.host.varlink.transport import Connection, listen
    from pycfs.protocol.varlink import encode

    Repository.init(tmp_path / "dst").close()
    address = f"unix:{tmp_path}/peer.sock"

    async def peer(listener) -> None:
        sock, _ = await listener.accept()
        with sock:
            conn = Connection(sock)
            while (msg := await conn.receive()) is not None:
                method = msg[0].get("method", "")
                params = {"features": ["splitdirfdstream-v0"]} if method.endswith("GetInfo") else {}
                await conn.sock.send(encode({"parameters": params}))

    async def main() -> None:
        with trio.fail_after(60):
            with listen(address) as listener:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer, listener)
                    with pytest.raises(PycfsError, match="answered OpenRepository without a valid 'handle'"):
                        await copy(address, "/elsewhere", str(tmp_path / "dst"), "img", None, False)
                    nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_manifest_stream_s_json_object_is_read_only_up_to_the_document_limit(tmp_path, monkeypatch):
    import tracemalloc

    from pycfs.host.oci import streams
    from pycfs.host.repository import Repository
    from pycfs.host.splitstream import CONTENT_OCI_MANIFEST

    monkeypatch.setattr(streams, "MAX_JSON_DOCUMENT", 1 << 20)
    with Repository.init(tmp_path / "repo") as repo:
        w = repo.new_stream(CONTENT_OCI_MANIFEST)
        w.write_external(repo.ensure_object(b" " * (16 << 20)), 16 << 20)  # a damaged repository's "manifest"
        repo.write_stream(w, streams.manifest_stream_name(DIGEST))
        reader = repo.open_stream(streams.manifest_stream_name(DIGEST), CONTENT_OCI_MANIFEST)
        tracemalloc.start()
        try:
            with pytest.raises(PycfsError, match=f"^manifest stream for {DIGEST}: its object is larger than 1048576 "):
                streams.read_json_stream(repo, reader, DIGEST, "manifest")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20  # (before: the 16 MiB read whole, then a digest mismatch)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("plant", ["fifo", "directory"])
def test_an_object_that_is_no_regular_file_is_refused_unopened(tmp_path, plant):
    """A FIFO (which blocked the open for good) or a directory where an object should be:
    one error naming the object and the repair."""
    from pycfs.host.repository import Repository, RepositoryError

    repo = Repository.init(tmp_path / "repo")
    object_id = repo.ensure_object(b"x" * 5000)
    path = repo.object_path(object_id)
    path.unlink()
    os.mkfifo(path) if plant == "fifo" else path.mkdir()
    with pytest.raises(RepositoryError, match=rf"object sha256:{object_id.hex()} in .* is not a regular file: "
                                              r"run `pycfs fsck --repair`"):
        repo.read_object(object_id)
