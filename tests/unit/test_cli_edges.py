"""The CLI's edges: names that are not UTF-8 in a list, empty repository settings, a copy
into a repository this user cannot write, tags shown escaped, usage errors that show the
command's usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pycfs.host.fsverity import digest_path
from pycfs.tools.cli import main

from storage_trees import FakeStore

CLI = [sys.executable, "-m", "pycfs.tools.cli"]


def test_measure_lists_names_that_are_not_utf8(tmp_path: Path) -> None:
    """`measure --files-from LIST` with a Latin-1 name was "internal error: UnicodeDecodeError";
    the name is printed as its bytes, as `fsverity digest` would."""
    name = os.fsencode(tmp_path) + b"/caf\xe9"
    with open(name, "wb") as f:
        f.write(b"x" * 5000)
    listing = tmp_path / "list"
    listing.write_bytes(name + b"\n\n")
    expected = digest_path(os.fsdecode(name)).hex().encode() + b" " + name + b"\n"
    done = subprocess.run([*CLI, "measure", "--files-from", str(listing)], capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, b"")
    done = subprocess.run([*CLI, "measure", "--files-from", "-"], input=name + b"\n", capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, b"")
    done = subprocess.run([*CLI, "measure", name], capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, b"")


def test_empty_repository_settings_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--repo ""` and `PYCFS_REPO=` (an unset shell variable) meant the default repository:
    `init` made the current directory one."""
    monkeypatch.chdir(tmp_path)
    assert main(["--repo", "", "oci", "images"]) == 1  # (not init: as root the default is /sysroot/composefs)
    assert capsys.readouterr().err == "pycfs: error: --repo is empty: name the repository's path\n"
    monkeypatch.setenv("PYCFS_REPO", "")
    assert main(["init"]) == 1
    assert capsys.readouterr().err == ("pycfs: error: PYCFS_REPO is set but empty: set it to a repository's path, "
                                       "or unset it for the default\n")
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("PYCFS_REPO", str(tmp_path / "r"))
    assert main(["init"]) == 0


def test_copy_into_a_read_only_repository_is_refused_up_front(tmp_path: Path, capsys) -> None:
    """As `oci pull` does: it went as far as storing objects ("cannot store ... (dirfd 2)")."""
    for name in ("src", "dst"):
        assert main(["--repo", str(tmp_path / name), "init"]) == 0
    meta = json.loads((tmp_path / "dst" / "meta.json").read_text())
    meta["features"]["read-only-compatible"].append("x-newer")  # (opens read-only, for root too)
    (tmp_path / "dst" / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["--repo", str(tmp_path / "dst"), "oci", "copy", "img", "--from", str(tmp_path / "src"),
                 "--progress", "none"]) == 1
    assert capsys.readouterr().err == (f"pycfs: error: repository {tmp_path / 'dst'} is read-only for this user "
                                       "(check its owner and mode, or pass --repo for one of your own)\n")


def test_tags_are_shown_escaped(tmp_path: Path, capsys) -> None:
    """`oci pull IMAGE NAME` printed the tag raw (a terminal control in it acted); `oci images`
    escapes it, and its TAG column is as wide as its header."""
    fake = FakeStore(tmp_path / "storage")
    fake.add_image([fake.add_layer({"etc": None, "etc/f": b"f"})], ["localhost/img:latest"])
    repo = str(tmp_path / "repo")
    assert main(["--repo", repo, "init"]) == 0
    for tag in ("a\x1b]0;x\x07", "b"):
        assert main(["--repo", repo, "oci", "pull", "--storage-root", str(fake.root), "--progress", "none",
                     "containers-storage:localhost/img:latest", tag]) == 0
    out = capsys.readouterr().out
    assert "tagged a\\x1b]0;x\\x07\n" in out and "\x1b" not in out
    assert main(["--repo", repo, "oci", "images"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["TAG", "a\\x1b]0;x\\x07", "b"]
    assert len({line.index("sha256:") for line in lines[1:]} | {lines[0].index("MANIFEST")}) == 1
    (tmp_path / "only").mkdir()
    repo = str(tmp_path / "only" / "repo")
    assert main(["--repo", repo, "init"]) == 0
    assert main(["--repo", repo, "oci", "pull", "--storage-root", str(fake.root), "--progress", "none",
                 "containers-storage:localhost/img:latest", "b"]) == 0
    capsys.readouterr()
    assert main(["--repo", repo, "oci", "images"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.index("MANIFEST") == row.index("sha256:")


@pytest.mark.parametrize(("argv", "said"), [
    (["fsck", "--bogus"], ("usage: pycfs fsck ", "pycfs fsck: error: unrecognized arguments: --bogus")),
    (["oci", "pull", "x", "--bogus"], ("usage: pycfs oci pull ", "pycfs oci pull: error: unrecognized arguments: --bogus")),
    (["init", "a"], ("usage: pycfs init ", "pycfs init: error: unrecognized arguments: a")),
    (["--bogus", "fsck"], ("usage: pycfs ", "pycfs: error: unrecognized arguments: --bogus")),
])
def test_unknown_arguments_show_the_commands_usage(argv: list[str], said: tuple[str, str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(said[0]) and err[-1] == said[1]
