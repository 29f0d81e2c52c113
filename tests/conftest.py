"""What every test process shares: pytest, its xdist workers and the processes their tests start."""

from __future__ import annotations

import compileall
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One torch (OpenMP) thread per process, set before anything imports torch so that the processes a test
# starts inherit it too. The suite runs 3 xdist workers on CI's 2 cores: a second intra-op thread per
# worker only adds spinning (OpenMP waits busy) and doubled the CPU of in-process torch work
# (tests/runtime/rooms, serially: 56 s of CPU with torch's default of one thread per core, 28 s with one;
# docs/ci.md). meshctl's own processes set their thread count from --threads (default 1) either way.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
if "torch" in sys.modules:  # (a plugin imported it first: the variables came too late for it)
    sys.modules["torch"].set_num_threads(1)

# Bytecode. Where PYTHONDONTWRITEBYTECODE is set (as in CI's environment) every process a test starts
# (`meshctl up`, its coordinator, each `python -m meshctl ...`: hundreds in the suite) compiled meshctl's
# sources anew, ~0.2 s of CPU for a `validate` and ~0.3 s for a coordinator. xdist's controller compiles
# meshctl once, before the workers start; every process then reads that bytecode, and the session
# removes the __pycache__ folders it made when it ends, so the variable's wish (no bytecode left beside
# the sources) holds after the run. A stale file is recompiled as always. (`pytest -n 0` over a few files
# starts few processes: it leaves the sources alone, and so leaves alone the timings of anyone measuring
# meshctl's start-up in the same checkout meanwhile.)
_MADE: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    if not sys.dont_write_bytecode or hasattr(config, "workerinput") or not config.getoption("numprocesses", 0):
        return
    before = set((ROOT / "meshctl").rglob("__pycache__"))
    compileall.compile_dir(ROOT / "meshctl", quiet=2, workers=1)
    _MADE.extend(sorted(set((ROOT / "meshctl").rglob("__pycache__")) - before))


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def meshctl_telling_torch() -> list[str]:
    """argv of a `meshctl` whose last line on stderr says whether its own process imported torch
    ('torch imported' or 'no torch'): commands that need no model must not pay ~2 s of CPU for it."""
    code = ("import atexit, sys; from meshctl.__main__ import main; atexit.register(lambda: print("
            "'torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)); main()")
    return [sys.executable, "-c", code]
