"""The varlink service in process, over real AF_UNIX socketpairs with SCM_RIGHTS: framing,
errors by name, GetLayer/PutLayer against real repositories, hostile peers, leaks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import imagebuild
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from pycfs.host.oci.pull import PullOptions, pull
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.host.varlink import idl
from pycfs.host.varlink.client import Client
from pycfs.host.varlink.layers import reconstruct
from pycfs.host.varlink.serve import open_service
from pycfs.host.varlink.transport import socketpair
from pycfs.host.workers.batching import default_jobs
from pycfs.protocol import splitdirfdstream as sd
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.varlink import Decoder, VarlinkError, VarlinkProtocolError, encode

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------- framing


def test_decoder_attributes_fds_to_the_message_holding_the_last_byte() -> None:
    r, w = os.pipe()
    try:
        extra = [os.dup(r), os.dup(r), os.dup(r)]
        d = Decoder()
        one, two = encode({"a": 1}), encode({"b": 2})
        # a whole message with no fds, then the start of one that carries them
        d.feed(one + two[:3], [extra[0]])
        assert d.messages() == [({"a": 1}, [])]
        d.feed(two[3:], [])
        assert d.messages() == [({"b": 2}, [extra[0]])]
        # the batch ends exactly with a terminator: it belongs to that message
        d.feed(one + two, [extra[1], extra[2]])
        assert d.messages() == [({"a": 1}, []), ({"b": 2}, [extra[1], extra[2]])]
        d.feed(b"", [])
        d.eof()
    finally:
        close_fds([r, w, *extra])


@pytest.mark.parametrize("data, why", [
    (b"not json\0", "not JSON"), (b"[1]\0", "not a JSON object"), (b"[" * 100 + b"]" * 100 + b"\0", "nests"),
])
def test_decoder_errors_close_fds(data: bytes, why: str) -> None:
    r, w = os.pipe()
    before = open_fds()
    d = Decoder()
    with pytest.raises(VarlinkProtocolError, match=why):
        d.feed(data, [os.dup(r)])
    assert open_fds() == before
    with pytest.raises(VarlinkProtocolError):
        d.feed(encode({}), [os.dup(r)])  # a failed decoder stays failed, and still closes what it gets
    assert open_fds() == before
    close_fds([r, w])


def test_decoder_limits() -> None:
    r, w = os.pipe()
    before = open_fds()
    d = Decoder()
    with pytest.raises(VarlinkProtocolError, match="more than 253"):
        d.feed(b'{"x":', [os.dup(r) for _ in range(254)])
    assert open_fds() == before
    with pytest.raises(VarlinkProtocolError, match="exceeds"):
        Decoder(max_message=100).feed(b"{" + b" " * 200, [])
    d = Decoder()
    d.feed(b'{"x":1}', [os.dup(r)])
    with pytest.raises(VarlinkProtocolError, match="middle of a message"):
        d.eof()
    assert open_fds() == before
    close_fds([r, w])


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


_TEXT = st.text(alphabet='[]{}",\\ab\x00\u00e9', max_size=8)
_JSON = st.recursive(st.none() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=40)


def _nest(value: object, levels: int) -> object:
    for i in range(levels):
        value = [value] if i % 2 else {"k[": value}
    return value


@given(_JSON, st.integers(min_value=0, max_value=70))
def test_decoder_refuses_exactly_what_nests_too_deep(value, levels) -> None:
    """The whole-buffer shape check against the nesting the parser finds: brackets, quotes and
    backslashes inside strings do not count; one level more than MAX_DEPTH is refused."""
    from pycfs.protocol.varlink import MAX_DEPTH

    doc = {"parameters": _nest(value, levels)}
    d = Decoder()
    if _depth(doc) > MAX_DEPTH:
        with pytest.raises(VarlinkProtocolError, match=f"nests deeper than {MAX_DEPTH}"):
            d.feed(encode(doc), [])
    else:
        d.feed(encode(doc), [])
        assert d.messages() == [(json.loads(json.dumps(doc)), [])]


def test_decoder_refuses_more_values_than_its_limit() -> None:
    """A message of tiny values parses to ~25 times its size: their count is capped."""
    Decoder(max_values=1000).feed(encode({"p": [{}] * 998}), [])
    with pytest.raises(VarlinkProtocolError, match="holds more than 1000 values"):
        Decoder(max_values=1000).feed(encode({"p": [{}] * 1001}), [])
    Decoder(max_values=1000).feed(encode({"p": "," * 5000}), [])  # commas in a string are no values


# ---------------------------------------------------------------------------- fixtures


@asynccontextmanager
async def service() -> AsyncIterator[tuple[object, Client]]:
    async with open_service() as server:
        conn, sock = socketpair()
        server.nursery.start_soon(server.serve_connection, sock)
        client = Client(conn)
        try:
            yield server, client
        finally:
            client.close()


SMALL = imagebuild.ImageSpec(layers=[
    [imagebuild.Dir("usr"), imagebuild.Dir("usr/share"), imagebuild.File("usr/share/small", data=b"x" * 10),
     imagebuild.File("usr/share/edge64", data=b"e" * 64), imagebuild.File("usr/share/empty", data=b"")],
    [imagebuild.File("usr/share/big", size=256 << 10, seed=7), imagebuild.File("usr/share/65", data=b"f" * 65),
     imagebuild.File("usr/share/big-again", size=256 << 10, seed=7)],
], gzip=False)


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory) -> tuple[Path, imagebuild.BuiltImage]:
    base = tmp_path_factory.mktemp("src")
    built = imagebuild.build_layout(SMALL, base / "layout")
    with Repository.init(base / "repo") as repo:
        trio.run(pull, repo, f"oci:{built.path}", "img", PullOptions())
    return base / "repo", built


def layer_bytes(repo_path: Path, diff_id: str) -> bytes:
    with Repository.open(repo_path, writable=False) as repo:
        return b"".join(iter_stream_bytes(repo, repo.open_stream(f"oci-layer-{diff_id}")))


async def open_repo(client: Client, path: Path) -> int:
    return (await client.call(REPO + "OpenRepository", {"path": str(path)})).parameters["handle"]


async def get_layer(client: Client, handle: int, diff_id: str, more: bool = True) -> tuple[int, list[int], int]:
    fds: list[int] = []
    frames = 0
    if more:
        async for reply in client.call_more(OCI + "GetLayer", {"handle": handle, "params": {"diff_id": diff_id}}):
            fds += reply.fds
            frames += 1
            dir_count = reply.parameters["dir_count"]
    else:
        reply = await client.call(OCI + "GetLayer", {"handle": handle, "params": {"diff_id": diff_id}}, reply_fds=True)
        fds, frames, dir_count = reply.fds, 1, reply.parameters["dir_count"]
    return dir_count, fds, frames


async def relay(client: Client, src: int, dst: int, diff_id: str, zerocopy: bool = False) -> dict:
    """GetLayer from src, PutLayer into dst with the pipe and the directory slots."""
    dir_count, fds, _ = await get_layer(client, src, diff_id)
    try:
        return (await client.call(OCI + "PutLayer", {"handle": dst, "diff_id": diff_id, "zerocopy": zerocopy},
                                  fds[: 1 + dir_count])).parameters
    finally:
        close_fds(fds)


def read_all(fd: int) -> bytes:
    out = io.BytesIO()
    while piece := os.read(fd, 1 << 16):
        out.write(piece)
    return out.getvalue()


# ---------------------------------------------------------------------------- service basics


def test_introspection_and_errors_by_name(source_repo) -> None:
    repo_path, _ = source_repo

    async def main() -> None:
        async with service() as (_, client):
            info = (await client.call("org.varlink.service.GetInfo")).parameters
            assert info["interfaces"] == ["org.varlink.service", "org.composefs.Repository", "org.composefs.Oci"]
            desc = await client.call("org.varlink.service.GetInterfaceDescription", {"interface": "org.composefs.Oci"})
            assert desc.parameters["description"] == idl.OCI
            for method, params, name in [
                ("org.composefs.Nope.X", {}, "org.varlink.service.InterfaceNotFound"),
                (OCI + "Nope", {}, "org.varlink.service.MethodNotFound"),
                (REPO + "Fsck", {"handle": "1"}, "org.varlink.service.InvalidParameter"),
                (REPO + "Fsck", {"handle": 999}, REPO + "InvalidHandle"),
                (REPO + "OpenRepository", {}, REPO + "InvalidSpec"),
                (REPO + "OpenRepository", {"path": "/nonexistent", "user": True}, REPO + "InvalidSpec"),
                (REPO + "OpenRepository", {"path": "/nonexistent/repo"}, REPO + "RepoNotFound"),
                (REPO + "InitRepository", {"path": "/tmp/x", "algorithm": "not-an-algorithm"}, REPO + "InvalidSpec"),
                (REPO + "CloseRepository", {"handle": 424242}, REPO + "InvalidHandle"),
            ]:
                with pytest.raises(VarlinkError) as e:
                    await client.call(method, params)
                assert e.value.name == name, method
            handle = await open_repo(client, repo_path)
            fsck = (await client.call(REPO + "Fsck", {"handle": handle})).parameters
            assert fsck["ok"] and fsck["objects_checked"] > 0 and fsck["errors"] == []
            images = (await client.call(OCI + "ListImages", {"handle": handle, "filter": "im"})).parameters["images"]
            assert [i["name"] for i in images] == ["img"] and images[0]["layer_count"] == 2
            with pytest.raises(VarlinkError) as e:
                await client.call(OCI + "Inspect", {"handle": handle, "image": "does-not-exist"})
            assert e.value.name == OCI + "NoSuchImage" and e.value.parameters == {"image": "does-not-exist"}
            # oneway: no reply, and the next call is still answered in order
            await client.conn.send({"method": OCI + "GetInfo", "oneway": True})
            assert (await client.call(OCI + "GetInfo")).parameters == {"features": ["splitdirfdstream-v0"]}
            await client.call(REPO + "CloseRepository", {"handle": handle})
            with pytest.raises(VarlinkError, match="InvalidHandle"):
                await client.call(REPO + "Fsck", {"handle": handle})

    trio.run(main)


def test_many_clients_at_once(source_repo) -> None:
    repo_path, _ = source_repo

    async def main() -> None:
        async with open_service() as server:
            results = []

            async def one() -> None:
                conn, sock = socketpair()
                server.nursery.start_soon(server.serve_connection, sock)
                client = Client(conn)
                handle = await open_repo(client, repo_path)
                images = await client.call(OCI + "ListImages", {"handle": handle})
                results.append([i["name"] for i in images.parameters["images"]])
                client.close()

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert results == [["img"]] * 20

    trio.run(main)


# ---------------------------------------------------------------------------- layers


def test_get_layer_reconstructs_the_tar(source_repo) -> None:
    repo_path, built = source_repo

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo_path)
            before = 0
            for i, diff_id in enumerate(built.diff_ids * 2):
                if i == len(built.diff_ids):
                    before = open_fds()  # the second round: the repository's own cached fds are open by now
                has = (await client.call(OCI + "HasLayer", {"handle": handle, "diff_id": diff_id})).parameters
                assert has["present"] and len(has["layer_verity"]) == 64
                for more in (True, False):
                    dir_count, fds, frames = await get_layer(client, handle, diff_id, more)
                    try:
                        assert frames >= (3 if more else 1) and len(fds) >= dir_count + 2
                        data = await trio.to_thread.run_sync(read_all, fds[0])
                        out = io.BytesIO()
                        reconstruct(sd.decode(data), fds[1 : 1 + dir_count], out.write)
                    finally:
                        close_fds(fds)
                    assert "sha256:" + hashlib.sha256(out.getvalue()).hexdigest() == diff_id
                    assert out.getvalue() == layer_bytes(repo_path, diff_id)
            # every producer finished once its consumer let go: pipes, keepalives, dirfds closed
            with trio.fail_after(5):  # and no task is left but this connection's
                # (the baseline may include the fds of a producer that was still finishing)
                while open_fds() > before or len(server.nursery.child_tasks) != 1:
                    await trio.sleep(0.01)
            zero = "sha256:" + "0" * 64
            assert (await client.call(OCI + "HasLayer", {"handle": handle, "diff_id": zero})).parameters == {
                "present": False, "layer_verity": None}
            for params, name in [({"diff_id": zero}, "NoSuchLayer"), ({"diff_id": "sha256:xyz"}, "InvalidDigest"),
                                 ({}, "InvalidRequest")]:
                with pytest.raises(VarlinkError) as e:
                    await client.call(OCI + "GetLayer", {"handle": handle, "params": params})
                assert e.value.name == OCI + name

    trio.run(main)


def test_get_layer_of_a_missing_object_ends_the_stream_before_it(source_repo, tmp_path, capfd) -> None:
    """The producer names the missing object and stops: the consumer gets at most the stream
    before that file's reference (a verifying one refuses it by digest)."""
    import shutil

    repo_path, built = source_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo_path, copy, symlinks=True)
    diff_id = max(built.diff_ids, key=lambda d: len(layer_bytes(copy, d)))
    with Repository.open(copy) as repo:
        reader = repo.open_stream(f"oci-layer-{diff_id}")
        missing = reader.object_refs[-1]
        whole = list(reader.chunks())
    h = missing.hex()
    os.unlink(copy / "objects" / h[:2] / h[2:])
    first = next(i for i, c in enumerate(whole) if isinstance(c, int) and reader.object_refs[c] == missing)

    async def main() -> bytes:
        async with service() as (_, client):
            handle = await open_repo(client, copy)
            _, fds, _ = await get_layer(client, handle, diff_id)
            try:
                return await trio.to_thread.run_sync(read_all, fds[0])
            finally:
                close_fds(fds)

    got = [c.data if isinstance(c, sd.Metadata) else c.name for c in sd.decode(trio.run(main))]
    before = [c if isinstance(c, bytes) else f"{reader.object_refs[c].hex()[:2]}/{reader.object_refs[c].hex()[2:]}".encode()
              for c in whole[:first] if c != b""]
    assert got == before[: len(got)]  # what was sent before the producer stopped (whole pieces of it)
    assert f"object {h} of layer stream" in capfd.readouterr().err


def test_get_layer_in_a_stopping_service_hands_out_nothing_and_keeps_nothing(tmp_path) -> None:
    """The producer cannot start once the service's nursery is closed: before, the layout's
    fds (dummies, keep-alive, the pipe's ends) leaked and the repository stayed held."""
    from types import SimpleNamespace

    from fdcount import open_fd_count
    from pycfs.host.varlink.layers import build_layout
    from pycfs.host.varlink.oci import send_layer_frames

    released: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as closed:
            pass
        ctx = SimpleNamespace(more=True, server=SimpleNamespace(nursery=closed))
        r, w = os.pipe2(os.O_CLOEXEC)
        layout = build_layout(r, [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)], 7)
        with pytest.raises(RuntimeError):
            await send_layer_frames(ctx, layout, 7, w, lambda send_all: None, release=lambda: released.append(1))

    before = open_fd_count()
    trio.run(main)
    assert open_fd_count() == before
    assert released == [1]


def test_get_layer_producer_keeps_its_own_objects_dir_when_the_repository_closes(source_repo, tmp_path,
                                                                                 monkeypatch) -> None:
    """A CloseRepository while GetLayer streams closes the repository's fds, whose numbers
    the next open takes: the producer must go on in the repository's objects/ (before, it
    used the repository's fd and took another directory for it, or a closed one)."""
    from pycfs.host.varlink.transfer import produce_repo_layer

    repo_path, built = source_repo
    diff_id = max(built.diff_ids, key=lambda d: len(layer_bytes(repo_path, d)))
    repo = Repository.open(repo_path)
    stream_id = repo.intact_stream(f"oci-layer-{diff_id}")
    reader = repo.open_stream_by_id(stream_id)
    names = [f"{reader.object_refs[c].hex()[:2]}/{reader.object_refs[c].hex()[2:]}".encode()
             for c in reader.chunks() if isinstance(c, int)]
    squatters: list[int] = []
    opened = repo.open_stream_by_id

    def closing_after_the_first_chunk(stream: bytes):
        reader = opened(stream)
        chunks = reader.chunks

        def closing():
            it = chunks()
            yield next(it)
            repo.close()  # as a CloseRepository would; then other opens take its fd numbers
            squatters.extend(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(16))
            yield from it

        reader.chunks = closing
        return reader

    monkeypatch.setattr(repo, "open_stream_by_id", closing_after_the_first_chunk)
    pieces: list[bytes] = []

    async def send_all(data: bytes) -> None:
        pieces.append(data)

    try:
        trio.run(produce_repo_layer, repo, stream_id, 0, send_all)
    finally:
        close_fds(squatters)
    assert names and squatters
    assert [c.name for c in sd.decode(b"".join(pieces)) if not isinstance(c, sd.Metadata)] == names


def worker_children() -> list[int]:
    """This process's object workers (children running pycfs.host.workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid() \
                    and b"pycfs.host.workers" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_relay_copy_and_finalize(source_repo, tmp_path) -> None:
    repo_path, built = source_repo
    Repository.init(tmp_path / "dest").close()

    async def main() -> None:
        async with service() as (_, client):
            src = await open_repo(client, repo_path)
            dst = await open_repo(client, tmp_path / "dest")
            refs = []
            for diff_id in built.diff_ids:
                for attempt in range(2):
                    put = await relay(client, src, dst, diff_id)
                    assert put["already_present"] is (attempt == 1)
                src_verity = (await client.call(OCI + "HasLayer", {"handle": src, "diff_id": diff_id})).parameters
                assert put["layer_verity"] == src_verity["layer_verity"]
                refs.append({"diff_id": diff_id, "layer_verity": put["layer_verity"]})
            # every PutLayer into the handle used its one pool of workers (not one per layer)
            workers = worker_children()
            assert 1 <= len(workers) <= default_jobs()
            inspected = (await client.call(OCI + "Inspect", {"handle": src, "image": "img"})).parameters
            final = (await client.call(OCI + "FinalizeImage", {
                "handle": dst, "manifest_json": inspected["manifest"], "config_json": inspected["config"],
                "layers": refs, "name": "copy"})).parameters
            assert final["manifest_digest"] == built.manifest_digest
            assert final["config_digest"] == built.config_digest
            again = (await client.call(OCI + "FinalizeImage", {
                "handle": dst, "manifest_json": inspected["manifest"], "config_json": inspected["config"],
                "layers": refs, "name": "copy"})).parameters
            assert again == final
            copied = (await client.call(OCI + "Inspect", {"handle": dst, "image": "copy"})).parameters
            assert copied["manifest"] == inspected["manifest"] and copied["composefs_erofs"] == inspected["composefs_erofs"]
            # CloseRepository returns once the handle's workers are gone
            await client.call(REPO + "CloseRepository", {"handle": dst})
            assert worker_children() == []

    trio.run(main)
    for diff_id in built.diff_ids:
        assert layer_bytes(tmp_path / "dest", diff_id) == layer_bytes(repo_path, diff_id)


def _edited(raw: str, edit) -> str:
    doc = json.loads(raw)
    edit(doc)
    return json.dumps(doc)


def test_finalize_refuses_a_manifest_and_config_that_are_not_one_image(source_repo, tmp_path) -> None:
    """A config of one's own under a genuine manifest (its digest is what a user pins), or a
    manifest listing fewer layers than the config: InvalidRequest, nothing tagged (both were
    committed and tagged, and fsck said ok)."""
    repo_path, built = source_repo
    Repository.init(tmp_path / "dest").close()

    def evil(config: dict) -> None:
        config.setdefault("config", {})["Entrypoint"] = ["/bin/evil"]

    async def main() -> None:
        async with service() as (_, client):
            src = await open_repo(client, repo_path)
            dst = await open_repo(client, tmp_path / "dest")
            refs = [{"diff_id": d, "layer_verity": (await relay(client, src, dst, d))["layer_verity"]}
                    for d in built.diff_ids]
            inspected = (await client.call(OCI + "Inspect", {"handle": src, "image": "img"})).parameters
            forged = _edited(inspected["config"], evil)
            short = _edited(inspected["manifest"], lambda m: m["layers"].pop())
            for manifest, config, why in [
                    (inspected["manifest"], forged, rf"^the manifest names config {built.config_digest}, but the "
                                                    r"config sent is sha256:[0-9a-f]{64} \(\d+ bytes\): they are "
                                                    "not one image$"),
                    (short, inspected["config"], rf"^the manifest lists {len(built.diff_ids) - 1} layers and the "
                                                 rf"config {len(built.diff_ids)} diff_ids: they are not one image$")]:
                with pytest.raises(VarlinkError) as refused:
                    await client.call(OCI + "FinalizeImage", {"handle": dst, "manifest_json": manifest,
                                                              "config_json": config, "layers": refs, "name": "t"})
                assert refused.value.name == OCI + "InvalidRequest"
                assert re.match(why, refused.value.parameters["message"]), refused.value.parameters["message"]
            assert (await client.call(OCI + "ListImages", {"handle": dst})).parameters["images"] == []

    trio.run(main)
    assert not os.path.lexists(tmp_path / "dest/streams/refs/oci/t")


def test_a_copy_by_digest_refuses_a_source_sending_another_manifest(source_repo, tmp_path, monkeypatch) -> None:
    """`oci copy @sha256:X`: a source answering Inspect with another manifest (here one
    annotation added) was copied and tagged as if it were X."""
    from pycfs.host.errors import PycfsError
    from pycfs.host.oci.copy import copy
    from pycfs.host.varlink.oci import OciInterface

    repo_path, built = source_repo
    Repository.init(tmp_path / "dest").close()
    real = OciInterface.inspect

    async def lying(self, ctx) -> dict:
        reply = await real(self, ctx)
        return {**reply, "manifest": _edited(reply["manifest"], lambda m: m.__setitem__("annotations", {"a": "b"}))}

    monkeypatch.setattr(OciInterface, "inspect", lying)
    with pytest.raises(PycfsError, match=rf"^the source sent manifest sha256:[0-9a-f]{{64}} for "
                                         rf"'@{built.manifest_digest}': it is not the image asked for"):
        trio.run(lambda: copy(str(repo_path), None, str(tmp_path / "dest"), "@" + built.manifest_digest, "t", False))
    assert list((tmp_path / "dest").glob("streams/oci-*")) == []  # refused before any layer moved


# ---------------------------------------------------------------------------- hostile peers


def _stream_pipe(data: bytes) -> int:
    """A pipe holding data then EOF; returns the read end."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.write(w, data)
    os.close(w)
    return r


def _tar_with(files: dict[str, bytes]) -> bytes:
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _hostile_cases(d: Path) -> list[tuple[str, bytes, list[int], str, str]]:
    """(what, stream, dir fds, diff_id, expected error)."""
    content = os.urandom(1000)
    (d / "f").write_bytes(content)
    tar = _tar_with({"f": content})
    header, rest = tar[:512], tar[512 + 1000 :]  # the ustar header; then padding and the end marker
    good = sd.encode_metadata(header) + sd.encode_file_backed_data(0, 1000, b"f") + sd.encode_metadata(rest)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    dev = os.open("/dev", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.mkfifo(d / "fifo")
    fb = struct.Struct("<BQII")
    cases = [
        ("truncated stream", good[:-7], [dirfd], diff_id, "InvalidRequest"),
        ("short but chunk-aligned stream", good[: len(sd.encode_metadata(header)) + 18], [dirfd], diff_id, "DiffIdMismatch"),
        ("../ name", sd.encode_metadata(header) + fb.pack(2, 1000, 0, 4) + b"../f", [dirfd], diff_id, "InvalidRequest"),
        ("absolute name", sd.encode_metadata(header) + fb.pack(2, 1000, 0, 12) + b"/etc/passwd\0"[:12], [dirfd], diff_id,
         "InvalidRequest"),
        ("index out of range", sd.encode_metadata(header) + sd.encode_file_backed_data(5, 1000, b"f"), [dirfd], diff_id,
         "InvalidRequest"),
        ("dummy fd used as a directory", good, [null], diff_id, "InvalidRequest"),
        ("wrong declared length", sd.encode_metadata(header) + sd.encode_file_backed_data(0, 999, b"f"), [dirfd], diff_id,
         "InvalidRequest"),
        ("unknown chunk type", b"\x07", [dirfd], diff_id, "InvalidRequest"),
        ("a fifo where a file is expected", sd.encode_metadata(header) + sd.encode_file_backed_data(0, 1000, b"fifo"),
         [dirfd], diff_id, "InvalidRequest"),
        ("a device where a file is expected", sd.encode_metadata(header) + sd.encode_file_backed_data(0, 1000, b"null"),
         [dev], diff_id, "InvalidRequest"),
        ("wrong diff_id", good, [dirfd], "sha256:" + "1" * 64, "DiffIdMismatch"),
    ]
    return cases


@pytest.fixture
def put_into(tmp_path):
    """(a new repository, the hostile cases over files in their own directory); the cases'
    directory fds are closed afterwards."""
    dest = tmp_path / "dest"
    Repository.init(dest).close()
    (tmp_path / "d").mkdir()
    cases = _hostile_cases(tmp_path / "d")
    yield dest, cases
    close_fds(list({fd for case in cases for fd in case[2]}))


def test_hostile_put_layer_commits_nothing_and_leaks_nothing(put_into) -> None:
    dest, cases = put_into

    import threading

    # A writer waiting for the fifo's reader: it would go on if the service opened the fifo.
    fifo = dest.parent / "d" / "fifo"
    opened = threading.Event()
    waiting = threading.Thread(target=lambda: (os.close(os.open(fifo, os.O_WRONLY)), opened.set()), daemon=True)
    waiting.start()
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)

    async def main() -> None:
        async with service() as (_, client):
            before = open_fds()
            handle = await open_repo(client, dest)
            for what, stream, dirs, diff_id, expected in cases:
                pipe = _stream_pipe(stream)
                try:
                    with pytest.raises(VarlinkError) as e:
                        await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": diff_id, "zerocopy": False},
                                          [pipe, *dirs])
                finally:
                    os.close(pipe)
                assert e.value.name == OCI + expected, what
                if expected == "DiffIdMismatch":
                    assert e.value.parameters["expected"] == diff_id, what
                with Repository.open(dest, writable=False) as repo:
                    assert repo.has_stream(f"oci-layer-{diff_id}") is None, what
            for fds, params, name in [
                ([], {"diff_id": cases[0][3], "zerocopy": False}, "InvalidRequest"),
                ([cases[0][2][0]], {"diff_id": cases[0][3], "zerocopy": False}, "InvalidRequest"),
                ([cases[0][2][0], cases[0][2][0]], {"diff_id": "sha256:bad", "zerocopy": False}, "InvalidDigest"),
                ([cases[0][2][0], cases[0][2][0]], {"diff_id": cases[0][3], "zerocopy": False}, "InvalidRequest"),
                ([pipe_w, cases[0][2][0]], {"diff_id": cases[0][3], "zerocopy": False}, "InvalidRequest"),  # write end
            ]:
                with pytest.raises(VarlinkError) as e:
                    await client.call(OCI + "PutLayer", {"handle": handle, **params}, fds)
                assert e.value.name == OCI + name
            # the right stream after all that still goes in
            what, stream, dirs, diff_id, _ = cases[-1]
            good_diff_id = cases[0][3]
            pipe = _stream_pipe(stream)
            put = await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": good_diff_id, "zerocopy": False},
                                    [pipe, *dirs])
            os.close(pipe)
            # the failed attempts left the object behind (an orphan for gc), never a stream
            assert put.parameters["objects_already_present"] == 1
            with Repository.open(dest, writable=False) as repo:
                assert repo.has_stream(f"oci-layer-{good_diff_id}").hex() == put.parameters["layer_verity"]
            await client.call(REPO + "CloseRepository", {"handle": handle})
            assert open_fds() == before

    try:
        trio.run(main)
        assert not opened.is_set()  # the fifo was refused without being opened
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the waiting writer go
        waiting.join(10)
        close_fds([pipe_r, pipe_w])


def test_put_layer_opening_a_file_that_hangs_blocks_no_one_and_is_refused_in_time(put_into, monkeypatch) -> None:
    """An open that does not return (a directory fd on a FUSE mount whose server stopped;
    here the open itself, held): other clients are served meanwhile, the call is refused
    after OPEN_LIMIT with nothing committed, and what the open returns late is closed."""
    import threading

    from pycfs.host.varlink import transfer

    monkeypatch.setattr(transfer, "OPEN_LIMIT", 0.5)
    dest, cases = put_into
    _, stream, dirs, diff_id, _ = cases[-1]
    diff_id = cases[0][3]
    held, entered = threading.Event(), threading.Event()
    real_open = transfer.open_beneath

    def hanging_open(dirfd: int, name: bytes):
        entered.set()
        held.wait(30)
        return real_open(dirfd, name)

    monkeypatch.setattr(transfer, "open_beneath", hanging_open)

    async def main() -> None:
        async with service() as (server, client):
            before = open_fds()
            handle = await open_repo(client, dest)
            conn, sock = socketpair()
            server.nursery.start_soon(server.serve_connection, sock)
            other = Client(conn)
            pipe = _stream_pipe(stream)
            async with trio.open_nursery() as nursery:
                async def put() -> None:
                    with pytest.raises(VarlinkError) as refused:
                        await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": diff_id, "zerocopy": False},
                                          [pipe, *dirs])
                    assert refused.value.name == OCI + "InvalidRequest"
                    assert "opening the layer's files took more than" in refused.value.parameters["message"]
                nursery.start_soon(put)
                await trio.to_thread.run_sync(entered.wait, 10)
                with trio.fail_after(0.4):  # while the open hangs
                    assert (await other.call(OCI + "GetInfo")).parameters["features"] == ["splitdirfdstream-v0"]
            os.close(pipe)
            with Repository.open(dest, writable=False) as repo:
                assert repo.has_stream(f"oci-layer-{diff_id}") is None
            held.set()  # the open returns at last: its fd is closed, not kept
            await trio.sleep(0.3)
            other.close()
            await client.call(REPO + "CloseRepository", {"handle": handle})
            assert open_fds() == before

    trio.run(main)


def test_put_layer_whose_pipe_falls_silent_is_refused(put_into, monkeypatch) -> None:
    """A producer that writes part of a stream and then neither writes nor closes its pipe:
    the call ends (before: it waited for good), commits nothing and leaks nothing."""
    from pycfs.host.varlink import transfer

    monkeypatch.setattr(transfer, "SILENCE_LIMIT", 0.5)
    dest, cases = put_into
    _, stream, dirs, diff_id, _ = cases[-1]

    async def main() -> None:
        async with service() as (_, client):
            before = open_fds()
            handle = await open_repo(client, dest)
            r, w = os.pipe2(os.O_CLOEXEC)
            os.write(w, stream[: len(stream) // 2])
            try:
                with trio.fail_after(20), pytest.raises(VarlinkError) as e:
                    await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": diff_id, "zerocopy": False},
                                      [r, *dirs])
            finally:
                close_fds([r, w])
            assert e.value.name == OCI + "InvalidRequest"
            with Repository.open(dest, writable=False) as repo:
                assert repo.has_stream(f"oci-layer-{diff_id}") is None
            await client.call(REPO + "CloseRepository", {"handle": handle})
            assert open_fds() == before

    trio.run(main)


def test_thousand_calls_with_fds_leak_nothing(tmp_path) -> None:
    Repository.init(tmp_path / "repo").close()

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, tmp_path / "repo")
            r, w = os.pipe2(os.O_CLOEXEC)
            before = open_fds()
            for i in range(1000):
                with pytest.raises(VarlinkError) as e:
                    await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": f"sha256:{i}", "zerocopy": True},
                                      [r, w, r])
                assert e.value.name == OCI + "InvalidDigest"
            assert open_fds() == before
            assert len(server.nursery.child_tasks) == 1  # no task left behind either
            close_fds([r, w])

    trio.run(main)


def test_disconnect_mid_call_cancels_and_closes_fds(tmp_path) -> None:
    Repository.init(tmp_path / "repo").close()
    diff_id = "sha256:" + "2" * 64

    async def main() -> None:
        async with open_service() as server:
            conn, sock = socketpair()
            server.nursery.start_soon(server.serve_connection, sock)
            client = Client(conn)
            handle = await open_repo(client, tmp_path / "repo")
            before = open_fds() - 2  # the client's socket and its server end
            r, w = os.pipe2(os.O_CLOEXEC)
            d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.write(w, sd.encode_metadata(b"partial"))
            await conn.send({"method": OCI + "PutLayer",
                             "parameters": {"handle": handle, "diff_id": diff_id, "zerocopy": False}}, [r, d])
            close_fds([r, d])
            await trio.sleep(0.2)  # the server is now blocked reading the pipe, which never ends
            assert server.connections == 1
            client.close()
            with trio.fail_after(5):
                while server.connections:
                    await trio.sleep(0.01)
            # the server closed its copy of the read end: the pipe has no reader left
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")
            os.close(w)
            assert open_fds() == before
            with Repository.open(tmp_path / "repo", writable=False) as repo:
                assert repo.has_stream(f"oci-layer-{diff_id}") is None

    trio.run(main)


def test_protocol_breach_drops_only_that_connection() -> None:
    async def main() -> None:
        async with open_service() as server:
            a, b = socket.socketpair()
            server.nursery.start_soon(server.serve_connection, trio.socket.from_stdlib_socket(b))
            conn, sock = socketpair()
            server.nursery.start_soon(server.serve_connection, sock)
            client = Client(conn)
            a.sendall(b"{not json}\0")
            with trio.fail_after(5):
                data = await trio.to_thread.run_sync(a.recv, 100)
            assert data == b""  # dropped
            a.close()
            assert (await client.call(OCI + "GetInfo")).parameters["features"] == ["splitdirfdstream-v0"]
            client.close()

    trio.run(main)


def test_json_on_the_wire_is_what_cfsctl_sends() -> None:
    msg = {"method": OCI + "GetLayer", "parameters": {"handle": 1, "params": {"diff_id": "sha256:ab"}}, "more": True}
    raw = encode(msg)
    assert raw.endswith(b"\0") and json.loads(raw[:-1]) == msg


def test_pull_streams_frames_and_one_completed(source_repo, tmp_path) -> None:
    _, built = source_repo
    Repository.init(tmp_path / "repo").close()

    async def main() -> None:
        async with service() as (_, client):
            handle = await open_repo(client, tmp_path / "repo")
            frames = [r.parameters async for r in client.call_more(OCI + "Pull", {
                "handle": handle, "image": f"oci:{built.path}", "name": "pulled", "local_fetch": "disabled",
                "storage_root": None, "bootable": False})]
            assert [f for f in frames if "completed" in f] == frames[-1:]
            done = frames[-1]["completed"]
            assert done["manifest_digest"] == built.manifest_digest and done["config_digest"] == built.config_digest
            assert len(done["manifest_verity"]) == 64 and done["stats"]["layers"] == 2
            for frame in frames[:-1]:
                assert len(frame) == 1 and next(iter(frame)) in ("started", "progress", "skipped", "done", "message")
            images = (await client.call(OCI + "ListImages", {"handle": handle})).parameters["images"]
            assert [(i["name"], i["manifest_digest"]) for i in images] == [("pulled", built.manifest_digest)]
            # without more: only the completed frame
            again = await client.call(OCI + "Pull", {"handle": handle, "image": f"oci:{built.path}", "name": "pulled",
                                                     "local_fetch": "disabled", "bootable": False})
            assert again.parameters["completed"]["manifest_digest"] == built.manifest_digest
            with pytest.raises(VarlinkError) as e:
                await client.call(OCI + "Pull", {"handle": handle, "image": "oci:/nonexistent/path/nope",
                                                 "local_fetch": "disabled", "bootable": False})
            assert e.value.name == OCI + "InternalError"
            tagged = (await client.call(OCI + "Tag", {"handle": handle, "manifest_digest": built.manifest_digest,
                                                      "name": "second"})).parameters
            assert tagged == {}
            await client.call(OCI + "Untag", {"handle": handle, "name": "pulled"})
            names = [i["name"] for i in (await client.call(OCI + "ListImages", {"handle": handle})).parameters["images"]]
            assert names == ["second"]
            check = (await client.call(OCI + "Check", {"handle": handle})).parameters
            assert check["ok"] and check["images_checked"] == 1 and check["repo"]["ok"]
            image_id = (await client.call(OCI + "ComputeId", {"handle": handle, "image": "second", "bootable": False}))
            with Repository.open(tmp_path / "repo", writable=False) as repo:
                from pycfs.host.oci.image import compute_image_id

                assert image_id.parameters["image_id"] == compute_image_id(repo, "second").hex()

    trio.run(main)


def test_zerocopy_shares_or_refuses_never_copies(source_repo, tmp_path) -> None:
    repo_path, built = source_repo
    Repository.init(tmp_path / "dest").close()

    async def main() -> None:
        async with service() as (_, client):
            src = await open_repo(client, repo_path)
            dst = await open_repo(client, tmp_path / "dest")
            diff_id = built.diff_ids[1]  # the layer with large files
            put = await relay(client, src, dst, diff_id, zerocopy=True)
            assert put["objects_copied"] == 0
            # three files, two distinct contents (big-again is big): both shared, the repeat found present
            assert put["objects_reflinked"] + put["objects_hardlinked"] == 2 and put["objects_already_present"] == 1
        with Repository.open(tmp_path / "dest", writable=False) as dest, Repository.open(repo_path) as src_repo:
            reader = dest.open_stream(f"oci-layer-{diff_id}")
            for object_id in reader.object_refs:
                a, b = os.stat(dest.object_path(object_id)), os.stat(src_repo.object_path(object_id))
                # shared: the same inode (hardlink) or, on a reflinking filesystem, a clone
                assert (a.st_ino == b.st_ino) or put["objects_reflinked"]

    trio.run(main)


def test_a_client_beyond_the_cap_takes_the_slot_of_the_connection_idle_longest(tmp_path, monkeypatch) -> None:
    """Every slot taken: a new client waits while all connections are busy, and takes the
    slot of the one idle longest (past the grace) once there is one: clients that connect
    and send nothing cannot lock others out, and a busy call is never dropped."""
    from pycfs.host.varlink import server as server_module
    from pycfs.host.varlink.server import Interface
    from pycfs.host.varlink.transport import connect, listen

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(server_module, "IDLE_GRACE", 0.2)
    releases = [trio.Event(), trio.Event()]

    async def slow(ctx) -> dict:
        await releases[ctx.params.integer("n")].wait()
        return {"done": True}

    async def main() -> None:
        listener = listen(f"unix:{tmp_path / 'sock'}")
        async with open_service() as server:
            server.add(Interface("org.example.slow", "interface org.example.slow\nmethod Wait(n: int) -> (done: bool)\n",
                                 {"Wait": slow}))
            server.nursery.start_soon(server.serve_listener, listener)
            a = Client(await connect(f"unix:{tmp_path / 'sock'}"))
            b = Client(await connect(f"unix:{tmp_path / 'sock'}"))
            await a.conn.send({"method": "org.example.slow.Wait", "parameters": {"n": 0}})
            await b.conn.send({"method": "org.example.slow.Wait", "parameters": {"n": 1}})
            c = Client(await connect(f"unix:{tmp_path / 'sock'}"))
            await c.conn.send({"method": OCI + "GetInfo"})
            with trio.move_on_after(0.6) as waited:
                await c.conn.receive()
            assert waited.cancelled_caught  # both busy: not accepted yet
            releases[0].set()  # a answered: idle from now on, and b a little later
            with trio.fail_after(5):
                assert (await a.conn.receive())[0] == {"parameters": {"done": True}}
                await trio.sleep(0.05)
                releases[1].set()
                assert (await b.conn.receive())[0] == {"parameters": {"done": True}}
                reply = await c.conn.receive()  # in a's slot, a's grace over
            assert reply is not None and reply[0] == {"parameters": {"features": ["splitdirfdstream-v0"]}}
            with trio.fail_after(5):
                assert await a.conn.receive() is None  # a, idle longest, was closed for c
            assert (await b.call(OCI + "GetInfo")).parameters["features"] == ["splitdirfdstream-v0"]
            for client in (a, b, c):
                client.close()
        listener.close()  # (after the service: its listener task waits on it)

    trio.run(main)


def test_names_that_are_not_utf8_never_break_a_reply_or_the_service(source_repo, tmp_path) -> None:
    """A repository someone else wrote names that are not UTF-8 text (a tag, an image ref, a
    stray file among the objects): JSON cannot carry them. Listings leave them out, fsck and
    gc name them escaped, a reply that would still hold one becomes a named error, and the
    connection serves on."""
    import shutil

    from pycfs.host.varlink.server import Interface

    repo = tmp_path / "repo"
    shutil.copytree(source_repo[0], repo, symlinks=True)
    tag_target = os.readlink(repo / "streams/refs/oci/img")
    os.symlink(tag_target.encode(), bytes(repo / "streams/refs/oci") + b"/bad\xff")
    image = next(p.name for p in (repo / "images").iterdir() if p.name != "refs")
    (repo / "images/refs").mkdir(exist_ok=True)
    os.symlink(f"../{image}".encode(), bytes(repo / "images/refs") + b"/ref\xfe")
    sub = next(p for p in (repo / "objects").iterdir() if len(p.name) == 2)
    (Path(os.fsdecode(bytes(sub) + b"/junk\xfd"))).write_bytes(b"")

    async def bad_name(ctx) -> dict:
        return {"name": "x\udcff"}

    async def main() -> None:
        async with service() as (server, client):
            server.add(Interface("org.example.test", "interface org.example.test\nmethod Name() -> (name: string)\n",
                                 {"Name": bad_name}))
            with pytest.raises(VarlinkError) as refused:
                await client.call("org.example.test.Name")
            assert refused.value.name == "org.example.test.InternalError"
            assert "not UTF-8 text ('{\"parameters\":{\"name\":\"x\\udcff\"}}" in refused.value.parameters["message"]
            handle = await open_repo(client, repo)
            images = (await client.call(OCI + "ListImages", {"handle": handle})).parameters["images"]
            assert [i["name"] for i in images] == ["img"]
            refs = (await client.call(REPO + "ListImageRefs", {"handle": handle})).parameters["images"]
            assert refs == []
            fsck = (await client.call(REPO + "Fsck", {"handle": handle})).parameters
            assert not fsck["ok"] and sorted(fsck["errors"]) == sorted([
                f"fsck: object-invalid-name: objects/{sub.name}/junk\\xfd: name is not a digest",
                "fsck: name-not-utf8: images/refs/ref\\xfe: a name pycfs and composefs-rs never make (not UTF-8 "
                "text): no tool lists it",
                "fsck: name-not-utf8: streams/refs/oci/bad\\xff: a name pycfs and composefs-rs never make (not "
                "UTF-8 text): no tool lists it"])
            with pytest.raises(VarlinkError, match=rf"gc: unexpected entry objects/{sub.name}/junk\\xfd; nothing was removed: run "):
                await client.call(REPO + "Gc", {"handle": handle, "dry_run": True, "roots": []})
            assert (await client.call(OCI + "GetInfo")).parameters["features"] == ["splitdirfdstream-v0"]

    trio.run(main)


def test_no_call_is_read_past_one_with_fds_and_a_hang_up_cancels_the_call(monkeypatch) -> None:
    """A slow call with fds, five more queued behind it: the service holds only the first
    call's fd (the rest stay in the socket, not in its table), and when the client hangs
    up the running call is cancelled and every fd is closed."""
    from pycfs.host.varlink import server as server_module
    from pycfs.host.varlink.server import Interface

    monkeypatch.setattr(server_module, "HANGUP_POLL", 0.1)
    started, cancelled = trio.Event(), trio.Event()

    async def slow(ctx) -> dict:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def main() -> None:
        async with service() as (server, client):
            server.add(Interface("org.example.slow", "interface org.example.slow\nmethod Wait() -> ()\n",
                                 {"Wait": slow}))
            before = open_fds()
            r, w = os.pipe()
            await client.conn.send({"method": "org.example.slow.Wait"}, [r])
            for _ in range(5):
                await client.conn.send({"method": "org.example.slow.Wait"}, [r, w])
            close_fds([r, w])  # (in flight they are in no process's table)
            with trio.fail_after(5):
                await started.wait()
            await trio.sleep(0.3)
            assert open_fds() == before + 1  # the running call's fd only
            client.close()
            with trio.fail_after(5):
                await cancelled.wait()
            await trio.sleep(0.1)
            assert open_fds() == before - 2  # and the socketpair's two ends

    trio.run(main)


def test_handles_are_bounded_and_share_one_pool_per_repository(source_repo, tmp_path, monkeypatch) -> None:
    """Handles outlive the connection that opened them (another may use them), but not
    without bound: past MAX_HANDLES the one no connected client used for longest is closed
    for the next, and a client holding them all is told to close one. Many handles on one
    repository share its one pool of object workers."""
    from pycfs.host.varlink import service as service_module
    from pycfs.host.varlink.transport import socketpair as new_socketpair

    monkeypatch.setattr(service_module, "MAX_HANDLES", 3)
    repo_path, built = source_repo
    dest = tmp_path / "dest"
    Repository.init(dest).close()

    async def main() -> None:
        async with service() as (server, client):
            def connect() -> Client:
                conn, sock = new_socketpair()
                server.nursery.start_soon(server.serve_connection, sock)
                return Client(conn)

            src = await open_repo(client, repo_path)
            dests = [await open_repo(client, dest) for _ in range(2)]
            for handle in dests:  # two handles, one repository: one pool
                for diff_id in built.diff_ids:
                    await relay(client, src, handle, diff_id)
            assert 1 <= len(worker_children()) <= default_jobs()
            with pytest.raises(VarlinkError) as full:
                await open_repo(client, dest)
            assert full.value.name == REPO + "RepoNotFound" and "close one (CloseRepository)" in str(full.value)
            other = connect()
            await other.call(OCI + "HasLayer", {"handle": src, "diff_id": built.diff_ids[0]})  # src used by other too
            client.close()  # dests[0] is now used by no connected client, longest unused: it goes
            third = connect()
            fresh = await open_repo(third, dest)
            with pytest.raises(VarlinkError) as gone:
                await third.call(OCI + "HasLayer", {"handle": dests[0], "diff_id": built.diff_ids[0]})
            assert gone.value.name == OCI + "InvalidHandle"
            for handle in (src, dests[1], fresh):  # src kept: a connected client used it
                assert (await third.call(OCI + "HasLayer", {"handle": handle, "diff_id": built.diff_ids[0]})
                        ).parameters["present"]
            for handle in (dests[1], fresh):
                await third.call(REPO + "CloseRepository", {"handle": handle})
            assert worker_children() == []  # the repository's last handle closed: its pool stopped
            other.close()
            third.close()

    trio.run(main)


def test_put_layer_of_more_inline_bytes_than_a_layer_holds_is_refused(put_into, monkeypatch) -> None:
    """A stream of inline bytes and no file past the layer stream's cap: InvalidRequest
    naming it, nothing committed (before, the service held all of it: 1 GiB took 1.1 GB)."""
    from pycfs.host import splitstream

    monkeypatch.setattr(splitstream, "MAX_LAYER_INLINE_RUN", 1 << 20)
    dest, cases = put_into
    diff_id = "sha256:" + "0" * 64
    stream = b"".join(sd.encode_metadata(os.urandom(64 << 10)) for _ in range(40))  # 2.5 MiB

    async def main() -> None:
        async with service() as (_, client):
            before = open_fds()
            handle = await open_repo(client, dest)
            r, w = os.pipe2(os.O_CLOEXEC)

            def feed() -> None:
                try:
                    os.write(w, stream)
                except BrokenPipeError:
                    pass  # refused before the end
                finally:
                    os.close(w)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, feed)
                with pytest.raises(VarlinkError) as refused:
                    await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": diff_id, "zerocopy": False},
                                      [r, cases[0][2][0]])
                os.close(r)
            assert refused.value.name == OCI + "InvalidRequest"
            assert "more than 1 MiB of tar headers and small files" in refused.value.parameters["message"]
            with Repository.open(dest, writable=False) as repo:
                assert repo.has_stream(f"oci-layer-{diff_id}") is None
            await client.call(REPO + "CloseRepository", {"handle": handle})
            assert open_fds() == before

    trio.run(main)


def test_put_layer_takes_a_long_inline_chunk_as_it_comes(tmp_path) -> None:
    """A file's content sent inline (InlineData: the containers-storage producer sends a
    file only its helper can read that way) of 24 MiB: stored as one file, the layer
    committed, and never held whole here (before: about five copies, 1.34 GB of RSS for
    one of 256 MiB)."""
    import threading
    import tracemalloc

    dest = tmp_path / "dest"
    Repository.init(dest).close()
    content = os.urandom(24 << 20)
    tar = _tar_with({"f": content})
    header, rest = tar[:512], tar[512 + len(content):]
    stream = sd.encode_metadata(header) + sd.encode_inline_data(content) + sd.encode_metadata(rest)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    r, w = os.pipe2(os.O_CLOEXEC)
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def feed() -> None:
        with memoryview(stream) as view:
            for start in range(0, len(stream), 1 << 16):
                os.write(w, view[start : start + (1 << 16)])
        os.close(w)

    async def main() -> dict:
        async with service() as (_, client):
            handle = await open_repo(client, dest)
            writer = threading.Thread(target=feed)
            writer.start()
            tracemalloc.start()
            try:
                put = await client.call(OCI + "PutLayer", {"handle": handle, "diff_id": diff_id, "zerocopy": False},
                                        [r, dirfd])
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
                writer.join()
            assert peak < 8 << 20, peak
            return put.parameters

    try:
        put = trio.run(main)
    finally:
        close_fds([r, dirfd])
    assert put["objects_copied"] + put["objects_reflinked"] == 1
    assert layer_bytes(dest, diff_id) == tar


def test_listen_takes_no_address_a_busy_service_still_holds(tmp_path) -> None:
    """The probe took any failure to connect for a stale file: a live service whose backlog
    was full (EAGAIN) had its socket unlinked and its address taken."""
    import socket as socket_module

    from pycfs.host.errors import PycfsError
    from pycfs.host.varlink.transport import listen

    path = str(tmp_path / "s.sock")
    live = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    live.bind(path)
    live.listen(0)
    clients = []
    try:
        while True:  # fill the backlog: the next connect fails with EAGAIN
            c = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
            c.setblocking(False)
            clients.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        inode = os.stat(path).st_ino
        with pytest.raises(PycfsError, match=r"is a socket something may still listen on"):
            listen(f"unix:{path}")
        assert os.stat(path).st_ino == inode
    finally:
        for c in clients:
            c.close()
        live.close()
