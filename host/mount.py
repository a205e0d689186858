"""Mounting composefs images: EROFS metadata + overlayfs over the object store.

The EROFS image is mounted read-only straight from its object file (no loop device
needed on kernels with file-backed EROFS), used as the overlay's lower layer, with
objects/ as a data-only lower layer, so file content comes from objects via the
metacopy/redirect xattrs. Both are built with the mount API as detached mounts (never
attached anywhere but where the caller wants): `pycfs mount` attaches the overlay with
move_mount, the varlink service hands its fd to the client.
"""

from __future__ import annotations

import errno
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
    client); without them the mount is read-only. ``suid``: set-user-ID bits and file
    capabilities of the image take effect (a root filesystem needs them; by default they
    do not: an image from anywhere would give every local user root)."""

    upper_fd: int | None = None
    work_fd: int | None = None
    read_write: bool = False
    suid: bool = False


def _open_image(repo: Repository, image_id: bytes) -> int:
    """The image object, opened and checked against its name: the kernel trusts the image
    it mounts (with fs-verity, verity=require checks the files against the digests the
    image names: an edited image names others)."""
    from pycfs.host.erofs.format import MAX_IMAGE_SIZE
    from pycfs.host.fsverity import digest_fd

    fd = repo.open_object(image_id)
    try:
        if repo.secure:
            got = syscalls.fsverity_measure(fd, repo.hash_alg_id)
        elif os.fstat(fd).st_size > MAX_IMAGE_SIZE:
            raise PycfsError(f"image {image_id.hex()} in {repo.path} is larger than a composefs image may be "
                             f"({MAX_IMAGE_SIZE} bytes): not an image pycfs mounts (run `pycfs fsck`)")
        else:
            got = digest_fd(fd, repo.alg)
        if got != image_id:
            raise PycfsError(f"image {image_id.hex()} in {repo.path} is corrupt: its fs-verity digest differs from its "
                             "name (run `pycfs fsck --repair`, then pull or create the image again)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_image_mount(repo: Repository, image_id: bytes, options: MountOptions | None = None) -> int:
    """A detached mount of the composefs image: the fd of an overlay (EROFS metadata over
    the repository's objects/) that move_mount attaches anywhere, or that closes away.
    Needs root (CAP_SYS_ADMIN in the initial user namespace)."""
    options = options or MountOptions()
    image_fd = _open_image(repo, image_id)
    objects = erofs = -1
    try:
        objects = os.open("objects", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=repo.dirfd)
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
                "overlay", overlay, syscalls.MOUNT_ATTR_NODEV | (0 if options.suid else syscalls.MOUNT_ATTR_NOSUID)
                | (0 if options.read_write else syscalls.MOUNT_ATTR_RDONLY))
        except OSError as e:
            raise PycfsError(f"mounting the overlay failed: {e.strerror} (needs overlayfs with lowerdir+/datadir+, "
                             "Linux 6.7 or newer)") from None
    finally:
        # overlayfs holds its own reference to the EROFS mount
        close_fds([fd for fd in (erofs, objects, image_fd) if fd >= 0])


def mount_image(repo: Repository, name: str, mountpoint: str, suid: bool = False) -> bytes:
    """Mount the image read-only at mountpoint; returns its id. Needs root (CAP_SYS_ADMIN)."""
    _not_mounted(mountpoint)
    target = open_mountpoint(repo, mountpoint)
    try:
        image_id = resolve_image(repo, name)
        fd = open_image_mount(repo, image_id, MountOptions(suid=suid))
        try:
            syscalls.move_mount_fd(fd, target)
        except OSError as e:
            raise PycfsError(f"attaching the mount at {mountpoint} failed: {e.strerror}") from None
        finally:
            os.close(fd)
    finally:
        os.close(target)
    return image_id


def open_mountpoint(repo: Repository, mountpoint: str) -> int:
    """The mount point, opened (O_PATH) as the directory it is now: the mount goes onto
    that directory through its fd, so no symlink put there after the checks redirects it.
    It may not be a symlink, nor lie inside the repository (a FUSE server would look up
    the objects it serves through its own mount, and hang)."""
    try:
        fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(mountpoint):  # (O_PATH opens the link: ENOTDIR)
            raise PycfsError(f"mount point {mountpoint} is a symlink: name the directory itself") from None
        if e.errno == errno.ENOTDIR:
            raise PycfsError(f"mount point {mountpoint} is not a directory") from None
        raise PycfsError(f"mount point {mountpoint}: {e.strerror}") from None
    where = os.path.realpath(f"/proc/self/fd/{fd}")
    inside = os.path.realpath(repo.path)
    if where == inside or where.startswith(inside.rstrip("/") + "/"):
        os.close(fd)
        raise PycfsError(f"mount point {mountpoint} is inside the repository {repo.path}: mount it elsewhere")
    return fd


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


def fuse_image(repo: Repository, name: str, mountpoint: str):  # -> fuse.image.ServedImage
    """Resolve and check the image a FUSE server will serve (nothing is mounted yet)."""
    from pycfs.host.fuse.image import load_image  # the FUSE server loads only when a FUSE mount is wanted

    _not_mounted(mountpoint)
    os.close(open_mountpoint(repo, mountpoint))  # (the server mounts on it by fd again)
    return load_image(repo, resolve_image(repo, name))


def _not_mounted(mountpoint: str) -> None:
    """Nothing is mounted onto a mount point, kernel and FUSE alike: a second mount would
    stack on the first, and umount take off only the top one."""
    if _mounted(mountpoint) is not None:
        raise PycfsError(f"{mountpoint} is a mount point already: `pycfs umount {mountpoint}` first")


def _mounted(mountpoint: str) -> tuple[str, str] | None:
    """(filesystem type, source) of the top mount at mountpoint, from /proc/self/mountinfo."""
    # realpath does not give up on the mount point itself when a killed FUSE server
    # makes it answer ENOTCONN
    target = os.fsencode(os.path.realpath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            where = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if where == target:
                at = fields.index(b"-")
                found = fields[at + 1].decode(errors="replace"), fields[at + 2].decode(errors="replace")
    return found


# What pycfs mounts (and C mount.composefs): an overlay named composefs, or its FUSE server.
_OURS = {("overlay", "composefs"), ("fuse.pycfs", "composefs")}


def unmount(mountpoint: str) -> None:
    """Unmount a composefs mount: nothing else (root could otherwise unmount anything
    named, /proc as well), and never through a symlink."""
    if os.path.islink(mountpoint):
        raise PycfsError(f"{mountpoint} is a symlink: name the mount point itself")
    mounted = _mounted(mountpoint)
    if mounted is None:
        raise PycfsError(f"nothing is mounted at {mountpoint}")
    if mounted not in _OURS:
        raise PycfsError(f"{mountpoint} is a {mounted[0]} mount of {mounted[1]}, not a composefs image: "
                         "pycfs unmounts only its own (use umount)")
    if mounted[0].startswith("fuse") and os.geteuid() != 0:  # root of a user namespace may umount its own
        from pycfs.host.fuse.mounting import fuse_unmount

        fuse_unmount(mountpoint)
        return
    try:
        syscalls.umount(mountpoint, syscalls.UMOUNT_NOFOLLOW)
    except OSError as e:
        raise PycfsError(f"unmounting {mountpoint} failed: {e.strerror}") from None
