"""Finding a test user's pycfs child processes (the helper, object workers) to stop or kill."""

from pathlib import Path


def pids_of(uid: int, marker: bytes) -> list[int]:
    """Processes of `uid` whose command line contains `marker` (e.g. b"pycfs.helper")."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found
