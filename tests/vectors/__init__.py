"""The C reference vectors the byte-identity tests compare against (see PROVENANCE.md).

They live in the project so every clone checks the claim "byte-identical to C mkcomposefs";
a missing file is a test failure (FileNotFoundError), never a skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
C_VECTORS = HERE / "composefs-c"
C_EDGE = HERE / "composefs-c-edge"


def c_manifest() -> dict[str, Any]:
    """composefs-c/manifest.json: dumpfile_cases, directory_cases, should_fail, ..."""
    return json.loads((C_VECTORS / "manifest.json").read_text())


def edge_manifest() -> dict[str, dict[str, Any]]:
    """composefs-c-edge/manifest.json: case name -> c_exit, c_stderr, dump, [image, sha256]."""
    return json.loads((C_EDGE / "manifest.json").read_text())
