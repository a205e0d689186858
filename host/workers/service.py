"""The object worker's methods: hash each file passed as an fd, and store it when started
on a repository; inflate and split a layer blob, writing its files into the object store.
Blocking, one connection (see `pycfs.protocol.rpcserver`); only an inflate runs threads
beside its split: its blob source (the blob's read and sha256), its tar source (the
decompression and the tar's sha256) and the writeback of the files it stores."""

from __future__ import annotations

import array
import errno
import functools
import hashlib
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError, describe_oserror
from pycfs.host.fsverity import DIGEST_SIZES, digest_fd, digest_regular_files
if TYPE_CHECKING:  # a digest-only worker (`pycfs measure`) starts without the repository code
    from pycfs.host.oci.layer import Piece
    from pycfs.host.repository import Repository
from pycfs.protocol import worker_api as api
from pycfs.protocol.rpcserver import Call, InvalidParamsError


class WorkerService:
    """``repo`` None: digests only (the `store` method refuses)."""

    def __init__(self, alg: str, repo: Repository | None) -> None:
        self.alg = alg
        self.digest_size = DIGEST_SIZES[alg]
        self.repo = repo
        # layer -> its sha256 so far (or why it is void), oldest first (see feed_layer)
        self._layers: dict[int, Any] = {}

    def methods(self) -> dict[str, Any]:
        return {api.STORE: self.store, api.DIGEST: self.digest, api.ADOPT: self.adopt,
                api.DIGEST_PATHS: self.digest_paths, api.INFLATE: self.inflate,
                api.FEED_LAYER: self.feed_layer, api.LAYER_SHA256: self.layer_sha256}

    def _each(self, call: Call, sizes: Any, one) -> dict[str, Any]:
        if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
            raise InvalidParamsError("sizes must be a list of byte counts")
        if len(sizes) != len(call.fds):
            raise InvalidParamsError(f"{len(sizes)} sizes for {len(call.fds)} fds")
        return self._answer(zip(call.fds, sizes), one)

    def _answer(self, jobs: Iterable[tuple[Any, ...]], one) -> dict[str, Any]:
        ids, how, failed = [], [], []
        for index, job in enumerate(jobs):
            try:
                digest, code = one(*job)
            except OSError as e:
                failed.append([index, e.errno or errno.EIO, e.strerror or str(e)])
            except PycfsError as e:  # e.g. a repository this user may not write to
                failed.append([index, errno.EIO, str(e)])
            else:
                ids.append(digest)
                how.append(code)
                continue
            ids.append(bytes(self.digest_size))
            how.append(api.FAILED)
        return {"ids": b"".join(ids).hex(), "how": "".join(how), "failed": failed}

    def digest(self, call: Call, sizes: Any) -> dict[str, Any]:
        return self._each(call, sizes, lambda fd, size: (digest_fd(fd, self.alg, size), api.DIGESTED))

    def digest_paths(self, call: Call, paths: Any, expect: Any = None) -> dict[str, Any]:
        if call.fds or not isinstance(paths, list) or len(paths) > api.MAX_FILES_PER_REQUEST or not all(
                isinstance(p, str) and p.startswith("/") and "\0" not in p for p in paths):
            raise InvalidParamsError(f"paths must be a list of at most {api.MAX_FILES_PER_REQUEST} absolute paths, "
                                     "with no fds")
        # (what is in an identity only needs to compare: anything but 4 integers is no file's)
        if expect is not None and (type(expect) is not list or len(expect) != len(paths) or not all(
                type(e) is list and len(e) == 4 for e in expect)):
            raise InvalidParamsError("expect must be a file identity (4 integers) per path")
        def one(result: bytes | OSError) -> tuple[bytes, str]:
            if isinstance(result, OSError):
                raise result
            return result, api.DIGESTED

        return self._answer(((r,) for r in digest_regular_files(paths, self.alg, expect)), one)

    def store(self, call: Call, sizes: Any, crcs: Any = None, sha256s: Any = None, leased: Any = False) -> dict[str, Any]:
        if self.repo is None:
            raise InvalidParamsError("this worker was started without a repository")
        if crcs is None:
            crcs = [None] * len(call.fds)
        if not isinstance(crcs, list) or len(crcs) != len(call.fds) or not all(
                c is None or (type(c) is int and 0 <= c < 1 << 64) for c in crcs):
            raise InvalidParamsError("crcs must be a CRC-64 or null per fd")
        if type(leased) is not bool:
            raise InvalidParamsError("leased must be true or false")
        checks = [None] * len(call.fds) if sha256s is None else _sha256_checks(sha256s, len(call.fds))
        expected = iter(zip(crcs, checks))
        return self._each(call, sizes, lambda fd, size: self._store_one(fd, size, *next(expected), leased=leased))

    def feed_layer(self, call: Call, layer: Any, sizes: Any, inline: Any, read: Any, objects: Any = "",
                   first: Any = False) -> dict[str, Any]:
        """The next inline bytes and files of a layer stream, in order, into the layer's
        sha256, each file stored (or digested) here in the same read, or read again as
        stored elsewhere (see `pycfs.protocol.worker_api.FEED_LAYER`)."""
        from pycfs.host.repository import feed_fd, lease_held

        if self.repo is None:
            raise InvalidParamsError("this worker was started without a repository")
        if type(layer) is not int or type(first) is not bool or not call.fds:
            raise InvalidParamsError("feed_layer takes a layer number, first true|false and the inline bytes' file")
        if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
            raise InvalidParamsError("sizes must be a list of byte counts")
        if not isinstance(inline, list) or len(inline) != len(sizes) + 1 or not all(type(n) is int and n >= 0 for n in inline):
            raise InvalidParamsError("inline must be a byte count before each file and one after the last")
        if not isinstance(read, str) or len(read) != len(sizes) or not set(read) <= set(api.FEED_READS) \
                or len(read) - read.count("o") != len(call.fds) - 1:
            raise InvalidParamsError(f"read must be one of {api.FEED_READS} per file, with an fd for each but o")
        try:
            ids = bytes.fromhex(objects) if isinstance(objects, str) else b"-"
        except ValueError:
            ids = b"-"
        given = len(read) - read.count("h") - read.count("d")
        if len(ids) != given * self.digest_size:
            raise InvalidParamsError(f"objects must be {given} digests in hex, back to back")
        data = memoryview(os.pread(call.fds[0], sum(inline), 0))
        if len(data) != sum(inline):
            raise InvalidParamsError(f"the inline bytes' file holds {len(data)} bytes, not {sum(inline)}")
        # The layer's sha256 so far; a str says why it is void, None: forgotten (a later
        # request of a layer past api.MAX_LAYERS_HELD continues no sha256: never a digest of
        # only its later bytes).
        sha: Any = hashlib.sha256() if first else self._layers.pop(layer, None)

        def live() -> bool:
            return not isinstance(sha, str | None)

        def one(fd: int, size: int, mode: str) -> tuple[bytes, str]:
            """A file stored (h) or digested (d) here, its content into the sha256 in the same read."""
            nonlocal sha
            passes: list[Any] = []

            def content() -> Callable[[memoryview], None]:
                """Each pass over the content starts from the sha256 before this file: the
                last pass is the one stored."""
                passes.append(sha.copy() if live() else None)
                return passes[-1].update if live() else _ignore

            try:
                if mode == "h":
                    result = self._store_one(fd, size, None, None, content)
                else:
                    result = digest_fd(fd, self.alg, size, content()), api.DIGESTED
            except BaseException as e:
                if live():  # its content is not in the sha256: the layer's digest is void
                    sha = f"a file of the layer could not be stored: {e}"
                raise
            if passes and live():
                sha = passes[-1]
            return result

        def files() -> Iterator[tuple[int, int, str]]:
            """The files to store or digest here, for `_answer`, which takes them one by one:
            between them, in stream order, the inline bytes and the files read again."""
            nonlocal sha
            fds, offset, at = iter(call.fds[1:]), 0, 0
            for i, size in enumerate(sizes):
                if live():
                    sha.update(data[offset : offset + inline[i]])
                offset += inline[i]
                mode = read[i]
                if mode in "hd":
                    yield next(fds), size, mode
                    continue
                fd = next(fds) if mode != "o" else -1
                object_id, at = ids[at : at + self.digest_size], at + self.digest_size
                if not live():
                    continue
                try:
                    if mode == "o":
                        self.repo.feed_object(object_id, size, sha.update)  # type: ignore[union-attr]
                    elif feed_fd(fd, size, sha.update) != size:
                        raise PycfsError(f"the source of object {object_id.hex()} is shorter than its {size} bytes")
                    elif mode == "l" and not lease_held(fd):
                        raise PycfsError(f"the source of object {object_id.hex()} was opened for writing while it "
                                         "was stored: it may have changed; send the layer again")
                except (OSError, PycfsError) as e:
                    sha = str(e) if isinstance(e, PycfsError) else f"cannot read a stored object: {e.strerror or e}"
            if live():
                sha.update(data[offset:])

        try:
            return self._answer(files(), one)
        finally:
            self._layers[layer] = sha
            while len(self._layers) > api.MAX_LAYERS_HELD:  # layers whose caller gave up
                del self._layers[next(iter(self._layers))]

    def layer_sha256(self, call: Call, layer: Any) -> dict[str, Any]:
        if type(layer) is not int or call.fds:
            raise InvalidParamsError("layer_sha256 takes a layer number and no fds")
        sha = self._layers.pop(layer, None)
        if isinstance(sha, str | None):
            return {"sha256": None, "failed": sha}
        return {"sha256": sha.hexdigest()}

    def adopt(self, call: Call, sizes: Any) -> dict[str, Any]:
        if self.repo is None:
            raise InvalidParamsError("this worker was started without a repository")
        return self._each(call, sizes, self._adopt_one)

    def inflate(self, call: Call, compression: Any, blob_alg: Any, diff_alg: Any, store: Any = False) -> dict[str, Any]:
        from pycfs.host.oci.layer import TarSplitter, close_pieces
        from pycfs.host.oci.tar import TarError

        if self.repo is None:
            raise InvalidParamsError("this worker was started without a repository")
        if (len(call.fds) != 2 or compression not in ("gzip", "zstd", "none") or not {blob_alg, diff_alg} <= set(DIGEST_SIZES)
                or type(store) is not bool):
            raise InvalidParamsError("inflate takes the blob and a socket, gzip|zstd|none, two hash names and store true|false")
        blob_fd, sock_fd = call.fds
        sock = socket.socket(fileno=sock_fd)  # closed below: the host's EOF
        call.fds[1] = -1  # (the request's fds are closed after the answer)
        source: _TarSource | None = None
        writeback: _Writeback | None = None
        try:
            source = _TarSource(blob_fd, compression, blob_alg, diff_alg)
            writeback = _Writeback() if store else None
            splitter = TarSplitter(self.repo, source, defer=True, hashed=True, hash_files=store)
            while True:
                if splitter.hash_files and _handed_off(sock):  # before the run: its files unhashed
                    splitter.hash_files = False
                if not (pieces := splitter.chunk()):
                    break
                try:
                    if splitter.hash_files and writeback is not None:
                        self._adopt_pieces(pieces, writeback)
                    _send_pieces(sock, pieces)
                finally:
                    close_pieces(pieces)
        except TarError as e:
            return {"failed": f"{e} (is the blob damaged?)"}
        except (OSError, PycfsError) as e:
            return {"failed": str(e) if isinstance(e, PycfsError)
                    else f"cannot inflate the layer into {self.repo.path}: {describe_oserror(e)}"}
        finally:
            if source is not None:
                source.close()
            if writeback is not None:
                writeback.close()
            sock.close()
        return {"blob": source.blob.digest(), "blob_size": source.blob.count, "diff_id": source.tar.digest(),
                "tar_size": source.tar.count, "files_inlined": splitter.files_inlined}

    def _adopt_pieces(self, pieces: list[Piece], writeback: _Writeback) -> None:
        """Make each pending file of a split run its object, here (`adopt`'s work), in place;
        ``writeback`` takes their fds."""
        from pycfs.host.oci.layer import PendingFile, StoredFile

        assert self.repo is not None
        adopted: list[tuple[int, bool]] = []
        try:
            for i, piece in enumerate(pieces):
                if isinstance(piece, PendingFile):
                    result = self.repo.adopt_object_file(piece.fd, piece.size, piece.object_id)
                    pieces[i] = StoredFile(result.object_id, piece.size, result.how)
                    adopted.append((piece.fd, result.how == "copied"))
        finally:
            writeback.take(adopted)

    def _adopt_one(self, fd: int, size: int, object_id: bytes | None = None) -> tuple[bytes, str]:
        assert self.repo is not None
        result = self.repo.adopt_object_file(fd, size, object_id)
        if result.how == "copied":
            # Written just now by the caller and dirty: to disk while the pull goes on,
            # not all at its closing syncfs (the kernel starts writing back on its own
            # only past dirty_background_ratio, 10% of RAM: 2.3 GB on the bench machine).
            syscalls.start_writeback(fd)
        return result.object_id, api.HOW_CODES[result.how]

    def _store_one(self, fd: int, size: int, crc: int | None,
                   sha256: tuple[bytes, bytes] | None = None,
                   also: Callable[[], Callable[[memoryview], None]] | None = None,
                   leased: bool = False) -> tuple[bytes, str]:
        assert self.repo is not None
        observer: Callable[[], Callable[[memoryview], object]] | None
        if sha256 is None and also is None:  # a layer's file: its CRC-64 or nothing to check
            observer = None if crc is None else functools.partial(_Crc64Check, crc, size)
        elif crc is None and sha256 is None:  # a PutLayer file: the layer's sha256 alone
            observer = also
        else:
            def observer() -> Callable[[memoryview], None]:
                """A fresh set of checks for each pass over the content."""
                checks: list[Callable[[memoryview], None]] = [] if crc is None else [_Crc64Check(crc, size)]
                if sha256 is not None:
                    checks.append(_PrefixedSha256Check(*sha256, size))
                if also is not None:
                    checks.append(also())

                def observe(piece: memoryview) -> None:
                    for check in checks:
                        check(piece)

                return observe

        result = self.repo.store_object_from_fd(fd, None, observer, size, caller_lease=leased)
        if result.size != size:
            raise OSError(errno.ESTALE, "changed size while it was stored")
        return result.object_id, api.HOW_CODES[result.how]


def _handed_off(sock: socket.socket) -> bool:
    """Whether the host sent HAND_OFF (see `worker_api.INFLATE`); never waits."""
    try:
        message = sock.recv(64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    if message == api.HAND_OFF:
        return True
    if message:
        raise PycfsError(f"the host sent {message[:16]!r} on the inflate socket")
    return False  # the host's end closed: the next send says so


def _ignore(piece: memoryview) -> None:
    pass


def _send_pieces(sock: socket.socket, pieces: list[Piece]) -> None:
    """A split tar's pieces as the inflate's messages (see `worker_api.pack_runs`)."""
    from pycfs.host.oci.layer import PendingFile

    def records() -> Iterator[tuple[bytes, int | None]]:
        for piece in pieces:
            if isinstance(piece, bytes):
                view = memoryview(piece)
                for at in range(0, len(view), api.MAX_INLINE_RECORD):
                    yield api.piece_record(api.PIECE_INLINE, view[at : at + api.MAX_INLINE_RECORD]), None
            elif isinstance(piece, PendingFile):
                yield api.piece_record(api.PIECE_FILE, size=piece.size), piece.fd
            else:
                yield api.piece_record(api.PIECE_STORED, piece.object_id, piece.size, piece.how), None

    for message, fds in api.pack_runs(records()):
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


# The tar's pieces; _TAR_AHEAD of them wait for the split at most.
_INFLATE_PIECE = 1 << 20
_TAR_AHEAD = 4


class _TarSource:
    """A layer's tar made by threads of their own, ahead of the split in the worker's thread:
    one reads and hashes the blob (`_BlobSource`), this one decompresses it and hashes the
    tar, so that the two sha256 passes and the decompression run beside each other, the
    split, the files' fs-verity digests and their writes (a pull tends to end on its
    largest layer alone: one core did all but the blob's sha256 then, and with the three
    on one thread that thread was the layer's longest). read() hands on the tar's pieces
    as they came (the splitter takes any length), b"" at EOF, once the blob was read to its
    end: a digest covers every byte, trailing ones included. `blob` and `tar` (count,
    digest()) are final once `close` returned."""

    def __init__(self, fd: int, compression: str, blob_alg: str, diff_alg: str) -> None:
        from pycfs.host.oci.layer import HashingReader, decompressing_reader

        self._stop = threading.Event()
        self.blob = _BlobSource(fd, blob_alg, self._stop)
        try:
            self.tar = HashingReader(decompressing_reader(self.blob, compression), diff_alg)
        except BaseException:  # (an unknown compression) the blob's thread must not wait for good
            self._stop.set()
            self.blob.close()
            raise
        self._pieces: queue.Queue[bytes | Exception] = queue.Queue(_TAR_AHEAD)
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="tar source")
        self._thread.start()

    def _run(self) -> None:
        _pump(self.tar.read, self._pieces, self._stop, self._drain_blob)

    def _drain_blob(self) -> None:
        """The blob read to its end after the tar's: its digest covers trailing bytes too."""
        while not self._stop.is_set() and self.blob.read(_INFLATE_PIECE):
            pass

    def read(self, n: int = -1) -> bytes:
        if self._eof:
            return b""
        item = self._pieces.get()
        if isinstance(item, Exception):
            self._eof = True
            raise item
        self._eof = not item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.blob.close()

    # What `TarSplitter(hashed=True)` takes of its source (`HashedSource`): the tar's
    # figures, final once `close` returned.
    @property
    def count(self) -> int:
        return self.tar.count

    def digest(self) -> str:
        return self.tar.digest()


class _BlobSource:
    """A blob read and hashed on a thread of its own, _TAR_AHEAD pieces ahead of its reader
    (the decompressor): read(n) hands out its bytes in order, b"" at its end, or once
    ``stop`` is set (nobody wants the rest). `count` and `digest()` are final once `close`
    returned."""

    def __init__(self, fd: int, alg: str, stop: threading.Event) -> None:
        from pycfs.host.oci.layer import HashingReader

        self._hashing = HashingReader(os.fdopen(fd, "rb", buffering=0, closefd=False), alg)
        self._stop = stop
        self._pieces: queue.Queue[bytes | Exception] = queue.Queue(_TAR_AHEAD)
        self._piece = b""
        self._at = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="blob source")
        self._thread.start()

    def _run(self) -> None:
        _pump(self._hashing.read, self._pieces, self._stop)

    def read(self, n: int = -1) -> bytes:
        if self._at == len(self._piece):
            if self._eof:
                return b""
            item: bytes | Exception | None = None
            while item is None and not self._stop.is_set():
                try:
                    item = self._pieces.get(timeout=0.1)
                except queue.Empty:
                    pass
            if item is None or isinstance(item, Exception) or not item:
                self._eof = True
                if isinstance(item, Exception):
                    raise item
                return b""
            self._piece, self._at = item, 0
        if self._at == 0 and (n < 0 or n >= len(self._piece)):
            self._at = len(self._piece)
            return self._piece  # handed on whole, not copied
        end = len(self._piece) if n < 0 else min(self._at + n, len(self._piece))
        data = self._piece[self._at : end]
        self._at = end
        return data

    def close(self) -> None:
        """Once the thread is gone (``stop`` must be set, or the blob read to its end)."""
        self._thread.join()

    @property
    def count(self) -> int:
        return self._hashing.count

    def digest(self) -> str:
        return self._hashing.digest()


def _pump(read: Callable[[int], bytes], pieces: queue.Queue[bytes | Exception], stop: threading.Event,
          at_end: Callable[[], None] | None = None) -> None:
    """A source thread's loop: what ``read`` gives onto ``pieces`` until its end (then
    ``at_end``, then b""), or until ``stop``; an error raised in this thread (a corrupt
    blob, a read error) goes on the queue for the reader to raise."""
    try:
        while piece := read(_INFLATE_PIECE):
            if not _put(pieces, piece, stop):
                return
        if at_end is not None:
            at_end()
        _put(pieces, b"", stop)
    except Exception as e:
        _put(pieces, e, stop)


def _put(pieces: queue.Queue[bytes | Exception], item: bytes | Exception, stop: threading.Event) -> bool:
    """Put item on a source's queue; False when the source was closed (``stop``): nobody
    takes pieces any more."""
    while not stop.is_set():
        try:
            pieces.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


# Runs of adopted files whose writeback waits to be started, at most (their fds open).
_WRITEBACK_RUNS = 2


class _Writeback:
    """Starts the writeback of files just adopted (as `WorkerService._adopt_one` does inline) and
    closes them, on a thread of its own, a run at a time: in an inflating worker that
    stores its files, the filesystem's block allocation and I/O submission (~60 us a
    file) then run beside the split instead of on its thread.

    The split never waits for it: when the device is slower than the split (writeback
    throttling blocks sync_file_range: on the bench's loop XFS, wbt's 2 ms latency target),
    a run that finds _WRITEBACK_RUNS waiting is closed at once, its pages left dirty for the
    layer's commit (its syncfs writes them, at the device's full rate). Measured
    (workload(0.5), zstd): the split waited 0.4-0.9 s per layer here, of ~3 s."""

    def __init__(self) -> None:
        self._runs: queue.Queue[list[tuple[int, bool]] | None] = queue.Queue(_WRITEBACK_RUNS)
        self._thread = threading.Thread(target=self._run, name="writeback")
        self._thread.start()

    def _run(self) -> None:
        while (run := self._runs.get()) is not None:
            for fd, dirty in run:  # (fd, whether its object was written just now)
                if dirty:
                    syscalls.start_writeback(fd)  # advisory: never raises
                _close(fd)

    def take(self, run: list[tuple[int, bool]]) -> None:
        """The fds of a run, each with whether to start its writeback: closed by the thread,
        or here, without their writeback, when it is behind."""
        try:
            self._runs.put_nowait(run)
        except queue.Full:
            for fd, _ in run:
                _close(fd)

    def close(self) -> None:
        """Once every run taken is done."""
        self._runs.put(None)
        self._thread.join()


def _close(fd: int) -> None:
    """An adopted object's fd."""
    try:
        os.close(fd)
    except OSError:
        pass  # nothing to do about it: the object is linked, syncfs reports write errors


@functools.cache
def _crc64_iso() -> Callable[[memoryview, int], int]:
    """tar-split's CRC, imported once on first use (an import statement per file cost 1.8 µs;
    a worker that checks no CRC need not import tar-split at all)."""
    from pycfs.host.storage.tarsplit import crc64_iso

    return crc64_iso


class _Crc64Check:
    """Sees every byte stored (in order) and refuses the object, before it is named, when
    their CRC-64/GO-ISO is not the tar-split's: the check costs no read of its own."""

    def __init__(self, expected: int, size: int) -> None:
        self.crc64_iso = _crc64_iso()
        self.expected = expected
        self.size = size
        self.crc = 0
        self.seen = 0

    def __call__(self, piece: memoryview) -> None:
        self.crc = self.crc64_iso(piece, self.crc)
        self.seen += len(piece)
        if self.seen >= self.size and self.crc != self.expected:
            raise OSError(errno.EBADMSG, "its content does not match the layer's tar-split checksum (CRC-64)")


def _sha256_checks(sha256s: Any, count: int) -> list[tuple[bytes, bytes] | None]:
    if not isinstance(sha256s, list) or len(sha256s) != count:
        raise InvalidParamsError("sha256s must be null or [PREFIX, SHA-256] per fd")
    bad = InvalidParamsError("sha256s must be null or [PREFIX, SHA-256] (hex) per fd")
    try:
        checks = [None if c is None else (bytes.fromhex(c[0]), bytes.fromhex(c[1])) for c in sha256s]
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        raise bad from None
    if any(c is not None and len(c[1]) != 32 for c in checks):
        raise bad
    return checks


class _PrefixedSha256Check:
    """The SHA-256 of a prefix followed by every byte stored (an ostree content checksum:
    header, then content), computed in the same read as the object's digest; the object is
    refused, before it is named, unless it matches."""

    def __init__(self, prefix: bytes, expected: bytes, size: int) -> None:
        self.hash = hashlib.sha256(prefix)
        self.expected = expected
        self.size = size
        self.seen = 0
        if size == 0:
            self.finish()

    def __call__(self, piece: memoryview) -> None:
        self.hash.update(piece)
        self.seen += len(piece)
        if self.seen >= self.size:
            self.finish()

    def finish(self) -> None:
        if self.hash.digest() != self.expected:
            raise OSError(errno.EBADMSG, "its content does not match its SHA-256 checksum")
