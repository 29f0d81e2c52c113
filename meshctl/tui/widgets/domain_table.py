"""The domains table: each domain's state and its last reported update."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widgets import DataTable

from meshctl.tui.state import DomainView, MeshState
from meshctl.tui.widgets._format import fmt_float, fmt_seconds

STATES = ("connecting", "joined", "training", "idle", "lost", "refused")


class DomainTable(DataTable[str | Text]):
    """One row per domain, updated in place."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"domain-table--{s}" for s in STATES}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", **kwargs)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.border_title = "domains"
        self.add_column("domain", key="domain")
        self.add_column("state", key="state")
        self.add_column("products", key="products")
        self.add_column("last update", key="update")

    def show(self, state: MeshState) -> None:
        """Render every domain of `state`, adding rows for new ones."""
        for name, domain in state.domains.items():
            badge = Text(domain.state, style=self.get_component_rich_style(
                f"domain-table--{domain.state}", partial=True))
            update = last_update(domain)
            products = ", ".join(domain.products) or "–"
            if name in self.rows:
                self.update_cell(name, "state", badge, update_width=True)
                self.update_cell(name, "products", products, update_width=True)
                self.update_cell(name, "update", update, update_width=True)
            else:
                self.add_row(name, badge, products, update, key=name)


def last_update(domain: DomainView) -> str:
    """The domain's last update in one short line, or why it is gone."""
    if domain.state in ("lost", "refused") and domain.reason:
        return domain.reason
    if domain.last_examples is None:
        return "–"
    return (f"{domain.last_job} r{domain.last_round}: {domain.last_examples} examples, "
            f"loss {fmt_float(domain.last_loss)}, {fmt_seconds(domain.last_seconds)}")
