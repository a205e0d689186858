"""The server's read-ahead: what a reader will want next, pushed into the kernel's page cache
by a process of its own."""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import NoReturn

from pycfs.helper.hardening import die_with_parent
from pycfs.host.erofs import format as F
from pycfs.host.fuse.image import Node
from pycfs.host.fuse.operations import METACOPY, REDIRECT, ComposefsOperations, ObjectProblem
from pycfs.host.fuse.splice import Splicer
from pycfs.protocol import fuse

log = logging.getLogger("pycfs.fuse")

# FUSE_NOTIFY_STORE puts bytes in the kernel's page cache, so the reads that follow need no
# round trip: a read of a file gets the next PUSH_AHEAD of it; a walk reading files in order
# gets the next PUSH_FILES files it will meet, PUSH_BYTES in all, at most PUSH_FILE_LIMIT of
# each. Measured on the bench image: see README.
PUSH_AHEAD = 16 << 20
PUSH_FILES = 512
PUSH_BYTES = 64 << 20
PUSH_FILE_LIMIT = 1 << 20
# Pushes waiting; more are dropped (a reader that far ahead is served by its reads).
PUSH_QUEUE = 2 * PUSH_FILES
PAGE = 4096
# How long stopping waits for the read-ahead process before it is killed.
STOP_TIMEOUT = 10.0

# What the request loop tells the read-ahead process about a READ it answered: the inode and
# the range. One write each, never split.
EVENT = struct.Struct("<QQQ")
_EVENTS_AT_ONCE = 256

_STORE_HEADER = fuse.OutHeader.FORMAT.size + fuse.NotifyStoreOut.FORMAT.size


class ReadAhead:
    """What to push, decided from the reads the request loop answered, and the pushing itself,
    one step at a time (so that news of the reader comes in between).

    A read of a file gets the next PUSH_AHEAD of it. Once first reads of files come in the
    order a walk of the tree meets them (later in the directory, or in a later directory of
    the same parent: as `cp -r`, `tar` or `find | xargs cat` read), the walk keeps the next
    PUSH_FILES files (at most PUSH_BYTES, PUSH_FILE_LIMIT of each) pushed ahead of the
    reader. A reader served from the page cache sends no READ, so what is pushed leaves a
    tripwire about halfway, unpushed: a file of the walk, one page of a file's window. Its
    READ says where the reader is, and the walk takes the next files while the reader still
    has the rest of the window to read. What the reader reached is not pushed; a reader that
    caught up with a push reads the next piece itself while the push goes on after it. Stores
    the kernel refuses (an inode it forgot) and objects that cannot be opened are skipped:
    the reads that follow, if any, say why."""

    def __init__(self, ops: ComposefsOperations, fd: int) -> None:
        self.ops = ops
        self.fd = fd
        self.jobs: deque[Iterator[None]] = deque()
        self._ahead: dict[int, int] = {}  # nid -> where the queued part of it ends
        self._last_first: tuple[int, int] | None = None  # (parent nid, index) of the latest first read
        self._reached: dict[int, int] = {}  # parent nid -> the index of the latest first read in it
        self._read_to: dict[int, int] = {}  # nid -> the furthest a READ of it reached
        # the walk: the next files it meets, and those it took ahead of the reader ((parent nid,
        # index), bytes pushed), one of them the tripwire, left to the reader
        self._cursor: Iterator[tuple[int, tuple[int, int]]] | None = None
        self._window: deque[tuple[tuple[int, int], int]] = deque()
        self._window_bytes = 0
        self._tripwire: tuple[int, int] | None = None
        self._splicer = Splicer()

    def close(self) -> None:
        self._splicer.close()

    def after_read(self, ino: int, offset: int, end: int) -> None:
        """A read of `ino` from `offset` to `end` was answered: queue what follows."""
        tree = self.ops.tree
        nid = tree.nid(ino)
        node = tree.node(nid)
        if self._read_to.get(nid, 0) < end:
            self._read_to[nid] = end
        if end < node.raw.size:
            self._ahead_in_file(nid, node, end)
        position = tree.position.get(nid)
        if offset != 0 or position is None:
            return
        previous, self._last_first = self._last_first, position
        self._reached[position[0]] = position[1]
        if previous is None or not self._in_order(previous, position):
            self._cursor, self._tripwire = None, None  # no walk (yet)
            self._window.clear()
            self._window_bytes = 0
            return
        # what the walk took up to here is behind the reader now
        while self._window and (self._window[0][0] == position or self._in_order(self._window[0][0], position)):
            self._window_bytes -= self._window.popleft()[1]
        if self._tripwire is not None and (self._tripwire == position or self._in_order(self._tripwire, position)):
            self._tripwire = None
        if not self._window:  # the reader is at the walk's front: it goes on from here
            self._cursor = self._files_after(*position)
        self._extend_walk()

    def step(self) -> bool:
        """Push the next piece; False when there is nothing to push. OSError when /dev/fuse
        is gone."""
        while self.jobs:
            try:
                next(self.jobs[0])
                return True
            except StopIteration:
                self.jobs.popleft()
        return False

    def _queue(self, job: Iterator[None]) -> bool:
        if len(self.jobs) >= PUSH_QUEUE:
            return False
        self.jobs.append(job)
        return True

    def _ahead_in_file(self, nid: int, node: Node, end: int) -> None:
        start, stop = max(end, self._ahead.get(nid, 0)), min(node.raw.size, end + PUSH_AHEAD)
        if start >= stop:
            return
        trip = (start + stop) // 2 // PAGE * PAGE
        if trip - start < PAGE or stop - trip < 2 * PAGE:  # too small to leave a page out
            ranges = [(start, stop)]
        else:
            ranges = [(start, trip), (trip + PAGE, stop)]
        if self._queue(self._push_ranges(nid, node, ranges, None)):
            self._ahead[nid] = stop

    def _in_order(self, previous: tuple[int, int], current: tuple[int, int]) -> bool:
        """Is `current` after `previous` in a walk of the tree: later in the same directory, or
        in a directory after previous's among their parent's entries?"""
        if previous[0] == current[0]:
            return previous[1] < current[1]
        here, there = self.ops.tree.position.get(previous[0]), self.ops.tree.position.get(current[0])
        return here is not None and there is not None and here[0] == there[0] and here[1] < there[1]

    def _files_after(self, parent: int, index: int) -> Iterator[tuple[int, tuple[int, int]]]:
        """(nid, (parent nid, index)) of the regular files a walk meets after the entry at
        index: the rest of the directory, then the files of the directories after it."""
        tree = self.ops.tree
        while True:
            entries = tree.entries(parent)
            for i in range(index + 1, len(entries)):
                child = entries[i][1]
                if stat.S_ISREG(tree.node(child).raw.mode):
                    yield child, (parent, i)
            up = tree.position.get(parent)
            if up is None:
                return
            grandparent, at = up
            siblings = tree.entries(grandparent)
            after = next((i for i in range(at + 1, len(siblings)) if stat.S_ISDIR(tree.node(siblings[i][1]).raw.mode)),
                         None)
            if after is None:
                return
            parent, index = siblings[after][1], -1

    def _extend_walk(self) -> None:
        """Take the walk's next files until PUSH_FILES (PUSH_BYTES) are ahead of the reader,
        and queue their pushes; the first file taken once half of that is ahead is left to
        the reader, as the tripwire, when there is none."""
        while self._cursor is not None and len(self._window) < PUSH_FILES and self._window_bytes < PUSH_BYTES:
            taken = next(self._cursor, None)
            if taken is None:
                self._cursor = None
                return
            nid, position = taken
            node = self.ops.tree.node(nid)
            start, end = self._ahead.get(nid, 0), min(node.raw.size, PUSH_FILE_LIMIT)
            size = max(0, end - start)
            self._window.append((position, size))
            self._window_bytes += size
            if size == 0:
                continue
            if self._tripwire is None and start == 0 and (len(self._window) > PUSH_FILES // 2
                                                           or self._window_bytes > PUSH_BYTES // 2):
                self._tripwire = position
                continue
            if not self._queue(self._push_ranges(nid, node, [(start, end)], position)):
                return
            self._ahead[nid] = end  # of a big file, its start: the rest follows its reads

    def _push_ranges(self, nid: int, node: Node, ranges: list[tuple[int, int]],
                     position: tuple[int, int] | None) -> Iterator[None]:
        """Push ranges of one file, a piece a step, unless the reader got there first."""
        try:
            for start, end in ranges:
                if position is not None and self._reached.get(position[0], -1) >= position[1]:
                    return
                yield from self._push(nid, node, start, end)
        except ObjectProblem:
            pass
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted
                raise
            # ENOENT: the kernel no longer has the inode; anything else: the reads will say
        except Exception as e:  # read-ahead is an optimisation: it must not stop for one file
            log.error("%s: read-ahead failed: %s", self.ops.tree.path(nid), e)

    def _push(self, nid: int, node: Node, start: int, end: int) -> Iterator[None]:
        ino = self.ops.tree.ino(nid)
        raw = node.raw
        if raw.datalayout != F.DATALAYOUT_CHUNK_BASED:
            if node.content is None:
                node.content = self.ops.image.reader.data_of(raw)
            data = node.content[start:end]
            os.writev(self.fd, [_store_header(ino, start, len(data)), data])
            yield
            return
        redirect = node.internal.get(REDIRECT)
        if not redirect:
            return  # zeros: the kernel's own reads are as cheap
        fd = self.ops.open_object(redirect.lstrip(b"/"), raw.size, node.internal.get(METACOPY))
        try:
            offset = start
            while offset < end:
                reader = self._read_to.get(nid, 0)
                if reader > offset:
                    # the reader caught up, and its reads would race this push over the same
                    # pages: leave it the next piece, push the one after
                    offset = (reader + self._splicer.limit) // PAGE * PAGE
                    if offset >= end:
                        return
                length = min(self._splicer.limit, end - offset)
                self._splicer.send(self.fd, _store_header(ino, offset, length), fd, offset, length)
                offset += length
                yield
        finally:
            os.close(fd)

    def run(self, events: int) -> None:
        """Take the request loop's events from the pipe `events` and push, until it closes."""
        while True:
            ready, _, _ = select.select([events], [], [], 0 if self.jobs else None)
            if ready:
                data = os.read(events, EVENT.size * _EVENTS_AT_ONCE)
                if not data:
                    return
                for event in EVENT.iter_unpack(data):
                    self.after_read(*event)
            self.step()


class Pusher:
    """The request loop's side of the read-ahead, which runs in a process of its own (forked
    with the tree loaded, so it knows every position a walk needs): started after INIT, told
    about every READ answered through a pipe, stopped and reaped by the server, and killed
    with it (PR_SET_PDEATHSIG).

    Its own process, because a store waits for the page locks of reads still pending in the
    kernel, and only the request loop answers those; and in a process rather than a thread,
    so that deciding and pushing never holds the loop up waiting for the interpreter lock.
    The loop never waits for it: news that finds the pipe full is dropped."""

    def __init__(self, ops: ComposefsOperations, fd: int) -> None:
        self.ops = ops
        self.fd = fd
        self.pid: int | None = None
        self._events: int | None = None

    def start(self) -> None:
        """Fork the read-ahead process (from the request loop's thread, which it dies with)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        ppid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child; its pushes are checked by the tests
            os.close(w)
            _child(self.ops, self.fd, r, ppid)
        os.close(r)
        os.set_blocking(w, False)
        self.pid, self._events = pid, w

    def after_read(self, ino: int, offset: int, end: int) -> None:
        """The loop answered a read of `ino` from `offset` to `end`."""
        if self._events is None:
            return
        try:
            os.write(self._events, EVENT.pack(ino, offset, end))
        except BlockingIOError:
            pass  # the process is busy: this read gets no read-ahead
        except OSError:  # the process is gone: reads are served without read-ahead
            os.close(self._events)
            self._events = None

    def stop(self, serve_one: Callable[[float], bool]) -> None:
        """End the read-ahead process and reap it, answering requests meanwhile (a store it
        is making may wait for a read only the loop answers), at most STOP_TIMEOUT."""
        if self._events is not None:
            os.close(self._events)
            self._events = None
        if self.pid is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        serving, killed = True, False
        while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                if killed:  # stuck in a store: it ends when the connection closes, and init reaps it
                    break
                os.kill(self.pid, signal.SIGKILL)
                killed, deadline = True, deadline + STOP_TIMEOUT
            if serving:
                serving = serve_one(0.05)
            else:
                time.sleep(0.01)
        self.pid = None


def _child(ops: ComposefsOperations, fd: int, events: int, ppid: int) -> NoReturn:  # pragma: no cover
    status = 1
    try:
        die_with_parent(ppid)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the server stops it, or its death
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        read_ahead = ReadAhead(ops, fd)
        try:
            read_ahead.run(events)
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ENOTCONN):  # not just the mount gone
                raise
        status = 0
    except BaseException as e:
        log.error("read-ahead stopped: %s", e)
    finally:
        os._exit(status)


def _store_header(ino: int, offset: int, length: int) -> bytes:
    return _OUT_HEADER.pack(_STORE_HEADER + length, fuse.NOTIFY_STORE, 0) + _STORE_OUT.pack(ino, offset, length, 0)


_OUT_HEADER = fuse.OutHeader.FORMAT
_STORE_OUT = fuse.NotifyStoreOut.FORMAT
