"""Replaying a recorded run: find its `events.jsonl`, pace it, feed the app.

`find_events` and `schedule` are pure (no app, no threads) so the CLI and the
tests share them; `PacedReplay` is the event source `meshctl dash --replay`
plugs into the same app and the same reducer a live run uses.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from meshctl.errors import UserError
from meshctl.runtime.events import Event, parse_event
from meshctl.runtime.run import EVENTS_FILE, LATEST, RUNS_DIR, resolve_run
from meshctl.tui.bridge import _Feeder, _short
from meshctl.tui.messages import BridgeNote, EventHost, FrameSkipped

__all__ = ["EVENTS_FILE", "PacedReplay", "ScrubReplay", "find_events", "round_marks", "schedule"]



def find_events(run: str | Path, *, root: str | Path | None = None) -> Path:
    """The `events.jsonl` of RUN: that file, a run directory, a run id under `root/.meshctl/runs/`, or `latest`.

    Raises:
        UserError: nothing matches, or the run directory holds no events.
    """
    spec = str(run)
    if spec == LATEST:  # the newest run (meshctl.runtime.run.resolve_run)
        return resolve_run(spec, root) / EVENTS_FILE
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

    def start(self, app: EventHost) -> None:
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


SPEEDS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 0.0)
"""The speed steps `+` and `-` move between; 0 = as fast as possible."""

MAX_PER_TICK = 400
"""At most this many events are reduced per tick, so a long replay never stalls the UI."""


def round_marks(events: Sequence[Event]) -> list[int]:
    """Positions just after each `round_completed`: where stepping by a round lands."""
    return [i + 1 for i, e in enumerate(events) if e.type == "round_completed"]


class ScrubReplay:
    """Replay an `events.jsonl` inside the app's own loop, with a scrubber.

    It reduces forward as recorded time passes (scaled by `speed`); `seek` moves
    anywhere, and the app rebuilds its state by re-reducing the events before that
    position (the reducer is pure). Keys, bound by the app: space pause/resume,
    `[`/`]` a round back/forward, `g`/`G` start/end, `-`/`+` slower/faster.

    Args:
        path: The `events.jsonl` file.
        speed: 10.0 replays ten times faster than recorded; 0 as fast as possible.
        tick_s: How often the replay advances (on the app's timer).
    """

    def __init__(self, path: str | Path, *, speed: float = 10.0, tick_s: float = 0.05) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.path = Path(path)
        self.speed = speed
        self.tick_s = tick_s
        self.events: list[Event] = []
        self.bad: list[str] = []
        """Why each line that did not parse was skipped."""
        self.pos = 0
        """How many events the app has reduced."""
        self.marks: list[int] = []
        """`round_marks` of the events."""
        self.paused = False
        self._app: EventHost | None = None
        self._cursor_ts = 0.0
        self._last_tick = 0.0
        self._timer: object | None = None

    @property
    def done(self) -> bool:
        """Whether every event has been reduced."""
        return self.pos >= len(self.events)

    def load(self) -> None:
        """Read and parse the file (bad lines go to `bad`)."""
        self.events, self.bad = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        self.events.append(parse_event(line))
                    except Exception as err:  # noqa: BLE001 - a bad line never stops a replay
                        self.bad.append(_short(err))
        self.marks = round_marks(self.events)

    def start(self, app: EventHost) -> None:
        """Load the file and start advancing on the app's timer; call from the app's thread."""
        self._app = app
        try:
            self.load()
        except OSError as err:
            app.post_message(BridgeNote("error", f"cannot replay {self.path}: {err}"))
            return
        for reason in self.bad:
            app.post_message(FrameSkipped(reason))
        self._cursor_ts = self.events[0].ts if self.events else 0.0
        self._last_tick = time.monotonic()
        self._timer = app.set_interval(self.tick_s, self.tick)

    def stop(self) -> None:
        """Stop advancing; idempotent."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()  # type: ignore[attr-defined]

    def tick(self) -> None:
        """Reduce the events that are due since the last tick."""
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        if self.paused or self.done or self._app is None:
            return
        if self.speed == 0:
            end = min(len(self.events), self.pos + MAX_PER_TICK)
        else:
            self._cursor_ts += elapsed * self.speed
            end = self.pos
            while (end < len(self.events) and end - self.pos < MAX_PER_TICK
                   and self.events[end].ts <= self._cursor_ts):
                end += 1
        if end > self.pos:
            batch, self.pos = self.events[self.pos:end], end
            self._cursor_ts = max(self._cursor_ts, batch[-1].ts)
            self._app.apply_events(batch)

    def toggle(self) -> None:
        """Pause, or resume where it stopped."""
        self.paused = not self.paused
        self._last_tick = time.monotonic()

    def seek(self, pos: int) -> None:
        """Move to `pos` (clamped) and have the app rebuild its state up to there."""
        pos = max(0, min(len(self.events), pos))
        if self._app is None:
            self.pos = pos
            return
        if pos >= self.pos:
            batch, self.pos = self.events[self.pos:pos], pos
            self._app.apply_events(batch)
        else:
            self.pos = pos
            self._app.rebuild(self.events[:pos])
        self._cursor_ts = self.events[pos - 1].ts if pos else (
            self.events[0].ts if self.events else 0.0)

    def step_round(self, delta: int) -> None:
        """Pause and move `delta` rounds (±1) from the current position."""
        self.paused = True
        marks = self.marks
        if delta > 0:
            self.seek(next((m for m in marks if m > self.pos), len(self.events)))
        else:
            self.seek(next((m for m in reversed(marks) if m < self.pos), 0))

    def seek_round(self, n: int) -> None:
        """Pause just after round `n` completed (0: the start; clamped to the last round)."""
        self.paused = True
        n = max(0, min(len(self.marks), n))
        self.seek(self.marks[n - 1] if n else 0)

    def timeline(self, width: int = 30) -> str:
        """A bar `width` cells wide: filled up to the position, `┃` where each round ended
        (every round when they fit, else evenly spaced ones)."""
        width = max(4, width)
        total = max(1, len(self.events))
        cells = ["━" if i < round(self.pos / total * width) else "─" for i in range(width)]
        step = max(1, -(-len(self.marks) // width))
        for mark in self.marks[step - 1::step]:
            i = min(width - 1, max(0, round(mark / total * width) - 1))
            cells[i] = "┃" if mark <= self.pos else "│"
        return "".join(cells)

    def change_speed(self, delta: int) -> None:
        """Move `delta` steps along `SPEEDS` (0, as fast as possible, is the top)."""
        at = SPEEDS.index(self.speed) if self.speed in SPEEDS else \
            min(range(len(SPEEDS) - 1), key=lambda i: abs(SPEEDS[i] - self.speed))
        self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, at + delta))]

    def status(self) -> str:
        """One line for the scrubber bar: state, speed, position, round."""
        mode = "paused" if self.paused else ("finished" if self.done else "playing")
        speed = "max" if self.speed == 0 else f"{self.speed:g}×"
        rounds = bisect.bisect_right(self.marks, self.pos)
        return (f"replay {mode} · {speed} · event {self.pos}/{len(self.events)} · "
                f"round {rounds}/{len(self.marks)}")
