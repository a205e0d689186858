"""`pycfs varlink serve`: the org.composefs.Repository and org.composefs.Oci varlink service."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from pycfs.host.varlink.serve import serve

    trio.run(serve, args.address, args.containers_storage, args.storage_root, args.helper)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # populate: the sub-command only for `pycfs varlink ...`
    sub.add_parser("varlink", help="serve the composefs varlink API (repositories, OCI images, layer transport)",
                   description="The composefs varlink service, wire-compatible with composefs-rs `cfsctl varlink`.",
                   populate=_populate)


def _populate(v: argparse.ArgumentParser) -> None:
    from pycfs.tools.common import add_helper_option

    vsub = v.add_subparsers(dest="varlink_command", metavar="VARLINK_COMMAND", required=True)
    p = vsub.add_parser(
        "serve", help="serve org.composefs.Repository and org.composefs.Oci on a socket",
        description="Serve org.composefs.Repository and org.composefs.Oci (plus org.varlink.service) until "
        "interrupted. Clients open repositories by path (OpenRepository) and use the handle; --repo is not used. "
        "Without --address the socket comes from systemd socket activation (LISTEN_FDS): a listening socket is "
        "accepted on, a connected one (varlinkctl call exec:...) is served alone. Layers move between services "
        "with GetLayer/PutLayer (splitdirfdstream-v0): file content is passed as directory fds, so the "
        "destination reflinks it.")
    p.add_argument("--address", metavar="unix:PATH", help="listen on this AF_UNIX socket (a stale socket file is replaced)")
    p.add_argument("--containers-storage", action="store_true",
                   help="serve the layers of podman's containers-storage instead (GetInfo, GetLayer): files this "
                   "user can open go as directory references, files only container uids may read are read "
                   "through the helper; `pycfs oci copy IMAGE --from unix:SOCKET` then imports from it")
    p.add_argument("--storage-root", metavar="DIR",
                   help="with --containers-storage: the graphroot (default: from storage.conf, as podman)")
    add_helper_option(p)
    p.set_defaults(handler=cmd_serve)
