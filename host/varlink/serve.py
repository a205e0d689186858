"""The composefs varlink service: both interfaces on one socket, and how it is started."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
from pycfs.host import __version__
from pycfs.host.errors import PycfsError
from pycfs.host.varlink.oci import ForkedFor, OciInterface
from pycfs.host.varlink.server import Server
from pycfs.host.varlink.service import Handles, RepositoryInterface
from pycfs.host.varlink.transfer import log_producer_failure
from pycfs.host.varlink.transport import activation_socket, listen, parse_address

URL = "https://github.com/composefs/composefs-rs"


@asynccontextmanager
async def open_service(forked: ForkedFor | None = None,
                       producer_failed: Callable[[Exception], None] = log_producer_failure) -> AsyncIterator[Server]:
    """A server with org.composefs.Repository and org.composefs.Oci; handles still open
    when the block ends are closed. ``forked``: object workers forked already for one
    repository, for the first PutLayer into it (see `OciInterface`); ``producer_failed``:
    hears why a GetLayer's stream ended short (default: the log)."""
    handles = Handles()
    try:
        async with trio.open_nursery() as nursery:
            server = Server(nursery, "org.composefs", "pycfs", __version__, URL)
            server.on_disconnect.append(handles.forget)
            RepositoryInterface(server, handles)
            OciInterface(server, handles, forked, producer_failed)
            yield server
            nursery.cancel_scope.cancel()
    finally:
        handles.close_all()


@asynccontextmanager
async def open_cstor_service(storage_root: str | None, helper: str = "auto") -> AsyncIterator[Server]:
    """A server of the layers of containers-storage (GetInfo, GetLayer of org.composefs.Oci),
    with the helper for files only container uids may read (started on first need)."""
    from pycfs.host.helperclient import HelperClient
    from pycfs.host.storage.config import load_storage_config
    from pycfs.host.storage.store import Storage
    from pycfs.host.varlink.cstor import CstorInterface

    storage = Storage.from_config(load_storage_config(storage_root))
    async with HelperClient(storage.primary.root, storage.primary.driver, policy=helper,
                            additional_stores=[(s.root, s.driver) for s in storage.stores[1:]]) as client, \
            trio.open_nursery() as nursery:
        if client.enabled:
            # Now, before any GetLayer holds the storage locks: `podman unshare` waits for them.
            await client.hello()
        server = Server(nursery, "org.composefs", "pycfs", __version__, URL)
        CstorInterface(server, storage, client)
        yield server
        nursery.cancel_scope.cancel()


def _remove_if(path: str, bound: os.stat_result) -> None:
    """Remove the socket file at path if it is still the one this service bound."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)


async def serve(address: str | None, containers_storage: bool = False, storage_root: str | None = None,
                helper: str = "auto") -> None:
    """Serve until cancelled: on `unix:PATH`, else on the socket-activation fd (listening:
    accept; connected: that one peer, then stop)."""
    activated = activation_socket() if address is None else None
    if address is None and activated is None:
        raise PycfsError("no --address given and not socket-activated (LISTEN_FDS)")
    opened = open_cstor_service(storage_root, helper) if containers_storage else open_service()
    async with opened as server:
        if activated is not None:
            sock, listening = activated
            if not listening:
                await server.serve_connection(sock)
                return
        else:
            assert address is not None
            sock = listen(address)
            print(f"pycfs varlink: listening on {address}", file=sys.stderr)
        with sock:
            bound = os.lstat(parse_address(address)) if activated is None else None
            try:
                await server.serve_listener(sock)
            finally:
                if bound is not None:  # our socket file goes with us (an activation's is systemd's)
                    _remove_if(parse_address(address), bound)
