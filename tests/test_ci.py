"""The suite's own settings ([tool.pytest.ini_options] in pyproject.toml, docs/ci.md): tests run on
3 xdist workers, an xdist_group stays on one worker, and a run that collects no test still fails
with exit 5, which .ci/run relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import os
from pathlib import Path

import pytest

def _record(name):
    Path(os.environ["PROBE_OUT"], name).write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    _record(f"free-{i}")

@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    _record(f"grouped-{i}")
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest with the repository's settings over a throwaway test directory (without the
    plugins that take the workers longest to start and that the probe does not use)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PROBE_OUT"] = str(tmp_path / "out")
    quick = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:textual-snapshot", "-p", "no:syrupy"]
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(tmp_path), *quick, *args, str(tmp_path / "probe")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_the_suite_runs_on_three_workers_and_a_group_stays_on_one(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "probe" / "test_probe.py").write_text(PROBE)
    out = _pytest(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "12 passed" in out.stdout
    seen = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert len(seen) == 12 and set(seen.values()) <= {"gw0", "gw1", "gw2"}
    assert len({w for name, w in seen.items() if name.startswith("grouped-")}) == 1


def test_a_run_that_collects_no_test_fails_with_exit_5(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "test_nothing.py").write_text('"""No tests here."""\n')
    out = _pytest(tmp_path)
    assert out.returncode == 5, out.stdout + out.stderr


def test_a_test_process_and_the_processes_it_starts_run_torch_on_one_thread() -> None:
    # (tests/conftest.py: three workers on two cores, and a second OpenMP thread per worker only spins)
    import torch

    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"  # what a started process reads


def test_the_processes_a_test_starts_find_meshctls_bytecode(request: pytest.FixtureRequest) -> None:
    # (tests/conftest.py: also where PYTHONDONTWRITEBYTECODE is set, xdist's controller compiles meshctl once)
    import importlib.util

    import meshctl.cli
    import meshctl.runtime.launcher

    if sys.dont_write_bytecode and not hasattr(request.config, "workerinput"):
        pytest.skip("pytest -n 0 leaves meshctl's sources alone where PYTHONDONTWRITEBYTECODE is set")
    for module in (meshctl.cli, meshctl.runtime.launcher):
        assert Path(importlib.util.cache_from_source(module.__file__)).is_file(), module.__name__
