"""The error edge: every command against damaged repositories ends in one line or succeeds,
never a traceback; `fsck --repair` then a pull restore the exact image; a pull leaves
nothing for gc and tags only after the image is built."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import imagebuild
from pycfs.host.oci.streams import config_stream_name, manifest_stream_name
from pycfs.host.repository import Repository
from pycfs.host.streamcat import iter_stream_bytes
from pycfs.tools.cli import main

TAG = "img"


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> imagebuild.BuiltImage:
    return imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path_factory.mktemp("layout") / "img")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, layout) -> Path:
    """A repository with the image pulled, to copy for each damage."""
    path = tmp_path_factory.mktemp("pristine") / "repo"
    assert main(["--repo", str(path), "init"]) == 0
    assert main(["--repo", str(path), "oci", "pull", "--progress=none", layout.oci_ref, TAG]) == 0
    return path


def run(capsys, repo: Path, *argv: str) -> tuple[int, str, str]:
    rc = main(["--repo", str(repo), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_or_success(rc: int, err: str, what: str) -> None:
    assert rc in (0, 1), (what, rc, err)
    assert "Traceback" not in err and "internal error" not in err, (what, err)
    errors = [line for line in err.splitlines() if line.startswith("pycfs: error:")]
    if rc == 1 and not errors:
        return  # fsck's report: exit 1 with its findings on stdout
    assert len(errors) <= 1, (what, err)


def _link_object(repo: Path, rel: str) -> Path:
    return (repo / rel).resolve()


def _layer_objects(repo: Path, diff_id: str) -> list[Path]:
    with Repository.open(repo, writable=False) as r:
        reader = r.open_stream(f"oci-layer-{diff_id}")
        return [r.object_path(i) for i in reader.object_refs]


def _biggest_object(repo: Path, layout) -> Path:
    objects = [p for d in layout.diff_ids for p in _layer_objects(repo, d)]
    return max(objects, key=lambda p: p.stat().st_size)


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _image_name(repo: Path) -> str:
    (name,) = [n for n in os.listdir(repo / "images") if n != "refs"]
    return name


def _image_object(repo: Path) -> Path:
    return _link_object(repo, f"images/{_image_name(repo)}")


# Each damage: what a user meets (and fsck can report), done to a fresh copy of the repository.
DAMAGES: dict[str, Callable[[Path, imagebuild.BuiltImage], None]] = {
    "object-flipped-byte": lambda repo, layout: _flip_byte(_biggest_object(repo, layout)),
    "object-deleted": lambda repo, layout: _biggest_object(repo, layout).unlink(),
    "layer-stream-truncated": lambda repo, layout: _truncate(
        _link_object(repo, f"streams/oci-layer-{layout.diff_ids[-1]}"), 60),
    "manifest-stream-truncated": lambda repo, layout: _truncate(
        _link_object(repo, f"streams/{manifest_stream_name(layout.manifest_digest)}"), 50),
    "config-stream-truncated": lambda repo, layout: _truncate(
        _link_object(repo, f"streams/{config_stream_name(layout.config_digest)}"), 50),
    "manifest-stream-deleted": lambda repo, layout: _link_object(
        repo, f"streams/{manifest_stream_name(layout.manifest_digest)}").unlink(),
    "image-truncated": lambda repo, layout: _truncate(_image_object(repo), 4096),
    "image-deleted": lambda repo, layout: _image_object(repo).unlink(),
    "stream-link-replaced-by-file": lambda repo, layout: (
        (repo / f"streams/oci-layer-{layout.diff_ids[0]}").unlink(),
        (repo / f"streams/oci-layer-{layout.diff_ids[0]}").write_bytes(b"junk")),
    "junk-in-objects": lambda repo, layout: (repo / "objects/ab/not-a-digest").parent.mkdir(exist_ok=True)
    or (repo / "objects/ab/not-a-digest").write_bytes(b"junk"),
    # names JSON and the terminal cannot carry as they are
    "tag-not-utf8": lambda repo, layout: os.symlink(
        os.readlink(repo / f"streams/refs/oci/{TAG}"), bytes(repo / "streams/refs/oci") + b"/bad\xff"),
    "image-ref-not-utf8": lambda repo, layout: (repo / "images/refs").mkdir(exist_ok=True) or os.symlink(
        f"../{_image_name(repo)}", bytes(repo / "images/refs") + b"/r\xfe"),
}


def _commands(layout) -> list[list[str]]:
    return [
        ["oci", "images"], ["oci", "images", "--json"], ["oci", "inspect", TAG], ["oci", "inspect", "--config", TAG],
        ["oci", "compute-id", TAG], ["gc", "--dry-run"], ["fsck", "--progress=none"],
        ["fsck", "--json", "--progress=none", "--metadata-only"],
        ["oci", "create-image", TAG],
        ["oci", "pull", "--progress=none", layout.oci_ref, TAG],
    ]


def _image_ids(capsys, repo: Path) -> dict:
    rc, out, err = run(capsys, repo, "oci", "images", "--json")
    assert rc == 0, err
    (image,) = json.loads(out)["images"]
    return image["images"]


def _layers_match(repo: Path, layout) -> None:
    with Repository.open(repo, writable=False) as r:
        for diff_id in layout.diff_ids:
            h = hashlib.sha256()
            for piece in iter_stream_bytes(r, r.open_stream(f"oci-layer-{diff_id}")):
                h.update(piece)
            assert "sha256:" + h.hexdigest() == diff_id


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_repository(damage, tmp_path, capsys, layout, pristine):
    repo = tmp_path / "repo"
    shutil.copytree(pristine, repo, symlinks=True)
    expected_images = _image_ids(capsys, repo)
    DAMAGES[damage](repo, layout)

    # Every command: success or one line, never a traceback.
    for argv in _commands(layout):
        rc, _, err = run(capsys, repo, *argv)
        assert_one_line_or_success(rc, err, f"{damage}: pycfs {' '.join(argv)}")

    # fsck finds it (a pull may have healed some of it already: re-damage a fresh copy).
    shutil.rmtree(repo)
    shutil.copytree(pristine, repo, symlinks=True)
    DAMAGES[damage](repo, layout)
    rc, out, _ = run(capsys, repo, "fsck", "--json", "--progress=none")
    report = json.loads(out)
    assert rc == 1 and not report["ok"], (damage, report)

    # Repair drops what cannot be trusted; a pull rebuilds it; fsck is clean; same image.
    rc, out, err = run(capsys, repo, "fsck", "--repair", "--json", "--progress=none")
    assert rc == 0, (damage, out, err)
    assert json.loads(out)["repaired"], damage
    rc, _, err = run(capsys, repo, "oci", "pull", "--progress=none", layout.oci_ref, TAG)
    assert rc == 0, (damage, err)
    rc, out, _ = run(capsys, repo, "fsck", "--json", "--progress=none", "--verify-layers")
    assert rc == 0 and json.loads(out)["ok"], (damage, out)
    assert _image_ids(capsys, repo) == expected_images
    _layers_match(repo, layout)
    rc, out, _ = run(capsys, repo, "gc", "--dry-run", "--json")
    assert json.loads(out)["objects_removed"] == 0


def test_pull_leaves_nothing_for_gc(capsys, tmp_path, layout):
    repo = tmp_path / "repo"
    assert main(["--repo", str(repo), "init"]) == 0
    for _ in range(2):  # a re-pull too
        rc, _, err = run(capsys, repo, "oci", "pull", "--progress=none", layout.oci_ref, TAG)
        assert rc == 0, err
        rc, out, _ = run(capsys, repo, "gc", "--dry-run", "--json")
        assert json.loads(out)["objects_removed"] == 0, out


def test_pull_self_heals_missing_layer_objects_and_image(capsys, tmp_path, layout, pristine):
    """Without fsck: a pull re-imports a layer that lost an object, and rewrites a deleted image."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine, repo, symlinks=True)
    expected = _image_ids(capsys, repo)
    victim = _biggest_object(repo, layout)
    victim.unlink()
    _image_object(repo).unlink()
    rc, _, err = run(capsys, repo, "oci", "pull", "--progress=none", layout.oci_ref, TAG)
    assert rc == 0, err
    assert victim.exists()
    assert _image_ids(capsys, repo) == expected
    rc, out, _ = run(capsys, repo, "fsck", "--json", "--progress=none")
    assert json.loads(out)["ok"], out


def test_failed_image_build_leaves_no_tag(capsys, tmp_path, layout, monkeypatch):
    from pycfs.host.oci import image
    from pycfs.host.oci.merge import ImageBuildError

    def broken(*a, **kw):
        raise ImageBuildError("simulated build failure")

    monkeypatch.setattr(image, "_write_images", broken)
    repo = tmp_path / "repo"
    assert main(["--repo", str(repo), "init"]) == 0
    rc, _, err = run(capsys, repo, "oci", "pull", "--progress=none", layout.oci_ref, TAG)
    assert rc == 1 and "simulated build failure" in err
    assert not (repo / "streams/refs/oci").exists() or not os.listdir(repo / "streams/refs/oci")


def test_unusable_repository_paths(capsys, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    for argv in (["init"], ["oci", "images"], ["fsck"], ["gc"]):
        rc, _, err = run(capsys, afile, *argv)
        assert rc == 1 and err.count("\n") == 1 and str(afile) in err, (argv, err)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "meta.json").write_text("{not json")
    for argv in (["init"], ["oci", "images"]):
        rc, _, err = run(capsys, garbage, *argv)
        assert rc == 1 and "meta.json" in err and err.count("\n") == 1, (argv, err)
    missing = tmp_path / "missing"
    rc, _, err = run(capsys, missing, "oci", "images")
    assert rc == 1 and "init" in err and err.count("\n") == 1
    repo = tmp_path / "repo"
    assert main(["--repo", str(repo), "init"]) == 0
    rc, _, err = run(capsys, repo, "init", "--erofs-version", "2")
    assert rc == 1 and "EROFS format 1" in err and "asked for" in err, err


def test_version_and_bad_tar(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("pycfs ")
    repo = tmp_path / "repo"
    assert main(["--repo", str(repo), "init"]) == 0
    notar = tmp_path / "notar"
    notar.write_bytes(b"root:x:0:0:root:/root:/bin/bash\nlogin\nsy" * 20)
    rc, _, err = run(capsys, repo, "oci", "import-layer", "sha256:" + "0" * 64, str(notar))
    assert rc == 1 and err.count("\n") == 1 and "not a tar" in err, err


def test_control_characters_in_a_failure_are_shown_escaped(capsys, tmp_path):
    """A path (from an image, a peer, an argument) with terminal controls in it: the one line
    shows them escaped, so they cannot clear or retitle the user's terminal."""
    repo = tmp_path / "r\x1b]0;owned\x07\x1b[2J\x9b"
    assert main(["--repo", str(repo), "fsck"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pycfs: error: ")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in err[:-1]), repr(err)
    assert "r\\x1b]0;owned\\x07\\x1b[2J\\x9b" in err


def test_a_tag_with_terminal_controls_is_listed_escaped(capsys, tmp_path, pristine):
    """A tag is anyone's text (a varlink client's Tag, a repository someone else wrote):
    `oci images` shows its controls escaped; --json keeps it exact (JSON escapes them)."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine, repo, symlinks=True)
    os.symlink(os.readlink(repo / f"streams/refs/oci/{TAG}"), repo / "streams/refs/oci/x\x1b]0;t\x07")
    rc, out, _ = run(capsys, repo, "oci", "images")
    assert rc == 0 and "x\\x1b]0;t\\x07 " in out
    assert not any(ord(c) < 0x20 and c != "\n" for c in out), repr(out)
    rc, out, _ = run(capsys, repo, "oci", "images", "--json")
    assert rc == 0 and "x\x1b]0;t\x07" in [i["tag"] for i in json.loads(out)["images"]]
