"""ostree objects against what the real `ostree` CLI writes: every commit, dirtree, dirmeta
and file header decodes and re-encodes to the same bytes, and every checksum we compute is
the object's name. The commit splitstream round-trips and refuses damage."""

import hashlib
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ostree_trees import commit, have_ostree, init_repo, make_tree, ostree
from pycfs.host.ostree.commitstream import (
    HEADER,
    CommitObjects,
    Entry,
    OstreeError,
    decode_ref,
    encode_ref,
    load_stream,
    stream_name,
    write_commit_stream,
)
from pycfs.host.ostree.objects import (
    SUMMARY_TYPE,
    Commit,
    DirMeta,
    DirTree,
    FileHeader,
    Kind,
    parse_summary,
    split_archive_header,
    verify_metadata,
)
from pycfs.host.ostree.source import LocalRepo, check_file, config_value, unpack_filez
from pycfs.host.repository import Repository
from pycfs.host.splitstream import CONTENT_OSTREE_COMMIT
from pycfs.protocol.gvariant import decode, encode, frame

pytestmark = pytest.mark.skipif(not have_ostree(), reason="the ostree CLI is not installed (tools/setup.sh)")

PARSERS = {"commit": Commit, "dirtree": DirTree, "dirmeta": DirMeta}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    base = tmp_path_factory.mktemp("ostree")
    repo = init_repo(base / "repo", "archive")
    checksum = commit(repo, make_tree(base / "tree"), "main", "--body=a body", "--add-metadata-string=k=v")
    return repo, checksum


def _objects(repo):
    for dirpath, _dirs, files in os.walk(repo / "objects"):
        for name in files:
            yield os.path.join(dirpath, name), os.path.basename(dirpath) + name.split(".")[0], name.split(".")[1]


def test_metadata_objects_round_trip_byte_for_byte(archive):
    repo, _ = archive
    seen = set()
    for path, hexname, ext in _objects(repo):
        if ext not in PARSERS:
            continue
        data = Path(path).read_bytes()
        checksum = bytes.fromhex(hexname)
        verify_metadata(data, checksum, Kind[ext.upper()])
        parsed = PARSERS[ext].parse(data, checksum)
        assert parsed.serialize() == data
        seen.add(ext)
    assert seen == {"commit", "dirtree", "dirmeta"}


def test_commit_fields(archive):
    repo, checksum = archive
    data = (repo / "objects" / checksum[:2] / f"{checksum[2:]}.commit").read_bytes()
    c = Commit.parse(data, bytes.fromhex(checksum))
    assert (c.subject, c.body, c.timestamp, c.parent) == ("commit main", "a body", 1704164645, None)
    meta = dict(c.metadata)
    assert meta["k"].value == "v"
    assert meta["ostree.ref-binding"].value == ["main"]
    assert ostree("rev-parse", f"--repo={repo}", "main") == checksum
    assert ostree("ls", f"--repo={repo}", "-C", "-d", "main", "/").split()[-3] == c.root_tree.hex()


def test_summary_lists_the_refs(archive, tmp_path):
    repo, checksum = archive
    ostree("summary", f"--repo={repo}", "-u")
    data = (repo / "summary").read_bytes()
    refs, metadata = parse_summary(data, "summary")
    assert refs == [("main", bytes.fromhex(checksum))]
    assert "ostree.summary.last-modified" in dict(metadata)
    assert encode(SUMMARY_TYPE, decode(SUMMARY_TYPE, data)) == data
    with pytest.raises(OstreeError, match="summary: not a valid ostree summary"):
        parse_summary(data[:-3], "summary")


def test_a_summary_with_a_huge_variant_type_is_one_short_line():
    """A 4 MB summary whose metadata holds one variant typed `(yyy...)`: it cost 600 MB and
    printed the type whole; now it is refused at the type's length."""
    from memtrace import peak_of

    body = b"k\0" + bytes(6) + b"\0\0(" + b"y" * 4_000_000 + b")"
    entry = frame(body, [2])
    data = frame(frame(entry, [len(entry)]), [0])
    errors = []

    def refused() -> None:
        with pytest.raises(OstreeError) as e:
            parse_summary(data, "http://h/repo/summary")
        errors.append(str(e.value))

    assert peak_of(refused) < 1 << 20
    assert errors == ["http://h/repo/summary: not a valid ostree summary (variant has no type string of at most 255 "
                      "bytes)"]


def test_file_objects_headers_and_checksums(archive):
    repo, _ = archive
    kinds = set()
    for path, hexname, ext in _objects(repo):
        if ext != "filez":
            continue
        data = Path(path).read_bytes()
        checksum = bytes.fromhex(hexname)
        header, end = split_archive_header(data, checksum)
        assert header.archive_header() == data[:end]
        content = zlib.decompressobj(-15).decompress(data[end:])
        assert len(content) == header.size
        assert hashlib.sha256(header.checksum_prefix() + content).hexdigest() == hexname
        check_file(header, checksum, content)
        kinds.add("symlink" if header.is_symlink else "xattr" if header.xattrs else "file")
        if header.xattrs:
            assert all(name.endswith(b"\0") for name, _ in header.xattrs)
    assert kinds == {"symlink", "xattr", "file"}


def test_unpack_filez_refuses_damage(archive, tmp_path):
    repo, _ = archive
    path = max((p for p, _, ext in _objects(repo) if ext == "filez"), key=os.path.getsize)
    checksum = bytes.fromhex(os.path.basename(os.path.dirname(path)) + os.path.basename(path).split(".")[0])
    data = Path(path).read_bytes()

    def unpack(raw: bytes):
        pos = 0

        def read(n):
            nonlocal pos
            pos += min(n, 1000)
            return raw[pos - min(n, 1000):pos]
        return unpack_filez(read, checksum, 64, str(tmp_path))

    fetched = unpack(data)
    assert fetched.fd is not None and os.fstat(fetched.fd).st_size == fetched.header.size
    os.close(fetched.fd)
    flipped = bytearray(data)
    flipped[-100] ^= 1
    for bad, why in [(data[:len(data) // 2], "truncated"), (data[:5], "truncated"), (bytes(flipped), "checksum|corrupt"),
                     (data + b"junk", "after the end"), (b"\0\0\0\x05\0\0\0\0abcde", "not a valid file")]:
        with pytest.raises(OstreeError, match=why) as info:
            unpack(bad)
        assert checksum.hex() in str(info.value)
    assert os.listdir(tmp_path) == []  # temporary files are anonymous


def test_local_repo_resolves_refs_and_names_missing_objects(archive):
    repo, checksum = archive
    src = LocalRepo(str(repo))
    try:
        assert src.resolve("main") == (bytes.fromhex(checksum), "main")
        assert src.resolve(checksum) == (bytes.fromhex(checksum), None)
        with pytest.raises(OstreeError, match="no ref 'nope'"):
            src.resolve("nope")
        with pytest.raises(OstreeError, match="invalid ostree ref"):
            src.resolve("../config")
        with pytest.raises(OstreeError, match=f"object {'ab' * 32}.dirtree is missing"):
            src.read_metadata(bytes.fromhex("ab" * 32), Kind.DIRTREE)
    finally:
        src.close()


def test_an_alias_ref_is_refused_naming_its_target(archive, tmp_path):
    """`ostree refs --alias` makes a symlink in refs/heads, which is not followed (nothing
    below a repository's root is): the error names the ref it stands for."""
    repo, checksum = archive
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    ostree("refs", f"--repo={copy}", "--alias", "--create=os/stable", "main")
    assert ostree("rev-parse", f"--repo={copy}", "os/stable") == checksum
    (copy / "refs/heads/outside").symlink_to("../../config")
    src = LocalRepo(str(copy))
    try:
        with pytest.raises(OstreeError, match=r"refs/heads/os/stable is a symlink or lies under one \(nothing below a "
                                              r"repository's root is followed\); it is an alias of main: pull that$"):
            src.resolve("os/stable")
        with pytest.raises(OstreeError, match=r"refs/heads/outside is a symlink or lies under one \(nothing below a "
                                              r"repository's root is followed\)$"):
            src.resolve("outside")
        assert src.resolve("main") == (bytes.fromhex(checksum), "main")
    finally:
        src.close()


def test_local_repo_opens_only_regular_files(archive, tmp_path):
    repo, checksum = archive
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    (copy / "refs/heads/link").symlink_to("/etc/passwd")
    (copy / "refs/heads/dir").mkdir()
    commit_path = copy / "objects" / checksum[:2] / f"{checksum[2:]}.commit"
    commit_path.unlink()
    commit_path.symlink_to(repo / "objects" / checksum[:2] / f"{checksum[2:]}.commit")
    src = LocalRepo(str(copy))
    try:
        with pytest.raises(OstreeError, match=r"^ref .*/copy/refs/heads/link is a symlink or lies under one \(nothing "
                                              r"below a repository's root is followed\)$"):
            src.resolve("link")
        with pytest.raises(OstreeError, match="refs/heads/dir is not a regular file"):
            src.resolve("dir")
        with pytest.raises(OstreeError, match=f"object {checksum}.commit in .*/copy: objects/{checksum[:2]}/"
                                              f"{checksum[2:]}.commit is a symlink or lies under one"):
            src.read_metadata(bytes.fromhex(checksum), Kind.COMMIT)
        # the optional files (summary, deltas, detached metadata): absent is None, a
        # symlink or a directory one line naming it
        (copy / "summary").unlink(missing_ok=True)  # (another test may have made one)
        assert src.fetch_optional("summary", 1 << 20) is None and src.list_refs() is None
        (copy / "summary").symlink_to("/etc/passwd")
        (copy / "deltas").mkdir()
        with pytest.raises(OstreeError, match="copy/summary is a symlink or lies under one"):
            src.fetch_optional("summary", 1 << 20)
        with pytest.raises(OstreeError, match="copy/deltas is not a regular file"):
            src.fetch_optional("deltas", 1 << 20)
        with pytest.raises(OstreeError, match="config is larger than 3 bytes"):
            src.fetch_optional("config", 3)
    finally:
        src.close()


def test_a_keyring_takes_a_summary_only_with_its_signatures(archive, tmp_path):
    """With a keyring, a summary without summary.sig, or with one holding no valid
    signatures, is refused, naming it, on every call (never read as no summary, which would
    send the pull to refs/heads/); gpgv is not reached for those. Good and bad signatures
    are checked against gpgv in the integration tests."""
    repo, checksum = archive
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    ostree("summary", f"--repo={copy}", "-u")
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    plain, keyed = LocalRepo(str(copy)), LocalRepo(str(copy))
    keyed.summary_keyring = str(keyring)
    try:
        assert plain.list_refs() == [("main", bytes.fromhex(checksum))]
        for _ in range(2):
            with pytest.raises(OstreeError, match=rf"^the summary of {copy} is not signed \({copy}/summary.sig is "
                               rf"missing\), but --gpg-keyring {keyring} asks for a signature$"):
                keyed.list_refs()
        (copy / "summary.sig").write_bytes(encode("a{sv}", []))
        with pytest.raises(OstreeError, match=rf"^the summary of {copy} is not signed \({copy}/summary.sig holds "
                           r"no signatures\)"):
            keyed.list_refs()
        (copy / "summary.sig").write_bytes(b"\x07not a variant")
        with pytest.raises(OstreeError, match=rf"^{copy}/summary.sig: not valid detached metadata"):
            keyed.list_refs()
    finally:
        plain.close()
        keyed.close()


def test_local_repo_refuses_unknown_modes(tmp_path):
    init_repo(tmp_path / "r", "archive")
    cfg = (tmp_path / "r" / "config").read_text().replace("archive-z2", "bare-split-xattrs")
    (tmp_path / "r" / "config").write_text(cfg)
    with pytest.raises(OstreeError, match="mode 'bare-split-xattrs' is not supported"):
        LocalRepo(str(tmp_path / "r"))
    with pytest.raises(OstreeError, match="not an ostree repository"):
        LocalRepo(str(tmp_path))


# ------------------------------------------------------------------ the commit splitstream


def _sample(n_files: int, seed: int = 0, external: bool = True) -> CommitObjects:
    commit_id = hashlib.sha256(b"c%d" % seed).digest()
    objects = CommitObjects(commit_id)
    objects.add(commit_id, Entry(b"commit bytes %d" % seed))
    for i in range(n_files):
        checksum = hashlib.sha256(b"f%d-%d" % (seed, i)).digest()
        header = FileHeader(1000 + i, 0, 0, 0o100644, "", []).archive_header()
        objects.add(checksum, Entry(header, hashlib.sha256(b"o%d" % (i % 3)).digest() if external else None))
    return objects


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.integers(0, 1000))
def test_commit_stream_round_trip(n_files, seed):
    objects = _sample(n_files, seed)
    objects.image_id = hashlib.sha256(b"image").digest()
    writer = objects.to_stream("sha256")
    from pycfs.host.splitstream import SplitStreamReader

    reader = SplitStreamReader(writer.finish(), "sha256", CONTENT_OSTREE_COMMIT)
    back = CommitObjects.from_stream(reader, "test")
    assert back.commit == objects.commit and back.entries == objects.entries and back.image_id == objects.image_id
    # object refs in id order of first use, each once
    assert len(reader.object_refs) == len({e.external for e in objects.entries.values() if e.external})


def test_commit_stream_layout(tmp_path):
    repo = Repository.init(tmp_path / "cfs")
    objects = _sample(5)
    write_commit_stream(repo, objects, "a/b%c")
    assert os.readlink(tmp_path / "cfs/streams/refs/ostree/a%2Fb%25c") == f"../../{stream_name(objects.commit)}"
    assert decode_ref(encode_ref("a/b%c")) == "a/b%c"
    reader = repo.open_stream(stream_name(objects.commit), CONTENT_OSTREE_COMMIT)
    body = b"".join(c for c in reader.chunks())
    commit_index, flags, *buckets = HEADER.unpack_from(body)
    ids = sorted(objects.entries)
    assert (flags, buckets[255], ids[commit_index]) == (0, 6, objects.commit)
    assert body[HEADER.size:HEADER.size + 6 * 32] == b"".join(ids)
    for i, checksum in enumerate(ids):
        block, size, ext = struct.unpack_from("<III", body, HEADER.size + 6 * 32 + 12 * i)
        start = HEADER.size + 6 * 44 + 8 * block
        assert body[start:start + size] == objects.entries[checksum].data
        assert (ext == 0xFFFFFFFF) == (objects.entries[checksum].external is None)
    assert load_stream(repo, f"refs/ostree/{encode_ref('a/b%c')}").entries == objects.entries


def test_commit_stream_refuses_damage():
    from pycfs.host.splitstream import SplitStreamReader, SplitStreamWriter

    good = _sample(3, external=False).to_stream("sha256").finish()
    body = b"".join(SplitStreamReader(good, "sha256").chunks())
    for bad, why in [(body[:100], "shorter than its header"), (body[:HEADER.size + 10], "tables"),
                     (b"\x09" + body[1:], "commit index"),
                     (body[:HEADER.size] + body[HEADER.size + 32:HEADER.size + 64] + body[HEADER.size:HEADER.size + 32]
                      + body[HEADER.size + 64:], "sorted|bucket")]:
        w = SplitStreamWriter("sha256", CONTENT_OSTREE_COMMIT)
        w.write_inline(bad)
        with pytest.raises(OstreeError, match=why):
            CommitObjects.from_stream(SplitStreamReader(w.finish(), "sha256"), "x")


@pytest.mark.parametrize("files,dirs,why", [
    ([("..", b"\1" * 32)], [], "invalid file name"),
    ([("a/b", b"\1" * 32)], [], "invalid file name"),
    ([("b", b"\1" * 32), ("a", b"\2" * 32)], [], "not sorted"),
    ([("a", b"\1" * 32)], [("a", b"\2" * 32, b"\3" * 32)], "both a file and a directory"),
    ([("a", b"\1" * 31)], [], "checksum of 'a' is 31 bytes, not a checksum"),
    ([], [("d", b"\1" * 32, b"\2" * 33)], "dirmeta of 'd' is 33 bytes, not a checksum"),
    ([], [("d", b"\1" * 3, b"\2" * 32)], "dirtree of 'd' is 3 bytes, not a checksum"),
    ([("\u65e5", b"\1" * 32), ("z", b"\2" * 32)], [], "not sorted"),  # UTF-8 e6 97 a5 sorts after 7a
    # longer than NAME_MAX: refused where the dirtree is parsed (before: by the image writer,
    # naming no object), in bytes of UTF-8
    ([("n" * 256, b"\1" * 32)], [], r"file name 'n{40}'\.\.\. of 256 bytes \(at most 255\)$"),
    ([], [("\u65e5" * 86, b"\1" * 32, b"\2" * 32)], "of 258 bytes"),
])
def test_hostile_dirtrees_are_refused(files, dirs, why):
    data = DirTree(files, dirs).serialize()
    with pytest.raises(OstreeError, match=why) as info:
        DirTree.parse(data, hashlib.sha256(data).digest())
    assert hashlib.sha256(data).hexdigest() in str(info.value)


def test_dirtree_names_sort_as_their_utf8_bytes():
    files = [("Z", b"\1" * 32), ("a", b"\2" * 32), ("z", b"\3" * 32), ("\u00e9", b"\4" * 32), ("\u65e5", b"\5" * 32),
             ("\U0001f600", b"\6" * 32)]
    assert [n.encode() for n, _ in files] == sorted(n.encode() for n, _ in files)
    data = DirTree(files, [("y", b"\7" * 32, b"\x08" * 32)]).serialize()
    assert DirTree.parse(data, hashlib.sha256(data).digest()) == DirTree(files, [("y", b"\7" * 32, b"\x08" * 32)])


@pytest.mark.parametrize("mode,target,size,why", [
    (0o020644, "", 0, "mode 20644 is neither a regular file nor a symlink"),
    (0o120777, "", 0, "symlink without a target"),
    (0o100644, "x", 3, "regular file with a symlink target"),
    # longer than PATH_MAX: refused where the header is parsed (before: by the image writer,
    # naming the inode and no object)
    (0o120777, "t" * 4096, 0, r"symlink target of 4096 bytes \(at most 4095\)$"),
    (0o120777, "\u00e9" * 2048, 0, "symlink target of 4096 bytes"),
])
def test_hostile_file_headers_are_refused(mode, target, size, why):
    header = FileHeader(size, 0, 0, mode, target, [])
    checksum = hashlib.sha256(b"x").digest()
    with pytest.raises(OstreeError, match=f"^object {checksum.hex()}.file: {why}"):
        split_archive_header(header.archive_header(), checksum)


_xattr = st.tuples(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b).map(lambda b: b + b"\0"),
                   st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@example(1, 0, 0, 0o100644, "", [(b"user.big\0", bytes(70000))])
# the ends of one-byte offsets without xattrs (a shorter path lays those out): the regular
# header's fixed fields are 16 bytes, the archive's 24, then the target and its NUL
@example(1, 0, 0, 0o120777, "t" * 237, [])
@example(1, 0, 0, 0o120777, "t" * 238, [])
@example(1, 0, 0, 0o120777, "t" * 229, [])
@example(1, 0, 0, 0o120777, "t" * 230, [])
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
       st.integers(0, (1 << 32) - 1), st.text(max_size=400).filter(lambda t: "\0" not in t),
       st.lists(_xattr, max_size=300).map(sorted))
def test_file_header_encoders_match_the_codec(size, uid, gid, mode, target, xattrs):
    """The hand-laid headers are byte for byte what the generic codec writes (offsets of 1, 2
    and 4 bytes: long targets and xattrs push the variant past 255 and 65535 bytes)."""
    from pycfs.host.ostree.objects import FILE_HEADER_TYPE, FILE_REGULAR_TYPE, SIZED

    header = FileHeader(size, uid, gid, mode, target, xattrs)
    swap = [int.from_bytes(v.to_bytes(n, "little"), "big") for v, n in ((size, 8), (uid, 4), (gid, 4), (mode, 4))]
    archive = encode(FILE_HEADER_TYPE, (*swap, 0, target, xattrs))
    regular = encode(FILE_REGULAR_TYPE, (*swap[1:], 0, target, xattrs))
    assert header.archive_header() == SIZED.pack(len(archive)) + archive
    assert header.checksum_prefix() == SIZED.pack(len(regular)) + regular


_name = st.text(min_size=1, max_size=300).filter(lambda t: "\0" not in t)
_sum = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
_dirtree = st.tuples(st.lists(st.tuples(_name, _sum), max_size=40),
                     st.lists(st.tuples(_name, _sum, _sum), max_size=20))


def _generic_or_error(type_text, data):
    from pycfs.protocol.gvariant import GVariantError

    try:
        return decode(type_text, data)
    except GVariantError:
        return GVariantError


def _damaged(data, edits):
    out = bytearray(data)
    for at, value in edits:
        if out:
            out[at % len(out)] = value
    return bytes(out)


_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3)


@settings(max_examples=400, deadline=None)
@given(_dirtree, _edits, st.integers(0, 3))
def test_fast_dirtree_reader_agrees_with_the_codec(value, edits, cut):
    """Whatever the bytes (valid, with a byte changed, cut short), the fast reader gives
    what the generic codec decodes, or hands over (None) to it."""
    from pycfs.host.ostree.objects import DIRTREE_TYPE, _read_dirtree

    valid = encode(DIRTREE_TYPE, value)
    assert _read_dirtree(valid) == decode(DIRTREE_TYPE, valid)  # (offsets up to 4 bytes wide)
    for data in (_damaged(valid, edits), valid[:len(valid) - cut]):
        fast = _read_dirtree(data)
        if fast is not None:
            assert fast == _generic_or_error(DIRTREE_TYPE, data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
       st.text(max_size=400).filter(lambda t: "\0" not in t), st.lists(_xattr, max_size=3).map(sorted),
       _edits, st.integers(0, 3))
def test_fast_file_header_reader_agrees_with_the_codec(size, mode, rdev, target, xattrs, edits, cut):
    from pycfs.host.ostree.objects import FILE_HEADER_TYPE, _FILE_FIELDS, _plain_header_target

    valid = encode(FILE_HEADER_TYPE, (size, 0, 0, mode, rdev, target, xattrs))
    assert (_plain_header_target(valid) == target) if not xattrs else _plain_header_target(valid) is None
    for data in (valid, _damaged(valid, edits), valid[:len(valid) - cut]):
        fast = _plain_header_target(data)
        if fast is not None:
            swapped = [int.from_bytes(v.to_bytes(n, "big"), "little")
                       for v, n in zip(_FILE_FIELDS.unpack_from(data), (8, 4, 4, 4, 4))]
            assert (*swapped, fast, []) == _generic_or_error(FILE_HEADER_TYPE, data)


def _bare_file_and_link(tmp_path: Path) -> Path:
    """A bare-user-only repository the ostree CLI wrote, its commit `main` a file and a symlink."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x" * 1000)
    os.symlink("file", tree / "link")
    repo = init_repo(tmp_path / "repo", "bare-user-only")
    commit(repo, tree, "main")
    return repo


def test_local_bare_file_objects_opened_at_once(tmp_path):
    """A bare-user-only repository the ostree CLI wrote: a file object comes back open (its
    content for the workers to check), a symlink object as its checked header, and what is
    neither, missing, or a symlink where bare-user keeps files, one line naming it."""
    repo = _bare_file_and_link(tmp_path)
    files = {p.name.split(".")[0]: p for p in (repo / "objects").rglob("*.file")}
    by_kind = {("link" if p.is_symlink() else "file"): bytes.fromhex(p.parent.name + name) for name, p in files.items()}
    src = LocalRepo(str(repo))
    try:
        regular = src.fetch_file(by_kind["file"], 64, str(tmp_path))
        assert regular.fd is not None and not regular.verified and regular.header.size == 1000
        assert os.pread(regular.fd, 2000, 0) == b"x" * 1000
        os.close(regular.fd)
        link = src.fetch_file(by_kind["link"], 64, str(tmp_path))
        assert link.fd is None and link.header.is_symlink and link.header.symlink_target == "file"
        # a symlink whose target is not the one its checksum covers
        link_path = files[by_kind["link"].hex()[2:]]
        link_path.unlink()
        link_path.symlink_to("other")
        with pytest.raises(OstreeError, match=f"object {by_kind['link'].hex()}.file: content does not match"):
            src.fetch_file(by_kind["link"], 64, str(tmp_path))
        link_path.unlink()
        os.mkfifo(link_path)
        with pytest.raises(OstreeError, match=f"object {by_kind['link'].hex()}.file in .* is not a regular file"):
            src.fetch_file(by_kind["link"], 64, str(tmp_path))
        link_path.unlink()
        with pytest.raises(OstreeError, match=f"object {by_kind['link'].hex()}.file is missing from"):
            src.fetch_file(by_kind["link"], 64, str(tmp_path))
        link_path.symlink_to("file")
        src.mode = "bare-user"  # which keeps symlinks in regular files: a symlink is damage
        with pytest.raises(OstreeError, match=f"object {by_kind['link'].hex()}.file in .*: objects/.* is a symlink"):
            src.fetch_file(by_kind["link"], 64, str(tmp_path))
    finally:
        src.close()


@pytest.mark.parametrize("text, expected", [
    ("[core]\nrepo_version=1\nmode=archive-z2\n", "archive-z2"),
    ("# a comment\n\n[core]\nrepo_version=1\n  mode = bare-user\n", "bare-user"),
    ("[core]\nrepo_version=1\nmode = bare-user  \n", "bare-user  "),  # GLib keeps the trailing spaces
    ("[core]\nrepo_version=1\nmode=bare\n[core]\nmode=bare-user-only\n", "bare-user-only"),  # a later value wins
    ("[remote \"x\"]\nmode=archive\n[core]\nrepo_version=1\n", None),  # only [core]'s
    ("[core]\nrepo_version=1\nMode=archive\n", None),  # keys are case-sensitive
    ("[core]\nrepo_version=1\nmode=\n", ""),  # empty: refused, not taken for the default
])
def test_config_mode_is_read_as_ostree_reads_it(tmp_path, text, expected):
    """The repository's mode from its config (a GLib key file), as `ostree config get
    core.mode` (the oracle) reads it: the value, or the value it refuses, or none."""
    assert config_value(text.encode(), "core", "mode", "config") == expected
    repo = init_repo(tmp_path / "r", "archive")
    (repo / "config").write_text(text)
    got = subprocess.run(["ostree", "config", f"--repo={repo}", "get", "core.mode"], capture_output=True, text=True)
    refused = re.search(r"Invalid mode '(.*)'", got.stderr)
    assert (got.stdout.rstrip("\n") if got.returncode == 0 else refused.group(1) if refused else None) == expected
    assert got.returncode == 0 or refused or "does not have key" in got.stderr


def test_a_config_that_is_not_a_key_file_or_not_a_regular_file_is_one_line(tmp_path):
    with pytest.raises(OstreeError, match=r"^c cannot be read: line 2 is no group, key=value or comment$"):
        config_value(b"[core]\nmode\n", "core", "mode", "c")
    repo = init_repo(tmp_path / "e", "archive")
    (repo / "config").write_text("[core]\nrepo_version=1\nmode=\n")
    with pytest.raises(OstreeError, match=r"mode '' is not supported"):
        LocalRepo(str(repo))
    with pytest.raises(OstreeError, match=r"^c cannot be read: line 1 is no group"):
        config_value(b"mode=bare\n", "core", "mode", "c")
    with pytest.raises(OstreeError, match=r"^c cannot be read: it is not UTF-8$"):
        config_value(b"[core]\nmode=\xff\n", "core", "mode", "c")
    repo = init_repo(tmp_path / "r", "archive")
    (repo / "config").unlink()
    os.mkfifo(repo / "config")  # an open() would wait for a writer for good
    with pytest.raises(OstreeError, match=r"/r/config is not a regular file$"):
        LocalRepo(str(repo))
    (repo / "config").unlink()
    (repo / "config").symlink_to("/dev/zero")  # an open() would read without end
    with pytest.raises(OstreeError, match=r"/r/config is a symlink or lies under one \(nothing below a repository's "
                                          r"root is followed\)$"):
        LocalRepo(str(repo))


def test_a_bare_symlink_whose_target_is_not_utf8_is_one_error(tmp_path):
    """ostree keeps a symlink's target as a GVariant string; a bare repository's link can
    hold any bytes (before: UnicodeEncodeError escaped from the checksum)."""
    (tmp_path / "config").write_text("[core]\nmode=bare-user-only\n")
    checksum = hashlib.sha256(b"any").digest()
    (tmp_path / "objects" / checksum.hex()[:2]).mkdir(parents=True)
    os.symlink(b"bad\xff", tmp_path / "objects" / checksum.hex()[:2] / f"{checksum.hex()[2:]}.file")
    repo = LocalRepo(str(tmp_path))
    try:
        with pytest.raises(OstreeError, match="symlink target is not UTF-8 text without NUL"):
            repo.fetch_file(checksum, 64, str(tmp_path))
    finally:
        repo.close()


def test_detached_metadata_with_too_many_signatures_is_refused_at_once(tmp_path):
    """Each signature costs a gpgv run: thousands of them are refused before any runs."""
    from pycfs.host.ostree.signature import MAX_SIGNATURES, verify_signed
    from pycfs.protocol.gvariant import Variant, encode

    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    detached = encode("a{sv}", [("ostree.gpgsigs", Variant("aay", [b"sig"] * (MAX_SIGNATURES * 64)))])
    with pytest.raises(OstreeError, match=f"holds {MAX_SIGNATURES * 64} signatures, more than the"):
        verify_signed(b"commit", "commit x", "object x.commitmeta", detached, str(keyring))


def _dag(width: int, depth: int, files: int = 0) -> CommitObjects:
    """A commit whose dirtree lists `width` directories, each the same dirtree listing
    `width` of the next, `depth` levels down (the last holding `files` files): a few objects
    that expand to width**depth directories."""
    def add(objects: CommitObjects | None, data: bytes) -> bytes:
        checksum = hashlib.sha256(data).digest()
        if objects is not None:
            objects.add(checksum, Entry(data))
        return checksum

    metadata = []
    meta = DirMeta(0, 0, 0o40755, []).serialize()
    file_id = hashlib.sha256(b"a file").digest()
    tree = DirTree([(f"f{i}", file_id) for i in range(files)], []).serialize()
    metadata += [meta, tree]
    for _ in range(depth):
        tree = DirTree([], [(f"d{i:04d}", add(None, tree), add(None, meta)) for i in range(width)]).serialize()
        metadata.append(tree)
    commit_data = Commit([], None, [], "dag", "", 0, add(None, tree), add(None, meta)).serialize()
    objects = CommitObjects(hashlib.sha256(commit_data).digest())
    for data in (*metadata, commit_data):
        add(objects, data)
    header = FileHeader(1, 0, 0, 0o100644, "", []).archive_header()
    objects.add(file_id, Entry(header + b"x"))
    return objects


def test_a_tree_of_shared_dirtrees_is_counted_before_it_is_built(monkeypatch):
    """Directories that share a dirtree expand: the entries are counted over the distinct
    dirtrees, and a commit past MAX_ENTRIES is refused before any directory is made (it
    built 3 million directories, 2.6 GB, for 96 KB of metadata)."""
    from memtrace import peak_of
    from pycfs.host.ostree import image

    monkeypatch.setattr(image, "MAX_ENTRIES", 10_000)
    over = _dag(60, 3)  # 219,660 directories

    def refused() -> None:
        with pytest.raises(OstreeError, match=rf"^commit {over.commit.hex()} has more than 10000 entries \(a directory "
                                              r"counting as 8\) once the directories it shares are expanded: no image "
                                              r"is built of it$"):
            image.build_filesystem(over)

    assert peak_of(refused) < 256 << 10
    monkeypatch.setattr(image, "MAX_ENTRIES", 8 * (60 + 60 * 60) + 60 * 60 * 1)  # files count too
    fs = image.build_filesystem(_dag(60, 2, files=1))
    assert sum(1 for _ in fs.walk()) == 1 + 60 + 60 * 60 + 60 * 60
    monkeypatch.setattr(image, "MAX_ENTRIES", image.MAX_ENTRIES - 1)
    with pytest.raises(OstreeError, match="has more than"):
        image.build_filesystem(_dag(60, 2, files=1))


def test_nothing_below_a_local_repositorys_root_is_followed(archive, tmp_path):
    """A symlinked objects/, objects/XX or refs/heads/ took the pull to files elsewhere (only
    the last component was opened without following): each is now one line naming the path.
    The root itself, the path given, may be a symlink."""
    repo, checksum = archive
    commit_id = bytes.fromhex(checksum)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def copy(name: str) -> Path:
        shutil.copytree(repo, tmp_path / name, symlinks=True)
        return tmp_path / name

    def moved(path: Path) -> None:  # the directory moved out, a symlink to it left in its place
        target = elsewhere / f"{path.parent.parent.name}-{path.name}"
        path.rename(target)
        path.symlink_to(target)

    (tmp_path / "link").symlink_to(repo)
    src = LocalRepo(str(tmp_path / "link"))
    try:
        assert src.resolve("main") == (commit_id, "main") and src.read_metadata(commit_id, Kind.COMMIT)
    finally:
        src.close()
    objects = copy("objects-moved")
    moved(objects / "objects")
    with pytest.raises(OstreeError, match=r"^.*/objects-moved/objects is a symlink or lies under one \(nothing below a "
                                          r"repository's root is followed\)$"):
        LocalRepo(str(objects))
    heads, sub = copy("heads-moved"), copy("sub-moved")
    moved(heads / "refs" / "heads")
    moved(sub / "objects" / checksum[:2])
    for root in (heads, sub):
        src = LocalRepo(str(root))
        try:
            if root == heads:
                with pytest.raises(OstreeError, match=r"^ref .*/heads-moved/refs/heads/main is a symlink or lies under"):
                    src.resolve("main")
            else:
                assert src.resolve("main") == (commit_id, "main")
                with pytest.raises(OstreeError, match=rf"^object {checksum}.commit in .*/sub-moved: objects/"
                                                      rf"{checksum[:2]}/{checksum[2:]}.commit is a symlink or lies"):
                    src.read_metadata(commit_id, Kind.COMMIT)
                with pytest.raises(OstreeError, match=rf"^.*/sub-moved/objects/{checksum[:2]}/{checksum[2:]}.commitmeta "
                                                      "is a symlink or lies under one"):
                    src.read_detached(commit_id, 1 << 20)
        finally:
            src.close()


def test_a_bare_repositorys_objects_xx_is_not_followed(tmp_path):
    """A file object and a symlink object (which the open refuses, then looks at) under a
    symlinked objects/XX: each one line naming the object."""
    repo = _bare_file_and_link(tmp_path)
    found = {("link" if p.is_symlink() else "file"): p for p in (repo / "objects").rglob("*.file")}
    for kind, path in found.items():
        checksum = bytes.fromhex(path.parent.name + path.name.split(".")[0])
        target = tmp_path / f"moved-{kind}"
        path.parent.rename(target)
        path.parent.symlink_to(target)
        src = LocalRepo(str(repo))
        try:
            with pytest.raises(OstreeError, match=rf"^object {checksum.hex()}.file in .*/repo: objects/"
                                                  rf"{path.parent.name}/.* is a symlink or lies under one"):
                src.fetch_file(checksum, 64, str(tmp_path))
        finally:
            src.close()
            path.parent.unlink()
            target.rename(path.parent)


def test_commit_dates_read_the_timestamp_as_signed_seconds():
    from pycfs.host.ostree.objects import commit_date

    assert commit_date(0) == "1970-01-01 00:00:00 UTC"
    assert commit_date(1704164645) == "2024-01-02 03:04:05 UTC"
    assert commit_date((1 << 64) - 315619200) == "1960-01-01 00:00:00 UTC"
    assert commit_date((1 << 64) - 1) == "1969-12-31 23:59:59 UTC"
    assert commit_date((1 << 64) - 62135596800) == "0001-01-01 00:00:00 UTC"
    assert commit_date(253402300799) == "9999-12-31 23:59:59 UTC"
    # beyond what a date holds: the number, signed
    assert commit_date(253402300800) == "timestamp 253402300800"
    assert commit_date(1 << 63) == f"timestamp {-(1 << 63)}"
    assert commit_date((1 << 64) - 62135596801) == "timestamp -62135596801"

