"""Analysis runs with real processes: coordinator + forked daemons over Curve, events, tapped wire."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from analytics_util import SOURCES, copy_data, hospitals_plan, union_stats

from meshctl.compiler.plan import PlanDp
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.analytics import read_result
from meshctl.runtime.launcher import start_run
from meshctl.runtime.ledger import Ledger, ledger_path


def _run(mesh: Path, plan):
    run = start_run(mesh, plan, analysis="nuclei")
    events = list(run.follow())
    return run.finish(), events


def _tap_messages(path: Path) -> list[tuple[object, list[bytes]]]:
    raw, frames, i = path.read_bytes(), [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 8], "little")
        frames.append(raw[i + 8:i + 8 + n])
        i += 8 + n
    out = []
    for j, f in enumerate(frames):  # a header frame is JSON with a type; tensor frames follow it
        if f.startswith(b"{") and b'"type"' in f:
            msg, _ = wire.decode([f])
            out.append((msg, frames[j:j + 1]))
    return out


def test_an_analysis_run_equals_the_union_query(tmp_path):
    # Prepare
    mesh = copy_data(tmp_path)
    # Execute
    result, events = _run(mesh, hospitals_plan())
    # Assert
    assert result.ok, result.reason
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunCompleted"
    assert kinds.count("DomainJoined") == 3 and "AnalysisStarted" in kinds
    done = next(e for e in events if isinstance(e, ev.AnalysisCompleted))
    assert (done.groups, done.suppressed, done.result_path) == (2, 0, "analyses/nuclei.json")
    got = {g["key"]["diagnosis"]: g["values"] for g in read_result(result.run_dir, "nuclei")["groups"]}
    for d, w in union_stats(tmp_path / "data").items():
        assert got[d]["count"] == w["count"]
        assert got[d]["sum(texture_mean)"] == pytest.approx(w["sum"], rel=1e-12)
        assert got[d]["mean(radius_mean)"] == pytest.approx(w["mean"], rel=1e-12)
        assert got[d]["variance(area_mean)"] == pytest.approx(w["variance"], rel=1e-10)
    logged = [json.loads(x)["type"] for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert "analysis_completed" in logged


def test_a_small_group_never_crosses_the_wire(tmp_path, monkeypatch):
    # Prepare: charite has 34 malignant biopsies; the threshold is 40
    mesh = copy_data(tmp_path)
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    # Execute
    result, events = _run(mesh, hospitals_plan(min_group_size=40))
    # Assert
    assert result.ok, result.reason
    sent = [m for m, _ in _tap_messages(tap / "charite.tap") if isinstance(m, wire.AnalyzeRes)]
    assert len(sent) == 1 and [g.key for g in sent[0].groups] == [["benign"]] and sent[0].suppressed == 1
    blob = (tap / "charite.tap").read_bytes()
    assert b"malignant" not in blob
    for name, mrn in duckdb.sql(f"SELECT patient_name, mrn FROM '{tmp_path / 'data' / SOURCES['charite']}'"
                                ).fetchall():
        assert name.encode() not in blob and mrn.encode() not in blob
    merged = read_result(result.run_dir, "nuclei")
    malignant = next(g for g in merged["groups"] if g["key"]["diagnosis"] == "malignant")
    assert malignant["domains"] == ["karolinska", "amsterdam-umc"] and malignant["count"] == 62 + 116
    assert merged["suppressed"]["by_domain"]["charite"] == 1
    assert next(e for e in events if isinstance(e, ev.AnalysisCompleted)).suppressed == 1


def test_dp_runs_once_on_a_budget_of_one_and_the_second_run_is_refused(tmp_path):
    # Prepare
    mesh = copy_data(tmp_path)
    plan = hospitals_plan(dp=PlanDp(epsilon=0.6), budget=1.0)
    # Execute
    first, events1 = _run(mesh, plan)
    second, events2 = _run(mesh, plan)
    # Assert: the first is noisy and charged, each domain's product once
    assert first.ok, first.reason
    spent = [e for e in events1 if isinstance(e, ev.BudgetSpent)]
    assert sorted(e.product for e in spent) == sorted(f"{d}.biopsies" for d in SOURCES)
    assert all((e.epsilon, e.total, e.cap) == (0.6, 0.6, 1.0) for e in spent)
    noisy = {g["key"]["diagnosis"]: g["count"] for g in read_result(first.run_dir, "nuclei")["groups"]}
    exact = {d: w["count"] for d, w in union_stats(tmp_path / "data").items()}
    assert noisy.keys() == exact.keys() and all(noisy[d] != exact[d] for d in exact)
    # the second is refused by the domains, with a decision naming the policy and the numbers
    assert not second.ok and "privacy-ledger" in second.reason and "budget 1" in second.reason
    denials = [e for e in events2 if isinstance(e, ev.PolicyDecided) and e.effect == "deny"]
    assert {e.policy for e in denials} == {"privacy-ledger"} and len(denials) == 3
    assert all(e.stage == "run" and "spent ε 0.6 of its budget 1" in e.reason for e in denials)
    assert not (second.run_dir / "analyses" / "nuclei.json").exists()
    assert not any(isinstance(e, ev.BudgetSpent) for e in events2)
    ledger = Ledger(ledger_path(tmp_path))
    assert [r.spent for r in ledger.rows()] == [0.6, 0.6, 0.6]


def test_a_domain_without_its_data_fails_the_run_in_one_line(tmp_path):
    mesh = copy_data(tmp_path)
    (tmp_path / "data" / "karolinska.parquet").unlink()
    result, _ = _run(mesh, hospitals_plan())
    assert not result.ok
    assert "karolinska" in result.reason and "not found" in result.reason and "\n" not in result.reason
