"""The helper's JSON-RPC methods and its serving loop (blocking, one connection).

`HelperService` opens files read-only beneath one layer's root (in the primary store or an
additional one the caller owns) and hands their fds to the
serving loop, which sends them with the response (jsonrpc-fdpass) and then closes its own
copies. It never creates, writes, renames or deletes anything.

Opening one requested name:
1. lexical checks (`pycfs.protocol.helper_api.check_relative_path`): no empty name, NUL,
   absolute name, ``..`` or empty component, no over-long name;
2. an ``O_PATH | O_NOFOLLOW`` probe with openat2 ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
   RESOLVE_NO_MAGICLINKS`` beneath the layer directory, and ``fstat`` on it: symlinks,
   directories and every non-regular file are refused before anything is really opened (no
   fifo or device ``open`` side effects);
3. the real ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` open with the same resolve flags,
   and ``fstat`` again: it must still be a regular file and the same inode as the probe.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from jsonrpcserver import Error, InvalidParams, Result, Success

from pycfs.protocol.confined import RESOLVE_CONFINED, openat2
from pycfs.protocol import helper_api as api
from pycfs.protocol import rpcserver
from pycfs.protocol.rpcserver import Call

def _refused(refusal: api.Refusal) -> dict[str, Any]:
    # No name in the message: the host knows it by position, and echoing long names could
    # push a response past the message size limit.
    return {"errno": refusal.errno, "reason": refusal.reason, "message": refusal.text}


def _read_id_map(path: str) -> list[list[int]]:
    with open(path, encoding="ascii") as f:
        return [[int(x) for x in line.split()] for line in f if line.strip()]


def _security_status() -> dict[str, int]:
    """Capability sets and no_new_privs as the kernel reports them, for the host to check."""
    wanted = {"CapEff": "cap_effective", "CapPrm": "cap_permitted", "CapBnd": "cap_bounding", "NoNewPrivs": "no_new_privs"}
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[wanted[key]] = int(value.strip(), 16 if key.startswith("Cap") else 10)
    return out


class HelperService:
    """The methods; ``storage_root_fd`` (and each of ``additional``'s) is an O_PATH directory
    fd the service does not own."""

    def __init__(self, storage_root_fd: int, driver: str, additional: list[tuple[int, str]] | None = None) -> None:
        self.stores = [(storage_root_fd, driver), *(additional or [])]
        for _, each in self.stores:
            if each not in api.DRIVERS:
                raise ValueError(f"unknown storage driver {each!r}")
        self.driver = driver

    def methods(self) -> dict[str, Any]:
        return {api.HELLO: self.hello, api.OPEN_FILES: self.open_files, api.SHUTDOWN: self.shutdown}

    def hello(self, call: Call) -> Result:
        return Success(
            {
                "version": api.PROTOCOL_VERSION,
                "features": list(api.FEATURES),
                "pid": os.getpid(),
                "driver": self.driver,
                "uid_map": _read_id_map("/proc/self/uid_map"),
                "gid_map": _read_id_map("/proc/self/gid_map"),
                "max_paths": api.MAX_PATHS_PER_REQUEST,
                **_security_status(),
            }
        )

    def shutdown(self, call: Call) -> Result:
        call.stop = True
        return Success(None)

    def open_files(self, call: Call, layer: Any, paths: Any, store: Any = 0) -> Result:
        if type(store) is not int or not 0 <= store < len(self.stores):
            return InvalidParams(f"store must be an index below {len(self.stores)}")
        root_fd, driver = self.stores[store]
        if not api.is_layer_id(layer):
            return InvalidParams("layer must be a layer id of 64 lowercase hex digits")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return InvalidParams("paths must be a list of strings")
        if len(paths) > api.MAX_PATHS_PER_REQUEST:
            return InvalidParams(f"{len(paths)} paths in one request; the limit is {api.MAX_PATHS_PER_REQUEST}")
        where = api.layer_dir(driver, layer)
        try:
            layer_fd = openat2(root_fd, where, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, resolve=RESOLVE_CONFINED)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return Error(api.ERR_UNKNOWN_LAYER, f"unknown layer {layer}: no {where} in the storage")
            return Error(api.ERR_LAYER_UNREADABLE, f"cannot open {where}: {os.strerror(e.errno or 0)}")
        try:
            results = [self._open_one(layer_fd, p, call.out_fds) for p in paths]
        finally:
            os.close(layer_fd)
        return Success({"results": results})

    def _open_one(self, layer_fd: int, name: str, out: list[int]) -> dict[str, Any]:
        try:
            raw = os.fsencode(name)
        except UnicodeError:
            return _refused(api.REFUSE_ENCODING)
        refusal = api.check_relative_path(raw)
        if refusal is not None:
            return _refused(refusal)
        try:
            probe = openat2(layer_fd, raw, os.O_PATH | os.O_NOFOLLOW, resolve=RESOLVE_CONFINED)
        except OSError as e:
            if e.errno == errno.ELOOP:  # RESOLVE_NO_SYMLINKS met a symlink in a parent
                return _refused(api.REFUSE_SYMLINK)
            return self._failed(e)
        try:
            st = os.fstat(probe)
        finally:
            os.close(probe)
        if stat.S_ISLNK(st.st_mode):
            return _refused(api.REFUSE_SYMLINK)
        if stat.S_ISDIR(st.st_mode):
            return _refused(api.REFUSE_DIRECTORY)
        if not stat.S_ISREG(st.st_mode):
            return _refused(api.REFUSE_SPECIAL)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = openat2(layer_fd, raw, flags, resolve=RESOLVE_CONFINED)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return _refused(api.REFUSE_SYMLINK)
            return self._failed(e)
        try:
            again = os.fstat(fd)
            if not stat.S_ISREG(again.st_mode) or (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                return _refused(api.REFUSE_CHANGED)
            # O_NONBLOCK only guarded the open; the receiver gets an ordinary description.
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        out.append(fd)
        return {"fd": len(out) - 1}

    @staticmethod
    def _failed(e: OSError) -> dict[str, Any]:
        code = e.errno or errno.EIO
        return {"errno": code, "reason": api.OPEN_FAILED, "message": os.strerror(code)}


def serve(sock: socket.socket, service: HelperService) -> int:
    """Answer requests on ``sock`` until EOF or ``shutdown``; the process exit status."""
    return rpcserver.serve(sock, rpcserver.validating_dispatch(service.methods()), name="pycfs-helper",
                           max_message=api.MAX_MESSAGE_BYTES, max_fds=0)
