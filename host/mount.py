"""Mounting composefs images: EROFS metadata + overlayfs over the object store.

The EROFS image is mounted read-only straight from its object file (no loop device
needed on kernels with file-backed EROFS), used as the overlay's upper-most lower layer,
with objects/ as a data-only lower layer (`::`), so file content comes from objects via
the metacopy/redirect xattrs. The temporary EROFS mount is detached right after the
overlay mount: overlayfs keeps its own reference.
"""

from __future__ import annotations

import os
import re
import tempfile

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.repository import Repository, RepositoryError


def resolve_image(repo: Repository, name: str) -> bytes:
    """An image id from images/<hex>, images/refs/<name>, or an OCI tag's composefs image."""
    try:
        return repo.image_id(name)
    except RepositoryError:
        pass
    from pycfs.host.oci.image import IMAGE_REF_NAMES
    from pycfs.host.oci.streams import open_image

    try:
        stored = open_image(repo, name)
    except PycfsError:
        raise PycfsError(f"no image or OCI image named {name!r} in {repo.path} (see `pycfs oci images`)") from None
    preferred = IMAGE_REF_NAMES.get(repo.erofs_default)
    for ref_name in [preferred, *IMAGE_REF_NAMES.values()]:
        if ref_name in stored.image_refs:
            return stored.image_refs[ref_name]
    raise PycfsError(f"OCI image {name!r} has no composefs image yet: run `pycfs oci create-image {name}`")


def _option_path(path: str) -> str:
    if "," in path or "\n" in path:
        raise PycfsError(f"cannot mount from {path!r}: overlayfs options cannot carry ',' in paths")
    return path.replace("\\", "\\\\").replace(":", "\\:")


def mount_image(repo: Repository, name: str, mountpoint: str) -> bytes:
    """Mount the image read-only at mountpoint; returns its id. Needs root (CAP_SYS_ADMIN)."""
    if not os.path.isdir(mountpoint):
        raise PycfsError(f"mount point {mountpoint} is not a directory")
    image_id = resolve_image(repo, name)
    image_path = str(repo.object_path(image_id))
    objects = _option_path(str(repo.path / "objects"))
    staging = tempfile.mkdtemp(prefix="pycfs-erofs-")
    try:
        try:
            syscalls.mount(image_path, staging, "erofs", syscalls.MS_RDONLY)
        except OSError as e:
            raise PycfsError(f"mounting the EROFS image failed: {e.strerror} (needs root and a kernel with EROFS)") from None
        try:
            options = f"lowerdir={_option_path(staging)}::{objects},metacopy=on,redirect_dir=on"
            if repo.secure:
                options += ",verity=require"
            syscalls.mount("composefs", mountpoint, "overlay", syscalls.MS_RDONLY | syscalls.MS_NODEV, options)
        except OSError as e:
            raise PycfsError(f"mounting the overlay failed: {e.strerror} (needs overlayfs with data-only "
                             "lower layers, Linux 6.5 or newer)") from None
        finally:
            syscalls.umount(staging, syscalls.MNT_DETACH)
    finally:
        os.rmdir(staging)
    return image_id


def privileged() -> bool:
    """Root of the initial user namespace: the only one the kernel lets mount EROFS."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            first = f.readline().split()
    except OSError:
        return True
    return first == ["0", "0", "4294967295"]


def use_fuse(choice: str) -> bool:
    """--fuse yes|no|auto: auto means FUSE unless the kernel mount is possible."""
    return choice == "yes" or (choice == "auto" and not privileged())


def fuse_image(repo: Repository, name: str, mountpoint: str):  # -> fusemount.ServedImage
    """Resolve and check the image a FUSE server will serve (nothing is mounted yet)."""
    from pycfs.host import fusemount  # the FUSE server loads only when a FUSE mount is wanted

    if _mount_type(mountpoint) is not None:
        raise PycfsError(f"{mountpoint} is a mount point already: `pycfs umount {mountpoint}` first")
    if not os.path.isdir(mountpoint):
        raise PycfsError(f"mount point {mountpoint} is not a directory")
    return fusemount.load_image(repo, resolve_image(repo, name))


def _mount_type(mountpoint: str) -> str | None:
    """Filesystem type mounted at mountpoint (the top one), from /proc/self/mountinfo."""
    # realpath does not give up on the mount point itself when a killed FUSE server
    # makes it answer ENOTCONN
    target = os.fsencode(os.path.realpath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            where = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if where == target:
                found = fields[fields.index(b"-") + 1].decode()
    return found


def unmount(mountpoint: str) -> None:
    fstype = _mount_type(mountpoint)
    if fstype is None:
        raise PycfsError(f"nothing is mounted at {mountpoint}")
    if fstype.startswith("fuse") and os.geteuid() != 0:  # root of a user namespace may umount its own
        from pycfs.host.fusemount import fuse_unmount

        fuse_unmount(mountpoint)
        return
    try:
        syscalls.umount(mountpoint)
    except OSError as e:
        raise PycfsError(f"unmounting {mountpoint} failed: {e.strerror}") from None
