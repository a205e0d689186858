"""Mounting composefs images: EROFS metadata + overlayfs over the object store.

The EROFS image is mounted read-only straight from its object file (no loop device
needed on kernels with file-backed EROFS), used as the overlay's lower layer, with
objects/ as a data-only lower layer, so file content comes from objects via the
metacopy/redirect xattrs. Both are built with the mount API as detached mounts (never
attached anywhere but where the caller wants): `pycfs mount` attaches the overlay with
move_mount, the varlink service hands its fd to the client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pycfs.host import syscalls
from pycfs.host.errors import PycfsError
from pycfs.host.repository import Repository, RepositoryError
from pycfs.protocol.fdpass import close_fds


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


@dataclass
class MountOptions:
    """A writable overlay needs an upper and a work directory (fds, e.g. from a varlink
    client); without them the mount is read-only."""

    upper_fd: int | None = None
    work_fd: int | None = None
    read_write: bool = False


def open_image_mount(repo: Repository, image_id: bytes, options: MountOptions | None = None) -> int:
    """A detached mount of the composefs image: the fd of an overlay (EROFS metadata over
    the repository's objects/) that move_mount attaches anywhere, or that closes away.
    Needs root (CAP_SYS_ADMIN in the initial user namespace)."""
    options = options or MountOptions()
    image_fd = repo.open_object(image_id)
    objects = erofs = -1
    try:
        objects = os.open("objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=repo.dirfd)
        # The fds' /proc/self/fd links name exactly the files opened here: no path is
        # looked up twice, and no path needs escaping in an option string.
        try:
            erofs = syscalls.detached_mount("erofs", [("source", f"/proc/self/fd/{image_fd}"), ("ro", None)],
                                            syscalls.MOUNT_ATTR_RDONLY)
        except OSError as e:
            raise PycfsError(f"mounting the EROFS image {image_id.hex()} failed: {e.strerror} "
                             "(needs root and a kernel with file-backed EROFS, Linux 6.12 or newer)") from None
        overlay: list[tuple[str, str | None]] = [
            ("source", "composefs"), ("lowerdir+", f"/proc/self/fd/{erofs}"), ("datadir+", f"/proc/self/fd/{objects}"),
            ("metacopy", "on"), ("redirect_dir", "on")]
        if repo.secure:
            overlay.append(("verity", "require"))
        if options.upper_fd is not None and options.work_fd is not None:
            overlay += [("upperdir", f"/proc/self/fd/{options.upper_fd}"), ("workdir", f"/proc/self/fd/{options.work_fd}")]
        try:
            return syscalls.detached_mount(
                "overlay", overlay, syscalls.MOUNT_ATTR_NODEV | (0 if options.read_write else syscalls.MOUNT_ATTR_RDONLY))
        except OSError as e:
            raise PycfsError(f"mounting the overlay failed: {e.strerror} (needs overlayfs with lowerdir+/datadir+, "
                             "Linux 6.7 or newer)") from None
    finally:
        # overlayfs holds its own reference to the EROFS mount
        close_fds([fd for fd in (erofs, objects, image_fd) if fd >= 0])


def mount_image(repo: Repository, name: str, mountpoint: str) -> bytes:
    """Mount the image read-only at mountpoint; returns its id. Needs root (CAP_SYS_ADMIN)."""
    if not os.path.isdir(mountpoint):
        raise PycfsError(f"mount point {mountpoint} is not a directory")
    image_id = resolve_image(repo, name)
    fd = open_image_mount(repo, image_id)
    try:
        syscalls.move_mount_fd(fd, mountpoint)
    except OSError as e:
        raise PycfsError(f"attaching the mount at {mountpoint} failed: {e.strerror}") from None
    finally:
        os.close(fd)
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
    from pycfs.host import fusemount  # pyfuse3 loads only when a FUSE mount is wanted

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
