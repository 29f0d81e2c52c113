"""Small formatters shared by the widgets (display only, no arithmetic on the run)."""

from __future__ import annotations

import time

MISSING = "–"
"""Shown where the events have not said a value."""


def fmt_float(value: float | None, digits: int = 4) -> str:
    """`value` with `digits` decimals, or the missing marker."""
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_seconds(value: float | None) -> str:
    """Seconds as `0.123s`, `12.3s` or `2m05s`."""
    if value is None:
        return MISSING
    if value < 10:
        return f"{value:.3f}s"
    if value < 120:
        return f"{value:.1f}s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes}m{seconds:02d}s"


def fmt_bytes(value: int | None) -> str:
    """A byte count in binary units: `512 B`, `1.5 KiB`, `3.2 MiB`."""
    if value is None:
        return MISSING
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def fmt_clock(ts: float) -> str:
    """An event time as local `HH:MM:SS`, or blanks for lines without one."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


def fmt_age(seconds: float | None) -> str:
    """A heartbeat age: `0s`, `42s`, `3m`, `2h`; the missing marker when never seen."""
    if seconds is None:
        return MISSING
    if seconds < 100:
        return f"{int(seconds)}s"
    if seconds < 6000:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds // 3600)}h"


def fmt_eta(seconds: float | None) -> str:
    """An ETA: `ETA 12s`, `ETA 2m05s`, `done`, or `ETA –` when unknown."""
    if seconds is None:
        return f"ETA {MISSING}"
    if seconds == 0:
        return "done"
    return f"ETA {fmt_seconds(seconds) if seconds >= 10 else f'{seconds:.1f}s'}"
