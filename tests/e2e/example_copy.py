"""An example mesh copied into a test's directory with its data, edited for a quick run."""

from __future__ import annotations

import shutil
from pathlib import Path


def example_mesh(example: Path, tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """`example`'s mesh.yaml with each (old, new) edit made (each old text must be there) and its data/
    folder, copied into `tmp_path`; returns the copy's mesh.yaml."""
    text = (example / "mesh.yaml").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    shutil.copytree(example / "data", tmp_path / "data")
    (tmp_path / "mesh.yaml").write_text(text)
    return tmp_path / "mesh.yaml"
