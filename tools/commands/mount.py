"""mount / umount of composefs images: the kernel's EROFS + overlayfs as root, FUSE otherwise."""

from __future__ import annotations

import argparse

from pycfs.host.errors import PycfsError


def cmd_mount(args: argparse.Namespace) -> int:
    # Imported here: `pycfs --help` and the other commands need none of it.
    from pycfs.host.mount import fuse_image, mount_image, use_fuse
    from pycfs.tools.common import open_repo

    if not use_fuse(args.fuse):
        if args.foreground:
            raise PycfsError("--foreground is for FUSE mounts: the kernel mount needs no server")
        with open_repo(args, writable=False) as repo:
            image_id = mount_image(repo, args.image, args.mountpoint, suid=args.suid)
        print(f"mounted image {image_id.hex()} at {args.mountpoint}")
        return 0
    if args.suid:
        raise PycfsError("--suid is for the kernel mount (as root): a FUSE mount never honours set-user-ID bits")
    from pycfs.host.fuse import mounting

    with open_repo(args, writable=False) as repo:
        image = fuse_image(repo, args.image, args.mountpoint)
    done = f"mounted image {image.image_id.hex()} at {args.mountpoint} (FUSE"
    if args.foreground:
        mounting.log_to_stderr()
        mounting.serve(image, args.mountpoint, lambda: print(f"{done}; serving until unmounted)", flush=True))
        return 0
    pid = mounting.serve_daemon(image, args.mountpoint)
    print(f"{done}, server pid {pid}; `pycfs umount {args.mountpoint}` unmounts it)")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from pycfs.host.mount import unmount

    unmount(args.mountpoint)
    return 0


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    """IMAGE MOUNTPOINT --fuse --foreground: shared by `mount` and `oci mount`."""
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--fuse", choices=("auto", "yes", "no"), default="auto",
                   help="serve the image through FUSE: auto (default) does so unless running as root "
                   "of the initial user namespace, where the kernel mount is used")
    p.add_argument("--foreground", action="store_true",
                   help="FUSE: keep the server in the foreground and log to stderr until unmounted "
                   "(otherwise it daemonises once the mount works, and logs to syslog when there is one)")
    add_suid_argument(p)
    p.set_defaults(handler=cmd_mount)


def add_suid_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suid", action="store_true",
                   help="kernel mount: let the image's set-user-ID/set-group-ID bits and file capabilities take "
                   "effect, as a root filesystem needs (by default they do not: a program in an image from "
                   "anywhere, set-user-ID root, would give every local user root)")


MOUNT_DESCRIPTION = (
    "Mount an image read-only. As root: EROFS metadata over overlayfs, with file content from the "
    "repository's objects (verity=require when the repository has fs-verity). As an ordinary user "
    "(or inside a user namespace): the same tree served through FUSE, needing /dev/fuse and "
    "fusermount3; only you can enter it, and the kernel enforces the image's modes. A file whose "
    "object is missing or damaged gives EIO. Unmount with `pycfs umount MOUNTPOINT`."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount a composefs image (kernel as root, FUSE otherwise)",
                       description=MOUNT_DESCRIPTION + " IMAGE is an image id, an images/refs name, or an "
                       "OCI tag from `pycfs oci images`.")
    add_mount_arguments(p)
    p = sub.add_parser("umount", help="unmount a composefs image",
                       description="Unmount a mounted image: a kernel mount (root), or a FUSE mount through "
                       "fusermount3, also when its server was killed.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(handler=cmd_umount)
