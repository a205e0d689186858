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


@pytest.fixture(scope="module")
def armored(tmp_path_factory):
    """A key exported by gpg both ways, with a signature over DATA."""
    gpg = GpgHome(tmp_path_factory.mktemp("gpg"))
    try:
        fpr = gpg.make_key("armored")
        first = gpg.make_key("second")
        yield (gpg.export("key.gpg", fpr), gpg.export("key.asc", fpr, armor=True), gpg.sign(fpr, DATA),
               gpg.export("both.gpg", fpr, first), gpg.export("both.asc", fpr, first, armor=True))
    finally:
        gpg.close()


def test_an_armored_keyring_decodes_to_what_gpg_exports(armored):
    from pycfs.host.ostree.armor import crc24, dearmor, is_armored

    binary, text, _sig, both_binary, both_text = armored
    assert not is_armored(binary.read_bytes()) and is_armored(text.read_bytes())
    assert dearmor(text.read_bytes(), "k") == binary.read_bytes()
    assert dearmor(both_text.read_bytes(), "k") == both_binary.read_bytes()
    # CRLF lines, armor headers, text around it, two blocks, no checksum line
    lines = text.read_text().splitlines()
    header = lines.index("") if "" in lines else 1
    crlf = "\r\n".join([*lines[:header], "Comment: a comment", "Version: x", *lines[header:]]) + "\r\n"
    assert dearmor(f"text before\n{crlf}text after\n".encode(), "k") == binary.read_bytes()
    assert dearmor((crlf * 2).encode(), "k") == binary.read_bytes() * 2
    unchecked = "\n".join(line for line in lines if not (line.startswith("=") and len(line) == 5))
    assert dearmor(unchecked.encode(), "k") == binary.read_bytes()
    assert crc24(b"") == 0xB704CE and crc24(b"123456789") == 0x21CF02  # (the CRC-24/OPENPGP check value)


def test_a_damaged_or_foreign_armor_is_one_line_naming_the_keyring(armored, tmp_path):
    from pycfs.host.ostree.armor import dearmor

    text = armored[1].read_text()
    lines = text.splitlines()
    data_line = next(i for i, line in enumerate(lines) if len(line) > 40)
    flipped = lines[data_line][:10] + ("A" if lines[data_line][10] != "A" else "B") + lines[data_line][11:]
    damaged = "\n".join([*lines[:data_line], flipped, *lines[data_line + 1:]])
    for armor, why in ((damaged, r"checksum \([0-9A-F]{6}\) does not match its data \([0-9A-F]{6}\): the key was "
                                 r"damaged or changed$"),
                       (text.replace("-----END PGP PUBLIC KEY BLOCK-----", ""), "has no -----END PGP PUBLIC KEY BLOCK"),
                       (text.replace(lines[data_line], lines[data_line][:-1] + "!"), "is not valid base64$"),
                       (text.replace("PUBLIC KEY", "SIGNATURE"), "an armored 'PGP SIGNATURE BLOCK', not a PGP PUBLIC KEY BLOCK$"),
                       ("just text\n", "no -----BEGIN PGP PUBLIC KEY BLOCK----- line")):
        with pytest.raises(OstreeError, match=f"^GPG keyring K: .*{why}"):
            dearmor(armor.encode(), "GPG keyring K")
    # through verify_signed: the same line, before gpgv runs
    keyring = tmp_path / "damaged.asc"
    keyring.write_text(damaged)
    with pytest.raises(OstreeError, match=f"^GPG keyring {keyring}: the PGP PUBLIC KEY BLOCK's checksum"):
        verify_commit(DATA, "abc", _detached(armored[2]), str(keyring))


def test_an_armored_keyring_verifies_as_the_binary_one(armored):
    binary, text, sig, *_ = armored
    for keyring in (binary, text):
        verify_commit(DATA, "abc", _detached(sig), str(keyring))
        verify_signed(DATA, "the summary of R", "R/summary.sig", _detached(sig), str(keyring))
    with pytest.raises(OstreeError, match=r"\(bad signature by key"):
        verify_commit(DATA + b"!", "abc", _detached(sig), str(text))
