"""The `pycfs` process's way out (`pycfs.tools.cli.run`): it skips the interpreter's teardown,
so what it printed must still all arrive, and its exit status must be main's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pycfs.host import __version__
from pycfs.tools.cli import main

CLI = [sys.executable, "-m", "pycfs.tools.cli"]


def _files(tmp_path: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        path = tmp_path / f"f{i:05d}"
        path.write_bytes(os.urandom(i % 7 * 1000))
        names.append(str(path))
    return names


def test_block_buffered_output_arrives_whole(tmp_path: Path, capsys) -> None:
    # stdout to a pipe is block-buffered: ~120 KB of digests leave only through the final flush.
    listing = tmp_path / "list"
    listing.write_text("\n".join(_files(tmp_path, 1500)) + "\n")
    assert main(["measure", "-j", "1", "--files-from", str(listing)]) == 0
    expected = capsys.readouterr().out
    done = subprocess.run([*CLI, "measure", "-j", "1", "--files-from", str(listing)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(expected) > 100_000
    assert done.stdout.decode() == expected
    assert done.stderr == b""


def test_statuses_are_mains(tmp_path: Path) -> None:
    version = subprocess.run([*CLI, "--version"], capture_output=True, timeout=60)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"pycfs {__version__}\n".encode(), b"")
    usage = subprocess.run([*CLI, "no-such-command"], capture_output=True, timeout=60)
    assert usage.returncode == 2 and b"invalid choice" in usage.stderr
    failed = subprocess.run([*CLI, "--repo", str(tmp_path / "none"), "fsck"], capture_output=True, timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.decode().startswith("pycfs: error: ") and failed.stderr.count(b"\n") == 1


def test_reader_that_leaves_is_not_an_error(tmp_path: Path) -> None:
    listing = tmp_path / "list"
    listing.write_text("\n".join(_files(tmp_path, 1500)) + "\n")
    proc = subprocess.Popen([*CLI, "measure", "-j", "1", "--files-from", str(listing)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in err and err == b""


def test_started_without_stdout_or_stderr() -> None:
    # Python then has None for sys.stdout / sys.stderr: nothing to flush, main's status kept.
    for closed in (">&-", "2>&-"):
        done = subprocess.run(["sh", "-c", 'exec "$@" ' + closed, "sh", *CLI, "--version"], capture_output=True,
                              timeout=60)
        assert done.returncode == 0, (closed, done.stderr)
        assert b"Traceback" not in done.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["--bogus"], "pycfs: error: unrecognized arguments: --bogus"),
    (["--repo=/r", "--bogus=1"], "pycfs: error: unrecognized arguments: --bogus=1"),
    (["oci", "--bogus"], "pycfs oci: error: unrecognized arguments: --bogus"),
    (["--repo", "/r"], "pycfs: error: the following arguments are required: COMMAND"),
    (["oci"], "pycfs oci: error: the following arguments are required: OCI_COMMAND"),
])
def test_usage_error_names_the_unknown_option(argv: list[str], said: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """argparse would report the missing sub-command even where an option it did not know was
    the mistake; the option is named."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == said
