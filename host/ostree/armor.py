"""OpenPGP ASCII armor (RFC 4880 section 6), for keyrings as distributions ship them
(`gpg --export --armor`, `.asc`): gpgv reads binary keyrings only, so an armored one is
decoded into the binary packets it carries.

A block is `-----BEGIN PGP PUBLIC KEY BLOCK-----`, armor headers (`Key: value`) up to an
empty line, base64 lines, an optional checksum line `=XXXX` (the CRC-24 of the decoded
data, base64), and `-----END PGP PUBLIC KEY BLOCK-----`. A file may hold several blocks
(text around them is ignored, as gpg ignores it); their packets are concatenated.
"""

from __future__ import annotations

import base64
import binascii
import functools

from pycfs.host.ostree.objects import OstreeError

KEY_BLOCK = "PGP PUBLIC KEY BLOCK"
_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB


def is_armored(head: bytes) -> bool:
    """Whether a file starting with these bytes is armored: a binary keyring starts with a
    packet tag, which has its top bit set; armor starts with `-----BEGIN`."""
    return head.lstrip().startswith(b"-----BEGIN ")


def crc24(data: bytes) -> int:
    """RFC 4880 section 6.1, a byte at a time through a table (a distribution's keyring is
    some 100 KB)."""
    table = _crc24_table()
    crc = _CRC24_INIT
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ table[(crc >> 16) ^ byte]
    return crc


@functools.cache
def _crc24_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
        table.append(crc & 0xFFFFFF)
    return tuple(table)


def dearmor(text: bytes, where: str) -> bytes:
    """The binary packets of every public key block in text; OstreeError naming `where`
    for anything else: no block, another kind of block, one not closed, bad base64, or a
    checksum line that does not match."""
    lines = text.decode("ascii", "replace").splitlines()
    out = bytearray()
    blocks = 0
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line.startswith("-----BEGIN ") or not line.endswith("-----"):
            continue
        kind = line[len("-----BEGIN "):-len("-----")]
        if kind != KEY_BLOCK:
            raise OstreeError(f"{where}: an armored {kind[:40]!r}, not a {KEY_BLOCK}")
        i, data = _block(lines, i, where)
        out += data
        blocks += 1
    if not blocks:
        raise OstreeError(f"{where}: no -----BEGIN {KEY_BLOCK}----- line: not an armored key")
    return bytes(out)


def _block(lines: list[str], i: int, where: str) -> tuple[int, bytes]:
    """The data of the block whose BEGIN line came before lines[i], and the line after its
    END line."""
    # armor headers (`Version: ...`, `Comment: ...`) end at the first empty line
    start = i
    while i < len(lines) and lines[i].strip():
        if ":" not in lines[i]:
            i = start  # no headers and no empty line: the data starts at once
            break
        i += 1
    body: list[str] = []
    checksum: str | None = None
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if line == f"-----END {KEY_BLOCK}-----":
            break
        if not line:
            continue
        if checksum is not None:
            raise OstreeError(f"{where}: armor data after its checksum line")
        if line.startswith("=") and len(line) == 5:
            checksum = line[1:]
        else:
            body.append(line)
    else:
        raise OstreeError(f"{where}: the {KEY_BLOCK} has no -----END {KEY_BLOCK}----- line")
    try:
        data = base64.b64decode("".join(body), validate=True)
        expected = None if checksum is None else int.from_bytes(base64.b64decode(checksum, validate=True))
    except (binascii.Error, ValueError):
        raise OstreeError(f"{where}: the {KEY_BLOCK} is not valid base64") from None
    if expected is not None and crc24(data) != expected:
        raise OstreeError(f"{where}: the {KEY_BLOCK}'s checksum ({expected:06X}) does not match its data "
                          f"({crc24(data):06X}): the key was damaged or changed")
    return i, data
