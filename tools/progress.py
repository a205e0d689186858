"""How long work reports itself: rich bars on a terminal, plain lines otherwise, JSON lines
on stderr for scripts (`--progress=json`, the default with `--json`).

Each presenter implements the library's progress interface (pycfs.host.oci.result.PullProgress
for pulls; `step`/`done` counters for fsck and gc); the library never prints."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from typing import Any

from pycfs.host.progress import PullProgress, StepProgress

MODES = ("auto", "plain", "json", "none")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="how to report progress on stderr: auto (bars on a terminal, JSON lines with --json, "
                        "else plain lines), plain, json (one JSON object a line) or none")


def progress_mode(args: argparse.Namespace) -> str:
    mode = getattr(args, "progress", "auto")
    if mode != "auto":
        return mode
    if getattr(args, "json", False):
        return "json"
    return "rich" if sys.stderr.isatty() else "plain"


def rich_bars(*columns: Any) -> Any:
    """A transient rich Progress of these columns on stderr, the terminal `progress_mode`
    looks at (rich's default is stdout, which carries the command's result)."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, transient=True, console=Console(stderr=True))


def emit_json(event: str, **fields: Any) -> None:
    """One progress event as a JSON line on stderr (flushed: a script reads it as it comes)."""
    sys.stderr.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
    sys.stderr.flush()


def _short(diff_id: str) -> str:
    return diff_id.partition(":")[2][:12] or diff_id[:12]


class _LayerClock:
    """Per-layer start times, so rates are the layer's own, not averaged from the pull's start."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.total = 0
        self.started: dict[str, float] = {}
        self.done_bytes: dict[str, int] = {}

    def know(self, layers: list[tuple[str, int | None]]) -> None:
        for diff_id, _ in layers:
            self.index.setdefault(diff_id, len(self.index) + 1)
        self.total = len(self.index)

    def label(self, diff_id: str) -> str:
        return f"layer {self.index.get(diff_id, '?')}/{self.total} {_short(diff_id)}"

    def start(self, diff_id: str) -> None:
        self.started[diff_id] = time.monotonic()
        self.done_bytes[diff_id] = 0

    def rate(self, diff_id: str) -> str:
        seconds = time.monotonic() - self.started.get(diff_id, time.monotonic())
        nbytes = self.done_bytes.get(diff_id, 0)
        if seconds <= 0 or not nbytes:
            return ""
        from pycfs.host.oci.result import human_size  # only pulls' lines need it

        return f" in {seconds:.2f}s ({human_size(int(nbytes / seconds))}/s)"


PHASES = {"image": "building the composefs image", "streams": "writing config and manifest, tagging"}


class PlainPullProgress(PullProgress):
    """Without a terminal: one line per event on stderr."""

    def __init__(self) -> None:
        self.clock = _LayerClock()

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def waiting_for_lock(self) -> None:
        self._say("waiting for containers-storage locks (podman is writing)...")

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        self.clock.know(layers)
        sizes = sum(s or 0 for _, s in layers)
        from pycfs.host.oci.result import human_size

        self._say(f"{len(layers)} layer{'s' if len(layers) != 1 else ''}, {human_size(sizes)}")

    def layer_started(self, diff_id: str, total_bytes: int | None) -> None:
        self.clock.start(diff_id)

    def advance(self, diff_id: str, nbytes: int) -> None:
        self.clock.done_bytes[diff_id] = self.clock.done_bytes.get(diff_id, 0) + nbytes

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        what = "already present" if already_present else f"imported{self.clock.rate(diff_id)}"
        self._say(f"{self.clock.label(diff_id)}: {what}")

    def phase(self, name: str) -> None:
        self._say(f"{PHASES.get(name, name)}...")


class JsonPullProgress(PullProgress):
    """JSON lines: the events as they come, for scripts (and the varlink Pull frames)."""

    def __init__(self) -> None:
        self.clock = _LayerClock()
        self._reported: dict[str, int] = {}

    def waiting_for_lock(self) -> None:
        emit_json("waiting-for-lock")

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        self.clock.know(layers)
        emit_json("layers", layers=[{"diff_id": d, "bytes": s} for d, s in layers])

    def layer_started(self, diff_id: str, total_bytes: int | None) -> None:
        self.clock.start(diff_id)
        emit_json("layer-started", diff_id=diff_id, index=self.clock.index.get(diff_id), total_bytes=total_bytes)

    def advance(self, diff_id: str, nbytes: int) -> None:
        done = self.clock.done_bytes[diff_id] = self.clock.done_bytes.get(diff_id, 0) + nbytes
        # At most ~one line per 64 MiB a layer: enough to follow, not a flood.
        if done - self._reported.get(diff_id, 0) >= 64 << 20:
            self._reported[diff_id] = done
            emit_json("layer-progress", diff_id=diff_id, bytes=done)

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        now = time.monotonic()  # once: a layer found already present never started, and takes 0.0 s, not -0.0
        seconds = now - self.clock.started.get(diff_id, now)
        emit_json("layer-done", diff_id=diff_id, index=self.clock.index.get(diff_id), already_present=already_present,
                  bytes=self.clock.done_bytes.get(diff_id, 0), seconds=round(seconds, 3))

    def phase(self, name: str) -> None:
        emit_json("phase", phase=name)


class RichPullProgress(PlainPullProgress):
    """One bar per layer on a terminal. The bars (and rich) come with the first layer that is
    imported; until then lines are plain, so a re-pull with nothing to import never loads rich."""

    def __init__(self, stack: ExitStack) -> None:
        super().__init__()
        self._stack = stack
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}  # diff_id -> rich TaskID
        self.sizes: dict[str, int | None] = {}  # layers still to import or find

    def _say(self, text: str) -> None:
        if self.progress is None:
            super()._say(text)
        else:
            self.progress.console.print(text)

    def _bars(self) -> Any:
        if self.progress is None:
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

            self.progress = self._stack.enter_context(rich_bars(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()))
            for diff_id, size in self.sizes.items():  # every layer listed from the first import on
                self.tasks[diff_id] = self.progress.add_task(self.clock.label(diff_id), total=size, start=False)
        return self.progress

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        self.clock.know(layers)
        self.sizes.update(layers)

    def layer_started(self, diff_id: str, total_bytes: int | None) -> None:
        super().layer_started(diff_id, total_bytes)
        progress = self._bars()
        task = self.tasks.get(diff_id)
        if task is None:
            task = self.tasks[diff_id] = progress.add_task(self.clock.label(diff_id), total=total_bytes)
        progress.start_task(task)

    def advance(self, diff_id: str, nbytes: int) -> None:
        super().advance(diff_id, nbytes)
        self.progress.advance(self.tasks[diff_id], nbytes)

    def layer_done(self, diff_id: str, already_present: bool) -> None:
        self.sizes.pop(diff_id, None)
        task = self.tasks.pop(diff_id, None)
        if task is not None:
            self.progress.remove_task(task)
        super().layer_done(diff_id, already_present)


def pull_progress(args: argparse.Namespace, stack: ExitStack) -> PullProgress | None:
    mode = progress_mode(args)
    if mode == "none":
        return None
    if mode == "json":
        return JsonPullProgress()
    if mode == "rich":
        return RichPullProgress(stack)
    return PlainPullProgress()


class Counter(StepProgress):
    """Progress of a counted phase (fsck's objects, gc's scan): a bar on a terminal, a line
    every few seconds otherwise, JSON lines in json mode."""

    def __init__(self, mode: str, stack: ExitStack) -> None:
        self.mode = mode
        self._stack = stack
        self._progress: Any = None
        self._task: Any = None
        self._last = 0.0
        self._name = ""
        self._total = 0
        self._count = 0

    def start(self, name: str, total: int) -> None:
        self._name, self._total, self._count, self._last = name, total, 0, time.monotonic()
        if self.mode == "json":
            emit_json("phase", phase=name, total=total)
        elif self.mode == "rich":
            if self._progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

                self._progress = self._stack.enter_context(rich_bars(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()))
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(name, total=total)
        elif self.mode == "plain":
            print(f"{name}: {total}...", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        self._count += n
        if self.mode == "rich":
            self._progress.advance(self._task, n)
            return
        now = time.monotonic()
        if now - self._last < 5:
            return
        self._last = now
        if self.mode == "json":
            emit_json("progress", phase=self._name, done=self._count, total=self._total)
        elif self.mode == "plain":
            print(f"{self._name}: {self._count}/{self._total}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A one-off message (e.g. waiting for a lock)."""
        if self.mode == "json":
            emit_json("note", text=text)
        elif self.mode == "rich" and self._progress is not None:
            self._progress.console.print(text)
        elif self.mode != "none":
            print(text, file=sys.stderr, flush=True)
