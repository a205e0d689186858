"""What the host and its object workers (`python -m pycfs.host.workers`) say to each other.

A worker hashes files the host passes as fds (jsonrpc-fdpass) and, when started on a
repository, stores each as an object (reflinked where the filesystem allows). Requests
carry ``sizes``, one per fd, in order; a store request may add ``crcs`` (the tar-split's
CRC-64/GO-ISO of each file, or null), ``sha256s`` (``[PREFIX, SHA256]`` in hex or null:
the SHA-256 of the prefix followed by the content, an ostree content checksum), checked on
the bytes stored before the object is named, and ``keep_leases`` (true: a file stored
under a read lease on the source keeps it, for a host that reads the content again; its
how code is then upper case). The result packs one answer per fd into a few
strings, as the host's framing scans JSON token by token:

    {"ids": HEX,          # the digests, back to back (zeros for a failed file)
     "how": "rcp=-",      # per file: HOW codes below
     "failed": [[INDEX, ERRNO, MESSAGE], ...]}   # the host names the file
"""

from __future__ import annotations

STORE = "store"
DIGEST = "digest"
# Digest only, of files named by absolute ``paths`` (no fds, no sizes): the worker opens
# each itself (regular files only), so a host measuring many files does no per-file work.
DIGEST_PATHS = "digest_paths"
# Files the host wrote itself (a layer blob's content) as anonymous files in the object
# store, passed read-only with no writer left: the worker hashes each and links it as its
# object, so content is written once and hashed off the host's thread.
ADOPT = "adopt"

# A layer blob (fds: the blob, then the write end of a pipe; params: ``compression``
# gzip|zstd|none, ``blob_alg`` and ``diff_alg`` sha256|sha512): the worker reads and hashes
# the blob, decompresses it and writes the tar to the pipe, hashing it too, then closes the
# pipe and answers {"blob": DIGEST, "blob_size": N, "diff_id": DIGEST, "tar_size": N} or
# {"failed": MESSAGE}. The host splits the tar as it comes, on a core of its own.
INFLATE = "inflate"

HOW = {"r": "reflinked", "c": "copied", "p": "present"}  # store; "=" digest only, "-" failed
HOW_CODES = {v: k for k, v in HOW.items()}
LEASE_KEPT = {"R", "P"}  # reflinked / present, the source's read lease left in place
DIGESTED = "="
FAILED = "-"

MAX_FILES_PER_REQUEST = 256
MAX_MESSAGE_BYTES = 1 << 20  # 256 sha512 digests in hex take 32 KiB; failures add messages
