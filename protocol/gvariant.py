"""GVariant normal-form serialisation (little-endian framing), as ostree stores its objects.

    value = decode("(uuua(ayay))", data)      # strict: only the normal form is accepted
    data = encode("(uuua(ayay))", value)

Python values by type code:

    b -> bool; y n q i u x t h -> int; d -> float; s o g -> str
    ay -> bytes (the one array kept as a byte string: ostree's checksums, names, values);
          with decode(..., views=True) a read-only memoryview of the data instead of a copy
    aT -> list; (T...) and {KV} -> tuple (an `a{..}` is a list of 2-tuples, so order and
    duplicates survive a round trip); v -> Variant(type, value); mT -> None or the value

The framing rules (spec ostree.md 1.3): each value is aligned to its type's alignment
(1, 2, 4 or 8); a variable-size member of a tuple records its end offset unless it is the
last, offsets stored after the members in reverse order; an array of variable-size
elements stores every element's end offset after them, in order; offsets take the
smallest width in 1, 2, 4, 8 bytes that can address the whole container. Anything that is
not what `encode` would write for the decoded value is refused (`GVariantError`), so a
decoded object re-encodes to the same bytes and its checksum stays meaningful. The reader
checks this as it goes (padding is zero, elements and members fill their container
exactly, offsets have the width the size gives), which costs half what re-encoding and
comparing did; the property tests hold it to `encode`.

This is a pure codec: byte-swapped fields (ostree keeps uids, modes and sizes big-endian
inside these little-endian frames) are the caller's concern.
"""

from __future__ import annotations

import math
import struct
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pycfs.protocol.text import shown

_BASIC = {
    # code: (struct format, size)
    "b": ("<?", 1), "y": ("<B", 1), "n": ("<h", 2), "q": ("<H", 2), "i": ("<i", 4), "u": ("<I", 4),
    "h": ("<i", 4), "x": ("<q", 8), "t": ("<Q", 8), "d": ("<d", 8),
}
_STRINGS = "sog"
MAX_DEPTH = 64
# Elements and members one decode makes at most: an element can take one byte (`a()`,
# `ab`) and becomes an object of 30 to 60 bytes, so 128 MiB of metadata (ostree's limit)
# could decode to gigabytes. A dirtree of 100k files is 300k; the cap keeps a value under
# some 256 MiB.
MAX_VALUES = 1 << 22
# A variant carries its own type string, which the data can make as long as itself: capped at
# 255 bytes, the longest signature the D-Bus specification allows ("Valid Signatures"; GLib
# bounds GVariant types by nesting only, G_VARIANT_MAX_RECURSION_DEPTH, and ostree writes
# types of a few bytes), and charged to MAX_VALUES by its length (a node per character).
MAX_VARIANT_TYPE = 255


class GVariantError(ValueError):
    """Malformed (or not normal-form) GVariant data, or a value that does not fit its type."""


@dataclass(frozen=True)
class Variant:
    """A `v` value: its type string and the decoded value."""

    type: str
    value: Any


@dataclass(frozen=True)
class _Type:
    code: str  # one of the basic codes, "s", "v", "a", "m", "(", "{"
    text: str  # the full type string of this node
    children: tuple[_Type, ...]
    align: int
    fixed: int | None  # size when every value has the same size, else None


def _make(code: str, text: str, children: tuple[_Type, ...]) -> _Type:
    if code in _BASIC:
        return _Type(code, text, (), _BASIC[code][1], _BASIC[code][1])
    if code in _STRINGS:
        return _Type(code, text, (), 1, None)
    if code == "v":
        return _Type(code, text, (), 8, None)
    if code in "am":
        return _Type(code, text, children, children[0].align, None)
    align = max((c.align for c in children), default=1)
    fixed: int | None = None
    if all(c.fixed is not None for c in children):
        size = 0
        for c in children:
            size = _align(size, c.align) + (c.fixed or 0)
        # the unit tuple is one zero byte; others are padded to their own alignment
        fixed = _align(size, align) if children else 1
    return _Type(code, text, children, align, fixed)


def _parse_one(text: str, pos: int, depth: int) -> tuple[_Type, int]:
    if depth > MAX_DEPTH:
        raise GVariantError(f"type {shown(text, 40)} nests too deeply")
    if pos >= len(text):
        raise GVariantError(f"type {shown(text, 40)} ends early")
    c = text[pos]
    if c in _BASIC or c in _STRINGS or c == "v":
        return _make(c, c, ()), pos + 1
    if c in "am":
        child, end = _parse_one(text, pos + 1, depth + 1)
        return _make(c, text[pos:end], (child,)), end
    if c in "({":
        close = ")" if c == "(" else "}"
        children = []
        p = pos + 1
        while True:
            if p >= len(text):
                raise GVariantError(f"type {shown(text, 40)}: unclosed {c!r}")
            if text[p] == close:
                break
            child, p = _parse_one(text, p, depth + 1)
            children.append(child)
        if c == "{" and (len(children) != 2 or (children[0].code not in _BASIC and children[0].code not in _STRINGS)):
            raise GVariantError(f"type {shown(text, 40)}: a dict entry is a basic key and one value")
        return _make(c, text[pos:p + 1], tuple(children)), p + 1
    raise GVariantError(f"type {shown(text, 40)}: unknown type code {c!r}")


@lru_cache(maxsize=256)
def parse_type(text: str) -> _Type:
    """The parsed form of one complete type string."""
    t, end = _parse_one(text, 0, 0)
    if end != len(text):
        raise GVariantError(f"type {shown(text, 40)} has trailing characters")
    return t


def _align(n: int, a: int) -> int:
    return (n + a - 1) & -a


def offset_size(total: int) -> int:
    """Width of the framing offsets in a container of `total` bytes (offsets included)."""
    if total == 0:
        return 0
    if total <= 0xFF:
        return 1
    if total <= 0xFFFF:
        return 2
    if total <= 0xFFFFFFFF:
        return 4
    return 8


def frame(body: bytes | bytearray, offsets: list[int]) -> bytes:
    """Append the framing offsets with the smallest width that can address the result
    (for callers that lay out a fixed shape of container themselves)."""
    if not offsets:
        return bytes(body)
    w = 1
    while len(body) + len(offsets) * w > (1 << (8 * w)) - 1:
        w *= 2
    return bytes(body) + b"".join(o.to_bytes(w, "little") for o in offsets)


# ------------------------------------------------------------------------------- encoding


def encode(type_text: str, value: Any) -> bytes:
    """The normal-form serialisation of value as type_text."""
    return _encode(parse_type(type_text), value)


def _encode(t: _Type, value: Any) -> bytes:
    code = t.code
    try:
        if code in _BASIC:
            return struct.pack(_BASIC[code][0], value)
    except struct.error as e:
        raise GVariantError(f"{value!r} does not fit GVariant type {code!r}: {e}") from None
    if code in _STRINGS:
        if not isinstance(value, str) or "\0" in value:
            raise GVariantError(f"type {code!r} needs a str without NUL, not {type(value).__name__}")
        return value.encode() + b"\0"
    if code == "v":
        if not isinstance(value, Variant):
            raise GVariantError(f"type 'v' needs a Variant, not {type(value).__name__}")
        if len(value.type) > MAX_VARIANT_TYPE:
            raise GVariantError(f"variant type {shown(value.type, 40)} is longer than {MAX_VARIANT_TYPE} bytes")
        inner = parse_type(value.type)
        return _encode(inner, value.value) + b"\0" + value.type.encode()
    if code == "m":
        if value is None:
            return b""
        data = _encode(t.children[0], value)
        return data if t.children[0].fixed is not None else data + b"\0"
    if code == "a":
        return _encode_array(t.children[0], value)
    return _encode_tuple(t, value)


def _encode_array(elem: _Type, value: Any) -> bytes:
    if elem.code == "y":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise GVariantError(f"type 'ay' needs bytes, not {type(value).__name__}")
        return bytes(value)
    if not isinstance(value, (list, tuple)):
        raise GVariantError(f"type {shown('a' + elem.text, 40)} needs a list, not {type(value).__name__}")
    if elem.fixed is not None:
        return b"".join(_encode(elem, v) for v in value)
    body = bytearray()
    ends = []
    for v in value:
        body += bytes(_align(len(body), elem.align) - len(body))
        body += _encode(elem, v)
        ends.append(len(body))
    return frame(body, ends)


def _encode_tuple(t: _Type, value: Any) -> bytes:
    if not isinstance(value, tuple) or len(value) != len(t.children):
        raise GVariantError(f"type {shown(t.text, 40)} needs a tuple of {len(t.children)}, not {value!r:.80}")
    if not t.children:
        return b"\0"
    body = bytearray()
    ends = []
    last = len(t.children) - 1
    for i, (child, v) in enumerate(zip(t.children, value)):
        body += bytes(_align(len(body), child.align) - len(body))
        body += _encode(child, v)
        if child.fixed is None and i != last:
            ends.append(len(body))
    if t.fixed is not None:
        body += bytes(t.fixed - len(body))
        return bytes(body)
    return frame(body, ends[::-1])


# ------------------------------------------------------------------------------- decoding


def decode(type_text: str, data: bytes | bytearray | memoryview, views: bool = False) -> Any:
    """Decode a whole serialised value; GVariantError unless data is exactly the normal form.
    views: each `ay` a read-only view of data, not a copy (for a blob as large as the data,
    which the caller holds anyway), valid while data is unchanged."""
    t = parse_type(type_text)
    if views:
        mv = memoryview(data).toreadonly()
    else:
        mv = memoryview(bytes(data) if not isinstance(data, bytes) else data)
    return _decode(t, mv, 0, _State(MAX_VALUES, views))


class _State:
    """What one decode carries down: the values it may still make, and `views`."""

    __slots__ = ("left", "views")

    def __init__(self, left: int, views: bool) -> None:
        self.left = left
        self.views = views


def _spend(state: _State, n: int) -> None:
    """Take n values from what is left of the decode's MAX_VALUES."""
    state.left -= n
    if state.left < 0:
        raise GVariantError(f"value holds more than {MAX_VALUES} elements")


def _read_offset(mv: memoryview, pos: int, w: int) -> int:
    return int.from_bytes(mv[pos:pos + w], "little")


def _padding(mv: memoryview, start: int, end: int, type_text: str, array: bool = False) -> None:
    """Alignment padding is zero bytes in the normal form."""
    if end > start and any(mv[start:end]):
        raise GVariantError(f"{'array of ' if array else ''}{shown(type_text, 40)}: non-zero padding: not in normal form")


def _decode(t: _Type, mv: memoryview, depth: int, state: _State) -> Any:
    if depth > MAX_DEPTH:
        raise GVariantError("value nests too deeply")
    code = t.code
    n = len(mv)
    if t.fixed is not None and n != t.fixed:
        raise GVariantError(f"{shown(t.text, 40)} value of {n} bytes, expected {t.fixed}")
    if code in _BASIC:
        v = struct.unpack(_BASIC[code][0], mv)[0]
        if code == "b" and mv[0] > 1:
            raise GVariantError(f"boolean byte {mv[0]}")
        return v
    if code in _STRINGS:
        if n == 0 or mv[n - 1] != 0:
            raise GVariantError("string is not NUL-terminated")
        raw = bytes(mv[:n - 1])
        if b"\0" in raw:
            raise GVariantError("string contains NUL")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise GVariantError(f"string {raw[:40]!r} is not UTF-8") from None
    if code == "v":
        # (the type string holds no NUL: the last one ends the value)
        tail = bytes(mv[max(0, n - MAX_VARIANT_TYPE - 1):])
        sep = tail.rfind(b"\0")
        if sep < 0:
            raise GVariantError(f"variant has no type string of at most {MAX_VARIANT_TYPE} bytes")
        raw_type = tail[sep + 1:]
        _spend(state, len(raw_type))
        try:
            type_text = raw_type.decode("ascii")
            inner = parse_type(type_text)
        except (UnicodeDecodeError, GVariantError):
            raise GVariantError(f"variant has a bad type string {raw_type[:40]!r}") from None
        return Variant(type_text, _decode(inner, mv[:n - len(tail) + sep], depth + 1, state))
    if code == "m":
        if n == 0:
            return None
        elem = t.children[0]
        if elem.fixed is None:
            if mv[n - 1] != 0:
                raise GVariantError("maybe value lacks its trailing zero byte")
            value = _decode(elem, mv[:n - 1], depth + 1, state)
            if value is None:  # Just(Nothing) would come back as Nothing
                raise GVariantError("a maybe holding an empty maybe has no value here")
            return value
        return _decode(elem, mv, depth + 1, state)
    if code == "a":
        return _decode_array(t.children[0], mv, depth, state)
    return _decode_tuple(t, mv, depth, state)


def _decode_array(elem: _Type, mv: memoryview, depth: int, state: _State) -> Any:
    n = len(mv)
    if elem.code == "y":
        return mv if state.views else bytes(mv)
    if n == 0:
        return []
    if elem.fixed is not None:
        if n % elem.fixed:
            raise GVariantError(f"array of {shown(elem.text, 40)} has {n} bytes, not a multiple of {elem.fixed}")
        _spend(state, n // elem.fixed)
        return [_decode(elem, mv[i:i + elem.fixed], depth + 1, state) for i in range(0, n, elem.fixed)]
    w = offset_size(n)
    last_end = _read_offset(mv, n - w, w)
    if last_end >= n or (n - last_end) % w:
        raise GVariantError(f"array of {shown(elem.text, 40)}: bad framing offset {last_end}")
    count = (n - last_end) // w
    _spend(state, count)
    out = []
    start = 0
    for i in range(count):
        end = _read_offset(mv, last_end + i * w, w)
        aligned = _align(start, elem.align)
        if not aligned <= end <= last_end:
            raise GVariantError(f"array of {shown(elem.text, 40)}: element {i} at {aligned}..{end} is out of bounds")
        _padding(mv, start, aligned, elem.text, array=True)
        out.append(_decode(elem, mv[aligned:end], depth + 1, state))
        start = end
    return out  # the last element ends where the offsets start: last_end is its offset


def _decode_tuple(t: _Type, mv: memoryview, depth: int, state: _State) -> tuple:
    n = len(mv)
    if not t.children:
        if mv[0]:
            raise GVariantError("the unit tuple is one zero byte: not in normal form")
        return ()
    _spend(state, len(t.children))
    w = offset_size(n)
    frame_end = n  # offsets are read from the end, one per variable-size non-last member
    out = []
    pos = 0
    last = len(t.children) - 1
    for i, child in enumerate(t.children):
        aligned = _align(pos, child.align)
        if aligned > frame_end:
            raise GVariantError(f"{shown(t.text, 40)}: member {i} at {aligned} is out of bounds")
        _padding(mv, pos, aligned, t.text)
        pos = aligned
        if child.fixed is not None:
            end = pos + child.fixed
        elif i == last:
            end = frame_end
        else:
            frame_end -= w
            if frame_end < 0 or not w:  # (an empty value has no room for an offset)
                raise GVariantError(f"{shown(t.text, 40)}: framing offsets run past the start")
            end = _read_offset(mv, frame_end, w)
        if not pos <= end <= frame_end:
            raise GVariantError(f"{shown(t.text, 40)}: member {i} at {pos}..{end} is out of bounds")
        out.append(_decode(child, mv[pos:end], depth + 1, state))
        pos = end
    if t.fixed is not None:
        _padding(mv, pos, n, t.text)  # a fixed-size tuple is padded to its alignment
    elif pos != frame_end:
        raise GVariantError(f"{shown(t.text, 40)}: {frame_end - pos} bytes after the last member: not in normal form")
    return tuple(out)


# ---------------------------------------------------------------------------- text format

# Type annotations of the text format (GLib's "GVariant Text Format"): the types a bare
# literal would not parse back as (an unannotated number is an int32, `[]` has no type).
_ANNOTATIONS = {"y": "byte", "n": "int16", "q": "uint16", "u": "uint32", "x": "int64", "t": "uint64",
                "h": "handle", "o": "objectpath", "g": "signature"}
_NAMED_ESCAPES = {"\a": "a", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t", "\v": "v"}
# What g_strescape writes for the bytes of a bytestring (b'...'): these by name, the other
# bytes below 0x20 and from 0x7f on as three octal digits.
_BYTE_ESCAPES = {0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v", 0x5C: "\\\\",
                 0x22: '\\"'}


def to_text(type_text: str, value: Any) -> str:
    """value (as `decode` gives it) in the GVariant text format, as g_variant_print(value,
    TRUE) writes it (what `ostree show --print-metadata-key` prints, byte-swapping aside):
    one line, strings quoted and escaped, arrays `['a', 'b']`, a byte array ending in its
    only NUL as `b'text'`, types annotated where a literal is ambiguous (`int64 5`, `@as []`)."""
    out: list[str] = []
    _print(parse_type(type_text), value, True, out)
    return "".join(out)


def to_json(type_text: str, value: Any) -> Any:
    """value (as `decode` gives it) as JSON, to be read with its type: byte arrays as hex,
    tuples and dict entries as lists, a variant as {"type", "value"}, a maybe as null or its
    value, a double that is not finite as the string "nan", "inf" or "-inf"."""
    return _json(parse_type(type_text), value)


def _json(t: _Type, value: Any) -> Any:
    code = t.code
    if code == "v":
        return {"type": value.type, "value": _json(parse_type(value.type), value.value)}
    if code == "m":
        return None if value is None else _json(t.children[0], value)
    if code == "a":
        elem = t.children[0]
        return bytes(value).hex() if elem.code == "y" else [_json(elem, item) for item in value]
    if code in "({":
        return [_json(member, item) for member, item in zip(t.children, value, strict=True)]
    if code == "d" and not math.isfinite(value):
        return str(value)
    return value


def _print(t: _Type, value: Any, annotate: bool, out: list[str]) -> None:
    code = t.code
    if code == "b":
        out.append("true" if value else "false")
    elif code in _BASIC and code != "d":
        if annotate and code in _ANNOTATIONS:
            out.append(_ANNOTATIONS[code] + " ")
        out.append(f"0x{value:02x}" if code == "y" else str(value))
    elif code == "d":
        text = f"{value:.17g}"
        out.append(text if any(c in text for c in ".enN") else text + ".0")
    elif code in _STRINGS:
        if annotate and code in _ANNOTATIONS:
            out.append(_ANNOTATIONS[code] + " ")
        out.append(_quoted(value))
    elif code == "v":
        out.append("<")
        _print(parse_type(value.type), value.value, True, out)  # a variant's content is always annotated
        out.append(">")
    elif code == "m":
        if annotate:
            out.append(f"@{t.text} ")
        if value is None:
            out.append("nothing")
        else:  # (decode refuses a Just Nothing, the one value that would need `just`)
            _print(t.children[0], value, False, out)
    elif code == "a":
        _print_array(t, value, annotate, out)
    else:  # a tuple (its members each annotated) or a dict entry
        out.append("(" if code == "(" else "{")
        for i, (member, item) in enumerate(zip(t.children, value, strict=True)):
            if i:
                out.append(", ")
            _print(member, item, annotate, out)
        out.append(("," if len(t.children) == 1 else "") + ")" if code == "(" else "}")


def _print_array(t: _Type, value: Any, annotate: bool, out: list[str]) -> None:
    elem = t.children[0]
    if elem.code == "y":
        data = bytes(value)
        if data and data.find(0) == len(data) - 1:  # a bytestring: one NUL, at the end
            text = "".join(_BYTE_ESCAPES.get(b) or (f"\\{b:03o}" if b < 0x20 or b >= 0x7F else chr(b))
                           for b in data[:-1])
            quote = '"' if b"'" in data else "'"
            out.append(f"b{quote}{text}{quote}")
            return
        value = list(data)
    if not value:
        out.append(f"@{t.text} " if annotate else "")
        out.append("{}" if elem.code == "{" else "[]")
        return
    out.append("{" if elem.code == "{" else "[")
    for i, item in enumerate(value):  # only the first element is annotated
        if i:
            out.append(", ")
        if elem.code == "{":
            _print(elem.children[0], item[0], annotate, out)
            out.append(": ")
            _print(elem.children[1], item[1], annotate, out)
        else:
            _print(elem, item, annotate, out)
        annotate = False
    out.append("}" if elem.code == "{" else "]")


def _quoted(text: str) -> str:
    """A string literal: in single quotes unless it holds one; the quote and backslash
    escaped, and what is not printable (controls, format characters, unassigned code
    points) as \\n, \\t... or \\uXXXX, \\UXXXXXXXX: never more than one line."""
    quote = '"' if "'" in text else "'"
    out = [quote]
    for c in text:
        if c == quote or c == "\\":
            out.append("\\" + c)
        elif c.isprintable() or unicodedata.category(c) not in _UNPRINTABLE:
            out.append(c)
        elif c in _NAMED_ESCAPES:
            out.append("\\" + _NAMED_ESCAPES[c])
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    out.append(quote)
    return "".join(out)


# Unicode categories GLib's g_unichar_isprint calls unprintable (spaces and line separators
# print; controls, format characters, surrogates and unassigned code points do not)
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Cn"})
