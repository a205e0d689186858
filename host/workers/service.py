"""The object worker's methods: hash each file passed as an fd, and store it when started
on a repository. Blocking, single-threaded, one connection (see `pycfs.protocol.rpcserver`)."""

from __future__ import annotations

import errno
import os
from typing import Any

from pycfs.host.fsverity import digest_fd
from pycfs.host.repository import Repository
from pycfs.protocol import worker_api as api
from pycfs.protocol.rpcserver import Call, InvalidParamsError


def _failed(e: OSError) -> dict[str, Any]:
    code = e.errno or errno.EIO
    return {"errno": code, "message": e.strerror or str(e)}


class WorkerService:
    """``repo`` None: digests only (the `store` method refuses)."""

    def __init__(self, alg: str, repo: Repository | None) -> None:
        self.alg = alg
        self.repo = repo

    def methods(self) -> dict[str, Any]:
        return {api.HELLO: self.hello, api.STORE: self.store, api.DIGEST: self.digest}

    def hello(self, call: Call) -> dict[str, Any]:
        return {"version": api.PROTOCOL_VERSION, "pid": os.getpid(), "alg": self.alg, "store": self.repo is not None}

    def _each(self, call: Call, sizes: Any, one) -> dict[str, Any]:
        if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
            raise InvalidParamsError("sizes must be a list of byte counts")
        if len(sizes) != len(call.fds):
            raise InvalidParamsError(f"{len(sizes)} sizes for {len(call.fds)} fds")
        results = []
        for fd, size in zip(call.fds, sizes):
            try:
                results.append(one(fd, size))
            except OSError as e:
                results.append(_failed(e))
        return {"results": results}

    def digest(self, call: Call, sizes: Any) -> dict[str, Any]:
        return self._each(call, sizes, lambda fd, size: {"id": digest_fd(fd, self.alg, size).hex()})

    def store(self, call: Call, sizes: Any) -> dict[str, Any]:
        if self.repo is None:
            raise InvalidParamsError("this worker was started without a repository")
        return self._each(call, sizes, self._store_one)

    def _store_one(self, fd: int, size: int) -> dict[str, Any]:
        assert self.repo is not None
        st = os.fstat(fd)
        if st.st_size != size:
            return {"errno": errno.ESTALE, "message": f"has {st.st_size} bytes, expected {size}"}
        result = self.repo.store_object_from_fd(fd, st)
        if result.size != size:
            return {"errno": errno.ESTALE, "message": "changed size while it was stored"}
        return {"id": result.object_id.hex(), "how": result.how}
