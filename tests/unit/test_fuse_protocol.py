"""The FUSE protocol codecs: every struct round-trips, and the layouts have linux/fuse.h's sizes."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pycfs.protocol import fuse

STRUCTS = [fuse.InHeader, fuse.OutHeader, fuse.InitIn, fuse.InitOut, fuse.Attr, fuse.EntryOut, fuse.AttrOut,
           fuse.ReadIn, fuse.GetxattrIn, fuse.GetxattrOut, fuse.Kstatfs, fuse.Dirent, fuse.NotifyStoreOut]
# sizeof() of each in linux/fuse.h (EntryOut and AttrOut without their trailing fuse_attr)
SIZES = {"InHeader": 40, "OutHeader": 16, "InitIn": 16, "InitOut": 64, "Attr": 88, "EntryOut": 40, "AttrOut": 16,
         "ReadIn": 40, "GetxattrIn": 8, "GetxattrOut": 8, "Kstatfs": 80, "Dirent": 24, "NotifyStoreOut": 24}


def test_layout_sizes():
    assert {cls.__name__: cls.FORMAT.size for cls in STRUCTS} == SIZES


def _values(cls: type) -> st.SearchStrategy:
    """Field values in each field's range, taken from the struct format."""
    codes = [c for c in cls.FORMAT.format.lstrip("<") if c.isalpha() and c != "x"]
    bits = {"Q": 64, "I": 32, "H": 16, "q": 64, "i": 32}
    ranges = [st.integers(-(1 << (bits[c] - 1)), (1 << (bits[c] - 1)) - 1) if c.islower()
              else st.integers(0, (1 << bits[c]) - 1) for c in codes]
    assert len(ranges) == len(dataclasses.fields(cls))
    return st.tuples(*ranges)


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
def test_round_trip(cls, data):
    value = cls(*data.draw(_values(cls)))
    packed = value.pack()
    assert len(packed) == cls.FORMAT.size
    assert cls.unpack_from(b"\xff" * 3 + packed, 3) == value


@given(st.binary(min_size=1, max_size=255))
def test_dirent_records_are_padded_to_8_bytes(name):
    fixed = fuse.Dirent(7, 1, len(name), 8).pack()
    record = fuse.dirent_record(fixed, name)
    assert len(record) % 8 == 0 and len(record) - len(fixed) - len(name) < 8
    assert record.startswith(fixed + name) and record[len(fixed) + len(name):].strip(b"\0") == b""
    assert fuse.Dirent.unpack_from(record) == fuse.Dirent(7, 1, len(name), 8)


def test_attr_times_before_1970_are_negative():
    """The kernel reads fuse_attr's times as time64_t: a file of 1969 has a negative mtime."""
    attr = fuse.Attr(5, 0, 0, -5, -1, -(1 << 63), 0, 999_999_999, 0, 0o100644, 1, 0, 0, 0, 4096)
    packed = attr.pack()
    assert packed[24:48] == (-5).to_bytes(8, "little", signed=True) + b"\xff" * 8 + b"\0" * 7 + b"\x80"
    assert fuse.Attr.unpack_from(packed) == attr


def test_reply_header():
    assert fuse.OutHeader.unpack_from(fuse.reply_header(42, -2, 100)) == fuse.OutHeader(116, -2, 42)
