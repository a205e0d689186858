"""`pull IMAGE`: dispatch on the transport prefix, then build the composefs image.

A transport is an async function (repo, source after the prefix, tag, options) ->
PullResult; adding one is one entry in TRANSPORTS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pycfs.host.errors import PycfsError
from pycfs.host.oci.result import PullResult
from pycfs.host.progress import PullProgress
from pycfs.host.repository import Repository
from pycfs.host.storage.config import load_storage_config
from pycfs.host.storage.locks import ReadLocks
from pycfs.host.storage.store import Storage, parse_reference

if TYPE_CHECKING:
    from pycfs.host.oci.headstart import HeadStart
    from pycfs.host.storage.image import ImageSource
    from pycfs.host.workers.fork import Forked


@dataclass
class PullOptions:
    storage_root: str | None = None  # containers-storage graphroot override
    verify_diffid: bool = False  # containers-storage: re-hash rebuilt tars (oci: always verifies blobs)
    helper: str = "auto"  # auto | always | never
    progress: PullProgress | None = None
    create_image: bool = True
    jobs: int | None = None  # containers-storage: object worker processes (None: one per CPU)
    # containers-storage: read locks held already, which the pull takes over and releases
    # (pycfs.host.oci.repull hands them on when its look finds a layer to import)
    storage_locks: ReadLocks | None = None
    # Workers forked before the event loop started (`fork_pull_workers`): containers-storage
    # object workers or oci: inflating workers. The pull takes them out of this list (and
    # stops those it has no use for); the caller discards what is left when it fails early.
    forked: list[Forked] = field(default_factory=list)
    # containers-storage: what repull's look read under storage_locks, which the pull takes
    # over with them: the image, and the index of its first layer to import.
    looked: tuple[ImageSource, int] | None = None
    # containers-storage: that layer's import, begun with the forked workers before the event
    # loop (`pycfs.host.oci.headstart`); the caller closes it after the pull.
    head: HeadStart | None = None


def storage_for(source: str, storage_root: str | None) -> tuple[Storage, str]:
    """(Storage, image name) for what follows `containers-storage:`."""
    driver, root, name = parse_reference(source)
    config = load_storage_config(storage_root or root, driver=driver)
    return Storage.from_config(config), name


async def _pull_containers_storage(repo: Repository, source: str, tag: str | None, options: PullOptions) -> PullResult:
    from pycfs.host.helperclient import HelperClient  # the transports' modules only when used:
    from pycfs.host.oci.cstorage import pull_image  # `pycfs oci --help` imports this module

    try:
        storage, name = storage_for(source, options.storage_root)
        async with HelperClient(storage.primary.root, storage.primary.driver, policy=options.helper,
                                additional_stores=[(s.root, s.driver) for s in storage.stores[1:]]) as helper:
            return await pull_image(repo, storage, name, tag, verify_diffid=options.verify_diffid,
                                    helper=helper if helper.enabled else None, progress=options.progress,
                                    parse_layers=options.create_image, jobs=options.jobs, locks=options.storage_locks,
                                    forked=options.forked,
                                    looked=options.looked[0] if options.looked is not None else None,
                                    head=options.head)
    finally:
        if options.storage_locks is not None:
            options.storage_locks.release()  # pull_image's own finally may not have been reached


async def _pull_oci_layout(repo: Repository, source: str, tag: str | None, options: PullOptions) -> PullResult:
    from pycfs.host.oci.layout import pull_oci_layout

    return await pull_oci_layout(repo, source, tag, build_image=options.create_image, progress=options.progress,
                                 jobs=options.jobs, forked=options.forked)


def fork_pull_workers(repo: Repository, jobs: int | None) -> list[Forked]:
    """For a pull with a layer to import (`pycfs.host.oci.repull.pull_if_stored` found
    one), its workers forked now, while the main thread is the only one and before trio
    starts (see `pycfs.host.workers.fork`): the object workers of a containers-storage pull,
    the inflating workers of an oci: pull. A forked worker serves within milliseconds, where
    a spawned one spends ~0.07 s of CPU starting Python and importing what this process has
    loaded, on the cores the pull needs, and came up only after the host's own start-up."""
    from pycfs.host.workers.batching import default_jobs
    from pycfs.host.workers.fork import fork_workers

    return fork_workers(str(repo.path), jobs or default_jobs(), repo.alg)


TRANSPORTS: dict[str, Callable[[Repository, str, str | None, PullOptions], Awaitable[PullResult]]] = {
    "containers-storage": _pull_containers_storage,
    "oci": _pull_oci_layout,
}


def split_reference(image: str) -> tuple[str, str]:
    transport, sep, source = image.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise PycfsError(f"unsupported image reference {image!r}: use "
                         + " or ".join(f"{t}:..." for t in TRANSPORTS))
    return transport, source


async def pull(repo: Repository, image: str, tag: str | None, options: PullOptions) -> PullResult:
    """Import the image's layers (those not stored intact already), build its EROFS image,
    write its config and manifest streams once, and tag it last."""
    transport, source = split_reference(image)
    repo.require_writable()
    return await TRANSPORTS[transport](repo, source, tag, options)
