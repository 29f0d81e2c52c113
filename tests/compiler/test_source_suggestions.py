"""MESH307's did-you-mean for a missing data file suggests only a file no other domain reads (issue 14:
a missing data file was "did you mean"'d to another hospital's file)."""

from __future__ import annotations

import shutil
from pathlib import Path

from compiler_util import ROOT

from meshctl.compiler.compile import compile_mesh


def _hospitals(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


def _hint(mesh: Path) -> str:
    [missing] = [d for d in compile_mesh(mesh, hashed=False).errors if d.code == "MESH307"]
    return missing.hint or ""


def test_a_missing_file_is_not_suggested_another_domains_file(tmp_path: Path) -> None:
    mesh = _hospitals(tmp_path)
    data = tmp_path / "examples" / "hospitals" / "data"
    (data / "karolinska.parquet").unlink()  # charite.parquet, read by charite, is the close name
    assert _hint(mesh) == "paths are relative to the mesh.yaml's directory"
    (data / "karolinska-2024.parquet").write_bytes((data / "charite.parquet").read_bytes())
    assert _hint(mesh) == "did you mean 'karolinska-2024.parquet'?"  # a file no domain reads: still offered
