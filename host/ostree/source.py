"""Where a pull reads ostree objects from: a local repository (any mode) or an archive
repository served over HTTP (spec ostree.md 1.4-1.7).

Both offer the same blocking calls, which a pull runs on trio worker threads (their work
is I/O, zlib and SHA-256 over large buffers, all of which release the GIL):

    resolve(ref) -> (commit checksum, the branch name upstream the ref binding must list)
    read_metadata(checksum, kind) -> bytes       (not yet verified: the caller checks)
    fetch_file(checksum, inline_max, tmp_dir) -> FetchedFile

A `.filez` is read as a stream: 8-byte prefix, header variant, raw deflate. Small content
comes back as bytes, larger content in an unlinked temporary file in tmp_dir (on the
repository's filesystem, so storing it is a reflink where the filesystem has them); the
content checksum is verified on the way, so a `FetchedFile` from an archive is trusted.
A bare repository's content file is passed on as it is (`verified` False): the object
workers reflink it and check its checksum on their private copy, in the same read that
computes its fs-verity digest, since the source file could change between a check and
the copy.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pycfs.host import syscalls
from pycfs.host.ostree.commitstream import check_ref_name
from pycfs.host.ostree.signature import MAX_DETACHED, verify_signed
from pycfs.host.repository import write_all
from pycfs.host.ostree.objects import (
    MAX_HEADER_SIZE,
    MAX_METADATA_SIZE,
    SIZED,
    FileHeader,
    Kind,
    OstreeError,
    describe,
    header_length,
    is_checksum_text,
    parse_checksum,
    parse_delta_table,
    parse_meta_xattr,
    parse_summary,
)

if TYPE_CHECKING:
    import http.client  # imported when an HttpRepo is made: a local pull does without it
    import socket

READ_CHUNK = 1 << 20
# an object of a local repository: read-only, never a symlink, nor a fifo's wait for a writer
_OBJECT_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
MODES = {"archive": "archive", "archive-z2": "archive", "bare": "bare", "bare-user": "bare-user",
         "bare-user-only": "bare-user-only"}
T = TypeVar("T")
MAX_CONFIG = 1 << 20
MAX_TOMBSTONE = 1 << 16  # (an a{sv}: ostree writes {'commit': <checksum>})


def config_value(data: bytes, group: str, key: str, where: str) -> str | None:
    """A key's value in a GLib key file, as ostree's `config` is: `[group]` lines,
    `key=value` lines (spaces before a line and around the `=` ignored, those after the
    value kept; keys case-sensitive; a later value wins), blank lines and `#` comments;
    None when the group lacks the key. (Not configparser: ~2 ms of imports, and its rules
    are not GLib's.)"""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OstreeError(f"{where} cannot be read: it is not UTF-8") from None
    current = value = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.rstrip().endswith("]"):
            current = line.rstrip()[1:-1]
            continue
        name, equals, rest = line.partition("=")
        if not equals or current is None:
            raise OstreeError(f"{where} cannot be read: line {number} is no group, key=value or comment")
        if current == group and name.rstrip() == key:
            value = rest.lstrip()
    return value


@dataclass
class FetchedFile:
    header: FileHeader
    content: bytes | None = None  # inline content (symlinks: b"")
    fd: int | None = None  # content to store as an object; the receiver closes it
    verified: bool = True  # False: the object workers check the checksum on the stored copy


MISMATCH = "content does not match its checksum: the source repository is corrupt or was tampered with"


def check_file(header: FileHeader, checksum: bytes, content: bytes = b"") -> None:
    """An inline file (or symlink) object against its ostree checksum."""
    if hashlib.sha256(header.checksum_prefix() + content).digest() != checksum:
        raise OstreeError(f"{describe(checksum, Kind.FILE)}: {MISMATCH}")


def unpack_filez(read: Callable[[int], bytes], checksum: bytes, inline_max: int, tmp_dir: str) -> FetchedFile:
    """Read a `.filez` through read(n) (returns b"" at the end): header, then raw deflate."""
    where = describe(checksum, Kind.FILE)
    prefix = _read_exact(read, SIZED.size, where)
    variant = _read_exact(read, header_length(prefix, checksum), where)
    header = FileHeader.parse(variant, checksum)
    hasher = hashlib.sha256(header.checksum_prefix())
    if header.is_symlink:
        if read(1):
            raise OstreeError(f"{where}: symlink object with trailing data")
        if hasher.digest() != checksum:
            raise OstreeError(f"{where}: content does not match its checksum")
        return FetchedFile(header, content=b"")
    inflate = zlib.decompressobj(-15)
    small = bytearray()
    fd = None if header.size <= inline_max else _tmpfile(tmp_dir)
    got = 0
    try:
        while True:
            compressed = read(READ_CHUNK)
            if not compressed:
                break
            if inflate.eof:
                raise OstreeError(f"{where}: data after the end of the compressed content")
            # max_length bounds what one read can inflate to (a hostile peer's deflate bomb)
            while compressed:
                try:
                    out = inflate.decompress(compressed, READ_CHUNK)
                except zlib.error as e:
                    raise OstreeError(f"{where}: corrupt compressed content ({e})") from None
                compressed = inflate.unconsumed_tail
                got += len(out)
                if got > header.size:
                    raise OstreeError(f"{where}: content is longer than the {header.size} bytes its header says")
                hasher.update(out)
                if fd is None:
                    small += out
                else:
                    write_all(fd, out)
                if inflate.eof and (compressed or inflate.unused_data):
                    raise OstreeError(f"{where}: data after the end of the compressed content")
        if not inflate.eof or got != header.size:
            raise OstreeError(f"{where}: truncated or corrupt compressed content ({got} of {header.size} bytes)")
        if hasher.digest() != checksum:
            raise OstreeError(f"{where}: content does not match its checksum: "
                              "the source repository is corrupt or was tampered with")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return FetchedFile(header, content=bytes(small)) if fd is None else FetchedFile(header, fd=fd)


def _tmpfile(tmp_dir: str) -> int:
    import tempfile  # here: only an archive's or a delta's file needs one (a pull from a bare repository never)

    # TemporaryFile is O_TMPFILE where the filesystem has it: nothing named is left behind
    with tempfile.TemporaryFile(dir=tmp_dir, buffering=0) as f:
        return os.dup(f.fileno())


def _read_exact(read: Callable[[int], bytes], n: int, where: str) -> bytes:
    parts = []
    left = n
    while left:
        piece = read(left)
        if not piece:
            raise OstreeError(f"{where}: truncated (header incomplete)")
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


class _Summary:
    """The summary file (refs and the static-delta table), read once through fetch_optional.
    With a `summary_keyring` a summary is used only when its `summary.sig` (as `ostree
    summary -u --gpg-sign` writes it) has a signature that verifies with the keyring; one
    unsigned, or with no signature that verifies, is an error naming it, as ostree's
    gpg-verify-summary refuses it. A server with no summary at all still serves refs from
    refs/heads/, which no signature covers: the commit's own signature, its ref binding and
    the downgrade check are then what stand against a ref pointed at another signed commit
    (README: "A required summary")."""

    description: str
    summary_keyring: str | None = None
    _summary: list[tuple[str, bytes]] | None = None
    _summary_fetched = False
    summary_deltas: dict[str, bytes]  # delta name -> superblock checksum

    def fetch_optional(self, path: str, limit: int) -> bytes | None:
        raise NotImplementedError

    def _deleted(self, checksum: bytes, kind: Kind) -> str:
        """For a missing commit: why, when the repository keeps a tombstone for it (`ostree
        prune --delete-commit` with core.tombstone-commits)."""
        if kind != Kind.COMMIT:
            return ""
        tombstone = f"objects/{checksum.hex()[:2]}/{checksum.hex()[2:]}.tombstone-commit"
        try:
            if self.fetch_optional(tombstone, MAX_TOMBSTONE) is None:
                return ""
        except OstreeError:
            return ""
        return f": the commit was deleted there ({tombstone} marks it)"

    def list_refs(self) -> list[tuple[str, bytes]] | None:
        """The refs the repository's summary file lists; None without one."""
        if not self._summary_fetched:
            data = self.fetch_optional("summary", MAX_METADATA_SIZE)
            self.summary_deltas = {}
            if data is not None:
                if self.summary_keyring is not None:  # (a refused summary is refused again on the next call)
                    verify_signed(data, f"the summary of {self.description}",
                                  f"{self.description.rstrip('/')}/summary.sig",
                                  self.fetch_optional("summary.sig", MAX_DETACHED), self.summary_keyring)
                self._summary, metadata = parse_summary(data, f"{self.description} summary")
                self.summary_deltas = parse_delta_table(metadata, f"{self.description} summary")
            self._summary_fetched = True
        return self._summary


# ---------------------------------------------------------------------------------- local


# Below a local repository's root nothing is followed: a symlinked objects/, objects/XX or
# refs/heads/ would take the pull to files the repository does not hold.
_CONFINED = syscalls.RESOLVE_CONFINED
SYMLINKED = "is a symlink or lies under one (nothing below a repository's root is followed)"


class LocalRepo(_Summary):
    """An ostree repository on disk, in archive, bare, bare-user or bare-user-only mode. Its
    files are opened beneath its root (the path given, which may itself be a symlink)
    without following any symlink on the way."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = path
        self._objects = -1
        try:
            self._root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OstreeError(f"{path} is not an ostree repository ({e.strerror})") from None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.fetch_optional("config", MAX_CONFIG)
        if config is None:
            raise OstreeError(f"{self.path} is not an ostree repository (no config file)")
        mode_text = config_value(config, "core", "mode", f"{self.path}/config")
        if mode_text is None:
            mode_text = "bare"  # ostree's default; an empty `mode=` is refused below, as ostree does
        mode = MODES.get(mode_text)
        if mode is None:
            raise OstreeError(f"{self.path}: ostree repository mode {mode_text!r} is not supported "
                              f"(supported: {', '.join(MODES)})")
        self.mode = mode
        self.archive = mode == "archive"
        try:
            self._objects = syscalls.openat2(self._root, "objects", os.O_RDONLY | os.O_DIRECTORY, 0, _CONFINED)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OstreeError(f"{self.path}/objects {SYMLINKED}") from None
            raise OstreeError(f"{self.path} is not an ostree repository (objects/: {e.strerror})") from None

    def close(self) -> None:
        for fd in (self._objects, self._root):
            if fd >= 0:
                os.close(fd)
        self._objects = self._root = -1

    def _path_error(self, rel: str, e: OSError | syscalls.NotRegularFile, what: str = "") -> OstreeError:
        """One line for a file of the repository that could not be opened: a symlink on the
        way (or the file one), not a regular file, or the system's error."""
        where = f"{what}{self.path}/{rel}"
        if isinstance(e, syscalls.NotRegularFile):
            return OstreeError(f"{where} {SYMLINKED}" if stat.S_ISLNK(e.mode) else f"{where} is not a regular file")
        return OstreeError(f"{where} {SYMLINKED}" if e.errno == errno.ELOOP else f"{where}: {e.strerror}")

    def resolve(self, ref: str) -> tuple[bytes, str | None]:
        """The commit REF names, and the name of the branch upstream (what its
        `ostree.ref-binding` lists; None for a checksum): REF itself in refs/heads/, REF
        without its first component (the remote, the collection ID) in refs/remotes/ and
        refs/mirrors/, BRANCH for `REMOTE:BRANCH` (ostree's refspec, refs/remotes/ only)."""
        if is_checksum_text(ref):
            return parse_checksum(ref), None
        check_ref_name(ref)
        remote, colon, branch = ref.partition(":")
        if colon:
            check_ref_name(remote)
            check_ref_name(branch)
            places = [(f"refs/remotes/{remote}/{branch}", branch)]
        else:
            upstream = ref.split("/", 1)[-1]
            places = [(f"refs/heads/{ref}", ref), (f"refs/remotes/{ref}", upstream), (f"refs/mirrors/{ref}", upstream)]
        for rel, name in places:
            try:
                fd, _st = syscalls.open_regular(self._root, os.fsencode(rel), resolve=_CONFINED)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except (OSError, syscalls.NotRegularFile) as e:
                alias = self._alias(rel) if isinstance(e, syscalls.NotRegularFile) and stat.S_ISLNK(e.mode) else None
                hint = f"; it is an alias of {alias}: pull that" if alias else ""
                raise OstreeError(f"{self._path_error(rel, e, 'ref ')}{hint}") from None
            with os.fdopen(fd, "rb") as f:
                text = f.read(200)
            return parse_checksum(text.decode("ascii", "replace"), f"ref {ref} in {self.path}"), name
        raise OstreeError(f"no ref {ref!r} in ostree repository {self.path}")

    def _alias(self, rel: str) -> str | None:
        """The ref a symlinked ref names (`ostree refs --alias` makes them, relative to their
        directory), as a name under the same refs/ directory; None if it names none."""
        import posixpath

        parent, _, name = rel.rpartition("/")
        top = "/".join(rel.split("/", 2)[:2])  # refs/heads, refs/remotes, refs/mirrors
        try:
            fd = syscalls.openat2(self._root, parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _CONFINED)
        except OSError:
            return None
        try:
            target = os.readlink(name, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        named = posixpath.normpath(posixpath.join(parent, target))
        if target.startswith("/") or not named.startswith(top + "/") or not named.isprintable():
            return None
        return named[len(top) + 1:]

    def _rel(self, checksum: bytes, kind: Kind) -> str:
        h = checksum.hex()
        return f"{h[:2]}/{h[2:]}.{kind.extension(self.archive)}"

    def _open(self, checksum: bytes, kind: Kind) -> tuple[int, os.stat_result]:
        """The object opened read-only; it must be a regular file."""
        try:
            fd = syscalls.openat2(self._objects, self._rel(checksum, kind), _OBJECT_FLAGS, 0, _CONFINED)
        except OSError as e:
            raise self._open_error(checksum, kind, e) from None
        return fd, self._regular(fd, checksum, kind)

    def _open_error(self, checksum: bytes, kind: Kind, e: OSError) -> OstreeError:
        if isinstance(e, FileNotFoundError):
            return OstreeError(f"{describe(checksum, kind)} is missing from {self.path}{self._deleted(checksum, kind)}")
        if e.errno == errno.ELOOP:
            return OstreeError(f"{describe(checksum, kind)} in {self.path}: objects/{self._rel(checksum, kind)} "
                               f"{SYMLINKED}")
        return OstreeError(f"{describe(checksum, kind)} in {self.path}: {e.strerror}")

    def _regular(self, fd: int, checksum: bytes, kind: Kind) -> os.stat_result:
        """fstat of the object open at fd, which is closed unless it is a regular file."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OstreeError(f"{describe(checksum, kind)} in {self.path} is not a regular file")
        return st

    def read_metadata(self, checksum: bytes, kind: Kind) -> bytes:
        fd, st = self._open(checksum, kind)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > MAX_METADATA_SIZE:
                raise OstreeError(f"{describe(checksum, kind)}: {st.st_size} bytes, more than ostree allows")
            # a byte more than stat said: a file that grew meanwhile fails its checksum
            # (and a read of the limit would allocate 128 MiB per object)
            return f.read(st.st_size + 1)

    def read_detached(self, commit: bytes, limit: int) -> bytes | None:
        """The commit's detached metadata (`.commitmeta`), None when it has none."""
        h = commit.hex()
        return self.fetch_optional(f"objects/{h[:2]}/{h[2:]}.commitmeta", limit)

    def fetch_optional(self, path: str, limit: int) -> bytes | None:
        """A regular file of the repository that may be absent (summary, static deltas,
        detached metadata): None when it is."""
        try:
            fd, _st = syscalls.open_regular(self._root, os.fsencode(path), resolve=_CONFINED)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, syscalls.NotRegularFile) as e:
            raise self._path_error(path, e) from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OstreeError(f"{self.path}/{path} is larger than {limit} bytes")
        return data

    def fetch_file(self, checksum: bytes, inline_max: int, tmp_dir: str) -> FetchedFile:
        if self.archive:
            fd, _st = self._open(checksum, Kind.FILE)
            with os.fdopen(fd, "rb") as f:
                return unpack_filez(f.read, checksum, inline_max, tmp_dir)
        rel = self._rel(checksum, Kind.FILE)
        try:
            # opened at once, one lookup: only a symlink (which the open refuses) needs a stat
            fd = syscalls.openat2(self._objects, rel, _OBJECT_FLAGS, 0, _CONFINED)
        except OSError as e:
            if e.errno != errno.ELOOP or self.mode == "bare-user":  # (bare-user keeps symlinks in files)
                raise self._open_error(checksum, Kind.FILE, e) from None
            return self._symlink(checksum, rel)
        st = self._regular(fd, checksum, Kind.FILE)
        try:
            if self.mode == "bare-user":
                try:
                    meta = os.getxattr(fd, "user.ostreemeta")
                except OSError as e:
                    raise OstreeError(f"{describe(checksum, Kind.FILE)} in {self.path}: no user.ostreemeta "
                                      f"({e.strerror})") from None
                base = parse_meta_xattr(meta, checksum)
                if stat.S_ISLNK(base.mode):
                    raw = os.pread(fd, min(st.st_size, MAX_HEADER_SIZE), 0)
                    if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
                        raise OstreeError(f"{describe(checksum, Kind.FILE)}: bare-user symlink without its NUL")
                    target = raw[:-1].decode("utf-8", "surrogateescape")
                    header = FileHeader(0, base.uid, base.gid, base.mode, target, base.xattrs)
                else:
                    header = FileHeader(st.st_size, base.uid, base.gid, base.mode, "", base.xattrs)
            elif self.mode == "bare":
                header = FileHeader(st.st_size, st.st_uid, st.st_gid, st.st_mode, "", self._xattrs(fd, True))
            else:
                header = FileHeader(st.st_size, 0, 0, st.st_mode, "", [])
            header.check(checksum)
            if header.is_symlink or header.size <= inline_max:
                content = b"" if header.is_symlink else os.pread(fd, header.size + 1, 0)
                check_file(header, checksum, content)
                return FetchedFile(header, content=content)
        except BaseException:
            os.close(fd)
            raise
        return FetchedFile(header, fd=fd, verified=False)

    def _symlink(self, checksum: bytes, rel: str) -> FetchedFile:
        """A bare or bare-user-only symlink object, checked against its checksum (looked at
        in its objects/XX, itself opened without following a symlink)."""
        subdir, name = rel.split("/")
        try:
            dirfd = syscalls.openat2(self._objects, subdir, os.O_PATH | os.O_DIRECTORY, 0, _CONFINED)
        except OSError as e:
            raise self._open_error(checksum, Kind.FILE, e) from None
        try:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dirfd) if stat.S_ISLNK(st.st_mode) else None
            except OSError as e:  # removed since the open refused it
                raise self._open_error(checksum, Kind.FILE, e) from None
            if target is None:  # replaced since the open refused it
                raise OstreeError(f"{describe(checksum, Kind.FILE)} in {self.path} changed while it was read")
            xattrs = self._xattrs(f"/proc/self/fd/{dirfd}/{name}", False) if self.mode == "bare" else []
        finally:
            os.close(dirfd)
        header = FileHeader(0, st.st_uid if self.mode == "bare" else 0, st.st_gid if self.mode == "bare" else 0,
                            st.st_mode, target, xattrs)
        header.check(checksum)
        check_file(header, checksum)
        return FetchedFile(header, content=b"")

    @staticmethod
    def _xattrs(target: int | str, follow: bool) -> list[tuple[bytes, bytes]]:
        """A bare object's xattrs, names NUL-terminated and sorted as ostree stores them."""
        try:
            names = os.listxattr(target, follow_symlinks=follow)
            pairs = [(n.encode("utf-8", "surrogateescape") + b"\0", os.getxattr(target, n, follow_symlinks=follow))
                     for n in names]
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []
            raise
        return sorted(pairs)


# ----------------------------------------------------------------------------------- HTTP


class _NotFound(Exception):
    pass


# A peer slower than LOW_SPEED_LIMIT bytes a second over LOW_SPEED_TIME seconds, from the
# response's first byte on (status line and headers included), is dropped and the request
# retried, as curl's low-speed limit does: a socket timeout bounds each recv only, and a
# server dripping a byte a recv would hold a pull for ever.
LOW_SPEED_LIMIT = 1000
LOW_SPEED_TIME = 30.0
# What is read of a body that is not the object asked for (a 404, an error page) before the
# connection is dropped rather than kept.
MAX_ERROR_BODY = 64 << 10


# Lines in a row, with no body bytes between them (the status line, interim 1xx replies and
# headers before a body; the trailer after its last chunk), at most MAX_LINES bytes and
# LOW_SPEED_TIME seconds: http.client reads interim replies and trailer lines for as long as
# they come, so a server sending them faster than the low-speed limit held a pull for ever.
# (curl caps a response's headers, interim replies included, at 300 KiB.)
MAX_LINES = 256 << 10


class _TooSlow(TimeoutError):
    pass


class _TooLong(OSError):
    pass


class _PacedSocketReader(io.RawIOBase):
    """The socket's bytes under the low-speed limit: each recv waits at most until the
    current LOW_SPEED_TIME window ends, and a window that ends short raises _TooSlow."""

    def __init__(self, sock: socket.socket, ref: io.BufferedReader) -> None:
        self._sock = sock
        # http.client's own reader of the socket, closed with this one: while it is open the
        # socket stays open for the response after its connection is closed (as then)
        self._ref = ref
        self._timeout = sock.gettimeout()  # put back after each recv: a request send uses it
        self._window = time.monotonic()
        self._got = 0
        self._returned: float | None = None  # when readinto last returned

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._ref.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        if self._returned is not None:
            # Only time spent waiting for the server counts: not the caller's between reads
            # (inflating, hashing, a write to a congested disk).
            self._window += time.monotonic() - self._returned
        while True:
            now = time.monotonic()
            if now - self._window >= LOW_SPEED_TIME:
                if self._got < LOW_SPEED_LIMIT * LOW_SPEED_TIME:
                    raise _TooSlow(f"less than {LOW_SPEED_LIMIT} bytes a second for {LOW_SPEED_TIME:g} seconds")
                self._window, self._got = now, 0
            self._sock.settimeout(self._window + LOW_SPEED_TIME - now)
            try:
                n = self._sock.recv_into(buffer)
            except TimeoutError:
                continue  # the window's end: judged above
            finally:
                self._sock.settimeout(self._timeout)
            self._got += n
            self._returned = time.monotonic()
            return n


class _LineBoundReader(io.BufferedReader):
    """http.client's reader of a response, with lines in a row bounded (MAX_LINES): http.client
    reads status, header, chunk-size and trailer lines with readline, and body bytes with
    read, read1 or readinto, which start a new run."""

    _run = 0  # bytes of lines since the last body bytes
    _since = 0.0  # when that run started

    def readline(self, size: int | None = -1, /) -> bytes:
        if not self._run:
            self._since = time.monotonic()
        line = super().readline(size)
        self._run += len(line)
        if self._run > MAX_LINES:
            raise _TooLong(f"more than {MAX_LINES} bytes of status, header or trailer lines")
        if time.monotonic() - self._since > LOW_SPEED_TIME:
            raise _TooSlow(f"status, header or trailer lines for more than {LOW_SPEED_TIME:g} seconds")
        return line

    def read(self, size: int | None = -1, /) -> bytes:
        self._run = 0
        return super().read(size)

    def read1(self, size: int = -1, /) -> bytes:
        self._run = 0
        return super().read1(size)

    def readinto(self, buffer: Any, /) -> int:
        self._run = 0
        return super().readinto(buffer)


def _paced_response(sock: socket.socket, *args, **kwargs) -> http.client.HTTPResponse:
    """An HTTPResponse (a connection's response_class) reading through _PacedSocketReader,
    its lines bounded by _LineBoundReader."""
    import http.client

    resp = http.client.HTTPResponse(sock, *args, **kwargs)
    resp.fp = _LineBoundReader(_PacedSocketReader(sock, resp.fp))
    return resp


class _Body:
    """A response body whose read() raises IncompleteRead when the connection ends early:
    http.client then returns b"", which would read as a short (corrupt) object, not as
    the network failure to retry that it is."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self._resp = resp

    def read(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the body, in one buffer: one of at most the
        body's length when it has one; else (chunked, or up to the connection's end) one
        growing a recv at a time, so that n is not allocated at once (a list of the pieces
        cost ~88 times the size of a body served in 1-byte chunks)."""
        import http.client

        resp = self._resp
        if resp.length is not None:
            want = min(n, resp.length)
            data = resp.read(want)  # (closes the response at its end: the connection can be kept)
            if len(data) < want:
                raise http.client.IncompleteRead(data, want - len(data))
            return data
        first = resp.read1(min(n, READ_CHUNK))
        if not first or len(first) == n:
            return first
        gathered = bytearray(first)
        while len(gathered) < n:
            piece = resp.read1(min(n - len(gathered), READ_CHUNK))
            if not piece:
                break
            gathered += piece
        return bytes(gathered)


# Redirects (301, 302, 303, 307, 308) are followed per request, as libcurl does for ostree:
# one of the repository's `config` or `summary` does not move later objects. At most
# MAX_REDIRECTS hops a request, to http or https only, never from https down to http.
REDIRECTS = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 10
# Idle connections are kept per origin (scheme, host, port): the repository's own, and those
# of at most MAX_ORIGINS hosts redirected to (a mirror, a CDN), the least recently used
# closed first.
MAX_ORIGINS = 4
MAX_LOCATION = 8 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


class _Retry(Exception):
    """A failure worth another attempt (a 5xx, a reset, a timeout): its text."""


class HttpRepo(_Summary):
    """An archive repository at an http:// or https:// URL (kept-alive connections, one per
    concurrent fetch; retries with exponential backoff on 5xx, resets and timeouts;
    redirects followed)."""

    def __init__(self, url: str, timeout: float = 30.0, attempts: int = 5, backoff: float = 0.25) -> None:
        parts = urllib.parse.urlsplit(url)
        origin = _origin(parts)
        if origin is None:
            hint = " (a repository on this machine: `pycfs ostree pull-local`)" if "://" not in url else ""
            raise OstreeError(f"{url!r} is not an http:// or https:// URL{hint}")
        self.url = url
        self.description = url
        self._origin = origin
        self._base = parts.path.rstrip("/") + "/"
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.archive = True
        self._mode_lock = threading.Lock()
        self._mode_read = False
        self._mode: str | None = None

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

    def _connection(self, origin: Origin) -> http.client.HTTPConnection:
        import http.client

        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
        scheme, host, port = origin
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=self._timeout)
        conn.response_class = _paced_response  # type: ignore[assignment]
        return conn

    def _release(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        """conn kept idle for the next request to origin; the least recently used other
        origin's connections closed when more than MAX_ORIGINS others would be kept."""
        closing: list[http.client.HTTPConnection] = []
        with self._lock:
            idle = self._idle.pop(origin, [])
            idle.append(conn)
            self._idle[origin] = idle  # (last in the dict: the most recently used)
            others = [o for o in self._idle if o != self._origin]
            for old in others[:max(0, len(others) - MAX_ORIGINS)]:
                closing += self._idle.pop(old)
        for c in closing:
            c.close()

    def get(self, path: str, consume: Callable[[_Body], T], what: str) -> T:
        """GET base/path (following redirects) and hand the body to consume; a 404 raises
        _NotFound."""
        target = self._base + urllib.parse.quote(path, safe="/+")
        first = _url(self._origin, target)
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._backoff * (1 << (attempt - 1)))
            origin, request = self._origin, target
            seen = {first}
            try:
                for hops in range(MAX_REDIRECTS + 1):
                    status, value = self._once(origin, request, consume, what, hops > 0)
                    if status == 200:
                        return value
                    if status == 404:
                        raise _NotFound()
                    origin, request = _follow(origin, request, value, first, what)
                    url = _url(origin, request)
                    if url in seen:
                        raise OstreeError(f"fetching {what} from {first}: redirect loop "
                                          f"(back to {url} after {hops + 1} redirects)")
                    seen.add(url)
            except _Retry as e:
                last = str(e)
                continue
            raise OstreeError(f"fetching {what} from {first}: more than {MAX_REDIRECTS} redirects")
        raise OstreeError(f"fetching {what} from {self.url} failed after {self._attempts} attempts: {last}")

    def _once(self, origin: Origin, request: str, consume: Callable[[_Body], T], what: str,
              redirected: bool) -> tuple[int, Any]:
        """One request: (200, what consume returned), (404, None) or (a redirect status,
        its Location); _Retry for a failure worth another attempt."""
        import http.client

        conn = self._connection(origin)
        value: Any = None
        try:
            with self._lock:
                self.requests += 1
            conn.request("GET", request)
            resp = conn.getresponse()
            body = _Body(resp)
            if resp.status == 200:
                value = consume(body)
                if body.read(1):
                    raise OstreeError(f"{what}: more data than expected from {_url(origin, request)}")
                keep = True
            else:
                # an error page is read (to keep the connection) only while it is small
                keep = len(body.read(MAX_ERROR_BODY + 1)) <= MAX_ERROR_BODY
                if resp.status in REDIRECTS:
                    value = resp.headers.get_all("Location") or []
                elif resp.status != 404:
                    last = f"HTTP {resp.status} {resp.reason}"
                    if redirected:
                        last += f" from {_url(origin, request)}"
                    conn.close()
                    if resp.status >= 500 or resp.status in (408, 429):
                        raise _Retry(last)
                    raise OstreeError(f"fetching {what} from {self.url}: {last}")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _Retry(str(e) or type(e).__name__) from None
        except BaseException:
            conn.close()
            raise
        if resp.will_close or not keep:
            conn.close()
        else:
            self._release(origin, conn)
        return resp.status, value

    def resolve(self, ref: str) -> tuple[bytes, str | None]:
        """A commit checksum (and None), or a ref from the summary, or refs/heads/REF when
        there is no summary (and REF, the branch upstream): as ostree, a repository with a
        summary serves its refs only from it (with a keyring, from the signed summary:
        refs/heads/ is signed by no one)."""
        if is_checksum_text(ref):
            return parse_checksum(ref), None
        check_ref_name(ref)
        refs = self.list_refs()
        if refs is not None:
            found = dict(refs).get(ref)
            if found is None:
                raise OstreeError(f"no ref {ref!r} in the summary of {self.url} (a repository with a summary "
                                  "serves its refs from it; `pycfs ostree list-refs` lists them)")
            return found, ref
        try:
            text = self.get(f"refs/heads/{ref}", lambda r: r.read(200), f"ref {ref}")
        except _NotFound:
            raise OstreeError(f"no ref {ref!r} at {self.url}") from None
        return parse_checksum(text.decode("ascii", "replace"), f"ref {ref} at {self.url}"), ref

    def _object_path(self, checksum: bytes, kind: Kind) -> str:
        h = checksum.hex()
        return f"objects/{h[:2]}/{h[2:]}.{kind.extension(True)}"

    def read_metadata(self, checksum: bytes, kind: Kind) -> bytes:
        where = describe(checksum, kind)
        try:
            data = self.get(self._object_path(checksum, kind), lambda r: r.read(MAX_METADATA_SIZE + 1), where)
        except _NotFound:
            raise OstreeError(f"{where} is missing from {self.url}{self._deleted(checksum, kind)}") from None
        if len(data) > MAX_METADATA_SIZE:
            raise OstreeError(f"{where}: more than {MAX_METADATA_SIZE} bytes")
        return data

    def fetch_file(self, checksum: bytes, inline_max: int, tmp_dir: str) -> FetchedFile:
        where = describe(checksum, Kind.FILE)
        try:
            return self.get(self._object_path(checksum, Kind.FILE),
                            lambda r: unpack_filez(r.read, checksum, inline_max, tmp_dir), where)
        except _NotFound:
            mode = self._mode_not_archive()
            if mode is not None:
                raise OstreeError(f"{self.url} is a {mode} repository (core.mode in its config), whose files are not "
                                  ".filez objects: over HTTP pycfs pulls archive repositories only, as ostree does; "
                                  "`pycfs ostree pull-local` reads it where it is on disk") from None
            raise OstreeError(f"{where} is missing from {self.url}") from None

    def _mode_not_archive(self) -> str | None:
        """Once a file object is missing: the repository's mode when its config (read
        once) names another than archive. A pull that succeeds reads no config, as
        ostree's does not (2022.7: from a bare repository it gets 404s for .filez)."""
        with self._mode_lock:
            if not self._mode_read:
                self._mode_read = True
                try:
                    config = self.fetch_optional("config", MAX_CONFIG)
                    if config is not None:
                        self._mode = config_value(config, "core", "mode", f"{self.url} config") or "bare"
                except OstreeError:
                    pass  # (no config worth reading: the object is just missing)
        return self._mode if self._mode is not None and MODES.get(self._mode) != "archive" else None

    def read_detached(self, commit: bytes, limit: int) -> bytes | None:
        h = commit.hex()
        return self.fetch_optional(f"objects/{h[:2]}/{h[2:]}.commitmeta", limit)

    def fetch_optional(self, path: str, limit: int) -> bytes | None:
        """A file that may be absent (summary, delta indexes): None on 404."""
        try:
            data = self.get(path, lambda r: r.read(limit + 1), path)
        except _NotFound:
            return None
        if len(data) > limit:
            raise OstreeError(f"{path} at {self.url} is larger than {limit} bytes")
        return data


def _origin(parts: urllib.parse.SplitResult) -> Origin | None:
    """(scheme, host, port) of an http or https URL; None for another scheme, no host or a
    bad port."""
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.scheme, parts.hostname, _DEFAULT_PORTS[parts.scheme] if port is None else port


def _url(origin: Origin, request: str) -> str:
    scheme, host, port = origin
    netloc = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{request}"


def _follow(origin: Origin, request: str, locations: list[str], first: str, what: str) -> tuple[Origin, str]:
    """Where a redirect from origin+request to its Location leads: (origin, request path);
    one error for a missing or invalid Location, a scheme other than http and https, and
    https down to http."""
    here = _url(origin, request)
    where = f"fetching {what} from {first}: the redirect from {here}"
    if len(locations) != 1:
        raise OstreeError(f"{where} has {len(locations) or 'no'} Location headers: one is needed")
    location = locations[0].strip()
    if not location:
        raise OstreeError(f"{where} has an empty Location")
    # http.client refuses a request line with spaces or controls; non-ASCII is not a URL
    if len(location) > MAX_LOCATION or not location.isascii() or any(c <= " " or c == "\x7f" for c in location):
        raise OstreeError(f"{where} has an invalid Location {location[:200]!r}")
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(here, location))
    except ValueError:
        raise OstreeError(f"{where} has an invalid Location {location[:200]!r}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise OstreeError(f"{where} leads to {location[:200]!r}: only http:// and https:// are followed")
    target = _origin(parts)
    if target is None:
        raise OstreeError(f"{where} has an invalid Location {location[:200]!r}")
    if origin[0] == "https" and target[0] == "http":
        raise OstreeError(f"{where} leads to {location[:200]!r}: refused, a redirect from https to plain http "
                          "would drop TLS (the server's identity and the transfer's privacy)")
    return target, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def open_source(location: str) -> LocalRepo | HttpRepo:
    if location.startswith(("http://", "https://")):
        return HttpRepo(location)
    return LocalRepo(location)
