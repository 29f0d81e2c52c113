"""Federated analytics in one process: real DuckDB over the hospitals files, the output gate, merging."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
from analytics_util import (
    HOSPITALS,
    METRICS,
    SOURCES,
    copy_data,
    hospitals_plan,
    union_sql,
    union_stats,
)

from meshctl.compiler.plan import PlanDp, PlanMetric
from meshctl.errors import UserError
from meshctl.runtime import wire
from meshctl.runtime.analytics import find_analysis, merge
from meshctl.runtime.analytics_domain import GateError, answer, compute, gate, statistics
from meshctl.runtime.ledger import Ledger, ledger_path


def _release(plan, domain: str, base: Path, **kw) -> wire.AnalyzeRes:
    res = answer(plan, domain, base, wire.AnalyzeIns(analysis="nuclei"), run="r1", **kw)
    assert isinstance(res, wire.AnalyzeRes), res
    return res


def test_merged_result_equals_the_union_query(tmp_path):
    # Prepare
    copy_data(tmp_path)
    plan = hospitals_plan()
    # Execute
    replies = {d: _release(plan, d, tmp_path) for d in SOURCES}
    result = merge(plan, plan.analysis("nuclei"), replies)
    # Assert
    want = union_stats(tmp_path / "data")
    got = {g["key"]["diagnosis"]: g for g in result["groups"]}
    assert set(got) == {"benign", "malignant"}
    for d, w in want.items():
        v = got[d]["values"]
        assert got[d]["count"] == v["count"] == w["count"]
        assert v["sum(texture_mean)"] == pytest.approx(w["sum"], rel=1e-12)
        assert v["mean(radius_mean)"] == pytest.approx(w["mean"], rel=1e-12)
        assert v["variance(area_mean)"] == pytest.approx(w["variance"], rel=1e-10)
        hist = duckdb.sql(f"SELECT least(greatest(floor((radius_mean - 5) * 8 / 24), 0), 7) AS b, count(*) "
                          f"FROM ({union_sql(tmp_path / 'data')}) WHERE diagnosis = '{d}' GROUP BY b").fetchall()
        counts = [0] * 8
        for b, n in hist:
            counts[int(b)] = n
        assert v["histogram(radius_mean)"]["counts"] == counts
        assert v["histogram(radius_mean)"]["edges"] == [5.0 + 3 * i for i in range(9)]
        values = np.array(duckdb.sql(f"SELECT radius_mean FROM ({union_sql(tmp_path / 'data')}) "
                                     f"WHERE diagnosis = '{d}'").fetchnumpy()["radius_mean"])
        for q, est in v["quantile(radius_mean, 0.25, 0.5, 0.9)"].items():
            assert abs(est - np.quantile(values, float(q))) <= 24 / 40  # one bin width
    assert result["suppressed"] == {"by_domain": dict.fromkeys(sorted(SOURCES), 0), "merged": 0}


def test_no_group_by_gives_one_group(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan(group_by=[], metrics=METRICS[:3])
    result = merge(plan, plan.analysis("nuclei"), {d: _release(plan, d, tmp_path) for d in SOURCES})
    assert len(result["groups"]) == 1 and result["groups"][0]["key"] == {}
    assert result["groups"][0]["count"] == 569


def test_small_groups_are_suppressed_in_the_domain_and_after_merging(tmp_path):
    # Prepare: charite has 34 malignant rows, karolinska 62, amsterdam-umc 116
    copy_data(tmp_path)
    plan = hospitals_plan(min_group_size=40, domains=["charite", "karolinska"])
    # Execute
    charite = _release(plan, "charite", tmp_path)
    karolinska = _release(plan, "karolinska", tmp_path)
    result = merge(plan, plan.analysis("nuclei"), {"charite": charite, "karolinska": karolinska})
    # Assert
    assert [g.key for g in charite.groups] == [["benign"]] and charite.suppressed == 1
    malignant = next(g for g in result["groups"] if g["key"] == {"diagnosis": "malignant"})
    assert malignant["count"] == 62 and malignant["domains"] == ["karolinska"]
    # a merged group below the threshold is suppressed too
    plan = hospitals_plan(min_group_size=40, domains=["charite", "karolinska"])
    karolinska = karolinska.model_copy(update={"groups": [
        g if g.key == ["benign"] else g.model_copy(update={"values": {**g.values, "count": 39.0}})
        for g in karolinska.groups]})
    again = merge(plan, plan.analysis("nuclei"), {"charite": charite, "karolinska": karolinska})
    assert [g["key"]["diagnosis"] for g in again["groups"]] == ["benign"] and again["suppressed"]["merged"] == 1


def test_the_gate_refuses_an_extra_statistic_an_undeclared_group_and_a_small_group(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan()
    analysis = plan.analysis("nuclei")
    res = _release(plan, "charite", tmp_path)
    gate(res, plan, analysis, "charite.biopsies")  # the real release passes
    g = res.groups[0]

    def with_group(group: wire.GroupAggregates) -> wire.AnalyzeRes:
        return res.model_copy(update={"groups": [group]})

    with pytest.raises(GateError, match=r"undeclared \['max\(radius_mean\)'\]"):
        gate(with_group(g.model_copy(update={"values": {**g.values, "max(radius_mean)": 28.1}})), plan, analysis)
    with pytest.raises(GateError, match="missing"):
        gate(with_group(g.model_copy(update={"values": {"count": 30.0}})), plan, analysis)
    with pytest.raises(GateError, match="not a declared group"):
        gate(with_group(g.model_copy(update={"key": ["John Doe"]})), plan, analysis)
    with pytest.raises(GateError, match="fewer than 10"):
        gate(with_group(g.model_copy(update={"values": {**g.values, "count": 3.0}})), plan, analysis)
    with pytest.raises(GateError, match="bin counts"):
        key = next(k for k in g.values if k.startswith("hist"))
        gate(with_group(g.model_copy(update={"values": {**g.values, key: [1.0, 2.0]}})), plan, analysis)
    with pytest.raises(GateError, match="not finite"):
        gate(with_group(g.model_copy(update={"values": {**g.values, "sum(radius_mean)": float("nan")}})),
             plan, analysis)
    with pytest.raises(GateError, match="listed twice"):
        gate(res.model_copy(update={"groups": [g, g]}), plan, analysis)
    with pytest.raises(GateError, match="charge"):
        gate(res.model_copy(update={"charges": [wire.LedgerCharge(product="charite.biopsies", epsilon=1, total=1)]}),
             plan, analysis, "charite.biopsies")
    # the wire itself refuses fields no message type declares
    frames = wire.encode(res)
    frames[0] = frames[0].replace(b'"suppressed":0', b'"suppressed":0,"rows":[[1,2]]')
    with pytest.raises(wire.WireError, match="rows"):
        wire.decode(frames)


def test_the_daemon_never_sends_what_the_gate_refuses(tmp_path, monkeypatch):
    copy_data(tmp_path)
    plan = hospitals_plan()
    import meshctl.runtime.analytics_domain as dom

    real = dom.compute

    def leaky(*a, **kw):  # a bug that would add a statistic nobody declared
        rel = real(*a, **kw)
        return dom.Release({k: {**v, "max(radius_mean)": 99.0} for k, v in rel.groups.items()}, rel.suppressed)

    monkeypatch.setattr(dom, "compute", leaky)
    res = answer(plan, "charite", tmp_path, wire.AnalyzeIns(analysis="nuclei"), run="r")
    assert isinstance(res, wire.ErrorReply) and res.code == "gate" and "max(radius_mean)" in res.reason


def test_dp_adds_noise_releases_every_declared_group_and_charges_the_ledger(tmp_path):
    # Prepare
    copy_data(tmp_path)
    plan = hospitals_plan(dp=PlanDp(epsilon=0.5), budget=2.0)
    analysis = plan.analysis("nuclei")
    exact = _release(hospitals_plan(), "karolinska", tmp_path)
    # Execute
    noisy = _release(plan, "karolinska", tmp_path, rng=np.random.default_rng(1))
    # Assert
    assert [g.key for g in noisy.groups] == [["benign"], ["malignant"]]
    for e, n in zip(exact.groups, noisy.groups):
        assert n.values["count"] != e.values["count"]
        assert abs(n.values["count"] - e.values["count"]) < 200  # Laplace(stats/ε) noise, not garbage
        assert set(n.values) == set(e.values)
    assert noisy.charges == [wire.LedgerCharge(product="karolinska.biopsies", epsilon=0.5, total=0.5, cap=2.0)]
    assert Ledger(ledger_path(tmp_path)).spent("karolinska.biopsies") == 0.5
    gate(noisy, plan, analysis, "karolinska.biopsies")
    # clipping bounds the sensitivity: the declared ranges, split ε over the statistics
    assert {s.key: (s.lo, s.hi) for s in statistics(plan, analysis) if s.kind == "sum"} == {
        "sum(texture_mean)": (-1.0, 1.0), "sum(radius_mean)": (0.0, 40.0), "sum(area_mean)": (0.0, 3000.0)}


def test_dp_suppression_is_decided_on_the_noisy_count(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan(dp=PlanDp(epsilon=1.0), min_group_size=1000, metrics=METRICS[:1])
    res = _release(plan, "charite", tmp_path, rng=np.random.default_rng(3))
    assert res.groups == [] and res.suppressed == 2


def test_the_ledger_refuses_what_the_budget_cannot_pay(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan(dp=PlanDp(epsilon=0.6), budget=1.0)
    first = _release(plan, "charite", tmp_path)
    second = _release(plan, "charite", tmp_path)
    assert first.groups and first.charges[0].total == 0.6
    assert second.groups == [] and second.charges == []
    assert second.denied[0].policy == "privacy-ledger"
    assert "spent ε 0.6 of its budget 1; ε 0.6 more would exceed it" in second.denied[0].reason
    # exact (non-DP) aggregates are not ε-accounted: neither charged nor refused by the ledger
    res = _release(hospitals_plan(budget=1.0), "charite", tmp_path)
    assert res.groups and not res.denied and not res.charges
    assert Ledger(ledger_path(tmp_path)).spent("charite.biopsies") == 0.6


def test_domain_errors_are_one_line_replies(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan()
    (tmp_path / "data" / "charite.parquet").unlink()
    res = answer(plan, "charite", tmp_path, wire.AnalyzeIns(analysis="nuclei"), run="r")
    assert isinstance(res, wire.ErrorReply) and res.code == "data"
    assert "data file of product charite.biopsies not found" in res.reason and "\n" not in res.reason
    res = answer(plan, "charite", tmp_path, wire.AnalyzeIns(analysis="nope"), run="r")
    assert isinstance(res, wire.ErrorReply) and res.code == "unknown-analysis"
    pii = hospitals_plan(metrics=[PlanMetric(fn="count", label="count")], group_by=["mrn"])
    with pytest.raises(UserError, match="PII column charite.biopsies.mrn"):
        compute(pii, pii.analysis("nuclei"), pii.product("karolinska.biopsies").model_copy(
            update={"id": "charite.biopsies"}), tmp_path)


def test_unknown_analysis_names_the_nearest(tmp_path):
    plan = hospitals_plan()
    with pytest.raises(UserError) as err:
        find_analysis(plan, "nucle", "mesh.yaml")
    assert err.value.render() == "mesh.yaml: error: no analysis 'nucle' in the mesh (hint: did you mean 'nuclei'?)"


def test_values_outside_the_declared_groups_are_an_error(tmp_path):
    copy_data(tmp_path)
    plan = hospitals_plan()
    bad = plan.model_copy(update={"analyses": [plan.analysis("nuclei").model_copy(
        update={"group_values": {"diagnosis": ["benign"]}})]})
    with pytest.raises(UserError, match=r"charite.biopsies: \d+ rows in 1 group of diagnosis outside the declared "
                       r"values$") as err:
        compute(bad, bad.analysis("nuclei"), bad.product("charite.biopsies"), tmp_path)
    assert "malignant" not in err.value.message  # a data value stays in the domain (its log)


def test_hospital_files_are_what_the_tests_assume():
    assert sorted(p.name for p in HOSPITALS.iterdir()) == sorted(SOURCES.values())


def test_a_request_only_product_needs_an_unexpired_grant(tmp_path):
    from meshctl.compiler.plan import PlanGrant

    copy_data(tmp_path)
    plan = hospitals_plan()
    gated = plan.model_copy(update={"products": [p.model_copy(update={"access": "request"}) for p in plan.products]})
    res = _release(gated, "charite", tmp_path)
    assert res.groups == [] and res.denied[0].policy == "grant-required"
    assert "needs a grant for analysis:nuclei with purpose 'cancer-research'; there is none" in res.denied[0].reason
    grant = PlanGrant(id="charite.biopsies->analysis:nuclei", product="charite.biopsies", subject="analysis:nuclei",
                      purpose="cancer-research", until="2020-01-31")
    expired = _release(gated.model_copy(update={"grants": [grant]}), "charite", tmp_path)
    assert "expired on 2020-01-31" in expired.denied[0].reason
    valid = gated.model_copy(update={"grants": [grant.model_copy(update={"until": ""})]})
    assert _release(valid, "charite", tmp_path).groups


def test_a_result_wider_than_the_terminal_prints_one_block_per_group():
    """psql's `\\x auto`: the 139-column table of examples/analytics does not fit 80 columns, so each
    group is a block of `name  value` lines; every value is still there, and no line passes 80."""
    from meshctl.runtime.analytics import render_result

    result = {"group_by": ["diagnosis"], "metrics": ["count", "quantile(radius_mean, 0.25, 0.5, 0.75)"],
              "groups": [{"key": {"diagnosis": d}, "domains": ["a", "b"],
                          "values": {"count": n, "quantile(radius_mean, 0.25, 0.5, 0.75)":
                                     {"0.25": 11.07, "0.5": 12.18, "0.75": 13.38}}}
                         for d, n in (("benign", 357), ("malignant", 212))],
              "suppressed": {"by_domain": {}, "merged": 0}}
    table = render_result(result)
    assert max(len(x) for x in table.splitlines()[:-1]) > 40
    narrow = render_result(result, 40).splitlines()
    assert max(len(x) for x in narrow[:-1]) <= 40
    assert narrow[:7] == ["-[ diagnosis=benign ]-------------------", "count", "    357",
                          "quantile(radius_mean, 0.25, 0.5, 0.75)", "    q0.25=11.07 q0.5=12.18 q0.75=13.38",
                          "domains", "    2"]
    assert narrow[7] == "-[ diagnosis=malignant ]----------------" and narrow[9] == "    212"
    assert narrow[-1] == table.splitlines()[-1] == "2 groups; suppressed: 0 in domains, 0 after merging"
    assert render_result(result, 200) == table  # it fits: the table
