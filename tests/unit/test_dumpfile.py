"""Dumpfile parser/writer: C escaping, the C tool's should-fail vectors, round trips."""

from __future__ import annotations

import random
import re

import pytest
from pycfs.host.dumpfile import DumpfileError, escape, parse, unescape, write
from pycfs.host.tree import (
    CharDevice,
    Directory,
    External,
    ExternalNoVerity,
    FileSystem,
    Inline,
    Leaf,
    Sparse,
    Stat,
    Symlink,
)
from vectors import C_VECTORS, c_manifest

VECTORS = C_VECTORS
MANIFEST = c_manifest()


# ---------------------------------------------------------------------------- escaping


def test_escape_rules():
    assert escape(b"a b") == b"a\\x20b"
    assert escape(b"\\\n\r\t") == b"\\\\\\n\\r\\t"
    assert escape(b"\x01\x7f\xff~!") == b"\\x01\\x7f\\xff~!"
    assert escape(b"k=v") == b"k=v"
    assert escape(b"k=v", equal=True) == b"k\\x3dv"
    assert escape(b"-", lone_dash=True) == b"\\x2d"
    assert escape(b"", lone_dash=True) == b"-"
    assert escape(b"-") == b"-"
    assert escape(b"--", lone_dash=True) == b"--"


def test_unescape_roundtrip_all_bytes():
    rng = random.Random(5)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        for eq in (False, True):
            e = escape(data, equal=eq)
            assert b" " not in e and b"\n" not in e
            assert unescape(e) == data
    assert unescape(b"\\X41".replace(b"X", b"x")) == b"A"
    assert unescape(b"\\xAb") == b"\xab"


@pytest.mark.parametrize(
    "field, message",
    [
        (b"a\\q", "Unsupported escape type q"),
        (b"a\\xzz", "Invalid hex characters after hex escape"),
        (b"a\\x4", "No hex characters after hex escape"),
        (b"a\\x", "No hex characters after hex escape"),
        (b"a\\x4g", "Invalid hex characters after hex escape"),
        (b"a\\", "No character after escape"),
    ],
)
def test_unescape_errors(field, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        unescape(field)


# ---------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "case", [c for c in MANIFEST["should_fail"] if c["name"] != "fail_too_big"], ids=lambda c: c["name"]
)
def test_should_fail_vectors(case):
    data = (VECTORS / case["dump"]).read_bytes()
    strict = case["env"].get("CFS_PARSE_STRICT") == "1"
    with pytest.raises(DumpfileError) as ei:
        parse(data, strict=strict)
    assert ei.value.reason == case["stderr"].removeprefix("mkcomposefs: ")
    assert str(ei.value).endswith(ei.value.reason)


def test_error_carries_line_number():
    data = b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 100644 1 0 0 0 5 - - -\n"
    with pytest.raises(DumpfileError) as ei:
        parse(data)
    assert ei.value.line == 3
    assert str(ei.value) == "dumpfile line 3 (/b): Invalid integer"  # the line, its PATH field, C's reason


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"/f 0 100644 1 0 0 0 5. - - -", "Invalid integer"),
        (b"/f 0 100644 1 0 0 0 1.0 - - 12ab", "Invalid digest 12ab"),
        (b"/f 0 100644 x 0 0 0 1.0 - - -", "Invalid integer x"),
        (b"/f 0 100644 1 4294967296 0 0 1.0 - - -", "Integer out of range 4294967296"),
        # a mode past 32 bits (hypothesis found it: it was an OverflowError, a traceback)
        (b"/f 0 100000040755 1 0 0 0 1.0 - - -", "Integer out of range 100000040755"),
        (b"/f 0 @100000040755 1 0 0 0 1.0 /x - -", "Integer out of range 100000040755"),
        (b"", "Invalid empty path"),
        (b"/d/ 0 40755 1 0 0 0 1.0 - - -", "Parent directory missing for /d/"),
    ],
)
def test_more_parse_errors(line, reason):
    with pytest.raises(DumpfileError) as ei:
        parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n" + line + b"\n")
    assert ei.value.reason == reason
    assert ei.value.line == 2


def test_hardlink_loop_is_an_error_not_a_hang():
    data = (b"/ 0 40755 2 0 0 0 0.0 - - -\n"
            b"/a 0 @100644 1 0 0 0 0.0 /b - -\n"
            b"/b 0 @100644 1 0 0 0 0.0 /a - -\n")
    with pytest.raises(DumpfileError, match="Hardlink loop"):
        parse(data)


def test_parse_kinds_and_quirks():
    digest = bytes(range(32))
    hexd = digest.hex()
    data = (
        "/ 0 40755 2 0 0 0 1.0 - - - user.r=1\n"
        f"/ext 5000 100644 1 0 0 0 1.0 {hexd[:2]}/{hexd[2:]} - {hexd}\n"
        f"/digest-only 5000 100644 1 0 0 0 1.0 - - {hexd.upper()}\n"
        "/noverity 10 100644 1 0 0 0 1.0 some/path - -\n"
        "/sparse 10 100644 1 0 0 0 1.0 - - -\n"
        f"/empty 0 100644 7 0 0 0 1.0 ab/cd - {hexd}\n"
        f"/inl 3 100644 1 0 0 0 1.0 - a\\x20b {hexd}\n"
        "/sym 999 120777 1 0 0 0 1.0 tgt - -\n"
        "/wh 0 20000 1 0 0 0 -5.0 - - -\n"
        "/hl 0 @100644 0 0 0 0 0.0 /ext - -\n"
        "/x 0 100644 1 0 0 0 0.42 - - - user.a=1 user.a=2 trusted.k\\x3d=v=w\n"
    ).encode()
    fs = parse(data)
    e = fs.root.entries
    assert fs.root.stat.xattrs == {b"user.r": b"1"}
    assert e[b"ext"].content == External(digest, 5000)
    assert e[b"digest-only"].content == External(digest, 5000, b"")
    assert e[b"noverity"].content == ExternalNoVerity(b"some/path", 10)
    assert e[b"sparse"].content == Sparse(10)
    assert e[b"empty"].content == Inline(b"") and e[b"empty"].nlink == 7
    assert e[b"inl"].content == Inline(b"a b")
    assert e[b"sym"].content == Symlink(b"tgt")
    assert e[b"wh"].is_whiteout() and e[b"wh"].stat.mtime_sec == -5
    assert e[b"hl"] is e[b"ext"]
    assert fs.primary_links[id(e[b"ext"])] == (fs.root, b"ext")
    assert e[b"x"].stat.mtime_sec == 0 and e[b"x"].stat.mtime_nsec == 42
    assert e[b"x"].stat.xattrs == {b"user.a": b"2", b"trusted.k=": b"v=w"}


def test_strict_mode_only_when_asked():
    data = b"/ 0 40755 2 0 0 0 0.0 - - -\n/l 5 120777 1 0 0 0 0.0 abc - -"
    fs = parse(data)
    assert fs.root.entries[b"l"].content == Symlink(b"abc")
    with pytest.raises(DumpfileError, match="Missing trailing newline"):
        parse(data, strict=True)


# ---------------------------------------------------------------------------- writer


def _zero_dir_sizes(text: bytes) -> bytes:
    """The C printer shows EROFS directory sizes; a tree from a dumpfile has none."""
    out = []
    for line in text.split(b"\n"):
        f = line.split(b" ")
        if len(f) > 2 and f[2].lstrip(b"@").startswith(b"4"):
            f[1] = b"0"
        out.append(b" ".join(f))
    return b"\n".join(out)


@pytest.mark.parametrize(
    "name", [c["name"] for c in MANIFEST["dumpfile_cases"] + MANIFEST["directory_cases"]]
)
def test_info_dump_parse_write_roundtrip(name):
    text = (VECTORS / f"{name}.info-dump").read_bytes()
    if name == "quirk_hardlink_to_dir":
        # C prints the second name of the directory as `@40755`, which C itself rejects
        with pytest.raises(DumpfileError, match="Directories can't be hardlinked"):
            parse(text)
        return
    fs = parse(text)
    assert write(fs) == _zero_dir_sizes(text)


def _sample_tree() -> FileSystem:
    root = Directory(Stat(0o755, 0, 0, 10, 5, {b"security.selinux": b"x\0"}))
    shared = Leaf(Stat(0o644, 1, 2, 3, 4, {b"user.k": b"v = \n"}), External(b"\xab" * 32, 70000))
    sub = Directory(Stat(0o700, 5, 6, 7, 8))
    root.entries.update({
        b"a file": shared,
        b"-": Leaf(Stat(0o600), Inline(b"-")),
        b"sub": sub,
        b"wh": Leaf(Stat(0), CharDevice(0)),
        b"link": Leaf(Stat(0o777), Symlink(b"../t a")),
    })
    sub.entries[b"hard"] = shared
    return FileSystem(root)


def test_write_parse_roundtrip_both_hardlink_forms():
    fs = _sample_tree()
    c_form = write(fs)
    assert b"/sub/hard 70000 @100644 2 1 2 0 3.4 /a\\x20file - " + b"ab" * 32 + b" user.k=v\\x20\\x3d\\x20\\n\n" in c_form
    rust_form = write(fs, hardlinks="rust")
    assert b"/sub/hard 0 @120000 - - - - 0.0 /a\\x20file - -\n" in rust_form
    assert b"/- 1 100600 1 0 0 0 0.0 - \\x2d -\n" in c_form
    for text in (c_form, rust_form):
        back = parse(text)
        assert back.root.entries[b"sub"].entries[b"hard"] is back.root.entries[b"a file"]
        assert write(back) == c_form


def test_filter_names():
    fs = _sample_tree()
    out = write(fs, filter_names=[b"sub"])
    assert [line.split(b" ")[0] for line in out.splitlines()] == [b"/", b"/sub", b"/sub/hard"]
    # the first name met decides: /sub/hard is now the real entry
    assert b"@" not in out
