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
