"""`org.composefs.Repository`: repository handles and the repository-wide operations.

Handles are service-wide (any connection may use any handle, as in cfsctl), start at 1 and
are never reused; the service closes whatever is still open when it stops.

Gc against the service's own calls: every handle holds the repository's flock(LOCK_SH) on its
own fd, and gc upgrades that of its handle, so the repository's flock keeps other processes
out but not this one's calls. A readers/writer lock per repository does: each call that
reads or writes its content holds it shared for its length (a GetLayer until its client lets
go of the objects), Gc exclusive, and only then takes the flock.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.repository import ALGORITHMS, Repository
from pycfs.host.varlink import idl
from pycfs.host.varlink.rwlock import RWLock
from pycfs.host.varlink.server import CallContext, Interface, Result, Server
from pycfs.protocol.text import is_clean_text
from pycfs.protocol.varlink import VarlinkError

if TYPE_CHECKING:  # fsck, gc and mount are imported by the calls that use them: a copy needs none
    from pycfs.host.fsck import FsckReport

IFACE = "org.composefs.Repository"
SYSTEM_REPO = "/sysroot/composefs"

# fsck's error kinds, by the reply counter they add to
_OBJECT_KINDS = {"object-invalid-name", "object-open-failed", "object-verity-missing", "object-digest-mismatch",
                 "unexpected-file"}
_STREAM_KINDS = {"stream-open-failed", "missing-named-ref"}
_IMAGE_KINDS = {"image-invalid"}
_LINK_KINDS = {"broken-symlink", "bad-symlink", "entry-not-symlink", "unexpected-file-type", "image-unlinked"}
_MISSING_KINDS = {"missing-object-ref", "image-missing-object"}


def fsck_reply(repo: Repository, report: FsckReport) -> dict:
    kinds = [k for k, _, _ in report.errors]
    return {
        "ok": report.ok,
        "has_metadata": (repo.path / "meta.json").exists(),
        "objects_checked": report.objects_checked,
        "objects_corrupted": sum(k in _OBJECT_KINDS for k in kinds),
        "streams_checked": report.streams_checked,
        "streams_corrupted": sum(k in _STREAM_KINDS for k in kinds),
        "images_checked": report.images_checked,
        "images_corrupted": sum(k in _IMAGE_KINDS for k in kinds),
        "broken_links": sum(k in _LINK_KINDS for k in kinds),
        "missing_objects": sum(k in _MISSING_KINDS for k in kinds),
        "errors": [f"fsck: {k}: {p}: {d}" for k, p, d in report.errors],
    }


# Repositories open at once. Handles are the service's, not a connection's (cfsctl's model: a
# client may open one and use it from another connection), so a client that leaves does not
# close them; past this many, the handle no connected client has used for longest is closed
# to make room (each holds fds, a lock and perhaps object workers).
MAX_HANDLES = 128
# How long a call waits for a Gc of its repository to end, and a Gc for the calls using it
# (gc then waits as long again for other processes: repository.LOCK_WAIT).
CALL_WAIT = 600.0
# A Gc waits at most this for the service's calls using its repository (new ones wait
# behind it meanwhile: a GetLayer client may hold its fds for an hour), and as long again
# for other processes: the service's calls are held up for two minutes at most.
GC_WAIT = 60.0
# Layer streams kept from a Gc per handle (see Handles.keep_layer); a copy names at most the
# image's layers (1,000), so past this the oldest go.
MAX_KEPT_LAYERS = 4096


class Handles:
    """The open repositories of one service."""

    def __init__(self) -> None:
        self.repos: dict[int, Repository] = {}
        self._next = 1
        # awaited when a handle closes (the service's own shutdown cancels instead)
        self.on_close: list[Callable[[int], Awaitable[None]]] = []
        # per handle: the connections still connected that used it, and when it was last used
        self._users: dict[int, set[object]] = {}
        self._used: dict[int, float] = {}
        # per repository (by identity: many handles may open one), while held or waited for
        self._locks: dict[tuple[int, int], RWLock] = {}
        # awaited by Gc once it holds its repository alone, before gc takes the flock: what
        # keeps a shared flock of the repository in this process (object workers) lets go
        self.before_gc: list[Callable[[Repository], Awaitable[None]]] = []
        # calls holding each open Repository (by id): a handle closed meanwhile closes its
        # repository (its fds, its flock) once the last of them is done, not under them
        self._holders: dict[int, int] = {}
        self._closing: dict[int, Repository] = {}
        # per handle: the layer streams its clients were told are there (HasLayer, PutLayer)
        # that no FinalizeImage has used yet: until then nothing names them, and a Gc must not
        # remove them from under a copy in progress
        self._layers: dict[int, dict[bytes, None]] = {}

    async def add(self, repo: Repository, conn: object, iface: str) -> int:
        if len(self.repos) >= MAX_HANDLES:
            unused = [h for h, users in self._users.items() if not users]
            if not unused:
                repo.close()
                raise VarlinkError(f"{iface}.RepoNotFound", {"message": (
                    f"the service has {len(self.repos)} repositories open, each in use by a connected client: "
                    "close one (CloseRepository) and try again")})
            await self.aclose(min(unused, key=self._used.__getitem__))
        handle, self._next = self._next, self._next + 1
        self.repos[handle] = repo
        self._users[handle] = {conn}
        self._used[handle] = trio.current_time()
        return handle

    def get(self, ctx: CallContext, iface: str) -> Repository:
        handle = ctx.params.integer("handle")
        repo = self.repos.get(handle)
        if repo is None:
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        self._users[handle].add(ctx.conn)
        self._used[handle] = trio.current_time()
        return repo

    async def _acquire(self, key: tuple[int, int], path: object, exclusive: bool) -> Callable[[], None]:
        """The repository's readers/writer lock (by identity), held; the release, once only."""
        lock = self._locks.setdefault(key, RWLock())

        def forget_idle() -> None:
            if lock.idle and self._locks.get(key) is lock:
                del self._locks[key]

        try:
            release = await lock.acquire(exclusive, GC_WAIT if exclusive else CALL_WAIT)
        except trio.TooSlowError:
            if exclusive:
                raise PycfsError(f"gc: {path} stayed in use by calls of this service for {GC_WAIT:.0f} s (a pull, "
                                 "a layer transfer, a client holding a GetLayer's fds); nothing was removed") from None
            raise PycfsError(f"{path} stayed locked by a Gc of this service for {CALL_WAIT:.0f} s: "
                             "try again once it is done") from None
        finally:
            forget_idle()
        finished = False

        def done() -> None:
            nonlocal finished
            if not finished:
                finished = True
                release()
                forget_idle()

        return done

    @asynccontextmanager
    async def opening(self, path: str) -> AsyncIterator[None]:
        """Held while OpenRepository opens path and adds its handle: a Gc, which refuses to run
        while another handle has its repository open, then sees the new handle instead of
        waiting GC_WAIT for the flock it took meanwhile."""
        try:  # (in a thread: a path on a stopped FUSE mount must not stop the service)
            st = await trio.to_thread.run_sync(os.stat, path)
        except OSError:  # Repository.open says what is wrong
            yield
            return
        release = await self._acquire((st.st_dev, st.st_ino), path, exclusive=False)
        try:
            yield
        finally:
            release()

    async def hold(self, ctx: CallContext, iface: str, exclusive: bool = False) -> tuple[Repository, Callable[[], None]]:
        """The handle's repository, held (shared, or exclusive for Gc), and the release;
        waits at most CALL_WAIT."""
        repo = self.get(ctx, iface)
        release = await self._acquire(identity(repo), repo.path, exclusive)
        self._holders[id(repo)] = self._holders.get(id(repo), 0) + 1
        finished = False

        def done() -> None:  # (again: nothing, as release)
            nonlocal finished
            if finished:
                return
            finished = True
            release()
            left = self._holders[id(repo)] - 1
            if left:
                self._holders[id(repo)] = left
                return
            del self._holders[id(repo)]
            closing = self._closing.pop(id(repo), None)
            if closing is not None:
                closing.close()

        handle = ctx.params.integer("handle")
        if self.repos.get(handle) is not repo:  # closed while the call waited
            done()
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        return repo, done

    @asynccontextmanager
    async def using(self, ctx: CallContext, iface: str, exclusive: bool = False) -> AsyncIterator[Repository]:
        """The handle's repository, held for the block (see `hold`)."""
        repo, release = await self.hold(ctx, iface, exclusive)
        try:
            yield repo
        finally:
            release()

    def keep_layer(self, handle: int, layer_id: bytes) -> None:
        """A client of handle was told this layer stream is there: a Gc keeps it until a
        FinalizeImage of handle has used it or the handle closes."""
        if handle not in self.repos:  # closed while the call ran: nothing to keep for it
            return
        kept = self._layers.setdefault(handle, {})
        kept.pop(layer_id, None)
        kept[layer_id] = None
        if len(kept) > MAX_KEPT_LAYERS:
            del kept[next(iter(kept))]

    def layers_used(self, handle: int, layer_ids: Iterable[bytes]) -> None:
        kept = self._layers.get(handle, {})
        for layer_id in layer_ids:
            kept.pop(layer_id, None)

    def kept_layers(self, repo: Repository) -> set[bytes]:
        """The layer streams handles of repo keep from a Gc (see keep_layer)."""
        key = identity(repo)
        return {layer_id for handle, kept in self._layers.items()
                if handle in self.repos and identity(self.repos[handle]) == key for layer_id in kept}

    def forget(self, conn: object) -> None:
        """A connection closed: the handles it used may make room for others now."""
        for users in self._users.values():
            users.discard(conn)

    def close(self, handle: int) -> bool:
        repo = self.repos.pop(handle, None)
        self._users.pop(handle, None)
        self._used.pop(handle, None)
        self._layers.pop(handle, None)
        if repo is None:
            return False
        if self._holders.get(id(repo)):
            self._closing[id(repo)] = repo  # closed by the last call holding it
        else:
            repo.close()
        return True

    async def aclose(self, handle: int) -> bool:
        """CloseRepository: what the handle holds (object workers) is gone when it returns."""
        if handle not in self.repos:
            return False
        for closing in self.on_close:
            await closing(handle)
        return self.close(handle)

    def close_all(self) -> None:
        for handle in list(self.repos):
            self.close(handle)

    def shared(self, repo: Repository) -> bool:
        """Another handle holds the same repository (its shared lock would block gc forever)."""
        key = identity(repo)
        return any(r is not repo and identity(r) == key for r in self.repos.values())


def identity(repo: Repository) -> tuple[int, int]:
    """What tells one repository from another, whatever path opened it."""
    st = os.fstat(repo.dirfd)
    return st.st_dev, st.st_ino


def _invalid_spec(message: str) -> VarlinkError:
    return VarlinkError(f"{IFACE}.InvalidSpec", {"message": message})


def _algorithm(ctx: CallContext) -> str:
    algorithm = ctx.params.string("algorithm", optional=True, default=ALGORITHMS[0])
    if algorithm not in ALGORITHMS:
        raise _invalid_spec(f"unsupported algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    ctx.params.boolean("insecure", optional=True)  # pycfs repositories record no such flag
    return algorithm


def _has_meta(path: str) -> bool:
    return os.path.lexists(os.path.join(path, "meta.json"))


def peer_uid(ctx: CallContext) -> int:
    return ctx.conn.peer_uid()


async def image_mount_fd(ctx: CallContext, repo: Repository, image_id: bytes, bad_request: Callable[[str], VarlinkError]) -> Result:
    """Mount/OciMount: a detached mount of the image, its fd the reply's only fd. The
    `options` (overlay: a writable upper layer from the call's two fds [upperdir, workdir];
    read_write) are checked before anything is mounted; only root may ask, of a root service."""
    options = ctx.params.obj("options", optional=True)
    overlay = options is not None and options.boolean("overlay", optional=True, default=False)
    read_write = options is not None and options.boolean("read_write", optional=True, default=False)
    if len(ctx.fds) != (2 if overlay else 0):
        raise bad_request(f"expected {'2 fds [upperdir, workdir] with overlay' if overlay else 'no fds without overlay'}, "
                          f"got {len(ctx.fds)}")
    if read_write and not overlay:
        raise bad_request("read_write needs overlay (an upperdir and a workdir fd)")
    if peer_uid(ctx) != 0:
        raise VarlinkError("org.varlink.service.PermissionDenied")
    from pycfs.host.mount import MountOptions, open_image_mount, privileged

    if not privileged():  # the interface's InternalError
        raise PycfsError(f"this service runs as uid {os.geteuid()} or in a user namespace: mounting needs a service "
                         "started as root")
    mount_options = MountOptions(read_write=read_write)
    if overlay:
        for fd, what in zip(ctx.fds, ("upperdir", "workdir")):
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise bad_request(f"the {what} fd is not a directory")
        mount_options.upper_fd, mount_options.work_fd = ctx.fds
    fd = await trio.to_thread.run_sync(open_image_mount, repo, image_id, mount_options)
    return {"fd_index": 0}, [fd]


class RepositoryInterface:
    def __init__(self, server: Server, handles: Handles) -> None:
        self.handles = handles
        server.add(Interface(IFACE, idl.REPOSITORY, {
            "InitRepository": self.init_repository,
            "EnsureRepository": self.ensure_repository,
            "OpenRepository": self.open_repository,
            "CloseRepository": self.close_repository,
            "Fsck": self.fsck,
            "Gc": self.gc,
            "ImageObjects": self.image_objects,
            "ListImageRefs": self.list_image_refs,
            "Mount": self.mount,
        }))

    async def init_repository(self, ctx: CallContext) -> Result:
        path = ctx.params.string("path")
        algorithm = _algorithm(ctx)
        existed = _has_meta(path)
        repo = await trio.to_thread.run_sync(Repository.init, path, algorithm)
        repo.close()
        return {"created": not existed}

    async def ensure_repository(self, ctx: CallContext) -> Result:
        path = ctx.params.string("path")
        algorithm = _algorithm(ctx)
        if _has_meta(path):
            repo = await trio.to_thread.run_sync(Repository.open, path)
            status = "Opened"
        else:
            repo = await trio.to_thread.run_sync(Repository.init, path, algorithm)
            status = "Created"
        repo.close()
        return {"status": status}

    async def open_repository(self, ctx: CallContext) -> Result:
        path = ctx.params.string("path", optional=True)
        user = ctx.params.boolean("user", optional=True, default=False)
        system = ctx.params.boolean("system", optional=True, default=False)
        if (path is not None) + user + system != 1:
            raise _invalid_spec("exactly one of `path`, `user`, `system` must be set")
        if user:
            home = os.environ.get("HOME")
            if not home:
                raise _invalid_spec("`user`: HOME is not set for the service")
            path = str(Path(home) / ".var/lib/composefs")
        elif system:
            path = SYSTEM_REPO
        async with self.handles.opening(path):
            try:
                repo = await trio.to_thread.run_sync(Repository.open, path)
            except (PycfsError, OSError) as e:
                raise VarlinkError(f"{IFACE}.RepoNotFound", {"message": f"cannot open repository {path}: {e}"}) from None
            handle = await self.handles.add(repo, ctx.conn, IFACE)
        return {"handle": handle, "hash_algorithm": repo.alg,
                "objects_device_id": os.fstat(repo.dirfd).st_dev}

    async def close_repository(self, ctx: CallContext) -> Result:
        handle = ctx.params.integer("handle")
        if not await self.handles.aclose(handle):
            raise VarlinkError(f"{IFACE}.InvalidHandle", {"handle": handle})
        return {}

    async def fsck(self, ctx: CallContext) -> Result:
        from pycfs.host.fsck import fsck

        async with self.handles.using(ctx, IFACE) as repo:
            metadata_only = ctx.params.boolean("metadata_only", optional=True, default=False)
            report = await trio.to_thread.run_sync(fsck, repo, metadata_only)
            return fsck_reply(repo, report)

    async def gc(self, ctx: CallContext) -> Result:
        from pycfs.host.gc import gc

        repo = self.handles.get(ctx, IFACE)
        dry_run = ctx.params.boolean("dry_run")
        if ctx.params.str_list("roots"):
            raise _invalid_spec("extra gc roots are not supported: tag what you want to keep")
        if not dry_run:
            self._alone(repo)
        # (a dry run removes nothing: it only keeps a Gc from removing while it looks)
        async with self.handles.using(ctx, IFACE, exclusive=not dry_run) as repo:
            if not dry_run:
                self._alone(repo)  # (opened again while this call waited?)
                for before in self.handles.before_gc:
                    await before(repo)
            keep = self.handles.kept_layers(repo)  # layers of copies between PutLayer and FinalizeImage
            result = await trio.to_thread.run_sync(gc, repo, dry_run, None, GC_WAIT, keep)
        return {"result": {"objects_removed": result.objects_removed, "objects_bytes": result.bytes_removed,
                           "images_pruned": 0, "streams_pruned": result.links_pruned}, "dry_run": dry_run}

    def _alone(self, repo: Repository) -> None:
        """Another handle's shared flock would keep gc waiting its LOCK_WAIT."""
        if self.handles.shared(repo):
            raise VarlinkError(f"{IFACE}.InternalError", {
                "message": f"{repo.path} is open under another handle of this service: close it before gc"})

    def _image_id(self, ctx: CallContext, repo: Repository) -> bytes:
        """The image id the call's `name` parameter names."""
        name = ctx.params.string("name")
        try:
            return repo.image_id(name)
        except PycfsError:
            raise VarlinkError(f"{IFACE}.NoSuchRef", {"reference": name}) from None

    async def image_objects(self, ctx: CallContext) -> Result:
        from pycfs.host.erofs.objects import image_object_ids

        async with self.handles.using(ctx, IFACE) as repo:
            image_id = self._image_id(ctx, repo)
            ids = await trio.to_thread.run_sync(lambda: image_object_ids(repo.image_bytes(image_id), repo.alg))
            return {"object_ids": sorted(f"{repo.alg}:{i.hex()}" for i in ids)}

    async def mount(self, ctx: CallContext) -> Result:
        async with self.handles.using(ctx, IFACE) as repo:
            return await image_mount_fd(ctx, repo, self._image_id(ctx, repo), _invalid_spec)

    async def list_image_refs(self, ctx: CallContext) -> Result:
        async with self.handles.using(ctx, IFACE) as repo:
            # (a name that is not UTF-8 text is none pycfs or cfsctl made; fsck reports it)
            return {"images": [{"name": name, "digest": target.rsplit("/", 1)[-1]}
                               for name, target in repo.list_links("images/refs") if is_clean_text(name + target)]}
