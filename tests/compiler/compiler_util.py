"""Shared paths and helpers of the compiler tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from meshctl.compiler.compile import CompileResult, compile_mesh
from meshctl.compiler.diagnostics import render_all

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "fixtures" / "specs"
ROOT_MESH = ROOT / "mesh.yaml"


def rendered(path: Path) -> str:
    """Every diagnostic of compiling `path`, rendered with the bare file name."""
    result = compile_mesh(path)
    return render_diagnostics(result, path.name)


def render_diagnostics(result: CompileResult, name: str) -> str:
    """The rendered diagnostics of `result`, as if the file were called `name`."""
    names = {i.label: i.name for i in result.includes}  # an included file: its name beside the mesh
    diags = [dataclasses.replace(d, file=names.get(d.file, name)) for d in result.diagnostics]
    texts = {name: result.source, **{i.name: i.source.text for i in result.includes}}
    return render_all(diags, texts if result.includes else result.source) + "\n"
