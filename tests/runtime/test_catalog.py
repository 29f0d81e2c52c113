"""The catalog: products from the plan, checks, and a real run's events ingested."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.errors import UserError
from meshctl.runtime import catalog
from meshctl.runtime.quality import CheckResult, check_plan

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("catalog-run")  # one worker runs the module-scoped `up`


@pytest.fixture(scope="module")
def hospitals_run(tmp_path_factory) -> Path:
    """A real `meshctl up --headless` of the root mesh.yaml in a tmp copy; returns mesh.yaml."""
    tmp = tmp_path_factory.mktemp("hospitals")
    shutil.copy(ROOT / "mesh.yaml", tmp / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp / "examples" / "hospitals" / "data")
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"],
                         cwd=tmp, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    return tmp / "mesh.yaml"


def test_sync_plan_lists_every_product_before_any_run(tmp_path):
    plan = compile_mesh(ROOT / "mesh.yaml").plan
    db = tmp_path / "catalog.db"
    catalog.sync_plan(db, plan)
    items = catalog.products(db)
    assert [p["id"] for p in items] == sorted(p.id for p in plan.products)
    charite = catalog.show(db, "charite.biopsies")
    assert charite["owner"] == "research-it@charite.example" and charite["contract"] == "tumor-biopsy@1.0.0"
    pii = {c["name"]: c["pii"] for c in charite["columns"]}
    assert pii["patient_name"] == "direct" and pii["date_of_birth"] == "indirect"
    assert charite["checks"] == [] and charite["lineage"] == []
    assert charite["scorecard"]["score"] is None
    catalog.sync_plan(db, plan.model_copy(update={"products": plan.products[:1]}))
    assert [p["id"] for p in catalog.products(db)] == [plan.products[0].id]


def test_checks_feed_the_latest_results_and_the_scorecard(tmp_path):
    plan = compile_mesh(ROOT / "mesh.yaml").plan
    db = tmp_path / "catalog.db"
    catalog.sync_plan(db, plan)
    ok = CheckResult("rows", 259.0, "mustBeGreaterThan", 100.0, True, "error")
    bad = CheckResult("nulls", 3.0, "mustBe", 0.0, False, "warning")
    note = CheckResult("prose", None, "", None, True, "info", "skipped: text", skipped=True)
    catalog.record_checks(db, "charite.biopsies", [ok, bad, note], at=1000.0)
    shown = catalog.show(db, "charite.biopsies")
    assert {c["rule"]: (c["observed"], c["passed"]) for c in shown["checks"]} == {
        "rows": (259.0, True), "nulls": (3.0, False), "prose": (None, True)}
    card = shown["scorecard"]
    assert (card["checks_passed"], card["checks_total"], card["score"]) == (1, 2, 50.0)
    catalog.record_checks(db, "charite.biopsies", [ok], at=2000.0)  # a newer test replaces the view
    card = catalog.show(db, "charite.biopsies")["scorecard"]
    assert (card["checks_passed"], card["checks_total"], card["score"]) == (1, 1, 100.0)


def test_real_checks_of_the_hospitals_data_are_recorded(tmp_path):
    plan = compile_mesh(ROOT / "mesh.yaml").plan
    db = tmp_path / "catalog.db"
    catalog.sync_plan(db, plan)
    for pid, results in check_plan(plan, ROOT).items():
        catalog.record_checks(db, pid, results)
    shown = catalog.show(db, "amsterdam-umc.biopsies")
    assert {c["rule"] for c in shown["checks"]} >= {"values(diagnosis)"}
    assert all(c["passed"] for c in shown["checks"])


def test_search_matches_ids_owners_descriptions_and_columns(tmp_path):
    plan = compile_mesh(ROOT / "mesh.yaml").plan
    db = tmp_path / "catalog.db"
    catalog.sync_plan(db, plan)
    assert [p["id"] for p in catalog.search(db, "karolinska")] == ["karolinska.biopsies"]
    assert [p["id"] for p in catalog.search(db, "CSV")] == ["amsterdam-umc.biopsies"]
    assert len(catalog.search(db, "date_of_birth")) == 3
    assert catalog.search(db, "no such thing") == []


def test_ingest_a_real_run_gives_rows_lineage_and_availability(hospitals_run):
    db = catalog.catalog_path(hospitals_run)
    runs = db.parent / "runs"
    run_dir = next(runs.iterdir())
    plan = compile_mesh(hospitals_run).plan
    catalog.sync_plan(db, plan)
    n = catalog.ingest_run(db, run_dir)
    events = (run_dir / "events.jsonl").read_text().splitlines()
    assert n == len(events)
    joined = {e["domain"]: e["rows"] for e in map(json.loads, events) if e["type"] == "domain_joined"}
    for pid in ("charite.biopsies", "karolinska.biopsies", "amsterdam-umc.biopsies"):
        shown = catalog.show(db, pid)
        assert shown["rows"] == joined[pid.split(".")[0]][pid]
        assert [(r["run"], r["subject"], r["contract"], r["status"]) for r in shown["lineage"]] == [
            (run_dir.name, "model:malignancy", "tumor-biopsy@1.0.0", "completed")]
        assert shown["scorecard"]["availability"] == 1.0 and shown["scorecard"]["runs"] == 1
    catalog.ingest_run(db, run_dir)  # idempotent
    assert len(catalog.show(db, "charite.biopsies")["lineage"]) == 1
    assert catalog.refresh(db, plan, runs) == []  # nothing new to ingest


def test_ingest_tolerates_a_torn_last_line_and_counts_a_lost_domain(hospitals_run, tmp_path):
    src = next((catalog.catalog_path(hospitals_run).parent / "runs").iterdir())
    run_dir = tmp_path / "runs" / "torn-run"
    run_dir.mkdir(parents=True)
    shutil.copy(src / "plan.toml", run_dir / "plan.toml")
    lines = (src / "events.jsonl").read_text().splitlines()
    lost = json.dumps({"type": "domain_lost", "seq": 9999, "ts": 1.0e10, "domain": "karolinska",
                       "reason": "heartbeat timeout"})
    (run_dir / "events.jsonl").write_text("\n".join([*lines, lost, '{"type": "round_sta']) + "\n")
    db = tmp_path / "catalog.db"
    catalog.sync_plan(db, compile_mesh(hospitals_run).plan)
    assert catalog.refresh(db, compile_mesh(hospitals_run).plan, tmp_path / "runs") == ["torn-run"]
    assert catalog.show(db, "karolinska.biopsies")["scorecard"]["availability"] == 0.0
    assert catalog.show(db, "charite.biopsies")["scorecard"]["availability"] == 1.0


def test_a_run_without_events_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        catalog.ingest_run(tmp_path / "catalog.db", tmp_path)
    assert "no events.jsonl in the run directory" in str(err.value)


def test_a_file_that_is_not_a_catalog_is_one_line(tmp_path):
    db = tmp_path / "catalog.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError) as err:
        catalog.products(db)
    assert "not a meshctl catalog" in err.value.render()
