"""A layer service for podman's containers-storage (`pycfs varlink serve --containers-storage`).

It implements `GetInfo` and `GetLayer` of `org.composefs.Oci` (handles are ignored, callers
pass 0; `params.storage` names the store and the layer). The stream is the layer's tar
rebuilt from its tar-split: segments as Metadata; each file either as FileBackedData under
the layer's diff directory (a file this service can open itself, or any file when the
consumer declares CAP_DAC_OVERRIDE), or as InlineData read through the helper inside the
user namespace (files only container uids may read). The store's read locks are taken
before the directory is opened and held until the consumer drops its lifetime fds, so
`podman rmi` cannot delete what is being read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import trio

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.helperclient import HelperClient
from pycfs.host.storage.locks import LockTimeout, ReadLocks
from pycfs.host.storage.store import Storage, Store
from pycfs.host.storage.tarsplit import FileEntry, Segment
from pycfs.host.varlink.layers import build_layout, seed_from_id
from pycfs.host.varlink.transfer import SendAll
from pycfs.host.varlink.oci import FEATURES, IFACE, error, send_layer_frames
from pycfs.host.varlink.server import CallContext, Interface, Result, Server
from pycfs.host.varlink import idl
from pycfs.protocol.fdpass import close_fds
from pycfs.protocol.splitdirfdstream import (
    MAX_INLINE_CHUNK_SIZE, encode_file_backed_data, encode_inline_data, encode_metadata,
)

CSTOR_FEATURES = [*FEATURES, "source-containers-storage", "read-only"]
ENTRIES_PER_TRIP = 1024
LOCK_WAIT = 60.0
_SEND_PIECE = 1 << 16


class CstorInterface:
    def __init__(self, server: Server, storage: Storage, helper: HelperClient | None) -> None:
        self.storage = storage
        self.helper = helper
        server.add(Interface(IFACE, idl.OCI, {"GetInfo": self.get_info, "GetLayer": self.get_layer}))

    async def get_info(self, ctx: CallContext) -> Result:
        return {"features": CSTOR_FEATURES}

    def _store(self, path: str) -> Store:
        wanted = os.path.realpath(path)
        for store in self.storage.stores:
            if os.path.realpath(store.root) == wanted:
                return store
        raise error("InvalidRequest", message=f"storage {path!r} is not served here (serving "
                    f"{', '.join(str(s.root) for s in self.storage.stores)})")

    async def get_layer(self, ctx: CallContext) -> Result:
        params = ctx.params.obj("params")
        assert params is not None
        locator = params.obj("storage", optional=True)
        if locator is None:
            raise error("InvalidRequest", message="params.storage (storage_path, layer_id) is required here")
        store = self._store(locator.string("storage_path"))
        layer_id = locator.string("layer_id")
        dac = params.boolean("consumer_has_cap_dac_override", optional=True, default=False)
        locks = ReadLocks([(p, s.read_only) for s in self.storage.stores for p in s.lock_paths()])
        try:
            await locks.acquire(limit=LOCK_WAIT)
        except LockTimeout as e:
            raise error("InternalError", message=str(e)) from None
        try:
            if layer_id not in await trio.to_thread.run_sync(store.layers):
                raise error("NoSuchLayer", diff_id=params.string("diff_id", optional=True) or layer_id)
            diff = store.layer_dir(layer_id)
            try:
                dirfd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                readable = True
            except PermissionError:
                # a diff dir only container uids may enter: every file comes through the helper
                dirfd = os.open(diff, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                readable = False
        except BaseException:
            locks.release()
            raise
        seed = seed_from_id(layer_id)
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            close_fds([dirfd])
            locks.release()
            raise
        try:
            source_fd = os.dup(dirfd)
            layout = build_layout(r, [dirfd], seed)
        except BaseException:
            close_fds([w])
            locks.release()
            raise
        producer = _Producer(self.helper, layer_id, source_fd if readable else -1, layout.real_slots[0], dac, store)

        def release() -> None:
            close_fds([source_fd])
            locks.release()

        return await send_layer_frames(ctx, layout, seed, w, producer.run, release)


class _Producer:
    def __init__(self, helper: HelperClient | None, layer_id: str, dirfd: int, index: int, dac: bool,
                 store: Store) -> None:
        self.helper = helper
        self.layer_id = layer_id
        self.dirfd = dirfd  # -1: this service cannot enter the layer directory
        self.index = index
        self.dac = dac
        self.store = store

    async def run(self, send_all: SendAll) -> None:
        buf = bytearray()
        with self.store.tar_split_entries(self.layer_id) as entries:
            while batch := await trio.to_thread.run_sync(_take, entries, ENTRIES_PER_TRIP):
                for entry in batch:
                    if isinstance(entry, Segment):
                        buf += encode_metadata(entry.data)
                    elif entry.size:
                        buf += await self._file(entry)
                    if len(buf) >= _SEND_PIECE:
                        await send_all(bytes(buf))
                        buf.clear()
        if buf:
            await send_all(bytes(buf))

    async def _file(self, entry: FileEntry) -> bytes:
        relpath = entry.relpath
        if self.dirfd >= 0:
            try:
                fd = syscalls.openat2(self.dirfd, relpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except PermissionError:
                fd = -1
            except OSError as e:
                raise PycfsError(f"cannot open {os.fsdecode(relpath)} in layer {self.layer_id[:12]}: {e.strerror}") from None
            if fd >= 0 or self.dac:
                if fd >= 0:
                    try:
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                        raise PycfsError(f"{os.fsdecode(relpath)} in layer {self.layer_id[:12]} is not the "
                                         f"{entry.size}-byte file the tar-split records")
                return encode_file_backed_data(self.index, entry.size, relpath)
        return encode_inline_data(await self._read_via_helper(relpath, entry.size))

    async def _read_via_helper(self, relpath: bytes, size: int) -> bytes:
        if self.helper is None or not self.helper.enabled:
            raise PycfsError(f"{os.fsdecode(relpath)} in layer {self.layer_id[:12]} is readable only by container "
                             "uids and the helper is disabled")
        if size > MAX_INLINE_CHUNK_SIZE:
            raise PycfsError(f"{os.fsdecode(relpath)} ({size} bytes) is readable only through the helper and too "
                             f"large for one InlineData chunk ({MAX_INLINE_CHUNK_SIZE} bytes)")
        if not self.helper.serves(self.store.root):
            raise PycfsError(f"{os.fsdecode(relpath)} in layer {self.layer_id[:12]} is readable only by container uids, "
                             f"and its store {self.store.root} is not yours: the helper opens files only in your stores")
        (got,) = await self.helper.open_files(self.layer_id, [relpath], store=self.store.root)
        if isinstance(got, OSError):
            raise PycfsError(f"the helper cannot open {os.fsdecode(relpath)}: {got.strerror}")
        try:
            data = await trio.to_thread.run_sync(_read_exact, got, size)
        finally:
            self.helper.release(got)
        return data


def _read_exact(fd: int, size: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise PycfsError(f"a helper-opened file is not the {size}-byte regular file the tar-split records")
    out = bytearray()
    while len(out) < size:
        piece = os.pread(fd, min(1 << 20, size - len(out)), len(out))
        if not piece:
            raise PycfsError(f"a helper-opened file ended after {len(out)} of {size} bytes")
        out += piece
    return bytes(out)


def _take(entries: Iterator[Segment | FileEntry], n: int) -> list[Segment | FileEntry]:
    out = []
    for entry in entries:
        out.append(entry)
        if len(out) == n:
            break
    return out
