"""Issue 11, "small ones": broken pipes, unwritable -o, diff of a missing file,
evaluation metrics nothing computes (MESH514), trimmed_mean that trims nothing (MESH515)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from compiler_util import ROOT, ROOT_MESH, SPECS

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh

MINIMAL = SPECS / "valid" / "minimal.yaml"


def _root_mesh_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path / "mesh.yaml"


def _meshctl_shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHCTL_DEBUG"}
    return subprocess.run(["bash", "-c", f"'{sys.executable}' -m meshctl {cmd}; echo rc=$?"],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_plan_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    mesh = _root_mesh_copy(tmp_path)
    # `| true`: the reader is gone before meshctl has imported, so every write hits EPIPE
    piped = _meshctl_shell(f"plan {mesh.name} | true; echo status=${{PIPESTATUS[0]}}", tmp_path)
    for noise in ("internal error", "Traceback", "BrokenPipe", "Exception ignored"):
        assert noise not in piped.stderr, piped.stderr
    assert "status=141" in piped.stdout, piped.stdout
    head = _meshctl_shell(f"plan {mesh.name} | head -1", tmp_path)
    assert "internal error" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr
    assert len(head.stdout.splitlines()) == 2  # one line of the plan, then rc=0 (head's status)


def test_contract_export_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "dir" / "x.yaml"
    result = CliRunner().invoke(main, ["contract", "export", "loans", "--mesh", str(MINIMAL),
                                       "-o", str(out)])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "internal error" not in line
    assert str(out.parent) in line and "does not exist" in line
    assert not out.parent.exists()  # Terraform-like: no directories made


def test_plan_into_a_missing_directory_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    mesh = _root_mesh_copy(tmp_path)
    out = _meshctl_shell(f"plan {mesh.name} -o missing/dir/plan.toml", tmp_path)
    assert out.stdout.strip().endswith("rc=1"), out.stdout
    assert out.stderr.strip().splitlines()[-1] == "error: missing/dir/plan.toml: No such file or directory"
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "missing").exists()


def test_plan_write_replaces_the_previous_plan_whole(tmp_path: Path) -> None:
    mesh = _root_mesh_copy(tmp_path)
    (tmp_path / "old.toml").write_text("previous plan, not TOML\n")
    out = _meshctl_shell(f"plan {mesh.name} -o old.toml", tmp_path)
    assert out.stdout.strip().endswith("rc=0"), out.stdout + out.stderr
    assert compile_mesh(mesh).plan.to_toml() == (tmp_path / "old.toml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()
                  if p.name.startswith(".") and p.name != ".meshctl") == []  # no temporary left (.meshctl: the load cache)


def test_diff_of_a_missing_file_says_so(tmp_path: Path) -> None:
    for arg in ("/no/such.yaml", "old/mesh.yml", "no/such/dir"):
        result = CliRunner().invoke(main, ["diff", arg, "--mesh", str(MINIMAL)])
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert "\n" not in line and "git revision '" not in line, line
        assert line.startswith(f"{arg}: error: no such file"), line


def test_diff_of_an_unknown_revision_still_says_revision() -> None:
    result = CliRunner().invoke(main, ["diff", "no-such-branch-xyz", "--mesh", str(ROOT_MESH)])
    assert result.exit_code == 1
    assert "unknown git revision 'no-such-branch-xyz'" in result.output


def _minimal_with(tmp_path: Path, old: str, new: str) -> Path:
    shutil.copytree(SPECS / "data", tmp_path / "data")
    (tmp_path / "valid").mkdir()
    text = MINIMAL.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "valid" / "mesh.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_a_metric_that_does_not_fit_the_task_is_refused(tmp_path: Path) -> None:
    path = _minimal_with(tmp_path, "training: {rounds: 3}",
                         "training: {rounds: 3}\n    evaluation: {metrics: [loss, auroc, rmse, f1, r2]}")
    result = compile_mesh(path)
    assert result.plan is None
    found = [d for d in result.errors if d.code == "MESH514"]
    assert [d.message.split("'")[1] for d in found] == ["rmse", "r2"]
    assert found[0].line == found[1].line and found[0].col < found[1].col
    assert "auroc, f1" in (found[0].hint or "")


def test_every_metric_of_a_task_compiles_into_the_plan(tmp_path: Path) -> None:
    every = "[loss, accuracy, auroc, f1, precision, recall]"
    path = _minimal_with(tmp_path, "training: {rounds: 3}",
                         f"training: {{rounds: 3}}\n    evaluation: {{metrics: {every}}}")
    result = compile_mesh(path)
    assert result.errors == [] and result.plan is not None
    job = result.plan.jobs[0]
    assert job.evaluation.metrics == every[1:-1].split(", ") and job.task is None and job.loss is None


def test_computed_metrics_compile(tmp_path: Path) -> None:
    path = _minimal_with(tmp_path, "training: {rounds: 3}",
                         "training: {rounds: 3}\n    evaluation: {metrics: [accuracy, loss]}")
    result = compile_mesh(path)
    assert result.errors == [] and result.plan is not None
    assert result.plan.jobs[0].evaluation.metrics == ["accuracy", "loss"]


def test_trimmed_mean_that_trims_nothing_warns(tmp_path: Path) -> None:
    path = _minimal_with(tmp_path, "training: {rounds: 3}",
                         "training: {rounds: 3}\n    aggregation: {strategy: trimmed_mean, trim: 0.4}")
    result = compile_mesh(path)  # two participants: floor(0.4 * 2) = 0
    assert result.plan is not None and result.errors == []
    [warn] = [d for d in result.diagnostics if d.code == "MESH515"]
    assert warn.severity == "warning" and "0.4" in warn.message and "2" in warn.message
    assert "trim: 0.5" not in (warn.hint or "")  # trim must stay below 0.5


def test_trimmed_mean_default_trim_warns_at_the_strategy(tmp_path: Path) -> None:
    path = _minimal_with(tmp_path, "training: {rounds: 3}",
                         "training: {rounds: 3}\n    aggregation: {strategy: trimmed_mean}")
    result = compile_mesh(path)  # default trim 0.1 of 2: nothing
    assert result.plan is not None
    [warn] = [d for d in result.diagnostics if d.code == "MESH515"]
    assert "aggregation: {strategy: trimmed_mean}" in result.source.splitlines()[warn.line - 1]


def test_trimmed_mean_that_trims_does_not_warn(tmp_path: Path) -> None:
    mesh = _root_mesh_copy(tmp_path)
    text = mesh.read_text(encoding="utf-8")
    mesh.write_text(text.replace("aggregation: {strategy: fedavg}",
                                 "aggregation: {strategy: trimmed_mean, trim: 0.4}"), encoding="utf-8")
    result = compile_mesh(mesh)  # three hospitals: floor(0.4 * 3) = 1
    assert result.plan is not None
    assert not [d for d in result.diagnostics if d.code == "MESH515"]


def test_trimmed_mean_hint_names_a_trim_that_cuts(tmp_path: Path) -> None:
    mesh = _root_mesh_copy(tmp_path)
    text = mesh.read_text(encoding="utf-8")
    mesh.write_text(text.replace("aggregation: {strategy: fedavg}",
                                 "aggregation: {strategy: trimmed_mean, trim: 1e-300}"), encoding="utf-8")
    result = compile_mesh(mesh)  # three hospitals: 1/3 rounds to 0.334, which cuts one
    [warn] = [d for d in result.diagnostics if d.code == "MESH515"]
    assert "raise trim to 0.334 or more" in (warn.hint or "") and int(0.334 * 3) == 1
