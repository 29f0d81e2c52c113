"""The mesh.yaml language beyond models: sources, SLAs, masking, contracts' quality
rules, grants, analyses and policies of every scope, compiled into the plan.

tests/fixtures/specs/valid/full.yaml uses every construct; the invalid corpus
has one golden per diagnostic code (checked here too).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from compiler_util import ROOT, SPECS

from meshctl.compiler.compile import compile_bytes, compile_mesh
from meshctl.compiler.diagnostics import CODES
from meshctl.compiler.plan import Plan
from meshctl.compiler.plandiff import diff_plans, render_changes
from meshctl.compiler.sources import duration_s, source_kind
from meshctl.compiler.summary import describe_counts, render_plan_summary

FULL = SPECS / "valid" / "full.yaml"
FULL_TEXT = FULL.read_text()


@pytest.fixture(scope="module")
def plan() -> Plan:
    result = compile_mesh(FULL)
    assert result.diagnostics == [], result.render_diagnostics()
    assert result.plan is not None
    return result.plan


def _compile(text: str):
    return compile_bytes(text.encode(), FULL)


def _edit(*pairs: tuple[str, str]) -> str:
    text = FULL_TEXT
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


# -- products -------------------------------------------------------------------

def test_products_carry_format_table_tags_access_owner_and_sla(plan: Plan) -> None:
    alpha, beta, gamma = (plan.product(f"{d}.visits") for d in ("alpha", "beta", "gamma"))
    assert (alpha.format, beta.format, gamma.format) == ("csv", "parquet", "sqlite")
    assert (alpha.table, gamma.table) == ("", "visits")
    assert alpha.tags == ["cardiology", "outpatient"] and alpha.owner == "data@alpha.example"
    assert (alpha.access, beta.access) == ("open", "request")
    assert alpha.sla is not None and alpha.sla.freshness_s == 12 * 3600
    assert alpha.sla.availability == "99.5%"
    assert beta.sla is not None and beta.sla.freshness_s == 7 * 86400 and beta.sla.retention == "5y"
    assert gamma.sla is None and gamma.contract == "visits@1.1.0"


def test_masking_defaults_to_drop_for_indirect_columns_only(plan: Plan) -> None:
    def masks(product: str) -> dict[str, tuple]:
        return {c.name: (c.masking, c.generalize) for c in plan.product(product).columns}

    alpha, beta = masks("alpha.visits"), masks("beta.visits")
    assert alpha["birth_date"] == ("generalize", "year") and alpha["zip"] == ("hash", "")
    assert beta["birth_date"] == ("drop", "") and beta["zip"] == ("generalize", "prefix:2")
    assert alpha["patient_name"] == (None, "") and alpha["age"] == (None, "")
    assert plan.product("alpha.visits").columns[3].range == [0.0, 120.0]


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("12h", 43200), ("7d", 604800),
                                               ("2w", 1209600), ("90s", 90), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert duration_s(text) == seconds


@pytest.mark.parametrize("text", ["7", "7 days", "d", "-1d", ""])
def test_malformed_durations(text: str) -> None:
    assert duration_s(text) is None


def test_source_kinds() -> None:
    assert source_kind("a/b.PARQUET").format == "parquet"
    assert source_kind("duckdb:wh.duckdb").path == "wh.duckdb"
    pg = source_kind("postgresql://u@db:5432/clinic")
    assert pg is not None and pg.format == "postgresql" and pg.path is None
    assert source_kind("s3://bucket/x.csv") is None and source_kind("x.xlsx") is None


def test_postgresql_source_needs_a_table_and_is_not_checked_for_existence() -> None:
    text = _edit(("source: sqlite:../data/gamma.sqlite", "source: postgresql://db/clinic"))
    result = _compile(text)
    assert result.errors == [], result.render_diagnostics()
    assert result.plan.product("gamma.visits").format == "postgresql"
    bad = _compile(text.replace("    table: visits\n", "", 1))
    assert [d.code for d in bad.errors] == ["MESH212"]


def test_required_false_contract_column_may_be_absent_unless_used(plan: Plan) -> None:
    assert "cholesterol" not in {c.name for c in plan.product("gamma.visits").columns}
    used = _edit(("    participants: [alpha, beta]\n", "    participants: all\n"))
    assert [d.code for d in _compile(used).errors] == ["MESH325"]


# -- contracts ------------------------------------------------------------------

def test_all_contracts_sorted_with_resolved_quality_rules(plan: Plan) -> None:
    assert [c.id for c in plan.contracts] == ["visits@0.9.0", "visits@1.1.0"]
    contract = plan.contract("visits@1.1.0")
    assert contract.purposes == ["cardio-research"] and contract.sla.freshness_s == 604800
    rules = {q.name: q for q in contract.quality}
    assert list(rules) == ["nullValues(systolic)", "missingValues(sex)", "invalidValues(age)",
                           "invalidValues(outcome)", "duplicateValues(systolic)", "rowCount",
                           "plausible-pressure"]
    assert {q.metric for q in contract.quality} - {""} == {
        "nullValues", "missingValues", "invalidValues", "duplicateValues", "rowCount"}
    null = rules["nullValues(systolic)"]
    assert (null.operator, null.threshold, null.unit) == ("mustBeLessThan", 1.0, "percent")
    assert rules["rowCount"].threshold == [10.0, 100000.0]
    assert rules["missingValues(sex)"].missing_values == ["", "n/a"]
    assert rules["invalidValues(outcome)"].valid_values == ["healthy", "sick"]
    assert rules["invalidValues(age)"].valid_range == [0.0, 120.0]
    sql = rules["plausible-pressure"]
    assert sql.type == "sql" and "{object}" in sql.query and sql.column == "systolic"
    line = FULL_TEXT.splitlines().index("      - name: plausible-pressure") + 1
    assert sql.at == f"full.yaml:{line}:9"


def test_generated_rule_names_stay_unique() -> None:
    text = _edit(("      - {metric: rowCount, mustBeBetween: [10, 100000]}\n",
                  ("      - {metric: rowCount, mustBeBetween: [10, 100000]}\n"
                  "      - {metric: rowCount, mustBeLessThan: 1000000}\n")))
    names = [q.name for q in _compile(text).plan.contract("visits@1.1.0").quality]
    assert "rowCount" in names and "rowCount#2" in names


# -- grants and access ----------------------------------------------------------

def test_grants_in_plan_and_used_by_job_and_analyses(plan: Plan) -> None:
    assert [g.id for g in plan.grants] == ["beta.visits->analysis:ages",
                                           "beta.visits->analysis:pressure-by-sex",
                                           "beta.visits->model:outcome-risk"]
    model_grant = plan.grants[2]
    assert model_grant.until == "2026-12-31" and model_grant.purpose == "cardio-research"
    assert model_grant.requested_by == "ml-team@alpha.example" and plan.grants[1].until == ""
    assert plan.job("outcome-risk").grants == ["beta.visits->model:outcome-risk"]
    assert plan.analysis("pressure-by-sex").grants == ["beta.visits->analysis:pressure-by-sex"]


def test_expired_grant_still_compiles_the_runtime_checks_expiry() -> None:
    result = _compile(_edit(("until: 2026-12-31", "until: 2001-01-01")))
    assert result.errors == [] and result.plan.grants[2].until == "2001-01-01"


def test_open_products_need_no_grant() -> None:
    text = _edit(("    access: request\n", ""), ("    classification: restricted\n", ""))
    result = _compile(text.split("\ngrants:")[0] + "\n")
    assert result.errors == [], result.render_diagnostics()
    assert result.plan.job("outcome-risk").grants == [] and result.plan.grants == []


def test_missing_grant_hint_is_the_access_request_command() -> None:
    result = _compile(_edit((("  - {product: beta.visits, analysis: ages, purpose: "
                             "cardio-research, until: 2027-06-30}\n"), "")))
    [diag] = result.errors
    assert diag.code == "MESH405" and "analysis 'ages'" in diag.message
    assert diag.hint == ("ask for one: meshctl access request beta.visits --for ages "
                         "--purpose cardio-research")


def test_duplicate_grant() -> None:
    result = _compile(FULL_TEXT + "  - {product: beta.visits, analysis: ages, "
                      "purpose: cardio-research}\n")
    assert [d.code for d in result.errors] == ["MESH301"]


# -- analyses -------------------------------------------------------------------

def test_analysis_plan(plan: Plan) -> None:
    a = plan.analysis("pressure-by-sex")
    assert a.participants == ["alpha", "beta"] and a.purpose == "cardio-research"
    assert [(r.product, r.client_id) for r in a.reads] == [("alpha.visits", 0),
                                                           ("beta.visits", 1)]
    assert a.group_by == ["sex", "outcome"]
    assert a.group_values == {"sex": ["f", "m"], "outcome": ["healthy", "sick"]}
    assert a.columns == ["age", "cholesterol", "outcome", "sex", "systolic"]
    labels = [m.label for m in a.metrics]
    assert labels == ["count", "sum(age)", "mean(systolic)", "variance(age)",
                      "histogram(systolic)", "quantile(age, 0.5, 0.9)", "histogram(cholesterol)"]
    hist, quant, chol = a.metrics[4], a.metrics[5], a.metrics[6]
    assert (hist.bins, hist.range) == (5, [60.0, 250.0])  # the contract column's range
    assert quant.q == [0.5, 0.9] and quant.range == [0.0, 120.0]
    assert (chol.bins, chol.range) == (4, [100.0, 300.0])  # the metric's own range
    assert a.min_group_size == 5 and a.dp is not None and a.dp.delta == 1e-6
    ages = plan.analysis("ages")
    assert ages.participants == ["alpha", "beta", "gamma"] and ages.dp is None
    assert ages.group_by == [] and ages.columns == ["age"] and ages.min_group_size == 10


def test_analysis_contract_name_at_major_resolves_that_major() -> None:
    text = _edit(("    inputs: {contract: visits}\n", "    inputs: {contract: visits@0}\n"))
    [diag] = _compile(text).errors  # visits@0.9.0 exists, but no product publishes under it
    assert diag.code == "MESH506" and "analysis 'ages' has no participants" in diag.message


# -- policies -------------------------------------------------------------------

def test_every_policy_is_carried_and_round_policies_are_not_decided(plan: Plan) -> None:
    assert [(p.name, p.scope, p.domain) for p in plan.policies] == [
        ("eu-residency", "model", ""), ("allowed-computations", "model", ""),
        ("purpose-limitation", "analysis", ""), ("restricted-is-requested", "product", ""),
        ("no-public-identifiers", "product", ""), ("bounded-updates", "round", ""),
        ("groups-of-five", "analysis", "beta")]
    assert plan.policies[0].at.startswith("full.yaml:") and plan.policies[3].when
    decided = {d.policy for d in plan.decisions}
    assert "bounded-updates" not in decided
    subjects = {d.subject for d in plan.decisions}
    assert {"model.outcome-risk", "analysis.ages", "product.gamma.visits"} <= subjects
    assert all(d.effect == "allow" for d in plan.decisions)


def test_domain_policy_applies_where_the_domain_takes_part(plan: Plan) -> None:
    local = [d.subject for d in plan.decisions if d.policy == "beta.groups-of-five"]
    assert local == ["analysis.ages", "analysis.pressure-by-sex"]
    text = _edit(("        require: analysis.min_group_size >= 5",
                  "        require: analysis.min_group_size >= 7"))
    assert [d.message.split(":")[0] for d in _compile(text).errors] == [
        "policy 'beta.groups-of-five' denies analysis 'pressure-by-sex'"]  # ages has 10
    alone = text.replace("    participants: [alpha, beta]\n", "    participants: [alpha]\n")
    result = _compile(alone)
    assert result.errors == [] and [d.subject for d in result.plan.decisions
                                    if d.policy == "beta.groups-of-five"] == ["analysis.ages"]


@pytest.mark.parametrize(("require", "ok"), [
    ("coordinator.jurisdiction == 'eu'", True),
    ("model.domains.map(d, d.name) == ['alpha', 'beta', 'gamma']", True),
    ("model.reads.exists(r, r.access == 'request' && r.domain == 'beta')", True),
    ("model.reads.all(r, r.jurisdiction == 'eu' && 'cardiology' in r.tags)", True),
    ("model.architecture.kind in ['mlp'] && model.training.rounds <= 4", False),
])
def test_model_activation(require: str, ok: bool) -> None:
    text = _edit(("    require: model.architecture.kind in ['mlp'] && model.training.rounds <= 50",
                  f'    require: "{require}"'))
    result = _compile(text)
    assert (result.errors == []) is ok, result.render_diagnostics()


@pytest.mark.parametrize(("require", "ok"), [
    ("analysis.group_by == ['sex', 'outcome'] || analysis.name == 'ages'", True),
    ("analysis.metrics.exists(m, m == 'count') && analysis.min_group_size >= 5", True),
    ("analysis.privacy.dp.epsilon <= 1.0", True),
    ("analysis.reads.all(r, r.contract == 'visits')", True),
    ("analysis.privacy.dp.epsilon > 0.0", False),
])
def test_analysis_activation(require: str, ok: bool) -> None:
    text = _edit(("    require: analysis.reads.all(r, analysis.purpose in r.purposes)",
                  f'    require: "{require}"'))
    result = _compile(text)
    assert (result.errors == []) is ok, result.render_diagnostics()


@pytest.mark.parametrize(("require", "ok"), [
    (("product.columns.all(c, c.pii != 'indirect' || c.masking in ['drop', 'hash', "
     "'generalize'])"), True),
    ("product.contract == 'visits@1.1.0' && product.jurisdiction == 'eu'", True),
    ("product.id == product.domain + '.' + product.name", True),
    ("'cardiology' in product.tags", True),
    ("product.columns.all(c, c.pii == 'none')", False),
])
def test_product_activation(require: str, ok: bool) -> None:
    text = _edit(("    require: product.access == 'request'", f'    require: "{require}"'),
                 ("    when: product.classification == 'restricted'\n", ""))
    result = _compile(text)
    assert (result.errors == []) is ok, result.render_diagnostics()


def test_product_warn_policy_is_a_warning() -> None:
    text = _edit(("    classification: internal\n", "    classification: public\n"))
    result = _compile(text)
    assert [d.code for d in result.diagnostics] == ["MESH411"]
    assert "product 'alpha.visits'" in result.diagnostics[0].message
    assert result.plan is not None


# -- models ---------------------------------------------------------------------

def test_dp_training_compiles_and_secure_aggregation_needs_three_participants() -> None:
    text = _edit(("    training: {rounds: 5, seed: 1}\n", ("    training: {rounds: 5, seed: 1}\n"
                  "    privacy: {dp: {epsilon: 3.0}}\n")))
    result = _compile(text)
    assert result.errors == [] and result.plan is not None
    assert result.plan.jobs[0].privacy.dp is not None and result.plan.jobs[0].privacy.dp.epsilon == 3.0
    text = _edit(("    training: {rounds: 5, seed: 1}\n", ("    training: {rounds: 5, seed: 1}\n"
                  "    privacy: {secure_aggregation: true}\n")))
    [diag] = _compile(text).errors
    assert diag.code == "MESH513" and "reads update norms" in diag.message


def test_an_entrypoint_that_cannot_be_found_is_refused_with_mesh505() -> None:
    text = _edit(("    architecture: {kind: mlp, hidden: [8]}\n",
                  "    architecture: {entrypoint: 'no_such_pkg.mod:factory'}\n"))
    diags = _compile(text).errors
    assert [d.code for d in diags] == ["MESH505"] and "no module named 'no_such_pkg'" in diags[0].message


# -- summary, diff, determinism ---------------------------------------------------

def test_compiling_twice_gives_identical_bytes_and_round_trips(plan: Plan) -> None:
    again = compile_mesh(FULL).plan
    assert again is not None and again.to_toml().encode() == plan.to_toml().encode()
    assert Plan.from_toml(plan.to_toml()) == plan


def test_summary_and_counts(plan: Plan) -> None:
    text = render_plan_summary(plan)
    assert "3 domains, 3 products, 1 job, 2 analyses, 3 grants" in text
    assert "analysis pressure-by-sex: count, sum(age)" in text and "dp ε=1" in text
    assert "beta.visits->model:outcome-risk for cardio-research, until 2026-12-31" in text
    assert "7 policies carried into the plan (1 round-scope, decided at run time)" in text
    spec = compile_mesh(FULL).spec
    assert describe_counts(spec).endswith("1 model, 2 analyses, 3 grants")


def test_diff_shows_grants_analyses_and_policies(plan: Plan) -> None:
    text = _edit(("    min_group_size: 5\n", "    min_group_size: 8\n"),
                 (("  - {product: beta.visits, analysis: ages, purpose: cardio-research, "
                  "until: 2027-06-30}\n"), ""),
                 ("    metrics: [count, mean(age)]\n", ("    metrics: [count, mean(age)]\n"
                  "    participants: [alpha, gamma]\n")),
                 ("    message: an update's norm stays below 10\n",
                  ("    message: an update's norm stays below 10\n"
                  "  - {name: tiny, scope: round, require: 'true'}\n")))
    new = _compile(text).plan
    assert new is not None
    lines = render_changes(diff_plans(plan, new)).splitlines()
    assert "~ analysis pressure-by-sex: min_group_size 5 -> 8" in lines
    assert "~ analysis ages: participants -beta, grants changed" in lines
    assert "- grant beta.visits->analysis:ages: until 2027-06-30" in lines
    assert "+ policy tiny: round" in lines
    assert lines[-1].startswith("Plan: 1 to add")
    moved = compile_bytes(("# a comment moves every line\n" + FULL_TEXT).encode(), FULL).plan
    assert diff_plans(plan, moved) == []


# -- the invalid corpus -----------------------------------------------------------

def test_every_code_has_a_golden() -> None:
    goldens = "".join(p.read_text() for p in (SPECS / "invalid").glob("*.expected.txt"))
    reported = set(re.findall(r"\[(MESH\d{3})\]", goldens))
    untestable = {"MESH104", "MESH106", "MESH324", "MESH414", "MESH411", "MESH308",
                  "MESH310", "MESH504", "MESH506", "MESH503", "MESH505",
                      "MESH517", "MESH534", "MESH576"}  # covered by unit tests instead
    missing = sorted(set(CODES) - reported - untestable)
    assert missing == [], missing


def test_full_spec_is_documented() -> None:
    doc = (ROOT / "docs" / "compiler.md").read_text()
    for construct in ("grants:", "analyses:", "access: request", "masking:", "scope: round",
                      "sla:", "quality:"):
        assert construct in doc, construct
    assert Path(FULL).exists()
