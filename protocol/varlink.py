"""Varlink message framing with fd passing (the sd-varlink convention), sans I/O.

Each message is one JSON object followed by a NUL byte, on an AF_UNIX stream socket:

    call   {"method": "iface.Method", "parameters": {...}, "more": true, "oneway": true}
    reply  {"parameters": {...}, "continues": true}
    error  {"error": "iface.ErrorName", "parameters": {...}}

File descriptors are not part of the varlink spec: a message's fds ride as SCM_RIGHTS on
the write that carries its first byte, at most 253 per message, and the JSON carries no
count. A recvmsg never returns the fds of two sender writes, and the fds it returns came
with the write holding the last byte it returned; so a received batch belongs to the
message that byte is part of.

`Decoder` takes what each recvmsg returned and hands out (message, fds); every error is
fatal for the connection and closes the fds it still held.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pycfs.protocol.errors import PycfsError
from pycfs.protocol.fdpass import close_fds

MAX_FDS_PER_MESSAGE = 253
DEFAULT_MAX_MESSAGE = 16 << 20
MAX_DEPTH = 64
# JSON values in a message: `[{},{},...]` parses to ~25 times its size, so a message's
# size alone does not bound its memory. Replies can be long lists (an image's object ids).
DEFAULT_MAX_VALUES = 2_000_000

_INTERFACE = re.compile(r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+")
_MEMBER = re.compile(r"[A-Z][A-Za-z0-9]*")


class VarlinkProtocolError(PycfsError):
    """Bytes or fds that break the framing; the connection cannot continue."""


class VarlinkError(PycfsError):
    """An error reply: a qualified error name and its parameters."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None, message: str | None = None) -> None:
        self.name = name
        self.parameters = parameters or {}
        detail = message or self.parameters.get("message")
        if detail is None and self.parameters:
            detail = ", ".join(f"{k}={v!r}" for k, v in self.parameters.items())
        super().__init__(f"{name}: {detail}" if detail else name)


def encode(obj: dict[str, Any]) -> bytes:
    """One message: compact JSON (which escapes any NUL) and the terminator."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"


def split_method(method: object) -> tuple[str, str]:
    """'org.example.Iface.Method' -> (interface, member); VarlinkProtocolError if malformed."""
    if not isinstance(method, str):
        raise VarlinkProtocolError(f"method must be a string, not {type(method).__name__}")
    interface, _, member = method.rpartition(".")
    if not _INTERFACE.fullmatch(interface) or not _MEMBER.fullmatch(member):
        raise VarlinkProtocolError(f"malformed method name {method[:200]!r}")
    return interface, member


def valid_interface_name(name: str) -> bool:
    return bool(_INTERFACE.fullmatch(name))


@dataclass
class Call:
    """A parsed call message."""

    method: str
    interface: str
    member: str
    parameters: dict[str, Any]
    more: bool = False
    oneway: bool = False
    upgrade: bool = False
    fds: list[int] = field(default_factory=list)


@dataclass
class Reply:
    """A parsed reply or error message."""

    parameters: dict[str, Any]
    continues: bool = False
    error: str | None = None
    fds: list[int] = field(default_factory=list)


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise VarlinkProtocolError(f"{key!r} must be a boolean")
    return value


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise VarlinkProtocolError("'parameters' must be an object")
    return params


def parse_call(obj: dict[str, Any], fds: list[int]) -> Call:
    interface, member = split_method(obj.get("method"))
    return Call(obj["method"], interface, member, _parameters(obj), _flag(obj, "more"), _flag(obj, "oneway"),
                _flag(obj, "upgrade"), fds)


def parse_reply(obj: dict[str, Any], fds: list[int]) -> Reply:
    error = obj.get("error")
    if error is not None and not isinstance(error, str):
        raise VarlinkProtocolError("'error' must be a string")
    return Reply(_parameters(obj), _flag(obj, "continues"), error, fds)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# Structure outside strings: '{' as '[', '}' as ']', commas kept, all else dropped.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_TOO_DEEP = b"[" * (MAX_DEPTH + 1)


def _shape_error(raw: bytes, max_values: int) -> str | None:
    """Why raw's JSON is refused before it is parsed: deeper than MAX_DEPTH (json's C parser
    recurses) or more than max_values values. Whole-buffer passes at C speed: a per-byte
    loop here cost ~1.4 s of the event loop per 16 MiB message."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH and raw.count(b",") < max_values:
        return None  # (counted inside strings too: an upper bound)
    shape = _STRING.sub(b"", raw).translate(_AS_BRACKETS, _NOT_STRUCTURE)
    if shape.count(b",") >= max_values:
        return f"holds more than {max_values} values"
    brackets = shape.replace(b",", b"")
    for _ in range(MAX_DEPTH):
        if _TOO_DEEP in brackets:
            break
        inner = brackets.replace(b"[]", b"")  # the innermost level, exactly one (no new pair is seen)
        if len(inner) == len(brackets):
            return None  # (what is left, if anything, is not JSON: the parser says so)
        brackets = inner
    return f"nests deeper than {MAX_DEPTH}" if b"[]" in brackets else None


class Decoder:
    """Feed (bytes, fds) per recvmsg; take (JSON object, fds) per complete message."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, max_values: int = DEFAULT_MAX_VALUES) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._max_values = max_values
        self._done: list[tuple[dict[str, Any], list[int]]] = []
        self._pending_fds: list[int] = []  # fds of the message still being received
        self._closed: VarlinkProtocolError | None = None

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Takes ownership of fds (closed on error). EOF is `eof()`, not empty data."""
        if self._closed is not None:
            close_fds(fds)
            raise self._closed
        if not data:
            if fds:
                self._fail(VarlinkProtocolError("fds arrived without any message bytes"), fds)
            return
        # The batch belongs to the message holding the last byte: the one still open after
        # the last NUL, or the one that NUL ends.
        owner_is_open = not data.endswith(b"\0")
        parts = data.split(b"\0")
        try:
            for i, part in enumerate(parts[:-1]):
                self._buf += part
                if not owner_is_open and i == len(parts) - 2:
                    self._pending_fds += fds
                    fds = []
                self._complete()
        except VarlinkProtocolError:
            close_fds(fds)
            raise
        self._buf += parts[-1]
        self._pending_fds += fds
        if len(self._pending_fds) > MAX_FDS_PER_MESSAGE:
            self._fail(VarlinkProtocolError(f"a message carries more than {MAX_FDS_PER_MESSAGE} fds"))
        if len(self._buf) > self._max:
            self._fail(VarlinkProtocolError(f"message exceeds {self._max} bytes without a terminator"))

    def _complete(self) -> None:
        raw, fds = bytes(self._buf), self._pending_fds
        self._buf.clear()
        self._pending_fds = []
        if len(fds) > MAX_FDS_PER_MESSAGE:
            self._fail(VarlinkProtocolError(f"a message carries {len(fds)} fds, more than {MAX_FDS_PER_MESSAGE}"), fds)
        if len(raw) > self._max:
            self._fail(VarlinkProtocolError(f"message of {len(raw)} bytes exceeds {self._max}"), fds)
        refused = _shape_error(raw, self._max_values)
        if refused is not None:
            self._fail(VarlinkProtocolError(f"message {refused}"), fds)
        try:
            obj = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            self._fail(VarlinkProtocolError(f"message is not JSON: {e}"), fds)
        if not isinstance(obj, dict):
            self._fail(VarlinkProtocolError("message is not a JSON object"), fds)
        self._done.append((obj, fds))

    def messages(self) -> list[tuple[dict[str, Any], list[int]]]:
        out, self._done = self._done, []
        return out

    def eof(self) -> None:
        """The peer closed: a partial message is an error; nothing may be left unclaimed."""
        if self._closed is None and (self._buf or self._pending_fds):
            self._fail(VarlinkProtocolError("connection closed in the middle of a message"))

    def close(self) -> None:
        """Close every fd not handed out."""
        for _, fds in self._done:
            close_fds(fds)
        self._done = []
        close_fds(self._pending_fds)
        self._pending_fds = []

    def _fail(self, error: VarlinkProtocolError, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        close_fds(fds)
        self.close()
        self._closed = error
        raise error
