"""Import benchmark: `pycfs oci pull containers-storage:` against references measured in the same run.

Run as root on Debian (`tools/bench`, which runs the set-up first). It makes its own lab:
a loop-mounted XFS with reflinks, an unprivileged user whose containers-storage and
repositories live there, and a generated multi-layer image of about 1.5 GB (--scale) loaded
into that storage. Rows, each the median of --runs with min and max:

  a  pycfs oci pull containers-storage:IMAGE, cold (empty repository)
  a' the same with --no-image: the import alone, without writing the EROFS image
  b  the physical limit: fs-verity hashing of exactly the files the pull stores, with the
     code pycfs uses (`pycfs measure`: its object worker processes, one per core); and
     Debian's `fsverity digest`
  c  what a user without pycfs does: podman save --format oci-dir + pycfs oci pull oci:DIR
  d  C mkcomposefs --digest-store over the merged rootfs (when installed)
  e  warm re-pull (everything already in the repository)
  f  reading every file the user may read (find | xargs cat) through the kernel's
     EROFS+overlay mount (made by root), f' through the user's rootless FUSE mount;
     g, g' `find -ls` over each (fresh mounts each run, objects in the page cache)
  o  ostree: a tree (--ostree-tree, default /usr/lib/python3) committed with `ostree commit`
     into an archive repository served over HTTP on 127.0.0.1 and into a bare repository on
     the XFS: `pycfs ostree pull` / `ostree pull` (into a fresh archive repository) and
     `pycfs ostree pull-local` / `ostree pull-local` (into a fresh bare repository)
  h  pycfs oci copy --zerocopy of the pulled image into an empty repository on the same XFS
     (varlink GetLayer/PutLayer in process); h': the same through a `pycfs varlink serve`
     process; h'': `cp -a --reflink=always` of the source repository's objects/

with peak RSS per row, the disk space (a) and (c) add, and the ratios a/b, c/a and
disk(a)/image bytes. The page cache is warm for every row (each input is read once
before timing), so rows compare CPU and I/O work, not the first disk read.
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
from dataclasses import dataclass, field
from pathlib import Path


from pycfs.host.oci.result import human_size
from pycfs.tools.dev import lab
from pycfs.tools.dev.ocibuild import MIB, Dir, File, Hardlink, ImageSpec, Symlink, build_layout, load_into_storage

USER = "pycfs-bench"
IMAGE = "localhost/pycfs-bench:latest"
XFS_SIZE = 16 << 30  # sparse


# ---------------------------------------------------------------------------------------
# The workload


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


def image_file_bytes(spec: ImageSpec) -> int:
    return sum(e.length for layer in spec.layers for e in layer if isinstance(e, File))


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
    samples: list[Sample] = field(default_factory=list)
    disk_added: int | None = None
    note: str = ""

    def stats(self) -> tuple[float, float, float] | None:
        if not self.samples:
            return None
        secs = [s.seconds for s in self.samples]
        return statistics.median(secs), min(secs), max(secs)

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def peak_rss(self) -> int:
        return max(s.maxrss_kib for s in self.samples) * 1024


def timed(argv: list[str], user: lab.PodmanUser | None = None, cwd: str = "/") -> tuple[Sample, bytes]:
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


def warm(paths: list[str]) -> None:
    """Read every input once so each row starts with the same (warm) page cache."""
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---------------------------------------------------------------------------------------
# The lab


@dataclass
class Lab:
    xfs: Path
    user: lab.PodmanUser
    image_bytes: int
    files: list[str]  # regular files > 64 bytes in the image's layers: what a pull stores
    file_bytes: int


def set_up(scale: float) -> Lab:
    for tool in ("podman", "skopeo", "mkfs.xfs", "runuser", "fsverity", "/usr/bin/time"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing: run tools/setup.sh as root first")
    with lab.locked("sweep"):
        lab.sweep_stale()
    print("bench: making the lab (loop XFS, user, venv)...", file=sys.stderr)
    xfs = lab.mount_xfs("bench", XFS_SIZE)
    try:
        return _populate(xfs, scale)
    except BaseException:
        lab.restart_pause(USER)
        lab.unmount_xfs(xfs)
        raise


def _populate(xfs: Path, scale: float) -> Lab:
    user = lab.user_on(xfs, USER, lab.build_user_venv())

    spec = workload(scale)
    image_bytes = image_file_bytes(spec)
    print(f"bench: building the image ({human_size(image_bytes)} in files) and loading it into "
          f"{USER}'s containers-storage...", file=sys.stderr)
    layout = Path(tempfile.mkdtemp(prefix="bench-layout-", dir=lab.LAB_ROOT))
    os.chmod(layout, 0o755)
    try:
        build_layout(spec, layout / "oci")
        load_into_storage(user, layout / "oci", IMAGE)
    finally:
        shutil.rmtree(layout)
    files = layer_files(user)
    return Lab(xfs, user, image_bytes, files, sum(os.path.getsize(f) for f in files))


def layer_files(user: lab.PodmanUser) -> list[str]:
    """As root: the regular files over 64 bytes in the image's layer directories."""
    images = json.loads((user.storage_root / "overlay-images/images.json").read_text())
    top = next(i["layer"] for i in images if IMAGE in i.get("names", []))
    layers = json.loads((user.storage_root / "overlay-layers/layers.json").read_text())
    by_id = {layer["id"]: layer for layer in layers}
    chain = []
    while top:
        chain.append(top)
        top = by_id[top].get("parent")
    files = []
    for layer_id in chain:
        for dirpath, _, names in os.walk(user.storage_root / "overlay" / layer_id / "diff"):
            for name in names:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_size > 64:
                    files.append(p)
    return files


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
# The rows


def pycfs_argv(bench: Lab, repo: Path, *args: str) -> list[str]:
    return [str(bench.user.python), "-m", "pycfs.tools.cli", "--repo", str(repo), *args]


def row_import_only(bench: Lab, runs: int) -> Row:
    row = Row("a'", "  the same, --no-image (import only, no EROFS build)")
    for _ in range(runs):
        repo = fresh_dir(bench, "repo-a2") / "repo"
        timed(pycfs_argv(bench, repo, "init"), bench.user)
        row.samples.append(timed(pycfs_argv(bench, repo, "oci", "pull", "--no-image",
                                            f"containers-storage:{IMAGE}", "bench"), bench.user)[0])
    shutil.rmtree(bench.user.scratch / "repo-a2")
    return row


def row_cold_pull(bench: Lab, runs: int) -> tuple[Row, Row, dict]:
    cold = Row("a", "pycfs oci pull containers-storage: (cold)")
    rewarm = Row("e", "pycfs oci pull containers-storage: (warm re-pull)")
    stats: dict = {}
    for i in range(runs):
        repo = fresh_dir(bench, "repo-a") / "repo"
        timed(pycfs_argv(bench, repo, "init"), bench.user)
        before = used_bytes(bench.xfs)
        sample, out = timed(pycfs_argv(bench, repo, "oci", "pull", "--json", f"containers-storage:{IMAGE}", "bench"),
                            bench.user)
        cold.samples.append(sample)
        if i == 0:
            cold.disk_added = used_bytes(bench.xfs) - before
            stats = json.loads(out)["stats"]
        for _ in range(runs):
            sample, _ = timed(pycfs_argv(bench, repo, "oci", "pull", "--json", f"containers-storage:{IMAGE}",
                                         "bench"), bench.user)
            rewarm.samples.append(sample)
    shutil.rmtree(bench.user.scratch / "repo-a")
    return cold, rewarm, stats


def row_hashing(bench: Lab, runs: int) -> tuple[Row, Row]:
    ours = Row("b", "fs-verity hashing of the same files (`pycfs measure`: its object workers)")
    theirs = Row("b'", "fs-verity hashing, Debian `fsverity digest` (2 processes)")
    with tempfile.NamedTemporaryFile("w", suffix=".list", delete=False) as f:
        f.write("\n".join(bench.files) + "\n")
        listing = f.name
    try:
        for _ in range(runs):
            ours.samples.append(timed([sys.executable, "-m", "pycfs.tools.cli", "measure", "--files-from", listing])[0])
            theirs.samples.append(timed(["sh", "-c", f"xargs -d '\\n' -n 256 -P 2 fsverity digest <{listing} >/dev/null"])[0])
    finally:
        os.unlink(listing)
    return ours, theirs


def row_save_then_pull(bench: Lab, runs: int) -> Row:
    row = Row("c", "podman save --format oci-dir + pycfs oci pull oci:DIR")
    for i in range(runs):
        work = fresh_dir(bench, "work-c")
        before = used_bytes(bench.xfs)
        save, _ = timed(["podman", "save", "--format", "oci-dir", "-o", str(work / "oci"), IMAGE], bench.user)
        repo = work / "repo"
        timed(pycfs_argv(bench, repo, "init"), bench.user)
        pull, _ = timed(pycfs_argv(bench, repo, "oci", "pull", f"oci:{work / 'oci'}", "bench"), bench.user)
        row.samples.append(Sample(save.seconds + pull.seconds, max(save.maxrss_kib, pull.maxrss_kib)))
        if i == 0:
            row.disk_added = used_bytes(bench.xfs) - before
    shutil.rmtree(bench.user.scratch / "work-c")
    return row


def row_mkcomposefs(bench: Lab, runs: int) -> Row:
    row = Row("d", "C mkcomposefs --digest-store over the merged rootfs")
    if shutil.which("mkcomposefs") is None:
        row.note = "not installed (Debian 12 has no composefs package)"
        return row
    for _ in range(runs):
        work = fresh_dir(bench, "work-d")
        script = (f'set -e; m=$(podman image mount {IMAGE}); '
                  f'mkcomposefs --digest-store={work}/store "$m" {work}/image.cfs; podman image unmount {IMAGE}')
        row.samples.append(timed(["podman", "unshare", "sh", "-c", script], bench.user)[0])
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
        row.samples.append(timed([sys.executable, "-m", "pycfs.tools.cli", "mkcomposefs", "--from-file",
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
    read_all = "cd {} && find . -type f -readable -print0 2>/dev/null | xargs -0 -n 1024 cat >/dev/null"
    for i in range(1 + 2 * runs):  # fresh mounts for every timing: the listing, then walks and reads
        timed([sys.executable, "-m", "pycfs.tools.cli", "--repo", str(repo), "mount", "--fuse", "no", "bench", str(mounts[0])])
        timed(pycfs_argv(bench, repo, "mount", "bench", str(mounts[1])), bench.user)
        try:
            if i == 0:  # what the user may read; then the objects into the page cache, as for every row
                timed(["sh", "-c", f"cd {mounts[0]} && find . -type f -readable -print0 >{listing} 2>/dev/null; exit 0"], bench.user)
                names = [os.path.join(mounts[0], os.fsdecode(n)) for n in listing.read_bytes().split(b"\0")[:-1]]
                warm(names)
                rows[0].note = rows[1].note = f"{len(names)} files, {human_size(sum(map(os.path.getsize, names)))}"
                continue
            script, timed_rows = (find_ls, rows[2:]) if i % 2 else (read_all, rows[:2])
            for mnt, row in zip(mounts, timed_rows):
                row.samples.append(timed(["sh", "-c", script.format(mnt)], bench.user)[0])
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
                row.samples.append(timed(pycfs_argv(bench, dest, "oci", "copy", "bench", "--zerocopy", "--name",
                                                    "bench", "--from", *src), bench.user)[0])
                if i == 0:
                    row.disk_added = used_bytes(bench.xfs) - before
            dest = fresh_dir(bench, "copy-dest")
            before = used_bytes(bench.xfs)
            cp.samples.append(timed(["cp", "-a", "--reflink=always", str(source / "objects"), str(dest / "objects")],
                                    bench.user)[0])
            if i == 0:
                cp.disk_added = used_bytes(bench.xfs) - before
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(bench.user.scratch / "copy-src")
        shutil.rmtree(bench.user.scratch / "copy-dest", ignore_errors=True)
    return inproc, served, cp


# ---------------------------------------------------------------------------------------
# Report


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
    """o1-o4: pycfs against ostree's own pulls, over HTTP and from a local bare repository."""
    if shutil.which("ostree") is None:
        return [Row("o", "ostree rows", note="ostree is not installed")]
    base = Path(tempfile.mkdtemp(prefix="ostree-", dir=bench.xfs))
    archive, bare = base / "archive", base / "bare"
    for repo, mode in ((archive, "archive"), (bare, "bare")):
        subprocess.run(["ostree", "init", f"--repo={repo}", f"--mode={mode}"], check=True)
    subprocess.run(["ostree", "commit", f"--repo={archive}", "--branch=tree", tree], check=True, capture_output=True)
    subprocess.run(["ostree", "pull-local", f"--repo={bare}", archive, "tree"], check=True, capture_output=True)
    server = subprocess.Popen([sys.executable, "-c", _SERVE, archive], stdout=subprocess.PIPE, text=True)
    rows = [Row("o1", f"pycfs ostree pull http://127.0.0.1 ({tree})"), Row("o2", "  ostree pull, same server"),
            Row("o3", "pycfs ostree pull-local from a bare repository"), Row("o4", "  ostree pull-local, bare to bare")]
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/"
        warm([os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs])
        for _ in range(runs):
            for row, kind in zip(rows, ("pycfs-http", "ostree-http", "pycfs-local", "ostree-local")):
                dest = base / f"dest-{kind}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                if kind.startswith("pycfs"):  # as root, like ostree (bare repositories need it)
                    pycfs = [sys.executable, "-m", "pycfs.tools.cli", "--repo", str(dest)]
                    subprocess.run([*pycfs, "init"], check=True, capture_output=True)
                    argv = [*pycfs, "ostree", *(("pull", url) if kind == "pycfs-http" else ("pull-local", str(bare))),
                            "tree"]
                else:
                    mode = "archive" if kind == "ostree-http" else "bare"
                    subprocess.run(["ostree", "init", f"--repo={dest}", f"--mode={mode}"], check=True)
                    if kind == "ostree-http":
                        subprocess.run(["ostree", "remote", "add", f"--repo={dest}", "--no-gpg-verify", "r", url],
                                       check=True)
                        argv = ["ostree", "pull", f"--repo={dest}", "r", "tree"]
                    else:
                        argv = ["ostree", "pull-local", f"--repo={dest}", str(bare), "tree"]
                before = used_bytes(bench.xfs)
                row.samples.append(timed(argv)[0])
                row.disk_added = used_bytes(bench.xfs) - before
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def report(rows: list[Row], bench: Lab, stats: dict, runs: int) -> dict:
    from rich.console import Console
    from rich.table import Table

    by = {r.key: r for r in rows}
    table = Table(title=f"pycfs import benchmark: {human_size(bench.image_bytes)} image, {len(bench.files)} files "
                        f"> 64 bytes ({human_size(bench.file_bytes)}), {runs} runs, {os.cpu_count()} cores")
    for col in ("", "row", "median s", "min s", "max s", "peak RSS", "disk added"):
        table.add_column(col, justify="left" if col in ("", "row") else "right")
    for r in rows:
        s = r.stats()
        cells = [f"{v:.2f}" for v in s] if s else [r.note or "-", "", ""]
        table.add_row(r.key, r.title, *cells, human_size(r.peak_rss) if r.samples else "",
                      human_size(r.disk_added) if r.disk_added is not None else "")
    ratios = {
        "a/b": by["a"].median / by["b"].median,
        "a'/b": by["a'"].median / by["b"].median,
        "c/a": by["c"].median / by["a"].median,
        "disk(a)/image": (by["a"].disk_added or 0) / bench.image_bytes,
        "hash MiB/s (pycfs)": bench.file_bytes / by["b"].median / MIB,
        "hash MiB/s (fsverity digest)": bench.file_bytes / by["b'"].median / MIB,
    }
    if "h" in by:  # oci copy: goal h/h'' <= 1.5, disk < 1%
        ratios["h/h''"] = by["h"].median / by["h''"].median
        ratios["h'/h"] = by["h'"].median / by["h"].median
        ratios["disk(h)/image"] = (by["h"].disk_added or 0) / bench.image_bytes
    if "m" in by:  # EROFS generation speed
        ratios["mkcomposefs entries per s"] = DUMP_ENTRIES / by["m"].median
    if "f" in by:  # FUSE against the kernel: goals >= 0.5 for reads, <= 3 for the walk
        ratios["read FUSE/kernel throughput"] = by["f"].median / by["f'"].median
        ratios["find -ls FUSE/kernel time"] = by["g'"].median / by["g"].median
    console = Console(width=150)
    console.print(table)
    console.print("  ".join(f"{k} = {v:.3f}" if "/" in k and "MiB" not in k else f"{k} = {v:.0f}"
                            for k, v in ratios.items()))
    console.print(f"cold pull: {stats.get('objects_reflinked')} reflinked, {stats.get('objects_copied')} copied, "
                  f"{stats.get('objects_already_present')} already present, {stats.get('files_via_helper')} "
                  f"files via the helper")
    return {
        "image_bytes": bench.image_bytes, "files": len(bench.files), "file_bytes": bench.file_bytes, "runs": runs,
        "rows": {r.key: {"title": r.title, "seconds": [s.seconds for s in r.samples],
                         "peak_rss": r.peak_rss if r.samples else None, "disk_added": r.disk_added, "note": r.note}
                 for r in rows},
        "ratios": ratios, "pull_stats": stats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per row (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: about 1.5 GB)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="leave the lab (XFS, storage) mounted")
    parser.add_argument("--ostree-tree", metavar="DIR", default="/usr/lib/python3",
                        help="the tree the ostree rows commit and pull (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it creates a user and a loop-mounted XFS)")
    bench = set_up(args.scale)
    try:
        warm(bench.files)
        print(f"bench: {args.runs} runs per row...", file=sys.stderr)
        cold, rewarm, stats = row_cold_pull(bench, args.runs)
        import_only = row_import_only(bench, args.runs)
        ours, theirs = row_hashing(bench, args.runs)
        save = row_save_then_pull(bench, args.runs)
        mkcfs = row_mkcomposefs(bench, args.runs)
        mkcfs_dump = row_mkcomposefs_dumpfile(bench, args.runs)
        mounts = row_mounts(bench, args.runs)
        ostree_rows = rows_ostree(bench, args.runs, args.ostree_tree)
        copies = row_copy(bench, args.runs)
        figures = report([cold, import_only, ours, theirs, save, mkcfs, mkcfs_dump, rewarm, *mounts, *copies, *ostree_rows],
                         bench, stats, args.runs)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if not args.keep:
            tear_down(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
