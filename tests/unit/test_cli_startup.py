"""`--help`, `--version` and `oci images` start fast: they import no event loop, no rich, no helper client, no
transport and no importlib.metadata (goal: a no-op command under 0.15 s), and the CLI's helper option offers exactly HelperClient's policies."""

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from pycfs.host.helperclient import POLICIES
from pycfs.tools.common import add_helper_option


def _heavy_imports(argv: list) -> tuple[str, list[str]]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pycfs.tools.cli", *map(str, argv)],
                         capture_output=True, text=True, check=True, cwd="/")
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("trio", "rich")
                   or m in ("importlib.metadata", "pycfs.host.oci.cstorage", "pycfs.host.oci.layout", "pycfs.host.helperclient"))
    return out.stdout, heavy


@pytest.mark.parametrize("argv", [["--help"], ["oci", "--help"], ["oci", "pull", "--help"],
                                  ["oci", "images", "--help"], ["varlink", "serve", "--help"]])
def test_help_imports_no_event_loop(argv):
    out, heavy = _heavy_imports(argv)
    assert "usage:" in out
    assert heavy == []


def test_version_and_images_import_no_event_loop(tmp_path):
    """The other quick commands (the no-op re-pull has its own test in test_repull.py)."""
    out, heavy = _heavy_imports(["--version"])
    assert out == f"pycfs {importlib.metadata.version('pycfs')}\n" and heavy == []
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "pycfs.tools.cli", "--repo", repo, "init"], check=True, capture_output=True)
    out, heavy = _heavy_imports(["--repo", repo, "oci", "images", "--json"])
    assert out == '{\n  "images": []\n}\n' and heavy == []


def test_helper_option_offers_the_clients_policies():
    parser = argparse.ArgumentParser()
    add_helper_option(parser)
    (action,) = [a for a in parser._actions if a.dest == "helper"]
    assert tuple(action.choices) == POLICIES
    assert action.default in POLICIES


def test_oci_copy_imports_no_fsck_gc_or_mount():
    """A copy's varlink service serves Fsck, Gc and Mount but needs none of their code:
    those calls import it (~17 ms of start-up, before any layer moves)."""
    out = subprocess.run([sys.executable, "-c", "import sys, pycfs.host.oci.copy; print(sorted(m for m in sys.modules if m in "
                          "('pycfs.host.fsck', 'pycfs.host.gc', 'pycfs.host.mount', 'pycfs.host.erofs.reader')))"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout == "[]\n"
