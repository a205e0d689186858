"""Commit and summary signatures: the detached metadata (`objects/XX/REST.commitmeta`,
`summary.sig`, each an `a{sv}`) holds `ostree.gpgsigs`, a list of OpenPGP signatures over
the commit object's (the summary's) bytes. It is accepted when one of them verifies with
`gpgv` against the given keyring, by a key neither revoked nor expired, and has not expired
itself (as `ostree pull` requires).

gpgv runs with a private, empty GNUPGHOME (nothing of the user's keys or trust is used)
and a time limit. An ASCII-armored keyring (`.asc`) is decoded into a binary one there
first (gpgv reads binary keyrings only).
"""

from __future__ import annotations

import os

from pycfs.host.ostree.armor import dearmor, is_armored
from pycfs.host.ostree.objects import OstreeError
from pycfs.protocol.gvariant import GVariantError, decode

DETACHED_TYPE = "a{sv}"
GPGV_TIMEOUT = 60.0
MAX_DETACHED = 16 << 20
MAX_ARMORED_KEYRING = 64 << 20  # a distribution's keyring is some 100 KB
# Each signature is a gpgv run (of up to GPGV_TIMEOUT): a real commit carries one or two,
# and detached metadata listing thousands must not buy thousands of runs.
MAX_SIGNATURES = 16


def signatures(detached: bytes, where: str) -> list[bytes]:
    """``where`` names the detached metadata in errors (`object HEX.commitmeta`)."""
    try:
        entries = decode(DETACHED_TYPE, detached)
    except GVariantError as e:
        raise OstreeError(f"{where}: not valid detached metadata ({e})") from None
    for key, value in entries:
        if key == "ostree.gpgsigs" and value.type == "aay":
            return list(value.value)
    return []


def verify_commit(commit_data: bytes, commit_hex: str, detached: bytes | None, keyring: str) -> None:
    """OstreeError unless a signature on the commit verifies with a key of keyring."""
    verify_signed(commit_data, f"commit {commit_hex}", f"object {commit_hex}.commitmeta", detached, keyring)


def verify_signed(data: bytes, what: str, where: str, detached: bytes | None, keyring: str) -> None:
    """OstreeError unless a signature in ``detached`` (``where``: its name) on ``data``
    (``what``: its name) verifies with a key of keyring."""
    if not os.path.isfile(keyring):
        raise OstreeError(f"GPG keyring {keyring} is not a file")
    if detached is None:
        raise OstreeError(f"{what} is not signed ({where} is missing), but --gpg-keyring {keyring} asks for a signature")
    sigs = signatures(detached, where)
    if len(sigs) > MAX_SIGNATURES:
        raise OstreeError(f"{where} holds {len(sigs)} signatures, more than the {MAX_SIGNATURES} checked: refused")
    if not sigs:
        raise OstreeError(f"{what} is not signed ({where} holds no signatures), but --gpg-keyring {keyring} asks "
                          "for one")
    import subprocess  # here: a pull without a keyring (most) does without them (and shutil, ~2 ms)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pycfs-gpgv-") as tmp:
        os.chmod(tmp, 0o700)
        keyring_path = _binary_keyring(keyring, tmp)
        data_path = os.path.join(tmp, "data")
        with open(data_path, "wb") as f:
            f.write(data)
        reasons = []
        for i, sig in enumerate(sigs):
            sig_path = os.path.join(tmp, f"sig{i}")
            with open(sig_path, "wb") as f:
                f.write(sig)
            try:
                # --status-fd: gpgv exits 0 on a good signature by a revoked or expired key
                # too; the status lines say which it was
                proc = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", keyring_path, sig_path,
                                       data_path],
                                      capture_output=True, text=True, errors="replace", timeout=GPGV_TIMEOUT,
                                      env={**os.environ, "GNUPGHOME": tmp, "LC_ALL": "C"})
            except FileNotFoundError:
                raise OstreeError("gpgv is not installed: it checks signatures (apt-get install gpgv)") from None
            except subprocess.TimeoutExpired:
                raise OstreeError(f"gpgv took more than {GPGV_TIMEOUT:.0f} s to check {what}") from None
            refused = refusal(proc.stdout)
            if refused is None and proc.returncode == 0:
                return
            reasons.append(refused or (proc.stderr.strip().splitlines() or [f"gpgv exit status {proc.returncode}"])[-1])
    raise OstreeError(f"{what}: no signature verifies with the keyring {keyring} ({'; '.join(reasons)})")


def _binary_keyring(keyring: str, tmp: str) -> str:
    """The keyring as gpgv reads it: the file itself when it is binary, its packets
    written into tmp when it is ASCII-armored (as distributions ship keys)."""
    try:
        with open(keyring, "rb") as f:
            head = f.read(64)
            if not is_armored(head):
                return os.path.abspath(keyring)
            text = head + f.read(MAX_ARMORED_KEYRING + 1 - len(head))
    except OSError as e:
        raise OstreeError(f"GPG keyring {keyring}: {e.strerror}") from None
    if len(text) > MAX_ARMORED_KEYRING:
        raise OstreeError(f"GPG keyring {keyring}: an armored keyring of more than {MAX_ARMORED_KEYRING >> 20} MiB")
    path = os.path.join(tmp, "keyring.gpg")
    with open(path, "wb") as f:
        f.write(dearmor(text, f"GPG keyring {keyring}"))
    return path


# gpgv's status keywords for a signature that does not count, and what each means
_REFUSED = {
    "REVKEYSIG": "signed by key {key}, which is revoked",
    "EXPKEYSIG": "signed by key {key}, which has expired",
    "EXPSIG": "the signature by key {key} has expired",
    "BADSIG": "bad signature by key {key} (the data or the signature was changed)",
}


def refusal(status: str) -> str | None:
    """None when gpgv's status lines (``--status-fd``) show a good signature (GOODSIG and
    VALIDSIG) and nothing refused; else why it does not count, in a few words."""
    good = valid = False
    for line in status.splitlines():
        words = line.split(" ", 3)
        if len(words) < 3 or words[0] != "[GNUPG:]":
            continue
        keyword, key, rest = words[1], _printable(words[2]), _printable(words[3]) if len(words) > 3 else ""
        if keyword in _REFUSED:
            return _REFUSED[keyword].format(key=f"{key} ({rest})" if rest else key)
        if keyword == "ERRSIG":  # rest: pkalgo hashalgo class time rc [fingerprint]
            if rest.split(" ")[4:5] == ["9"]:
                return f"signed by key {key}, which is not in the keyring"
            return f"the signature by key {key} cannot be checked (gpgv ERRSIG {rest})"
        good = good or keyword == "GOODSIG"
        valid = valid or keyword == "VALIDSIG"
    return None if good and valid else "gpgv reported no good signature"


def _printable(text: str) -> str:
    """A name from the signature or keyring, as one line of visible characters."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
