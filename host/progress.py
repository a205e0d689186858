"""What long work reports as it goes. The library calls these interfaces and never prints;
front ends (tools/progress.py: bars, plain lines, JSON lines; the varlink service's Pull
frames) override what they show. The base classes show nothing."""

from __future__ import annotations


class StepProgress:
    """A run of counted phases (fsck's objects, streams, images; gc's scan)."""

    def start(self, phase: str, total: int) -> None:
        """A phase of ``total`` steps begins."""

    def step(self, n: int = 1) -> None:
        """n more steps of the current phase are done."""

    def note(self, text: str) -> None:
        """A one-off message, e.g. waiting for a lock."""


class PullProgress:
    """What a pull reports as it goes; every transport calls these, a front end overrides
    what it shows (this base shows nothing). Layers are named by diff_id."""

    def waiting_for_lock(self) -> None:
        """Another program holds a lock the pull needs."""

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        """Once, before any layer is imported: (diff_id, content bytes or None) of each."""

    def layer_started(self, diff_id: str, total_bytes: int | None) -> None:
        """The layer's import begins."""

    def advance(self, diff_id: str, nbytes: int) -> None:
        """nbytes more of the layer's content are stored."""

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        """The layer's stream is stored (or was intact already)."""

    def phase(self, name: str) -> None:
        """The pull moved on after the layers: "image" (EROFS build), "streams" (config,
        manifest and tag)."""
