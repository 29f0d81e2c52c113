"""Replaying a recorded run: find its `events.jsonl`, pace it, feed the app.

`find_events` and `schedule` are pure (no app, no threads) so the CLI and the
tests share them; `PacedReplay` is the event source `meshctl dash --replay`
plugs into the same app and the same reducer a live run uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshctl.errors import UserError
from meshctl.runtime.events import Event, parse_event
from meshctl.tui.bridge import _Feeder, _short
from meshctl.tui.messages import BridgeNote

if TYPE_CHECKING:
    from meshctl.tui.app import MeshApp

__all__ = ["EVENTS_FILE", "PacedReplay", "find_events", "schedule"]

EVENTS_FILE = "events.jsonl"
RUNS_DIR = Path(".meshctl") / "runs"
"""Where `meshctl up` keeps runs, relative to the mesh.yaml's directory."""


def find_events(run: str | Path, *, root: str | Path | None = None) -> Path:
    """The `events.jsonl` of RUN: that file, a run directory, or a run id under `root/.meshctl/runs/`.

    Raises:
        UserError: nothing matches, or the run directory holds no events.
    """
    spec = str(run)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        events = path / EVENTS_FILE
        if events.is_file():
            return events
        raise UserError(f"no {EVENTS_FILE} in this directory", where=spec)
    base = Path.cwd() if root is None else Path(root)
    if spec and "/" not in spec and "\\" not in spec and spec not in (".", ".."):
        events = base / RUNS_DIR / spec / EVENTS_FILE
        if events.is_file():
            return events
    raise UserError(f"no such run: {spec}", hint=f"pass a run directory, its {EVENTS_FILE}, "
                    f"or a run id under {RUNS_DIR}/")


def schedule(timestamps: Sequence[float], speed: float) -> list[float]:
    """When each event is due, in seconds from the start of the replay.

    Gaps between consecutive recorded times are divided by `speed`; `speed` 0
    means as fast as possible (every offset 0). A timestamp of 0 (unknown) or
    one earlier than the previous adds no delay, so offsets never decrease.
    """
    if speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    offsets: list[float] = []
    now, prev = 0.0, None
    for ts in timestamps:
        if speed > 0 and ts and prev is not None:
            now += max(0.0, ts - prev) / speed
        if ts:
            prev = ts
        offsets.append(now)
    return offsets


class PacedReplay(_Feeder):
    """Feed an `events.jsonl` file once, honouring its recorded timing scaled by `speed`.

    Args:
        path: The `events.jsonl` file.
        speed: 10.0 replays ten times faster than recorded; 0 as fast as possible.
    """

    def __init__(self, path: str | Path, *, speed: float = 10.0) -> None:
        super().__init__()
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.path = Path(path)
        self.speed = speed
        self.done = threading.Event()
        """Set when every line has been fed (or the replay stopped)."""

    def start(self, app: MeshApp) -> None:
        """Start replaying into `app`; returns at once."""
        self._start_thread(app, "meshctl-paced-replay")

    def load(self) -> list[Event | str]:
        """Every non-blank line parsed: an `Event`, or why the line did not parse."""
        items: list[Event | str] = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    items.append(parse_event(line))
                except Exception as err:  # noqa: BLE001 - a bad line must never stop the replay
                    items.append(_short(err))
        return items

    def _run(self) -> None:
        try:
            items = self.load()
            offsets = schedule([i.ts if isinstance(i, Event) else 0.0 for i in items], self.speed)
            start = time.monotonic()
            for item, due in zip(items, offsets):
                wait = start + due - time.monotonic()
                if (wait > 0 and self._stop.wait(wait)) or self._stop.is_set():
                    break
                if isinstance(item, Event):
                    self.received += 1
                    self._post_event(item)
                else:
                    self.skip(item)
        except OSError as err:
            self._post(BridgeNote("error", f"cannot replay {self.path}: {err}"))
        finally:
            self.done.set()
