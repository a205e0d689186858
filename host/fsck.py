"""Repository consistency check (`pycfs fsck`), phase by phase like cfsctl fsck.

1. objects: every objects/XX/rest must be named by its fs-verity digest (kernel
   measurement where the file has verity, else computed here, on worker threads);
2. streams: every entry a symlink that resolves to a readable splitstream whose
   object refs and named refs exist; every streams/refs/** link resolves;
3. images: every entry a symlink to an object; every object an image references
   exists; every images/refs/** link resolves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_fd
from pycfs.host.repository import Repository
from pycfs.host.splitstream import SplitStreamError
from pycfs.host.erofs.objects import image_object_ids


@dataclass
class FsckReport:
    objects_checked: int = 0
    streams_checked: int = 0
    images_checked: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, path, detail)

    def add(self, kind: str, path: str, detail: str) -> None:
        self.errors.append((kind, path, detail))

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict:
        return {
            "ok": self.ok,
            "objects": self.objects_checked,
            "streams": self.streams_checked,
            "images": self.images_checked,
            "errors": [{"kind": k, "path": p, "detail": d} for k, p, d in self.errors],
        }

    def lines(self) -> list[str]:
        out = [
            f"objects: {self.objects_checked} checked",
            f"streams: {self.streams_checked} checked",
            f"images: {self.images_checked} checked",
        ]
        if self.ok:
            out.append("status: ok")
        else:
            out.append(f"status: {len(self.errors)} error(s)")
            out += [f"  - fsck: {k}: {p}: {d}" for k, p, d in self.errors]
        return out


def _check_object(repo: Repository, xx: str, name: str) -> tuple[str, str] | None:
    """None when objects/xx/name is sound, else (kind, detail)."""
    try:
        expected = repo.id_from_hex(xx + name)
    except PycfsError:
        return "object-invalid-name", "name is not a digest"
    try:
        fd = os.open(f"objects/{xx}/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=repo.dirfd)
    except OSError as e:
        return "object-open-failed", e.strerror or str(e)
    try:
        measured = syscalls.fsverity_measure(fd, repo.hash_alg_id)
        if measured is None:
            if repo.secure:
                return "object-verity-missing", "fs-verity is not enabled on this object"
            measured = digest_fd(fd, repo.alg)
    finally:
        os.close(fd)
    if measured != expected:
        return "object-digest-mismatch", f"content digest is {measured.hex()}"
    return None


async def _check_objects(repo: Repository, report: FsckReport) -> None:
    top = repo.path / "objects"
    if not top.is_dir():
        return
    limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    async def one(xx: str, name: str) -> None:
        result = await trio.to_thread.run_sync(_check_object, repo, xx, name, limiter=limiter)
        report.objects_checked += 1
        if result:
            report.add(result[0], f"objects/{xx}/{name}", result[1])

    for sub in sorted(os.listdir(top)):
        path = top / sub
        if sub.startswith(".tmp-object-"):
            continue  # a crashed writer's leftover; gc removes it
        if not path.is_dir() or len(sub) != 2:
            report.add("unexpected-file", f"objects/{sub}", "not an object subdirectory")
            continue
        async with trio.open_nursery() as nursery:
            for name in sorted(os.listdir(path)):
                nursery.start_soon(one, sub, name)


def _resolves(repo: Repository, rel: str) -> bool:
    return os.path.exists(repo.path / rel)


def _check_refs(repo: Repository, top: str, report: FsckReport) -> None:
    base = repo.path / top
    if not base.exists():
        return
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, repo.path)
            if os.path.islink(full):
                if not os.path.exists(full):
                    report.add("broken-symlink", rel, f"target {os.readlink(full)} does not exist")
            elif not os.path.isdir(full):
                report.add("unexpected-file-type", rel, "neither a directory nor a symlink")


def _first_level_links(repo: Repository, top: str, report: FsckReport) -> list[tuple[str, bytes]]:
    """(name, object id) of each symlink in top/ (refs excluded); problems go to the report."""
    found = []
    base = repo.path / top
    if not base.exists():
        return found
    for name in sorted(os.listdir(base)):
        if name == "refs":
            continue
        rel = f"{top}/{name}"
        full = base / name
        if not full.is_symlink():
            report.add("entry-not-symlink", rel, "not a symlink")
            continue
        target = os.readlink(full)
        try:
            object_id = repo.parse_object_link(target)
        except PycfsError as e:
            report.add("bad-symlink", rel, str(e))
            continue
        if not repo.has_object(object_id):
            report.add("broken-symlink", rel, f"object {target} is missing")
            continue
        found.append((name, object_id))
    return found


def _check_streams(repo: Repository, report: FsckReport) -> None:
    for name, object_id in _first_level_links(repo, "streams", report):
        report.streams_checked += 1
        rel = f"streams/{name}"
        try:
            reader = repo.open_stream_by_id(object_id)
        except (SplitStreamError, PycfsError, OSError) as e:
            report.add("stream-open-failed", rel, str(e))
            continue
        for ref in reader.object_refs:
            if not repo.has_object(ref):
                report.add("missing-object-ref", rel, f"object {ref.hex()} is missing")
        for ref_name, ref in reader.named_refs.items():
            if not repo.has_object(ref):
                report.add("missing-named-ref", rel, f"{ref_name} -> {ref.hex()} is missing")
    _check_refs(repo, "streams/refs", report)


def _check_images(repo: Repository, report: FsckReport) -> None:
    for name, object_id in _first_level_links(repo, "images", report):
        report.images_checked += 1
        rel = f"images/{name}"
        try:
            referenced = image_object_ids(repo.read_object(object_id), repo.alg)
        except (PycfsError, ValueError, OSError) as e:
            report.add("image-invalid", rel, str(e))
            continue
        for ref in sorted(referenced):
            if not repo.has_object(ref):
                report.add("image-missing-object", rel, f"object {ref.hex()} is missing")
    _check_refs(repo, "images/refs", report)


def fsck(repo: Repository, metadata_only: bool = False) -> FsckReport:
    report = FsckReport()
    if not metadata_only:
        trio.run(_check_objects, repo, report)
    _check_streams(repo, report)
    _check_images(repo, report)
    return report
