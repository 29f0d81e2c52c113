"""`meshctl plan --against GIT_REV` in real temporary git repositories."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.gitrev import read_revision, split_revision


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
                          "-c", "init.defaultBranch=main", "-C", str(repo), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The root mesh.yaml committed on `main` in a sub directory; its data untracked."""
    work = tmp_path / "work" / "mesh"
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    work / "examples" / "hospitals" / "data")
    shutil.copy(ROOT_MESH, work / "mesh.yaml")
    git(tmp_path / "work", "init", "-q")
    git(tmp_path / "work", "add", "mesh/mesh.yaml")
    git(tmp_path / "work", "commit", "-qm", "mesh")
    return work / "mesh.yaml"


def plan(mesh: Path, *args: str) -> Result:
    out = mesh.parent / "out.toml"
    return CliRunner().invoke(main, ["plan", str(mesh), "-o", str(out), "--detailed-exitcode",
                                     *args])


def test_split_revision() -> None:
    assert split_revision("origin/main:sub/mesh.yaml") == ("origin/main", "sub/mesh.yaml")
    assert split_revision("HEAD~1") == ("HEAD~1", None)


def test_no_change_against_head(repo: Path) -> None:
    result = plan(repo, "--against", "HEAD")
    assert result.exit_code == 0, result.output
    assert "No changes." in result.stdout and (repo.parent / "out.toml").is_file()


def test_changes_against_main_exit_2(repo: Path) -> None:
    text = repo.read_text()
    repo.write_text(text.replace("rounds: 15", "rounds: 20").replace(
        "    classification: restricted\n", "    classification: internal\n", 1))
    result = plan(repo, "--against", "main")
    assert result.exit_code == 2, result.output
    lines = result.stdout.splitlines()
    assert "~ product charite.biopsies: classification restricted -> internal" in lines
    assert "~ job malignancy: rounds 15 -> 20" in lines
    assert "Plan: 0 to add, 2 to change, 0 to remove." in lines


def test_against_ignores_the_plan_file_on_disk(repo: Path) -> None:
    assert plan(repo).exit_code == 2  # first plan: out.toml written, everything new
    repo.write_text(repo.read_text().replace("rounds: 15", "rounds: 20"))
    git(repo.parent.parent, "commit", "-qam", "20 rounds")
    # the plan on disk says 15 rounds; the committed mesh.yaml (HEAD) says 20
    assert "~ job malignancy: rounds 15 -> 20" in plan(repo).stdout
    older = plan(repo, "--against", "HEAD~1")
    assert "~ job malignancy: rounds 15 -> 20" in older.stdout and older.exit_code == 2
    head = plan(repo, "--against", "HEAD")
    assert head.exit_code == 0 and "No changes." in head.stdout


def test_rev_with_path_from_repository_root(repo: Path) -> None:
    result = plan(repo, "--against", "main:mesh/mesh.yaml")
    assert result.exit_code == 0 and "No changes." in result.stdout


def test_read_revision_finds_the_bytes(repo: Path) -> None:
    revision = read_revision("main", repo)
    assert revision.path == "mesh/mesh.yaml" and revision.label == "main:mesh/mesh.yaml"
    assert revision.raw == ROOT_MESH.read_bytes()


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()[-1:]
    assert "Traceback" not in result.output
    return line


def test_unknown_revision(repo: Path) -> None:
    line = one_line_error(plan(repo, "--against", "no-such-branch"))
    assert line.startswith("error: unknown git revision 'no-such-branch'")
    assert not (repo.parent / "out.toml").exists()


def test_file_absent_at_revision(repo: Path) -> None:
    line = one_line_error(plan(repo, "--against", "main:mesh/other.yaml"))
    assert line.startswith("error: mesh/other.yaml does not exist at revision main")
    moved = repo.with_name("renamed.yaml")
    shutil.copy(repo, moved)
    line = one_line_error(plan(moved, "--against", "main"))
    assert line.startswith("error: mesh/renamed.yaml does not exist at revision main")


def test_not_a_git_repository(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    line = one_line_error(plan(tmp_path / "mesh.yaml", "--against", "main"))
    assert line == (f"error: {tmp_path.resolve()} is not inside a git repository "
                    "(hint: run it in a clone, or compare two files)")


def test_revision_that_does_not_compile(repo: Path) -> None:
    good = repo.read_text()
    repo.write_text(good.replace("version: 1.0.0", "version: one"))
    git(repo.parent.parent, "commit", "-qam", "broken")
    repo.write_text(good)
    line = one_line_error(plan(repo, "--against", "HEAD"))
    assert line.startswith("HEAD:mesh/mesh.yaml: error: does not compile (1 error); cannot diff")
