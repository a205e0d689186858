"""pycfs.host.syscalls helpers not covered through the repository and helper tests."""

import os
import resource
import subprocess
import sys

import pytest

from pycfs.host import syscalls


def test_raise_open_file_limit_lifts_the_soft_limit_to_the_hard_one():
    # In a child: the test process's own limits stay as they are.
    code = ("import resource\n"
            "from pycfs.host.syscalls import raise_open_file_limit\n"
            "raise_open_file_limit()\n"
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/",
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    assert out.stdout.split() == [str(hard), str(hard)]


@pytest.mark.parametrize("empty_path", [True, False])
def test_link_fd_names_a_tmpfile_and_refuses_an_existing_name(tmp_path, monkeypatch, empty_path):
    """Both routes: linkat(AT_EMPTY_PATH), and /proc/self/fd where that needs a capability."""
    monkeypatch.setattr(syscalls, "_empty_path_link", empty_path)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"content")
        syscalls.link_fd(fd, d, "named")
        assert (tmp_path / "named").read_bytes() == b"content"
        with pytest.raises(FileExistsError):
            syscalls.link_fd(fd, d, "named")
    finally:
        os.close(fd)
        os.close(d)
