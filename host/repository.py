"""A composefs repository in the composefs-rs on-disk format (spec section 1).

    meta.json                 format, hash algorithm, feature flags
    objects/XX/<rest>         content-addressed by fs-verity digest
    streams/<content-id>  ->  ../objects/XX/<rest>       (splitstreams)
    streams/refs/<name>   ->  ../<content-id>
    images/<hex>          ->  ../objects/XX/<rest>       (EROFS images)
    images/refs/<name>    ->  ../<hex>

Objects are written crash-safely (O_TMPFILE + linkat, or a named temp + renameat2
when O_TMPFILE is unsupported) and never fsynced one by one: one syncfs happens before
a stream symlink makes them reachable. Openers hold flock(LOCK_SH); gc takes LOCK_EX.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import secrets
import signal
import stat
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn
from pathlib import Path

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError, describe_oserror
from pycfs.host.fsverity import DIGEST_SIZES, HASH_ALG_IDS, VerityHasher, digest_bytes, digest_fd
from pycfs.host.jsondoc import parse_object, read_document
from pycfs.host.splitstream import SplitStreamReader, SplitStreamWriter
from pycfs.protocol.text import shown

FORMAT_VERSION = 1
ALGORITHMS = ("fsverity-sha256-12", "fsverity-sha512-12")
KNOWN_FEATURES = {"v1_erofs"}
_TEMP_ALPHABET = string.ascii_letters + string.digits
FEED_PIECE = 1 << 20  # feed_object's reads
_feed_buffers = threading.local()
# has_objects lists an objects/XX directory instead of looking its objects up one by one when
# it wants at least one object per this many bytes of the directory: an entry takes about 80
# bytes (XFS, ext4), and reading one from a listing costs about a fifteenth of a lookup.
LISTING_BYTES_PER_LOOKUP = 80 * 15
# A store looks its object up before cloning or sealing it only while lookups find objects:
# after this many misses in a row (a first pull of new content) it skips the lookup, and the
# link's EEXIST says "present" instead (the clone or seal then was wasted work). A hit, or an
# EEXIST, turns lookups back on, so a re-pull of mostly present objects keeps them. A wasted
# clone (O_TMPFILE, FICLONE, a failed linkat) costs about five lookups (py-spy, bench import),
# so 32 bounds the loss on mixed content to a few lookups per 33 objects.
LOOKUP_MISSES_BEFORE_SKIPPING = 32
# How many components a ref name may have (streams/refs/a/b/c is 3): the refs trees are walked
# with a directory fd per level, and a directory at this depth can hold no ref.
REF_DEPTH_LIMIT = 64
# How long an opener waits for a gc or fsck --repair (which hold the repository's lock
# alone), and they for the other openers (a pull holds it for its length, a FUSE mount or a
# varlink service for as long as they run): then an error naming the repository.
LOCK_WAIT = 600.0
_LOCK_POLL = 0.1
# The directories of the layout: each must be a directory of the repository itself (a link
# there would have gc and fsck delete, or vouch for, what lies elsewhere).
LAYOUT_DIRS = ("objects", "streams", "images", "streams/refs", "images/refs")
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# The largest splitstream any writer makes: a layer stream's body (MAX_LAYER_BODY, 256 MiB),
# its object references (an image's million entries at most, 64 bytes each) and named refs
# (NAMED_REFS_MAX), with room.
MAX_STREAM_OBJECT = 384 << 20


class RepositoryError(PycfsError):
    pass


@dataclass(frozen=True)
class StoreResult:
    """What storing one object did: how is "reflinked", "copied" or "present"."""

    object_id: bytes
    size: int
    how: str


def parse_algorithm(text: str) -> str:
    """'fsverity-sha256-12' -> 'sha256'; anything else is an error."""
    if text not in ALGORITHMS:
        raise RepositoryError(f"unsupported algorithm {text!r}: use one of {', '.join(ALGORITHMS)}")
    return text.split("-")[1]


def meta_document(algorithm: str, erofs_default: int = 1) -> dict:
    """meta.json as composefs-rs writes it; key order matters for identical bytes."""
    return {
        "version": FORMAT_VERSION,
        "algorithm": algorithm,
        "features": {
            "compatible": [],
            "read-only-compatible": ["v1_erofs"] if erofs_default == 1 else [],
            "incompatible": [],
        },
        "erofs_formats": {"default": erofs_default},
    }


def _random_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(12))


def check_name(name: str, what: str, allow_slash: bool) -> None:
    """Stream, image and ref names must stay inside their directory."""
    parts = name.split("/")
    if (
        not name
        or "\0" in name
        or name.startswith("/")
        or (not allow_slash and len(parts) > 1)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise RepositoryError(f"invalid {what} name {name!r}")
    if len(parts) > REF_DEPTH_LIMIT:
        raise RepositoryError(f"invalid {what} name {name[:80]!r}...: more than {REF_DEPTH_LIMIT} components")


@dataclass(frozen=True)
class RefEntry:
    """One entry of a refs tree (`Repository.walk_refs`): path is repository-relative; kind
    is "link" (a symlink to something that is not a directory), "dangling" (a symlink that
    leads nowhere), "dir-link" (a symlink to a directory: never followed), "dir", "too-deep"
    (a directory at REF_DEPTH_LIMIT: not entered) or "other" (a file, fifo, socket or device)."""

    path: str
    kind: str
    target: str = ""


def _lock_shared(path: Path, dirfd: int, waiting: Callable[[str], object] | None) -> None:
    """The repository's lock, shared with its other openers: while a gc or fsck --repair
    holds it alone, wait at most LOCK_WAIT (saying so once)."""
    told = None if waiting is None else lambda: waiting(f"waiting for a gc or fsck --repair to finish with {path}...")
    if not _flock_within(dirfd, fcntl.LOCK_SH, LOCK_WAIT, told):
        raise RepositoryError(f"{path} stayed locked by a gc or fsck --repair for {LOCK_WAIT:.0f} s: "
                              f"`fuser -v {path}` names it")


def _flock_within(fd: int, operation: int, wait: float, on_wait: Callable[[], object] | None) -> bool:
    """flock(fd, operation), trying every _LOCK_POLL for at most ``wait`` seconds from the
    first refusal (``on_wait`` is called then, once); False when it was never had."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if deadline is None:
            deadline = time.monotonic() + wait
            if on_wait is not None:
                on_wait()
        elif time.monotonic() >= deadline:
            return False
        time.sleep(_LOCK_POLL)


def open_dir_nofollow(dirfd: int, path: str) -> int:
    """Open the directory path below dirfd one component at a time, following no symlink
    (OSError ELOOP or ENOTDIR when a component is a link or not a directory)."""
    fd = dirfd
    for part in path.split("/"):
        try:
            nfd = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
        finally:
            if fd != dirfd:
                os.close(fd)
        fd = nfd
    return fd


def remove_entry(dirfd: int, name: str) -> None:
    """Remove name from the directory at dirfd, and when it is a directory everything below
    it, following no symlink (a link is removed, never what it names). Iterative, holding two
    fds at most: any depth is removed. FileNotFoundError when name does not exist."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    except OSError as e:
        if e.errno != errno.EPERM:  # (unlink of a directory: EPERM by POSIX, EISDIR on Linux)
            raise
    fd = os.open(name, _DIR_NOFOLLOW, dir_fd=dirfd)
    names = [name]
    while True:
        sub = None
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.name
                    break
                os.unlink(entry.name, dir_fd=fd)
        if sub is not None:
            child = os.open(sub, _DIR_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
            names.append(sub)
            continue
        done = names.pop()
        if not names:
            os.close(fd)
            os.rmdir(done, dir_fd=dirfd)
            return
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        fd = parent
        os.rmdir(done, dir_fd=fd)


class Repository:
    """An open repository. Methods that store objects are safe to call from worker threads."""

    def __init__(self, path: Path, dirfd: int, meta: dict, alg: str, writable: bool) -> None:
        self.path = path
        self.dirfd = dirfd
        self.meta = meta
        self.alg = alg
        self.algorithm = meta["algorithm"]
        self.hash_alg_id = HASH_ALG_IDS[alg]
        self.digest_size = DIGEST_SIZES[alg]
        self.writable = writable
        self.secure = self._measure_meta()
        self._try_verity = True  # cleared the first time the filesystem says it has none
        self._lock = threading.Lock()
        self._objects_fd: int | None = None
        self._objects_st_dev: int | None = None
        self._subdir_fds: dict[str, int] = {}
        self._reflink_ok: dict[tuple[int, int], bool] = {}
        self._tmpfile_ok = True
        self._lease_sources = False
        self._unsynced = False  # an object was committed through this instance since its last sync()
        # Consecutive store lookups that found nothing (LOOKUP_MISSES_BEFORE_SKIPPING). Threads
        # may race on it: it only steers whether to look up, never what is stored.
        self._lookup_misses = 0

    # ---- opening -------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike, algorithm: str = "fsverity-sha256-12", erofs_default: int = 1) -> Repository:
        """Create (or re-open an identical) repository; a different existing format is an error."""
        parse_algorithm(algorithm)
        if erofs_default not in (0, 1, 2):
            raise RepositoryError(f"unsupported EROFS format version {erofs_default}")
        p = Path(path)
        wanted = meta_document(algorithm, erofs_default)
        content = (json.dumps(wanted, indent=2) + "\n").encode()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                pass
            dirfd = _open_repo_dir(p)
        except OSError as e:
            raise RepositoryError(f"cannot create a repository at {p}: {describe_oserror(e)}") from None
        try:
            try:
                existing = _read_meta(p, dirfd)
            except _NoMeta:
                try:
                    _write_new_file(dirfd, "meta.json", content)
                except FileExistsError:  # another init won the race: compare with its meta.json
                    existing = _read_meta(p, dirfd)
                except OSError as e:
                    raise RepositoryError(f"cannot create a repository at {p}: {describe_oserror(e)}") from None
                else:
                    existing = wanted
            if existing != wanted:
                raise RepositoryError(f"{p} is already a repository with other settings ({_settings(existing)}; "
                                      f"asked for {_settings(wanted)}): they are fixed at init")
        finally:
            os.close(dirfd)
        return cls.open(p)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = True,
             waiting: Callable[[str], object] | None = None) -> Repository:
        """``waiting``: told once (a line to show) when a gc or fsck --repair holds the
        repository and the open waits for it."""
        p = Path(path)
        try:
            dirfd = _open_repo_dir(p)
        except FileNotFoundError:
            raise RepositoryError(f"no repository at {p}: run `pycfs --repo {p} init` first") from None
        except OSError as e:
            raise RepositoryError(f"cannot open the repository {p}: {describe_oserror(e)}") from None
        try:
            try:
                meta = _read_meta(p, dirfd)
            except _NoMeta:
                raise RepositoryError(f"{p} has no meta.json: not a composefs repository "
                                      f"(run `pycfs --repo {p} init`)") from None
            alg = parse_algorithm(meta.get("algorithm", ""))
            features = meta.get("features") or {}
            unknown_incompat = set(features.get("incompatible", [])) - KNOWN_FEATURES
            if unknown_incompat:
                raise RepositoryError(f"{p} uses unknown incompatible features {sorted(unknown_incompat)}: refusing to open")
            if set(features.get("read-only-compatible", [])) - KNOWN_FEATURES:
                writable = False
            if writable and not _dir_writable(dirfd):
                writable = False
            _lock_shared(p, dirfd, waiting)
        except BaseException:
            os.close(dirfd)
            raise
        return cls(p, dirfd, meta, alg, writable)

    def lock_exclusive(self, what: str, note: Callable[[str], object], wait: float | None = None) -> None:
        """The repository for ``what`` (gc, fsck --repair) alone, waiting at most ``wait``
        (LOCK_WAIT) for its other openers (each holds the lock shared); `unlock_exclusive`
        gives it back."""
        wait = LOCK_WAIT if wait is None else wait
        told = lambda: note(f"waiting for other users of {self.path} to finish (a pull, a FUSE mount or a varlink "
                            "service holds its lock)...")
        if not _flock_within(self.dirfd, fcntl.LOCK_EX, wait, told):
            # (a failed conversion may have dropped this opener's shared lock: take it back,
            # within the same bound, as another gc may have taken it meanwhile)
            _flock_within(self.dirfd, fcntl.LOCK_SH, wait, None)
            raise RepositoryError(f"{what}: {self.path} stayed in use for {wait:.0f} s (a pull, a FUSE mount "
                                  f"or a varlink service has it open: `fuser -v {self.path}` names them); nothing "
                                  "was removed")

    def unlock_exclusive(self) -> None:
        fcntl.flock(self.dirfd, fcntl.LOCK_SH)

    def close(self) -> None:
        for fd in self._subdir_fds.values():
            os.close(fd)
        self._subdir_fds.clear()
        if self._objects_fd is not None:
            os.close(self._objects_fd)
            self._objects_fd = None
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _measure_meta(self) -> bool:
        # O_NONBLOCK: a FIFO swapped in since meta.json was read must not block the open.
        fd = os.open("meta.json", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.dirfd)
        try:
            return syscalls.fsverity_measure(fd, self.hash_alg_id) is not None
        finally:
            os.close(fd)

    @property
    def erofs_default(self) -> int:
        formats = self.meta.get("erofs_formats") or {}
        if "default" in formats and formats != {"default": 2}:
            return formats["default"]  # (an int 0..2: `_check_meta`)
        if "v1_erofs" in (self.meta.get("features") or {}).get("read-only-compatible", []):
            return 1
        return 2

    def require_writable(self) -> None:
        if not self.writable:
            raise RepositoryError(f"repository {self.path} is read-only for this user (check its owner and mode, "
                                  "or pass --repo for one of your own)")

    # ---- objects ------------------------------------------------------------------

    def id_from_hex(self, text: str) -> bytes:
        text = text.split(":", 1)[1] if text.startswith(self.alg + ":") else text
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != self.digest_size:
            raise RepositoryError(f"{text!r} is not a {self.alg} object id")
        return raw

    @staticmethod
    def object_relpath(object_id: bytes) -> str:
        h = object_id.hex()
        return f"objects/{h[:2]}/{h[2:]}"

    def object_path(self, object_id: bytes) -> Path:
        return self.path / self.object_relpath(object_id)

    def parse_object_link(self, target: str) -> bytes:
        """The id at the end of a symlink target `.../XX/rest`."""
        n = 2 * self.digest_size + 1
        tail = target[-n:]
        if len(tail) != n or tail[2] != "/":
            raise RepositoryError(f"symlink target {target!r} does not name an object")
        return self.id_from_hex(tail[:2] + tail[3:])

    def _objects(self) -> int:
        if self._objects_fd is None:
            with self._lock:
                if self._objects_fd is None:
                    try:
                        os.mkdir("objects", 0o777, dir_fd=self.dirfd)
                    except FileExistsError:
                        pass
                    try:  # not followed, as gc and fsck do not: objects elsewhere are not this repository's
                        self._objects_fd = os.open("objects", _DIR_NOFOLLOW, dir_fd=self.dirfd)
                    except OSError as e:
                        self._no_directory(e, "objects")
        return self._objects_fd

    def _objects_dev(self) -> int:
        if self._objects_st_dev is None:
            self._objects_st_dev = os.fstat(self._objects()).st_dev
        return self._objects_st_dev

    def _subdir(self, xx: str) -> int:
        fd = self._subdir_fds.get(xx)
        if fd is None:
            objects = self._objects()  # before the lock, which _objects() may take itself
            with self._lock:
                fd = self._subdir_fds.get(xx)
                if fd is None:
                    fd = self._make_subdir(objects, xx)
                    self._subdir_fds[xx] = fd
        return fd

    @staticmethod
    def _make_subdir(objects: int, xx: str) -> int:
        """objects/<xx> opened, made when missing; anything else in its place (a file, a
        link: what fsck reports) is removed first, the link itself and never its target."""
        for _ in range(3):
            try:
                os.mkdir(xx, 0o755, dir_fd=objects)
            except FileExistsError:
                pass
            try:
                return os.open(xx, _DIR_NOFOLLOW, dir_fd=objects)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(xx, dir_fd=objects)
        raise RepositoryError(f"objects/{xx} keeps being replaced by something else than a directory")

    def object_size(self, object_id: bytes) -> int | None:
        """The object's size; None when it is missing (anything but a regular file is)."""
        h = object_id.hex()
        fd = self._existing_subdir(h[:2])
        if fd is None:
            return None
        try:
            st = os.stat(h[2:], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def _existing_subdir(self, xx: str) -> int | None:
        """The fd of objects/<xx> when that directory exists (it is never created here); a
        file or a symlink in its place holds no objects."""
        fd = self._subdir_fds.get(xx)
        if fd is None:
            try:
                fd = os.open(xx, _DIR_NOFOLLOW, dir_fd=self._objects())
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return None
                raise
            with self._lock:
                kept = self._subdir_fds.setdefault(xx, fd)
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def has_object(self, object_id: bytes) -> bool:
        """Whether the object exists as a regular file (a directory or a symlink in its place
        is no object): one fstatat in its open subdirectory (a re-pull checks every object
        of every layer this way)."""
        h = object_id.hex()
        fd = self._existing_subdir(h[:2])
        return fd is not None and _is_file(fd, h[2:])

    def has_objects(self, object_ids: Iterable[bytes]) -> bool:
        """Whether every object exists: `has_object` for the thousands of objects of a layer
        (a re-pull checks them all), with one listing of a directory where that is cheaper
        than a lookup per object (see LISTING_BYTES_PER_LOOKUP)."""
        wanted: dict[str, list[str]] = {}
        for object_id in object_ids:
            h = object_id.hex()
            wanted.setdefault(h[:2], []).append(h[2:])
        for xx, names in wanted.items():
            fd = self._existing_subdir(xx)
            if fd is None:
                return False
            present = _listing(fd) if len(names) * LISTING_BYTES_PER_LOOKUP >= os.fstat(fd).st_size else None
            if present is not None:
                if not present.issuperset(names):
                    return False
            elif not all(_is_file(fd, n) for n in names):
                return False
        return True

    def object_intact(self, object_id: bytes) -> bool:
        """The object is present and its content still hashes to its name (for small
        objects such as images and streams: it reads the whole object). Anything but a
        regular file is not intact: a device in its place would be read without end."""
        try:
            fd = self.open_object(object_id)
        except (RepositoryError, OSError):
            return False
        try:
            return digest_fd(fd, self.alg) == object_id
        except OSError:
            return False
        finally:
            os.close(fd)

    def open_object(self, object_id: bytes) -> int:
        """The object, opened read-only; only a regular file is one, and nothing else is
        opened (a fifo's open would block, a device's act)."""
        h = object_id.hex()
        subdir = self._existing_subdir(h[:2])
        try:
            if subdir is None:
                raise FileNotFoundError
            fd, _ = syscalls.open_regular(subdir, h[2:].encode(), resolve=0)
        except FileNotFoundError:
            raise RepositoryError(f"object {self.alg}:{h} is missing from {self.path}") from None
        except syscalls.NotRegularFile:
            raise RepositoryError(f"object {self.alg}:{h} in {self.path} is not a regular file: "
                                  "run `pycfs fsck --repair`") from None
        return fd

    def feed_object(self, object_id: bytes, size: int, update: Callable[[memoryview], object]) -> None:
        """Pass the object's ``size`` bytes to ``update`` a MiB at a time (hashing a stored
        layer's tar again, e.g. for its diff_id); a shorter object is an error. The pieces
        are views of one buffer per thread, valid only during the call: a fresh MiB per
        read, as os.pread makes, costs page faults on every read."""
        fd = self.open_object(object_id)
        try:
            if feed_fd(fd, size, update) < size:
                raise RepositoryError(f"object {self.alg}:{object_id.hex()} is shorter than {size} bytes")
        finally:
            os.close(fd)

    def read_object(self, object_id: bytes, size: int = -1, *, most: int | None = None, kind: str = "") -> bytes:
        """The object's bytes; at most ``size`` of them when given. ``most``: what the caller
        reads (a `kind`) is never larger: a larger object is refused before it is read (a
        damaged link naming a big file's object must not take gigabytes of memory)."""
        fd = self.open_object(object_id)
        try:
            if most is not None and (found := os.fstat(fd).st_size) > most:
                raise RepositoryError(f"object {self.alg}:{object_id.hex()} holds {found} bytes, more than {kind} "
                                      f"can ({most}): what names it is damaged (run `pycfs fsck --repair`)")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(size)
        finally:
            os.close(fd)

    def image_bytes(self, image_id: bytes) -> bytes:
        """An EROFS image's bytes (at most composefs's image limit)."""
        from pycfs.host.erofs.format import MAX_IMAGE_SIZE  # (its import costs 11 ms; only images need it)

        return self.read_object(image_id, most=MAX_IMAGE_SIZE, kind="an EROFS image")

    def stream_bytes(self, object_id: bytes) -> bytes:
        """A splitstream's bytes (at most MAX_STREAM_OBJECT)."""
        return self.read_object(object_id, most=MAX_STREAM_OBJECT, kind="a splitstream")

    def _new_tmpfile(self, object_id: bytes | None = None) -> tuple[int, str | None]:
        """A writable temporary object file: anonymous (O_TMPFILE) when the fs allows it. When
        the object's id is known the file starts in its final directory: concurrent writers
        then spread over the filesystem's allocation groups instead of all queueing on
        objects/ (measured on XFS, 2 processes: 24-31 against 34-35 µs per object)."""
        self.require_writable()
        if self._tmpfile_ok:
            where = self._objects() if object_id is None else self._subdir(object_id[:1].hex())
            try:
                return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=where), None
            except OSError as e:
                if e.errno not in syscalls.UNSUPPORTED_ERRNOS and e.errno != errno.EISDIR:
                    raise
                self._tmpfile_ok = False
        for _ in range(16):
            name = _random_name(".tmp-object-")
            try:
                return os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=self._objects()), name
            except FileExistsError:
                continue
        raise RepositoryError("could not create a temporary object file")

    def _seal(self, fd: int) -> int:
        """Enable fs-verity where the filesystem has it; returns the fd to link (read-only when sealed)."""
        if not self._try_verity:
            return fd
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(fd)
        try:
            syscalls.fsverity_enable(ro, self.hash_alg_id)
        except OSError as e:
            if e.errno in syscalls.UNSUPPORTED_ERRNOS:
                if self.secure:
                    os.close(ro)
                    raise RepositoryError(f"repository {self.path} requires fs-verity, but this filesystem has none") from None
                self._try_verity = False
            elif e.errno != errno.EEXIST:
                os.close(ro)
                raise
        return ro

    def _commit(self, fd: int, temp_name: str | None, object_id: bytes) -> bool:
        """Name the temp file as its object; returns True when another writer got there first."""
        self._unsynced = True  # set before the name exists: a stream may name the object from then on
        h = object_id.hex()
        subdir = self._subdir(h[:2])
        try:
            for _ in range(3):
                try:
                    if temp_name is None:
                        syscalls.link_fd(fd, subdir, h[2:])
                    else:
                        syscalls.renameat2_noreplace(self._objects(), temp_name, subdir, h[2:])
                    return False
                except FileExistsError:
                    if _is_file(subdir, h[2:]):
                        self._lookup_misses = 0
                        return True
                # A directory, a symlink or a fifo by the object's name (what fsck reports)
                # is no object: this one takes its place.
                with contextlib.suppress(FileNotFoundError):
                    remove_entry(subdir, h[2:])
            raise RepositoryError(f"{self.object_relpath(object_id)} keeps being replaced by something "
                                  "else than a file: run `pycfs fsck --repair`")
        finally:
            os.close(fd)
            if temp_name is not None:
                try:
                    os.unlink(temp_name, dir_fd=self._objects())
                except FileNotFoundError:
                    pass

    def _known_present(self, object_id: bytes) -> bool:
        """Whether a store can stop before its clone or seal because the object exists; looked
        up only while lookups find objects (LOOKUP_MISSES_BEFORE_SKIPPING), else False, and
        `_commit` finds out."""
        if self._lookup_misses >= LOOKUP_MISSES_BEFORE_SKIPPING:
            return False
        if self.has_object(object_id):
            self._lookup_misses = 0
            return True
        self._lookup_misses += 1
        return False

    def _discard(self, fd: int, temp_name: str | None) -> None:
        os.close(fd)
        if temp_name is not None:
            os.unlink(temp_name, dir_fd=self._objects())

    def ensure_object(self, data: bytes | bytearray | memoryview, *, unverified: bool = False) -> bytes:
        """Store in-memory bytes as an object (no size threshold); returns its id.

        These are images and streams, small, and a pull writes one again after finding it
        damaged: an existing object is re-hashed (milliseconds), and a damaged one replaced,
        so the pull repairs it rather than keep a name that is not its content's digest.
        ``unverified``: a layer stream whose tar was not checked against its diff_id; one
        written now is marked so before it has its name (`stream_verified`), an existing one
        is left as it is (its bytes were written and judged before)."""
        object_id = digest_bytes(data, self.alg)
        present = self.has_object(object_id)
        if present and self.object_intact(object_id):
            return object_id
        fd, temp_name = self._new_tmpfile(object_id)
        try:
            write_all(fd, data)
            fd = self._seal(fd)
            if unverified:
                _mark_unverified(fd)
        except BaseException:
            self._discard(fd, temp_name)
            raise
        if present:
            self._replace(fd, temp_name, object_id)
        else:
            self._commit(fd, temp_name, object_id)
        return object_id

    def _replace(self, fd: int, temp_name: str | None, object_id: bytes) -> None:
        """Put the temp file in place of a damaged object of that name, in one rename: a
        reader opens the old file or the new one, never none."""
        self._unsynced = True
        h = object_id.hex()
        subdir = self._subdir(h[:2])
        where = self._objects()  # (a temporary name in objects/ itself, where gc removes a crash's leftovers)
        try:
            if temp_name is None:
                temp_name = _random_name(".tmp-object-")
                syscalls.link_fd(fd, where, temp_name)
            os.replace(temp_name, h[2:], src_dir_fd=where, dst_dir_fd=subdir)
        except BaseException:
            if temp_name is not None:
                try:
                    os.unlink(temp_name, dir_fd=where)
                except FileNotFoundError:
                    pass
            raise
        finally:
            os.close(fd)

    def object_writer(self) -> ObjectWriter:
        """A file-like sink for streamed content (tar entries): hashes as it writes."""
        return ObjectWriter(self)

    def enable_source_leases(self) -> None:
        """Let `store_object_from_fd` hash a source under a read lease (see there). A lease
        break signals its holder with SIGIO, whose default action ends the process, so this
        ignores SIGIO process-wide: call it from the main thread of a process of our own
        (the object workers do)."""
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        self._lease_sources = True

    def store_object_from_fd(self, src_fd: int, st: os.stat_result | None = None,
                             observer: Callable[[], Callable[[memoryview], object]] | None = None,
                             size: int | None = None, caller_lease: bool = False) -> StoreResult:
        """Store the whole file open at src_fd (st: its fstat, when the caller has it;
        size: the byte count it must have, else OSError ESTALE before anything is stored).

        The object is named by the digest of exactly the bytes it holds, whatever happens
        to the source meanwhile. Two ways to make sure of that:

        - Under a read lease (after `enable_source_leases`, on a file this user owns that no
          one has open for writing): the kernel refuses the lease while a writer exists and
          breaks it when anyone opens the file for writing or truncates it, and that writer
          waits until the lease is let go. So if the lease is still unbroken after the
          source was hashed and cloned, the clone holds the bytes hashed. The source's
          pages are read (often cached: a clone shares no page cache with it), and a file
          whose object exists already is not cloned (while lookups find objects; see
          LOOKUP_MISSES_BEFORE_SKIPPING).
        - Otherwise a private copy is made first, FICLONE where the filesystems allow (no
          data copied), else copied through the hashing buffer, and that copy is hashed.

        ``observer`` makes a checker (a fresh one per pass over the content) that sees every
        stored byte, in order, and may raise to refuse it. ``caller_lease``: the caller may
        hold a read lease on the source's open file already (see
        `pycfs.host.varlink.transfer`); if it does, the source is hashed under that lease,
        which is left in place for the caller to read under it again."""
        if caller_lease and lease_held(src_fd):
            stored = self._store_leased(src_fd, size, observer)
            if stored is not None:
                return stored
            st = None
        elif (self._lease_sources and (st is None or self._reflink_ok.get((st.st_dev, self._objects_dev()), True))
                and take_read_lease(src_fd)):
            # The one fstat of a leased store comes after the lease: from then on the size
            # stays (a worker stores ~200,000 small files a minute; each syscall counts).
            try:
                stored = self._store_leased(src_fd, size, observer)
            finally:
                _drop_lease(src_fd)
            if stored is not None:
                return stored
            # The lease broke (the file may have changed since) or the filesystems cannot
            # clone (a file copied through the hashing buffer: two fcntl calls are nothing to it).
            st = None
        st = st or os.fstat(src_fd)
        _check_size(st, size)
        return self._store_private_copy(src_fd, st, observer)

    def _store_leased(self, src_fd: int, size: int | None,
                      observer: Callable[[], Callable[[memoryview], object]] | None) -> StoreResult | None:
        """Hash the source under its read lease, then clone it; None when the lease broke or
        the filesystems cannot clone (the caller stores a private copy then)."""
        st = os.fstat(src_fd)  # the lease is held: now the size stays
        if not self._reflink_ok.get((st.st_dev, self._objects_dev()), True):
            return None
        _check_size(st, size)
        object_id = digest_fd(src_fd, self.alg, st.st_size, observer() if observer is not None else None)
        if self._known_present(object_id):
            return StoreResult(object_id, st.st_size, "present")
        fd, temp_name = self._new_tmpfile(object_id)
        try:
            if not self._reflink(src_fd, fd, st) or not lease_held(src_fd):
                self._discard(fd, temp_name)
                return None
            fd = self._seal(fd)
        except BaseException:
            self._discard(fd, temp_name)
            raise
        raced = self._commit(fd, temp_name, object_id)
        return StoreResult(object_id, st.st_size, "present" if raced else "reflinked")

    def _store_private_copy(self, src_fd: int, st: os.stat_result,
                            observer: Callable[[], Callable[[memoryview], object]] | None) -> StoreResult:
        """Clone (or copy) the source first, and hash that private copy."""
        observe = observer() if observer is not None else None
        # Any subdirectory spreads concurrent writers over the filesystem's allocation
        # groups, as the object's own would (its id is not known until the copy is hashed).
        fd, temp_name = self._new_tmpfile(secrets.token_bytes(1))
        try:
            if self._reflink(src_fd, fd, st):
                how = "reflinked"
                if os.fstat(fd).st_size != st.st_size:
                    raise RepositoryError(f"source file changed size while it was cloned (expected {st.st_size} bytes)")
                object_id = digest_fd(fd, self.alg, st.st_size, observe)
            else:
                how = "copied"

                def copy(piece: memoryview) -> None:
                    if observe is not None:
                        observe(piece)
                    write_all(fd, piece)

                object_id = digest_fd(src_fd, self.alg, st.st_size, copy)
            fd = self._seal(fd)
        except BaseException:
            self._discard(fd, temp_name)
            raise
        raced = self._commit(fd, temp_name, object_id)
        return StoreResult(object_id, st.st_size, "present" if raced else how)

    def new_object_file(self) -> int | None:
        """A writable anonymous file (O_TMPFILE) in the object store, to fill and then hand,
        read-only and with no writer left, to `adopt_object_file`; None where the filesystem
        has no O_TMPFILE (write through `object_writer` then)."""
        # In any subdirectory, not objects/ itself: XFS puts an anonymous file's inode in its
        # directory's allocation group and takes that group's AGI lock to create it and
        # again to link it; with every pending file in one group, a layer pull's creates and
        # links queued there (openat 96-102 against 29-33 us, linkat 160-190 against 38-45).
        fd, temp_name = self._new_tmpfile(secrets.token_bytes(1))
        if temp_name is None:
            return fd
        self._discard(fd, temp_name)
        return None

    @property
    def seals_objects(self) -> bool:
        """Whether new objects may get fs-verity: False once the filesystem said it has none."""
        return self._try_verity

    def adopt_object_file(self, fd: int, size: int, object_id: bytes | None = None) -> StoreResult:
        """Make the anonymous file at fd (from `new_object_file`: written, reopened read-only,
        its writable fds closed; or still writable where not `seals_objects`) its object:
        hash it, seal it, link it; how is "copied", or
        "present" when the object exists. fd stays the caller's. ``object_id``: its digest,
        when the caller took it from the bytes as it wrote them (as the inflating worker's
        `TarSplitter(hash_files=True)` does)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0 or st.st_dev != self._objects_dev():
            raise RepositoryError("not an anonymous file of this repository's object store")
        if st.st_size != size:
            raise OSError(errno.ESTALE, f"has {st.st_size} bytes, expected {size}")
        if object_id is None:
            object_id = digest_fd(fd, self.alg, size)
        if self._known_present(object_id):
            return StoreResult(object_id, size, "present")
        sealed = self._seal(os.dup(fd))
        return StoreResult(object_id, size, "present" if self._commit(sealed, None, object_id) else "copied")

    def _reflink(self, src_fd: int, dst_fd: int, st: os.stat_result) -> bool:
        """FICLONE src into dst; False when the filesystems cannot (remembered per device pair)."""
        pair = (st.st_dev, self._objects_dev())
        if not self._reflink_ok.get(pair, True):
            return False
        try:
            syscalls.ficlone(dst_fd, src_fd)
        except OSError as e:
            if e.errno not in syscalls.CROSS_DEVICE_ERRNOS:
                raise
            self._reflink_ok[pair] = False
            return False
        self._reflink_ok[pair] = True
        return True

    def reflink_known(self) -> dict[tuple[int, int], bool]:
        """The per-(source device, repository device) FICLONE answers learnt so far."""
        return dict(self._reflink_ok)

    # ---- symlinks, streams, images ---------------------------------------------------

    def _symlink(self, name: str, target: str) -> None:
        """Make repo-relative `name` a relative symlink to repo-relative `target`, atomically.
        Its directories are made and entered following no symlink: a link put in their place
        would have the link written elsewhere (fsck reports it, `--repair` removes it)."""
        link_parts = name.split("/")[:-1]
        target_parts = [p for p in target.split("/") if p not in ("", ".")]
        common = 0
        while common < min(len(link_parts), len(target_parts)) and link_parts[common] == target_parts[common]:
            common += 1
        rel = "/".join([".."] * (len(link_parts) - common) + target_parts[common:])
        last = name.rsplit("/", 1)[-1]
        parent = self._made_dir(link_parts)
        try:
            try:
                os.symlink(rel, last, dir_fd=parent)
                return
            except FileExistsError:
                try:
                    if os.readlink(last, dir_fd=parent) == rel:
                        return
                except OSError:
                    pass
            for _ in range(16):
                temp = _random_name(".symlink-")  # (in the repository's root, as ever: no listing sees it)
                try:
                    os.symlink(rel, temp, dir_fd=self.dirfd)
                except FileExistsError:
                    continue
                try:
                    os.rename(temp, last, src_dir_fd=self.dirfd, dst_dir_fd=parent)
                except OSError:
                    os.unlink(temp, dir_fd=self.dirfd)
                    raise
                return
            raise RepositoryError(f"could not replace symlink {name}")
        finally:
            if parent != self.dirfd:
                os.close(parent)

    def _made_dir(self, parts: Sequence[str]) -> int:
        """The repository's directory at parts, made where missing, each level opened from
        its parent following no symlink (the repository's own fd for no parts)."""
        fd = self.dirfd
        for i, part in enumerate(parts):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                self._no_directory(e, "/".join(parts[:i + 1]))
            finally:
                if fd != self.dirfd:
                    os.close(fd)
            fd = child
        return fd

    def sync(self) -> None:
        self._unsynced = False  # first: a commit while syncfs runs sets it again
        try:
            syscalls.syncfs(self.dirfd)
        except BaseException:
            self._unsynced = True
            raise

    def _link_target_id(self, relname: str) -> bytes | None:
        target = self.read_link(relname)
        if target is None:
            return None
        try:
            return self.parse_object_link(target)
        except RepositoryError:
            raise RepositoryError(f"{relname} in {self.path} leads to {shown(target)}, not to an object: "
                                  "run `pycfs fsck --repair`") from None

    def _stream_is(self, name: str, object_id: bytes) -> bool:
        """Whether streams/<name> is a link naming object_id (a damaged link is not)."""
        try:
            return self._link_target_id(f"streams/{name}") == object_id
        except (RepositoryError, OSError):
            return False

    def has_stream(self, name: str) -> bytes | None:
        """The object id of streams/<name>, or None. Dangling links count as absent."""
        check_name(name, "stream", allow_slash=False)
        object_id = self._link_target_id(f"streams/{name}")
        if object_id is None or not self.has_object(object_id):
            return None
        return object_id

    def intact_stream(self, name: str) -> bytes | None:
        """Like has_stream, and the stream is intact: its own object hashes to its name and
        every object and named ref it lists is present. A pull takes a stored layer only when
        this says so, so a damaged or half-deleted one is imported again (self-healing).
        Objects' contents are not re-hashed here (that is `pycfs fsck`)."""
        found = self.intact_streams([name])
        return found[0] if found else None

    def intact_streams(self, names: Sequence[str]) -> list[bytes]:
        """The ids of the longest run of streams from the first of ``names`` that are each
        `intact_stream`. The objects of the run are looked up together (an image's layers
        spread over the same 256 directories, each then listed once rather than once a
        layer); only when one is missing are the streams looked at one by one."""
        run: list[tuple[bytes, list[bytes]]] = []
        for name in names:
            object_id = self.has_stream(name)
            if object_id is None:
                break
            try:
                data = self.stream_bytes(object_id)
                if digest_bytes(data, self.alg) != object_id:
                    break
                reader = SplitStreamReader(data, self.alg)
            except (PycfsError, OSError):
                break
            run.append((object_id, [*reader.object_refs, *reader.named_refs.values()]))
        if self.has_objects(ref for _, refs in run for ref in refs):
            return [object_id for object_id, _ in run]
        intact = []
        for object_id, refs in run:
            if not self.has_objects(refs):
                break
            intact.append(object_id)
        return intact

    def write_stream(self, writer: SplitStreamWriter, name: str, ref: str | None = None, *,
                     refs_durable: bool = False, images: Iterable[bytes] = (), verified: bool = True) -> bytes:
        """Store the splitstream, sync, then make it visible as streams/<name> (and a ref);
        ``images`` (stored objects) are recorded as images after the same sync.

        ``refs_durable``: the caller vouches that every object the stream names was on disk
        already unless this instance committed it (which it tracks). A stream already visible
        as it is then costs no sync: a re-pull rewrites its unchanged config and manifest
        streams, and syncfs waits for whatever else the filesystem has to write back."""
        check_name(name, "stream", allow_slash=False)
        object_id = self.store_stream(writer, verified=verified)
        self.publish_streams([(name, object_id)], images=images, refs_durable=refs_durable)
        if ref is not None:
            self.set_stream_ref(ref, name)
        return object_id

    def store_stream(self, writer: SplitStreamWriter, *, verified: bool = True) -> bytes:
        """Store the splitstream as an object, not yet visible (`publish_streams`); its id.
        ``verified=False``: a layer stream whose tar was not checked against its diff_id (a
        containers-storage import without --verify-diffid): marked so when written now; a
        verified one clears the mark of the same bytes stored before."""
        self.require_writable()
        object_id = self.ensure_object(writer.finish(), unverified=not verified)
        if verified:
            self.mark_verified(object_id)
        return object_id

    def stream_verified(self, object_id: bytes) -> bool:
        """Whether the layer stream object's tar may be taken as its name's diff_id: it was
        not written by an import that did not check it (a tar header edited in
        containers-storage passes its per-file checks: such a stream must not be reused by a
        pull of the genuine layer from a source that is checked)."""
        try:
            fd = self.open_object(object_id)
        except RepositoryError:
            return False
        try:
            os.getxattr(fd, UNVERIFIED_XATTR)
            return False
        except OSError as e:
            if e.errno in (errno.ENODATA, *syscalls.UNSUPPORTED_ERRNOS):
                return True
            raise
        finally:
            os.close(fd)

    def mark_verified(self, object_id: bytes) -> None:
        """The layer stream object's tar was checked against its diff_id: no longer marked
        unverified (an object this user may not change keeps its mark: pulls then import
        that layer again, checked, which is slower, never wrong)."""
        fd = self.open_object(object_id)
        try:
            os.removexattr(fd, UNVERIFIED_XATTR)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EACCES, errno.EPERM, *syscalls.UNSUPPORTED_ERRNOS):
                raise
        finally:
            os.close(fd)

    def publish_streams(self, streams: Sequence[tuple[str, bytes]], *, images: Iterable[bytes] = (),
                        refs_durable: bool = False) -> None:
        """Make stored stream objects visible as streams/<name>, in order, after one crash
        barrier (syncfs) for all of them: a visible stream implies its objects are on disk.
        ``images`` (object ids) are recorded as images (images/<hex>) after the same barrier.
        ``refs_durable``: as `write_stream`'s; streams already visible as they are then cost
        no sync."""
        for name, _ in streams:
            check_name(name, "stream", allow_slash=False)
        self.require_writable()
        if not (refs_durable and not self._unsynced and all(self._stream_is(n, i) for n, i in streams)):
            self.sync()
        for image_id in images:
            self.link_image(image_id)
        for name, object_id in streams:
            self._symlink(f"streams/{name}", self.object_relpath(object_id))

    def set_stream_ref(self, ref: str, name: str) -> None:
        check_name(ref, "ref", allow_slash=True)
        check_name(name, "stream", allow_slash=False)
        self._symlink(f"streams/refs/{ref}", f"streams/{name}")

    def stream_data(self, name: str) -> bytes:
        """Bytes of streams/<name> (`refs/...` names resolve through the ref). The links are
        read, not followed: the object they name is opened beneath objects/ (a link edited
        to lead out of the repository reads nothing there)."""
        check_name(name, "stream", allow_slash=True)
        stream: str | None = name
        if "/" in name:  # a ref: its target is a stream's link in streams/
            target = self.read_link(f"streams/{name}")
            if target is not None:
                stream = posixpath.normpath(posixpath.join("streams", posixpath.dirname(name), target))
                if not stream.startswith("streams/") or "/" in stream[len("streams/"):]:
                    raise RepositoryError(f"streams/{name} in {self.path} leads to {shown(target)}, not to a "
                                          "stream: run `pycfs fsck --repair`")
                stream = stream[len("streams/"):]
            else:
                stream = None
        object_id = self._link_target_id(f"streams/{stream}") if stream else None
        if object_id is None:
            raise RepositoryError(f"no stream {name!r} in {self.path}")
        return self.stream_bytes(object_id)

    def read_link(self, relname: str) -> str | None:
        """The target of the symlink at relname; None when there is none. Its directory is
        entered following no symlink (a refs directory made a link to elsewhere is not read)."""
        with self._parent_of(relname) as (parent, last):
            if parent is None:
                return None
            try:
                return os.readlink(last, dir_fd=parent)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise RepositoryError(f"{relname} in {self.path} is not a symlink: run `pycfs fsck --repair`") from None
                raise

    def remove_link(self, relname: str) -> bool:
        """Remove the symlink at relname, its directory entered following no symlink (a link
        to elsewhere would have a file there removed); False when there is none."""
        with self._parent_of(relname) as (parent, last):
            if parent is None:
                return False
            try:
                if not stat.S_ISLNK(os.stat(last, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise RepositoryError(f"{relname} in {self.path} is not a symlink: run `pycfs fsck --repair`")
                os.unlink(last, dir_fd=parent)
            except FileNotFoundError:
                return False
            return True

    def _no_directory(self, e: OSError, what: str) -> NoReturn:
        """Raise for an open of one of the repository's directories that failed: a symlink or
        something else in its place is damage fsck reports."""
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise e
        raise RepositoryError(f"{what} in {self.path} is a symlink or not a directory: run `pycfs fsck --repair`") \
            from None

    def remove_path(self, relname: str) -> bool:
        """Remove relname, a directory with everything below it, following no symlink (a link
        goes, never what it names); False when there is nothing there to remove (it, or a
        directory on its way, is missing, or that directory is a link or no directory)."""
        with self._parent_of(relname, lenient=True) as (parent, last):
            if parent is None:
                return False
            try:
                remove_entry(parent, last)
            except FileNotFoundError:
                return False
            return True

    def layout_damage(self) -> list[tuple[str, str]]:
        """The directories of the layout (LAYOUT_DIRS) that are not directories of the
        repository itself, as (path, "symlink" or "not a directory"); nothing below one of
        them is looked at. A missing one is no damage: the next store makes it."""
        bad: list[tuple[str, str]] = []
        for top in LAYOUT_DIRS:
            if any(top.startswith(path + "/") for path, _ in bad):
                continue
            try:
                st = os.stat(top, dir_fd=self.dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                bad.append((top, "symlink"))
            elif not stat.S_ISDIR(st.st_mode):
                bad.append((top, "not a directory"))
        return bad

    @contextlib.contextmanager
    def _parent_of(self, relname: str, lenient: bool = False) -> Iterator[tuple[int | None, str]]:
        """(fd of relname's directory or None when it is missing, relname's last part). A
        directory on the way that is a link or no directory is damage (RepositoryError), or,
        ``lenient``, as good as missing."""
        head, _, last = relname.rpartition("/")
        try:
            fd = open_dir_nofollow(self.dirfd, head) if head else self.dirfd
        except FileNotFoundError:
            yield None, last
            return
        except OSError as e:
            if not (lenient and e.errno in (errno.ELOOP, errno.ENOTDIR)):
                self._no_directory(e, f"a directory of {relname}")
            yield None, last
            return
        try:
            yield fd, last
        finally:
            if fd != self.dirfd:
                os.close(fd)

    def open_stream(self, name: str, expected_content_type: int | None = None) -> SplitStreamReader:
        return SplitStreamReader(self.stream_data(name), self.alg, expected_content_type, name=name)

    def open_stream_by_id(self, object_id: bytes, expected_content_type: int | None = None) -> SplitStreamReader:
        return SplitStreamReader(self.stream_bytes(object_id), self.alg, expected_content_type,
                                 name=f"{self.alg}:{object_id.hex()}")

    def new_stream(self, content_type: int, name: str = "") -> SplitStreamWriter:
        """A stream to write (``name``: what its refusals name, e.g. "layer sha256:...")."""
        return SplitStreamWriter(self.alg, content_type, name)

    def image_linked(self, object_id: bytes) -> bool:
        """Whether images/<hex> is a link naming the object (a damaged link is not)."""
        try:
            return self._link_target_id(f"images/{object_id.hex()}") == object_id
        except (RepositoryError, OSError):
            return False

    def link_image(self, object_id: bytes, ref: str | None = None) -> bytes:
        """Record a stored object as an image: images/<hex>, and images/refs/<ref>."""
        self.require_writable()
        self._symlink(f"images/{object_id.hex()}", self.object_relpath(object_id))
        if ref is not None:
            check_name(ref, "image ref", allow_slash=True)
            self._symlink(f"images/refs/{ref}", f"images/{object_id.hex()}")
        return object_id

    def image_id(self, name: str) -> bytes:
        """Resolve images/<hex> or images/refs/<name> to the image object id."""
        check_name(name, "image", allow_slash=True)
        for rel in (f"images/{name}", f"images/refs/{name}"):
            try:
                real = os.path.realpath(os.path.join(self.path, rel))
            except OSError:
                continue
            if os.path.exists(real):
                return self.parse_object_link(real)
        raise RepositoryError(f"no image {name!r} in {self.path}")

    def list_links(self, top: str) -> list[tuple[str, str]]:
        """(name relative to top, target) of every ref symlink below top (e.g. 'streams/refs',
        'streams/refs/oci'), sorted, dangling ones too; `walk_refs` skips what is no ref (a
        link to a directory, what lies past REF_DEPTH_LIMIT): fsck reports those."""
        start = len(top) + 1
        return [(e.path[start:], e.target) for e in self.walk_refs(top) if e.kind in ("link", "dangling")]

    def walk_refs(self, top: str) -> list[RefEntry]:
        """Every entry of the refs tree at top, sorted by path: the one walk of refs that gc,
        fsck and every listing use. No symlink is followed: top and each directory below it are
        opened from their parent with O_NOFOLLOW (a top that is a link or not a directory is
        one entry, "dir-link" or "other"), and a directory REF_DEPTH_LIMIT levels down is
        "too-deep", not entered. Iterative: one fd per level at most."""
        try:
            fd = open_dir_nofollow(self.dirfd, top)
        except FileNotFoundError:
            return []
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            return [_odd_top(self.dirfd, top)]
        found: list[RefEntry] = []
        # (fd, repository-relative path, depth, subdirectories still to enter)
        stack = [(fd, top, 0, _scan_refs_dir(fd, top, 0, found))]
        try:
            while stack:
                fd, path, depth, pending = stack[-1]
                if not pending:
                    os.close(fd)
                    stack.pop()
                    continue
                name = pending.pop()
                child = os.open(name, _DIR_NOFOLLOW, dir_fd=fd)
                child_path = f"{path}/{name}"
                stack.append((child, child_path, depth + 1, _scan_refs_dir(child, child_path, depth + 1, found)))
        finally:
            for fd, *_ in stack:
                os.close(fd)
        return sorted(found, key=lambda e: e.path)


class ObjectWriter:
    """Streams bytes into a new object, hashing as it goes; finish() names it."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._hasher = VerityHasher(repo.alg)
        self._fd, self._temp_name = repo._new_tmpfile()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        write_all(self._fd, data)
        self.size += len(data)

    def finish(self) -> tuple[bytes, bool]:
        """(object id, already present)."""
        object_id = self._hasher.digest()
        if self._repo._known_present(object_id):
            self.abort()
            return object_id, True
        fd, self._fd = self._repo._seal(self._fd), -1
        return object_id, self._repo._commit(fd, self._temp_name, object_id)

    def abort(self) -> None:
        if self._fd >= 0:
            self._repo._discard(self._fd, self._temp_name)
            self._fd = -1


# The mark of a layer stream object whose tar was not checked against its diff_id (an xattr:
# the object's bytes and verity stay those of the stream, and a hardlinked copy, the same
# bytes, carries it along). A filesystem without user xattrs cannot carry it: there such a
# stream is taken as checked (what pycfs did before the mark).
UNVERIFIED_XATTR = "user.pycfs.unverified"


def _mark_unverified(fd: int) -> None:
    try:
        os.setxattr(fd, UNVERIFIED_XATTR, b"1")
    except OSError as e:
        if e.errno not in syscalls.UNSUPPORTED_ERRNOS:
            raise


def _is_file(dirfd: int, name: str) -> bool:
    """name in dirfd is a regular file (a symlink is not followed)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _listing(dirfd: int) -> set[str] | None:
    """The names of the regular files in a directory (by d_type: no stat each), through an fd
    of its own (a listing moves the offset that every dup of dirfd shares); None when it cannot
    be listed (searchable, not readable)."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        with os.scandir(fd) as entries:
            return {e.name for e in entries if e.is_file(follow_symlinks=False)}
    except OSError:
        return None
    finally:
        os.close(fd)


def _scan_refs_dir(fd: int, path: str, depth: int, found: list[RefEntry]) -> list[str]:
    """Add the entries of the refs directory at fd (``depth`` levels below the walk's top) to
    found; returns the names of the subdirectories to enter."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            rel = f"{path}/{entry.name}"
            if entry.is_symlink():
                target = os.readlink(entry.name, dir_fd=fd)
                try:
                    st = os.stat(entry.name, dir_fd=fd)
                except OSError:
                    found.append(RefEntry(rel, "dangling", target))
                    continue
                found.append(RefEntry(rel, "dir-link" if stat.S_ISDIR(st.st_mode) else "link", target))
            elif entry.is_dir(follow_symlinks=False):
                if depth + 1 >= REF_DEPTH_LIMIT:
                    found.append(RefEntry(rel, "too-deep"))
                else:
                    found.append(RefEntry(rel, "dir"))
                    subdirs.append(entry.name)
            else:
                found.append(RefEntry(rel, "other"))
    return subdirs


def _odd_top(dirfd: int, top: str) -> RefEntry:
    """The entry for the first component of top that is a symlink or not a directory."""
    parts = top.split("/")
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        try:
            st = os.stat(path, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            break
        if stat.S_ISLNK(st.st_mode):
            return RefEntry(path, "dir-link", os.readlink(path, dir_fd=dirfd))
        if not stat.S_ISDIR(st.st_mode):
            return RefEntry(path, "other")
    return RefEntry(top, "other")


def _check_size(st: os.stat_result, size: int | None) -> None:
    if size is not None and st.st_size != size:
        raise OSError(errno.ESTALE, f"has {st.st_size} bytes, expected {size}")


def take_read_lease(fd: int) -> bool:
    """Take a read lease on the file at fd; False when the kernel refuses (someone has it
    open for writing, it is not this user's, the filesystem or the admin has no leases)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    return True


def feed_fd(fd: int, size: int, update: Callable[[memoryview], object]) -> int:
    """Pass the first ``size`` bytes of the file at fd to ``update`` (see `feed_object`);
    returns how many there were (fewer: the file is shorter)."""
    buf = getattr(_feed_buffers, "buf", None)
    if buf is None:
        buf = _feed_buffers.buf = memoryview(bytearray(FEED_PIECE))
    offset = 0
    while offset < size:
        n = os.preadv(fd, [buf[: size - offset]], offset)
        if n == 0:
            break
        update(buf[:n])
        offset += n
    return offset


def lease_held(fd: int) -> bool:
    """The read lease on fd is unbroken: no one has opened the file for writing since."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def _drop_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # gone with a broken lease already


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a pipe or a full disk takes a part at a time)."""
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _write_new_file(dirfd: int, name: str, content: bytes) -> None:
    """Create name with content atomically; FileExistsError if it exists."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
    except OSError as e:
        if e.errno not in syscalls.UNSUPPORTED_ERRNOS and e.errno != errno.EISDIR:
            raise
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
        try:
            write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    try:
        write_all(fd, content)
        os.fsync(fd)
        syscalls.link_fd(fd, dirfd, name)
    finally:
        os.close(fd)


class _NoMeta(Exception):
    """The directory has no meta.json (yet)."""


def _open_repo_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _settings(meta: dict) -> str:
    formats = meta.get("erofs_formats") or {}
    return f"algorithm {meta.get('algorithm')!r}, EROFS format {formats.get('default', '?')}"


def _read_meta(path: Path, dirfd: int) -> dict:
    try:
        raw = read_document("meta.json", 1 << 20, RepositoryError, dir_fd=dirfd, follow=False,
                            name=f"{path}/meta.json")
    except FileNotFoundError:
        raise _NoMeta() from None
    meta = parse_object(raw, f"{path}/meta.json", RepositoryError)
    version = meta.get("version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise RepositoryError(f"{path}/meta.json has format version {version!r}; this pycfs reads version {FORMAT_VERSION}")
    _check_meta(meta, f"{path}/meta.json")
    return meta


def _check_meta(meta: dict, where: str) -> None:
    """The types of what pycfs reads in meta.json (the rest is the writer's business)."""
    def bad(field: str, value: object, want: str) -> NoReturn:
        text = json.dumps(value)
        raise RepositoryError(f"{where}: {field} is {text if len(text) <= 80 else text[:80] + '...'}, not {want}: "
                              "the file is damaged (restore it, or make the repository again)")

    if not isinstance(meta.get("algorithm"), str):
        bad("algorithm", meta.get("algorithm"), "a name like fsverity-sha256-12")
    features = meta.get("features")
    if features is not None:
        if not isinstance(features, dict):
            bad("features", features, "an object")
        for kind in ("compatible", "read-only-compatible", "incompatible"):
            names = features.get(kind, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                bad(f"features.{kind}", names, "a list of names")
    formats = meta.get("erofs_formats")
    if formats is not None:
        if not isinstance(formats, dict):
            bad("erofs_formats", formats, "an object")
        versions = [formats.get("default", 2), *(formats.get("extra", []) if isinstance(formats.get("extra", []), list)
                                                  else [None])]
        if not all(type(v) is int and 0 <= v <= 2 for v in versions):
            bad("erofs_formats", formats, "a default format 0, 1 or 2 and a list of extra ones")


def _dir_writable(dirfd: int) -> bool:
    if os.fstatvfs(dirfd).f_flag & os.ST_RDONLY:
        return False
    return os.access(".", os.W_OK, dir_fd=dirfd)
