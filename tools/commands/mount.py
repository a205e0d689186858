"""mount / umount of composefs images (root only)."""

from __future__ import annotations

import argparse


def cmd_mount(args: argparse.Namespace) -> int:
    from pycfs.host.mount import mount_image
    from pycfs.tools.common import open_repo

    with open_repo(args, writable=False) as repo:
        image_id = mount_image(repo, args.image, args.mountpoint)
    print(f"mounted image {image_id.hex()} at {args.mountpoint}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from pycfs.host.mount import unmount

    unmount(args.mountpoint)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount a composefs image (root)",
                       description="Mount an image read-only: IMAGE is an image id, an images/refs name, or an "
                       "OCI tag from `pycfs oci images`. EROFS metadata over overlayfs, with file content from "
                       "the repository's objects (verity=require when the repository has fs-verity).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(handler=cmd_mount)
    p = sub.add_parser("umount", help="unmount a composefs image", description="Unmount a mounted image.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(handler=cmd_umount)
