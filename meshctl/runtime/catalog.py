"""The catalog: `.meshctl/catalog.db` (SQLite) beside the mesh.yaml.

It holds what the plan declares about each product (owner, contract, schema with
PII flags and masking, SLA) and what was observed about it: contract check
results (from `meshctl contract test` and from runs), row counts and domain
availability (DomainJoined / DomainLost), and lineage (which model or analysis
read which product under which contract version, in which run). `sync_plan`
refreshes the declared part; `ingest_run` reads a run's `events.jsonl`; a
product's scorecard is derived from both.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshctl.compiler.plan import Plan
from meshctl.errors import UserError
from meshctl.runtime import events as ev
from meshctl.runtime.quality import CheckResult, threshold_text
from meshctl.runtime.run import EVENTS_FILE
from meshctl.tables import format_table

CATALOG_FILE = "catalog.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY, domain TEXT, name TEXT, owner TEXT, classification TEXT, access TEXT,
    contract TEXT, tags TEXT, description TEXT, columns TEXT, format TEXT,
    freshness TEXT, freshness_s REAL, availability TEXT, rows INTEGER, rows_at REAL,
    synced_at REAL);
CREATE TABLE IF NOT EXISTS checks (
    product TEXT, rule TEXT, observed REAL, threshold TEXT, operator TEXT, passed INTEGER,
    severity TEXT, detail TEXT, skipped INTEGER, checked_at REAL, run TEXT);
CREATE INDEX IF NOT EXISTS checks_by_product ON checks (product, checked_at);
CREATE TABLE IF NOT EXISTS lineage (
    run TEXT, subject TEXT, product TEXT, contract TEXT, at REAL, status TEXT,
    PRIMARY KEY (run, subject, product));
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, mesh TEXT, plan_hash TEXT, started_at REAL, completed_at REAL,
    ok INTEGER, reason TEXT, domains TEXT, events_size INTEGER);
CREATE TABLE IF NOT EXISTS availability (
    run TEXT, domain TEXT, joined_at REAL, lost_at REAL, reason TEXT,
    PRIMARY KEY (run, domain));
"""

LOCAL_RUN = "test"
"""Prefix of the `run` of checks recorded by `meshctl contract test` (`test:<time>`)."""


def catalog_path(mesh_file: Path) -> Path:
    """`.meshctl/catalog.db` beside `mesh_file`."""
    return mesh_file.resolve().parent / ".meshctl" / CATALOG_FILE


@contextmanager
def connect(db: Path) -> Iterator[sqlite3.Connection]:
    """An open catalog (created with its tables when missing), committed on success."""
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(db, timeout=10)
        con.row_factory = sqlite3.Row
        con.executescript(_SCHEMA)
    except sqlite3.DatabaseError as err:
        raise UserError(f"not a meshctl catalog: {err}", where=str(db),
                        hint="delete it; it is rebuilt from mesh.yaml and the runs") from None
    try:
        with con:
            yield con
    finally:
        con.close()


# -- writing ------------------------------------------------------------------


def sync_plan(db: Path, plan: Plan) -> None:
    """Make the catalog's products those the plan declares (checks and lineage are kept)."""
    now = time.time()
    with connect(db) as con:
        ids = [p.id for p in plan.products]
        con.execute(f"DELETE FROM products WHERE id NOT IN ({','.join('?' * len(ids))})", ids)
        for p in plan.products:
            contract = next((c for c in plan.contracts if c.id == p.contract), None)
            sla = p.sla if p.sla is not None else (contract.sla if contract else None)
            cols = [{"name": c.name, "type": c.type, "pii": c.pii, "masking": c.masking or "",
                     "generalize": c.generalize, "values": c.values, "range": c.range} for c in p.columns]
            con.execute(
                "INSERT INTO products (id, domain, name, owner, classification, access, contract, tags,"
                " description, columns, format, freshness, freshness_s, availability, synced_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET"
                " domain=excluded.domain, name=excluded.name, owner=excluded.owner,"
                " classification=excluded.classification, access=excluded.access,"
                " contract=excluded.contract, tags=excluded.tags, description=excluded.description,"
                " columns=excluded.columns, format=excluded.format, freshness=excluded.freshness,"
                " freshness_s=excluded.freshness_s, availability=excluded.availability,"
                " synced_at=excluded.synced_at",
                (p.id, p.domain, p.name, p.owner or _owner(plan, p.domain), p.classification,
                 p.access, p.contract, json.dumps(p.tags), p.description, json.dumps(cols), p.format,
                 sla.freshness if sla else "", sla.freshness_s if sla else None,
                 sla.availability if sla else "", now))


def _owner(plan: Plan, domain: str) -> str:
    return next((d.owner for d in plan.domains if d.name == domain), "")


def record_checks(db: Path, product: str, results: Iterable[CheckResult], run: str = "",
                  at: float | None = None) -> None:
    """Append check results of `product` from `run` (default `test:<time>`) at time `at`."""
    at = time.time() if at is None else at
    run = run or f"{LOCAL_RUN}:{time.strftime('%Y%m%d-%H%M%S', time.localtime(at))}"
    with connect(db) as con:
        _insert_checks(con, product, [r.event_fields() | {"skipped": r.skipped} for r in results],
                       run, at)


def _insert_checks(con: sqlite3.Connection, product: str, rows: list[dict[str, Any]], run: str,
                   at: float) -> None:
    con.executemany(
        "INSERT INTO checks (product, rule, observed, threshold, operator, passed, severity,"
        " detail, skipped, checked_at, run) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        [(product, r["rule"], r["observed"], json.dumps(r["threshold"]), r["operator"],
          int(r["passed"]), r["severity"], r.get("detail", ""),
          int(r.get("skipped", False) or str(r.get("detail", "")).startswith("skipped")), at, run)
         for r in rows])


def ingest_run(db: Path, run_dir: Path) -> int:
    """Read a run's `events.jsonl` into the catalog; return the events read.

    Idempotent: what an earlier ingest of the same run wrote is replaced. Lines that
    are not events (a torn last line of a crashed run) are skipped.
    """
    path = run_dir / EVENTS_FILE
    if not path.is_file():
        raise UserError("no events.jsonl in the run directory", where=str(run_dir))
    events = list(_events(path))
    plan = _run_plan(run_dir)
    run = run_dir.name
    with connect(db) as con:
        for table in ("checks", "lineage", "availability", "runs"):
            con.execute(f"DELETE FROM {table} WHERE run = ?", (run,))
        con.execute("INSERT INTO runs (run, events_size) VALUES (?, ?)", (run, path.stat().st_size))
        for event in events:
            _ingest(con, run, event, plan)
    return len(events)


def _events(path: Path) -> Iterator[ev.Event]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    yield ev.parse_event(line)
                except ValueError:
                    continue


def _run_plan(run_dir: Path) -> Plan | None:
    try:
        return Plan.read(run_dir / "plan.toml")
    except (OSError, ValueError):
        return None


def _ingest(con: sqlite3.Connection, run: str, e: ev.Event, plan: Plan | None) -> None:
    if isinstance(e, ev.RunStarted):
        con.execute("UPDATE runs SET mesh=?, plan_hash=?, started_at=?, domains=? WHERE run=?",
                    (e.mesh, e.plan_hash, e.ts, json.dumps(e.domains), run))
    elif isinstance(e, ev.RunCompleted):
        con.execute("UPDATE runs SET completed_at=?, ok=?, reason=? WHERE run=?",
                    (e.ts, int(e.ok), e.reason, run))
    elif isinstance(e, ev.ProductListed):
        _listed(con, e)
    elif isinstance(e, ev.ContractChecked):
        _insert_checks(con, e.product, [e.model_dump()], run, e.ts)
    elif isinstance(e, ev.DomainJoined):
        con.execute("INSERT OR REPLACE INTO availability (run, domain, joined_at) VALUES (?,?,?)",
                    (run, e.domain, e.ts))
        for product, rows in e.rows.items():
            con.execute("UPDATE products SET rows=?, rows_at=? WHERE id=? AND coalesce(rows_at, 0) <= ?",
                        (rows, e.ts, product, e.ts))
    elif isinstance(e, ev.DomainLost):
        con.execute("INSERT INTO availability (run, domain, lost_at, reason) VALUES (?,?,?,?)"
                    " ON CONFLICT(run, domain) DO UPDATE SET lost_at=excluded.lost_at,"
                    " reason=excluded.reason", (run, e.domain, e.ts, e.reason))
    elif isinstance(e, (ev.JobStarted, ev.AnalysisStarted)):
        _lineage(con, run, e, plan)
    elif isinstance(e, (ev.JobCompleted, ev.JobFailed, ev.AnalysisCompleted)):
        subject = f"model:{e.job}" if hasattr(e, "job") else f"analysis:{e.analysis}"
        status = "failed" if isinstance(e, ev.JobFailed) else "completed"
        con.execute("UPDATE lineage SET status=? WHERE run=? AND subject=?", (status, run, subject))


def _listed(con: sqlite3.Connection, e: ev.ProductListed) -> None:
    """A product a run listed; the plan's own entry (from sync_plan) wins when present."""
    con.execute(
        "INSERT OR IGNORE INTO products (id, domain, name, owner, classification, access, contract,"
        " tags, description, columns, freshness, synced_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (e.product, e.domain, e.product.split(".", 1)[-1], e.owner, e.classification, e.access,
         e.contract, json.dumps(e.tags), e.description, json.dumps(e.columns), e.freshness, e.ts))


def _lineage(con: sqlite3.Connection, run: str, e: ev.JobStarted | ev.AnalysisStarted,
             plan: Plan | None) -> None:
    if isinstance(e, ev.JobStarted):
        subject, name, domains = f"model:{e.job}", e.job, e.participants
        reads = [r.product for r in plan.job(name).reads] if plan and _has(plan.jobs, name) else []
    else:
        subject, name, domains = f"analysis:{e.analysis}", e.analysis, e.participants
        reads = ([r.product for r in plan.analysis(name).reads]
                 if plan and _has(plan.analyses, name) else [])
    if plan is not None:
        reads = [p for p in reads if plan.product(p).domain in domains]
        contracts = {p.id: p.contract for p in plan.products}
    else:
        rows = con.execute("SELECT id, contract, domain FROM products").fetchall()
        reads = [r["id"] for r in rows if r["domain"] in domains]
        contracts = {r["id"]: r["contract"] for r in rows}
    con.executemany("INSERT OR REPLACE INTO lineage (run, subject, product, contract, at, status)"
                    " VALUES (?,?,?,?,?,?)",
                    [(run, subject, p, contracts.get(p, ""), e.ts, "started") for p in reads])


def _has(items: list, name: str) -> bool:
    return any(i.name == name for i in items)


def refresh(db: Path, plan: Plan, runs_dir: Path) -> list[str]:
    """Sync the plan, then ingest every run under `runs_dir` whose events grew; return those runs."""
    sync_plan(db, plan)
    if not runs_dir.is_dir():
        return []
    with connect(db) as con:
        known = {r["run"]: r["events_size"] for r in con.execute("SELECT run, events_size FROM runs")}
    fresh = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if (p / EVENTS_FILE).is_file()):
        if known.get(run_dir.name) != (run_dir / EVENTS_FILE).stat().st_size:
            ingest_run(db, run_dir)
            fresh.append(run_dir.name)
    return fresh


# -- reading ------------------------------------------------------------------


def products(db: Path) -> list[dict[str, Any]]:
    """Every product with its latest check summary and scorecard, ordered by id."""
    with connect(db) as con:
        rows = con.execute("SELECT * FROM products ORDER BY id").fetchall()
        return [_summary(con, r) for r in rows]


def search(db: Path, term: str) -> list[dict[str, Any]]:
    """Products whose id, owner, description, tags, contract, classification or columns match."""
    like = f"%{term.lower()}%"
    fields = ("id", "domain", "owner", "description", "tags", "contract", "classification", "columns")
    where = " OR ".join(f"lower({f}) LIKE ?" for f in fields)
    with connect(db) as con:
        rows = con.execute(f"SELECT * FROM products WHERE {where} ORDER BY id",
                           [like] * len(fields)).fetchall()
        return [_summary(con, r) for r in rows]


def product_ids(db: Path) -> list[str]:
    """Ids of every product in the catalog."""
    with connect(db) as con:
        return [r[0] for r in con.execute("SELECT id FROM products ORDER BY id")]


def show(db: Path, product: str) -> dict[str, Any]:
    """One product: metadata, schema, latest checks, scorecard and lineage. KeyError if unknown."""
    with connect(db) as con:
        row = con.execute("SELECT * FROM products WHERE id = ?", (product,)).fetchone()
        if row is None:
            raise KeyError(product)
        out = _summary(con, row)
        out["columns"] = json.loads(row["columns"] or "[]")
        out["checks"] = _latest_checks(con, product)
        out["lineage"] = [dict(r) for r in con.execute(
            "SELECT run, subject, contract, at, status FROM lineage WHERE product = ?"
            " ORDER BY at DESC, subject", (product,))]
        return out


def _summary(con: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    out = {k: row[k] for k in ("id", "domain", "owner", "classification", "access", "contract",
                               "description", "format", "freshness", "rows")}
    out["tags"] = json.loads(row["tags"] or "[]")
    out["scorecard"] = scorecard(con, row)
    return out


def _latest_checks(con: sqlite3.Connection, product: str) -> list[dict[str, Any]]:
    """The results of the newest check of `product` (from a run or a `contract test`)."""
    newest = con.execute("SELECT run FROM checks WHERE product = ? ORDER BY checked_at DESC LIMIT 1",
                         (product,)).fetchone()
    if newest is None:
        return []
    rows = con.execute("SELECT * FROM checks WHERE product = ? AND run = ? ORDER BY checked_at DESC",
                       (product, newest["run"])).fetchall()
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["rule"], {**dict(r), "threshold": json.loads(r["threshold"] or "null"),
                                    "passed": bool(r["passed"]), "skipped": bool(r["skipped"])})
    return list(seen.values())


def scorecard(con: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    """Declared SLAs against observations: checks passed, freshness met, availability.

    `checks`: share of the latest machine-checked rules that passed; `freshness`: the
    latest freshness check (None when not declared or never checked); `availability`:
    share of ingested runs that expected the product's domain in which it joined and
    was not lost. `score` is the mean of the parts that are known, in percent.
    """
    checks = [c for c in _latest_checks(con, row["id"]) if not c["skipped"]]
    passed = sum(c["passed"] for c in checks)
    fresh = next((c["passed"] for c in checks if c["rule"] == "freshness"), None)
    runs = [r for r in con.execute("SELECT run, domains FROM runs WHERE domains IS NOT NULL")
            if row["domain"] in json.loads(r["domains"])]
    up = {r["run"] for r in con.execute(
        "SELECT run FROM availability WHERE domain = ? AND joined_at IS NOT NULL AND lost_at IS NULL",
        (row["domain"],))}
    parts = {"checks": passed / len(checks) if checks else None,
             "freshness": None if fresh is None else float(fresh),
             "availability": sum(r["run"] in up for r in runs) / len(runs) if runs else None}
    known = [v for v in parts.values() if v is not None]
    return {"checks_passed": passed, "checks_total": len(checks),
            "freshness_met": None if fresh is None else bool(fresh),
            "availability": parts["availability"], "runs": len(runs),
            "score": round(100 * sum(known) / len(known), 1) if known else None}


# -- rendering ----------------------------------------------------------------


def list_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of `meshctl catalog`: product, owner, classification, contract, rows, checks, score."""
    return [[p["id"], p["owner"] or "-", p["classification"], p["contract"] or "-",
             "-" if p["rows"] is None else str(p["rows"]), _checks_cell(p["scorecard"]),
             _score_cell(p["scorecard"])] for p in items]


LIST_HEADERS = ["product", "owner", "classification", "contract", "rows", "checks", "score"]


def _checks_cell(card: dict[str, Any]) -> str:
    return f"{card['checks_passed']}/{card['checks_total']}" if card["checks_total"] else "-"


def _score_cell(card: dict[str, Any]) -> str:
    return "-" if card["score"] is None else f"{card['score']:g}%"


def render_show(item: dict[str, Any]) -> str:
    """The text of `meshctl catalog show`: metadata, schema, checks, scorecard, lineage."""
    card = item["scorecard"]
    head = [f"{item['id']}  ({item['classification']}, access {item['access']}, {item['format']})",
            f"  owner:     {item['owner'] or '-'}", f"  contract:  {item['contract'] or '-'}",
            f"  tags:      {', '.join(item['tags']) or '-'}",
            f"  freshness: {item['freshness'] or '-'}   rows: {item['rows'] if item['rows'] is not None else '-'}"]
    if item["description"]:
        head.insert(1, f"  {item['description']}")
    cols = [[c["name"], c["type"], c["pii"], _masking_cell(c)] for c in item["columns"]]
    checks = [[c["rule"], "-" if c["observed"] is None else f"{c['observed']:g}", c["operator"] or "-",
               threshold_text(c["threshold"]), "skip" if c["skipped"] else "pass" if c["passed"] else "FAIL",
               c["severity"], c["run"]] for c in item["checks"]]
    lineage = [[r["run"], r["subject"], r["contract"] or "-", r["status"]] for r in item["lineage"]]
    parts = ["\n".join(head), "schema:\n" + _indent(format_table(["column", "type", "pii", "masking"], cols)),
             "checks:\n" + (_indent(format_table(
                 ["rule", "observed", "operator", "threshold", "result", "severity", "run"], checks))
                 if checks else "  none yet (run `meshctl contract test`)"),
             "scorecard:\n" + _indent(_card_text(card)),
             "lineage:\n" + (_indent(format_table(["run", "subject", "contract", "status"], lineage))
                             if lineage else "  no run has read it yet")]
    return "\n\n".join(parts)


def _masking_cell(col: dict[str, Any]) -> str:
    if col["pii"] == "direct":
        return "never selected"
    if col["pii"] == "indirect":
        masking = col["masking"] or "drop"
        return f"generalize {col['generalize']}" if masking == "generalize" else masking
    return "-"


def _card_text(card: dict[str, Any]) -> str:
    fresh = {None: "not checked", True: "met", False: "NOT met"}[card["freshness_met"]]
    avail = ("no runs yet" if card["availability"] is None
             else f"{100 * card['availability']:.0f}% of {card['runs']} runs")
    return "\n".join([f"checks passed  {_checks_cell(card)}", f"freshness      {fresh}",
                      f"availability   {avail}", f"score          {_score_cell(card)}"])


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
