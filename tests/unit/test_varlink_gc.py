"""The varlink service's Gc against the same service's calls on the repository: it waits for
them (they held no lock gc could see: its flock is the one the handle holds), they wait for
it, and its own object workers let go of the repository first. Also the readers/writer lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import imagebuild
import pytest
import trio
import trio.testing
from pycfs.host.erofs.objects import image_object_ids
from pycfs.host.oci.pull import PullOptions, pull
from pycfs.host.oci.streams import config_stream_name, open_image
from pycfs.host.repository import Repository
from pycfs.host.varlink.client import Client
from pycfs.host.varlink.layers import reconstruct
from pycfs.host.varlink.rwlock import RWLock
from pycfs.host.varlink.transport import socketpair
from pycfs.protocol import splitdirfdstream as sd
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.varlink import VarlinkError
from pycfs.tools.cli import main as cli_main
from test_varlink_service import (
    OCI, REPO, get_layer, layer_bytes, open_repo, read_all, relay, service, source_repo, worker_children,
)

__all__ = ["source_repo"]  # (a fixture, used here)
GC = REPO + "Gc"
# How long a Gc that should wait is given to (wrongly) finish
EARLY = 3.0


def missing_objects(repo_path: Path, tag: str) -> list[str]:
    """What the tag needs and the repository lacks: its streams, their objects, its images' objects."""
    with Repository.open(repo_path, writable=False) as repo:
        image = open_image(repo, tag)
        missing = [f"layer {d} object {o.hex()}" for d, layer in image.layer_ids.items()
                   for o in repo.open_stream_by_id(layer).object_refs if not repo.has_object(o)]
        for name, image_id in image.image_refs.items():
            missing += [f"{name} object {o.hex()}" for o in image_object_ids(repo.image_bytes(image_id), repo.alg)
                        if not repo.has_object(o)]
        return missing


def object_count(repo_path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(repo_path / "objects"))


def untagged_copy(src: Path, dst: Path) -> Path:
    """A copy of the repository with no refs: gc would remove all of it."""
    shutil.copytree(src, dst, symlinks=True)
    for top in ("streams/refs", "images/refs"):
        shutil.rmtree(dst / top, ignore_errors=True)
    return dst


def connect(server) -> Client:
    conn, sock = socketpair()
    server.nursery.start_soon(server.serve_connection, sock)
    return Client(conn)


def paused(monkeypatch, module, name: str) -> tuple[threading.Event, threading.Event]:
    """Patch module.name (run in a thread) to stop once reached until let go: (reached, go)."""
    real = getattr(module, name)
    reached, go = threading.Event(), threading.Event()

    def stopping(*args, **kwargs):
        reached.set()
        assert go.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stopping)
    return reached, go


async def until(event: threading.Event) -> None:
    with trio.fail_after(60):
        while not event.is_set():
            await trio.sleep(0.01)


def start_gc(client: Client, handle: int, nursery: trio.Nursery, out: dict) -> None:
    """A Gc call started in nursery; its reply's parameters go to out["gc"]."""
    async def run() -> None:
        out["gc"] = (await client.call(GC, {"handle": handle, "dry_run": False, "roots": []})).parameters

    nursery.start_soon(run)


async def gc_meanwhile(client: Client, handle: int, nursery: trio.Nursery, out: dict) -> bool:
    """Start a Gc; True if it answered within EARLY seconds (it should wait)."""
    done = trio.Event()

    async def run() -> None:
        try:
            out["gc"] = (await client.call(GC, {"handle": handle, "dry_run": False, "roots": []})).parameters["result"]
        except VarlinkError as e:
            out["gc"] = e
        done.set()

    nursery.start_soon(run)
    with trio.move_on_after(EARLY):
        await done.wait()
    return done.is_set()


# ---------------------------------------------------------------------------- Gc waits for calls


def test_gc_waits_for_a_pull_and_spares_its_image(source_repo, tmp_path, monkeypatch) -> None:
    """Before, a Gc while a Pull imported removed the layers just stored (not yet tagged), and
    the Pull answered ok with its tag's objects gone."""
    from pycfs.host.oci import layout

    _, built = source_repo
    Repository.init(tmp_path / "repo").close()
    reached, go = paused(monkeypatch, layout, "finish_pull")  # layers stored, nothing tagged yet
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, tmp_path / "repo")
            other = connect(server)
            async with trio.open_nursery() as nursery:
                async def pulling() -> None:
                    out["pull"] = (await client.call(OCI + "Pull", {
                        "handle": handle, "image": f"oci:{built.path}", "name": "t"})).parameters["completed"]

                nursery.start_soon(pulling)
                await until(reached)
                out["early"] = await gc_meanwhile(other, handle, nursery, out)
                go.set()
            other.close()

    trio.run(main)
    assert not out["early"], out
    assert out["pull"]["manifest_digest"] == built.manifest_digest
    assert out["gc"]["objects_removed"] == 0, out
    assert missing_objects(tmp_path / "repo", "t") == []


def test_gc_waits_for_finalize_image_and_stops_the_object_workers(source_repo, tmp_path, monkeypatch) -> None:
    """A copy's FinalizeImage with a Gc meanwhile: before, the Gc removed the layers it was
    tagging (or, had PutLayer started object workers, waited 600 s for their locks)."""
    from pycfs.host import repository as repository_module
    from pycfs.host.varlink import oci

    monkeypatch.setattr(repository_module, "LOCK_WAIT", 5.0)  # (the old code's wait for the workers, shortened)
    repo_path, built = source_repo
    dest = tmp_path / "dest"
    Repository.init(dest).close()
    reached, go = paused(monkeypatch, oci, "finish_pull")
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            src, dst = await open_repo(client, repo_path), await open_repo(client, dest)
            refs = [{"diff_id": d, "layer_verity": (await relay(client, src, dst, d))["layer_verity"]}
                    for d in built.diff_ids]
            assert worker_children()  # PutLayer's pool: each worker holds the repository's shared flock
            inspected = (await client.call(OCI + "Inspect", {"handle": src, "image": "img"})).parameters
            other = connect(server)
            async with trio.open_nursery() as nursery:
                async def finalizing() -> None:
                    out["final"] = (await client.call(OCI + "FinalizeImage", {
                        "handle": dst, "manifest_json": inspected["manifest"], "config_json": inspected["config"],
                        "layers": refs, "name": "copy"})).parameters

                nursery.start_soon(finalizing)
                await until(reached)
                out["early"] = await gc_meanwhile(other, dst, nursery, out)
                go.set()
            out["workers"] = worker_children()
            other.close()

    trio.run(main)
    assert not out["early"], out
    assert out["final"]["manifest_digest"] == built.manifest_digest
    assert out["gc"]["objects_removed"] == 0, out
    assert out["workers"] == []  # stopped for the Gc
    assert missing_objects(dest, "copy") == []


def test_gc_after_put_layer_stops_the_pool_and_the_next_put_starts_one(source_repo, tmp_path, monkeypatch) -> None:
    """Before, the handle's object workers kept their shared locks until CloseRepository: a
    Gc on the handle waited LOCK_WAIT (600 s) and failed. The layer put stays for the copy's
    FinalizeImage; once the handle is closed, a Gc removes it."""
    from pycfs.host import repository as repository_module

    monkeypatch.setattr(repository_module, "LOCK_WAIT", 5.0)
    repo_path, built = source_repo
    dest = tmp_path / "dest"
    Repository.init(dest).close()
    diff_id = built.diff_ids[-1]

    async def main() -> None:
        async with service() as (_, client):
            src, dst = await open_repo(client, repo_path), await open_repo(client, dest)
            await relay(client, src, dst, diff_id)
            assert worker_children()
            stored = object_count(dest)
            assert stored > 0
            with trio.fail_after(60):
                result = (await client.call(GC, {"handle": dst, "dry_run": False, "roots": []})).parameters["result"]
            assert result["objects_removed"] == 0 and object_count(dest) == stored  # kept for a FinalizeImage
            assert worker_children() == []
            await client.call(REPO + "CloseRepository", {"handle": dst})
            dst = await open_repo(client, dest)
            result = (await client.call(GC, {"handle": dst, "dry_run": False, "roots": []})).parameters["result"]
            assert result["objects_removed"] == stored and object_count(dest) == 0  # nothing tagged it
            put = await relay(client, src, dst, diff_id)  # a new pool
            assert not put["already_present"] and worker_children()

    trio.run(main)
    assert layer_bytes(dest, diff_id) == layer_bytes(repo_path, diff_id)


@pytest.mark.parametrize("how", ["put", "has"])
def test_a_gc_between_a_copys_layers_and_its_finalize_image_keeps_the_layers(source_repo, tmp_path, how) -> None:
    """A copy's layers are named by nothing until FinalizeImage: before, a Gc from another
    connection on the same handle removed them in between (put by PutLayer, or found by
    HasLayer, the copy then putting nothing) and FinalizeImage failed with NoSuchLayer."""
    repo_path, built = source_repo
    dest = tmp_path / "dest"
    if how == "has":
        untagged_copy(repo_path, dest)  # the layers are there, nothing names them
    else:
        Repository.init(dest).close()
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            src, dst = await open_repo(client, repo_path), await open_repo(client, dest)
            refs = []
            for d in built.diff_ids:
                if how == "has":
                    has = (await client.call(OCI + "HasLayer", {"handle": dst, "diff_id": d})).parameters
                    assert has["present"]
                    refs.append({"diff_id": d, "layer_verity": has["layer_verity"]})
                else:
                    refs.append({"diff_id": d, "layer_verity": (await relay(client, src, dst, d))["layer_verity"]})
            other = connect(server)
            out["gc"] = (await other.call(GC, {"handle": dst, "dry_run": False, "roots": []})).parameters["result"]
            other.close()
            inspected = (await client.call(OCI + "Inspect", {"handle": src, "image": "img"})).parameters
            out["final"] = (await client.call(OCI + "FinalizeImage", {
                "handle": dst, "manifest_json": inspected["manifest"], "config_json": inspected["config"],
                "layers": refs, "name": "copy"})).parameters

    trio.run(main)
    assert out["final"]["manifest_digest"] == built.manifest_digest
    assert missing_objects(dest, "copy") == []
    for d in built.diff_ids:
        assert layer_bytes(dest, d) == layer_bytes(repo_path, d)


def test_a_gc_sees_a_handle_opened_while_it_started(source_repo, tmp_path, monkeypatch) -> None:
    """Gc refuses to run while another handle has its repository open. An OpenRepository
    whose flock came between that check and gc's own made the Gc wait GC_WAIT and blame
    other processes; now the Gc waits for the open and then says which it is."""
    from pycfs.host.varlink import service as service_module

    monkeypatch.setattr(service_module, "GC_WAIT", 2.0)
    repo_path, _ = source_repo
    repo = untagged_copy(repo_path, tmp_path / "repo")
    stored = object_count(repo)
    real_open = Repository.open.__func__
    reached, go = threading.Event(), threading.Event()

    def opening(cls, *args, **kwargs):  # opened (its flock taken), not yet a handle
        opened = real_open(cls, *args, **kwargs)
        if not reached.is_set():
            reached.set()
            assert go.wait(60)
        return opened

    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo)
            monkeypatch.setattr(Repository, "open", classmethod(opening))
            other = connect(server)
            async with trio.open_nursery() as nursery:
                async def second_open() -> None:
                    out["second"] = await open_repo(other, repo)

                nursery.start_soon(second_open)
                await until(reached)

                async def collecting() -> None:
                    try:
                        await client.call(GC, {"handle": handle, "dry_run": False, "roots": []})
                    except VarlinkError as e:
                        out["gc"] = e

                nursery.start_soon(collecting)
                await trio.sleep(0.5)
                go.set()
            other.close()

    trio.run(main)
    assert out["gc"].name == REPO + "InternalError"
    assert out["gc"].parameters["message"] == f"{repo} is open under another handle of this service: close it before gc"
    assert object_count(repo) == stored


def test_gc_waits_until_a_get_layer_client_lets_go_of_the_objects(source_repo, tmp_path) -> None:
    """A GetLayer hands out references into objects/: before, a Gc meanwhile removed them
    under the client (its tar could not be rebuilt)."""
    repo_path, built = source_repo
    repo = untagged_copy(repo_path, tmp_path / "repo")
    diff_id = max(built.diff_ids, key=lambda d: len(layer_bytes(repo, d)))
    stored = object_count(repo)
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo)
            other = connect(server)
            dir_count, fds, _ = await get_layer(client, handle, diff_id)
            try:
                async with trio.open_nursery() as nursery:
                    out["early"] = await gc_meanwhile(other, handle, nursery, out)
                    data = await trio.to_thread.run_sync(read_all, fds[0])
                    rebuilt: list[bytes] = []
                    reconstruct(sd.decode(data), fds[1 : 1 + dir_count], rebuilt.append)
                    out["tar"] = b"".join(rebuilt)
                    close_fds(fds)  # the keep-alive too: the Gc may go on
                    fds.clear()
            finally:
                close_fds(fds)
            other.close()

    expected = layer_bytes(repo, diff_id)
    trio.run(main)
    assert not out["early"], out
    assert out["tar"] == expected
    assert out["gc"]["objects_removed"] == stored and object_count(repo) == 0


def test_two_gc_calls_run_one_after_the_other(source_repo, tmp_path, monkeypatch) -> None:
    """Both took the 'exclusive' flock of one open file and deleted side by side (one then
    failed on what the other had removed)."""
    from pycfs.host import gc as gc_module

    repo_path, _ = source_repo
    repo = untagged_copy(repo_path, tmp_path / "repo")
    stored = object_count(repo)
    real = gc_module.gc
    running, most = [0], [0]
    lock = threading.Lock()

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            threading.Event().wait(0.5)  # (long enough for another to start beside it)
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(gc_module, "gc", counting)
    results: list = []

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo)
            clients = [client, connect(server)]

            async def one(c: Client) -> None:
                results.append((await c.call(GC, {"handle": handle, "dry_run": False, "roots": []})).parameters)

            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(one, c)
            clients[1].close()

    trio.run(main)
    assert most[0] == 1
    assert sorted(r["result"]["objects_removed"] for r in results) == [0, stored]


def test_calls_wait_for_a_gc_and_a_gc_waits_at_most_its_limit(source_repo, tmp_path, monkeypatch) -> None:
    """While a Gc holds the repository, a call on it waits (it would read what gc removes);
    a Gc that cannot have it within GC_WAIT fails, removing nothing."""
    from pycfs.host import gc as gc_module
    from pycfs.host.varlink import service as service_module

    repo_path, built = source_repo
    repo = tmp_path / "repo"
    shutil.copytree(repo_path, repo, symlinks=True)
    reached, go = paused(monkeypatch, gc_module, "gc")
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo)
            other = connect(server)
            async with trio.open_nursery() as nursery:
                start_gc(client, handle, nursery, out)
                await until(reached)
                done = trio.Event()

                async def listing() -> None:
                    out["images"] = (await other.call(OCI + "ListImages", {"handle": handle})).parameters["images"]
                    out["gc_done_first"] = "gc" in out
                    done.set()

                nursery.start_soon(listing)
                with trio.move_on_after(1):
                    await done.wait()
                out["early"] = done.is_set()
                go.set()
            # a GetLayer held (its client keeps the fds): a Gc gives up after GC_WAIT (not
            # CALL_WAIT: calls on the repository wait behind it meanwhile)
            monkeypatch.setattr(service_module, "GC_WAIT", 0.5)
            _, fds, _ = await get_layer(client, handle, built.diff_ids[0])
            try:
                with pytest.raises(VarlinkError) as e:
                    await other.call(GC, {"handle": handle, "dry_run": False, "roots": []})
                out["timeout"] = e.value
                out["after"] = (await other.call(OCI + "ListImages", {"handle": handle})).parameters["images"]
            finally:
                close_fds(fds)
            other.close()

    trio.run(main)
    assert not out["early"] and out["gc_done_first"], out
    assert [i["name"] for i in out["images"]] == ["img"]
    assert out["timeout"].name == REPO + "InternalError"
    assert re.search(r"^gc: .* stayed in use by calls of this service for \d+ s .*; nothing was removed$",
                     out["timeout"].parameters["message"])
    assert [i["name"] for i in out["after"]] == ["img"]  # the Gc that gave up holds nothing
    assert missing_objects(repo, "img") == []


# ---------------------------------------------------------------------------- one broken image


def test_one_broken_image_leaves_the_others_listed(source_repo, tmp_path, capsys) -> None:
    """Before, ListImages and `pycfs oci images` failed as a whole ("object ... is missing")."""
    repo_path, built = source_repo
    repo = tmp_path / "repo"
    shutil.copytree(repo_path, repo, symlinks=True)
    other = imagebuild.build_layout(imagebuild.ImageSpec(layers=[[imagebuild.File("b", data=b"other image")]],
                                                         gzip=False), tmp_path / "layout")
    with Repository.open(repo) as r:
        trio.run(pull, r, f"oci:{other.path}", "b-broken", PullOptions())
    (repo / "streams" / config_stream_name(other.config_digest)).resolve().unlink()

    async def main() -> list:
        async with service() as (_, client):
            handle = await open_repo(client, repo)
            return (await client.call(OCI + "ListImages", {"handle": handle})).parameters["images"]

    images = trio.run(main)
    assert [(i["name"], i["manifest_digest"]) for i in images] == [("img", built.manifest_digest)]
    assert "image 'b-broken' left out, it is broken (object sha256:" in capsys.readouterr().err

    assert cli_main(["--repo", str(repo), "oci", "images", "--json"]) == 1
    out, err = capsys.readouterr()
    listed = json.loads(out)["images"]
    assert [i["tag"] for i in listed] == ["b-broken", "img"]
    assert listed[0]["manifest"] == other.manifest_digest and "is missing from" in listed[0]["error"]
    assert "error" not in listed[1] and listed[1]["manifest"] == built.manifest_digest
    assert err.count("pycfs: error:") == 1 and "pycfs fsck --repair" in err
    assert cli_main(["--repo", str(repo), "oci", "images"]) == 1
    out, _ = capsys.readouterr()
    rows = out.splitlines()
    assert rows[1].startswith("b-broken  sha256:") and "BROKEN: object sha256:" in rows[1]
    assert rows[2].startswith("img       " + built.manifest_digest[:19])


# ---------------------------------------------------------------------------- the lock


def test_rwlock_shares_excludes_prefers_a_waiting_writer_and_bounds_waits() -> None:
    async def main() -> None:
        lock = RWLock()
        order: list[str] = []
        r1 = await lock.acquire(False, 1)
        r2 = await lock.acquire(False, 1)  # shared with r1

        async def take(name: str, exclusive: bool) -> None:
            release = await lock.acquire(exclusive, 100)
            order.append(name)
            await trio.sleep(1)
            release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "writer", True)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, "reader", False)  # came after the waiting writer: goes after it
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and lock.waiting_exclusive == 1 and lock.waiting_shared == 1
            r1()
            r1()  # (again: nothing)
            assert lock.shared == 1
            r2()
        assert order == ["writer", "reader"] and lock.idle

        held = await lock.acquire(True, 1)
        with pytest.raises(trio.TooSlowError):
            await lock.acquire(False, 5)
        with trio.move_on_after(1):  # cancelled while waiting: holds nothing
            await lock.acquire(True, 100)
        assert lock.waiting_exclusive == lock.waiting_shared == 0
        held()
        assert lock.idle
        # an exclusive waiter that gives up lets the shared ones behind it go
        r = await lock.acquire(False, 1)
        async with trio.open_nursery() as nursery:
            async def writer_gives_up() -> None:
                with pytest.raises(trio.TooSlowError):
                    await lock.acquire(True, 2)

            nursery.start_soon(writer_gives_up)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(3):
                (await lock.acquire(False, 10))()
        r()
        assert lock.idle

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_close_repository_during_a_gc_closes_it_after_the_gc(source_repo, tmp_path, monkeypatch) -> None:
    """CloseRepository closed the handle's repository under a running Gc: the Gc failed
    ("file descriptor cannot be a negative integer", a bug line) having dropped its lock
    while it might still delete. Now the repository closes once the last call using it is
    done: the Gc finishes, and another repository opened meanwhile is left alone."""
    from pycfs.host import gc as gc_module

    repo_path, _ = source_repo
    repo = untagged_copy(repo_path, tmp_path / "repo")
    other_repo = untagged_copy(repo_path, tmp_path / "other")
    before = sorted(p.name for p in (other_repo / "objects").rglob("*"))
    reached, go = paused(monkeypatch, gc_module, "_unreachable")
    out: dict = {}

    async def main() -> None:
        async with service() as (server, client):
            handle = await open_repo(client, repo)
            other = connect(server)
            async with trio.open_nursery() as nursery:
                start_gc(other, handle, nursery, out)
                await until(reached)
                await client.call(REPO + "CloseRepository", {"handle": handle})
                await open_repo(client, other_repo)  # (may take the closed fds' numbers)
                go.set()
            other.close()

    trio.run(main)
    assert out["gc"]["result"]["objects_removed"] > 0
    assert sorted(p.name for p in (other_repo / "objects").rglob("*")) == before


def test_a_layer_kept_for_a_handle_closed_meanwhile_breaks_no_later_gc(tmp_path) -> None:
    """A PutLayer ending after another connection closed its handle re-created the handle's
    kept layers: every later Gc, of any repository, failed with KeyError."""
    from pycfs.host.varlink.service import Handles

    async def main() -> None:
        handles = Handles()
        repo = Repository.init(tmp_path / "repo")
        handle = await handles.add(repo, object(), "x")
        handles.close(handle)
        handles.keep_layer(handle, b"\1" * 32)  # (the put's end, after the close)
        other = Repository.init(tmp_path / "other")
        await handles.add(other, object(), "x")
        assert handles.kept_layers(other) == set()
        handles.close_all()

    trio.run(main)
