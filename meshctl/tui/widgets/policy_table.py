"""The policies table: every decision the policy engine reported, in order."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widgets import DataTable

from meshctl.tui.state import Decision, MeshState

EFFECTS = ("allow", "warn", "deny", "exclude", "suspend")
"""`exclude` and `suspend`: a round policy left an update out, or a domain out of its job."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("effect", "effect"), ("policy", "policy"), ("at", "at"), ("by", "decided by"),
    ("subject", "subject"), ("reason", "reason"),
)
"""(column key, label) in display order: the short columns first, so `at` (`mesh.yaml:12:5`) and
who decided are never cut off by a long reason (the last column; the Events tab shows it whole)."""


class PolicyTable(DataTable[Text]):
    """Appends a row per `policy_decided` it has not shown yet; deny and warn rows stand out."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"policy-table--{e}" for e in EFFECTS}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", **kwargs)  # type: ignore[arg-type]
        self._shown = 0

    def on_mount(self) -> None:
        self.border_title = "policy decisions"
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, state: MeshState) -> None:
        """Add the decisions of `state` that are not in the table yet."""
        for decision in state.decisions[self._shown:]:
            self.add_row(*self.cells(decision), key=str(self._shown))
            self._shown += 1
        if state.decisions:
            denied = sum(d.effect == "deny" for d in state.decisions)
            self.border_subtitle = f"{len(state.decisions)} decisions, {denied} denied"

    def reset(self) -> None:
        """Forget every row (the state was rebuilt)."""
        self.clear()
        self._shown = 0

    def cells(self, decision: Decision) -> tuple[Text, ...]:
        """A decision's cells in `COLUMNS` order, styled by its effect."""
        effect = decision.effect if decision.effect in EFFECTS else "allow"
        style = self.get_component_rich_style(f"policy-table--{effect}", partial=True)
        values = (decision.effect, decision.policy, decision.at or "–", decision.decided_by,
                  decision.subject, decision.reason)
        return tuple(Text(v, style=style) for v in values)

    @property
    def plain_rows(self) -> list[list[str]]:
        """The rows as plain text, top to bottom (for tests)."""
        return [[str(c) for c in self.get_row_at(i)] for i in range(self.row_count)]
