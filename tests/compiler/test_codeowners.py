"""`meshctl codeowners`: each domain file to its owners, mesh.yaml to governance, in
GitHub's CODEOWNERS syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_include import write_split

from meshctl.cli import main
from meshctl.codeowners import check_codeowners
from meshctl.compiler.compile import compile_mesh

GOV = "'@oncology/governance'"


def _owned(root: Path) -> Path:
    mesh = write_split(root)
    mesh.write_text(mesh.read_text().replace("  name: oncology-network\n",
                                             f"  name: oncology-network\n  owner: {GOV}\n"))
    return mesh


def _rules(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_each_domain_file_goes_to_its_owner_and_the_rest_to_governance(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    mesh = _owned(repo / "net")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    out = repo / ".github" / "CODEOWNERS"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["codeowners", "--mesh", str(mesh), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert check_codeowners(text) == []
    assert _rules(text) == [
        ["/net/", "@oncology/governance"],
        ["/net/mesh.yaml", "@oncology/governance"],
        ["/net/domains/amsterdam-umc.yaml", "datamanagement@amsterdamumc.example"],
        ["/net/domains/charite.yaml", "research-it@charite.example"],
        ["/net/domains/karolinska.yaml", "data-office@karolinska.example"],
        ["/net/contracts.yaml", "@oncology/governance"],  # shared: no domain in it
        ["/.github/CODEOWNERS", "@oncology/governance"],
    ]
    stdout = CliRunner().invoke(main, ["codeowners", "--mesh", str(mesh)])
    assert stdout.exit_code == 0 and _rules(stdout.output) == _rules(text)[:-1]


def test_a_file_with_two_domains_has_both_owners_and_spaces_are_escaped(tmp_path: Path) -> None:
    mesh = _owned(tmp_path)
    (tmp_path / "domains" / "two sites.yaml").write_text(
        "domains:\n  - {name: a, owner: '@acme/a-team'}\n  - {name: b, owner: b@b.example}\n")
    text = CliRunner().invoke(main, ["codeowners", "--mesh", str(mesh)]).output
    assert check_codeowners(text) == []
    assert "/domains/two\\ sites.yaml @acme/a-team b@b.example" in text


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.replace(f"  owner: {GOV}\n", ""), "mesh.owner is not set"),
    (lambda t: t.replace("owner: research-it@charite.example", "owner: Research IT"),
     "owner 'Research IT' of domain 'charite' is not an email, @user or @org/team"),
])
def test_an_owner_github_cannot_read_is_one_line_with_its_place(tmp_path: Path, change, message) -> None:
    mesh = _owned(tmp_path)
    charite = tmp_path / "domains" / "charite.yaml"
    mesh.write_text(change(mesh.read_text()))
    charite.write_text(change(charite.read_text()))
    result = CliRunner().invoke(main, ["codeowners", "--mesh", str(mesh)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert lines[0].startswith((f"{mesh}:", f"{charite}:"))


def test_mesh_owner_is_checked_by_the_compiler(tmp_path: Path) -> None:
    mesh = _owned(tmp_path)
    mesh.write_text(mesh.read_text().replace(GOV, "governance team"))
    errors = compile_mesh(mesh).errors
    assert [(e.code, e.line) for e in errors] == [("MESH222", 4)]


def test_the_checker_rejects_what_github_rejects() -> None:
    assert check_codeowners("# c\n\n/a.yaml @u x@y.example # note\n*.md @org/team\n") == []
    assert check_codeowners("/a.yaml\n!/b @u\n/[ab].yaml @u\n/c Research IT\n") == [
        "1: a pattern needs at least one owner", "2: negation (!) is not supported",
        "3: character ranges ([ ]) are not supported", "4: 'Research' is not an email, @user or @org/team",
        "4: 'IT' is not an email, @user or @org/team"]
