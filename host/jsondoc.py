"""Parsing JSON documents that must be objects, with errors that say which document."""

from __future__ import annotations

import json

from pycfs.host.errors import PycfsError


def parse_object(raw: bytes | str, what: str, error: type[PycfsError] = PycfsError) -> dict:
    """raw as a JSON object; otherwise `error` naming `what` (e.g. "manifest sha256:...")."""
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise error(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc
