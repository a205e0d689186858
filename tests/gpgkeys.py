"""Throwaway OpenPGP keys for signature tests, made by the real `gpg` in a private
GNUPGHOME: good ones, and ones made (with gpg's faked clock) ten days ago whose key or
signature has expired since, and ones revoked after signing."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

PAST = 10 * 86400  # how far back --faked-system-time goes for the expiring keys and signatures


def have_gpg() -> bool:
    return shutil.which("gpg") is not None and shutil.which("gpgv") is not None


class GpgHome:
    """A GNUPGHOME under `root`; `close` stops its gpg-agent."""

    def __init__(self, root: Path) -> None:
        self.home = root / "gnupg"
        self.home.mkdir(mode=0o700)
        self.root = root
        self.then = int(time.time()) - PAST

    def gpg(self, *args: str | Path, past: bool = False, input: bytes | None = None) -> bytes:
        faked = ("--faked-system-time", f"{self.then}!") if past else ()
        return subprocess.run(["gpg", "--homedir", self.home, "--batch", "--yes", *faked, *map(str, args)],
                              check=True, capture_output=True, input=input).stdout

    def make_key(self, name: str, expire: str = "never", past: bool = False) -> str:
        """A new ed25519 signing key `name <name@example.com>`; its fingerprint."""
        self.gpg("--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.com>", "ed25519", "sign", expire,
                 past=past)
        listing = self.gpg("--list-keys", "--with-colons", f"{name}@example.com").decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def revoke(self, fpr: str) -> None:
        """Import the revocation certificate gpg wrote when it made the key."""
        cert = (self.home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
        self.gpg("--import", input=cert.replace(":-----BEGIN", "-----BEGIN").encode())

    def export(self, name: str, *fprs: str, armor: bool = False) -> Path:
        """A keyring file `name` holding the public keys `fprs`."""
        path = self.root / name
        path.write_bytes(self.gpg("--export", *(("--armor",) if armor else ()), *fprs))
        return path

    def sign(self, fpr: str, data: bytes, past: bool = False, expire: str | None = None) -> bytes:
        """A detached binary signature over data (made ten days ago with `past`, valid for
        `expire`, e.g. "1d", from then)."""
        extra = ("--default-sig-expire", expire) if expire else ()
        return self.gpg("--local-user", fpr, *extra, "--detach-sign", "--output", "-", input=data, past=past)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "all"], check=False)
