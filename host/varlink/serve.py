"""The composefs varlink service: both interfaces on one socket, and how it is started."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import trio
from pycfs.host.errors import PycfsError
from pycfs.host.varlink.oci import OciInterface
from pycfs.host.varlink.server import Server
from pycfs.host.varlink.service import Handles, RepositoryInterface
from pycfs.host.varlink.transport import activation_socket, listen

URL = "https://github.com/composefs/composefs-rs"


def _version() -> str:
    try:
        return version("pycfs")
    except PackageNotFoundError:
        return "0"


@asynccontextmanager
async def open_service() -> AsyncIterator[Server]:
    """A server with org.composefs.Repository and org.composefs.Oci; handles still open
    when the block ends are closed."""
    handles = Handles()
    try:
        async with trio.open_nursery() as nursery:
            server = Server(nursery, "org.composefs", "pycfs", _version(), URL)
            RepositoryInterface(server, handles)
            OciInterface(server, handles)
            yield server
            nursery.cancel_scope.cancel()
    finally:
        handles.close_all()


async def serve(address: str | None, on_ready: object = None) -> None:
    """Serve until cancelled: on `unix:PATH`, else on the socket-activation fd (listening:
    accept; connected: that one peer, then stop)."""
    activated = activation_socket() if address is None else None
    if address is None and activated is None:
        raise PycfsError("no --address given and not socket-activated (LISTEN_FDS)")
    async with open_service() as server:
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
            await server.serve_listener(sock)
