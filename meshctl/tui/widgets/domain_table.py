"""The domains table: each domain's state, jurisdiction, heartbeat and last update."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widgets import DataTable

from meshctl.tui.state import DomainView, MeshState, heartbeat_age, seen_at, silent
from meshctl.tui.widgets._format import MISSING, fmt_age, fmt_bytes, fmt_clock

STATES = ("connecting", "joined", "waiting", "training", "evaluating", "idle", "lost", "refused",
          "done", "silent")
LABELS = {"waiting": "waiting for quorum"}
"""How a state reads in the table, where it differs from its name."""
SILENT = "silent"
"""Shown instead of a live state when the domain has said nothing for longer than the loss limit."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("domain", "domain"), ("state", "state"), ("jurisdiction", "jur."), ("heartbeat", "seen"),
    ("products", "products"), ("update", "last update"),
)
"""(column key, label) in display order."""


class DomainTable(DataTable[str | Text]):
    """One row per domain, updated in place."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"domain-table--{s}" for s in STATES}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", **kwargs)  # type: ignore[arg-type]
        self.flag_silent = False
        """Show a live domain that has said nothing beyond the loss limit as `silent` (a live run,
        or a replay; not a state fed from events of another time)."""

    def on_mount(self) -> None:
        self.border_title = "domains"
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, state: MeshState, now: float | None = None) -> None:
        """Render every domain of `state`; heartbeat ages are taken at `now` (default: its clock),
        or at the run's end once it has ended."""
        at = seen_at(state, state.clock if now is None else now)
        for name, domain in state.domains.items():
            row = self.cells(domain, at)
            if name in self.rows:
                for (key, _), value in zip(COLUMNS[1:], row[1:]):
                    self.update_cell(name, key, value, update_width=True)
            else:
                self.add_row(*row, key=name)

    def cells(self, domain: DomainView, now: float) -> tuple[str | Text, ...]:
        """A domain's cells, in `COLUMNS` order."""
        shown = SILENT if self.flag_silent and silent(domain, now) else domain.state
        label = LABELS.get(shown, shown)
        if shown == "refused" and domain.cause:
            label = f"refused ({domain.cause})"
        badge = Text(label, style=self.get_component_rich_style(f"domain-table--{shown}", partial=True))
        products = ", ".join(p.split(".", 1)[-1] for p in domain.products) or MISSING
        return (domain.name, badge, domain.jurisdiction or MISSING,
                fmt_age(heartbeat_age(domain, now)), products, last_update(domain))

    def reset(self) -> None:
        """Forget every row (the state was rebuilt)."""
        self.clear()

    @property
    def plain_rows(self) -> list[list[str]]:
        """The rows as plain text, top to bottom (for tests)."""
        return [[str(c) for c in self.get_row_at(i)] for i in range(self.row_count)]


def last_update(domain: DomainView) -> str:
    """The domain's last update in one short line, or why it is gone."""
    if domain.state in ("lost", "refused") and domain.reason:
        return f"{domain.cause}: {domain.reason}" if domain.cause == "data" else domain.reason
    if domain.last_examples is None:
        return MISSING
    size = f" · {fmt_bytes(domain.last_bytes)}" if domain.last_bytes is not None else ""
    return f"{domain.last_job} r{domain.last_round}{size} · {fmt_clock(domain.last_update_ts)}"
