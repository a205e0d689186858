"""Dumpfile parser/writer: C escaping, the C tool's should-fail vectors, round trips."""

from __future__ import annotations

import io
import random
import re

import pytest
from pycfs.host.dumpfile import DumpfileError, escape, parse, parse_file, unescape, write
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


# ---------------------------------------------------------------------------- hostile input

_ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"
_DIR = b" 0 40755 2 0 0 0 0.0 - - -\n"


@pytest.mark.parametrize("lines, line, path", [
    (b"/x 0 @100644 1 0 0 0 0.0 / - -\n", 2, "/x"),  # the root: a loop
    (b"/d" + _DIR + b"/d/h 0 @100644 2 0 0 0 0.0 /d - -\n", 3, "/d/h"),  # its own parent: a loop
    # through a chain: /d/e/h -> /d/h2 -> /d, a directory above it
    (b"/d" + _DIR + b"/d/e" + _DIR + b"/d/e/h 0 @100644 2 0 0 0 0.0 /d/h2 - -\n/d/h2 0 @100644 2 0 0 0 0.0 /d - -\n",
     4, "/d/e/h"),
    # a directory of another parent: no loop, but its `..` would be wrong (fsck.erofs)
    (b"/a" + _DIR + b"/b" + _DIR + b"/b/c" + _DIR + b"/a/h 0 @100644 2 0 0 0 0.0 /b/c - -\n", 5, "/a/h"),
])
def test_a_hardlink_to_a_directory_elsewhere_is_refused(lines, line, path):
    """C mkcomposefs writes these, images fsck.erofs refuses (and segfaults on for the root)."""
    with pytest.raises(DumpfileError, match="a directory can only have a second name in its own parent") as ei:
        parse(_ROOT + lines)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"dumpfile line {line} ({path}): Hardlink to directory /")


def test_a_second_name_beside_a_directory_is_kept():
    """C's quirk vector: a `@100644` line naming a directory in the same parent."""
    fs = parse((VECTORS / "quirk_hardlink_to_dir.dump").read_bytes())
    assert fs.root.entries[b"h"] is fs.root.entries[b"d"]
    fs = parse(_ROOT + b"/s" + _DIR + b"/s/d" + _DIR + b"/s/h 0 @100644 2 0 0 0 0.0 /s/d - -\n"
               b"/s/g 0 @100644 2 0 0 0 0.0 /s/h - -\n")
    s = fs.root.entries[b"s"]
    assert s.entries[b"g"] is s.entries[b"h"] is s.entries[b"d"]


def test_a_long_hardlink_chain_resolves_each_link_once(monkeypatch):
    """50,000 `@` lines each naming the next: each link is looked up once (it was once per
    link of the rest of the chain: 20,000 links did not finish in 120 s)."""
    n = 50_000
    lines = [_ROOT, b"/f 0 100644 1 0 0 0 0.0 - - -\n"]
    lines += [b"/l%d 0 @100644 1 0 0 0 0.0 /l%d - -\n" % (i, i + 1) for i in range(n - 1)]
    lines.append(b"/l%d 0 @100644 1 0 0 0 0.0 /f - -\n" % (n - 1))
    lookups = 0
    real = Directory.lookup

    def counting(self, path):
        nonlocal lookups
        lookups += 1
        return real(self, path)

    monkeypatch.setattr(Directory, "lookup", counting)
    fs = parse(b"".join(lines))
    f = fs.root.entries[b"f"]
    assert all(fs.root.entries[b"l%d" % i] is f for i in range(n))
    assert lookups == n


def test_hardlink_chain_errors_name_the_failing_link():
    with pytest.raises(DumpfileError) as ei:
        parse(_ROOT + b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /c - -\n"
              b"/c 0 @100644 1 0 0 0 0.0 /b - -\n")
    assert (ei.value.line, ei.value.reason) == (4, "Hardlink loop at /c: Too many levels of symbolic links")
    with pytest.raises(DumpfileError) as ei:
        parse(_ROOT + b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /nope - -\n")
    assert (ei.value.line, ei.value.reason) == (3, "No target at /nope for hardlink")


def test_an_overlong_line_is_refused_before_it_is_read_whole():
    """A line is read with a bound (1 MiB), and content longer than any escaping of 5000 bytes
    is refused before it is unescaped: a 200 MB line of `\\x41` took 66 s and 7 GB."""

    class Source(io.RawIOBase):
        """A dumpfile whose second line is 8 MiB of content; counts what is read of it."""

        def __init__(self) -> None:
            self.data = _ROOT + b"/f 5 100644 1 0 0 0 0.0 - " + b"\\x41" * (2 << 20) + b" -\n"
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            n = min(len(b), len(self.data) - self.served)
            b[:n] = self.data[self.served:self.served + n]
            self.served += n
            return n

    src = Source()
    with pytest.raises(DumpfileError) as ei:
        parse_file(io.BufferedReader(src))
    assert ei.value.line == 2
    assert str(ei.value) == "dumpfile line 2 (/f): line is longer than 1048576 bytes, more than any entry needs"
    assert src.served < 2 << 20
    # content: the size C reports, without unescaping it
    with pytest.raises(DumpfileError) as ei:
        parse(_ROOT + b"/f 5 100644 1 0 0 0 0.0 - " + b"\\x41" * 200_000 + b" -\n")
    assert ei.value.reason == "Inline content size 200000 exceeds maximum 5000"
    # the longest valid line still parses: 5000 bytes of content, all escaped, and 64 KB of xattrs
    fs = parse(_ROOT + b"/f 5000 100644 1 0 0 0 0.0 - " + b"\\x41" * 5000 + b" - user.a=" + b"b" * 32000 + b"\n")
    assert fs.root.entries[b"f"].content == Inline(b"A" * 5000)
