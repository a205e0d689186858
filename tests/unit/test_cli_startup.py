"""`--help` starts fast: it imports no event loop, no helper client and no transport (goal: a no-op command
under 0.15 s), and the CLI's helper option offers exactly HelperClient's policies."""

import argparse
import subprocess
import sys

import pytest

from pycfs.host.helperclient import POLICIES
from pycfs.tools.common import add_helper_option


@pytest.mark.parametrize("argv", [["--help"], ["oci", "--help"], ["oci", "pull", "--help"],
                                  ["oci", "images", "--help"], ["varlink", "serve", "--help"]])
def test_help_imports_no_event_loop(argv):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pycfs.tools.cli", *argv],
                         capture_output=True, text=True, check=True, cwd="/")
    assert "usage:" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    heavy = sorted(m for m in imported if m.split(".")[0] == "trio"
                   or m in ("pycfs.host.oci.cstorage", "pycfs.host.oci.layout", "pycfs.host.helperclient"))
    assert heavy == []


def test_helper_option_offers_the_clients_policies():
    parser = argparse.ArgumentParser()
    add_helper_option(parser)
    (action,) = [a for a in parser._actions if a.dest == "helper"]
    assert tuple(action.choices) == POLICIES
    assert action.default in POLICIES
