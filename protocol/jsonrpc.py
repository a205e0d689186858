"""jsonrpc-fdpass framing: back-to-back JSON-RPC 2.0 objects with fds matched by position.

Wire rules (the jsonrpc-fdpass convention): no delimiter between messages, whitespace
between them is skipped; a message that carries N > 0 fds says so in a top-level integer
``"fds": N``; the fds travel as SCM_RIGHTS on the message's own bytes, and when there are
more than one sendmsg takes, on one-space continuation writes that follow the message and
precede the next one (`pycfs.protocol.fdpass`).

`Decoder` is sans-I/O: feed it whatever each recvmsg returned (bytes and fds, in order) and
pull complete messages out. It copes with partial reads down to one byte, several messages
per read, and fds that arrive before the JSON is complete or after it (continuations).

Attribution: a recvmsg never returns the fds of two sender writes, and the fds it returns
belong to the write holding the last byte it returned. Each fd batch is therefore tagged
with that byte's stream offset; a message owns the queued fds tagged before the first byte
of the next message: those on its own bytes first, then as many of those tagged on the
whitespace after it as it still lacks (continuations); the rest go to the next message (a
sender may lead with whitespace). Fewer fds than ``"fds"`` declares (the next message
starts or the stream ends first) and more than declared (counted when the message is, or
fds left at the end of the stream) are both fatal `FdError` s.

Every error is fatal for the connection and leaves the decoder closed: the fds it still
held are closed, later calls raise the same error. Fds handed out in a `Message` belong to
the caller.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pycfs.protocol.errors import PycfsError
from pycfs.protocol.fdpass import close_fds

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FD_ERROR = -32050

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_MAX_FDS = 1024
# json's C parser recurses; no JSON-RPC message of ours nests anywhere near this.
MAX_DEPTH = 64

_WS = b" \t\r\n"
_OUTSIDE = re.compile(rb'[{}\[\]"]')
_INSIDE = re.compile(rb'["\\]')
_NON_WS = re.compile(rb"[^ \t\r\n]")


class ProtocolError(PycfsError):
    """A fatal framing or fd-count error; ``code`` is the JSON-RPC error code."""

    code = INTERNAL_ERROR


class FramingError(ProtocolError):
    """Bytes that are not a stream of JSON objects, or one too large."""

    code = PARSE_ERROR


class FdError(ProtocolError):
    """The fds do not match what the messages declare."""

    code = FD_ERROR


@dataclass
class Message:
    """One decoded JSON-RPC object and the fds it carried (owned by whoever holds it)."""

    obj: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []


def encode(obj: dict[str, Any], nfds: int = 0, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """Serialise one message, adding ``"fds": nfds`` when it carries fds.

    ASCII-only output: str values holding surrogate escapes (undecodable file names from
    ``os.fsdecode``) survive the round trip as ``\\udcXX`` escapes.
    """
    if nfds:
        obj = {**obj, "fds": nfds}
    elif "fds" in obj:
        obj = {k: v for k, v in obj.items() if k != "fds"}
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    if len(data) > max_size:
        raise FramingError(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    return data


def _finite(text: str) -> float:
    """JSON has no infinities: 1e400 would parse to one, and no reply could echo it."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a finite number (not JSON)")


class Decoder:
    """Incremental jsonrpc-fdpass receiver; see the module docstring for the rules."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, max_fds: int = DEFAULT_MAX_FDS) -> None:
        self.max_message = max_message
        self.max_fds = max_fds
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (tag offset, fd)
        self._eof = False
        self._failed: ProtocolError | None = None
        # Scan state of the message being assembled (offsets relative to _buf).
        self._in_message = False  # a message starts at _buf[0]
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._parsed: tuple[dict[str, Any], int] | None = None  # (object, end) awaiting fds

    # -- input --

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append one read's bytes and fds. Takes ownership of ``fds`` immediately."""
        if self._failed is not None or self._eof:
            close_fds(fds)
            self._raise_again()
        if fds and not data:
            close_fds(fds)
            self._fail(FdError("fds arrived without any bytes"))
        self._buf += data
        if fds:
            tag = self._base + len(self._buf) - 1
            self._fds.extend((tag, fd) for fd in fds)
            if len(self._fds) > self.max_fds:
                self._fail(FdError(f"more than {self.max_fds} fds queued for one message"))

    def feed_eof(self) -> None:
        """The peer closed the stream: anything half-received is an error."""
        if self._failed is not None:
            self._raise_again()
        self._eof = True

    def close(self) -> None:
        """Drop buffered bytes and close every fd not handed out."""
        self._buf.clear()
        fds = [fd for _tag, fd in self._fds]
        self._fds.clear()
        close_fds(fds)

    @property
    def pending_fds(self) -> int:
        return len(self._fds)

    # -- output --

    def next_message(self) -> Message | None:
        """The next complete message with its fds, or None until more input arrives.

        After `feed_eof`, None means the stream ended cleanly between messages.
        """
        if self._failed is not None:
            self._raise_again()
        try:
            return self._next()
        except ProtocolError as e:
            self._fail(e)
        except BaseException:
            self.close()
            raise

    def _next(self) -> Message | None:
        if self._parsed is None:
            if not self._in_message:
                m = _NON_WS.search(self._buf)
                # Whitespace between messages is dropped as it comes (offsets stay absolute),
                # so a peer cannot make us buffer an endless run of it.
                skip = len(self._buf) if m is None else m.start()
                del self._buf[:skip]
                self._base += skip
                if m is None:
                    return self._at_rest()
                if self._buf[0] != ord("{"):
                    raise FramingError(f"expected a JSON object, got {bytes(self._buf[:24])!r}")
                self._in_message = True
                self._pos = 0
                self._depth = 0
                self._in_string = False
            end = self._scan()
            if end is None:
                if len(self._buf) > self.max_message:
                    raise FramingError(f"message exceeds the {self.max_message}-byte limit")
                if self._eof:
                    raise FramingError("stream ended in the middle of a message")
                return None
            if end > self.max_message:
                raise FramingError(f"message of {end} bytes exceeds the {self.max_message}-byte limit")
            self._parsed = (self._parse(bytes(self._buf[:end])), end)
        obj, end = self._parsed
        want = obj.get("fds", 0)
        # Fds tagged on the message's own bytes (or before them) are certainly its own;
        # those tagged on the whitespace after it are continuations when it is still
        # short, otherwise they are left for the next message.
        own = sum(1 for tag, _fd in self._fds if tag < self._base + end)
        if own > want:
            raise FdError(f"message declares {want} fds but {own} arrived with it")
        m = _NON_WS.search(self._buf, end)
        limit = self._base + m.start() if m is not None else None
        have = sum(1 for tag, _fd in self._fds if limit is None or tag < limit)
        if have < want:
            if limit is not None:
                raise FdError(f"message declares {want} fds but only {have} arrived before the next message")
            if self._eof:
                raise FdError(f"message declares {want} fds but only {have} arrived before the stream ended")
            return None
        fds = [self._fds.popleft()[1] for _ in range(want)]
        del self._buf[:end]
        self._base += end
        self._in_message = False
        self._parsed = None
        return Message(obj, fds)

    def _at_rest(self) -> Message | None:
        """No message pending: None, unless fds came that no message declared."""
        if self._eof and self._fds:
            raise FdError(f"{len(self._fds)} fds arrived without a message (more than the last one declared)")
        return None

    def _scan(self) -> int | None:
        """Advance the structural scan; the end offset of the object once it closes."""
        buf = self._buf
        pos = self._pos
        while True:
            if self._in_string:
                m = _INSIDE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                if buf[m.start()] == 0x5C:  # backslash: skip the escaped byte
                    if m.start() + 1 >= len(buf):
                        pos = m.start()  # resume at the backslash once more bytes arrive
                        break
                    pos = m.start() + 2
                    continue
                self._in_string = False
                pos = m.end()
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c = buf[m.start()]
            pos = m.end()
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise FramingError(f"JSON nested deeper than {MAX_DEPTH} levels")
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._pos = pos
                    return pos
        self._pos = pos
        return None

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise FramingError(f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise FramingError("a message must be a JSON object")
        nfds = obj.get("fds", 0)
        if type(nfds) is not int or nfds < 0:
            raise FdError(f'"fds" must be a non-negative integer, got {nfds!r}')
        if nfds > self.max_fds:
            raise FdError(f"message declares {nfds} fds, more than the limit of {self.max_fds}")
        return obj

    def _fail(self, err: ProtocolError) -> NoReturn:
        self._failed = err
        self.close()
        raise err

    def _raise_again(self) -> NoReturn:
        if self._failed is not None:
            raise type(self._failed)(str(self._failed))
        raise FramingError("data fed after the end of the stream")
