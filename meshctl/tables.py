"""Plain-text tables for command output (catalog, contract checks, ledger, analyses)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, upper: bool = True) -> str:
    """Rows as left-aligned columns under the headers (upper-cased unless `upper` is off)."""
    cells = [[h.upper() if upper else h for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
