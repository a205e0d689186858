"""The `pycfs` process's way out (`pycfs.tools.cli.run`): it skips the interpreter's teardown,
so what it printed must still all arrive, and its exit status must be main's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pycfs.host import __version__
from pycfs.tools import cli
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


def test_stdout_reader_that_leaves_ends_with_141(tmp_path: Path) -> None:
    """`pycfs measure ... | head -c 10`: no line on stderr, and not success either (the work
    was cut short): the status of a SIGPIPE death, as a shell reports it."""
    listing = tmp_path / "list"
    listing.write_text("\n".join(_files(tmp_path, 1500)) + "\n")
    proc = subprocess.Popen([*CLI, "measure", "-j", "1", "--files-from", str(listing)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == b""


def _corrupt_repo(tmp_path: Path, count: int) -> Path:
    """A repository holding `count` objects whose content is not what their names say."""
    repo = tmp_path / "repo"
    subprocess.run([*CLI, "--repo", str(repo), "init"], check=True, capture_output=True, timeout=60)
    for i in range(count):
        name = f"{i:064x}"
        (repo / "objects" / name[:2]).mkdir(parents=True, exist_ok=True)
        (repo / "objects" / name[:2] / name[2:]).write_bytes(b"garbage")
    return repo


def _reader_gone(argv: list[str], fd: int) -> subprocess.CompletedProcess:
    """Run the CLI with fd (1 or 2) a pipe whose reader left before it started (the other
    of the two captured)."""
    r, w = os.pipe()
    os.close(r)
    try:
        if fd == 1:
            return subprocess.run([*CLI, *argv], stdout=w, stderr=subprocess.PIPE, timeout=120)
        return subprocess.run([*CLI, *argv], stdout=subprocess.PIPE, stderr=w, timeout=120)
    finally:
        os.close(w)


def test_stdout_reader_that_leaves_keeps_a_failing_status(tmp_path: Path) -> None:
    """`pycfs fsck | head -1` on a damaged repository: the report is cut short, the status
    still says the repository is damaged (it was 0: EPIPE counted as success)."""
    repo = _corrupt_repo(tmp_path, 300)  # a report well past stdout's buffer
    done = _reader_gone(["--repo", str(repo), "fsck", "--progress", "none"], 1)
    assert (done.returncode, done.stderr) == (1, b"")


def test_stderr_reader_that_leaves_loses_the_notes_not_the_work(tmp_path: Path) -> None:
    """Progress on a stderr nobody reads any more: the work goes on, its result and status
    are the command's (fsck stopped at its first progress line, and exited 0)."""
    repo = _corrupt_repo(tmp_path, 3)
    done = _reader_gone(["--repo", str(repo), "fsck", "--progress", "plain"], 2)
    assert done.returncode == 1
    assert done.stdout.startswith(b"objects: 3 checked") and b"status: 3 error(s)" in done.stdout, done.stdout
    shutil.rmtree(repo / "objects")
    done = _reader_gone(["--repo", str(repo), "fsck", "--progress", "plain"], 2)
    assert done.returncode == 0 and done.stdout.startswith(b"objects: 0 checked"), done.stdout


def _closed(redirect: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", *CLI, *argv], capture_output=True, timeout=60)


def test_closed_stdout_fails_in_one_line(tmp_path: Path) -> None:
    """Python leaves sys.stdout None: commands failed with "internal error: AttributeError",
    or printed into nothing and exited 0."""
    for argv in (["--version"], ["--repo", str(tmp_path / "none"), "oci", "images", "--json"]):
        done = _closed(">&-", argv)
        assert (done.returncode, done.stderr.decode()) == (
            1, "pycfs: error: standard output is closed: give the command one (e.g. >/dev/null to drop what it prints)\n")


def test_started_without_stderr() -> None:
    done = _closed("2>&-", ["--version"])
    assert (done.returncode, done.stdout) == (0, f"pycfs {__version__}\n".encode())


def test_closed_stdin_and_stderr_are_dev_null(tmp_path: Path) -> None:
    """A closed fd 0 reads as empty (it was "internal error: AttributeError"), and with 0 and
    2 closed a command's own files do not land there (the report still arrives whole)."""
    done = _closed("<&-", ["measure", "--files-from", "-"])
    assert (done.returncode, done.stderr) == (1, b"pycfs: error: no files to measure: name them, or pass --files-from LIST\n")
    repo = _corrupt_repo(tmp_path, 2)
    done = _closed("<&- 2>&-", ["--repo", str(repo), "fsck", "--progress", "plain"])
    assert done.returncode == 1
    assert done.stdout.startswith(b"objects: 2 checked") and b"status: 2 error(s)" in done.stdout, done.stdout


def test_full_stdout_is_named(tmp_path: Path) -> None:
    """`pycfs --version >/dev/full` was a traceback, `fsck >/dev/full` blamed the repository's
    disk (`pycfs gc`)."""
    subprocess.run([*CLI, "--repo", str(tmp_path / "repo"), "init"], check=True, capture_output=True, timeout=60)
    for argv in (["--version"], ["--repo", str(tmp_path / "repo"), "fsck", "--progress", "none"], ["--help"]):
        with open("/dev/full", "wb") as full:
            done = subprocess.run([*CLI, *argv], stdout=full, stderr=subprocess.PIPE, timeout=60)
        assert (done.returncode, done.stderr.decode()) == (
            1, "pycfs: error: cannot write to standard output: No space left on device\n"), argv


def test_interrupt_while_the_command_line_is_parsed(monkeypatch, capsys) -> None:
    """Ctrl-C before the command runs (argparse, the command's imports) was a traceback."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["--version"]) == 130
    assert capsys.readouterr().err == "pycfs: interrupted\n"


def test_interrupt_at_start_up(tmp_path: Path) -> None:
    """Ctrl-C from the moment pycfs runs (it handles SIGTERM: its first step) to the
    command's failure: one line and 130, never a traceback (argparse's was)."""
    for delay in (0, 0.01, 0.03, 0.06, 0.1):
        proc = subprocess.Popen([*CLI, "--repo", str(tmp_path / "none"), "oci", "pull", f"oci:{tmp_path}", "x"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _handles_sigterm(proc.pid)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert (proc.returncode, err) == (130, b"pycfs: interrupted\n") or (
            proc.returncode == 1 and err.startswith(b"pycfs: error: no repository")), (delay, proc.returncode, err)


def _handles_sigterm(pid: int) -> None:
    """Wait until the process has its SIGTERM handler (the CLI's first step)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text(), re.M)
        if caught and int(caught.group(1), 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("no SIGTERM handler")


def test_sigterm_unwinds_as_ctrl_c() -> None:
    """SIGTERM (kill, systemd, a timeout) ends a command as Ctrl-C does, with one line and
    its cleanup run (it was the default death, without either); then it dies of SIGTERM
    (a shell's 143, and a clean stop for systemd)."""
    proc = subprocess.Popen([*CLI, "measure", "--files-from", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _handles_sigterm(proc.pid)
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (-signal.SIGTERM, b"", b"pycfs: terminated\n")


def test_sigterm_leaves_no_copies_in_a_digest_store(tmp_path: Path) -> None:
    """mkcomposefs --digest-store killed with SIGTERM left its .tmpXXXX copies in the store."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(400):
        (tree / f"f{i:04d}").write_bytes(os.urandom(64 << 10))
    store = tmp_path / "store"
    store.mkdir()
    proc = subprocess.Popen([*CLI, "mkcomposefs", "--digest-store", str(store), str(tree), str(tmp_path / "out.img")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(n.startswith(".tmp") for n in os.listdir(store)):
        assert proc.poll() is None and time.monotonic() < deadline, "no copy seen in the store"
        time.sleep(0.001)
    proc.terminate()
    err = proc.communicate(timeout=60)[1]
    assert (proc.returncode, err) == (-signal.SIGTERM, b"pycfs: terminated\n")
    assert [n for n in os.listdir(store) if n.startswith(".tmp")] == []
    assert not (tmp_path / "out.img").exists()


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
