"""Breaking-change classification (`classify`) and `meshctl diff` on real files and git repos."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.breaking import RULES, Finding, classify
from meshctl.gitrev import load_side

EXTRAS = (
    ("    purposes: [cancer-research]\n",
     ("    purposes: [cancer-research]\n"
     "    sla: {freshness: 7d, retention: 5y, availability: 99%}\n"
     "    quality:\n"
     "      - {column: radius_mean, metric: nullValues, unit: percent, mustBeLessThan: 1}\n"
     "      - {metric: rowCount, mustBeGreaterThan: 100}\n"
     "      - {column: radius_mean, metric: invalidValues, validRange: [0, 50], mustBe: 0,"
     " severity: warning}\n")),
    (("      - {name: area_mean, type: float}\n      - {name: smoothness_mean, type: float}\n"
     "      - {name: compactness_mean, type: float}\n      - {name: concavity_mean, type: float}"
     "\n      - {name: concave_points_mean, type: float}\n      - {name: symmetry_mean, "
     "type: float}\n      - {name: fractal_dimension_mean, type: float}\n      - {name: "
     "diagnosis, type: category, values: [benign, malignant]}\n\npolicies:"),
     ("      - {name: area_mean, type: float, range: [0, 3000]}\n      - {name: smoothness_mean, "
     "type: float}\n      - {name: compactness_mean, type: float}\n      - {name: concavity_mean,"
     " type: float}\n      - {name: concave_points_mean, type: float}\n      - {name: "
     "symmetry_mean, type: float}\n      - {name: fractal_dimension_mean, type: float}\n      - "
     "{name: diagnosis, type: category, values: [benign, malignant]}\n\npolicies:")),
    ("      - {name: date_of_birth, type: date, pii: indirect}",
     "      - {name: date_of_birth, type: date, pii: indirect, masking: hash}"),
    ("    classification: restricted\n    contract: tumor-biopsy@1\n    columns: &biopsy-columns",
     ("    classification: restricted\n    access: request\n    contract: tumor-biopsy@1\n"
     "    columns: &biopsy-columns")),
    ("policies:\n",
     ("policies:\n  - name: eu-only\n    scope: model\n"
     "    require: model.reads.all(p, p.jurisdiction == 'eu')\n")),
    ("    evaluation: {holdout: 0.2, metrics: [loss, accuracy, auroc, f1]}\n",
     ("    evaluation: {holdout: 0.2, metrics: [loss, accuracy, auroc, f1]}\n"
     "    privacy: {secure_aggregation: true, dp: {epsilon: 4, delta: 1.0e-5}}\n\n"
     "analyses:\n  - name: radius-by-diagnosis\n    purpose: cancer-research\n"
     "    inputs: {contract: tumor-biopsy}\n    group_by: [diagnosis]\n"
     "    metrics: [count, mean(radius_mean)]\n    min_group_size: 10\n"
     "    privacy: {dp: {epsilon: 1}}\n\n"
     "grants:\n  - product: charite.biopsies\n    model: malignancy\n"
     "    purpose: cancer-research\n    until: 2027-01-01\n    requested_by: alice\n")),
)
"""Edits that turn the root mesh.yaml into a BASE with every kind of item diff looks at."""


def replaced(text: str, *edits: tuple[str, ...]) -> str:
    """Each (old, new) or (old, new, after): the first `old` (after `after`) becomes `new`."""
    for old, new, *after in edits:
        start = text.index(after[0]) if after else 0
        at = text.index(old, start)
        text = text[:at] + new + text[at + len(old):]
    return text


TEXTURE = ("      - {name: texture_mean, type: float}\n", "", "contracts:")
"""Remove a column from the contract (not from the products)."""


@pytest.fixture
def base_text() -> str:
    return replaced(ROOT_MESH.read_text(), *EXTRAS)


def findings(tmp_path: Path, base: str, head: str) -> list[Finding]:
    """Classify two mesh.yaml texts written as files beside the example data."""
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "head.yaml").write_text(head)
    old = load_side(str(tmp_path / "base.yaml"), tmp_path / "head.yaml")
    new = load_side(str(tmp_path / "head.yaml"), tmp_path / "head.yaml")
    return classify(old, new)


def test_base_compiles_and_equal_specs_have_no_changes(tmp_path: Path, base_text: str) -> None:
    assert findings(tmp_path, base_text, base_text) == []
    # a comment-only edit is no change either
    assert findings(tmp_path, base_text, "# reviewed\n" + base_text) == []


CASES = [
    ("BRK001", TEXTURE),
    ("BRK002", (("      - {name: diagnosis, type: category, values: [benign, malignant]}\n\n"
                "policies"), "      - {name: diagnosis, type: string}\n\npolicies")),
    ("BRK003", ("    columns:\n      - {name: radius_mean, type: float}",
                ("    columns:\n      - {name: site, type: string}\n"
                "      - {name: radius_mean, type: float}"))),
    ("BRK004", ("unit: percent, mustBeLessThan: 1}", "unit: percent, mustBeLessThan: 0.5}")),
    ("BRK005", ("mustBe: 0, severity: warning}", "mustBe: 0, severity: error}")),
    ("BRK006", ("      - {metric: rowCount, mustBeGreaterThan: 100}\n",
                ("      - {metric: rowCount, mustBeGreaterThan: 100}\n"
                "      - {metric: duplicateValues, mustBe: 0}\n"))),
    ("BRK007", ("range: [0, 3000]", "range: [100, 3000]")),
    ("BRK008", ("type: category, values: [benign, malignant]}\n\npolicies",
                "type: category, values: [malignant]}\n\npolicies")),
    ("BRK010", ("    purposes: [cancer-research]", "    purposes: []")),
    ("BRK011", ("freshness: 7d", "freshness: 14d")),
    ("BRK012", ("type: category, values: [benign, malignant]}\n\npolicies",
                "type: category, values: [malignant, benign]}\n\npolicies")),
    ("GOV001", ("    classification: restricted\n    access: request",
                "    classification: internal\n    access: request")),
    ("GOV002", ("{name: mrn, type: string, pii: direct}", "{name: mrn, type: string}")),
    ("GOV003", ("pii: indirect, masking: hash}", ("pii: indirect, masking: generalize, "
                "generalize: year}"))),
    ("GOV004", (("  - name: karolinska\n    owner: data-office@karolinska.example\n"
                "    jurisdiction: eu"), ("  - name: karolinska\n    owner: "
                "data-office@karolinska.example\n    jurisdiction: us"))),
    ("GOV004", (("  - name: eu-only\n    scope: model\n"
                "    require: model.reads.all(p, p.jurisdiction == 'eu')\n"), "")),
    ("GOV005", (("  - name: minimum-cohort\n    scope: model\n    require: size(model.participants)"
                " >= 3\n    message: a model needs at least three hospitals, so no single site's "
                "patients dominate it\n"), "")),
    ("GOV006", ("  - name: minimum-cohort\n    scope: model\n",
                "  - name: minimum-cohort\n    scope: model\n    effect: warn\n")),
    ("GOV006", ("  - name: minimum-cohort\n    scope: model\n",
                "  - name: minimum-cohort\n    scope: model\n    when: model.purpose == 'x'\n")),
    ("GOV007", ("require: size(model.participants) >= 3", "require: size(model.participants) >= 2")),
    ("GOV008", ("dp: {epsilon: 4, delta", "dp: {epsilon: 8, delta")),
    ("GOV009", ("secure_aggregation: true, dp", "secure_aggregation: false, dp")),
    ("GOV010", ("min_group_size: 10", "min_group_size: 5")),
    ("GOV011", ("until: 2027-01-01", "until: 2028-01-01")),
    ("GOV011", ("    requested_by: alice\n", ("    requested_by: alice\n  - product: "
                "karolinska.biopsies\n    model: malignancy\n    purpose: cancer-research\n"))),
    ("GOV012", ("    access: request\n", "")),
    ("GOV013", ("    purposes: [cancer-research]", "    purposes: [cancer-research, marketing]")),
    ("NB001", ("    columns:\n      - {name: radius_mean, type: float}",
               ("    columns:\n      - {name: site, type: string, required: false}\n"
               "      - {name: radius_mean, type: float}"))),
    ("NB003", ("policies:\n", "policies:\n  - name: small\n    require: model.parameters < 10000\n")),
    ("NB004", ("unit: percent, mustBeLessThan: 1}", "unit: percent, mustBeLessThan: 2}")),
    ("NB004", ("      - {metric: rowCount, mustBeGreaterThan: 100}\n", "")),
    ("NB006", ("type: category, values: [benign, malignant]}\n\npolicies",
               "type: category, values: [benign, malignant, unknown]}\n\npolicies")),
    ("NB007", ("range: [0, 3000]", "range: [0, 5000]")),
    ("NB008", ("      - {metric: rowCount, mustBeGreaterThan: 100}\n",
               ("      - {metric: rowCount, mustBeGreaterThan: 100}\n"
               "      - {metric: duplicateValues, mustBe: 0, severity: warning}\n"))),
    ("NB009", ("freshness: 7d", "freshness: 1d")),
    ("NB010", ("dp: {epsilon: 4, delta", "dp: {epsilon: 2, delta")),
    ("NB010", ("{name: area_mean, type: float, range", ("{name: area_mean, type: float, "
               "pii: indirect, range"))),
    ("INF001", ("description: Cell-nucleus measurements of a breast-mass biopsy and its diagnosis.",
                "description: Nucleus measurements.")),
    ("INF002", ("    version: 1.0.0", "    version: 1.1.0")),
    ("INF005", ("rounds: 15", "rounds: 20")),
]


@pytest.mark.parametrize(("rule", "edit"), CASES, ids=[f"{r}-{i}" for i, (r, _) in
                                                       enumerate(CASES)])
def test_each_rule(tmp_path: Path, base_text: str, rule: str, edit: tuple[str, str]) -> None:
    got = findings(tmp_path, base_text, replaced(base_text, edit))
    # a change of the anchored product columns shows once per product (three)
    assert {f.rule for f in got} == {rule}, [(f.rule, f.message) for f in got]
    assert len(got) in (1, 3) and len({f.message for f in got}) == 1


def test_product_removed_and_added(tmp_path: Path, base_text: str) -> None:
    amsterdam = ("  - name: biopsies\n    domain: amsterdam-umc\n    source: examples/hospitals/data"
                 "/amsterdam-umc.csv\n    description: Pathology department export (CSV).\n"
                 "    classification: restricted\n    contract: tumor-biopsy@1\n"
                 "    columns: *biopsy-columns\n")
    head = replaced(base_text, (amsterdam, amsterdam.replace("name: biopsies",
                                                             "name: biopsies-2024")))
    got = findings(tmp_path, base_text, head)
    assert [(f.rule, f.subject) for f in got] == [
        ("BRK020", "product amsterdam-umc.biopsies"), ("NB002", "product amsterdam-umc.biopsies-2024")]


def test_positions_point_into_head_or_base(tmp_path: Path, base_text: str) -> None:
    head = replaced(base_text, TEXTURE,
                    ("    columns:\n      - {name: radius_mean, type: float}",
                     ("    columns:\n      - {name: site, type: string, required: false}\n"
                     "      - {name: radius_mean, type: float}")))
    got = {f.rule: f for f in findings(tmp_path, base_text, head)}
    base_lines, head_lines = base_text.splitlines(), head.splitlines()
    removed, added = got["BRK001"], got["NB001"]
    assert removed.file.endswith("base.yaml") and added.file.endswith("head.yaml")
    assert "texture_mean" in base_lines[removed.line - 1][removed.column - 1:]
    assert head_lines[added.line - 1][added.column - 1:].startswith("{name: site")


def test_major_bump_covers_contract_changes(tmp_path: Path, base_text: str) -> None:
    edit = TEXTURE
    plain = findings(tmp_path, base_text, replaced(base_text, edit))
    assert [(f.rule, f.covered, f.blocking()) for f in plain] == [("BRK001", False, True)]
    bumped = replaced(base_text, edit, ("    version: 1.0.0", "    version: 2.0.0"))
    bumped = bumped.replace("contract: tumor-biopsy@1", "contract: tumor-biopsy@2")
    got = findings(tmp_path, base_text, bumped)
    breaking = [f for f in got if f.level == "breaking"]
    assert {f.rule for f in breaking} == {"BRK001", "BRK021"}
    assert all(f.covered and not f.blocking() for f in breaking)


def test_governance_is_never_covered(tmp_path: Path, base_text: str) -> None:
    head = replaced(base_text, ("    version: 1.0.0", "    version: 2.0.0"),
                    ("{name: mrn, type: string, pii: direct}", "{name: mrn, type: string}"))
    head = head.replace("contract: tumor-biopsy@1", "contract: tumor-biopsy@2")
    gov = [f for f in findings(tmp_path, base_text, head) if f.governance]
    assert [f.rule for f in gov] == ["GOV002"] * 3  # the anchored columns of three products
    assert all(f.blocking() and not f.blocking(allow_governance=True) for f in gov)


def test_every_rule_has_a_case() -> None:
    tested = {rule for rule, _ in CASES} | {"BRK009", "BRK013", "BRK020", "BRK021", "NB002",
                                            "NB005", "NB011", "NB012", "INF003", "INF004",
                                            "INF006", "INF007"}
    assert set(RULES) - tested == set()


def test_every_rule_is_documented() -> None:
    doc = (ROOT / "docs" / "ci.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z]+\d{3})` \|", doc, re.MULTILINE))
    assert documented == set(RULES)


# -- the CLI on a real git repository ------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
                          "-c", "init.defaultBranch=main", "-C", str(repo), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture
def repo(tmp_path: Path, base_text: str) -> Path:
    """A git repository whose `main` holds the BASE mesh.yaml (data files untracked)."""
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    (tmp_path / "mesh.yaml").write_text(base_text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "mesh.yaml")
    git(tmp_path, "commit", "-qm", "base")
    return tmp_path / "mesh.yaml"


def diff(mesh: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["diff", *args, "--mesh", str(mesh)])


def test_cli_no_change_exits_0(repo: Path) -> None:
    result = diff(repo, "main")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "No changes."


def test_cli_breaking_exits_3_with_table_and_count(repo: Path) -> None:
    repo.write_text(replaced(repo.read_text(), TEXTURE, ("version: 1.0.0", "version: 1.1.0")))
    result = diff(repo, "main")
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "breaking (1):"
    assert re.match(r"  BRK001  main:mesh\.yaml:\d+:9 +contract tumor-biopsy@1: column "
                    r"'texture_mean' removed  \[needs a major version bump\]", lines[1])
    assert lines[2] == "info (1):" and "INF002" in lines[3] and "1.0.0 -> 1.1.0" in lines[3]
    assert lines[-1] == "1 breaking (1 blocking), 0 non-breaking, 1 info."


def test_cli_json_and_allow_governance(repo: Path) -> None:
    repo.write_text(replaced(repo.read_text(), ("    access: request\n", "")))
    result = diff(repo, "main", "--format", "json")
    assert result.exit_code == 3
    report = json.loads(result.output)
    assert report["base"] == "main:mesh.yaml" and report["head"] == str(repo)
    assert report["summary"] == {"breaking": 1, "non-breaking": 0, "info": 0, "blocking": 1}
    (change,) = report["changes"]
    assert change["rule"] == "GOV012" and change["governance"] and change["blocking"]
    assert change["file"] == str(repo) and change["line"] > 0
    allowed = diff(repo, "main", "--allow-governance")
    assert allowed.exit_code == 0 and "[governance, allowed]" in allowed.output


def test_cli_two_revisions_and_rev_path(repo: Path) -> None:
    repo.write_text(replaced(repo.read_text(), ("min_group_size: 10", "min_group_size: 3")))
    git(repo.parent, "commit", "-qam", "smaller groups")
    result = diff(repo, "HEAD~1", "HEAD")
    assert result.exit_code == 3 and "GOV010" in result.output
    assert "HEAD:mesh.yaml:" in result.output
    same = diff(repo, "HEAD~1:mesh.yaml", "main~1")
    assert same.exit_code == 0 and same.output.strip() == "No changes."


def test_cli_non_breaking_exits_0(repo: Path) -> None:
    repo.write_text(replaced(repo.read_text(), ("unit: percent, mustBeLessThan: 1}",
                                                "unit: percent, mustBeLessThan: 5}")))
    result = diff(repo, "main")
    assert result.exit_code == 0, result.output
    assert "NB004" in result.output and result.output.strip().endswith(
        "0 breaking (0 blocking), 1 non-breaking, 0 info.")


@pytest.mark.parametrize(("args", "message"), [
    (["nope"], "error: unknown git revision 'nope'"),
    (["main:other.yaml"], "error: other.yaml does not exist at revision main"),
    (["main", "nope"], "error: unknown git revision 'nope'"),
])
def test_cli_user_errors_are_one_line(repo: Path, args: list[str], message: str) -> None:
    result = diff(repo, *args)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(message)


def test_cli_broken_side_is_one_line(repo: Path) -> None:
    repo.write_text(replaced(repo.read_text(), ("    version: 1.0.0", "    version: one")))
    result = diff(repo, "main")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"{repo}: error: does not compile: line ")


def test_cli_outside_git_is_one_line(tmp_path: Path, base_text: str) -> None:
    (tmp_path / "mesh.yaml").write_text(base_text)
    result = diff(tmp_path / "mesh.yaml", "main")
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {tmp_path.resolve()} is not inside a git repository "
                                     "(hint: run it in a clone, or compare two files)")
