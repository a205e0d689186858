"""pycfs.host.syscalls helpers not covered through the repository and helper tests."""

import resource
import subprocess
import sys


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
