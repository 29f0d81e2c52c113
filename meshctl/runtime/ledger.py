"""The privacy ledger: ε spent per data product, across runs, in `.meshctl/ledger.db`.

Each domain keeps the ledger of its own products beside its mesh.yaml (for a local
mesh all daemons share the file; SQLite's locking keeps concurrent writers apart).
A daemon calls `charge` right before it releases a differentially private result:
the check `spent + ε ≤ budget` and the charge happen in one IMMEDIATE transaction,
so two runs racing for the last ε cannot both get it. What is charged stays
charged: a release that failed to arrive still counts (the conservative choice).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from meshctl.errors import UserError
from meshctl.tables import format_table

LEDGER_FILE = "ledger.db"
"""File name of the ledger inside `.meshctl/`."""
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    product  TEXT NOT NULL,
    subject  TEXT NOT NULL,
    run      TEXT NOT NULL,
    epsilon  REAL NOT NULL CHECK (epsilon >= 0),
    cap      REAL,
    ts       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_product ON charges (product);
"""


class BudgetExceeded(Exception):
    """A charge would take a product past its lifetime ε; nothing was charged."""

    def __init__(self, product: str, spent: float, epsilon: float, cap: float):
        self.product, self.spent, self.epsilon, self.cap = product, spent, epsilon, cap
        super().__init__(f"product {product} has spent ε {spent:g} of its budget {cap:g}; "
                         f"ε {epsilon:g} more would exceed it")


@dataclass(frozen=True)
class Charge:
    """A charge made: the product's total afterwards."""

    product: str
    epsilon: float
    total: float
    cap: float | None


@dataclass(frozen=True)
class LedgerRow:
    """One product's account: ε spent across runs, its budget, and how many runs spent it."""

    product: str
    spent: float
    budget: float | None
    runs: int


def ledger_path(base_dir: Path) -> Path:
    """`.meshctl/ledger.db` under `base_dir` (the directory of the mesh.yaml)."""
    return Path(base_dir) / ".meshctl" / LEDGER_FILE


class Ledger:
    """The ledger file; open one per use (connections are cheap, and not shared across forks)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UserError(f"privacy ledger is not readable: {err}", where=str(self.path)) from None
        return con

    def spent(self, product: str, *, subject: str | None = None, run: str | None = None) -> float:
        """ε spent on `product` so far (by `subject` in `run` only, when given)."""
        con = self._connect()
        try:
            if subject is None and run is None:
                return _spent(con, product)
            row = con.execute("SELECT coalesce(sum(epsilon), 0) FROM charges WHERE product = ? "
                              "AND subject = coalesce(?, subject) AND run = coalesce(?, run)",
                              (product, subject, run)).fetchone()
            return float(row[0])
        finally:
            con.close()

    def count(self, product: str, *, subject: str, run: str) -> int:
        """How many charges `subject` made on `product` in `run`."""
        con = self._connect()
        try:
            return int(con.execute("SELECT count(*) FROM charges WHERE product = ? AND subject = ? AND run = ?",
                                   (product, subject, run)).fetchone()[0])
        finally:
            con.close()

    def charge(self, product: str, epsilon: float, cap: float | None, *, subject: str, run: str) -> Charge:
        """Check `spent + epsilon ≤ cap` and record the charge, atomically; raise BudgetExceeded."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                spent = _spent(con, product)
                if cap is not None and spent + epsilon > cap + 1e-12:
                    raise BudgetExceeded(product, spent, epsilon, cap)
                con.execute("INSERT INTO charges (product, subject, run, epsilon, cap, ts) VALUES (?,?,?,?,?,?)",
                            (product, subject, run, epsilon, cap, time.time()))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return Charge(product, epsilon, spent + epsilon, cap)
        finally:
            con.close()

    def rows(self, budgets: dict[str, float | None] | None = None) -> list[LedgerRow]:
        """Every product's account, sorted by product; `budgets` adds products never charged."""
        budgets = dict(budgets or {})
        if not self.path.exists():
            found: list[tuple[str, float, int, float | None]] = []
        else:
            con = self._connect()
            try:
                found = con.execute(
                    "SELECT product, sum(epsilon), count(DISTINCT run), "
                    "(SELECT cap FROM charges c2 WHERE c2.product = c.product ORDER BY id DESC LIMIT 1) "
                    "FROM charges c GROUP BY product").fetchall()
            finally:
                con.close()
        out = {p: LedgerRow(p, float(s), budgets.get(p, cap), int(n)) for p, s, n, cap in found}
        for product, budget in budgets.items():
            out.setdefault(product, LedgerRow(product, 0.0, budget, 0))
        return [out[p] for p in sorted(out)]


def _spent(con: sqlite3.Connection, product: str) -> float:
    row = con.execute("SELECT coalesce(sum(epsilon), 0) FROM charges WHERE product = ?", (product,)).fetchone()
    return float(row[0])


def render_ledger(rows: list[LedgerRow]) -> str:
    """The ledger as a text table: product, spent, budget, left, runs."""
    if not rows:
        return "no product has a privacy budget or a charge yet"
    head = ("product", "spent ε", "budget ε", "left ε", "runs")
    body = [(r.product, f"{r.spent:g}", "-" if r.budget is None else f"{r.budget:g}",
             "-" if r.budget is None else f"{max(r.budget - r.spent, 0.0):g}", str(r.runs)) for r in rows]
    return format_table(head, body, upper=False)
