"""The privacy ledger: ε spent per data product, across runs, in `.meshctl/ledger.db`.

Each domain keeps the ledger of its own products beside its mesh.yaml (for a local
mesh all daemons share the file; SQLite's locking keeps concurrent writers apart).
A daemon calls `charge` right before it releases a differentially private result:
the check `spent + ε ≤ budget` and the charge happen in one IMMEDIATE transaction,
so two runs racing for the last ε cannot both get it. What is charged stays
charged: a release that failed to arrive still counts (the conservative choice).

A DP training run reserves its whole ε per product when the domain admits the job
(`reserve`, same IMMEDIATE transaction: spent + reserved by others + ε ≤ budget), so
two runs started together cannot both be admitted and then both run out mid-way. Its
per-round charges draw from its own reservation; what they have not yet drawn is held
from everyone else. The held part is given back (`release`) when the daemon that made
it exits, whatever the run's outcome: rounds that ran stay charged (their noise was
released, so that ε is gone), rounds never started cost nothing. A reservation whose
daemon died without releasing is not held either: it records the daemon's host, pid
and process start time, and a reservation on this host whose process is gone, or on
another host and older than STALE_S, is released by the next transaction that meets it.
A resumed run re-reserves under the same run id and counts its own earlier charges as
part of its ε, as before.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from meshctl.errors import UserError
from meshctl.tables import format_table

LEDGER_FILE = "ledger.db"
"""File name of the ledger inside `.meshctl/`."""
BUSY_TIMEOUT_S = 30.0
STALE_S = 24 * 3600.0
"""A reservation made on another host is held at most this long (its daemon cannot be checked)."""

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
CREATE TABLE IF NOT EXISTS reservations (
    product  TEXT NOT NULL,
    subject  TEXT NOT NULL,
    run      TEXT NOT NULL,
    epsilon  REAL NOT NULL CHECK (epsilon >= 0),
    cap      REAL,
    ts       REAL NOT NULL,
    host     TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    started  REAL NOT NULL,
    released REAL,
    PRIMARY KEY (product, subject, run)
);
"""
# The reservations table came after the charges table: a ledger.db made before it gets the
# table on first open (CREATE ... IF NOT EXISTS), and every charge it holds stays.


class BudgetExceeded(Exception):
    """A charge would take a product past its lifetime ε; nothing was charged."""

    def __init__(self, product: str, spent: float, epsilon: float, cap: float, reserved: float = 0.0):
        self.product, self.spent, self.epsilon, self.cap = product, spent, epsilon, cap
        self.reserved = reserved
        held = f" (and other runs hold ε {reserved:g} of it)" if reserved > 1e-12 else ""
        super().__init__(f"product {product} has spent ε {spent:g} of its budget {cap:g}{held}; "
                         f"ε {epsilon:g} more would exceed it")


@dataclass(frozen=True)
class Charge:
    """A charge made: the product's total afterwards."""

    product: str
    epsilon: float
    total: float
    cap: float | None


@dataclass(frozen=True)
class Reservation:
    """A run's ε reserved on a product at admission; `others` is what other live runs hold."""

    product: str
    epsilon: float
    spent: float
    others: float
    cap: float | None


@dataclass(frozen=True)
class LedgerRow:
    """One product's account: ε spent across runs, its budget, and how many runs spent it."""

    product: str
    spent: float
    budget: float | None
    runs: int
    reserved: float = 0.0
    """ε that live runs have reserved and not yet spent."""


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

    def held(self, product: str, *, exclude_run: str | None = None) -> float:
        """ε that live reservations on `product` hold and have not spent (but those of `exclude_run`)."""
        con = self._connect()
        try:
            return sum(left for _, run, left, live in _holds(con, product) if live and run != exclude_run)
        finally:
            con.close()

    def reserve(self, product: str, epsilon: float, cap: float | None, *, subject: str, run: str,
                pid: int | None = None) -> Reservation:
        """Reserve `epsilon` on `product` for `subject` in `run`, owned by process `pid` (this one).

        One IMMEDIATE transaction checks `spent + held by others + epsilon ≤ cap` and records
        the reservation; raise BudgetExceeded. What `subject` already charged in `run` (a
        resumed run) is part of its `epsilon`, and its earlier reservation is taken over.
        """
        pid = os.getpid() if pid is None else pid
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                others = _others(con, product, subject, run)
                spent = _spent(con, product) - _own(con, product, subject, run)
                if cap is not None and spent + others + epsilon > cap + 1e-12:
                    raise BudgetExceeded(product, spent, epsilon, cap, others)
                con.execute("INSERT OR REPLACE INTO reservations (product, subject, run, epsilon, cap, ts, host, "
                            "pid, started, released) VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                            (product, subject, run, epsilon, cap, time.time(), socket.gethostname(), pid,
                             _started(pid)))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return Reservation(product, epsilon, spent, others, cap)
        finally:
            con.close()

    def release(self, run: str, *, pid: int | None = None) -> int:
        """Give back what the reservations of `run` made by process `pid` (this one) hold; how many.

        Their charges stay: only the ε of rounds that never started is freed.
        """
        pid = os.getpid() if pid is None else pid
        con = self._connect()
        try:
            cur = con.execute("UPDATE reservations SET released = ? WHERE run = ? AND pid = ? AND host = ? "
                              "AND released IS NULL", (time.time(), run, pid, socket.gethostname()))
            return cur.rowcount
        finally:
            con.close()

    def charge(self, product: str, epsilon: float, cap: float | None, *, subject: str, run: str) -> Charge:
        """Check `spent + held by others + epsilon ≤ cap` and record the charge, atomically; raise
        BudgetExceeded. A charge of `subject` in `run` draws on that run's own reservation."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                spent = _spent(con, product)
                others = _others(con, product, subject, run)
                if cap is not None and spent + others + epsilon > cap + 1e-12:
                    raise BudgetExceeded(product, spent, epsilon, cap, others)
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
        for product, held in self._reserved().items():
            row = out.get(product) or LedgerRow(product, 0.0, budgets.get(product), 0)
            out[product] = LedgerRow(row.product, row.spent, row.budget, row.runs, held)
        return [out[p] for p in sorted(out)]

    def _reserved(self) -> dict[str, float]:
        """ε held by live reservations, per product that has any."""
        if not self.path.exists():
            return {}
        con = self._connect()
        try:
            products = [r[0] for r in con.execute("SELECT DISTINCT product FROM reservations "
                                                  "WHERE released IS NULL ORDER BY product")]
            held = {p: sum(left for _, _, left, live in _holds(con, p) if live) for p in products}
        finally:
            con.close()
        return {p: h for p, h in held.items() if h > 1e-12}


def _spent(con: sqlite3.Connection, product: str) -> float:
    row = con.execute("SELECT coalesce(sum(epsilon), 0) FROM charges WHERE product = ?", (product,)).fetchone()
    return float(row[0])


def _own(con: sqlite3.Connection, product: str, subject: str, run: str) -> float:
    row = con.execute("SELECT coalesce(sum(epsilon), 0) FROM charges WHERE product = ? AND subject = ? AND run = ?",
                      (product, subject, run)).fetchone()
    return float(row[0])


def _holds(con: sqlite3.Connection, product: str) -> list[tuple[str, str, float, bool]]:
    """Open reservations on `product`: (subject, run, ε reserved and not yet charged, live)."""
    rows = con.execute(
        "SELECT r.subject, r.run, r.epsilon - coalesce((SELECT sum(c.epsilon) FROM charges c WHERE "
        "c.product = r.product AND c.subject = r.subject AND c.run = r.run), 0), r.host, r.pid, r.started, r.ts "
        "FROM reservations r WHERE r.product = ? AND r.released IS NULL", (product,)).fetchall()
    now = time.time()
    return [(subject, run, max(float(left), 0.0), _live(host, pid, started, ts, now))
            for subject, run, left, host, pid, started, ts in rows]


def _others(con: sqlite3.Connection, product: str, subject: str, run: str) -> float:
    """Inside a write transaction: ε held by live reservations other than (subject, run)'s;
    the reservations of dead daemons are released on the way."""
    held, now = 0.0, time.time()
    for s, r, left, live in _holds(con, product):
        if not live:
            con.execute("UPDATE reservations SET released = ? WHERE product = ? AND subject = ? AND run = ?",
                        (now, product, s, r))
        elif (s, r) != (subject, run):
            held += left
    return held


def _started(pid: int) -> float:
    """When process `pid` started (0 when it is gone): with the pid, it names one process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _live(host: str, pid: int, started: float, ts: float, now: float) -> bool:
    """Whether the daemon that made a reservation may still draw on it."""
    if host != socket.gethostname():
        return now - ts < STALE_S  # cannot look at another host's processes
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def render_ledger(rows: list[LedgerRow]) -> str:
    """The ledger as a text table: product, spent, reserved (by live runs), budget, left, runs."""
    if not rows:
        return "no product has a privacy budget or a charge yet"
    head = ("product", "spent ε", "reserved ε", "budget ε", "left ε", "runs")
    body = [(r.product, f"{r.spent:g}", f"{r.reserved:g}", "-" if r.budget is None else f"{r.budget:g}",
             "-" if r.budget is None else f"{max(r.budget - r.spent - r.reserved, 0.0):g}", str(r.runs))
            for r in rows]
    return format_table(head, body, upper=False)
