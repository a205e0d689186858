"""protocol.text: the one check of untrusted strings that varlink parameters and ostree
symlink targets share."""

import json

import pytest

from pycfs.protocol.text import is_clean_text


@pytest.mark.parametrize("text, clean", [
    ("usr/lib/libc.so.6", True),
    ("caf\u00e9 \u2603", True),
    ("", True),
    ("a\0b", False),
    (json.loads('"\\ud800"'), False),  # a lone surrogate, as JSON can carry one
    (b"\xff".decode("utf-8", "surrogateescape"), False),  # an undecodable byte
])
def test_is_clean_text(text, clean):
    assert is_clean_text(text) is clean
