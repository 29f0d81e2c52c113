"""The Catalog tab: every data product, searchable; the selected one's schema, checks, lineage."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Console
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Input, Static

from meshctl.tui.state import MeshState, ProductView, lineage, product_status
from meshctl.tui.widgets._format import MISSING

STATUSES = ("passed", "warning", "failed", "unchecked")

COLUMNS: tuple[tuple[str, str], ...] = (
    ("address", "product"), ("checks", "checks"), ("rows", "rows"), ("classification", "class"),
    ("freshness", "fresh"), ("contract", "contract"), ("owner", "owner"), ("domain", "domain"),
)
"""(column key, label) in display order: the checks (`passed 14/14`) right after the product, so
a narrow terminal cuts the owner and the domain (already in the address), never the checks."""


def product_text(p: ProductView) -> str:
    """Everything searchable about a product, in one string."""
    cols = " ".join(str(c.get("name", "")) for c in p.columns)
    return " ".join([p.address, p.owner, p.classification, p.contract, " ".join(p.tags),
                     p.description, cols])


def search(products: list[ProductView], query: str) -> list[ProductView]:
    """The products whose text contains `query` (case-insensitive); all for ''."""
    needle = query.strip().casefold()
    return [p for p in products if needle in product_text(p).casefold()] if needle else products


class CatalogTable(DataTable[str | Text]):
    """One row per product that matches the search."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"catalog-table--{s}" for s in STATUSES}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._shown: list[tuple[str | Text, ...]] = []

    def on_mount(self) -> None:
        self.border_title = "catalog"
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, products: list[ProductView], total: int) -> None:
        """Show `products` (rebuilding only when a cell changed)."""
        rows = [self.cells(p) for p in products]
        if [tuple(map(str, r)) for r in rows] != [tuple(map(str, r)) for r in self._shown]:
            keep = self.cursor_row
            self.clear()
            for p, row in zip(products, rows):
                self.add_row(*row, key=p.address)
            if rows:
                self.move_cursor(row=min(keep, len(rows) - 1))
            self._shown = rows
        self.border_subtitle = f"{len(products)} of {total} products"

    def cells(self, p: ProductView) -> tuple[str | Text, ...]:
        """A product's cells, in `COLUMNS` order."""
        status = product_status(p)
        badge = Text(_checks_label(p, status), style=self.get_component_rich_style(
            f"catalog-table--{status}", partial=True))
        return (p.address, badge, MISSING if p.rows is None else f"{p.rows:,}",
                p.classification or MISSING, p.freshness or MISSING, p.contract or MISSING,
                p.owner or MISSING, p.domain)

    def current(self) -> str | None:
        """The address under the cursor, or None for an empty table."""
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    @property
    def plain_rows(self) -> list[list[str]]:
        """The rows as plain text, top to bottom (for tests)."""
        return [[str(c) for c in self.get_row_at(i)] for i in range(self.row_count)]


def _checks_label(p: ProductView, status: str) -> str:
    if status == "unchecked":
        return "unchecked"
    passed = sum(c.passed for c in p.checks.values())
    return f"{status} {passed}/{len(p.checks)}"


def detail(state: MeshState, address: str) -> Text | Table:
    """The detail of product `address`: header, schema, contract checks, lineage."""
    p = state.products[address]
    out = Table.grid(padding=(0, 1))
    out.add_column()
    head = Text(p.address, style="bold")
    head.append(f"  {p.classification or 'unclassified'} · {p.access or 'access ?'}"
                f" · {p.contract or 'no contract'}")
    if p.epsilon is not None:
        cap = f" of {p.epsilon_cap:g}" if p.epsilon_cap is not None else ""
        head.append(f" · ε spent {p.epsilon:g}{cap}")
    out.add_row(head)
    if p.description:
        out.add_row(Text(p.description, style="italic"))
    out.add_row(_schema(p))
    out.add_row(_checks(p))
    readers = lineage(state, address)
    out.add_row(Text("lineage: read by " + (", ".join(readers) if readers else "nothing yet")
                     + " in this run"))
    return out


def _schema(p: ProductView) -> Table | Text:
    if not p.columns:
        return Text("schema: not listed yet (no product_listed event)", style="dim")
    t = Table(title="schema", title_justify="left", box=None, pad_edge=False)
    for name in ("column", "type", "pii", "masking"):
        t.add_column(name)
    for c in p.columns:
        pii = str(c.get("pii") or "none")
        style = "bold red" if pii == "direct" else "yellow" if pii == "indirect" else ""
        t.add_row(str(c.get("name", "")), str(c.get("type", "")), Text(pii, style=style),
                  str(c.get("masking") or MISSING))
    return t


def _checks(p: ProductView) -> Table | Text:
    if not p.checks:
        return Text("contract checks: none reported yet", style="dim")
    t = Table(title="contract checks", title_justify="left", box=None, pad_edge=False)
    for name in ("rule", "observed", "expected", "result"):
        t.add_column(name)
    for c in p.checks.values():
        observed = MISSING if c.observed is None else f"{c.observed:g}"
        expected = f"{c.operator} {c.threshold}" if c.operator else MISSING
        result = Text("pass", style="green") if c.passed else Text(
            f"FAIL ({c.severity})", style="bold red" if c.severity == "error" else "yellow")
        t.add_row(c.rule, observed, expected, result)
    return t


class CatalogView(Vertical):
    """Search input, the catalog table, and the selected product's detail."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave_search", "Leave search", show=False)]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.query_text = ""
        self.picked: str | None = None
        """The product selected (Enter or click), or None to follow the cursor."""
        self._state: MeshState | None = None
        self._detail: Text | Table = Text("")

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search products…  / to focus, esc to leave", id="catalog-search")
        yield CatalogTable(id="catalog")
        with VerticalScroll(id="product-scroll"):
            yield Static(id="product-detail")

    def show(self, state: MeshState) -> None:
        """Render the products of `state` that match the search, and the chosen one's detail."""
        self._state = state
        products = search(list(state.products.values()), self.query_text)
        self.query_one(CatalogTable).show(products, len(state.products))
        self._show_detail()

    @property
    def detail_text(self) -> str:
        """The detail pane as plain text (for tests)."""
        console = Console(width=120, color_system=None, record=True, file=_Null())
        console.print(self._detail)
        return console.export_text()

    def _show_detail(self) -> None:
        state = self._state
        table = self.query_one(CatalogTable)
        address = self.picked if self.picked in (state.products if state else {}) \
            else table.current()
        pane = self.query_one("#product-detail", Static)
        if state is None or address is None or address not in state.products:
            self._detail = Text("no products yet" if state is None or not state.products
                                else "no product matches the search", style="dim")
        else:
            self._detail = detail(state, address)
        pane.update(self._detail)

    @on(Input.Changed, "#catalog-search")
    def _search(self, message: Input.Changed) -> None:
        message.stop()
        self.query_text = message.value
        if self._state is not None:
            self.show(self._state)

    @on(DataTable.RowSelected, "#catalog")
    def _pick(self, message: DataTable.RowSelected) -> None:
        self.picked = message.row_key.value
        self._show_detail()

    @on(DataTable.RowHighlighted, "#catalog")
    def _follow(self, message: DataTable.RowHighlighted) -> None:
        if message.row_key.value != self.picked:
            self.picked = None
        self._show_detail()

    def action_leave_search(self) -> None:
        self.query_one(CatalogTable).focus()


class _Null:
    """A file that drops what is written (the console only records)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
