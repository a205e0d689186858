"""A large, rootfs-like composefs dumpfile for timing `mkcomposefs --from-file`.

`python -m pycfs.tools.dev.gendump [-n ENTRIES] [--seed N] OUT` writes ENTRIES lines
(default 200,000): directories of 20-60 entries a few levels deep, regular files (most with
an external object and its digest, small ones inline, some empty), symlinks, a few devices,
fifos, whiteouts and hardlinks, SELinux labels on everything and a few other xattrs, mtimes
spread over a year. Deterministic for a seed; no content is needed to build the image.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys

from pycfs.host.dumpfile import escape

LABELS = [b"system_u:object_r:usr_t:s0", b"system_u:object_r:bin_t:s0", b"system_u:object_r:etc_t:s0",
          b"system_u:object_r:lib_t:s0"]


def generate(entries: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=system_u:object_r:root_t:s0\\x00\n"]
    dirs = [b""]  # paths of directories that may take more entries
    files: list[bytes] = []
    n = 1
    serial = 0
    while n < entries:
        parent = dirs[rng.randrange(len(dirs))]
        for _ in range(rng.randint(20, 60)):
            if n >= entries:
                break
            serial += 1
            path = parent + b"/%s-%d" % (rng.choice([b"lib", b"share", b"bin", b"doc", b"x", b"python3"]), serial)
            mtime = 1700000000 + rng.randrange(365 * 86400)
            label = rng.choice(LABELS)
            xattrs = b" security.selinux=" + label + b"\\x00"
            k = rng.random()
            if k < 0.12:
                line = b"%s 4096 40755 2 0 0 0 %d.0 - - -%s" % (path, mtime, xattrs)
                dirs.append(path)
            elif k < 0.80:
                size = rng.choice([0, rng.randint(1, 64), rng.randint(65, 1 << 16), rng.randint(1 << 16, 1 << 24)])
                mode = rng.choice([0o100644, 0o100644, 0o100755])
                if size == 0:
                    line = b"%s 0 %o 1 0 0 0 %d.0 - - -%s" % (path, mode, mtime, xattrs)
                elif size <= 64:
                    data = bytes(rng.randrange(32, 127) for _ in range(size))
                    line = b"%s %d %o 1 0 0 0 %d.0 - %s -%s" % (path, size, mode, mtime,
                                                             escape(data, lone_dash=True), xattrs)
                else:
                    d = hashlib.sha256(b"%d" % serial).hexdigest().encode()
                    line = b"%s %d %o 1 0 0 0 %d.%d %s/%s - %s%s" % (
                        path, size, mode, mtime, rng.randrange(10**9), d[:2], d[2:], d, xattrs)
                    if rng.random() < 0.02:
                        line += b" user.mime=text/plain"
                files.append(path)
            elif k < 0.95:
                target = b"../lib/" + b"t" * rng.randint(1, 40) if rng.random() < 0.5 else b"/usr/lib/x%d" % serial
                line = b"%s %d 120777 1 0 0 0 %d.0 %s - -%s" % (path, len(target), mtime, target, xattrs)
            elif k < 0.97 and files:
                line = b"%s 0 @100644 1 0 0 0 0.0 %s - -" % (path, rng.choice(files))
            elif k < 0.98:
                line = b"%s 0 20644 1 0 0 %d %d.0 - - -%s" % (path, rng.choice([0, 259, 1280]), mtime, xattrs)
            else:
                line = b"%s 0 10644 1 0 0 0 %d.0 - - -%s" % (path, mtime, xattrs)
            out.append(line + b"\n")
            n += 1
    return b"".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gendump", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output dumpfile ('-' = stdout)")
    ap.add_argument("-n", "--entries", type=int, default=200_000, help="lines to write (default 200000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = generate(args.entries, args.seed)
    if args.out == "-":
        sys.stdout.buffer.write(data)
    else:
        with open(args.out, "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
