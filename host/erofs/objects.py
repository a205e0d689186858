"""The repository objects an EROFS image refers to (for gc, fsck and missing-object checks)."""

from __future__ import annotations

from pycfs.host.erofs.reader import leaf_contents
from pycfs.host.fsverity import DIGEST_SIZES
from pycfs.host.tree import External, ExternalNoVerity


def image_object_ids(data: bytes, alg: str) -> set[bytes]:
    """Ids from metacopy digests, and from `XX/rest` redirects of files without a digest."""
    size = DIGEST_SIZES[alg]
    found: set[bytes] = set()
    for content in leaf_contents(data):  # (no tree made: gc and fsck read every image)
        if isinstance(content, External):
            found.add(content.id)
        elif isinstance(content, ExternalNoVerity):
            text = content.payload.decode("ascii", "replace")
            if len(text) == 2 * size + 1 and text[2] == "/":
                try:
                    found.add(bytes.fromhex(text[:2] + text[3:]))
                except ValueError:
                    pass
    return found
