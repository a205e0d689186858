"""Where podman keeps its images: storage.conf discovery as containers/storage does it.

One file is read, never a merge: `$CONTAINERS_STORAGE_CONF`, else (rootless) the user's
`$XDG_CONFIG_HOME/containers/storage.conf` or `~/.config/containers/storage.conf`, else the
system's `/etc/containers/storage.conf` or `/usr/share/containers/storage.conf`.

Rootless graphroot: the user's own file may set `graphroot`; otherwise (and for a system
file or one named by CONTAINERS_STORAGE_CONF, whose `graphroot` is root's store)
`rootless_storage_path` (with `$HOME`/`$UID`/`$USER` expanded), else
`$XDG_DATA_HOME/containers/storage` (default `~/.local/share/containers/storage`).

Inside `podman unshare` (euid 0 in the user's namespace, `_CONTAINERS_USERNS_CONFIGURED`
set) the store is the rootless user's, whose uid podman leaves in `_CONTAINERS_ROOTLESS_UID`,
as c/storage reads it. (The CONTAINERS_GRAPHROOT podman also sets there is for the user's
scripts: c/storage does not read it, nor does pycfs.)
"""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping

from pycfs.host.errors import PycfsError
from pycfs.host.jsondoc import read_document

SUPPORTED_DRIVERS = ("overlay", "vfs")
ROOT_GRAPHROOT = "/var/lib/containers/storage"
SYSTEM_CONFS = ("/etc/containers/storage.conf", "/usr/share/containers/storage.conf")
MAX_CONF = 1 << 20  # a storage.conf is a few KiB


@dataclass(frozen=True)
class StorageConfig:
    graphroot: Path
    driver: str  # "overlay" or "vfs"
    additional_image_stores: tuple[Path, ...] = field(default=())
    source: str | None = None  # the storage.conf read, None if only defaults applied


def _home(env: Mapping[str, str], uid: int) -> str:
    home = env.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError as e:
        raise PycfsError("HOME is not set and the user has no passwd entry: pass --storage-root") from e


def _expand(path: str, env: Mapping[str, str], uid: int) -> str:
    """c/storage expands $UID itself and everything else like os.ExpandEnv."""
    merged = dict(env)
    merged.setdefault("UID", str(uid))
    merged.setdefault("HOME", _home(env, uid))
    if "USER" not in merged:
        try:
            merged["USER"] = pwd.getpwuid(uid).pw_name
        except KeyError:
            pass
    out = path
    for key in sorted(merged, key=len, reverse=True):
        out = out.replace("${" + key + "}", merged[key]).replace("$" + key, merged[key])
    return out


def storage_uid(env: Mapping[str, str] | None = None) -> int:
    """The uid whose store podman would use: the effective uid, or in a `podman unshare`
    session the rootless user's."""
    env = os.environ if env is None else env
    euid = os.geteuid()
    if euid != 0 or not env.get("_CONTAINERS_USERNS_CONFIGURED"):
        return euid
    text = env.get("_CONTAINERS_ROOTLESS_UID", "")
    if not text:
        return euid  # a namespace podman did not make: root's store, as c/storage reads it
    if not text.isascii() or not text.isdigit() or int(text) >= 1 << 32:
        raise PycfsError(f"_CONTAINERS_ROOTLESS_UID is {text[:40]!r}, not a uid: run pycfs from `podman unshare` "
                         "unchanged, or pass --storage-root")
    return int(text)


def find_config_file(env: Mapping[str, str] | None = None, uid: int | None = None) -> tuple[str | None, str]:
    """The one storage.conf podman would read and whose it is: "env", "user" or "system" (None, "none")."""
    env = os.environ if env is None else env
    uid = storage_uid(env) if uid is None else uid
    explicit = env.get("CONTAINERS_STORAGE_CONF")
    if explicit:
        if not os.path.isfile(explicit):
            raise PycfsError(f"CONTAINERS_STORAGE_CONF names {explicit}, which is not a file")
        return explicit, "env"
    if uid != 0:
        xdg = env.get("XDG_CONFIG_HOME")
        user_conf = os.path.join(xdg or os.path.join(_home(env, uid), ".config"), "containers/storage.conf")
        if _present(user_conf):
            return user_conf, "user"
    for path in SYSTEM_CONFS:
        if _present(path):
            return path, "system"
    return None, "none"


def _present(path: str) -> bool:
    """Whether podman reads path: it does when anything is there, so a fifo or directory
    in a storage.conf's place is an error, never a silent fall-back to the next file (whose
    store may hold another image of the same name)."""
    if os.path.isfile(path):
        return True
    if os.path.exists(path):
        raise PycfsError(f"{path} is not a regular file: podman reads its storage configuration there; "
                         "make it a file or remove it")
    return False


def _parse(path: str) -> dict:
    try:
        data = read_document(path, MAX_CONF)
    except FileNotFoundError:
        raise PycfsError(f"cannot read {path}: no such file") from None
    try:
        doc = tomllib.loads(data.decode())
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError, an over-long integer; nesting
        raise PycfsError(f"{path}: not valid TOML: {e}") from None
    table = doc.get("storage", {})
    if not isinstance(table, dict):
        raise PycfsError(f"{path}: [storage] must be a table")
    return table


def _normalise_driver(name: str, where: str) -> str:
    name = {"overlay2": "overlay"}.get(name, name)
    if name not in SUPPORTED_DRIVERS:
        raise PycfsError(
            f"containers-storage driver {name!r} ({where}) is not supported: pycfs reads the overlay and vfs drivers"
        )
    return name


def detect_driver(graphroot: Path, preferred: str | None = None) -> str:
    """The driver whose image store exists under graphroot (c/storage's 'prior driver' scan)."""
    present = [d for d in SUPPORTED_DRIVERS if (graphroot / f"{d}-images").is_dir()]
    if preferred:
        return preferred
    if present:
        return present[0]
    others = sorted(p.name[: -len("-images")] for p in graphroot.glob("*-images")) if graphroot.is_dir() else []
    if others:
        raise PycfsError(
            f"containers-storage at {graphroot} uses driver {others[0]!r}: pycfs reads the overlay and vfs drivers"
        )
    raise PycfsError(f"no containers-storage at {graphroot} (neither overlay-images/ nor vfs-images/ exists)")


def load_storage_config(
    storage_root: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
    driver: str | None = None,
) -> StorageConfig:
    """Resolve graphroot, driver and additional image stores as podman would for this user.

    `storage_root` (the CLI's --storage-root) replaces the graphroot; the driver then comes
    from `driver`, STORAGE_DRIVER, the config, or what exists on disk.
    """
    env = os.environ if env is None else env
    uid = storage_uid(env) if uid is None else uid
    path, kind = find_config_file(env, uid)
    table = _parse(path) if path else {}
    where = path or "default"

    if uid == 0:
        graphroot = table.get("graphroot") or ROOT_GRAPHROOT
    else:
        # Only the user's own file may name the graphroot; any other file's graphroot is root's.
        own_graphroot = table.get("graphroot") if kind == "user" else None
        if own_graphroot:
            graphroot = own_graphroot
        elif table.get("rootless_storage_path"):
            graphroot = table["rootless_storage_path"]
        else:
            data_home = env.get("XDG_DATA_HOME") or os.path.join(_home(env, uid), ".local/share")
            graphroot = os.path.join(data_home, "containers/storage")
    if not isinstance(graphroot, str):
        raise PycfsError(f"{where}: graphroot must be a string")
    root = Path(storage_root) if storage_root is not None else Path(_expand(graphroot, env, uid))
    if storage_root is None:
        _absolute(root, "graphroot", where)

    if driver:
        driver = _normalise_driver(driver, "requested")
    else:
        configured = env.get("STORAGE_DRIVER") or table.get("driver") or None
        if configured is not None and not isinstance(configured, str):
            raise PycfsError(f"{where}: driver must be a string")
        driver = _normalise_driver(configured, where) if configured else None
        if driver and storage_root is not None and not (root / f"{driver}-images").is_dir():
            driver = None  # an explicit root carries its own driver; the config's may not apply
    driver = detect_driver(root, driver)

    options = table.get("options", {})
    stores = options.get("additionalimagestores", []) if isinstance(options, dict) else []
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise PycfsError(f"{where}: [storage.options] additionalimagestores must be a list of paths")
    extra = tuple(Path(_expand(s, env, uid)) for s in stores)
    for store in extra:
        _absolute(store, "[storage.options] additionalimagestores", where)
    return StorageConfig(
        graphroot=root,
        driver=driver,
        additional_image_stores=extra,
        source=path,
    )


def _absolute(path: Path, what: str, where: str) -> None:
    """A store path from the configuration is absolute: a relative one would be read from
    wherever pycfs runs (containers-storage refuses it too)."""
    if not path.is_absolute():
        raise PycfsError(f"{where}: {what} {str(path)!r} is not an absolute path (containers-storage "
                         "refuses it too): fix the file")
