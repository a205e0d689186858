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


def test_a_list_in_an_error_line_is_cut():
    """An index of 200,000 tags made a 2.4 MB error line: at most 8 names, each cut, and the count."""
    from pycfs.protocol.text import listed

    assert listed([]) == "none"
    assert listed(["a", "b"]) == "a, b"
    many = [f"t{i}" for i in range(200_000)]
    assert listed(many) == "t0, t1, t2, t3, t4, t5, t6, t7, ... (200000 in all)"
    assert listed(["x" * 1000]) == "x" * 80 + "... (1000 characters)"


def test_a_layout_of_many_tags_names_a_few_in_its_error(tmp_path):
    from pycfs.host.errors import PycfsError
    from pycfs.host.oci.layout import REF_NAME_ANNOTATION, OciLayout

    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "0" * 64,
                  "size": 2, "annotations": {REF_NAME_ANNOTATION: f"tag{i}"}} for i in range(20_000)]
    (tmp_path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    with pytest.raises(PycfsError) as refused:
        OciLayout(tmp_path).resolve("nope")
    assert len(str(refused.value)) < 300 and str(refused.value).endswith(", ... (20000 in all))")


def test_clipped_cuts_a_peers_message_after_escaping_it():
    from pycfs.protocol.text import clipped

    assert clipped("a\nb") == "a\\x0ab"
    assert clipped("x" * 300, 10) == "x" * 10 + "... (300 characters)"
    assert clipped("\n" * 5, 10) == "\\x0a\\x0a\\x0"[:10] + "... (5 characters)"
