"""`pycfs oci pull containers-storage:REF` as an unprivileged user against real rootless podman.

What must hold: every layer rebuilds byte-exact (sha256 of `pycfs cat oci-layer-<diff_id>`
is the diff_id), the streams are the same as a pull of the same image from its OCI layout,
a second pull stores nothing, on a reflinking XFS nothing is copied and the filesystem
barely grows, and `podman rmi` waits for a running import.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import imagebuild
from imagebuild import MIB, File, ImageSpec
from procs import kill_child_mid_pull, pids_of

from pycfs.tools.dev import lab

pytestmark = pytest.mark.integration


def _init_repo(user, name: str = "repo") -> Path:
    repo = user.tmpdir("cs-") / name
    user.pycfs("--repo", repo, "init")
    return repo


def _pull(user, repo: Path, *args: str) -> dict:
    out = user.pycfs("--repo", repo, "oci", "pull", "--json", *args)
    return json.loads(out.stdout)


def _layer_sha256(user, repo: Path, diff_id: str) -> str:
    out = user.pycfs("--repo", repo, "cat", f"oci-layer-{diff_id}")
    return "sha256:" + hashlib.sha256(out.stdout).hexdigest()


def _streams(repo: Path) -> dict[str, str]:
    d = repo / "streams"
    return {p.name: os.readlink(p) for p in d.iterdir() if p.is_symlink()}


def test_pull_rebuilds_every_layer_exactly(podman_user, multilayer_loaded):
    user, image = podman_user, multilayer_loaded
    repo = _init_repo(user)
    result = _pull(user, repo, f"containers-storage:{image.ref}", "multi")
    assert result["image_id"] == image.image_id
    assert result["manifest"] == image.built.manifest_digest
    assert result["config"] == image.built.config_digest
    assert [layer["diff_id"] for layer in result["layers"]] == image.built.diff_ids
    for diff_id in image.built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id
    stats = result["stats"]
    assert stats["layers"] == 3 and stats["layers_already_present"] == 0
    new_objects = stats["objects_reflinked"] + stats["objects_copied"]
    assert new_objects > 0
    # data/small64 (64 bytes) is inline; data/small65 is an object.
    assert stats["files_inlined"] > 0 and stats["bytes_inlined"] > 0
    tag = os.readlink(repo / "streams/refs/oci/multi")
    assert tag == f"../../oci-manifest-{image.built.manifest_digest}"

    # The same image pulled from its OCI layout (the tar path) gives identical streams.
    other = _init_repo(user, "from-layout")
    user.pycfs("--repo", other, "oci", "pull", f"oci:{image.built.path}", "multi")
    assert _streams(other) == _streams(repo)

    # images / inspect see it.
    listed = json.loads(user.pycfs("--repo", repo, "oci", "images", "--json").stdout)
    assert [(i["tag"], i["manifest"], i["layers"]) for i in listed["images"]] == [
        ("multi", image.built.manifest_digest, 3)
    ]
    inspected = json.loads(user.pycfs("--repo", repo, "oci", "inspect", "multi").stdout)
    assert [layer["verity"] for layer in inspected["layers"]] == [layer["verity"] for layer in result["layers"]]
    raw = user.pycfs("--repo", repo, "oci", "inspect", "--config", "multi").stdout
    assert "sha256:" + hashlib.sha256(raw.rstrip(b"\n")).hexdigest() == image.built.config_digest


def test_lookup_forms_and_second_pull(podman_user, multilayer_loaded):
    user, image = podman_user, multilayer_loaded
    repo = _init_repo(user)
    first = _pull(user, repo, "--verify-diffid", f"containers-storage:{image.ref}", "t0")
    short = image.ref.removeprefix("localhost/")
    forms = [
        short,  # short name
        short.removesuffix(":latest"),  # no tag = :latest
        image.image_id,
        image.image_id[:12],  # unique ID prefix
        f"@{image.built.manifest_digest}",
    ]
    for n, form in enumerate(forms, 1):
        started = time.monotonic()
        again = _pull(user, repo, f"containers-storage:{form}", f"t{n}")
        wall = time.monotonic() - started
        assert again["image_id"] == image.image_id, form
        assert again["config_verity"] == first["config_verity"]
        s = again["stats"]
        assert s["layers_already_present"] == 3, form
        assert s["objects_reflinked"] == s["objects_copied"] == s["objects_already_present"] == 0
        assert s["bytes_inlined"] == 0
        assert again["seconds"] < 0.5, again["seconds"]  # the import itself
        assert wall < 10  # including interpreter start-up as another user
    missing = user.pycfs("--repo", repo, "oci", "pull", "containers-storage:no-such-image", check=False)
    assert missing.returncode == 1
    assert b"pycfs: error: image 'no-such-image' not found" in missing.stderr


def test_pull_inside_podman_unshare_reads_the_users_store(podman_user, restrictive_loaded):
    """What the helper-failure line recommends: `podman unshare pycfs oci pull ...` (euid 0
    in the user's namespace) read root's store ("/var/lib/containers/storage/overlay-images:
    permission denied"). It reads the user's, and as namespace root opens every file itself."""
    user, image = podman_user, restrictive_loaded
    repo = _init_repo(user)
    out = user.unshare(user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", "--json",
                       f"containers-storage:{image.ref}", "un")
    result = json.loads(out.stdout)
    assert (result["image_id"], result["manifest"]) == (image.image_id, image.built.manifest_digest)
    assert result["stats"]["files_via_helper"] == 0 and result["stats"]["layers_already_present"] == 0
    for diff_id in image.built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id


def _relayout(built, dest: Path, top: dict) -> str:
    """A copy of layout `built` whose index.json names document `top` (stored as a blob);
    its digest."""
    shutil.copytree(built.path, dest)
    raw = json.dumps(top, sort_keys=True).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (dest / "blobs/sha256" / digest).write_bytes(raw)
    media = top.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": media, "digest": f"sha256:{digest}", "size": len(raw)}]}))
    return f"sha256:{digest}"


def test_an_image_with_several_manifests_is_pulled_by_each_digest(podman_user, shared_tmp_path):
    """podman pulls through a manifest list (every multi-arch registry image) and pulls the same
    image from a second source: images.json has `digest` = the list's, big-data `manifest` =
    the last source's and a `manifest-<digest>` per manifest, and no `digests` list. Every
    reference podman accepts finds it (`NAME@<list>` read the list as a manifest, `NAME@<instance>`
    and `NAME@<second>` were "not found"); the manifest recorded is always the instance's own."""
    user = podman_user
    spec = ImageSpec([[File("etc/hello", b"hello\n"), File("data/blob", size=300)]])
    built = imagebuild.build_layout(spec, shared_tmp_path / "plain")
    instance = built.manifest_digest
    arch = json.loads((built.path / "blobs/sha256" / built.config_digest[7:]).read_bytes())["architecture"]
    size = (built.path / "blobs/sha256" / instance[7:]).stat().st_size
    listed = _relayout(built, shared_tmp_path / "listed", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": instance, "size": size,
                       "platform": {"architecture": arch, "os": "linux"}}]})
    manifest = json.loads((built.path / "blobs/sha256" / instance[7:]).read_bytes())
    second = _relayout(built, shared_tmp_path / "second", {**manifest, "annotations": {"source": "second"}})
    for layout in ("listed", "second"):
        user.run(["skopeo", "copy", "--quiet", f"oci:{shared_tmp_path / layout}",
                  f"containers-storage:localhost/pycfs-test-mm-{layout}:1"])
    podman_says = user.podman("image", "inspect", "--format", "{{.Id}} {{.Digest}}",
                              "localhost/pycfs-test-mm-listed:1").stdout.decode().split()
    assert podman_says == [built.config_digest[7:], listed]  # the one image, known by the list's digest
    repo = _init_repo(user)
    for n, (ref, want) in enumerate([
        (f"localhost/pycfs-test-mm-listed@{listed}", instance),
        (f"localhost/pycfs-test-mm-listed@{instance}", instance),
        (f"localhost/pycfs-test-mm-second@{second}", second),
        (f"@{listed}", instance),
        ("localhost/pycfs-test-mm-listed:1", second),  # big-data `manifest`: the last pulled
    ]):
        result = _pull(user, repo, f"containers-storage:{ref}", f"t{n}")
        assert (result["image_id"], result["manifest"]) == (built.config_digest[7:], want), ref
        assert os.readlink(repo / f"streams/refs/oci/t{n}") == f"../../oci-manifest-{want}"
        raw = user.pycfs("--repo", repo, "cat", f"oci-manifest-{want}").stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == want  # (the stream holds the manifest itself)


def _used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _file_bytes(spec: ImageSpec) -> int:
    return sum(e.length for layer in spec.layers for e in layer if isinstance(e, File))


TOP_TXT = b"the top layer's only file: longer than sixty-four bytes, so it is an object\n"


def _big_spec(tag: str, files: int, size: int) -> ImageSpec:
    seed = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "big")
    layers = [[imagebuild.Dir("big")] + [File(f"big/f{i}", size=size, seed=seed + i) for i in range(files)]]
    layers.append([File("top.txt", data=TOP_TXT)])
    return ImageSpec(layers)


def test_reflink_pull_copies_nothing(xfs_podman_user, image_cache, shared_tmp_path):
    user = xfs_podman_user
    spec = _big_spec("reflink", files=6, size=8 * MIB + 5)
    built = imagebuild.build_layout(spec, shared_tmp_path / "layout")
    imagebuild.load_into_storage(user, built.path, "localhost/pycfs-reflink:latest")
    multi = image_cache.load(user, "multilayer")
    repo = _init_repo(user)  # user.tmpdir() is on the same XFS as the graphroot
    before = _used_bytes(repo)
    result = _pull(user, repo, "containers-storage:pycfs-reflink")
    grown = _used_bytes(repo) - before
    print(f"XFS used space grew by {grown} bytes for {_file_bytes(spec)} file bytes")
    stats = result["stats"]
    assert stats["objects_copied"] == 0 and stats["bytes_copied"] == 0, stats
    assert stats["objects_reflinked"] == 7, stats
    assert stats["bytes_reflinked"] == 6 * (8 * MIB + 5) + len(TOP_TXT)
    assert grown < 0.02 * _file_bytes(spec), (grown, _file_bytes(spec))
    for diff_id in built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id

    result = _pull(user, repo, f"containers-storage:{multi.ref}")
    stats = result["stats"]
    assert stats["objects_copied"] == 0 and stats["objects_reflinked"] > 0, stats
    for diff_id in multi.built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id


def _holds_lock(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a lock on `path` (the kernel lists locks in fdinfo)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) != str(path):
                continue
            if "lock:" in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text():
                return True
        except FileNotFoundError:
            continue
    return False


def test_rmi_waits_for_running_import(podman_user, shared_tmp_path):
    user = podman_user
    ref = "localhost/pycfs-rmi-wait:latest"
    spec = _big_spec("rmi", files=6, size=32 * MIB)  # long enough to freeze mid-import
    built = imagebuild.build_layout(spec, shared_tmp_path / "layout")
    imagebuild.load_into_storage(user, built.path, ref)
    repo = _init_repo(user)
    lock = user.storage_root / "overlay-layers/layers.lock"

    # Run as the user directly, not through runuser: runuser stops itself when its child
    # stops, and a SIGCONT racing with that would leave it stopped for good.
    argv = [user.python, "-m", "pycfs.tools.cli", "--repo", repo, "oci", "pull", "--json", f"containers-storage:{ref}"]
    pull = subprocess.Popen(list(map(str, argv)), cwd=user.home, env=user.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, user=user.uid, group=user.gid, extra_groups=[])
    rmi = None
    try:
        deadline = time.monotonic() + 60
        while not _holds_lock(pull.pid, lock):
            assert pull.poll() is None, pull.communicate()
            assert time.monotonic() < deadline, "the import never took the layers lock"
            time.sleep(0.002)
        # Freeze the import while it holds the locks, so the race has one outcome.
        os.kill(pull.pid, signal.SIGSTOP)
        assert _holds_lock(pull.pid, lock), "the import finished before it could be frozen; make the image bigger"
        rmi = subprocess.Popen(["runuser", "-u", user.name, "--", "podman", "rmi", ref], cwd=user.home,
                               env=user.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(3)
        assert rmi.poll() is None, ("podman rmi did not wait for the import", rmi.communicate())
        os.kill(pull.pid, signal.SIGCONT)
        out, err = pull.communicate(timeout=300)
        assert pull.returncode == 0, err.decode()
        assert rmi.wait(timeout=120) == 0, rmi.communicate()
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
        if rmi is not None and rmi.poll() is None:
            rmi.kill()
            rmi.wait()
    result = json.loads(out)
    assert result["stats"]["layers"] == 2
    gone = user.podman("image", "exists", ref, check=False)
    assert gone.returncode == 1  # rmi did its job, after the import
    for diff_id in built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id


def test_restrictive_files_need_the_helper(podman_user, image_cache):
    user = podman_user
    image = image_cache.load(user, "restrictive")
    repo = _init_repo(user)
    refused = user.pycfs("--repo", repo, "oci", "pull", "--helper", "never", f"containers-storage:{image.ref}",
                         check=False)
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert "permission denied reading" in err and "--helper" in err, err
    assert not (repo / "streams").exists() or not any((repo / "streams").glob("oci-layer-*"))

    result = _pull(user, repo, f"containers-storage:{image.ref}")
    assert result["stats"]["files_via_helper"] >= 3, result["stats"]
    for diff_id in image.built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id


def _empty_primary(user) -> tuple[Path, Path]:
    """A store with no images and a storage.conf making it the primary; (its root, the conf)."""
    primary = user.tmpdir("primary-")
    for d in ("overlay-images", "overlay-layers"):
        (primary / d).mkdir()
        os.chown(primary / d, user.uid, user.gid)
    return primary, primary / "storage.conf"


def test_files_closed_to_the_user_in_an_additional_store_they_own_come_through_the_helper(podman_user, image_cache):
    """The image is in an additional image store whose root the user owns (its files the
    user's sub-uids', as the primary store's): the helper opens them beneath that store's
    root. It was refused: the helper opened files beneath the primary store only."""
    user = podman_user
    image = image_cache.load(user, "restrictive")
    repo = _init_repo(user)
    primary, conf = _empty_primary(user)
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{primary}"\nrootless_storage_path = "{primary}"\n'
                    f'[storage.options]\nadditionalimagestores = ["{user.storage_root}"]\n')
    out = user.pycfs("--repo", repo, "oci", "pull", "--json", f"containers-storage:{image.ref}",
                     env={"CONTAINERS_STORAGE_CONF": str(conf)})
    result = json.loads(out.stdout)
    assert result["stats"]["files_via_helper"] >= 3, result["stats"]
    for diff_id in image.built.diff_ids:
        assert _layer_sha256(user, repo, diff_id) == diff_id


def test_a_file_closed_to_the_user_in_an_additional_store_of_another_owner_is_one_line(podman_user, shared_tmp_path):
    """An additional image store whose root is not the user's (root's here): the helper does
    not open files there, and one line says where the file is and who can help."""
    user = podman_user
    spec = ImageSpec([[imagebuild.Dir("home/u", mode=0o700, uid=1000, gid=1000),
                       File("home/u/secret", data=b"secret" * 20, mode=0o600, uid=1000, gid=1000)]])
    built = imagebuild.build_layout(spec, shared_tmp_path / "closed")
    other = user.tmpdir("other-store-") / "storage"
    other_conf = other.parent / "storage.conf"
    other_conf.write_text(lab.storage_conf_text(other))
    user.run(["skopeo", "copy", "--quiet", f"oci:{built.path}", "containers-storage:localhost/pycfs-test-closed:1"],
             env={"CONTAINERS_STORAGE_CONF": str(other_conf)})
    os.chown(other, 0, 0)  # (its contents stay as podman wrote them)
    os.chmod(other, 0o755)
    repo = _init_repo(user)
    primary, conf = _empty_primary(user)
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{primary}"\nrootless_storage_path = "{primary}"\n'
                    f'[storage.options]\nadditionalimagestores = ["{other}"]\n')
    refused = user.pycfs("--repo", repo, "oci", "pull", "containers-storage:localhost/pycfs-test-closed:1",
                         check=False, env={"CONTAINERS_STORAGE_CONF": str(conf)})
    err = refused.stderr.decode()
    assert refused.returncode == 1 and err.count("error") == 1, err
    assert re.search(r"^pycfs: error: permission denied reading home/u/secret \(layer [0-9a-f]{12}, .*\): it is in "
                     rf"additional image store {other}, whose root is not yours, and the helper opens files only in "
                     r"stores you own; the store's owner can make the file readable\n\Z", err, re.M), err
    assert not any((repo / "streams").glob("oci-layer-*"))


def test_worker_killed_mid_import(podman_user, shared_tmp_path):
    """An object worker dies (frozen first, so the pull surely waits on it): the pull fails
    with one line naming it, the repository stays consistent, and a re-run completes."""
    user = podman_user
    ref = "localhost/pycfs-worker-kill:latest"
    spec = ImageSpec([[File(f"f{i:04d}", size=4096 + i, seed=i) for i in range(3000)]])
    built = imagebuild.build_layout(spec, shared_tmp_path / "layout")
    imagebuild.load_into_storage(user, built.path, ref)
    repo = _init_repo(user)
    # The pull forks its workers: a child of the pull with the pull's own command line.
    worker = b"pycfs.tools.cli"
    before = set(pids_of(user.uid, worker))
    victim, status, err = kill_child_mid_pull(user, repo, ref, worker)
    assert status == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pycfs: error:") and f"object worker (pid {victim})" in last and "-9" in last, last
    assert not list((repo / "streams").glob("oci-layer-*")) if (repo / "streams").exists() else True
    assert json.loads(user.pycfs("--repo", repo, "fsck", "--json").stdout)["ok"] is True
    result = _pull(user, repo, f"containers-storage:{ref}")
    assert result["stats"]["objects_reflinked"] + result["stats"]["objects_copied"] \
        + result["stats"]["objects_already_present"] == 3000
    assert _layer_sha256(user, repo, built.diff_ids[0]) == built.diff_ids[0]
    assert set(pids_of(user.uid, worker)) - before == set()  # none left behind


def test_a_layer_with_a_sparse_file_is_refused_with_what_to_do(podman_user, shared_tmp_path):
    """`tar --sparse --format=pax` then `podman import`: c/storage's tar-split records the
    expanded file where the tar holds a sparse map, so the layer cannot be rebuilt. The pull
    called the store damaged ("pull the image with podman again": no help); now one line
    names the sparse file and says to rebuild the layer without --sparse."""
    user = podman_user
    src = shared_tmp_path / "sparse"
    src.mkdir()
    (src / "dense").write_bytes(b"d" * 70_000)
    with open(src / "holes", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    tar = shared_tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=pax", "-cf", tar, "-C", src, "."], check=True)
    os.chmod(tar, 0o644)
    user.podman("import", "-q", str(tar), "localhost/pycfs-test-sparse:1")
    repo = _init_repo(user)
    refused = user.pycfs("--repo", repo, "oci", "pull", "containers-storage:localhost/pycfs-test-sparse:1", "sp",
                         check=False)
    err = refused.stderr.decode().splitlines()
    assert refused.returncode == 1 and err[-1].startswith("pycfs: error: the layer holds sparse file holes (layer "), err
    assert "containers-storage cannot describe" in err[-1] and "without --sparse" in err[-1], err
    assert not list((repo / "streams").glob("oci-layer-*"))
