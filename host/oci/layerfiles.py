"""A containers-storage layer's files and tar-split as the import reads them, free of trio:
the CLI begins the first layer's import (`pycfs.host.oci.headstart`) before the event loop
is imported, with the same code the import (`pycfs.host.oci.cstorage`) then goes on with.

Files are opened beneath the layer directory with openat2 (RESOLVE_CONFINED, O_NOFOLLOW):
nothing a tar-split names can lead outside it, and nothing but a regular file is opened. A
file the user may not open raises `Denied` (the helper must open it). An overlay metacopy
stub (metadata only) is looked up in the layer's ancestors.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import read_ahead
from pycfs.host.storage.store import Store, StorageError
from pycfs.host.storage.tarsplit import (
    FileEntry,
    Segment,
    check_name,
    closed_to_user,
    crc64_iso,
    header_only_kind,
    is_sparse,
)
from pycfs.host.workers.batching import BATCH_BYTES
from pycfs.protocol.helper_api import layer_dir

INLINE_CONTENT_MAX = 64  # format constant shared with the tar path: larger files are objects
_METACOPY_XATTRS = ("user.overlay.metacopy", "trusted.overlay.metacopy")
_REDIRECT_XATTRS = ("user.overlay.redirect", "trusted.overlay.redirect")
_DENIED = (errno.EACCES, errno.EPERM)
CHUNK_ENTRIES = 1024  # tar-split entries read at a time
# ... and tar bytes held in memory by a chunk (headers, padding): a real layer's come to a
# few hundred KiB; 1024 entries of 8 MiB each (a crafted tar-split) took 3.2 GB
CHUNK_BYTES = 4 << 20


# ---- opening layer files --------------------------------------------------------------


class Denied(Exception):
    """The user may not open this file: the helper must."""


class LayerFiles:
    """Opens a layer's files beneath its directory, falling back to ancestors for metacopy stubs."""

    def __init__(self, store: Store, layer_id: str) -> None:
        self.store = store
        self.layer_id = layer_id
        self._chain: list[str] | None = None
        self._dirfds: dict[str, int] = {}
        self._lock = threading.Lock()

    def chain(self) -> list[str]:
        if self._chain is None:
            self._chain = [self.layer_id] + self.store.lower_layer_ids(self.layer_id)
        return self._chain

    def dirfd(self, layer_id: str) -> int:
        with self._lock:  # worker threads share the directory fds
            fd = self._dirfds.get(layer_id)
            if fd is None:
                path = self.store.layer_dir(layer_id)
                fd = self._open_layer_dir(layer_id, path)
                self._dirfds[layer_id] = fd
            return fd

    def _open_layer_dir(self, layer_id: str, path: os.PathLike[str]) -> int:
        """The layer directory, reached from the storage root with no symlink on the way:
        `overlay/<id>/diff` replaced by a symlink would otherwise lead the import anywhere
        the user can read (the storage root itself is the user's own configuration)."""
        try:
            root = os.open(self.store.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot open the storage root {self.store.root}: {e.strerror}") from e
        try:
            return syscalls.openat2(root, layer_dir(self.store.driver, layer_id),
                                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                                    syscalls.RESOLVE_CONFINED)
        except OSError as e:
            if e.errno in _DENIED:
                # The layer's root belongs to a user-namespace uid: every file goes to the helper.
                raise Denied(path) from e
            if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise StorageError(f"layer directory {path} is or passes through a symlink, or is no directory: "
                                   "refused") from e
            raise StorageError(f"cannot open layer directory {path}: {e.strerror}") from e
        finally:
            os.close(root)

    def close(self) -> None:
        fds, self._dirfds = self._dirfds, {}
        for fd in fds.values():
            os.close(fd)

    def describe(self, relpath: bytes) -> str:
        return f"{os.fsdecode(relpath)} (layer {self.layer_id[:12]}, {self.store.layer_dir(self.layer_id)})"

    def open(self, relpath: bytes, size: int) -> tuple[int, os.stat_result]:
        """A read-only fd for the content of `relpath`, and its fstat; raises Denied on EACCES/EPERM.

        The file must be in the layer's own directory (its tar-split lists it): a lower
        layer's file is taken only for an overlay metacopy stub, whose data lives below."""
        opened = self._open_regular(self.layer_id, relpath, relpath)
        if opened is None:
            raise PycfsError(f"{self.describe(relpath)} is missing from the layer directory")
        fd, st = opened
        below = self._closing_on_error(fd, st, size, relpath)
        if below is None:
            return fd, st
        os.close(fd)
        for layer_id in self.chain()[1:]:
            opened = self._open_regular(layer_id, below, relpath)
            if opened is None:
                continue
            fd, st = opened
            deeper = self._closing_on_error(fd, st, size, below)
            if deeper is None:
                return fd, st
            os.close(fd)
            below = deeper
        raise PycfsError(f"{self.describe(relpath)} is an overlay metacopy stub whose data is in no layer below it")

    def _open_regular(self, layer_id: str, path: bytes, relpath: bytes) -> tuple[int, os.stat_result] | None:
        """Open `path` beneath the layer only if it is a regular file (fd and fstat, see
        `syscalls.open_regular`); None when absent. EACCES sends the file to the helper."""
        try:
            return syscalls.open_regular(self.dirfd(layer_id), path)
        except syscalls.NotRegularFile as e:
            raise PycfsError(f"{self.describe(relpath)} is {e.kind}, not a regular file") from None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            if e.errno in _DENIED:
                raise Denied(relpath) from e
            if e.errno in (errno.ELOOP, errno.EXDEV):
                raise PycfsError(f"{self.describe(relpath)} is a symlink or leads outside the layer") from e
            raise PycfsError(f"cannot open {self.describe(relpath)}: {e.strerror}") from e

    def _closing_on_error(self, fd: int, st: os.stat_result, size: int, path: bytes) -> bytes | None:
        try:
            return self.metacopy_lookup(fd, st, size, path)
        except BaseException:
            os.close(fd)
            raise

    def metacopy_lookup(self, fd: int, st: os.stat_result, size: int, path: bytes) -> bytes | None:
        """None for a real file; for an overlay metacopy stub, the path to look up in lower layers."""
        if st.st_blocks or not size:
            return None  # a stub has no data blocks: checking xattrs only then keeps this cheap
        if not any(_has_xattr(fd, name) for name in _METACOPY_XATTRS):
            return None
        for name in _REDIRECT_XATTRS:
            try:
                target = os.getxattr(fd, name)
            except OSError:
                continue
            # An absolute redirect is from the layer root; a relative one replaces the last component.
            below = target.lstrip(b"/") if target.startswith(b"/") else os.path.join(os.path.dirname(path), target)
            try:
                check_name(below, "overlay redirect")
            except PycfsError as e:
                raise PycfsError(f"{self.describe(path)}: {e}: the store is damaged") from None
            return below
        return path




def _has_xattr(fd: int, name: str) -> bool:
    try:
        os.getxattr(fd, name)
    except OSError as e:
        if e.errno == errno.ERANGE:
            return True
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return False
        raise
    return True


def _check_fd(fd: int, entry: FileEntry, files: LayerFiles, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PycfsError(f"{files.describe(entry.relpath)} is not a regular file")
    if st.st_size != entry.size:
        raise PycfsError(
            f"{files.describe(entry.relpath)} has {st.st_size} bytes but the layer's tar-split says {entry.size}"
        )


def _read_small(fd: int, entry: FileEntry, files: LayerFiles, st: os.stat_result) -> bytes:
    _check_fd(fd, entry, files, st)
    data = os.pread(fd, entry.size, 0)
    if len(data) != entry.size:
        raise PycfsError(f"short read of {files.describe(entry.relpath)}")
    if entry.crc64 is not None and crc64_iso(data) != entry.crc64:
        raise PycfsError(f"content of {files.describe(entry.relpath)} does not match the tar-split checksum")
    return data


# ---- reading the tar-split ------------------------------------------------------------


class TarSplitReader:
    """A layer's tar-split entries, a chunk at a time, checked as they are taken.

    ``size``: the bytes c/storage recorded for the layer's tar, when it did: the entries
    may describe no more (a 47 KB tar-split naming one 5 KB file 200,000 times cost 13 s
    of opens and hashing before the size was compared at the end)."""

    def __init__(self, source: Iterator[Segment | FileEntry], files: LayerFiles, size: int | None = None) -> None:
        self.source = source
        self.files = files
        self.size = size
        self.described = 0  # bytes of the tar the entries taken stand for
        self._header: Segment | FileEntry | None = None  # the entry before the next one read
        # Set at the first file or directory the user likely cannot open (`closed_to_user`).
        self.helper_wanted = False

    def take(self, count: int) -> list[Segment | FileEntry]:
        """The next ``count`` entries, fewer once their tar bytes held here reach CHUNK_BYTES
        (none at the end). A file whose tar header says it carries no data (a fifo, a device,
        ...) yet has a size is refused here, unopened."""
        entries: list[Segment | FileEntry] = []
        held = 0
        for entry in self.source:
            entries.append(entry)
            if isinstance(entry, Segment):
                held += len(entry.data)
                self.described += len(entry.data)
            else:
                if isinstance(self._header, Segment):
                    if is_sparse(self._header):
                        raise PycfsError(
                            f"the layer holds sparse file {self.files.describe(entry.relpath)}, which "
                            "containers-storage cannot describe (its tar-split records the holes as data the "
                            "layer's tar does not have): rebuild the layer without sparse files (tar without "
                            "--sparse) and import it again"
                        )
                    if entry.size and (kind := header_only_kind(self._header)) is not None:
                        raise PycfsError(
                            f"{self.files.describe(entry.relpath)} is a {kind} in the layer's tar, yet its tar-split "
                            f"entry gives it {entry.size} bytes of data: the layer is damaged or crafted"
                        )
                    if not self.helper_wanted and closed_to_user(self._header):
                        self.helper_wanted = True
                self.described += entry.size
            self._header = entry
            if self.size is not None and self.described > self.size:
                raise PycfsError(f"the tar-split of layer {self.files.layer_id[:12]} describes more than the "
                                 f"{self.size} bytes c/storage recorded for its tar: the store is damaged "
                                 "(pull the image with podman again)")
            if len(entries) >= count or held >= CHUNK_BYTES:
                break
        return entries


def stored_files(entries: list[Segment | FileEntry]) -> list[tuple[int, FileEntry]]:
    """The files of a chunk whose content is read: (index in the chunk, entry)."""
    return [(i, e) for i, e in enumerate(entries) if isinstance(e, FileEntry) and e.size > 0]


Item = TypeVar("Item", bound=tuple)


def file_batches(items: Iterable[Item], most: int) -> Iterator[list[Item]]:
    """Files (tuples ending in their FileEntry) grouped so one trip to a thread and a worker
    handles many small files (or one big one): at most `most` files or BATCH_BYTES of
    content (the last file may go past)."""
    batch: list[Item] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item[-1].size
        if len(batch) >= most or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---- opening a batch -------------------------------------------------------------------


def open_batch(files: LayerFiles, entries: list[FileEntry]) -> list[bytes | int | None]:
    """Per file, its bytes (small files, read here), an open fd (to store), or None (the
    helper must open it). On error every fd opened so far is closed.

    Every file is opened, and its content asked for (readahead), before any is read: with a
    cold page cache the disk then works on the whole batch at once instead of one file at a
    time, here and in the object workers that read the rest."""
    opened: list[tuple[int, os.stat_result] | None] = []
    out: list[bytes | int | None] = []
    try:
        for entry in entries:
            try:
                fd, st = files.open(entry.relpath, entry.size)
            except Denied:
                opened.append(None)
                continue
            opened.append((fd, st))
            read_ahead(fd, entry.size)
        for i, (entry, got) in enumerate(zip(entries, opened)):
            if got is None:
                out.append(None)
                continue
            data = inline_or_fd(files, entry, *got, owned=False)
            if isinstance(data, bytes):
                os.close(got[0])
                opened[i] = None
            out.append(data)
    except BaseException:
        for got in opened:  # every fd still open, kept for the workers or not
            if got is not None:
                os.close(got[0])
        raise
    return out


def inline_or_fd(files: LayerFiles, entry: FileEntry, fd: int, st: os.stat_result, owned: bool = True) -> bytes | int:
    """Small files become their bytes (fd closed when owned); larger ones keep the fd."""
    try:
        data = _read_small(fd, entry, files, st) if entry.size <= INLINE_CONTENT_MAX else None
        if data is None:
            _check_fd(fd, entry, files, st)
    except BaseException:
        if owned:
            os.close(fd)
        raise
    if data is None:
        return fd
    if owned:
        os.close(fd)
    return data
