"""Host side of the user-namespace helper: open files you cannot read, get their fds.

API (what the importer calls)::

    from pycfs.host.helperclient import HelperClient, HelperPathError

    async with HelperClient(storage_root, driver="overlay", policy=args.helper) as helper:
        if helper.enabled:                      # policy allows it (auto: not root)
            names = ["etc/shadow", "usr/bin/sudo"]  # relative to the layer's diff/
            results = await helper.open_files(layer_id, names)
            for name, r in zip(names, results):
                if isinstance(r, OSError):      # HelperPathError: r.errno, r.reason, str(r)
                    ...
                else:                           # a read-only fd of a regular file, CLOEXEC
                    try:
                        repo.store_object_from_fd(r)
                    finally:
                        helper.release(r)       # closes it and frees its slot

* The CLI's ``--helper auto|always|never`` option (`pycfs.tools.common.add_helper_option`)
  gives ``policy``.
* ``HelperClient(storage_root, driver, *, policy="auto"|"always"|"never",
  launcher=("podman", "unshare"), max_open_fds=None, additional_stores=())``;
  ``additional_stores``: (root, driver) of additional image stores, of which those whose
  root you own are served too (`serves`). ``auto`` starts the helper lazily on
  the first `open_files` and only when not root; ``always`` starts it on entry (and as root);
  ``never`` never starts it (`open_files` raises `PycfsError`).
* ``await open_files(layer_id, paths, store=None) -> list[int | HelperPathError]``
  (``store``: the root of a served additional store; None: the primary): one entry per path,
  in order; paths are relative to the layer's ``diff/`` (overlay) or ``vfs/dir/<id>`` (vfs),
  ``str`` or ``bytes``. Batched into requests of at most `helper_api.MAX_PATHS_PER_REQUEST`
  paths and half `helper_api.MAX_MESSAGE_BYTES`.
  Refusals (``..``, absolute, NUL, empty component, symlink, directory, fifo/device, missing)
  are per-path `HelperPathError` s (an ``OSError`` with ``.reason``); an unknown layer, a
  dead or misbehaving helper, or a failed ``podman unshare`` raise `PycfsError` naming the
  cause and the helper's last output.
* Fd budget: the fds returned count against ``max_open_fds`` (default: half the soft
  RLIMIT_NOFILE); `open_files` waits while the budget is spent, so give each fd back with
  `release(fd)` (from the trio thread) as soon as you are done. One call may not ask for
  more paths than ``max_open_fds`` (ValueError): split longer lists.
* ``.enabled``, ``.info`` (the helper's ``hello``: version, features, pid, uid/gid maps),
  ``.helper_pid``, ``await aclose()`` (also on context exit: ``shutdown`` request, then wait,
  then kill).

One request is in flight at a time; callers may share the client across tasks. A call
cancelled mid-request leaves the connection unusable (later calls raise `PycfsError`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from pycfs.host import stuck
from pycfs.host.childoutput import ChildOutput, ChildProcess, receive_message, spawn_on_socket
from pycfs.host.errors import PycfsError
from pycfs.protocol import helper_api as api
from pycfs.protocol.fdpass import FdPassError, asend_with_fds, close_fds
from pycfs.protocol.jsonrpc import Decoder, Message, ProtocolError, encode

POLICIES = ("auto", "always", "never")
HELLO_TIMEOUT = 60.0  # podman's first run in a session may have to set up its pause process
EXIT_GRACE = 5.0
# Once the helper itself has exited, `podman unshare` only tidies up, and for that waits for
# the storage write lock: a pull (ours, mid-import, or anyone's) holding a read lock would
# keep it waiting for good. It is killed after this long; it holds nothing of ours.
LAUNCHER_GRACE = 1.0

_UNSHARE_ADVICE = (
    "the helper needs a local rootless podman whose `podman unshare` works for your user "
    "(subuid/subgid ranges in /etc/subuid and /etc/subgid); it cannot work with a remote podman "
    "(--remote, CONTAINER_HOST) or inside a container without nested user namespaces. "
    "Alternatives: run pycfs itself inside the storage's user namespace (`podman unshare pycfs ...`), "
    "or pass --helper=never to skip the helper"
)


def owns_store(root: Path) -> bool:
    """Whether the store root ``root`` is yours (the helper serves such additional stores)."""
    try:
        return os.stat(root).st_uid == os.getuid()
    except OSError:
        return False


class HelperPathError(OSError):
    """The helper refused or failed to open one path; ``reason`` is its token (helper_api)."""

    def __init__(self, errno_: int, message: str, path: str, reason: str) -> None:
        super().__init__(errno_, message, path)
        self.reason = reason


class FdBudget:
    """Counts fds handed out against a limit; acquiring waits until enough are released."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> None:
        if n > self.total:
            raise ValueError(f"{n} fds asked for at once; the budget is {self.total}")
        while self.available < n:
            await self._lot.park()
        self.available -= n

    def release(self, n: int = 1) -> None:
        self.available = min(self.total, self.available + n)
        self._lot.unpark_all()


def _batches(names: list[str]) -> list[list[str]]:
    """Split names into requests within the helper's path count and message size limits."""
    budget = api.MAX_MESSAGE_BYTES // 2  # room for the envelope, with a wide margin
    out: list[list[str]] = [[]]
    size = 0
    for name in names:
        cost = len(json.dumps(name)) + 1
        if out[-1] and (len(out[-1]) == api.MAX_PATHS_PER_REQUEST or size + cost > budget):
            out.append([])
            size = 0
        out[-1].append(name)
        size += cost
    return out


def default_fd_budget() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 2)


class HelperClient:
    """Starts `python -m pycfs.helper` under ``podman unshare`` and asks it to open files."""

    def __init__(
        self,
        storage_root: str | os.PathLike[str],
        driver: str,
        *,
        policy: str = "auto",
        launcher: Sequence[str] = ("podman", "unshare"),
        max_open_fds: int | None = None,
        additional_stores: Sequence[tuple[str | os.PathLike[str], str]] = (),
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"helper policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if driver not in api.DRIVERS:
            raise ValueError(f"unknown storage driver {driver!r}")
        self.storage_root = Path(storage_root).absolute()
        self.driver = driver
        # The helper opens files beneath an additional store only when you own its root:
        # its files are then your user namespace's, as the primary store's are.
        self.additional = [(Path(root).absolute(), d) for root, d in additional_stores
                           if d in api.DRIVERS and owns_store(Path(root))]
        self.policy = policy
        self.launcher = tuple(launcher)
        self.budget = FdBudget(max_open_fds or default_fd_budget())
        self.info: dict[str, Any] | None = None
        self._entered = False
        self._proc: ChildProcess | None = None
        self._sock: Any = None
        self._decoder = Decoder(api.MAX_MESSAGE_BYTES, api.MAX_FDS_PER_MESSAGE)
        self._lock = trio.Lock()
        self._start_lock = trio.Lock()
        self._next_id = 0
        self._failure: PycfsError | None = None
        self._output: ChildOutput | None = None  # what podman and the helper print
        self._handed_out: set[int] = set()
        # A pidfd of the helper itself: podman keeps our socket's other end open, so the
        # helper's death shows here, not as EOF.
        self._helper_pidfd: int | None = None
        self._watch: stuck.Watch | None = None  # the helper's progress, once its pid is known

    # -- lifecycle --

    @property
    def enabled(self) -> bool:
        """Whether this client may start the helper at all under its policy."""
        if self.policy == "never":
            return False
        return self.policy == "always" or os.geteuid() != 0

    @property
    def helper_pid(self) -> int | None:
        return None if self.info is None else self.info["pid"]

    async def __aenter__(self) -> HelperClient:
        self._entered = True
        try:
            if self.policy == "always":
                await self._ensure_started()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Ask the helper to exit, wait for it (killing it after a grace period)."""
        proc = self._proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if self._failure is None and proc.returncode is None:
                with trio.move_on_after(EXIT_GRACE):
                    try:
                        await self._call(api.SHUTDOWN)
                    except PycfsError:
                        pass
            self._failure = self._failure or PycfsError("the user-namespace helper was shut down")
            self._sock.close()
            await self._reap(EXIT_GRACE)
            self._decoder.close()
            self._proc = None
            self._close_output()

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if self._failure is not None:
                raise self._failure
            if self._proc is not None:
                return
            if not self._entered:
                raise RuntimeError("use HelperClient as `async with HelperClient(...) as helper:`")
            if not self.enabled:
                why = "--helper=never" if self.policy == "never" else "running as root (use --helper=always to force it)"
                raise PycfsError(f"the user-namespace helper is disabled: {why}")
            await self._spawn()

    async def _spawn(self) -> None:
        cmd = [
            *self.launcher, sys.executable, "-B", "-m", "pycfs.helper",
            "--storage-root", str(self.storage_root), "--driver", self.driver,
            *(arg for root, d in self.additional for arg in ("--additional-store", f"{d}:{root}")),
        ]  # fmt: skip
        try:
            self._proc, self._sock, self._output = await spawn_on_socket(cmd, "pycfs-helper-output")
        except FileNotFoundError:
            self._failure = PycfsError(
                f"cannot start the user-namespace helper: `{self.launcher[0]}` was not found on PATH. "
                "Files in the storage that you cannot read are opened through `podman unshare`: "
                "install podman, or run pycfs as root (for example inside `podman unshare`)"
            )
            raise self._failure from None
        except OSError as e:
            self._failure = PycfsError(f"cannot start the user-namespace helper with `{self.launcher[0]}`: {e}")
            raise self._failure from None
        launcher = " ".join(self.launcher)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                info, fds = await self._call(api.HELLO, start=True)
        except trio.TooSlowError:
            await self._kill()
            self._failure = PycfsError(
                f"`{launcher}` did not start the helper within {HELLO_TIMEOUT:.0f} s"
                f"{self._tail_note()}; {_UNSHARE_ADVICE}"
            )
            raise self._failure from None
        except trio.Cancelled:
            await self._abandon()
            raise
        close_fds(fds)
        if not isinstance(info, dict) or info.get("version") != api.PROTOCOL_VERSION:
            raise await self._misbehaved(f"it speaks protocol {info!r}, not version {api.PROTOCOL_VERSION}")
        pid = info.get("pid")
        if "open-files" not in info.get("features", ()) or type(pid) is not int or pid <= 1:
            raise await self._misbehaved(f"its hello lacks what this client needs: {info!r}")
        try:
            self._helper_pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise await self._misbehaved(f"its pid {pid} cannot be watched: {e.strerror}") from None
        self._watch = stuck.Watch(pid)
        self.info = info

    async def _abandon(self) -> None:
        """Forget a start cancelled before its hello: the next need starts afresh."""
        await self._kill()
        self._sock.close()
        self._decoder.close()
        self._decoder = Decoder(api.MAX_MESSAGE_BYTES, api.MAX_FDS_PER_MESSAGE)
        self._proc = None
        self._failure = None  # set by the cancelled hello request: it concerned that process only
        self._close_output()

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def _tail_note(self) -> str:
        """The end of what podman and the helper printed, as one line."""
        return self._output.note() if self._output is not None else ""

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._helper_pidfd is not None:
            os.close(self._helper_pidfd)
            self._helper_pidfd = None

    async def _helper_exits(self, within: float) -> bool:
        """Whether the helper process exits within `within` seconds (a reset socket comes a
        moment before its exit shows)."""
        if self._helper_pidfd is None:
            return False
        with trio.CancelScope(shield=True), trio.move_on_after(within):
            await trio.lowlevel.wait_readable(self._helper_pidfd)
            return True
        return False

    async def _reap(self, grace: float) -> None:
        """Wait (shielded) for the helper to exit, at most `grace` seconds, then for `podman
        unshare` at most LAUNCHER_GRACE more; kill what is left (podman: the helper dies
        with it, PR_SET_PDEATHSIG)."""
        proc = self._proc
        assert proc is not None
        with trio.CancelScope(shield=True):
            if self._helper_pidfd is not None:
                with trio.move_on_after(grace):
                    await trio.lowlevel.wait_readable(self._helper_pidfd)
                grace = LAUNCHER_GRACE
            with trio.move_on_after(grace):
                await proc.wait()
            await self._kill()

    # -- requests --

    async def hello(self) -> dict[str, Any]:
        """The helper's hello (starting it if needed)."""
        await self._ensure_started()
        assert self.info is not None
        return self.info

    def serves(self, store: Path) -> bool:
        """Whether the helper opens files beneath store root ``store`` (the primary, or an
        additional store you own)."""
        return store.absolute() == self.storage_root or any(store.absolute() == root for root, _ in self.additional)

    async def open_files(self, layer_id: str, paths: Sequence[str | bytes],
                         store: Path | None = None) -> list[int | HelperPathError]:
        """Open each path read-only beneath the layer inside the user namespace (of the
        primary store, or of additional store ``store``).

        Returns an fd or a `HelperPathError` per path, in order; see the module docstring.
        """
        if not api.is_layer_id(layer_id):
            raise ValueError(f"not a layer id (64 lowercase hex digits): {layer_id!r}")
        names = [os.fsdecode(p) for p in paths]
        if len(names) > self.budget.total:
            raise ValueError(
                f"{len(names)} paths in one call exceed the open-fd budget of {self.budget.total}; split the list"
            )
        if not names:
            return []
        index = 0 if store is None or store.absolute() == self.storage_root else next(
            (i for i, (root, _) in enumerate(self.additional, 1) if root == store.absolute()), None)
        if index is None:
            raise ValueError(f"the helper does not open files in {store}: not a store it serves")
        await self._ensure_started()
        # The whole call's slots at once: taking them batch by batch could leave two
        # concurrent callers each holding part and waiting for the other.
        await self.budget.acquire(len(names))
        results: list[int | HelperPathError] = []
        try:
            for batch in _batches(names):
                results += await self._open_batch(layer_id, batch, index)
        except BaseException:
            handed = [r for r in results if isinstance(r, int)]
            for fd in handed:
                self._handed_out.discard(fd)
            close_fds(handed)
            self.budget.release(len(names))
            raise
        # Slots of refused paths come straight back.
        self.budget.release(sum(1 for r in results if not isinstance(r, int)))
        return results

    def release(self, fd: int) -> None:
        """Close an fd that `open_files` returned and give its budget slot back."""
        if fd not in self._handed_out:
            raise ValueError(f"fd {fd} was not handed out by this helper client (or was released already)")
        self._handed_out.discard(fd)
        try:
            os.close(fd)
        finally:
            self.budget.release(1)

    async def _open_batch(self, layer_id: str, batch: list[str], store: int) -> list[int | HelperPathError]:
        params: dict[str, Any] = {"layer": layer_id, "paths": batch}
        if store:
            params["store"] = store
        result, fds = await self._call(api.OPEN_FILES, params)
        try:
            out = self._match_fds(result, batch, fds)
        except ValueError as e:
            close_fds(fds)
            raise await self._misbehaved(str(e)) from None
        self._handed_out.update(r for r in out if isinstance(r, int))
        return out

    @staticmethod
    def _match_fds(result: Any, batch: list[str], fds: list[int]) -> list[int | HelperPathError]:
        entries = result.get("results") if isinstance(result, dict) else None
        if not isinstance(entries, list) or len(entries) != len(batch):
            raise ValueError(f"open_files answered {len(entries) if isinstance(entries, list) else 'no'} "
                             f"results for {len(batch)} paths")  # fmt: skip
        out: list[int | HelperPathError] = []
        used: set[int] = set()
        for name, entry in zip(batch, entries):
            idx = entry.get("fd") if isinstance(entry, dict) else None
            if type(idx) is int:
                if not 0 <= idx < len(fds) or idx in used:
                    raise ValueError(f"fd index {idx} for {name!r} does not match the {len(fds)} fds sent")
                used.add(idx)
                out.append(fds[idx])
                continue
            code, reason, message = (entry.get(k) for k in ("errno", "reason", "message"))
            if type(code) is not int or not isinstance(reason, str) or not isinstance(message, str):
                raise ValueError(f"malformed result for {name!r}: {entry!r}")
            out.append(HelperPathError(code, message, name, reason))
        if len(used) != len(fds):
            raise ValueError(f"{len(fds) - len(used)} of the {len(fds)} fds sent are not referenced by any result")
        return out

    async def _call(self, method: str, params: dict[str, Any] | None = None, *, start: bool = False) -> tuple[Any, list[int]]:
        """One request/response; returns (result, fds). The fds are the caller's."""
        if not start:
            await self._ensure_started()
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            self._next_id += 1
            request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
            if params is not None:
                request["params"] = params
            done = False
            try:
                await asend_with_fds(self._sock, encode(request, 0, api.MAX_MESSAGE_BYTES))
                msg = await self._receive_while_alive()
                done = True
            except (OSError, EOFError, ProtocolError, FdPassError) as e:
                done = True
                raise await self._broken(method, e) from None
            finally:
                if not done:  # cancelled mid-request: the reply would desynchronise the stream
                    self._failure = PycfsError("the user-namespace helper was abandoned in the middle of a request")
        return await self._check_reply(msg, method)

    async def _receive_while_alive(self) -> Message:
        """The next message, or EOFError as soon as the helper process has exited or once it
        is stuck (`stuck`: then it is killed)."""
        pidfd, watch = self._helper_pidfd, self._watch
        if pidfd is None or watch is None:  # the hello: no pid yet, HELLO_TIMEOUT bounds it
            return await self._receive()
        got: list[Message | Exception] = []
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                try:
                    got.append(await self._receive())
                except (OSError, EOFError, ProtocolError, FdPassError) as e:
                    got.append(e)  # raised below, not as an exception group
                nursery.cancel_scope.cancel()

            nursery.start_soon(receive)
            while True:
                with trio.move_on_after(stuck.check_every()):
                    await trio.lowlevel.wait_readable(pidfd)
                    break
                if watch.stuck(True, trio.current_time()):
                    got.append(EOFError(stuck.stuck_message()))
                    # The helper itself first: under podman it is the launcher's child, which
                    # PR_SET_PDEATHSIG alone would take down only once podman is gone.
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    await self._kill()
                    break
            nursery.cancel_scope.cancel()
        if not got:
            raise EOFError("the helper process exited")
        if isinstance(got[0], Exception):
            raise got[0]
        return got[0]

    async def _receive(self) -> Message:
        msg = await receive_message(self._sock, self._decoder)
        if msg is None:
            raise EOFError("the helper closed the connection")
        return msg

    async def _check_reply(self, msg: Message, method: str) -> tuple[Any, list[int]]:
        obj = msg.obj
        if obj.get("id") != self._next_id or obj.get("jsonrpc") != "2.0":
            msg.close()
            raise await self._misbehaved(f"reply {obj!r} does not answer request {self._next_id}")
        if "error" in obj:
            msg.close()
            err = obj["error"] if isinstance(obj["error"], dict) else {}
            code, text = err.get("code"), err.get("message", "?")
            if code == api.ERR_UNKNOWN_LAYER:
                raise PycfsError(f"the user-namespace helper found no such layer: {text}")
            raise PycfsError(f"the user-namespace helper refused {method} (code {code}): {text}")
        if "result" not in obj:
            msg.close()
            raise await self._misbehaved(f"reply without result or error: {obj!r}")
        return obj["result"], msg.fds

    async def _broken(self, method: str, cause: BaseException) -> PycfsError:
        """The connection failed: collect the exit status and output, then describe it."""
        proc = self._proc
        assert proc is not None
        self._sock.close()  # EOF for a helper still alive; podman sees its child go
        died = await self._helper_exits(0.5)
        await self._reap(0 if died else 2)
        status = proc.returncode
        if self.info is None:
            self._failure = PycfsError(
                f"`{' '.join(self.launcher)}` failed to start the helper ({cause}; exit status {status})"
                f"{self._tail_note()}; {_UNSHARE_ADVICE}"
            )
        elif died:  # podman's status says nothing then: we killed it
            self._failure = PycfsError(
                f"the user-namespace helper (pid {self.helper_pid}) died during {method}"
                f"{self._tail_note()}; nothing partial was kept: run the command again"
            )
        else:
            self._failure = PycfsError(
                f"the user-namespace helper (pid {self.helper_pid}) failed during {method}: {cause} "
                f"(exit status {status}){self._tail_note()}"
            )
        return self._failure

    async def _misbehaved(self, what: str) -> PycfsError:
        await self._kill()
        self._failure = PycfsError(f"the user-namespace helper misbehaved: {what}{self._tail_note()}")
        return self._failure
