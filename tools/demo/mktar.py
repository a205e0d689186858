"""Write the demo image's root filesystem as a tar for `podman import`.

The tree under tools/demo/rootfs/ is shipped in git with ordinary modes; the restrictive
entries (which git cannot, or should not, store) are added here, so the demo exercises the
user-namespace helper:

- /etc/shadow, mode 0000 (and a hardlink to it)
- /home/demo, mode 0700, owned by container uid 1000, holding a 0600 file
- /var/lib/demo/blob.bin: generated data (default 16 MiB; deterministic) so the
  reflink/copy statistics have something to count; 0600, owned by uid 1000

Usage: python3 mktar.py OUTPUT.tar [--blob-mib N]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
from pathlib import Path

ROOTFS = Path(__file__).resolve().parent / "rootfs"
MTIME = 1_700_000_000


def _info(name: str, kind: bytes, mode: int, uid: int = 0, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.size, ti.mtime = kind, mode, uid, uid, size, MTIME
    return ti


def _dir(tf: tarfile.TarFile, name: str, mode: int = 0o755, uid: int = 0) -> None:
    tf.addfile(_info(name, tarfile.DIRTYPE, mode, uid))


def _file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> None:
    tf.addfile(_info(name, tarfile.REGTYPE, mode, uid, len(data)), io.BytesIO(data))


def write_demo_tar(out: Path, blob_mib: int) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        # Git keeps only the executable bit: normalise everything to root-owned 0644/0755.
        for path in sorted(ROOTFS.rglob("*")):
            name = path.relative_to(ROOTFS).as_posix()
            if path.is_dir():
                _dir(tf, name)
            elif path.is_file():
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                _file(tf, name, path.read_bytes(), mode)
        _file(tf, "etc/shadow", b"root:*:19000:0:99999:7:::\ndemo:!:19000:0:99999:7:::\n", 0o000)
        link = _info("etc/shadow-", tarfile.LNKTYPE, 0o000)
        link.linkname = "etc/shadow"
        tf.addfile(link)
        _dir(tf, "home")
        _dir(tf, "home/demo", 0o700, uid=1000)
        _file(tf, "home/demo/notes.txt",
              b"Only container uid 1000 can read this file; its directory is 0700.\n"
              b"An unprivileged importer needs the user-namespace helper to open it.\n", 0o600, uid=1000)
        for d in ("var", "var/lib"):
            _dir(tf, d)
        _dir(tf, "var/lib/demo", 0o700, uid=1000)
        rng = random.Random(2024)
        blob = rng.randbytes(blob_mib << 20)
        _file(tf, "var/lib/demo/blob.bin", blob, 0o600, uid=1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--blob-mib", type=int, default=16)
    args = ap.parse_args()
    write_demo_tar(args.output, args.blob_mib)


if __name__ == "__main__":
    main()
