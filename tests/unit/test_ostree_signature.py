"""Commit and summary signatures checked with the real gpgv against keys made by the real
gpg: only a good signature by a key neither revoked nor expired, itself unexpired,
counts (as `ostree pull` has it); each refusal says which of those it was."""

from __future__ import annotations

import pytest
from gpgkeys import GpgHome, have_gpg
from pycfs.host.ostree.objects import OstreeError
from pycfs.host.ostree.signature import refusal, verify_commit, verify_signed
from pycfs.protocol.gvariant import Variant, encode

pytestmark = pytest.mark.skipif(not have_gpg(), reason="gpg and gpgv are not installed (tools/setup.sh)")

DATA = b"the commit object's bytes"


def _detached(*sigs: bytes) -> bytes:
    return encode("a{sv}", [("ostree.gpgsigs", Variant("aay", list(sigs)))])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> (fingerprint's last 16 digits, a signature over DATA); and the keyring of all."""
    gpg = GpgHome(tmp_path_factory.mktemp("gpg"))
    try:
        good = gpg.make_key("good")
        revoked = gpg.make_key("revoked")
        expired = gpg.make_key("expired", expire="1d", past=True)
        old = gpg.make_key("old", past=True)
        unknown = gpg.make_key("unknown")
        sigs = {"good": (good, gpg.sign(good, DATA)),
                "revoked": (revoked, gpg.sign(revoked, DATA)),
                "expired-key": (expired, gpg.sign(expired, DATA, past=True)),
                "expired-sig": (old, gpg.sign(old, DATA, past=True, expire="1d")),
                "unknown": (unknown, gpg.sign(unknown, DATA))}
        gpg.revoke(revoked)
        yield {k: (f[-16:], s) for k, (f, s) in sigs.items()}, str(gpg.export("keyring.gpg", good, revoked, expired,
                                                                                 old))
    finally:
        gpg.close()


@pytest.mark.parametrize(("case", "why"), [
    ("revoked", "signed by key {key} (revoked <revoked@example.com>), which is revoked"),
    ("expired-key", "signed by key {key} (expired <expired@example.com>), which has expired"),
    ("expired-sig", "the signature by key {key} (old <old@example.com>) has expired"),
    ("unknown", "signed by key {key}, which is not in the keyring"),
])
def test_a_signature_that_does_not_count_is_refused_saying_why(keys, case, why):
    sigs, keyring = keys
    key, sig = sigs[case]
    expected = f"commit abc: no signature verifies with the keyring {keyring} ({why.format(key=key)})"
    with pytest.raises(OstreeError) as e:
        verify_commit(DATA, "abc", _detached(sig), keyring)
    assert str(e.value) == expected
    # the summary's path is the same check
    with pytest.raises(OstreeError) as e:
        verify_signed(DATA, "the summary of R", "R/summary.sig", _detached(sig), keyring)
    assert str(e.value) == expected.replace("commit abc", "the summary of R")


def test_a_good_signature_counts_among_refused_ones(keys):
    sigs, keyring = keys
    verify_commit(DATA, "abc", _detached(sigs["good"][1]), keyring)
    verify_commit(DATA, "abc", _detached(sigs["revoked"][1], sigs["expired-key"][1], sigs["good"][1]), keyring)
    key = sigs["good"][0]
    with pytest.raises(OstreeError) as e:
        verify_commit(DATA + b"!", "abc", _detached(sigs["good"][1]), keyring)
    assert str(e.value) == (f"commit abc: no signature verifies with the keyring {keyring} (bad signature by key "
                            f"{key} (good <good@example.com>) (the data or the signature was changed))")
    with pytest.raises(OstreeError) as e:
        verify_commit(DATA, "abc", _detached(sigs["revoked"][1], sigs["expired-sig"][1]), keyring)
    assert str(e.value).endswith(", which is revoked; the signature by key "
                                 f"{sigs['expired-sig'][0]} (old <old@example.com>) has expired)")


def test_status_lines_count_only_a_good_and_valid_signature():
    good = "[GNUPG:] GOODSIG 0123456789ABCDEF a <a@example.com>"
    valid = "[GNUPG:] VALIDSIG 89ABCDEF 2026-12-02 1796200554 0 4 0 1 10 00 89ABCDEF"
    assert refusal(f"[GNUPG:] NEWSIG\n{good}\n{valid}\n") is None
    assert refusal(f"{good}\n") == "gpgv reported no good signature"
    assert refusal(f"{valid}\n") == "gpgv reported no good signature"
    assert refusal("") == "gpgv reported no good signature"
    # a second signature packet in the same blob, refused, refuses the blob
    assert refusal(f"{good}\n{valid}\n[GNUPG:] EXPKEYSIG 0123 b\x1b[2J\n{valid}\n") == (
        "signed by key 0123 (b?[2J), which has expired")
    assert refusal("[GNUPG:] ERRSIG 0123 22 8 00 1796201085 4\n") == (
        "the signature by key 0123 cannot be checked (gpgv ERRSIG 22 8 00 1796201085 4)")
