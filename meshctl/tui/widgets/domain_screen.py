"""One domain, drilled into (enter on its row in the domains table): its products and their
contract checks, the policy decisions about it, its contribution to every round (examples, loss,
update bytes) and its own metrics (`RoundCompleted.domain_metrics`). Redrawn as events arrive;
escape goes back."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Label, Static

from meshctl.tui.state import MeshState
from meshctl.tui.widgets._format import MISSING, fmt_bytes, fmt_float


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", expand=False,
                  show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _about(subject: str, domain: str) -> bool:
    """Whether a decision's subject is this domain, one of its products, or its update."""
    parts = subject.split(".")
    return subject == domain or parts[0] == domain or (parts[0] in ("update", "domain") and parts[-1] == domain)


def domain_detail(state: MeshState, name: str) -> list[RenderableType]:
    """What the drill-down shows for domain `name`, section by section."""
    d = state.domains.get(name)
    if d is None:
        return [Text(f"no domain {name} in this run")]
    head = Text()
    head.append(name, style="bold").append(f"  {d.state}")
    if d.cause:
        head.append(f" ({d.cause})")
    for label, value in (("jurisdiction", d.jurisdiction), ("owner", d.owner)):
        if value:
            head.append(f"  {label} {value}")
    if d.reason:
        head.append(f"\nreason: {d.reason}")
    out: list[RenderableType] = [head]

    products = _table("products", "product", "rows", "checks")
    checks = _table("contract checks", "product", "rule", "result", "observed", "detail")
    addresses = sorted({*d.products, *(a for a, p in state.products.items() if p.domain == name)})
    for address in addresses:
        p = state.products.get(address)
        rows = d.rows.get(address, p.rows if p is not None else None)
        results = list(p.checks.values()) if p is not None else []
        passed = sum(c.passed for c in results)
        products.add_row(address, MISSING if rows is None else f"{rows:,}",
                         f"passed {passed}/{len(results)}" if results else "unchecked")
        for c in results:
            bound = f" {c.operator} {c.threshold}" if c.operator else ""
            observed = MISSING if c.observed is None else f"{c.observed:g}{bound}"
            checks.add_row(address.split(".", 1)[-1], c.rule, "passed" if c.passed else f"failed ({c.severity})",
                           observed, c.detail)
    out += [products, checks] if checks.row_count else [products]

    decisions = _table("policy decisions", "policy", "subject", "effect", "at", "decided by", "reason")
    for dec in state.decisions:
        if _about(dec.subject, name) or dec.domain == name:
            decisions.add_row(dec.policy, dec.subject, dec.effect, dec.at or MISSING, dec.decided_by, dec.reason)
    out.append(decisions if decisions.row_count else Text("policy decisions: none about this domain"))

    rounds = _table("rounds", "job", "round", "examples", "loss", "update", "seconds")
    for (job, rnd), contributions in state.contributions.items():
        for c in contributions:
            if c.domain == name:
                rounds.add_row(job, str(rnd), f"{c.examples:,}", fmt_float(c.loss), fmt_bytes(c.bytes),
                               f"{c.seconds:.2f}")
    out.append(rounds if rounds.row_count else Text("rounds: no update from this domain yet"))

    names = sorted({m for r in state.rounds for m in r.domain_metrics.get(name, {})})
    if names:
        metrics = _table("own metrics (its holdout)", "job", "round", "examples", *names)
        for r in state.rounds:
            mine = r.domain_metrics.get(name)
            if mine:
                held = r.domain_examples.get(name)
                metrics.add_row(r.job, str(r.round), MISSING if held is None else f"{held:,}",
                                *(fmt_float(mine.get(m)) for m in names))
        out.append(metrics)
    return out


class DomainScreen(Screen[None]):
    """The drill-down of one domain."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Back")]

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain
        self.sections: list[RenderableType] = []
        """What is shown now (for tests)."""

    def compose(self) -> ComposeResult:
        yield Label(f"domain {self.domain}   (esc back)", id="domain-title")
        with VerticalScroll(id="domain-body"):
            yield Static(id="domain-detail")
        yield Footer()

    def on_mount(self) -> None:
        self.show(self.app.mesh_state)  # type: ignore[attr-defined]

    def show(self, state: MeshState) -> None:
        """Redraw from `state`."""
        self.sections = domain_detail(state, self.domain)
        self.query_one("#domain-detail", Static).update(Group(*_spaced(self.sections)))

    def action_close(self) -> None:
        """Back to the dashboard."""
        self.dismiss(None)


def _spaced(sections: list[RenderableType]) -> list[RenderableType]:
    out: list[RenderableType] = []
    for s in sections:
        if out:
            out.append(Text(" "))
        out.append(s)
    return out
