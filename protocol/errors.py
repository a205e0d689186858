"""The root of pycfs's error hierarchy.

It lives here, in the leaf package both processes import, so that the helper (which imports
nothing from host/) and the host's codecs raise the same family; `pycfs.host.errors`
re-exports it for the host side."""


class PycfsError(Exception):
    """A failure the user can act on; str() is the whole message, one line that names the
    object or path and what to do."""
