"""Repository consistency check (`pycfs fsck`) and repair, phase by phase like cfsctl fsck.

1. objects: every objects/XX/rest must be a regular file named by its fs-verity digest
   (kernel measurement where the file has verity, else hashed on the object worker
   processes, the project's one way to hash in parallel);
2. streams: every entry a symlink that resolves to an intact splitstream whose object refs
   and named refs exist; every streams/refs/** link resolves;
3. images: every entry a symlink to an intact EROFS image whose referenced objects exist;
   every images/refs/** link resolves;
4. with `verify_layers`, every oci-layer-<diff_id> stream reassembles to a tar whose sha256
   is its diff_id.

`repair` drops what cannot be trusted, so that the next pull rebuilds it: corrupt objects are
deleted, streams and images that fail a check lose their symlink, and refs left dangling are
removed. Nothing that checks out is touched.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from pycfs.host import syscalls
from pycfs.host.erofs.objects import image_object_ids
from pycfs.host.errors import PycfsError
from pycfs.host.fsverity import digest_bytes
from pycfs.host.progress import StepProgress
from pycfs.host.oci.streams import TAG_DIR
from pycfs.host.repository import REF_DEPTH_LIMIT, Repository, open_dir_nofollow
from pycfs.host.splitstream import SplitStreamReader, names_image
from pycfs.host.streamcat import stream_digest
from pycfs.protocol.text import is_clean_text, printable

LAYER_PREFIX = "oci-layer-"


@dataclass
class FsckReport:
    objects_checked: int = 0
    streams_checked: int = 0
    images_checked: int = 0
    layers_verified: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, path, detail)
    repaired: list[str] = field(default_factory=list)  # what repair removed, as repo-relative paths
    # Layer streams imported unchecked (marked, `Repository.stream_verified`) whose tar
    # --verify-layers found to be their diff_id's; those whose mark --repair cleared.
    unverified_ok: list[str] = field(default_factory=list)
    marks_cleared: list[str] = field(default_factory=list)
    # images/<hex> links --repair made again: the image is intact and a stream names it
    relinked: list[str] = field(default_factory=list)

    def add(self, kind: str, path: str, detail: str) -> None:
        # (names are shown escaped: the report goes to a terminal and into JSON)
        self.errors.append((kind, printable(path), printable(detail)))

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict:
        return {
            "ok": self.ok,
            "objects": self.objects_checked,
            "streams": self.streams_checked,
            "images": self.images_checked,
            "layers_verified": self.layers_verified,
            "errors": [{"kind": k, "path": p, "detail": d} for k, p, d in self.errors],
            "repaired": self.repaired,
            "unverified_ok": self.unverified_ok,
            "marks_cleared": self.marks_cleared,
            "relinked": self.relinked,
        }

    def lines(self) -> list[str]:
        out = [
            f"objects: {self.objects_checked} checked",
            f"streams: {self.streams_checked} checked",
            f"images: {self.images_checked} checked",
        ]
        if self.layers_verified:
            out.append(f"layers: {self.layers_verified} re-hashed against their diff_id")
        if self.marks_cleared:
            out.append(f"layers: {len(self.marks_cleared)} imported unchecked found to be their diff_id's: "
                       "marked checked, so oci:DIR pulls and oci copy take them")
        elif self.unverified_ok:
            out.append(f"layers: {len(self.unverified_ok)} imported unchecked found to be their diff_id's: "
                       "`pycfs fsck --verify-layers --repair` marks them checked")
        if self.ok:
            out.append("status: ok")
        else:
            out.append(f"status: {len(self.errors)} error(s)")
            out += [f"  - fsck: {k}: {p}: {d}" for k, p, d in self.errors]
        if self.repaired:
            out.append(f"repaired: removed {len(self.repaired)} untrustworthy entries; "
                       "pull the affected images again to restore them")
            out += [f"  - removed {p}" for p in self.repaired]
        if self.relinked:
            out.append(f"repaired: linked {len(self.relinked)} intact image(s) again")
            out += [f"  - linked {p}" for p in self.relinked]
        if not self.ok and not self.repaired and not self.relinked:
            out.append("run `pycfs fsck --repair` to drop what cannot be trusted, then pull the affected images again")
        return out


# ---------------------------------------------------------------------------- objects


def _list_objects(repo: Repository, report: FsckReport) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(relative path, expected id) of each regular object file, and the odd entries
    (reported; a repair removes them). objects/ and its subdirectories are opened from their
    parents with O_NOFOLLOW: a symlink there is reported, never listed through."""
    found: list[tuple[str, bytes]] = []
    odd: list[str] = []
    try:
        top = open_dir_nofollow(repo.dirfd, "objects")
    except OSError:
        return found, odd  # missing, or not a directory (`_check_layout` reports it)
    try:
        with os.scandir(top) as entries:
            subs = sorted(entries, key=lambda e: e.name)
        for sub_entry in subs:
            sub = sub_entry.name
            rel_sub = f"objects/{sub}"
            is_dir = sub_entry.is_dir(follow_symlinks=False)
            if sub.startswith(".tmp-object-"):
                if not sub_entry.is_file(follow_symlinks=False):  # pycfs's temporary files are files
                    report.add("unexpected-file", rel_sub, "a temporary object that is not a regular file")
                    odd.append(rel_sub)
                continue  # else a crashed writer's leftover (or a running one's): gc removes it
            if sub_entry.is_symlink():
                report.add("unexpected-file", rel_sub, "a symlink where an object subdirectory belongs "
                           "(never followed: a repair removes the link, not what it names)")
                odd.append(rel_sub)
                continue
            if len(sub) != 2 or not is_dir:
                report.add("unexpected-file", rel_sub, "not an object subdirectory")
                if not is_dir:
                    odd.append(rel_sub)
                continue
            try:
                subdir = open_dir_nofollow(top, sub)
            except OSError as e:
                report.add("unexpected-file", rel_sub, f"cannot be opened: {e.strerror}")
                continue
            try:
                with os.scandir(subdir) as entries:
                    names = sorted(entries, key=lambda e: e.name)
            finally:
                os.close(subdir)
            for entry in names:
                rel = f"{rel_sub}/{entry.name}"
                try:
                    expected = repo.id_from_hex(sub + entry.name)
                except PycfsError:
                    report.add("object-invalid-name", rel, "name is not a digest")
                    odd.append(rel)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    report.add("object-not-regular", rel, "not a regular file")
                    odd.append(rel)
                    continue
                found.append((rel, expected))
    finally:
        os.close(top)
    return found, odd


def _measure_kernel(repo: Repository, rel: str) -> bytes | OSError | None:
    try:
        fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=repo.dirfd)
    except OSError as e:
        return e
    try:
        return syscalls.fsverity_measure(fd, repo.hash_alg_id)
    except OSError as e:
        return e
    finally:
        os.close(fd)


# What an object's open or read failing with says about the object itself (gone, not a
# regular file, a link, unreadable media); anything else (EMFILE, ENOMEM, EACCES ...) is the
# process's: a repair removing on it deleted intact objects of live images.
_OBJECT_FAULTS = {errno.ENOENT, errno.EISDIR, errno.EINVAL, errno.ELOOP, errno.EIO, errno.ENXIO, errno.ENODEV,
                  errno.ENOTDIR}
_NOT_THE_OBJECT = {errno.EMFILE: "raise the open-file limit, `ulimit -n`", errno.ENFILE: "the system's open files "
                   "are at their limit", errno.ENOMEM: "free some memory", errno.EACCES: "run it as the repository's "
                   "owner", errno.EPERM: "run it as the repository's owner"}


def _owned_here(repo: Repository, rel: str) -> bool:
    try:
        return os.stat(rel, dir_fd=repo.dirfd, follow_symlinks=False).st_uid == os.geteuid()
    except OSError:
        return False


def _stop_unless_its_fault(e: Exception, repo: Repository, rel: str) -> None:
    """An OSError reading rel that says nothing of it (`_OBJECT_FAULTS`) stops fsck: this
    process's lot is no ground to judge, and a repair would remove what is intact."""
    if isinstance(e, OSError) and e.errno not in _OBJECT_FAULTS:
        if e.errno in (errno.EACCES, errno.EPERM) and _owned_here(repo, rel):
            return  # the owner's own file it may not read (mode 000, say): damage, which a repair removes
        what = _NOT_THE_OBJECT.get(e.errno or 0, "see what keeps fsck from reading it")
        raise PycfsError(f"fsck: cannot read {rel} in {repo.path}: {e.strerror or e} ({what}, then run fsck "
                         "again); nothing was judged or removed")


def _check_objects(repo: Repository, report: FsckReport, progress: StepProgress, jobs: int | None) -> list[str]:
    """Returns the bad objects' paths."""
    from pycfs.host.workers.pool import digest_files

    objects, bad = _list_objects(repo, report)
    progress.start("objects", len(objects))
    todo: list[tuple[str, bytes]] = []
    for rel, expected in objects:
        if repo.secure:
            measured = _measure_kernel(repo, rel)
            if measured is None:
                report.add("object-verity-missing", rel, "fs-verity is not enabled on this object")
                bad.append(rel)
                progress.step()
                continue
            if isinstance(measured, bytes):
                if measured != expected:
                    report.add("object-digest-mismatch", rel, f"content digest is {measured.hex()}")
                    bad.append(rel)
                progress.step()
                continue
        todo.append((rel, expected))
    digests = trio.run(digest_files, [str(repo.path / rel) for rel, _ in todo], repo.alg, jobs, progress.step)
    for (rel, expected), got in zip(todo, digests):
        if isinstance(got, OSError):
            _stop_unless_its_fault(got, repo, rel)
            report.add("object-open-failed", rel, got.strerror or str(got))
            bad.append(rel)
        elif got != expected:
            report.add("object-digest-mismatch", rel, f"content digest is {got.hex()}")
            bad.append(rel)
    report.objects_checked = len(objects)
    return bad


# ---------------------------------------------------------------------------- links


def _first_level_links(repo: Repository, top: str, report: FsckReport) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name, object id) of each sound symlink in top/ (refs excluded), and the paths of the
    broken entries (reported)."""
    found: list[tuple[str, bytes]] = []
    bad: list[str] = []
    base = repo.path / top
    if not _is_dir(repo, top):
        return found, bad  # missing, or reported by `_check_layout`
    for name in sorted(os.listdir(base)):
        if name == "refs":
            continue
        rel = f"{top}/{name}"
        full = base / name
        if not is_clean_text(name):
            report.add("name-not-utf8", rel, NOT_UTF8)
            bad.append(rel)
            continue
        if not full.is_symlink():
            report.add("entry-not-symlink", rel, "not a symlink")
            if not full.is_dir():
                bad.append(rel)  # a file where pycfs keeps only symlinks: a repair removes it
            continue
        target = os.readlink(full)
        try:
            object_id = repo.parse_object_link(target)
        except PycfsError as e:
            report.add("bad-symlink", rel, str(e))
            bad.append(rel)
            continue
        if target != f"../{repo.object_relpath(object_id)}":  # (read by the id at its end, never followed)
            report.add("bad-symlink", rel, f"target {target} is not the object's place in objects/")
            bad.append(rel)
            continue
        if not repo.has_object(object_id):
            report.add("broken-symlink", rel, f"object {target} is missing")
            bad.append(rel)
            continue
        found.append((name, object_id))
    return found, bad


NOT_UTF8 = "a name pycfs and composefs-rs never make (not UTF-8 text): no tool lists it"


def _is_dir(repo: Repository, rel: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(rel, dir_fd=repo.dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_layout(repo: Repository, report: FsckReport) -> list[str]:
    """Each directory of the layout is a directory of the repository (or absent); returns the
    entries in their place (reported), which a repair removes: a link goes, never its target."""
    bad = repo.layout_damage()
    for top, kind in bad:
        if kind == "symlink":
            report.add("layout-not-directory", top, "a symlink: pycfs keeps it in the repository and never "
                       "follows this link (a repair removes the link, not what it names)")
        else:
            report.add("layout-not-directory", top, "not a directory (a repair removes it)")
    return [top for top, _ in bad]


def _check_refs(repo: Repository, top: str, report: FsckReport) -> list[str]:
    """The refs tree at top, walked as every listing walks it (`Repository.walk_refs`); returns
    what a repair removes: dangling links, links to directories, what lies past the depth
    limit, anything neither a directory nor a symlink, and non-tags under the OCI tags."""
    if not _is_dir(repo, top):
        return []  # missing, or reported by `_check_layout`
    bad: list[str] = []
    tags = f"streams/refs/{TAG_DIR}/"
    for entry in repo.walk_refs(top):
        rel = entry.path
        name = rel.rsplit("/", 1)[-1]
        if entry.kind == "dir-link":
            report.add("ref-dir-symlink", rel, f"a symlink to the directory {entry.target}: no listing and no gc "
                       "follows it (a repair removes the link, not what it names)")
        elif entry.kind == "too-deep":
            report.add("ref-too-deep", rel, f"a directory nested deeper than refs may be ({REF_DEPTH_LIMIT} "
                       "components): nothing lists what it holds")
        elif not is_clean_text(name) and entry.kind != "dir":
            report.add("name-not-utf8", rel, NOT_UTF8)
        elif entry.kind == "dangling":
            report.add("broken-symlink", rel, f"target {entry.target} does not exist")
        elif entry.kind == "other":
            report.add("unexpected-file-type", rel, "neither a directory nor a symlink")
        elif entry.kind == "dir" and rel.startswith(tags) and "/" not in rel[len(tags):]:
            report.add("unexpected-file-type", rel, "a directory where OCI tags are kept (a tag is a symlink)")
        else:
            continue
        bad.append(rel)
    return [rel for rel in bad if not any(rel.startswith(b + "/") for b in bad)]


def _read_intact(read: Callable[[bytes], bytes], repo: Repository, object_id: bytes, rehash: bool) -> bytes:
    """The object's bytes (``read``: the repository's reader for its kind, bounded by its
    size); with ``rehash`` checked against its name here (when the objects phase ran, it
    hashed every object already and reported those that differ)."""
    data = read(object_id)
    if rehash and digest_bytes(data, repo.alg) != object_id:
        raise PycfsError("its content does not match its digest")
    return data


# What fsck found of one stream or image object, by id: why it is damaged itself (None when
# it is not), and the (name, object id) of the streams and images it names.
Examined = dict[bytes, tuple[str | None, list[tuple[str, bytes]]]]


def _check_streams(repo: Repository, report: FsckReport, progress: StepProgress, rehash: bool,
                   examined: Examined) -> list[str]:
    links, bad = _first_level_links(repo, "streams", report)
    progress.start("streams", len(links))
    for name, object_id in links:
        rel = f"streams/{name}"
        report.streams_checked += 1
        progress.step()
        try:
            reader = SplitStreamReader(_read_intact(repo.stream_bytes, repo, object_id, rehash), repo.alg)
        except (PycfsError, OSError) as e:
            _stop_unless_its_fault(e, repo, rel)
            report.add("stream-open-failed", rel, str(e))
            examined[object_id] = (str(e), [])
            bad.append(rel)
            continue
        missing = [ref for ref in reader.object_refs if not repo.has_object(ref)]
        for ref in missing:
            report.add("missing-object-ref", rel, f"object {ref.hex()} is missing")
        missing_named = [(n, ref) for n, ref in reader.named_refs.items() if not repo.has_object(ref)]
        for ref_name, ref in missing_named:
            report.add("missing-named-ref", rel, f"{ref_name} -> {ref.hex()} is missing")
        examined[object_id] = ("objects it holds are missing" if missing or missing_named else None,
                               list(reader.named_refs.items()))
        if missing or missing_named:
            bad.append(rel)
    return bad


def _examine(repo: Repository, object_id: bytes, image: bool, rehash: bool) -> tuple[str | None, list[tuple[str, bytes]]]:
    """A stream or image no link names (reached by a named ref): as `Examined` holds it."""
    try:
        if image:
            data = _read_intact(repo.image_bytes, repo, object_id, rehash)
            held, named = image_object_ids(data, repo.alg), []
        else:
            reader = SplitStreamReader(_read_intact(repo.stream_bytes, repo, object_id, rehash), repo.alg)
            held, named = set(reader.object_refs), list(reader.named_refs.items())
    except (PycfsError, OSError) as e:
        _stop_unless_its_fault(e, repo, repo.object_relpath(object_id))
        return str(e), []
    if any(not repo.has_object(ref) for ref in held):
        return "objects it holds are missing", named
    return None, named


def _check_chains(repo: Repository, report: FsckReport, examined: Examined, rehash: bool, bad: list[str]) -> list[str]:
    """Each sound stream link whose stream names (through named refs, by object id, to any
    depth) a stream or image that is damaged or missing: its image cannot be made whole
    (a repair removed the layer stream's link, say, while its config still names it).
    Reported and returned: a repair removes the link, then the refs to it dangle."""
    links, _ = _first_level_links(repo, "streams", FsckReport())  # problems were reported above
    pending = [(ref, names_image(n)) for _, oid in links if oid in examined for n, ref in examined[oid][1]]
    while pending:
        object_id, image = pending.pop()
        if object_id not in examined:
            examined[object_id] = _examine(repo, object_id, image, rehash)
            pending += [(ref, names_image(n)) for n, ref in examined[object_id][1]]
    damaged = {oid: why for oid, (why, _) in examined.items() if why is not None}
    changed = True
    while changed:  # what names something damaged is damaged (named refs may form cycles)
        changed = False
        for oid, (_, named) in examined.items():
            if oid not in damaged:
                for n, ref in named:
                    if ref in damaged:
                        damaged[oid] = f"it names {n} ({ref.hex()}), which is incomplete"
                        changed = True
                        break
    found: list[str] = []
    for name, object_id in links:
        rel = f"streams/{name}"
        if rel not in bad and object_id in damaged:
            report.add("incomplete-named-ref", rel, damaged[object_id])
            found.append(rel)
    return found


def _check_image_links(repo: Repository, report: FsckReport, examined: Examined, repair: bool) -> None:
    """An intact image a stream names whose images/<hex> link is gone (a pull killed
    between storing it and linking it, a hand's rm): mounts by name fail though nothing is
    damaged. Reported; a repair links it again."""
    named = {ref for why, refs in examined.values() if why is None for n, ref in refs if names_image(n)}
    for image_id in sorted(named):
        if image_id in examined and examined[image_id][0] is None and not repo.image_linked(image_id):
            rel = f"images/{image_id.hex()}"
            report.add("image-unlinked", rel, "an intact image a stream names has no link: mounting it by name fails")
            if repair:
                repo.link_image(image_id)
                report.relinked.append(rel)


def _check_images(repo: Repository, report: FsckReport, progress: StepProgress, rehash: bool) -> list[str]:
    links, bad = _first_level_links(repo, "images", report)
    progress.start("images", len(links))
    for name, object_id in links:
        rel = f"images/{name}"
        report.images_checked += 1
        progress.step()
        try:
            referenced = image_object_ids(_read_intact(repo.image_bytes, repo, object_id, rehash), repo.alg)
        except (PycfsError, OSError) as e:
            _stop_unless_its_fault(e, repo, rel)
            report.add("image-invalid", rel, str(e))
            bad.append(rel)
            continue
        missing = sorted(ref for ref in referenced if not repo.has_object(ref))
        for ref in missing:
            report.add("image-missing-object", rel, f"object {ref.hex()} is missing")
        if missing:
            bad.append(rel)
    return bad


def _verify_layers(repo: Repository, report: FsckReport, progress: StepProgress, skip: set[str],
                   repair: bool) -> list[str]:
    """Re-hash each layer stream's tar against the diff_id in its name; one imported
    unchecked that matches is noted, and with ``repair`` marked checked."""
    links, _ = _first_level_links(repo, "streams", FsckReport())  # problems were reported above
    layers = [(n, i) for n, i in links if n.startswith(LAYER_PREFIX) and f"streams/{n}" not in skip]
    progress.start("layers", len(layers))
    bad: list[str] = []
    for name, object_id in layers:
        rel = f"streams/{name}"
        progress.step()
        alg, _, expected = name[len(LAYER_PREFIX):].partition(":")
        if alg not in ("sha256", "sha512"):
            continue  # not a diff_id-named layer
        try:
            actual = stream_digest(repo, object_id, alg)
        except (PycfsError, OSError) as e:
            _stop_unless_its_fault(e, repo, rel)
            report.add("layer-unreadable", rel, str(e))
            bad.append(rel)
            continue
        report.layers_verified += 1
        if actual != expected:
            report.add("layer-diffid-mismatch", rel, f"the stream's tar is {alg}:{actual}")
            bad.append(rel)
        elif not repo.stream_verified(object_id):
            report.unverified_ok.append(printable(rel))
            if repair:
                repo.mark_verified(object_id)
                if repo.stream_verified(object_id):  # (an object of another user's keeps it)
                    report.marks_cleared.append(printable(rel))
    return bad


def _remove(repo: Repository, rel: str, report: FsckReport) -> None:
    if repo.remove_path(rel):
        report.repaired.append(printable(rel))


# ---------------------------------------------------------------------------- fsck


def fsck(repo: Repository, metadata_only: bool = False, *, verify_layers: bool = False, repair: bool = False,
         progress: StepProgress | None = None, jobs: int | None = None) -> FsckReport:
    """Check the repository; with ``repair`` (needs a writable repository) remove what failed."""
    progress = progress or StepProgress()
    if not repair:
        return _fsck(repo, metadata_only, verify_layers, False, progress, jobs)
    repo.require_writable()
    # Alone, as gc: a pull rewriting an object this removes (or linking one) would lose it.
    repo.lock_exclusive("fsck --repair", progress.note)
    try:
        return _fsck(repo, metadata_only, verify_layers, True, progress, jobs)
    finally:
        repo.unlock_exclusive()


def _fsck(repo: Repository, metadata_only: bool, verify_layers: bool, repair: bool, progress: StepProgress,
          jobs: int | None) -> FsckReport:
    report = FsckReport()
    bad_layout = _check_layout(repo, report)
    if repair:  # first: the phases below then see the layout a pull would make again
        for rel in bad_layout:
            _remove(repo, rel, report)
    # objects/ not a directory of the repository (left as it is): no object can be looked
    # at, so no stream or image checked; the report says what a repair removes first.
    no_objects = "objects" in bad_layout and not repair
    if not metadata_only and not no_objects:
        bad_objects = _check_objects(repo, report, progress, jobs)
        if repair:
            for rel in bad_objects:
                _remove(repo, rel, report)
    rehash = metadata_only  # else the objects phase has hashed them all
    examined: Examined = {}
    bad = [] if no_objects else \
        _check_streams(repo, report, progress, rehash, examined) + _check_images(repo, report, progress, rehash)
    if not no_objects:
        bad += _check_chains(repo, report, examined, rehash, bad)
    if verify_layers and not no_objects:
        bad += _verify_layers(repo, report, progress, set(bad), repair)
    if repair:
        for rel in bad:
            _remove(repo, rel, report)
    if not no_objects:  # (after the removals: a file in the link's place has gone by then)
        _check_image_links(repo, report, examined, repair)
    bad_refs = _check_refs(repo, "streams/refs", report) + _check_refs(repo, "images/refs", report)
    if repair:
        # Refs that pointed at what was just removed dangle now too.
        after = _check_refs(repo, "streams/refs", FsckReport()) + _check_refs(repo, "images/refs", FsckReport())
        for rel in dict.fromkeys(bad_refs + after):
            _remove(repo, rel, report)
    return report

