"""Import benchmark: pycfs against the same work done by C tools no one here wrote, in the same run.

Run as root on Debian (`tools/bench`, which runs the set-up first). It makes its own lab:
a loop-mounted XFS with reflinks, an unprivileged user whose containers-storage and
repositories live there, and a generated multi-layer image of about 1.5 GB (--scale) loaded
into that storage. Every row is measured with a warm page cache (its inputs read just before)
and cold (`echo 3 > /proc/sys/vm/drop_caches` just before), each the median of --runs:

  a    pycfs oci pull containers-storage:IMAGE into an empty repository
  a'   the same with --no-image: the import alone, without the EROFS image
  e    warm re-pull (everything already in the repository)
  b    fs-verity hashing of exactly the files the pull stores with pycfs's code
       (`pycfs measure`: its object worker processes, one per core)
  Lh   the reference for hashing: Debian's `fsverity digest` over the same files, one
       process per core (b')
  Lc   the reference for cloning: GNU `cp -a --reflink=always` of the image's layer
       directories into a fresh directory on the same XFS (one process)
  c    what a user without pycfs does: podman save --format oci-dir + pycfs oci pull oci:DIR
  o/t  pycfs oci pull oci:DIR of the image with gzip (zstd) layers, against GNU `tar -xf`
       of the same layer blobs plus `fsverity digest` of the extracted files; s: the `sync`
       after it (the pull makes its writes durable, tar does not)
  u/u' `pycfs --help` and `pycfs --version` (start-up)
  d    C mkcomposefs --digest-store over the merged rootfs (when installed)
  f    reading every file the user may read through the kernel's EROFS+overlay mount (made by
       root), f' through the user's rootless FUSE mount; g, g' `find -ls` over each
  o1-4 ostree: a tree (--ostree-tree) committed into an archive repository served over HTTP on
       127.0.0.1 and into a bare one: `pycfs ostree pull` / `ostree pull`, `pycfs ostree
       pull-local` / `ostree pull-local`
  h    pycfs oci copy --zerocopy of the pulled image into an empty repository on the same XFS
       (in process); h': through a `pycfs varlink serve` process; h'': `cp -a --reflink=always`
       of the source repository's objects/

L = Lh + Lc is the essential work of a pull done by C tools; the goals are ratios to it
(a parallel importer can overlap hashing and cloning, so beating L is possible).

--scaling runs rows a, a', b and Lh for several images (--scale 0.25, 1, 4 and one of
200,000 small files by default) and prints time per byte and per file and peak RSS, with
a PNG plot next to --json when matplotlib (the `bench` extra) is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pycfs.host.oci.result import human_size
from pycfs.tools.dev import lab
from pycfs.tools.dev.ocibuild import MIB, Dir, File, Hardlink, ImageSpec, Symlink, build_layout, load_into_storage

# PYCFS_BENCH_USER: another name lets a benchmark of an older checkout (which does not take
# the bench lock) run beside this one without the two reconfiguring one user.
USER = os.environ.get("PYCFS_BENCH_USER", "pycfs-bench")
IMAGE = "localhost/pycfs-bench:latest"
SMALL_FILES = 200_000
DEFAULT_SCALING = "0.25,1,4,200k"
COMPRESSIONS = ("gzip", "zstd")


# ---------------------------------------------------------------------------------------
# The workloads


def workload(scale: float) -> ImageSpec:
    """Three layers shaped like a Debian image: a minbase-like rootfs, a layer of language
    runtimes and tools, and a data layer with big random files, many small files and
    files only container users may read. Content is seeded random (incompressible, no
    accidental dedup); sizes follow a fixed pseudo-random draw."""
    rng = random.Random(1)
    seed = iter(range(10_000_000))

    def tree(prefix: str, dirs: int, files: int, sizes: list[tuple[float, int, int]]) -> list:
        entries: list = [Dir(prefix)] + [Dir(f"{prefix}/d{i:03d}") for i in range(dirs)]
        for i in range(files):
            r, lo, hi = rng.random(), 0, 0
            for share, lo, hi in sizes:  # noqa: B007 (lo, hi are used after the loop)
                if r < share:
                    break
                r -= share
            entries.append(File(f"{prefix}/d{i % dirs:03d}/f{i:05d}", size=rng.randint(lo, hi), seed=next(seed)))
        return entries

    n = lambda count: max(1, int(count * scale))
    # (share of files, min size, max size): means of about 54 KB and 140 KB
    rootfs_sizes = [(0.5, 0, 4096), (0.4, 4097, 65536), (0.095, 65537, 512 << 10), (0.005, 512 << 10, 4 << 20)]
    tool_sizes = [(0.45, 0, 4096), (0.4, 4097, 65536), (0.14, 65537, 1 << 20), (0.01, 1 << 20, 8 << 20)]
    base = [Dir("usr"), Dir("usr/lib"), Dir("etc"), Dir("var"), Dir("run")]
    base += tree("usr/lib/base", n(300), n(6000), rootfs_sizes)
    base += tree("etc/conf", 20, n(600), [(1.0, 10, 3000)])
    base += [Symlink(f"usr/lib/base/link{i}", f"d{i % 7:03d}/f{i:05d}") for i in range(n(400))]
    base += [Hardlink(f"usr/lib/base/hard{i}", f"usr/lib/base/d{i % n(300):03d}/f{i:05d}") for i in range(n(50))]
    tools = tree("usr/lib/tools", n(400), n(7000), tool_sizes)
    data: list = [Dir("srv"), Dir("srv/big"), Dir("home"),
                  Dir("home/user", mode=0o700, uid=1000, gid=1000), Dir("srv/locked", mode=0o000)]
    data += [File(f"srv/big/random{i}.bin", size=int(50 * MIB * scale), seed=next(seed)) for i in range(3)]
    data += tree("srv/small", n(50), n(5000), [(0.3, 0, 64), (0.7, 65, 4096)])
    data += [File(f"home/user/secret{i}", size=rng.randint(100, 2 << 20), seed=next(seed), mode=0o600,
                  uid=1000, gid=1000) for i in range(n(40))]
    data += [File(f"srv/locked/ro{i}", size=rng.randint(100, 1 << 20), seed=next(seed), mode=0o400)
             for i in range(n(20))]
    data.append(File("etc/shadow-big", size=int(10 * MIB * scale), seed=next(seed), mode=0o000))
    return ImageSpec([base, tools, data], config={"Labels": {"pycfs.bench": "1"}}, gzip=False)


def small_files_workload(count: int) -> ImageSpec:
    """`count` small files (0-8 KiB, mean 4 KiB) in two layers of 500-file directories: the
    per-file cost, with little data."""
    rng = random.Random(2)
    layers: list[list] = []
    per_layer = count // 2
    for layer in range(2):
        entries: list = [Dir(f"l{layer}")] + [Dir(f"l{layer}/d{i:04d}") for i in range(per_layer // 500 + 1)]
        entries += [File(f"l{layer}/d{i // 500:04d}/f{i:06d}", size=rng.randint(0, 8192), seed=layer * count + i)
                    for i in range(per_layer)]
        layers.append(entries)
    return ImageSpec(layers, config={"Labels": {"pycfs.bench": "small"}}, gzip=False)


def image_file_bytes(spec: ImageSpec) -> int:
    return sum(e.length for layer in spec.layers for e in layer if isinstance(e, File))


@dataclass(frozen=True)
class Workload:
    name: str  # "1", "0.25", "200k"
    spec: Callable[[], ImageSpec]


def parse_workload(text: str) -> Workload:
    if text.endswith("k") and text[:-1].isdigit():
        count = int(text[:-1]) * 1000
        return Workload(text, lambda: small_files_workload(count))
    try:
        scale = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a scale factor (e.g. 0.25) or a count of small files "
                                         f"in thousands (e.g. 200k)") from None
    return Workload(text, lambda: workload(scale))


# ---------------------------------------------------------------------------------------
# Measuring


@dataclass
class Sample:
    seconds: float
    maxrss_kib: int


@dataclass
class Row:
    key: str
    title: str
    warm: list[Sample] = field(default_factory=list)
    cold: list[Sample] = field(default_factory=list)
    disk_added: int | None = None
    note: str = ""

    def samples(self, cold: bool) -> list[Sample]:
        return self.cold if cold else self.warm

    def median(self, cold: bool = False) -> float | None:
        s = self.samples(cold)
        return statistics.median(x.seconds for x in s) if s else None

    def peak_rss(self) -> int | None:
        s = self.warm + self.cold
        return max(x.maxrss_kib for x in s) * 1024 if s else None

    def as_json(self) -> dict:
        return {"title": self.title, "warm": [s.seconds for s in self.warm], "cold": [s.seconds for s in self.cold],
                "median_warm": self.median(False), "median_cold": self.median(True), "peak_rss": self.peak_rss(),
                "disk_added": self.disk_added, "note": self.note}


def timed(argv: list, user: lab.PodmanUser | None = None, cwd: str = "/") -> tuple[Sample, bytes]:
    """Run argv (as user when given); wall time, and the peak RSS of the largest process in
    its tree as GNU time reports it (measured from a small process, so the benchmark's own
    memory, which a fork from Python would carry until exec, does not count)."""
    env = os.environ.copy()
    if user is not None:
        env, cwd = user.environ(), str(user.home)
    with tempfile.NamedTemporaryFile("r") as rss:
        argv = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name, *argv]
        if user is not None:
            argv = ["runuser", "-u", user.name, "--", *argv]
            os.chmod(rss.name, 0o666)
        started = time.perf_counter()
        p = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        if p.returncode != 0:
            raise lab.LabError(p.returncode, argv, p.stdout, p.stderr)
        return Sample(seconds, int(rss.read().split()[-1])), p.stdout


def used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def read_all(paths: list[str]) -> None:
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------------------------------
# The lab


@dataclass
class Lab:
    xfs: Path
    user: lab.PodmanUser
    image_bytes: int
    layers: list[Path]  # the image's layer directories in containers-storage, bottom first
    files: list[str]  # regular files > 64 bytes in them: what a pull stores
    file_bytes: int
    layouts: dict[str, Path] = field(default_factory=dict)  # compression -> OCI layout on the XFS
    listing: Path = Path()

    def cache(self, cold: bool, inputs: list[str] | None = None) -> None:
        """Before a timed run: drop every cache, or read the run's inputs once."""
        if cold:
            drop_caches()
        else:
            read_all(self.files if inputs is None else inputs)


def set_up(load: Workload, layouts: bool) -> Lab:
    for tool in ("podman", "skopeo", "mkfs.xfs", "runuser", "fsverity", "/usr/bin/time", "tar", "cp"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing: run tools/setup.sh as root first")
    with lab.locked("sweep"):
        lab.sweep_stale()
    spec = load.spec()
    image_bytes = image_file_bytes(spec)
    print(f"bench: making the lab (loop XFS, user, venv) for image {load.name}...", file=sys.stderr)
    # Sparse: room for the storage, the compressed layouts and what the rows write.
    xfs = lab.mount_xfs("bench", max(16 << 30, 6 * image_bytes))
    try:
        return _populate(xfs, spec, image_bytes, layouts)
    except BaseException:
        lab.restart_pause(USER)
        lab.unmount_xfs(xfs)
        raise


def _populate(xfs: Path, spec: ImageSpec, image_bytes: int, layouts: bool) -> Lab:
    # A copy of the venv in the lab: other sessions' sweeps keep only the newest shared venv
    # and removed this one's in the middle of a run.
    venv = xfs / "venv"
    shutil.copytree(lab.build_user_venv().parent.parent, venv, symlinks=True)
    user = lab.user_on(xfs, USER, venv / "bin" / "python")
    print(f"bench: building the image ({human_size(image_bytes)} in files) and loading it into "
          f"{USER}'s containers-storage...", file=sys.stderr)
    layout = Path(tempfile.mkdtemp(prefix="bench-layout-", dir=lab.LAB_ROOT))
    os.chmod(layout, 0o755)
    compressed = {}
    try:
        build_layout(spec, layout / "oci")
        load_into_storage(user, layout / "oci", IMAGE)
        for comp in COMPRESSIONS if layouts else ():
            print(f"bench: making the {comp} layout...", file=sys.stderr)
            compressed[comp] = xfs / f"layout-{comp}"
            lab.run_root(["skopeo", "copy", "--quiet", "--dest-compress", "--dest-compress-format", comp,
                          f"oci:{layout / 'oci'}", f"oci:{compressed[comp]}"])
            subprocess.run(["chmod", "-R", "a+rX", compressed[comp]], check=True)
    finally:
        shutil.rmtree(layout)
    layers = layer_dirs(user)
    files = stored_files(layers)
    listing = xfs / "files.list"
    listing.write_text("\n".join(files) + "\n")
    return Lab(xfs, user, image_bytes, layers, files, sum(os.path.getsize(f) for f in files), compressed, listing)


def layer_dirs(user: lab.PodmanUser) -> list[Path]:
    images = json.loads((user.storage_root / "overlay-images/images.json").read_text())
    top = next(i["layer"] for i in images if IMAGE in i.get("names", []))
    layers = json.loads((user.storage_root / "overlay-layers/layers.json").read_text())
    by_id = {layer["id"]: layer for layer in layers}
    chain = []
    while top:
        chain.append(user.storage_root / "overlay" / top / "diff")
        top = by_id[top].get("parent")
    return chain[::-1]


def stored_files(roots: list[Path]) -> list[str]:
    """As root: the regular files over 64 bytes under roots (what a pull stores as objects)."""
    files = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_size > 64:
                    files.append(p)
    return files


def layout_blobs(layout: Path) -> list[Path]:
    """The layer blobs of an OCI layout with one image, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    blob = lambda digest: layout / "blobs" / digest.replace(":", "/", 1)
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    return [blob(d["digest"]) for d in manifest["layers"]]


def tear_down(bench: Lab) -> None:
    lab.restart_pause(USER)  # its namespace would keep the XFS busy
    lab.unmount_xfs(bench.xfs)


def fresh_dir(bench: Lab, name: str) -> Path:
    d = bench.user.scratch / name
    if d.exists():
        shutil.rmtree(d)
        os.sync()  # XFS frees the deleted inodes in the background: not during the next timed row
    d.mkdir()
    os.chown(d, bench.user.uid, bench.user.gid)
    return d


# ---------------------------------------------------------------------------------------
# The rows: each function runs one row --runs times, warm then cold each time


def pycfs_argv(bench: Lab, repo: Path, *args: str) -> list[str]:
    return [str(bench.user.python), "-m", "pycfs.tools.cli", "--repo", str(repo), *args]


def modes(runs: int, cold: bool) -> list[bool]:
    return [c for _ in range(runs) for c in ((False, True) if cold else (False,))]


def row_pull(bench: Lab, runs: int, cold: bool) -> tuple[Row, Row, Row, dict]:
    pull = Row("a", "pycfs oci pull containers-storage: (empty repository)")
    import_only = Row("a'", "  the same, --no-image (import only)")
    again = Row("e", "pycfs oci pull containers-storage: again (warm re-pull)")
    stats: dict = {}
    source = f"containers-storage:{IMAGE}"
    for c in modes(runs, cold):
        for row, extra in ((pull, []), (import_only, ["--no-image"])):
            repo = fresh_dir(bench, "repo") / "repo"
            timed(pycfs_argv(bench, repo, "init"), bench.user)
            before = used_bytes(bench.xfs)
            bench.cache(c)
            sample, out = timed(pycfs_argv(bench, repo, "oci", "pull", "--json", *extra, source, "bench"), bench.user)
            row.samples(c).append(sample)
            if row is pull:
                if not stats:
                    pull.disk_added = used_bytes(bench.xfs) - before
                    stats = json.loads(out)["stats"]
                bench.cache(c)
                again.samples(c).append(timed(pycfs_argv(bench, repo, "oci", "pull", source, "bench"), bench.user)[0])
    shutil.rmtree(bench.user.scratch / "repo")
    return pull, import_only, again, stats


def row_hashing(bench: Lab, runs: int, cold: bool) -> tuple[Row, Row]:
    ours = Row("b", "fs-verity hashing of the same files, `pycfs measure` (object workers)")
    theirs = Row("Lh", f"fs-verity hashing, Debian `fsverity digest` ({os.cpu_count()} processes)")
    for c in modes(runs, cold):
        bench.cache(c)
        ours.samples(c).append(timed([sys.executable, "-m", "pycfs.tools.cli", "measure", "--files-from",
                                      bench.listing])[0])
        bench.cache(c)
        theirs.samples(c).append(timed(["sh", "-c", f"xargs -d '\\n' -n 256 -P {os.cpu_count()} fsverity digest "
                                                    f"<{bench.listing} >/dev/null"])[0])
    return ours, theirs


def row_clone(bench: Lab, runs: int, cold: bool) -> Row:
    row = Row("Lc", "reflink copy of the layer directories, GNU `cp -a --reflink=always`")
    for c in modes(runs, cold):
        dest = fresh_dir(bench, "clone")
        script = " && ".join(f"cp -a --reflink=always {layer} {dest}/{i}" for i, layer in enumerate(bench.layers))
        bench.cache(c)
        row.samples(c).append(timed(["sh", "-c", script])[0])
    shutil.rmtree(bench.user.scratch / "clone")
    return row


def row_save_then_pull(bench: Lab, runs: int, cold: bool) -> Row:
    row = Row("c", "podman save --format oci-dir + pycfs oci pull oci:DIR")
    for c in modes(runs, cold):
        work = fresh_dir(bench, "work-c")
        repo = work / "repo"
        timed(pycfs_argv(bench, repo, "init"), bench.user)
        before = used_bytes(bench.xfs)
        bench.cache(c)
        save, _ = timed(["podman", "save", "--format", "oci-dir", "-o", str(work / "oci"), IMAGE], bench.user)
        pull, _ = timed(pycfs_argv(bench, repo, "oci", "pull", f"oci:{work / 'oci'}", "bench"), bench.user)
        row.samples(c).append(Sample(save.seconds + pull.seconds, max(save.maxrss_kib, pull.maxrss_kib)))
        if row.disk_added is None:
            row.disk_added = used_bytes(bench.xfs) - before
    shutil.rmtree(bench.user.scratch / "work-c")
    return row


def rows_layout(bench: Lab, runs: int, cold: bool) -> list[Row]:
    """oci:DIR pulls of the compressed layouts against tar -xf + fsverity digest."""
    rows = []
    cpus = os.cpu_count()
    for comp, layout in bench.layouts.items():
        ours = Row(f"o-{comp[:2]}", f"pycfs oci pull oci:DIR, {comp} layers")
        theirs = Row(f"t-{comp[:2]}", f"  GNU `tar -xf` of the same layers + `fsverity digest` ({cpus} processes)")
        # The pull makes what it wrote durable before a layer stream becomes visible
        # (syncfs); tar leaves it dirty in the page cache: the sync after it, on its own.
        flush = Row(f"s-{comp[:2]}", "  `sync` right after that")
        blobs = [str(b) for b in layout_blobs(layout)]
        for c in modes(runs, cold):
            repo = fresh_dir(bench, "repo-o") / "repo"
            timed(pycfs_argv(bench, repo, "init"), bench.user)
            bench.cache(c, blobs)
            ours.samples(c).append(timed(pycfs_argv(bench, repo, "oci", "pull", f"oci:{layout}", "bench"),
                                         bench.user)[0])
            dest = fresh_dir(bench, "tar")
            script = " && ".join(f"mkdir {dest}/{i} && tar -xf {blob} -C {dest}/{i}" for i, blob in enumerate(blobs))
            script += (f" && find {dest} -type f -size +64c -print0 | "
                       f"xargs -0 -n 256 -P {cpus} fsverity digest >/dev/null")
            bench.cache(c, blobs)
            theirs.samples(c).append(timed(["sh", "-c", script])[0])
            flush.samples(c).append(timed(["sync"])[0])
        rows += [ours, theirs, flush]
    for name in ("repo-o", "tar"):
        shutil.rmtree(bench.user.scratch / name, ignore_errors=True)
    return rows


def rows_start_up(bench: Lab, runs: int, cold: bool) -> list[Row]:
    rows = [Row("u", "pycfs --help"), Row("u'", "pycfs --version")]
    for c in modes(runs, cold):
        for row in rows:
            bench.cache(c, [])
            # As root, without runuser's own start-up: the user's venv, as the pulls run it.
            row.samples(c).append(timed([bench.user.python, "-m", "pycfs.tools.cli", row.title.split()[1]])[0])
    return rows


# The rows below (other sessions' features) run with a warm page cache only.


def row_mkcomposefs(bench: Lab, runs: int) -> Row:
    row = Row("d", "C mkcomposefs --digest-store over the merged rootfs")
    if shutil.which("mkcomposefs") is None:
        row.note = "not installed (Debian 12 has no composefs package)"
        return row
    for _ in range(runs):
        work = fresh_dir(bench, "work-d")
        script = (f'set -e; m=$(podman image mount {IMAGE}); '
                  f'mkcomposefs --digest-store={work}/store "$m" {work}/image.cfs; podman image unmount {IMAGE}')
        row.warm.append(timed(["podman", "unshare", "sh", "-c", script], bench.user)[0])
    shutil.rmtree(bench.user.scratch / "work-d")
    return row


DUMP_ENTRIES = 200_000


def row_mkcomposefs_dumpfile(bench: Lab, runs: int) -> Row:
    """m: `pycfs mkcomposefs --from-file` of a generated rootfs-like dumpfile (goal: >= 35k entries/s)."""
    from pycfs.tools.dev.gendump import generate

    work = fresh_dir(bench, "work-m")
    (work / "big.dump").write_bytes(generate(DUMP_ENTRIES))
    row = Row("m", f"pycfs mkcomposefs --from-file, {DUMP_ENTRIES:,}-entry dumpfile (tools/dev/gendump.py)")
    for _ in range(runs):
        row.warm.append(timed([sys.executable, "-m", "pycfs.tools.cli", "mkcomposefs", "--from-file",
                                  str(work / "big.dump"), str(work / "big.cfs")])[0])
    shutil.rmtree(work)
    return row


def row_mounts(bench: Lab, runs: int) -> list[Row]:
    rows = [Row("f", "read every file: kernel EROFS+overlay mount"), Row("f'", "  the same, rootless FUSE mount"),
            Row("g", "find -ls: kernel mount"), Row("g'", "  the same, rootless FUSE mount")]
    work = fresh_dir(bench, "mounts")
    repo, listing = work / "repo", work / "files"
    timed(pycfs_argv(bench, repo, "init"), bench.user)
    timed(pycfs_argv(bench, repo, "oci", "pull", f"containers-storage:{IMAGE}", "bench"), bench.user)
    mounts = [work / "kernel", work / "fuse"]
    for d in mounts:
        d.mkdir()
        os.chown(d, bench.user.uid, bench.user.gid)
    # as the user on both mounts, so the directories it may not enter stay out of both
    find_ls = "find {} -ls >/dev/null 2>&1; exit 0"
    cat_all = "cd {} && find . -type f -readable -print0 2>/dev/null | xargs -0 -n 1024 cat >/dev/null"
    for i in range(1 + 2 * runs):  # fresh mounts for every timing: the listing, then walks and reads
        timed([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), "mount", "--fuse", "no", "bench", str(mounts[0])])
        timed(pycfs_argv(bench, repo, "mount", "bench", str(mounts[1])), bench.user)
        try:
            if i == 0:  # what the user may read; then the objects into the page cache, as for every row
                timed(["sh", "-c", f"cd {mounts[0]} && find . -type f -readable -print0 >{listing} 2>/dev/null; exit 0"], bench.user)
                names = [os.path.join(mounts[0], os.fsdecode(n)) for n in listing.read_bytes().split(b"\0")[:-1]]
                read_all(names)
                rows[0].note = rows[1].note = f"{len(names)} files, {human_size(sum(map(os.path.getsize, names)))}"
                continue
            script, timed_rows = (find_ls, rows[2:]) if i % 2 else (cat_all, rows[:2])
            for mnt, row in zip(mounts, timed_rows):
                row.warm.append(timed(["sh", "-c", script.format(mnt)], bench.user)[0])
        finally:
            timed(pycfs_argv(bench, repo, "umount", str(mounts[1])), bench.user)
            timed([sys.executable, "-m", "pycfs.tools.cli", "umount", str(mounts[0])])
    shutil.rmtree(work)
    return rows


def row_copy(bench: Lab, runs: int) -> tuple[Row, Row, Row]:
    """oci copy between two repositories on the XFS, against a reflinking cp of the objects."""
    inproc = Row("h", "pycfs oci copy --zerocopy, repository -> repository (in process)")
    served = Row("h'", "  the same from a `pycfs varlink serve` process")
    cp = Row("h''", "cp -a --reflink=always of the source's objects/")
    source = fresh_dir(bench, "copy-src") / "repo"
    timed(pycfs_argv(bench, source, "init"), bench.user)
    timed(pycfs_argv(bench, source, "oci", "pull", f"containers-storage:{IMAGE}", "bench"), bench.user)
    sock = source.parent / "varlink.sock"
    server = subprocess.Popen(["runuser", "-u", bench.user.name, "--", str(bench.user.python), "-m", "pycfs.tools.cli",
                               "varlink", "serve", "--address", f"unix:{sock}"], env=bench.user.environ(),
                              cwd=bench.user.home, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise lab.LabError(server.returncode or 1, server.args, b"", b"the varlink service did not start")
            time.sleep(0.05)
        for i in range(runs):
            for row, src in ((inproc, [str(source)]), (served, [f"unix:{sock}", "--from-repo", str(source)])):
                dest = fresh_dir(bench, "copy-dest") / "repo"
                timed(pycfs_argv(bench, dest, "init"), bench.user)
                before = used_bytes(bench.xfs)
                row.warm.append(timed(pycfs_argv(bench, dest, "oci", "copy", "bench", "--zerocopy", "--name",
                                                    "bench", "--from", *src), bench.user)[0])
                if i == 0:
                    row.disk_added = used_bytes(bench.xfs) - before
            dest = fresh_dir(bench, "copy-dest")
            before = used_bytes(bench.xfs)
            cp.warm.append(timed(["cp", "-a", "--reflink=always", str(source / "objects"), str(dest / "objects")],
                                    bench.user)[0])
            if i == 0:
                cp.disk_added = used_bytes(bench.xfs) - before
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(bench.user.scratch / "copy-src")
        shutil.rmtree(bench.user.scratch / "copy-dest", ignore_errors=True)
    return inproc, served, cp


_SERVE = """
import functools, http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def rows_ostree(bench: Lab, runs: int, tree: str) -> list[Row]:
    """o1-o4: pycfs against ostree's own pulls, over HTTP and from a local bare repository;
    o4u: the same local pull with --untrusted, which reads and verifies every object's
    checksum as pycfs always does (by default ostree trusts a local repository and reads no
    content; either way it hardlinks the files, sharing their inodes, where pycfs keeps
    reflinked private copies); o5-o6: an update from a local bare repository (a
    second commit adding 3 files of 200 KB), pulled into a repository that holds the first
    under the same name."""
    if shutil.which("ostree") is None:
        return [Row("o", "ostree rows", note="ostree is not installed")]
    base = Path(tempfile.mkdtemp(prefix="ostree-", dir=bench.xfs))
    archive, bare = base / "archive", base / "bare"
    for repo, mode in ((archive, "archive"), (bare, "bare")):
        lab.run_root(["ostree", "init", f"--repo={repo}", f"--mode={mode}"])
    lab.run_root(["ostree", "commit", f"--repo={archive}", "--branch=tree", tree])
    extra = base / "extra" / "update"
    extra.mkdir(parents=True)
    for i in range(3):
        (extra / f"new{i}").write_bytes(random.Random(i).randbytes(200_000))
    lab.run_root(["ostree", "commit", f"--repo={archive}", "--branch=tree2", "--tree=ref=tree",
                  f"--tree=dir={extra.parent}"])
    lab.run_root(["ostree", "pull-local", f"--repo={bare}", archive, "tree", "tree2"])
    server = subprocess.Popen([sys.executable, "-c", _SERVE, archive], stdout=subprocess.PIPE, text=True)
    rows = [Row("o1", f"pycfs ostree pull http://127.0.0.1 ({tree})"), Row("o2", "  ostree pull, same server"),
            Row("o3", "pycfs ostree pull-local from a bare repository"), Row("o4", "  ostree pull-local, bare to bare"),
            Row("o4u", "  ostree pull-local --untrusted (verifies checksums)"),
            Row("o5", "pycfs ostree pull-local of an update (3 new files)"), Row("o6", "  ostree pull-local, same update")]
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/"
        read_all([os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs])
        for _ in range(runs):
            for row, kind in zip(rows, ("pycfs-http", "ostree-http", "pycfs-local", "ostree-local",
                                        "ostree-local-untrusted", "pycfs-update", "ostree-update")):
                dest = base / f"dest-{kind}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                if kind.startswith("pycfs"):  # as root, like ostree (bare repositories need it)
                    pycfs = [sys.executable, "-m", "pycfs.tools.cli", "--repo", str(dest)]
                    lab.run_root([*pycfs, "init"])
                    argv = [*pycfs, "ostree", *(("pull", url) if kind == "pycfs-http" else ("pull-local", str(bare))),
                            "tree"]
                    if kind == "pycfs-update":
                        lab.run_root([*argv, "os"])
                        argv = [*argv[:-1], "tree2", "os"]
                else:
                    mode = "archive" if kind == "ostree-http" else "bare"
                    lab.run_root(["ostree", "init", f"--repo={dest}", f"--mode={mode}"])
                    if kind == "ostree-update":
                        lab.run_root(["ostree", "pull-local", f"--repo={dest}", str(bare), "tree"])
                    if kind == "ostree-http":
                        lab.run_root(["ostree", "remote", "add", f"--repo={dest}", "--no-gpg-verify", "r", url])
                        argv = ["ostree", "pull", f"--repo={dest}", "r", "tree"]
                    else:
                        argv = ["ostree", "pull-local", f"--repo={dest}", str(bare),
                                "tree2" if kind == "ostree-update" else "tree",
                                *(["--untrusted"] if kind == "ostree-local-untrusted" else [])]
                before = used_bytes(bench.xfs)
                row.warm.append(timed(argv)[0])
                row.disk_added = used_bytes(bench.xfs) - before
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(base, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Goal:
    name: str
    num: str | tuple[str, ...]  # row key(s), summed
    den: str | tuple[str, ...] | None  # None: an absolute time in seconds
    limit: float


GOALS = [
    Goal("b/Lh (hashing at C speed)", "b", "Lh", 1.05),
    Goal("a/L (pull vs hash + clone)", "a", ("Lh", "Lc"), 1.0),
    Goal("a'/L (import alone)", "a'", ("Lh", "Lc"), 0.8),
    Goal("o-gz/t-gz (oci:DIR, gzip)", "o-gz", "t-gz", 1.1),
    Goal("o-zs/t-zs (oci:DIR, zstd)", "o-zs", "t-zs", 1.1),
    Goal("o-gz/(t-gz + s-gz) (with sync)", "o-gz", ("t-gz", "s-gz"), 1.1),
    Goal("o-zs/(t-zs + s-zs) (with sync)", "o-zs", ("t-zs", "s-zs"), 1.1),
    Goal("e (warm re-pull), s", "e", None, 0.2),
    Goal("u (pycfs --help), s", "u", None, 0.15),
    Goal("u' (pycfs --version), s", "u'", None, 0.15),
]


def total(by: dict[str, Row], keys: str | tuple[str, ...], cold: bool) -> float | None:
    values = [by[k].median(cold) if k in by else None for k in ((keys,) if isinstance(keys, str) else keys)]
    return None if None in values else sum(values)  # type: ignore[arg-type]


def goal_ratio(by: dict[str, Row], num: str | tuple[str, ...], den: str | tuple[str, ...] | None,
               cold: bool = False) -> float | None:
    n = total(by, num, cold)
    d = total(by, den, cold) if den is not None else 1.0
    return n / d if n is not None and d else None


def goal_values(by: dict[str, Row], cold: bool) -> dict[str, float]:
    values = {g.name: goal_ratio(by, g.num, g.den, cold) for g in GOALS}
    return {k: v for k, v in values.items() if v is not None}


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(rows: list[Row], bench: Lab, stats: dict, runs: int, cold: bool) -> dict:
    from rich.console import Console
    from rich.table import Table

    by = {r.key: r for r in rows}
    title = (f"pycfs import benchmark: {human_size(bench.image_bytes)} image, {len(bench.files)} files > 64 bytes "
             f"({human_size(bench.file_bytes)}), medians of {runs} runs, {os.cpu_count()} cores")
    table = Table(title=title)
    for col in ("", "row", "warm s", "min-max", "cold s", "min-max", "peak RSS", "disk added"):
        table.add_column(col, justify="left" if col in ("", "row") else "right")

    def spread(r: Row, c: bool) -> str:
        s = [x.seconds for x in r.samples(c)]
        return f"{min(s):.2f}-{max(s):.2f}" if s else ""

    for r in rows:
        table.add_row(r.key, r.title, fmt(r.median(False)) if r.warm else (r.note or "-"), spread(r, False),
                      fmt(r.median(True)), spread(r, True), human_size(r.peak_rss() or 0) if r.warm else "",
                      human_size(r.disk_added) if r.disk_added is not None else "")
    L = {c: total(by, ("Lh", "Lc"), c) for c in (False, True)}
    table.add_row("L", "reference: Lh + Lc", fmt(L[False]), "", fmt(L[True]), "", "", "")
    goals = Table(title="goals (medians; met when <= the limit)")
    for col in ("ratio", "limit", "warm", "", "cold", ""):
        goals.add_column(col, justify="left" if col == "ratio" else "right")
    values = {c: goal_values(by, c) for c in (False, True)}
    for g in GOALS:
        cells = []
        for c in (False, True):
            v = values[c].get(g.name)
            cells += [fmt(v, 3), "" if v is None else ("ok" if v <= g.limit else "MISSED")]
        goals.add_row(g.name, f"{g.limit:g}", *cells)
    console = Console(width=160)
    console.print(table)
    console.print(goals)
    rate = lambda seconds: bench.file_bytes / seconds / MIB if seconds else None
    others: dict[str, float | None] = {"c/a": goal_ratio(by, "c", "a")}
    if "a" in by:
        others["disk(a)/image"] = (by["a"].disk_added or 0) / bench.image_bytes
    if "b" in by:
        others["hash MiB/s (pycfs)"] = rate(by["b"].median(False))
        others["hash MiB/s (fsverity digest)"] = rate(by["Lh"].median(False))
    if "h" in by:  # oci copy: goal h/h'' <= 1.5, disk < 1%
        others["h/h''"] = goal_ratio(by, "h", "h''")
        others["h'/h"] = goal_ratio(by, "h'", "h")
        others["disk(h)/image"] = (by["h"].disk_added or 0) / bench.image_bytes
    if "m" in by:  # EROFS generation speed
        m = by["m"].median()
        others["mkcomposefs entries per s"] = DUMP_ENTRIES / m if m else None
    if "f" in by:  # FUSE against the kernel: goals >= 0.5 for reads, <= 3 for the walk
        others["read FUSE/kernel throughput"] = goal_ratio(by, "f", "f'")
        others["find -ls FUSE/kernel time"] = goal_ratio(by, "g'", "g")
    console.print("  ".join(f"{k} = {fmt(v, 3) if '/' in k and 'MiB' not in k else fmt(v, 0)}"
                            for k, v in others.items()))
    if stats:
        console.print(f"cold pull: {stats.get('objects_reflinked')} reflinked, {stats.get('objects_copied')} copied, "
                      f"{stats.get('objects_already_present')} already present, {stats.get('files_via_helper')} "
                      f"files via the helper")
    return {
        "image_bytes": bench.image_bytes, "files": len(bench.files), "file_bytes": bench.file_bytes, "runs": runs,
        "rows": {r.key: r.as_json() for r in rows}, "L": {"warm": L[False], "cold": L[True]},
        "goals": {g.name: {"limit": g.limit, "warm": values[False].get(g.name), "cold": values[True].get(g.name)}
                  for g in GOALS},
        "others": others, "pull_stats": stats,
    }


SCALING_ROWS = ("a", "a'", "b", "Lh")


def scaling_report(results: list[dict], json_path: Path | None) -> None:
    """Per image: each row's seconds, MiB/s and µs per file (warm and cold), and peak RSS;
    then a least-squares fit of time = start + bytes / rate + files x per-file cost."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scaling (medians; µs/file = seconds / files > 64 bytes)")
    for col in ("image", "files", "bytes", "row", "warm s", "cold s", "warm MiB/s", "warm µs/file", "cold µs/file",
                "peak RSS"):
        table.add_column(col, justify="left" if col in ("image", "row") else "right")
    for res in results:
        for key in SCALING_ROWS:
            r = res["rows"][key]
            w, c = r["median_warm"], r["median_cold"]
            table.add_row(res["name"], str(res["files"]), human_size(res["file_bytes"]), key, fmt(w), fmt(c),
                          fmt(res["file_bytes"] / w / MIB if w else None, 0), fmt(w / res["files"] * 1e6 if w else None, 0),
                          fmt(c / res["files"] * 1e6 if c else None, 0), human_size(r["peak_rss"] or 0))
    console = Console(width=160)
    console.print(table)
    if len(results) >= 3:
        fits = []
        for key in SCALING_ROWS:
            for cold in (False, True):
                fit = fit_linear([(res["file_bytes"], res["files"], res["rows"][key]["median_cold" if cold else
                                                                                     "median_warm"])
                                  for res in results])
                if fit:
                    fits.append(f"{key} {'cold' if cold else 'warm'}: {fit[0]:.2f} s + {fit[1]:.0f} MiB/s + "
                                f"{fit[2]:.1f} µs/file")
        console.print("fit time = start + bytes/rate + files x cost:  " + (";  ".join(fits) or
                                                                          "(needs images of different shapes)"))
    if json_path is not None:
        plot(results, json_path.with_suffix(".png"))


def fit_linear(points: list[tuple[int, int, float | None]]) -> tuple[float, float, float] | None:
    """Least squares t = start + bytes / rate + files x cost over the images: (start s, MiB/s,
    µs/file); None unless three images of different shapes (e.g. scale factors and the
    small-file image) pin the three down."""
    pts = [(1.0, b / MIB, float(f), t) for b, f, t in points if t is not None]
    if len(pts) < 3:
        return None
    # Normal equations A x = v, solved by Gaussian elimination with partial pivoting.
    a = [[sum(p[i] * p[j] for p in pts) for j in range(3)] + [sum(p[i] * p[3] for p in pts)] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, abs(a[col][col])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(3):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    start, per_mib, per_file = (a[i][3] / a[i][i] for i in range(3))
    return start, (1 / per_mib if per_mib > 0 else float("inf")), per_file * 1e6


def plot(results: list[dict], png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("bench: no plot (matplotlib missing: install the `bench` extra)", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_bytes, by_files) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in SCALING_ROWS:
        for cold, style in ((False, "-o"), (True, "--s")):
            pts = sorted((res["file_bytes"] / 1e9, res["files"], t) for res in results
                         if (t := res["rows"][key]["median_cold" if cold else "median_warm"]) is not None)
            if not pts:  # e.g. the cold runs with --warm-only
                continue
            label = f"{key} {'cold' if cold else 'warm'}"
            by_bytes.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
            pts.sort(key=lambda p: p[1])  # by files, the x of this plot
            by_files.plot([p[1] for p in pts], [p[2] / p[1] * 1e6 for p in pts], style, label=label)
    by_bytes.set(xlabel="GB in files > 64 bytes", ylabel="seconds (median)", title="time against bytes")
    by_files.set(xlabel="files", ylabel="µs per file", xscale="log", title="time per file")
    by_bytes.legend(fontsize="small")
    fig.suptitle(", ".join(f"{r['name']}: {r['files']} files" for r in results))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"bench: plot in {png}", file=sys.stderr)


# ---------------------------------------------------------------------------------------


def guarded(key: str, rows: Callable[[], list[Row]]) -> list[Row]:
    """A feature's rows; when they fail, one row saying why, and the others still report."""
    try:
        return rows()
    except (lab.LabError, OSError, subprocess.SubprocessError) as e:
        print(f"bench: rows {key}... failed: {e}", file=sys.stderr)
        return [Row(key, "(failed)", note=str(e).splitlines()[0][:60])]


GROUPS = ("pull", "hash", "clone", "save", "layout", "startup", "mkcomposefs", "mount", "copy", "ostree")
QUICK_GROUPS = frozenset(("pull", "hash", "clone", "layout", "startup"))


def bench_one(load: Workload, runs: int, cold: bool, groups: frozenset[str], keep: bool,
              ostree_tree: str = "/usr/lib/python3") -> dict:
    bench = set_up(load, layouts="layout" in groups)
    try:
        print(f"bench: {runs} runs per row{', warm and cold' if cold else ''}...", file=sys.stderr)
        rows: list[Row] = []
        stats: dict = {}
        again = None
        if "pull" in groups:
            pull, import_only, again, stats = row_pull(bench, runs, cold)
            rows += [pull, import_only]
        if "hash" in groups:
            rows += row_hashing(bench, runs, cold)
        if "clone" in groups:
            rows.append(row_clone(bench, runs, cold))
        if "save" in groups:
            rows.append(row_save_then_pull(bench, runs, cold))
        if "layout" in groups:
            rows += rows_layout(bench, runs, cold)
        rows += [again] if again is not None else []
        if "startup" in groups:
            rows += rows_start_up(bench, runs, cold)
        if "mkcomposefs" in groups:
            rows += [row_mkcomposefs(bench, runs), row_mkcomposefs_dumpfile(bench, runs)]
        if "mount" in groups:
            rows += guarded("f", lambda: row_mounts(bench, runs))
        if "copy" in groups:
            rows += guarded("h", lambda: list(row_copy(bench, runs)))
        if "ostree" in groups:
            rows += guarded("o1", lambda: rows_ostree(bench, runs, ostree_tree))
        figures = report(rows, bench, stats, runs, cold)
        return {"name": load.name, **figures}
    finally:
        if not keep:
            tear_down(bench)


def parse_groups(text: str) -> frozenset[str]:
    groups = frozenset(g.strip() for g in text.split(",") if g.strip())
    unknown = groups - set(GROUPS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row group(s) {', '.join(sorted(unknown))}; "
                                         f"choose from {', '.join(GROUPS)}")
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per row (default: %(default)s)")
    parser.add_argument("--scale", type=parse_workload, default=parse_workload("1"),
                        help="the image: a size factor (1: about 1.5 GB) or NNNk small files (default: 1)")
    parser.add_argument("--scaling", nargs="?", const=DEFAULT_SCALING, metavar="LIST",
                        help=f"instead: rows a, a', b, Lh for each image of LIST (default: {DEFAULT_SCALING})")
    parser.add_argument("--quick", action="store_true",
                        help="a quick look while developing: 1 run, --scale 0.25, warm cache only, row groups "
                        f"{', '.join(g for g in GROUPS if g in QUICK_GROUPS)} unless --only says otherwise")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--only", type=parse_groups, metavar="GROUPS",
                        help=f"run only these row groups, comma-separated: {', '.join(GROUPS)} "
                        "(the goals whose rows did not run print '-')")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the figures as JSON (and the plot)")
    parser.add_argument("--keep", action="store_true", help="leave the lab (XFS, storage) mounted, until the next bench run or integration test session "
                        "sweeps it")
    parser.add_argument("--ostree-tree", metavar="DIR", default="/usr/lib/python3",
                        help="the tree the ostree rows commit and pull (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it creates a user and a loop-mounted XFS)")
    if args.quick:
        args.runs, args.scale, args.warm_only = 1, parse_workload("0.25"), True
    if args.only is None:
        args.only = QUICK_GROUPS if args.quick else frozenset(GROUPS)
    cold = not args.warm_only
    print("bench: waiting for other benchmarks on this machine (they share the lab user)...", file=sys.stderr)
    with lab.locked("bench"), tempfile.TemporaryDirectory(prefix="pycfs-bench-pycache-") as pycache:
        compiled_bytecode(Path(pycache))
        return run(args, cold)


def compiled_bytecode(cache: Path) -> None:
    """The rows run as root use this checkout, whose bytecode an environment with
    PYTHONDONTWRITEBYTECODE would compile afresh in every run (~0.3 s), which no installed
    pycfs does: compile it once into a cache of the bench's own (PYTHONPYCACHEPREFIX, so
    nothing is left in the checkout) that every row's processes inherit."""
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(root / d) for d in ("host", "protocol", "tools",
                                                                                        "helper"))],
                   check=True, capture_output=True)


def run(args: argparse.Namespace, cold: bool) -> int:
    if args.scaling:
        results = [bench_one(parse_workload(name), args.runs, cold, frozenset(("pull", "hash")), args.keep)
                   for name in args.scaling.split(",")]
        scaling_report(results, args.json)
        figures: dict = {"scaling": results}
    else:
        figures = bench_one(args.scale, args.runs, cold, args.only, args.keep, args.ostree_tree)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
