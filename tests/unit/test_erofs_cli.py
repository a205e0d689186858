"""`pycfs mkcomposefs` / `pycfs composefs-info` against the C tools' CLI facts and vectors."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycfs.tools.cli import main
from vectors import C_VECTORS, c_manifest

VECTORS = C_VECTORS
MANIFEST = c_manifest()

# composefs-dump is a separate C tool; `--version` is an argparse matter (exit 2, not 1)
FACTS = [f for f in MANIFEST["cli_facts"]
         if f["command"].split()[0] in ("mkcomposefs", "composefs-info") and "--version" not in f["command"]]


def pycfs(args: list[str], cwd: Path, stdin: bytes | None = None, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "pycfs.tools.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, env={**os.environ, **(env or {})})


def _stage(tmp_path: Path, command: str) -> None:
    for word in shlex.split(command):
        src = VECTORS / word
        if word.endswith((".dump", ".cfs")) and src.exists():
            shutil.copy(src, tmp_path / word)


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f["what"])
def test_cli_fact(fact, tmp_path):
    command = fact["command"]
    _stage(tmp_path, command)
    stdin = None
    pipe_sha = False
    if command.endswith("| sha256sum"):
        command = command.removesuffix("| sha256sum").strip()
        pipe_sha = True
    argv = shlex.split(command)
    if argv[-1] == "-" and "--from-file" in argv and argv[-2] == "--from-file":
        stdin = (VECTORS / "empty_root.dump").read_bytes()
    r = pycfs(argv, tmp_path, stdin=stdin)
    assert r.returncode == fact["rc"], r.stderr.decode()
    if pipe_sha:
        assert hashlib.sha256(r.stdout).hexdigest() + "  -" == fact["stdout"]
    elif fact["rc"] == 0:
        assert r.stdout.decode("utf-8", "surrogateescape").startswith(fact["stdout"])
    else:
        expected = fact["stderr"].split(": ", 1)[-1] if fact["stderr"].startswith(("mkcomposefs:", "composefs-info:")) else fact["stderr"]
        # the C message up to the OS reason; pycfs adds the reason in its own words
        assert expected.splitlines()[0].split(": Invalid argument")[0] in r.stderr.decode()
    assert not (tmp_path / "x.cfs").exists()


@pytest.mark.parametrize("case", MANIFEST["should_fail"], ids=lambda c: c["name"])
def test_should_fail_cli(case, tmp_path, capsys, monkeypatch):
    for k, v in case["env"].items():
        monkeypatch.setenv(k, v)
    rc = main(["mkcomposefs", "--from-file", str(VECTORS / case["dump"]), str(tmp_path / "out.cfs")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("pycfs: error: ") and err.count("\n") == 1
    assert case["stderr"].removeprefix("mkcomposefs: ") in err
    assert not (tmp_path / "out.cfs").exists()


def test_write_image_and_info_commands(tmp_path):
    out = tmp_path / "m.cfs"
    r = pycfs(["mkcomposefs", "--print-digest", "--from-file", str(VECTORS / "mixed_rootfs.dump"), str(out)], tmp_path)
    assert r.returncode == 0
    assert r.stdout.decode() == (VECTORS / "mixed_rootfs.digest").read_text().split()[0] + "\n"
    assert out.read_bytes() == (VECTORS / "mixed_rootfs.cfs").read_bytes()
    for sub in ("dump", "ls"):
        r = pycfs(["composefs-info", sub, str(out)], tmp_path)
        assert r.stdout == (VECTORS / f"mixed_rootfs.info-{sub}").read_bytes()
    objects = pycfs(["composefs-info", "objects", str(out)], tmp_path).stdout.split()
    assert len(objects) == 4 and objects == sorted(objects)
    store = tmp_path / "store"
    (store / objects[0][:2].decode()).mkdir(parents=True)
    (store / objects[0].decode()).write_bytes(b"")
    r = pycfs(["composefs-info", "missing-objects", "--basedir", str(store), str(out)], tmp_path)
    assert r.stdout.split() == objects[1:]
    r = pycfs(["composefs-info", "measure-file", str(out)], tmp_path)
    assert r.stdout.decode().strip() == (VECTORS / "mixed_rootfs.digest").read_text().split()[0]


def test_strict_env(tmp_path):
    r = pycfs(["mkcomposefs", "--print-digest-only", "--from-file", str(VECTORS / "edge_noncanonical.dump")], tmp_path,
              env={"CFS_PARSE_STRICT": "1"})
    assert r.returncode == 1 and re.search(rb"line \d+: ", r.stderr)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("seekable", [False, True], ids=["pipe", "file"])
def test_dumpfile_from_stdin(tmp_path, strict, seekable):
    """`--from-file -`: a pipe or a redirected file gives the same image as the named file,
    strict or not (only a strict parse of a pipe reads it whole: it checks the last newline
    first), and strict still refuses a missing last newline."""
    dump = (VECTORS / "mixed_rootfs.dump").read_bytes()
    env = {"CFS_PARSE_STRICT": "1"} if strict else {}

    def run(data: bytes) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "pycfs.tools.cli", "mkcomposefs", "--from-file", "-", "out.cfs"]
        if not seekable:
            return subprocess.run(argv, cwd=tmp_path, input=data, capture_output=True, env={**os.environ, **env})
        (tmp_path / "in.dump").write_bytes(data)
        with open(tmp_path / "in.dump", "rb") as f:
            return subprocess.run(argv, cwd=tmp_path, stdin=f, capture_output=True, env={**os.environ, **env})

    r = run(dump)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "out.cfs").read_bytes() == (VECTORS / "mixed_rootfs.cfs").read_bytes()
    (tmp_path / "out.cfs").unlink()
    r = run(dump.rstrip(b"\n"))
    if strict:
        assert r.returncode == 1 and b"Missing trailing newline" in r.stderr
        assert not (tmp_path / "out.cfs").exists()
    else:
        assert r.returncode == 0, r.stderr.decode()
        assert (tmp_path / "out.cfs").read_bytes() == (VECTORS / "mixed_rootfs.cfs").read_bytes()


# ---------------------------------------------------------------------------- composefs-info as C


DIGEST = "ab" * 32


def _image(tmp_path: Path, text: bytes, capsys) -> Path:
    (tmp_path / "in.dump").write_bytes(text)
    out = tmp_path / "in.cfs"
    assert main(["mkcomposefs", "--from-file", str(tmp_path / "in.dump"), str(out)]) == 0
    capsys.readouterr()
    return out


def test_info_hides_whiteout_markers_on_every_inode(tmp_path, capsys):
    img = _image(tmp_path, b"/ 0 40755 2 0 0 0 0.0 - - - user.overlay.whiteouts=r\n"
                           b"/f 0 100644 1 0 0 0 0.0 - - - user.overlay.whiteout=y user.overlay.whiteouts=x"
                           b" trusted.overlay.whiteouts=z user.keep=1\n", capsys)
    assert main(["composefs-info", "dump", str(img)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "/f 0 100644 1 0 0 0 0.0 - - - user.keep=1"]


def test_info_dump_of_a_file_masked_as_whiteout_keeps_payload_and_digest(tmp_path, capsys):
    """A regular file with a user `trusted.overlay.whiteout` reads back as a 0:0 character
    device (C and pycfs), and C still prints its size, payload and digest."""
    img = _image(tmp_path, f"/ 0 40755 2 0 0 0 0.0 - - -\n"
                           f"/f 5 100644 1 0 0 0 0.0 {DIGEST[:2]}/{DIGEST[2:]} - {DIGEST} trusted.overlay.whiteout=\n"
                           f"/g 5 100644 1 0 0 0 0.0 some/where - - trusted.overlay.whiteout=\n".encode(), capsys)
    assert main(["composefs-info", "dump", str(img)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"/f 5 20644 1 0 0 0 0.0 {DIGEST[:2]}/{DIGEST[2:]} - {DIGEST}",
        "/g 5 20644 1 0 0 0 0.0 some/where - -"]


def test_missing_objects_relative_to_basedir_or_cwd(tmp_path, capsys, monkeypatch):
    img = _image(tmp_path, f"/ 0 40755 2 0 0 0 0.0 - - -\n"
                           f"/a 5 100644 1 0 0 0 0.0 {DIGEST[:2]}/{DIGEST[2:]} - {DIGEST}\n"
                           f"/b 5 100644 1 0 0 0 0.0 /abs/obj - -\n".encode(), capsys)
    store = tmp_path / "store"
    (store / "abs").mkdir(parents=True)
    (store / "abs" / "obj").write_bytes(b"12345")
    assert main(["composefs-info", "missing-objects", "--basedir", str(store), str(img)]) == 0
    assert capsys.readouterr().out == f"{DIGEST[:2]}/{DIGEST[2:]}\n"  # "/abs/obj" is inside the store
    monkeypatch.chdir(store)
    assert main(["composefs-info", "missing-objects", str(img)]) == 0  # no --basedir: the current directory
    assert capsys.readouterr().out == f"{DIGEST[:2]}/{DIGEST[2:]}\n"


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))


def test_a_failed_write_leaves_no_partial_image(tmp_path):
    """The image is written in pieces as it is built: when a write fails half way (here the
    file size limit; a full disk alike), the partial file is removed, and the error is one
    line. A destination that is not a regular file (/dev/full) is never removed."""
    shutil.copy(VECTORS / "bigdir3000.dump", tmp_path / "big.dump")
    r = subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "mkcomposefs", "--from-file", "big.dump", "out.cfs"],
                       cwd=tmp_path, capture_output=True, preexec_fn=_limit_file_size)
    assert r.returncode == 1 and r.stderr.decode() == "pycfs: error: cannot write out.cfs: File too large\n"
    assert not (tmp_path / "out.cfs").exists()
    r = pycfs(["mkcomposefs", "--from-file", "big.dump", "/dev/full"], tmp_path)
    assert r.returncode == 1 and b"No space left on device" in r.stderr and os.path.exists("/dev/full")
    assert os.listdir(tmp_path) == ["big.dump"]  # no temporary file left either


# mkcomposefs killed (SIGKILL: the OOM killer, a power cut) after the first piece of its image
_KILLED_MIDWAY = """
import os, signal, sys
from pycfs.tools.commands import erofs
from pycfs.tools.cli import main

real = erofs._ImageOutput.write
def write(self, piece):
    real(self, piece)
    if self.file is not None:
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
erofs._ImageOutput.write = write
main(["mkcomposefs", "--from-file", sys.argv[1], sys.argv[2]])
"""


def test_a_killed_write_leaves_the_previous_image(tmp_path):
    """The image is written under a temporary name and renamed when complete: killed half
    way, the previous image is still there, whole (it was truncated in place)."""
    before = (VECTORS / "nested5.cfs").read_bytes()
    (tmp_path / "out.cfs").write_bytes(before)
    r = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, str(VECTORS / "bigdir3000.dump"), "out.cfs"],
                       cwd=tmp_path, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    assert (tmp_path / "out.cfs").read_bytes() == before
    # what was written went to a temporary file beside it
    [temp] = [p for p in tmp_path.iterdir() if p.name != "out.cfs"]
    assert temp.name.startswith(".out.cfs.") and 0 < temp.stat().st_size < len((VECTORS / "bigdir3000.cfs").read_bytes())


def test_the_image_file_takes_the_mode_c_gives_and_replaces_a_symlinks_target(tmp_path):
    """A new image: 0666 less the umask (C's fopen); an existing one keeps its mode (C
    truncates it); through a symlink the target is replaced and the link stays."""
    old = os.umask(0o027)
    try:
        assert main(["mkcomposefs", "--from-file", str(VECTORS / "nested5.dump"), str(tmp_path / "new.cfs")]) == 0
        (tmp_path / "old.cfs").write_bytes(b"previous")
        os.chmod(tmp_path / "old.cfs", 0o604)
        assert main(["mkcomposefs", "--from-file", str(VECTORS / "nested5.dump"), str(tmp_path / "old.cfs")]) == 0
        os.symlink("old.cfs", tmp_path / "link.cfs")
        assert main(["mkcomposefs", "--from-file", str(VECTORS / "devices.dump"), str(tmp_path / "link.cfs")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "new.cfs").stat().st_mode & 0o7777 == 0o640
    assert (tmp_path / "old.cfs").stat().st_mode & 0o7777 == 0o604
    assert os.readlink(tmp_path / "link.cfs") == "old.cfs"
    assert (tmp_path / "old.cfs").read_bytes() == (VECTORS / "devices.cfs").read_bytes()
    assert (tmp_path / "new.cfs").read_bytes() == (VECTORS / "nested5.cfs").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["link.cfs", "new.cfs", "old.cfs"]


def test_an_image_with_other_names_or_in_a_closed_directory_is_written_in_place(tmp_path, monkeypatch, capsys):
    """Where a rename cannot stand for the write, the image is written in place as C does:
    a file with a second name (the rename parted them: the other kept the old image), and a
    writable file in a directory that takes no new name ("Permission denied" named the
    file, which C and pycfs before wrote)."""
    from pycfs.tools.commands import erofs

    (tmp_path / "a.cfs").write_bytes(b"previous")
    os.link(tmp_path / "a.cfs", tmp_path / "b.cfs")
    assert main(["mkcomposefs", "--from-file", str(VECTORS / "nested5.dump"), str(tmp_path / "a.cfs")]) == 0
    assert (tmp_path / "b.cfs").read_bytes() == (VECTORS / "nested5.cfs").read_bytes()
    os.unlink(tmp_path / "b.cfs")
    real = os.open

    def closed_directory(path, flags, *args, **kw):  # (as root, a 0555 directory would take it)
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(erofs.os, "open", closed_directory)
    assert main(["mkcomposefs", "--from-file", str(VECTORS / "devices.dump"), str(tmp_path / "a.cfs")]) == 0
    assert (tmp_path / "a.cfs").read_bytes() == (VECTORS / "devices.cfs").read_bytes()
    assert os.listdir(tmp_path) == ["a.cfs"]
    # a new file there: the directory's refusal
    assert main(["mkcomposefs", "--from-file", str(VECTORS / "devices.dump"), str(tmp_path / "new.cfs")]) == 1
    assert "Permission denied" in capsys.readouterr().err


def test_info_opens_only_a_regular_file_of_at_most_1_gib(tmp_path, capsys):
    """A fifo blocked the open, /dev/zero was read until MemoryError, a 3 GB (sparse) file
    was read whole before its size was checked; measure-file hung on a fifo alike."""
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "big.cfs", "wb") as f:
        f.truncate(3 << 30)
    cases = [
        (["ls", str(tmp_path / "fifo")], f"Failed to load '{tmp_path}/fifo': it is a fifo, not an image file"),
        (["dump", "/dev/zero"], "Failed to load '/dev/zero': it is a character device, not an image file"),
        (["objects", str(tmp_path)], f"Failed to load '{tmp_path}': it is a directory, not an image file"),
        (["ls", str(tmp_path / "big.cfs")],
         f"Failed to load '{tmp_path}/big.cfs': image of 3221225472 bytes exceeds the 1 GiB composefs limit"),
        (["ls", str(tmp_path / "none")], f"Failed to load '{tmp_path}/none': No such file or directory"),
        (["measure-file", str(tmp_path / "fifo")], f"Failed to measure '{tmp_path}/fifo': not a regular file"),
        (["measure-file", "/dev/zero"], "Failed to measure '/dev/zero': not a regular file"),
    ]
    for argv, message in cases:
        assert main(["composefs-info", *argv]) == 1
        assert capsys.readouterr().err == f"pycfs: error: {message}\n"


def test_a_strict_parse_of_a_pipe_reads_a_bounded_amount(tmp_path):
    """Strict mode reads a pipe whole (it checks the last newline first): at most 1 GiB (here
    lowered to 1000 bytes), then one line saying to give a file."""
    script = ("import sys\nfrom pycfs.tools.commands import erofs\nfrom pycfs.tools.cli import main\n"
              "erofs._PIPED_DUMPFILE_MAX = 1000\nsys.exit(main(sys.argv[1:]))\n")
    dump = (VECTORS / "mixed_rootfs.dump").read_bytes()
    assert len(dump) > 1000
    r = subprocess.run([sys.executable, "-c", script, "mkcomposefs", "--from-file", "-", "out.cfs"], cwd=tmp_path,
                       input=dump, capture_output=True, env={**os.environ, "CFS_PARSE_STRICT": "1"})
    assert r.returncode == 1
    assert r.stderr.decode() == ("pycfs: error: cannot read -: a strict parse (CFS_PARSE_STRICT=1) reads a pipe whole, "
                                 "and this one holds more than 1000 bytes: give the dumpfile as a file\n")
    assert os.listdir(tmp_path) == []
