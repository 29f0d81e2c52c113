"""Reliability tests reuse the end-to-end fixtures (`hospitals`, `meshctl`) and the runtime ones
(`mesh_file`, `make_plan`): loaded by path, since tests/ is not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if str(_TESTS / "runtime") not in sys.path:  # what pytest's prepend mode does for tests/runtime's own
    sys.path.insert(0, str(_TESTS / "runtime"))  # conftest, whose imports (pg_server) expect it
_e2e = _load("_reliability_e2e_fixtures", _TESTS / "e2e" / "conftest.py")
_runtime = _load("_reliability_runtime_fixtures", _TESTS / "runtime" / "conftest.py")

hospitals = _e2e.hospitals
meshctl = _e2e.meshctl
mesh_file = _runtime.mesh_file
make_plan = _runtime.make_plan
