"""storage.conf discovery and graphroot/driver resolution (pycfs.host.storage.config)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pycfs.host.errors import PycfsError
from pycfs.host.storage import config as cfg
from pycfs.host.storage.config import find_config_file, load_storage_config


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    # No system storage.conf may leak into these tests.
    monkeypatch.setattr(cfg, "SYSTEM_CONFS", (str(tmp_path / "etc.conf"), str(tmp_path / "usr.conf")))
    h = tmp_path / "home"
    h.mkdir()
    return h


def _store(root: Path, driver: str = "overlay") -> Path:
    (root / f"{driver}-images").mkdir(parents=True)
    (root / f"{driver}-layers").mkdir(parents=True)
    return root


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_rootless_default_graphroot(home):
    root = _store(home / ".local/share/containers/storage")
    c = load_storage_config(env={"HOME": str(home)}, uid=1000)
    assert c.graphroot == root and c.driver == "overlay" and c.source is None


def test_xdg_data_home(home, tmp_path):
    root = _store(tmp_path / "data/containers/storage", "vfs")
    c = load_storage_config(env={"HOME": str(home), "XDG_DATA_HOME": str(tmp_path / "data")}, uid=1000)
    assert c.graphroot == root and c.driver == "vfs"


def test_user_file_wins_and_may_set_graphroot(home, tmp_path):
    root = _store(tmp_path / "mine")
    _write(Path(cfg.SYSTEM_CONFS[0]), '[storage]\ndriver = "vfs"\ngraphroot = "/var/lib/containers/storage"\n')
    conf = _write(home / ".config/containers/storage.conf",
                  f'[storage]\ndriver = "overlay"\ngraphroot = "{root}"\n')
    assert find_config_file({"HOME": str(home)}, 1000) == (str(conf), "user")
    c = load_storage_config(env={"HOME": str(home)}, uid=1000)
    assert (c.graphroot, c.driver, c.source) == (root, "overlay", str(conf))


def test_xdg_config_home(home, tmp_path):
    conf = _write(tmp_path / "xdg/containers/storage.conf", '[storage]\ndriver = "overlay"\n')
    _write(home / ".config/containers/storage.conf", '[storage]\ndriver = "vfs"\n')
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config_file(env, 1000) == (str(conf), "user")


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir])
def test_a_user_file_that_is_no_file_is_one_line_not_the_system_file(home, make):
    """A fifo or directory in the user's storage.conf's place: the system file (another
    store, maybe another image of the name) was read instead, silently."""
    _write(Path(cfg.SYSTEM_CONFS[0]), '[storage]\ndriver = "vfs"\n')
    (home / ".config/containers").mkdir(parents=True)
    make(home / ".config/containers/storage.conf")
    with pytest.raises(PycfsError, match=r"^.*/home/.config/containers/storage.conf is not a regular file: podman "
                                         r"reads its storage configuration there; make it a file or remove it$"):
        load_storage_config(env={"HOME": str(home)}, uid=1000)


def test_system_file_graphroot_is_roots_not_the_users(home, tmp_path):
    _store(home / ".local/share/containers/storage")
    _write(Path(cfg.SYSTEM_CONFS[1]), '[storage]\ndriver = "overlay"\ngraphroot = "/var/lib/containers/storage"\n')
    c = load_storage_config(env={"HOME": str(home)}, uid=1000)
    assert c.graphroot == home / ".local/share/containers/storage"
    assert c.source == cfg.SYSTEM_CONFS[1]


def test_rootless_storage_path_expands_variables(home, tmp_path):
    root = _store(tmp_path / "u1000" / "store")
    conf = _write(tmp_path / "env.conf",
                  '[storage]\ndriver = "overlay"\ngraphroot = "/ignored"\n'
                  f'rootless_storage_path = "{tmp_path}/u$UID/store"\n')
    c = load_storage_config(env={"HOME": str(home), "CONTAINERS_STORAGE_CONF": str(conf)}, uid=1000)
    assert c.graphroot == root and c.source == str(conf)


def test_inside_podman_unshare_the_store_is_the_rootless_users(home, tmp_path, monkeypatch):
    """`podman unshare pycfs ...` runs with euid 0: it read root's storage.conf and store
    (/var/lib/containers/storage). As c/storage, the uid podman left in
    _CONTAINERS_ROOTLESS_UID picks the user's file, graphroot and $UID; without
    _CONTAINERS_USERNS_CONFIGURED, or as another euid, the variable means nothing."""
    mine = _store(tmp_path / "u1000" / "store")
    _write(home / ".config/containers/storage.conf",
           f'[storage]\ndriver = "overlay"\nrootless_storage_path = "{tmp_path}/u$UID/store"\n')
    roots = _store(tmp_path / "rootstore")
    _write(Path(cfg.SYSTEM_CONFS[0]), f'[storage]\ndriver = "overlay"\ngraphroot = "{roots}"\n')
    unshare = {"HOME": str(home), "_CONTAINERS_USERNS_CONFIGURED": "done", "_CONTAINERS_ROOTLESS_UID": "1000",
               "CONTAINERS_GRAPHROOT": str(tmp_path / "not-read")}
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    c = load_storage_config(env=unshare)
    assert (c.graphroot, c.source) == (mine, str(home / ".config/containers/storage.conf"))
    for env in ({**unshare, "_CONTAINERS_USERNS_CONFIGURED": ""}, {**unshare, "_CONTAINERS_ROOTLESS_UID": ""}):
        assert load_storage_config(env=env).graphroot == roots
    with pytest.raises(PycfsError, match="_CONTAINERS_ROOTLESS_UID is 'x1', not a uid"):
        load_storage_config(env={**unshare, "_CONTAINERS_ROOTLESS_UID": "x1"})
    monkeypatch.setattr(os, "geteuid", lambda: 1001)
    assert cfg.storage_uid(unshare) == 1001


def test_root_uses_graphroot_and_additional_stores(home, tmp_path):
    root = _store(tmp_path / "rootstore")
    extra = tmp_path / "extra"
    _write(Path(cfg.SYSTEM_CONFS[0]),
           f'[storage]\ndriver = "overlay2"\ngraphroot = "{root}"\n'
           f'[storage.options]\nadditionalimagestores = ["{extra}"]\n')
    c = load_storage_config(env={}, uid=0)
    assert c.graphroot == root and c.driver == "overlay" and c.additional_image_stores == (extra,)


def test_storage_root_override_detects_driver(home, tmp_path):
    _write(home / ".config/containers/storage.conf", '[storage]\ndriver = "overlay"\n')
    root = _store(tmp_path / "vfsroot", "vfs")
    c = load_storage_config(root, env={"HOME": str(home)}, uid=1000)
    assert (c.graphroot, c.driver) == (root, "vfs")
    assert load_storage_config(root, env={"HOME": str(home)}, uid=1000, driver="vfs").driver == "vfs"


@pytest.mark.parametrize("text, message", [
    ('[storage]\ndriver = "btrfs"\n', "driver 'btrfs'"),
    ('[storage\n', "not valid TOML"),
    ("[storage]\ndriver = " + "[" * 100_000, "not valid TOML"),  # (before: RecursionError escaped)
    ("[storage]\nx = " + "1" * 5000, "not valid TOML"),  # (before: a bare ValueError escaped)
    ('[storage]\n[storage.options]\nadditionalimagestores = "x"\n', "additionalimagestores must be a list"),
    # read from wherever pycfs ran (containers-storage refuses both)
    ('[storage]\ngraphroot = "rel"\n', "graphroot 'rel' is not an absolute path"),
    ('[storage]\n[storage.options]\nadditionalimagestores = ["ro/store"]\n',
     "additionalimagestores 'ro/store' is not an absolute path"),
])
def test_bad_configs_are_clear_errors(home, tmp_path, text, message):
    _store(home / ".local/share/containers/storage")
    _write(home / ".config/containers/storage.conf", text)
    with pytest.raises(PycfsError, match=message):
        load_storage_config(env={"HOME": str(home)}, uid=1000)


def test_missing_env_file_and_missing_store(home, tmp_path):
    with pytest.raises(PycfsError, match="CONTAINERS_STORAGE_CONF names"):
        load_storage_config(env={"HOME": str(home), "CONTAINERS_STORAGE_CONF": str(tmp_path / "nope")}, uid=1000)
    with pytest.raises(PycfsError, match="no containers-storage at"):
        load_storage_config(env={"HOME": str(home)}, uid=1000)
    (tmp_path / "zfsroot/zfs-images").mkdir(parents=True)
    with pytest.raises(PycfsError, match="uses driver 'zfs'"):
        load_storage_config(tmp_path / "zfsroot", env={"HOME": str(home)}, uid=1000)
