"""A containers-storage pull with nothing to import (the usual re-pull), without the event loop.

It reads and checks what `pycfs.host.oci.cstorage.pull_image` does: the image is looked up
and read under the c/storage read locks (so a changed manifest, config or layer list is
seen), and the layers' streams are taken only when `Repository.intact_streams` says each is intact
(its own object hashes to its name, every object it lists is present). Then the same finish,
`finish_pull`: the recorded config compared, the EROFS image re-hashed and rebuilt when
missing or damaged, the config and manifest streams and the tag written. Only trio, the
object worker processes and the helper client are left out: a pull needs them to import a
layer, and a process that only finds its image in place no longer imports them (most of a
re-pull's time was their start-up).

When a layer must be imported, or a writer holds the c/storage locks, it gives up before
reporting or writing anything, and the full pull does the whole job (waiting for the locks, or
taking over the ones held here).
"""

from __future__ import annotations

import time

from pycfs.host.oci.pull import PullOptions, split_reference, storage_for
from pycfs.host.oci.result import ImportStats, PullResult, containers_storage_result
from pycfs.host.repository import Repository
from pycfs.host.storage.image import read_image


def pull_if_stored(repo: Repository, image: str, tag: str | None, options: PullOptions) -> PullResult | None:
    """`pull(repo, image, tag, options)` when it has no layer to import; None when it has one
    (or the image is not from containers-storage, or ``verify_diffid`` asks to re-hash the
    stored layers, or podman is writing): then run `pull` with the same options (which may
    now hold the c/storage read locks for it, in ``storage_locks``)."""
    transport, source = split_reference(image)
    if transport != "containers-storage" or options.verify_diffid:
        return None
    repo.require_writable()
    storage, name = storage_for(source, options.storage_root)
    started = time.monotonic()
    locks = storage.read_locks()
    if not locks.try_acquire():
        return None  # podman is writing: the full pull waits, and says so
    try:
        found = read_image(storage, name)
        diff_ids = [layer.diff_id for layer in found.layers]
        stream_ids = repo.intact_streams([f"oci-layer-{d}" for d in diff_ids])
    except BaseException:
        locks.release()
        raise
    if len(stream_ids) < len(diff_ids):
        # The full pull takes the locks over: `podman rmi` cannot come between this look and
        # the import. Not when it starts the helper first (--helper always): `podman unshare`
        # takes podman's locks for writing.
        if options.helper == "always":
            locks.release()
        else:
            options.storage_locks = locks
            options.looked = (found, len(stream_ids))
        return None
    locks.release()
    # Only here: a pull with a layer to import forks its workers as soon as this returns,
    # and they need none of the image code (the pull imports it after the fork).
    from pycfs.host.oci.image import finish_pull

    layers = list(zip(diff_ids, stream_ids))
    # The full pull's reports, in its order, now that there is no work to report.
    progress = options.progress
    if progress is not None:
        progress.layers([(layer.diff_id, layer.layer.diff_size) for layer in found.layers])
        for diff_id, _ in layers:
            progress.layer_done(diff_id, True)
    finished = finish_pull(repo, found.manifest_digest, found.manifest, found.config_digest, found.config, layers, tag,
                           build_image=options.create_image,
                           on_phase=progress.phase if progress is not None else None)
    stats = ImportStats(layers=len(layers), layers_already_present=len(layers))
    return containers_storage_result(found, finished, layers, stats, tag, started)
