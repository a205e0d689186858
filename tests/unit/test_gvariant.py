"""GVariant codec: round trips over generated types and values, exact bytes of known
encodings, and refusal of everything that is not the normal form."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memtrace import peak_of
from pycfs.protocol.gvariant import (
    MAX_VARIANT_TYPE,
    GVariantError,
    Variant,
    decode,
    encode,
    offset_size,
    parse_type,
)

_INTS = {"y": (0, 255), "n": (-(1 << 15), (1 << 15) - 1), "q": (0, (1 << 16) - 1), "i": (-(1 << 31), (1 << 31) - 1),
         "u": (0, (1 << 32) - 1), "h": (-(1 << 31), (1 << 31) - 1), "x": (-(1 << 63), (1 << 63) - 1),
         "t": (0, (1 << 64) - 1)}
_TEXT = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12)


def _basic(code: str):
    if code in _INTS:
        lo, hi = _INTS[code]
        return st.integers(lo, hi)
    if code == "b":
        return st.booleans()
    if code == "d":
        return st.floats(allow_nan=False)
    return _TEXT  # s, o, g: the codec does not check object-path or signature syntax


def _typed(depth: int = 0):
    """(type string, value strategy) pairs."""
    basics = st.sampled_from(list(_INTS) + ["b", "d", "s"]).map(lambda c: (c, _basic(c)))
    if depth >= 3:
        return basics
    inner = st.deferred(lambda: _typed(depth + 1))
    arrays = inner.map(lambda tv: ("a" + tv[0], st.binary(max_size=40) if tv[0] == "y" else st.lists(tv[1], max_size=5)))
    tuples = st.lists(inner, min_size=0, max_size=4).map(
        lambda tvs: ("(" + "".join(t for t, _ in tvs) + ")", st.tuples(*[v for _, v in tvs])))
    dicts = st.tuples(basics, inner).map(
        lambda kv: ("a{" + kv[0][0] + kv[1][0] + "}", st.lists(st.tuples(kv[0][1], kv[1][1]), max_size=4)))
    variants = inner.map(lambda tv: ("v", tv[1].map(lambda v, t=tv[0]: Variant(t, v))))
    maybes = inner.map(lambda tv: ("m" + tv[0], st.none() | tv[1]))
    return st.one_of(basics, arrays, tuples, dicts, variants, maybes)


@st.composite
def typed_values(draw):
    type_text, values = draw(_typed())
    return type_text, draw(values)


@settings(max_examples=400, deadline=None)
@given(typed_values())
def test_round_trip(tv):
    type_text, value = tv
    data = encode(type_text, value)
    assert decode(type_text, data) == value
    assert encode(type_text, decode(type_text, data)) == data


@settings(max_examples=200, deadline=None)
@given(typed_values())
def test_views_decode_to_the_same_values(tv):
    """decode(views=True) gives each `ay` as a view of the data: the same values, encoding
    back to the same bytes."""
    type_text, value = tv
    data = encode(type_text, value)
    viewed = decode(type_text, data, views=True)
    assert viewed == value and encode(type_text, viewed) == data


def test_views_share_the_data_and_copy_nothing():
    """A delta part's blob is as large as the part: as a view it costs nothing more."""
    blob = bytes(range(256)) * 4096
    data = encode("(ayay)", (blob, b"ops"))
    for source in (data, bytearray(data), memoryview(data)):
        first, second = decode("(ayay)", source, views=True)
        assert isinstance(first, memoryview) and first.readonly and first.obj is (source.obj if isinstance(
            source, memoryview) else source)
        assert first == blob and second == b"ops"
    assert peak_of(lambda: decode("(ayay)", data, views=True)) < 4096
    assert isinstance(decode("(ayay)", data)[0], bytes)


@settings(max_examples=1500, deadline=None)
@given(typed_values(), st.lists(st.tuples(st.sampled_from("fid"), st.integers(0, 1 << 16), st.integers(0, 255)),
                                min_size=1, max_size=3))
def test_damaged_data_either_decodes_to_its_own_encoding_or_fails(tv, edits):
    """Flipped, inserted and deleted bytes never yield a value that encodes differently (or an
    exception other than GVariantError): the reader refuses everything but the normal form
    without re-encoding to compare."""
    type_text, value = tv
    data = bytearray(encode(type_text, value))
    for op, where, byte in edits:
        if op == "i":
            data.insert(where % (len(data) + 1), byte)
        elif data:
            if op == "f":
                data[where % len(data)] = byte
            else:
                del data[where % len(data)]
    try:
        decoded = decode(type_text, bytes(data))
    except GVariantError:
        return
    assert encode(type_text, decoded) == bytes(data)


def test_known_encodings():
    # the spec's worked example: the .filez header of a 7-byte file with xattr user.py=v1,
    # size and mode big-endian as ostree stores them
    value = (int.from_bytes((7).to_bytes(8, "big"), "little"), 0, 0,
             int.from_bytes((0o100644).to_bytes(4, "big"), "little"), 0, "", [(b"user.py\0", b"v1")])
    data = encode("(tuuuusa(ayay))", value)
    assert len(data) == 38
    assert data[24] == 0  # the empty string
    assert data[25:37] == b"user.py\0v1\x08\x0b"
    assert data[37] == 25  # the tuple's one framing offset: end of the string
    assert encode("s", "hi") == b"hi\0"
    assert encode("v", Variant("u", 1)) == b"\x01\0\0\0\0u"
    assert encode("as", ["a", "bc"]) == b"a\0bc\0\x02\x05"
    assert encode("()", ()) == b"\0"
    assert encode("(yu)", (1, 2)) == b"\x01\0\0\0\x02\0\0\0"
    assert encode("a{sv}", []) == b""
    assert encode("ms", None) == b"" and encode("ms", "x") == b"x\0\0"


@pytest.mark.parametrize("total,width", [(0, 0), (1, 1), (0xFF, 1), (0x100, 2), (0xFFFF, 2), (0x10000, 4),
                                         (0xFFFFFFFF, 4), (0x100000000, 8)])
def test_offset_size(total, width):
    assert offset_size(total) == width


def test_large_array_uses_wide_offsets():
    items = [b"x" * 100] * 700  # 70 kB of elements: 4-byte offsets
    data = encode("aay", items)
    assert len(data) == 70000 + 700 * 4
    assert decode("aay", data) == items


@pytest.mark.parametrize("type_text,data,why", [
    ("s", b"abc", "NUL"),
    ("s", b"a\0b\0", "contains NUL"),
    ("s", b"\xff\0", "UTF-8"),
    ("u", b"\0\0\0", "expected 4"),
    ("b", b"\x02", "boolean"),
    ("as", b"a\0\x09", "framing offset"),
    ("as", b"a\0\x02\x02", "NUL-terminated"),  # an extra offset makes an empty second element
    ("(yu)", b"\x01\xff\0\0\x02\0\0\0", "normal form"),  # non-zero padding
    ("(uy)", b"\x02\0\0\0\x01\0\0\x05", "normal form"),  # non-zero trailing padding of a fixed tuple
    ("()", b"\x01", "normal form"),
    ("as", b"\0\x02", "framing offset"),  # no element, yet not empty
    ("mms", b"\0", "empty maybe"),
    ("(sy)", b"a\0\x01\0\x02", "normal form"),  # a byte after the last (fixed) member
    ("(ss)", b"a\0b\0\x07", "out of bounds"),
    ("v", b"\x01\0\0\0", "bad type string"),
    ("v", b"\x01\0\0\0\0zz", "bad type string"),
    ("au", b"\0\0\0", "not a multiple"),
    ("(uuua(ayay))", b"", "expected|out of bounds|framing"),
])
def test_malformed_is_refused(type_text, data, why):
    with pytest.raises(GVariantError, match=why):
        decode(type_text, data)


@pytest.mark.parametrize("text", ["", "(", "a", "{sv}x", "a{vs}", "a{s}", "(uz)", "a" * 100 + "y"])
def test_bad_type_strings(text):
    with pytest.raises(GVariantError):
        parse_type(text)


@pytest.mark.parametrize("type_text,value", [("u", -1), ("y", 256), ("s", "a\0"), ("s", b"x"), ("(uu)", (1,)),
                                             ("ay", "text"), ("v", 3), ("as", "abc")])
def test_values_that_do_not_fit(type_text, value):
    with pytest.raises(GVariantError):
        encode(type_text, value)


def test_a_decode_makes_a_bounded_number_of_values(monkeypatch):
    """An element can take one byte (`a()`, `ab`) and is a Python object of tens of bytes:
    without a cap, ostree's 128 MiB of metadata would decode to gigabytes."""
    from pycfs.protocol import gvariant

    with pytest.raises(gvariant.GVariantError, match="more than"):
        gvariant.decode("a()", bytes(gvariant.MAX_VALUES + 1))
    monkeypatch.setattr(gvariant, "MAX_VALUES", 100)
    nested = gvariant.encode("a(yay)", [(1, b"x")] * 40)  # 40 elements of 2 members: 120 values
    with pytest.raises(gvariant.GVariantError, match="more than 100"):
        gvariant.decode("a(yay)", nested)
    assert gvariant.decode("a(yay)", gvariant.encode("a(yay)", [(1, b"x")] * 33)) == [(1, b"x")] * 33
    assert gvariant.decode("a()", bytes(100)) == [()] * 100


def test_a_variant_type_string_is_capped_and_never_shown_whole():
    """A variant's type string is data: one of 400 kB (`(yyy...)`) was parsed into 400k
    nodes and printed whole in the error. At most MAX_VARIANT_TYPE (255) bytes, as D-Bus
    signatures; anything in a message is cut."""
    data = b"\x01\0(" + b"y" * 400_000 + b")"
    errors: list[GVariantError] = []

    def refused() -> None:
        with pytest.raises(GVariantError) as e:
            decode("v", data)
        errors.append(e.value)

    assert peak_of(refused) < 64 << 10
    assert str(errors[0]) == f"variant has no type string of at most {MAX_VARIANT_TYPE} bytes"
    longest = "(" + "y" * (MAX_VARIANT_TYPE - 2) + ")"
    value = Variant(longest, tuple(range(MAX_VARIANT_TYPE - 2)))
    assert decode("v", encode("v", value)) == value
    too_long = Variant(longest[:-1] + "y)", (*value.value, 0))
    with pytest.raises(GVariantError, match=f"is longer than {MAX_VARIANT_TYPE} bytes"):
        encode("v", too_long)
    with pytest.raises(GVariantError, match="no type string of at most"):
        decode("v", bytes(MAX_VARIANT_TYPE - 1) + b"\0" + too_long.type.encode())
    with pytest.raises(GVariantError) as e:
        parse_type("(" + "y" * 100_000 + "z)")
    assert len(str(e.value)) < 100 and "..." in str(e.value)


def test_a_variant_type_string_counts_against_the_values_a_decode_makes(monkeypatch):
    """A variant's type costs a value per character (each can be a node of the parsed type),
    even where its value costs none: 100 variants of `mm...my` holding Nothing."""
    from pycfs.protocol import gvariant

    nothing = Variant("m" * 60 + "y", None)
    data = gvariant.encode("av", [nothing] * 100)
    assert gvariant.decode("av", data) == [nothing] * 100
    monkeypatch.setattr(gvariant, "MAX_VALUES", 1000)
    with pytest.raises(gvariant.GVariantError, match="more than 1000"):
        gvariant.decode("av", data)


# --------------------------------------------------------------------------- text format

@pytest.mark.parametrize(("type_text", "value", "text"), [
    ("s", "line one\nostree.ref-binding=[evil]", "'line one\\nostree.ref-binding=[evil]'"),
    ("s", "it's \"q\" \\", '"it\'s \\"q\\" \\\\"'),
    ("s", "tab\t bell\a esc\x1b del\x7f nel\x85 zwsp\u200b bom\ufeff nbsp\xa0 ls\u2028 é 😀 pua\ue000",
     "'tab\\t bell\\a esc\\u001b del\\u007f nel\\u0085 zwsp\\u200b bom\\ufeff nbsp\xa0 ls\u2028 é 😀 pua\ue000'"),
    ("s", "\U000e0001", "'\\U000e0001'"),
    ("as", ["a, b", "c"], "['a, b', 'c']"),
    ("as", [], "@as []"),
    ("aas", [[], ["x"]], "[@as [], ['x']]"),
    ("ay", b"text\0", "b'text'"),
    ("ay", b"it's\0", 'b"it\'s"'),
    ("ay", b'\x01\x07\x08\x0b\x0c\x1b\x7f\xc3\xa9\n\r\t"\\\0', 'b\'\\001\\007\\b\\v\\f\\033\\177\\303\\251\\n\\r\\t\\"\\\\\''),
    ("ay", b"text", "[byte 0x74, 0x65, 0x78, 0x74]"),
    ("ay", b"\0\0", "[byte 0x00, 0x00]"),
    ("ay", b"", "@ay []"),
    ("aay", [b"a\0", b"\x01"], "[b'a', [0x01]]"),  # (the first element gave the type)
    ("b", True, "true"), ("b", False, "false"),
    ("y", 7, "byte 0x07"), ("n", -3, "int16 -3"), ("q", 3, "uint16 3"), ("i", -5, "-5"), ("u", 3, "uint32 3"),
    ("h", 2, "handle 2"), ("x", -5, "int64 -5"), ("t", (1 << 64) - 1, "uint64 18446744073709551615"),
    ("d", 1.0, "1.0"), ("d", 0.1, "0.10000000000000001"), ("d", -0.0, "-0.0"), ("d", 1e300, "1.0000000000000001e+300"),
    ("d", float("inf"), "inf"), ("d", float("nan"), "nan"),
    ("o", "/a/b", "objectpath '/a/b'"), ("g", "a{sv}", "signature 'a{sv}'"),
    ("ao", ["/a", "/b"], "[objectpath '/a', '/b']"),
    ("v", Variant("v", Variant("x", 5)), "<<int64 5>>"),
    ("av", [Variant("i", 1), Variant("s", "a")], "[<1>, <'a'>]"),
    ("mi", 5, "@mi 5"), ("mi", None, "@mi nothing"), ("ms", "x", "@ms 'x'"),
    ("ami", [None, 1], "[@mi nothing, 1]"),
    ("(isax)", (1, "a", [2]), "(1, 'a', [int64 2])"), ("(s)", ("x",), "('x',)"), ("()", (), "()"),
    ("(mimx)", (None, 5), "(@mi nothing, @mx 5)"),
    ("a{sv}", [("a", Variant("i", 1)), ("b", Variant("s", "c"))], "{'a': <1>, 'b': <'c'>}"),
    ("a{xs}", [(1, "x"), (2, "y")], "{int64 1: 'x', 2: 'y'}"),
    ("a{sv}", [], "@a{sv} {}"),
    ("{is}", (1, "x"), "{1, 'x'}"),
])
def test_text_format_is_glibs(type_text, value, text):
    """As g_variant_print(value, TRUE): the cases `ostree show --print-metadata-key` was
    compared on (test_text_format_matches_ostree_show), and the rest of the types."""
    from pycfs.protocol.gvariant import to_text

    assert to_text(type_text, value) == text


@settings(max_examples=300, deadline=None)
@given(typed_values())
def test_text_is_one_line_and_json_is_json(tv):
    import json

    from pycfs.protocol.gvariant import to_json, to_text

    type_text, value = tv
    text = to_text(type_text, value)
    assert not any(c in text for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85"), text
    json.dumps(to_json(type_text, value), allow_nan=False)


def test_json_form_of_values():
    from pycfs.protocol.gvariant import to_json

    assert to_json("a{sv}", [("k", Variant("ay", b"\x01\xff")), ("m", Variant("mx", None))]) == [
        ["k", {"type": "ay", "value": "01ff"}], ["m", {"type": "mx", "value": None}]]
    assert to_json("(dddb)", (1.5, float("inf"), float("-inf"), True)) == [1.5, "inf", "-inf", True]
    assert to_json("t", (1 << 64) - 1) == (1 << 64) - 1


def _byteswapped(t, value):
    """value with every number byte-swapped, as `ostree show` prints metadata (its
    ot_dump_variant byte-swaps the whole variant on a little-endian machine)."""
    import struct

    formats = {"n": "h", "q": "H", "i": "i", "h": "i", "u": "I", "x": "q", "t": "Q", "d": "d"}
    if t.code in formats:
        return struct.unpack("<" + formats[t.code], struct.pack(">" + formats[t.code], value))[0]
    if t.code == "v":
        return Variant(value.type, _byteswapped(parse_type(value.type), value.value))
    if t.code == "m":
        return None if value is None else _byteswapped(t.children[0], value)
    if t.code == "a":
        return value if t.children[0].code == "y" else [_byteswapped(t.children[0], v) for v in value]
    if t.code in "({":
        return tuple(_byteswapped(c, v) for c, v in zip(t.children, value, strict=True))
    return value


def test_text_format_matches_ostree_show(tmp_path):
    """`ostree show --print-metadata-key` (GLib's printer) is the oracle for metadata values
    `ostree commit --add-metadata` stored; it byte-swaps numbers first, so the comparison
    does too."""
    import shutil
    import subprocess

    from pycfs.host.ostree.objects import Commit
    from pycfs.protocol.gvariant import to_text

    if shutil.which("ostree") is None:
        pytest.skip("the ostree CLI is not installed (tools/setup.sh)")
    literals = {
        "arr": "['a, b', 'c']", "bs": "b'text'", "bq": "b\"it's\"", "bx": "[byte 0x01, 0x02, 0x00]", "be": "@ay []",
        "bctl": "b'\\001\\007\\010\\013\\014\\033\\177\\303\\251\\n\\r\\t\"\\\\ \\f\\v\\a\\b'",
        "ay2": "[byte 0x00, 0x00]", "ay4": "[byte 0x41]", "aay": "[b'a', b'b']",
        "i": "5", "x": "int64 -5", "t": "uint64 18446744073709551615", "y": "byte 7", "n": "int16 -3",
        "q": "uint16 3", "u": "uint32 3", "h": "handle 2", "d": "1.0", "d2": "0.1", "d3": "1e300", "d4": "-0.0",
        "b": "true", "bf": "false", "o": "objectpath '/a/b'", "g": "signature 'a{sv}'", "ao": "[objectpath '/a', '/b']",
        "v": "<<int64 5>>", "v2": "<['a']>", "avs": "[<1>, <'a'>]", "m": "@mi 5", "mn": "@mi nothing",
        "ms": "just 'x'", "amaybe": "[@mi nothing, just 1]", "tup": "(1, 'a', [int64 2])", "t1": "('x',)",
        "t0": "()", "tupm": "(@mi nothing, @mx 5)", "dict": "{'a': <1>, 'b': <'c'>}", "dict3": "{int64 1: 'x'}",
        "de": "@a{sv} {}", "ea": "@as []", "nest": "[[int64 1], [2]]", "dent": "{1, 'x'}", "ab": "[true]",
        "s3": "\"it's \\\"q\\\" \\\\ \\u00e9 \\u200b \\u2028 \\ue000 \\U0001f600 \\t \\u0007 \\u001b \\u007f \\u0085 "
              "\\ufeff \\u00a0 \\r \\f \\v \\b \\a\"",
    }
    repo = tmp_path / "repo"
    (tmp_path / "tree").mkdir()
    subprocess.run(["ostree", "init", f"--repo={repo}", "--mode=archive"], check=True)
    checksum = subprocess.run(
        ["ostree", "commit", f"--repo={repo}", "--branch=m", "--no-bindings", "--add-metadata-string=desc=line one\n"
         "ostree.ref-binding=[evil]", *(f"--add-metadata={k}={v}" for k, v in literals.items()), tmp_path / "tree"],
        check=True, capture_output=True, text=True).stdout.strip()
    data = (repo / "objects" / checksum[:2] / f"{checksum[2:]}.commit").read_bytes()
    metadata = dict(Commit.parse(data, bytes.fromhex(checksum)).metadata)
    assert set(metadata) == {*literals, "desc"}
    for key, value in metadata.items():
        shown = subprocess.run(["ostree", "show", f"--repo={repo}", f"--print-metadata-key={key}", "m"], check=True,
                               capture_output=True, text=True).stdout
        assert to_text(value.type, _byteswapped(parse_type(value.type), value.value)) + "\n" == shown, key
