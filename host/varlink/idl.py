"""Interface descriptions (varlink IDL) of the two composefs interfaces, as served by
`org.varlink.service.GetInterfaceDescription`. Names, fields and errors are those of
composefs-rs `cfsctl varlink`, so either tool's clients work with either service."""

# Fsck's reply, also Check's `repo` (type FsckReply)
_FSCK_FIELDS = """\
  ok: bool,
  has_metadata: bool,
  objects_checked: int,
  objects_corrupted: int,
  streams_checked: int,
  streams_corrupted: int,
  images_checked: int,
  images_corrupted: int,
  broken_links: int,
  missing_objects: int,
  errors: []string
"""

REPOSITORY = """\
# composefs repositories: create or open one (a handle), check it, collect garbage.
# Handles are service-wide, start at 1 and are never reused.
interface org.composefs.Repository

type GcResult (
  objects_removed: int,
  objects_bytes: int,
  images_pruned: int,
  streams_pruned: int
)

type ImageRef (name: string, digest: string)

type EnsureStatus (Opened, Created, Upgraded)

type MountParams (overlay: ?bool, read_write: ?bool)

# Create a repository (and its parents). created is false when an identical one exists.
method InitRepository(path: string, algorithm: ?string, insecure: ?bool) -> (created: bool)

# Open the repository at path, creating it if there is none; never fails on a format
# mismatch with an existing one (it keeps its own format).
method EnsureRepository(path: string, algorithm: ?string, insecure: ?bool) -> (status: EnsureStatus)

# Exactly one of path, user ($HOME/.var/lib/composefs), system (/sysroot/composefs).
method OpenRepository(path: ?string, user: ?bool, system: ?bool) -> (
  handle: int,
  hash_algorithm: ?string,
  objects_device_id: ?int
)

method CloseRepository(handle: int) -> ()

# Verify objects (unless metadata_only), streams, images and refs.
method Fsck(handle: int, metadata_only: ?bool) -> (
""" + _FSCK_FIELDS + """)

# Delete what no ref reaches (roots: extra stream refs to keep; none supported yet).
method Gc(handle: int, dry_run: bool, roots: []string) -> (result: GcResult, dry_run: bool)

# The objects an EROFS image (images/<name>, e.g. refs/my-image) refers to, sorted, as algo:hex.
method ImageObjects(handle: int, name: string) -> (object_ids: []string)

method ListImageRefs(handle: int) -> (images: []ImageRef)

# Mount the image images/<name> (root callers of a root service only): the reply's fd
# (fds[fd_index]) is a detached mount; attach it with move_mount(2). With overlay, the
# call carries two fds [upperdir, workdir] for a writable upper layer (with read_write).
method Mount(handle: int, name: string, options: MountParams) -> (fd_index: int)

error RepoNotFound (message: string)
error InvalidHandle (handle: int)
error InvalidSpec (message: string)
error NoSuchRef (reference: string)
error InternalError (message: string)
"""

OCI = """\
# OCI images in a composefs repository, and the splitdirfdstream layer transport:
# GetLayer hands out a pipe of splitdirfdstream bytes plus directory fds, PutLayer
# consumes them, so layers move between repositories without copying file content.
interface org.composefs.Oci

type ImageEntry (
  name: string,
  manifest_digest: string,
  is_container: bool,
  architecture: string,
  os: string,
  created: ?string,
  layer_count: int,
  referrer_count: int
)

type FsckReply (
""" + _FSCK_FIELDS + """)

type XattrFiltering (AllowlistOnly, KeepUserXattrs)

type ProgressUnit (Bytes, Items)

type PullStarted (id: string, total: ?int, unit: ProgressUnit)

type PullProgressUpdate (id: string, fetched: int, total: ?int)

type PullSkipped (id: string)

type PullDone (id: string, transferred: int)

type PullStats (
  layers: int,
  layers_already_present: int,
  objects_reflinked: int,
  objects_copied: int,
  objects_already_present: int,
  bytes_reflinked: int,
  bytes_copied: int,
  bytes_inlined: int
)

type PullCompleted (
  manifest_digest: string,
  config_digest: string,
  manifest_verity: string,
  config_verity: string,
  stats: PullStats,
  boot_image: ?string,
  boot_image_mode: ?string,
  boot_image_format_version: ?int
)

type StorageLocator (storage_path: string, layer_id: string)

type GetLayerParams (diff_id: ?string, storage: ?StorageLocator, consumer_has_cap_dac_override: ?bool)

type LayerRef (diff_id: string, layer_verity: string)

type MountParams (overlay: ?bool, read_write: ?bool)

# Features: splitdirfdstream-v0 (and source-containers-storage, read-only for a
# containers-storage layer service).
method GetInfo() -> (features: []string)

method ListImages(handle: int, filter: ?string) -> (images: []ImageEntry)

method Check(handle: int, image: ?string) -> (
  ok: bool,
  images_checked: int,
  images_corrupted: int,
  errors: []string,
  repo: FsckReply
)

# image: a tag or @sha256:<manifest digest>; manifest and config as stored, byte for byte.
method Inspect(handle: int, image: string) -> (
  manifest: string,
  config: string,
  referrers: []string,
  composefs_erofs: ?string,
  composefs_boot_erofs: ?string
)

method Tag(handle: int, manifest_digest: string, name: string) -> ()

method Untag(handle: int, name: string) -> ()

method ComputeId(handle: int, image: string, verity: ?string, bootable: bool, xattrs: ?XattrFiltering) -> (
  image_id: string
)

# Call with more: progress frames, each with exactly one of started, progress, skipped,
# done, message; the last one has completed.
method Pull(
  handle: int,
  image: string,
  name: ?string,
  local_fetch: string,
  storage_root: ?string,
  bootable: bool,
  xattrs: ?XattrFiltering,
  expected_digest: ?string
) -> (
  started: ?PullStarted,
  progress: ?PullProgressUpdate,
  skipped: ?PullSkipped,
  done: ?PullDone,
  message: ?string,
  completed: ?PullCompleted
)

method HasLayer(handle: int, diff_id: string) -> (present: bool, layer_verity: ?string)

# Call with more. The fds of all replies, in order: [pipe read end, dir_count directory
# slots (chunk dirfd_index i = slot i; some slots are dummies), lifetime fds]. Keep the
# lifetime fds open until done with the pipe and the directories.
method GetLayer(handle: int, params: GetLayerParams) -> (dir_count: int)

# fds: [pipe read end, dir_0, dir_1, ...]. Nothing is committed unless the stream's
# sha256 is diff_id.
method PutLayer(handle: int, diff_id: string, zerocopy: bool) -> (
  layer_verity: string,
  already_present: bool,
  objects_reflinked: int,
  objects_hardlinked: int,
  objects_copied: int,
  objects_already_present: int
)

# After PutLayer of every layer: store manifest and config (exact bytes), build the
# composefs image, tag it name.
method FinalizeImage(
  handle: int,
  manifest_json: string,
  config_json: string,
  layers: []LayerRef,
  name: ?string
) -> (
  manifest_digest: string,
  manifest_verity: string,
  config_digest: string,
  config_verity: string
)

# Mount the composefs image of an OCI image (a tag or sha256:<manifest digest>) as
# Repository.Mount does; bootable images are not supported.
method OciMount(handle: int, image: string, bootable: bool, options: MountParams) -> (fd_index: int)

error RepoNotFound (message: string)
error InvalidHandle (handle: int)
error NoSuchImage (image: string)
error InternalError (message: string)
error NoSuchLayer (diff_id: string)
error InvalidDigest (message: string)
error DiffIdMismatch (expected: string, actual: string)
error InvalidRequest (message: string)
error FdLimitExceeded (fd_count: int, max_per_frame: int)
error BootImageMismatch (expected: string, tried: int)
"""
