"""Rootless mounting: a read-only FUSE server for a composefs image, speaking the kernel's
FUSE protocol (pycfs.protocol.fuse) on /dev/fuse itself.

Modules: `image` (the tree as overlayfs shows it), `operations` (requests answered in
Python terms), `splice` (object bytes to /dev/fuse), `server` (the request loop),
`readahead` (pushing what comes next into the page cache), `mounting` (mount, serve,
daemonise, unmount).

The kernel mounts EROFS only for root. This server shows an ordinary user the tree that
`pycfs mount` as root shows (EROFS image as overlayfs's lower layer, objects/ as its
data-only layer), read from the stored inodes rather than the reader's logical tree,
because that is what overlayfs presents: native chr 0:0 entries (whiteouts and the
epoch-1 stubs) are hidden, escaped whiteouts appear as the empty regular files they are
stored as, `trusted.overlay.overlay.*` shows unescaped, other `trusted.overlay.*` is
hidden. Inode numbers come from nids, so hardlinks share one.

File content is read from the repository's objects: the first read of a file opens its
object, read-only and beneath objects/, and checks it is a regular file of the size the
image records (and, in a repository with fs-verity, its kernel-measured digest, as
overlayfs's verity=require does: an entry without a digest is refused); otherwise reading
that file fails with EIO and the server logs one line. Nothing but a regular file is
opened (a device's open has effects), and no lookup crosses a mount below objects/.
Everything is immutable, so the kernel caches entries, attributes, symlinks, directory
listings and pages forever, opens files and directories without asking (OPEN answered
ENOSYS), and enforces modes itself (`default_permissions`).
"""
