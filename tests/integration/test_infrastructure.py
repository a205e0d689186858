"""The test infrastructure itself: users, rootless overlay storage, the reflinking XFS,
images loaded from tests/imagebuild.py, and the CI skip policy.  If these fail, every
other integration result is suspect."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

import imagebuild
from pycfs.host.syscalls import ficlone

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _subuid_start(name: str) -> int:
    for line in Path("/etc/subuid").read_text().splitlines():
        user, start, _count = line.split(":")
        if user == name:
            return int(start)
    raise AssertionError(f"{name} has no /etc/subuid range")


def test_user_has_subid_ranges(podman_user):
    for path in ("/etc/subuid", "/etc/subgid"):
        ranges = [l.split(":") for l in Path(path).read_text().splitlines() if l.startswith(podman_user.name + ":")]
        assert ranges and int(ranges[0][2]) >= 65536, (path, ranges)
    # Inside the user namespace: container root is the user, uid 1 the first sub-uid.
    uid_map = podman_user.unshare("cat", "/proc/self/uid_map").stdout.decode().split()
    assert uid_map[:3] == ["0", str(podman_user.uid), "1"]
    assert uid_map[3:5] == ["1", str(_subuid_start(podman_user.name))]


def test_podman_is_rootless_with_overlay(podman_user):
    info = json.loads(podman_user.podman("info", "--format", "json").stdout)
    assert info["host"]["security"]["rootless"] is True
    assert info["store"]["graphDriverName"] == "overlay"
    assert Path(info["store"]["graphRoot"]) == podman_user.storage_root
    assert 'driver = "overlay"' in podman_user.storage_conf.read_text()


def test_xfs_user_storage_is_on_the_xfs(xfs_podman_user, xfs_mount):
    info = json.loads(xfs_podman_user.podman("info", "--format", "json").stdout)
    assert info["store"]["graphDriverName"] == "overlay"
    assert Path(info["store"]["graphRoot"]) == xfs_podman_user.storage_root
    assert xfs_mount in xfs_podman_user.storage_root.parents
    assert os.stat(xfs_podman_user.storage_root).st_dev == os.stat(xfs_mount).st_dev


def _used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_xfs_really_reflinks(reflink_dir):
    size = 32 << 20
    data = os.urandom(size)
    a, b = reflink_dir / "reflink-a", reflink_dir / "reflink-b"
    before = _used_bytes(reflink_dir)
    a.write_bytes(data)
    after_write = _used_bytes(reflink_dir)
    with open(a, "rb") as src, open(b, "wb") as dst:
        ficlone(dst.fileno(), src.fileno())
    after_clone = _used_bytes(reflink_dir)
    assert b.read_bytes() == data
    assert after_write - before >= size * 0.9, (before, after_write)
    # The clone shares a's extents: well under a tenth of the data in new blocks.
    assert after_clone - after_write < size // 10, (after_write, after_clone)
    a.unlink()
    b.unlink()


def test_reflink_dir_is_usable_by_test_user(podman_user, reflink_dir):
    d = reflink_dir / "by-user"
    podman_user.run(["mkdir", d])
    podman_user.run(["sh", "-c", f"head -c 1048576 /dev/urandom > {d}/x && cp --reflink=always {d}/x {d}/y && cmp {d}/x {d}/y"])
    assert os.stat(d / "y").st_uid == podman_user.uid


def test_user_pycfs_is_this_checkout(podman_user):
    """The user's venv holds a copy of the current sources (rebuilt when they change),
    readable and runnable without access to the checkout."""
    out = podman_user.run([podman_user.python, "-c",
                           "import pycfs.host.errors as m, pycfs.tools.cli as c; print(m.__file__); print(c.__file__)"])
    installed_errors, installed_cli = out.stdout.decode().split()
    assert "/site-packages/pycfs/" in installed_errors  # non-editable install
    assert Path(installed_errors).read_bytes() == (REPO_ROOT / "host/errors.py").read_bytes()
    assert Path(installed_cli).read_bytes() == (REPO_ROOT / "tools/cli.py").read_bytes()
    help_text = podman_user.pycfs("--help").stdout.decode()
    assert "usage: pycfs" in help_text


def _layer_dirs(user, ref: str) -> list[Path]:
    """diff/ directories of an image's layers, bottom first."""
    fmt = "{{.GraphDriver.Data.UpperDir}}|{{.GraphDriver.Data.LowerDir}}"
    upper, _, lower = user.podman("image", "inspect", "--format", fmt, ref).stdout.decode().strip().partition("|")
    lowers = [Path(p) for p in lower.split(":") if p and p != "<no value>"]
    return list(reversed(lowers)) + [Path(upper)]


def test_multilayer_image_loads_with_its_diff_ids(podman_user, multilayer_loaded):
    inspect = json.loads(podman_user.podman("image", "inspect", multilayer_loaded.ref).stdout)[0]
    assert inspect["RootFS"]["Layers"] == multilayer_loaded.built.diff_ids
    assert len(inspect["RootFS"]["Layers"]) == len(multilayer_loaded.spec.layers) >= 3
    assert inspect["Id"] == multilayer_loaded.built.config_digest.removeprefix("sha256:")
    assert inspect["Config"]["Labels"] == {"pycfs.test": "multilayer"}


def test_multilayer_layers_on_disk(podman_user, multilayer_loaded):
    base, middle, top = _layer_dirs(podman_user, multilayer_loaded.ref)
    spec = multilayer_loaded.spec
    entries = {os.fsencode(e.path): e for e in spec.layers[0] if isinstance(e, imagebuild.File)}
    # Big random content arrived intact (root reads the subuid-owned files directly).
    tool = entries[b"usr/bin/tool"]
    assert hashlib.sha256((base / "usr/bin/tool").read_bytes()).hexdigest() == tool.sha256()
    # Hardlinks are hardlinks, symlinks symlinks.
    assert os.stat(base / "usr/bin/tool").st_ino == os.stat(base / "usr/bin/tool-hardlink").st_ino
    assert os.readlink(base / "usr/bin/tool-symlink") == "tool"
    # user.* xattrs (including a non-UTF-8 value) and nanosecond mtimes survive.
    assert os.getxattr(base / "data/xattrs", "user.pycfs.binary") == b"\x00\xff\x01"
    assert os.stat(base / "data/ns-mtime").st_mtime_ns == 1_600_000_000_000_000_001
    assert (base / os.fsdecode(b"data/latin1-caf\xe9")).read_bytes() == b"non-UTF-8 file name\n"
    assert stat.S_ISFIFO(os.lstat(base / "data/fifo").st_mode)
    assert os.stat(base / "opt/app/setuid").st_mode & 0o7777 == 0o4755
    # Whiteouts become 0/0 character devices, the opaque directory gets an overlay xattr.
    wh = os.lstat(middle / "etc/removed-later")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    opaque = {k: os.getxattr(middle / "var/cache", k) for k in os.listxattr(middle / "var/cache")}
    assert any(k.endswith("overlay.opaque") and v == b"y" for k, v in opaque.items()), opaque
    assert os.stat(top / "srv/owned").st_uid == _subuid_start(podman_user.name) + 999


def test_multilayer_capability_is_kept(podman_user, multilayer_loaded):
    base = _layer_dirs(podman_user, multilayer_loaded.ref)[0]
    cap = os.getxattr(base / "usr/bin/ping-like", "security.capability")
    # Stored as written (v2), or as a v3 capability rooted in the user namespace.
    assert cap[:4] in (b"\x01\x00\x00\x02", b"\x01\x00\x00\x03"), cap.hex()
    assert cap[4:8] == imagebuild.CAP_NET_BIND_SERVICE_V2[4:8]


def test_restrictive_image_modes_and_owners(podman_user, restrictive_loaded):
    (diff,) = _layer_dirs(podman_user, restrictive_loaded.ref)
    names = ["etc/shadow", "home/user", "home/user/secret.txt", "srv/locked",
             "srv/locked/readonly.bin", "srv/shadow-hardlink", "root/big-secret.bin"]
    out = podman_user.unshare("stat", "-c", "%a %u %g %h %s %n", *[diff / n for n in names]).stdout.decode()
    got = {Path(line.split()[5]).relative_to(diff).as_posix(): line.split()[:5] for line in out.splitlines()}
    assert got["etc/shadow"][:4] == ["0", "0", "0", "2"]
    assert got["srv/shadow-hardlink"][:4] == ["0", "0", "0", "2"]
    assert got["home/user"][:3] == ["700", "1000", "1000"]
    assert got["home/user/secret.txt"][:3] == ["600", "1000", "1000"]
    assert got["srv/locked"][:3] == ["0", "0", "0"]
    assert got["srv/locked/readonly.bin"][:3] == ["400", "0", "0"]
    assert got["root/big-secret.bin"][:3] == ["600", "1000", "1000"] and int(got["root/big-secret.bin"][4]) > 100 << 20
    # `ls -ln` inside the namespace tells the same story.
    ls = podman_user.unshare("ls", "-ln", diff / "home/user").stdout.decode()
    assert "-rw------- 1 1000 1000" in ls and "secret.txt" in ls
    # ...and outside it the test user really cannot read them: the helper's reason to exist.
    for n in ("etc/shadow", "home/user/secret.txt", "srv/locked/readonly.bin", "root/big-secret.bin"):
        assert podman_user.run(["cat", diff / n], check=False).returncode != 0, n
    big = restrictive_loaded.spec.layers[0][-2]
    assert isinstance(big, imagebuild.File) and big.path == "root/big-secret.bin"
    assert podman_user.unshare("sha256sum", diff / big.path).stdout.split()[0].decode() == big.sha256()


def test_flatten_applies_whiteouts_and_opaque_dirs():
    tree = imagebuild.flatten(imagebuild.multilayer_image())
    assert b"/etc/removed-later" not in tree and b"/data/dangling" not in tree
    assert sorted(k for k in tree if k.startswith(b"/var/cache/")) == [b"/var/cache/new"]
    assert tree[b"/etc/hostname"].data == b"pycfs-test-layer2\n"
    assert tree[b"/usr/lib/libbig.so"].size == (1 << 20) + 1
    assert b"/data/latin1-caf\xe9" in tree


def test_layout_digests_are_reproducible(tmp_path):
    spec = imagebuild.multilayer_image()
    a = imagebuild.build_layout(spec, tmp_path / "a")
    b = imagebuild.build_layout(spec, tmp_path / "b")
    assert a.manifest_digest == b.manifest_digest
    blob = (tmp_path / "a/blobs/sha256" / a.layer_digests[1].removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == a.layer_digests[1]
    assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == a.diff_ids[1]


CI_PROBE = textwrap.dedent("""
    import pytest

    @pytest.mark.integration
    def test_needs_something():
        pytest.skip("no frobnicator")

    @pytest.mark.integration
    @pytest.mark.ci_may_skip("kernel lacks fs-verity")
    def test_allowed():
        pytest.skip("kernel lacks fs-verity")

    def test_unit_skip():
        pytest.skip("unit tests may skip")
""")


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_turns_integration_skips_into_failures(tmp_path, ci):
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "tests/conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(CI_PROBE)
    (tmp_path / "integration").mkdir()
    (tmp_path / "integration/test_module_skip.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_pycfs')\n")
    env = {**os.environ, "CI": ci}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    summary = p.stdout.strip().splitlines()[-1]
    if ci:
        # The skipped module is a collection error, which stops the run: CI fails loudly.
        assert p.returncode == 2, p.stdout
        assert "ERROR integration/test_module_skip.py" in p.stdout
        assert "no_such_module_pycfs" in p.stdout
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                            str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
        summary = p.stdout.strip().splitlines()[-1]
        assert p.returncode == 1, p.stdout
        assert "1 failed, 2 skipped" in summary, p.stdout
        assert "FAILED test_probe.py::test_needs_something" in p.stdout
        assert "no frobnicator" in p.stdout
    else:
        assert p.returncode == 0, p.stdout
        assert "4 skipped" in summary, p.stdout


def test_demo_tar_has_the_restrictive_entries(tmp_path):
    out = tmp_path / "demo.tar"
    subprocess.run([sys.executable, REPO_ROOT / "tools/demo/mktar.py", out, "--blob-mib", "1"], check=True)
    with tarfile.open(out) as tf:
        m = {ti.name: ti for ti in tf.getmembers()}
        assert m["etc/shadow"].mode == 0 and m["etc/shadow"].isfile()
        assert m["etc/shadow-"].islnk() and m["etc/shadow-"].linkname == "etc/shadow"
        assert (m["home/demo"].mode, m["home/demo"].uid, m["home/demo"].isdir()) == (0o700, 1000, True)
        assert (m["home/demo/notes.txt"].mode, m["home/demo/notes.txt"].uid) == (0o600, 1000)
        assert m["var/lib/demo/blob.bin"].size == 1 << 20
        assert m["usr/bin/hello"].mode == 0o755 and m["etc/os-release"].mode == 0o644
        assert all(ti.uid == 0 for n, ti in m.items() if not n.startswith(("home/demo", "var/lib/demo")))
        assert tf.extractfile("usr/bin/hello").read() == (REPO_ROOT / "tools/demo/rootfs/usr/bin/hello").read_bytes()


@pytest.mark.parametrize("script", ["tools/setup.sh", "tools/demo.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", REPO_ROOT / script], check=True)
