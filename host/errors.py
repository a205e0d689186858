"""The one exception type the CLI turns into a one-line error message."""


class PycfsError(Exception):
    """A failure the user can act on; str() is the whole message, one line."""
