"""pycfs.host: everything that runs unprivileged."""

# The one place the version is written: pyproject.toml reads it from here, and --version and
# the varlink service print it without importlib.metadata (a third of a no-op's start-up).
__version__ = "0.1.0"
