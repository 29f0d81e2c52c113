"""`meshctl access request`: a grant appended to a real mesh.yaml, every other byte kept."""

from __future__ import annotations

import datetime
import difflib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh

TODAY = datetime.date.today().isoformat()

ANALYSIS = """
analyses:
  - name: radius-by-diagnosis   # a federated analysis
    purpose: cancer-research
    inputs: {contract: tumor-biopsy}
    group_by: [diagnosis]
    metrics: [count, mean(radius_mean)]
"""

GRANTS_IN_THE_MIDDLE = """
# Approved grants: one stanza per access.
grants:
  - product: charite.biopsies
    model: malignancy
    purpose: cancer-research
  # approved in PR #12
  - product: karolinska.biopsies
    analysis: radius-by-diagnosis
    purpose: cancer-research   # why: tumour statistics

# Models come last.
models:"""


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    """A copy of the root mesh.yaml (plus one analysis) beside its data."""
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    path = tmp_path / "mesh.yaml"
    # charite's product asks for grants (a request on an `access: open` product is refused: issue 14)
    text = ROOT_MESH.read_text().replace("    domain: charite\n", "    domain: charite\n    access: request\n", 1)
    path.write_text(text + ANALYSIS)
    return path


def request(mesh: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["access", "request", *args, "--mesh", str(mesh)])


def only_insertions(before: str, after: str) -> list[str]:
    """The inserted lines, asserting that no line of `before` changed or moved."""
    ops = difflib.SequenceMatcher(None, before.splitlines(keepends=True),
                                  after.splitlines(keepends=True)).get_opcodes()
    assert all(tag in ("equal", "insert") for tag, *_ in ops), ops
    lines = after.splitlines(keepends=True)
    return [ln for tag, _, _, j1, j2 in ops if tag == "insert" for ln in lines[j1:j2]]


def test_request_creates_the_grants_section(mesh: Path) -> None:
    before = mesh.read_text()
    result = request(mesh, "charite.biopsies", "--for", "malignancy", "--purpose",
                     "cancer-research", "--until", "2031-06-30", "--reason", "retraining",
                     "--by", "alice@charite.example")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"{mesh}: added grant of charite.biopsies to malignancy for cancer-research until "
        "2031-06-30; open a pull request: merging it approves the access")
    after = mesh.read_text()
    assert after.startswith(before)  # every byte of the original, in place
    assert after[len(before):] == (
        "\ngrants:\n"
        f"  # requested by alice@charite.example on {TODAY}: merge this change to approve\n"
        "  - product: charite.biopsies\n    model: malignancy\n    purpose: cancer-research\n"
        "    until: 2031-06-30\n    requested_by: alice@charite.example\n"
        "    reason: retraining\n")
    spec = compile_mesh(mesh).spec
    (grant,) = spec.grants
    assert (grant.product, grant.subject, str(grant.until)) == (
        "charite.biopsies", "model:malignancy", "2031-06-30")
    assert request(mesh, "charite.biopsies", "--for", "radius-by-diagnosis", "--purpose",
                   "cancer-research").exit_code == 0  # the analysis reads it too
    validated = CliRunner().invoke(main, ["validate", str(mesh)])
    assert validated.exit_code == 0, validated.output


def test_request_appends_to_an_existing_section_keeping_comments(mesh: Path) -> None:
    mesh.write_text(mesh.read_text().replace("\nmodels:", GRANTS_IN_THE_MIDDLE, 1))
    before = mesh.read_text()
    result = request(mesh, "charite.biopsies", "--for", "analysis:radius-by-diagnosis",
                     "--purpose", "cancer-research", "--by", "bob")
    assert result.exit_code == 0, result.output
    after = mesh.read_text()
    inserted = only_insertions(before, after)
    assert inserted == [
        f"  # requested by bob on {TODAY}: merge this change to approve\n",
        "  - product: charite.biopsies\n", "    analysis: radius-by-diagnosis\n",
        "    purpose: cancer-research\n", "    requested_by: bob\n"]
    # the new stanza sits right after the last grant, before the comment of `models:`
    assert "    purpose: cancer-research   # why: tumour statistics\n  # requested by bob" in after
    assert len(compile_mesh(mesh).spec.grants) == 3
    assert CliRunner().invoke(main, ["validate", str(mesh)]).exit_code == 0


def test_request_into_an_empty_flow_section(mesh: Path) -> None:
    mesh.write_text(mesh.read_text() + "grants: []   # none yet\n")
    result = request(mesh, "charite.biopsies", "--for", "malignancy", "--purpose",
                     "cancer-research", "--by", "carol")
    assert result.exit_code == 0, result.output
    assert "grants:   # none yet\n  # requested by carol" in mesh.read_text()
    assert len(compile_mesh(mesh).spec.grants) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["charite.biopsie", "--for", "malignancy", "--purpose", "cancer-research"],
     "error: unknown product 'charite.biopsie' (hint: did you mean 'charite.biopsies'?)"),
    (["charite.biopsies", "--for", "malignanc", "--purpose", "cancer-research"],
     "error: unknown model or analysis 'malignanc' (hint: did you mean 'malignancy'?)"),
    (["charite.biopsies", "--for", "analysis:malignancy", "--purpose", "cancer-research"],
     "error: unknown model or analysis 'analysis:malignancy'"),
    (["charite.biopsies", "--for", "malignancy", "--purpose", "marketing"],
     "error: purpose 'marketing' is not the purpose of model 'malignancy' ('cancer-research')"),
    (["charite.biopsies", "--for", "malignancy", "--purpose", "cancer-research",
      "--until", "2001-01-01"], "error: --until 2001-01-01 is in the past"),
])
def test_request_errors_are_one_line_and_write_nothing(mesh: Path, args: list[str],
                                                       message: str) -> None:
    before = mesh.read_text()
    result = request(mesh, *args)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"{mesh}: {message}")
    assert mesh.read_text() == before


def test_request_refuses_a_duplicate_grant(mesh: Path) -> None:
    args = ("charite.biopsies", "--for", "malignancy", "--purpose", "cancer-research")
    assert request(mesh, *args, "--by", "alice").exit_code == 0
    before = mesh.read_text()
    result = request(mesh, *args, "--by", "bob")
    assert result.exit_code == 1 and mesh.read_text() == before
    line = before.splitlines().index("  - product: charite.biopsies") + 1
    assert result.output.strip() == (
        f"{mesh}:{line}: error: model 'malignancy' already has a grant on 'charite.biopsies' "
        "for purpose 'cancer-research' (hint: edit that grant's `until` instead)")


def test_request_on_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = request(tmp_path / "nope.yaml", "a.b", "--for", "m", "--purpose", "p")
    assert result.exit_code == 1
    assert result.output.strip() == f"{tmp_path / 'nope.yaml'}: error: no such file"
