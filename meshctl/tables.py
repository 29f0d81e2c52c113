"""Plain-text tables for command output (catalog, contract checks, ledger, analyses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, upper: bool = True) -> str:
    """Rows as left-aligned columns under the headers (upper-cased unless `upper` is off)."""
    cells = [[h.upper() if upper else h for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def cell(value: Any, missing: str = "-") -> str:
    """One metric value as a table shows it: a number (4 significant digits), a histogram
    `[3 5 2]`, quantiles `q0.5=3.2`; `missing` for a value the group has not."""
    if value is None:
        return missing
    if isinstance(value, dict) and "counts" in value:
        return "[" + " ".join(_short(c, missing) for c in value["counts"]) + "]"
    if isinstance(value, dict):
        return " ".join(f"q{q}={_short(v, missing)}" for q, v in value.items())
    return _short(value, missing)


def _short(x: Any, missing: str) -> str:
    if x is None:
        return missing
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e6 else f"{x:.4e}"
