"""The server's read-ahead: what a reader will want next, pushed into the kernel's page cache."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from queue import Empty, Full, Queue
from typing import NamedTuple

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
PUSH_AHEAD = 8 << 20
PUSH_FILES = 64
PUSH_BYTES = 8 << 20
PUSH_FILE_LIMIT = 1 << 20
PUSH_QUEUE = 256
PUSH_NICE = 10
# How long stopping waits for the pushing thread.
STOP_TIMEOUT = 60.0

_STORE_HEADER = fuse.OutHeader.FORMAT.size + fuse.NotifyStoreOut.FORMAT.size


_Job = tuple[int, Node, int, int, tuple[int, int] | None]  # nid, node, start, end, (parent nid, index)


class _Walk(NamedTuple):
    """Push what a walk of the tree meets after this entry."""

    parent: int
    at: int  # the entry's index among the parent's


class Pusher:
    """The server's read-ahead: what a reader will want next goes into the kernel's page cache
    through FUSE_NOTIFY_STORE, from a thread of its own.

    Its own thread, because a store waits for the page locks of reads still pending in the
    kernel, and only the request loop answers those: the loop hands work over and never waits
    for it (when the queue is full, that read-ahead is dropped). What is pushed is decided by
    the reads the loop answers: a read past the start of a file gets the next PUSH_AHEAD of it;
    the first read of a file that comes after the previously first-read file in a walk of the
    tree (later in its directory, or in a later directory of the same parent: reading in
    order, as `cp -r`, `tar` or `find | xargs cat` do) gets the next PUSH_FILES files (at
    most PUSH_BYTES) that walk meets, less those the reader reaches first. Stores the kernel
    refuses (an inode it forgot) and objects that cannot be opened are skipped: the reads
    that follow, if any, say why."""

    def __init__(self, ops: ComposefsOperations, fd: int) -> None:
        self.ops = ops
        self.fd = fd
        self.jobs: Queue[_Job | _Walk | None] = Queue(PUSH_QUEUE)
        self._ahead: dict[int, int] = {}  # nid -> where the queued part of it ends
        self._last_first: tuple[int, int] | None = None  # (parent nid, index) of the latest first read
        self._reached: dict[int, int] = {}  # parent nid -> the index of the latest first read in it
        self._read_to: dict[int, int] = {}  # nid -> the furthest a READ of it reached
        self._thread = threading.Thread(target=self._run, name="pycfs-fuse-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        while True:  # what is still queued is of no use now
            try:
                self.jobs.get_nowait()
                self.jobs.task_done()
            except Empty:
                break
        self.jobs.put(None)
        # bounded: a store may wait on a read the stopped loop no longer answers
        self._thread.join(STOP_TIMEOUT)

    def after_read(self, ino: int, offset: int, end: int) -> None:
        """The loop answered a read of `ino` from `offset` to `end`: queue what follows."""
        tree = self.ops.tree
        nid = tree.nid(ino)
        node = tree.node(nid)
        if self._read_to.get(nid, 0) < end:
            self._read_to[nid] = end
        if end < node.raw.size:
            self._queue(nid, node, max(end, self._ahead.get(nid, 0)), min(node.raw.size, end + PUSH_AHEAD))
        position = tree.position.get(nid)
        if offset != 0 or position is None:
            return
        previous, self._last_first = self._last_first, position
        self._reached[position[0]] = position[1]
        if previous is not None and self._in_order(previous, position):
            try:  # which files follow is worked out by the pusher, off the loop's way
                self.jobs.put_nowait(_Walk(*position))
            except Full:
                pass

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

    def _queue(self, nid: int, node: Node, start: int, end: int) -> None:
        if start >= end:
            return
        try:
            self.jobs.put_nowait((nid, node, start, end, None))
        except Full:
            return
        self._ahead[nid] = end

    def _run(self) -> None:
        # behind the request loop and the readers when the CPUs are busy: read-ahead only
        # helps while it does not slow what it is for
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUSH_NICE)
        splicer = Splicer()
        try:
            while (job := self.jobs.get()) is not None:
                try:
                    if isinstance(job, _Walk):
                        self._walk(splicer, job)
                    else:
                        self._push_one(splicer, *job)
                except OSError:  # /dev/fuse is gone: the mount is
                    return
                finally:
                    self.jobs.task_done()
        finally:
            splicer.close()

    def _walk(self, splicer: Splicer, walk: _Walk) -> None:
        """Push the start of the next PUSH_FILES files (PUSH_BYTES) a walk meets after the
        entry at walk.at of walk.parent, less those pushed already."""
        budget = PUSH_BYTES
        for count, (nid, position) in enumerate(self._files_after(walk.parent, walk.at)):
            if count == PUSH_FILES or budget <= 0:
                return
            node = self.ops.tree.node(nid)
            start, end = self._ahead.get(nid, 0), min(node.raw.size, PUSH_FILE_LIMIT)
            if start < end:  # of a big file, its start: the rest follows its reads
                budget -= end - start
                self._ahead[nid] = end
                self._push_one(splicer, nid, node, start, end, position)

    def _push_one(self, splicer: Splicer, nid: int, node: Node, start: int, end: int,
                  position: tuple[int, int] | None) -> None:
        """Push one range unless the reader got there first; OSError only when /dev/fuse fails."""
        if position is not None and self._reached.get(position[0], -1) >= position[1]:
            return
        try:
            self._push(splicer, nid, node, start, end)
        except ObjectProblem:
            pass
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted
                raise
            # ENOENT: the kernel no longer has the inode; anything else: the reads will say
        except Exception as e:  # read-ahead is an optimisation: it must not stop for one file
            log.error("%s: read-ahead failed: %s", self.ops.tree.path(nid), e)

    def _push(self, splicer: Splicer, nid: int, node: Node, start: int, end: int) -> None:
        ino = self.ops.tree.ino(nid)
        raw = node.raw
        if raw.datalayout != F.DATALAYOUT_CHUNK_BASED:
            if node.content is None:
                node.content = self.ops.image.reader.data_of(raw)
            data = node.content[start:end]
            os.writev(self.fd, [_store_header(ino, start, len(data)), data])
            return
        redirect = node.internal.get(REDIRECT)
        if not redirect:
            return  # zeros: the kernel's own reads are as cheap
        fd = self.ops.open_object(redirect.lstrip(b"/"), raw.size, node.internal.get(METACOPY))
        try:
            for offset in range(start, end, splicer.limit):
                length = min(splicer.limit, end - offset)
                if self._read_to.get(nid, 0) >= offset + length:
                    continue  # the reader got there first
                splicer.send(self.fd, _store_header(ino, offset, length), fd, offset, length)
        finally:
            os.close(fd)


def _store_header(ino: int, offset: int, length: int) -> bytes:
    return _OUT_HEADER.pack(_STORE_HEADER + length, fuse.NOTIFY_STORE, 0) + _STORE_OUT.pack(ino, offset, length, 0)


_OUT_HEADER = fuse.OutHeader.FORMAT
_STORE_OUT = fuse.NotifyStoreOut.FORMAT
