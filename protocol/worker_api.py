"""What the host and its object workers (`python -m pycfs.host.workers`) say to each other.

A worker hashes files the host passes as fds (jsonrpc-fdpass) and, when started on a
repository, stores each as an object (reflinked where the filesystem allows). Requests
carry ``sizes``, one per fd, in order; the response has one result per fd:
``{"id": HEX, "how": "reflinked"|"copied"|"present"}`` (store), ``{"id": HEX}`` (digest), or
``{"errno": N, "message": TEXT}`` when that one file failed (the host names the file).
"""

from __future__ import annotations

PROTOCOL_VERSION = 1

HELLO = "hello"
STORE = "store"
DIGEST = "digest"

MAX_FILES_PER_REQUEST = 256
MAX_MESSAGE_BYTES = 1 << 20  # 256 results of about 110 bytes, with a wide margin
