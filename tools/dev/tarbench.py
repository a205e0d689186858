"""The per-entry CPU cost of parsing tar headers into layer entries, in isolation.

`python -m pycfs.tools.dev.tarbench [--layout DIR] [-n ENTRIES] [--reps N] [--profile]`

With --layout, the uncompressed layers of an OCI layout (say one `ocibuild.build_layout`
made of `bench.workload(1.0)`) are split into the pieces a layer stream holds (headers and
small files inline, a fake object id for each file over INLINE_CONTENT_MAX; the content is
skipped, not read) and fed 64 pieces at a time to `LayerEntryCollector`, as `oci copy` and
oci:DIR pulls do. Without it, ENTRIES synthetic entries in memory, plain ustar and with a
PAX mtime record each, through `TarReader.next` alone and through the collector. Prints
microseconds of process CPU an entry, best of --reps; --profile adds a cProfile listing.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path

from pycfs.host.oci.layer import INLINE_CONTENT_MAX, LayerEntryCollector
from pycfs.host.oci.tar import ZERO_BLOCK, TarEnd, TarReader, pax_entry, simple_entry

Pieces = list[bytes | tuple[bytes]]


def layer_pieces(path: Path) -> Pieces:
    """The pieces the splitter makes of a tar file, without reading any file's content."""
    pieces: Pieces = []
    inline = bytearray()
    with open(path, "rb") as f:
        reader = TarReader(f.read)
        while not isinstance(entry := reader.next(), TarEnd):
            inline += entry.raw
            if entry.is_regular() and entry.size > INLINE_CONTENT_MAX:
                pieces.append(bytes(inline))
                inline.clear()
                f.seek(entry.size, os.SEEK_CUR)
                reader.offset += entry.size
                pieces.append((os.urandom(32),))
                inline += reader.read_exact(entry.padded_size - entry.size)
            else:
                inline += reader.read_exact(entry.padded_size)
        inline += entry.raw + f.read()
    pieces.append(bytes(inline))
    return pieces


def layout_layers(layout: Path) -> list[Pieces]:
    def blob(digest: str) -> Path:
        return layout / "blobs" / digest.replace(":", "/")

    index = json.loads((layout / "index.json").read_bytes())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    return [layer_pieces(blob(layer["digest"])) for layer in manifest["layers"]]


def collect(layers: list[Pieces]) -> int:
    count = 0
    for pieces in layers:
        collector = LayerEntryCollector()
        for i in range(0, len(pieces), 64):
            collector.feed(pieces[i : i + 64])
        collector.close()
        if collector.entries is None:
            raise SystemExit("the layer does not parse")
        count += len(collector.entries)
    return count


def read_all(data: bytes) -> int:
    reader = TarReader(io.BytesIO(data).read)
    count = 0
    while not isinstance(entry := reader.next(), TarEnd):
        reader.read_exact(entry.padded_size)
        count += 1
    return count


def synthetic(entries: int, pax: bool) -> bytes:
    ext = pax_entry([(b"mtime", b"1700000000.123456789")]) if pax else b""
    return b"".join(ext + simple_entry(b"usr/lib/base/d%03d/f%05d" % (i % 300, i), mode=0o644)
                    for i in range(entries)) + ZERO_BLOCK * 2


def measure(label: str, run: Callable[[], int], reps: int, profile: bool) -> None:
    best, count = float("inf"), 0
    for _ in range(reps):
        start = time.process_time()
        count = run()
        best = min(best, time.process_time() - start)
    print(f"{label}: {count} entries, {best * 1e6 / count:.2f} us/entry ({best:.3f} CPU-s)")
    if profile:
        prof = cProfile.Profile()
        prof.runcall(run)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", type=Path, help="OCI layout with uncompressed layers")
    ap.add_argument("-n", "--entries", type=int, default=20_000, help="synthetic entries (without --layout)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.layout:
        layers = layout_layers(args.layout)
        measure("layers -> LayerEntryCollector", functools.partial(collect, layers), args.reps, args.profile)
        return
    for pax in (False, True):
        data = synthetic(args.entries, pax)
        kind = "PAX mtime" if pax else "plain ustar"
        measure(f"{kind}, TarReader.next", functools.partial(read_all, data), args.reps, args.profile)
        measure(f"{kind}, LayerEntryCollector", functools.partial(collect, [[data]]), args.reps, args.profile)


if __name__ == "__main__":
    main()
