"""End-to-end fixtures: a copy of the hospitals mesh in tmp, run through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hospitals(tmp_path: Path) -> Path:
    """The root mesh.yaml and its data, copied so runs and edits stay in tmp; returns mesh.yaml."""
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


@pytest.fixture
def meshctl():
    """Run `meshctl ARGS` as a real subprocess; returns the CompletedProcess."""

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180):
        return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})}, check=False)

    return run
