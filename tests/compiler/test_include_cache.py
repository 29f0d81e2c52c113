"""The load cache (.meshctl/cache/): a warm compile gives the cold compile's plan and
diagnostics, byte for byte, over random edits; it is never trusted across versions."""

from __future__ import annotations

import random
from pathlib import Path

from click.testing import CliRunner
from test_include import write_split

import meshctl.compiler.cache as cache_module
from meshctl.cli import main
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import CompileResult, compile_mesh
from meshctl.compiler.server import ResidentCache

EDITS = [
    ("description: ", "description: Edited. "),           # a product's text
    ("classification: restricted", "classification: internal"),
    ("    jurisdiction: eu\n", "    jurisdiction: eu\n    description: a hospital\n"),
    ("domain: ", "domain: x"),                             # an unknown domain (MESH302)
    ("type: float}", "type: int}"),                        # a contract mismatch (MESH322)
    ("products:\n", "products:\n  - {name: extra, domain: nowhere, source: a.csv}\n"),
    ("name: biopsies", "name: biopsies\n    when: 2024-01-01"),  # a date: not cacheable
    ("  - name:", "  - name: [broken"),                    # a syntax error
    ("\n", "\n\n"),                                         # only positions move
]


def _same(cold: CompileResult, warm: CompileResult) -> None:
    assert [d.render() for d in warm.diagnostics] == [d.render() for d in cold.diagnostics]
    assert warm.render_diagnostics() == cold.render_diagnostics()
    assert (warm.plan is None) == (cold.plan is None)
    if cold.plan is not None:
        assert warm.plan.to_toml() == cold.plan.to_toml()


def test_warm_compiles_equal_cold_ones_over_random_edits(tmp_path: Path) -> None:
    mesh = write_split(tmp_path / "mesh")
    cache = LoadCache(tmp_path / "cache")
    _same(compile_mesh(mesh), compile_mesh(mesh, cache=cache))
    assert cache.misses == 5 and cache.hits == 0
    _same(compile_mesh(mesh), compile_mesh(mesh, cache=cache))
    assert cache.hits == 5
    files = [mesh, *sorted((mesh.parent / "domains").glob("*.yaml")), mesh.parent / "contracts.yaml"]
    originals = {f: f.read_text() for f in files}
    rng = random.Random(16)
    resident = ResidentCache(tmp_path / "resident")  # a compile server's, kept across the edits
    for step in range(24):
        if step % 6 == 5:  # now and then, undo everything: the old entries serve again
            for f, text in originals.items():
                f.write_text(text)
        target = rng.choice(files)
        old, new = rng.choice(EDITS)
        text = target.read_text()
        spots = [i for i in range(len(text)) if text.startswith(old, i)]
        if spots:
            at = rng.choice(spots)
            target.write_text(text[:at] + new + text[at + len(old):])
        cold = compile_mesh(mesh)
        _same(cold, compile_mesh(mesh, cache=cache))
        _same(cold, compile_mesh(mesh, cache=resident))
        resident.end()
    assert cache.hits > 5 * 10  # most files were unchanged most of the time
    assert resident.hits > 5 * 10


def test_an_entry_of_another_version_or_a_broken_one_is_not_used(tmp_path: Path, monkeypatch) -> None:
    mesh = write_split(tmp_path / "mesh")
    cache = LoadCache(tmp_path / "cache")
    cold = compile_mesh(mesh)
    compile_mesh(mesh, cache=cache)
    entries = sorted((tmp_path / "cache").glob("*.json"))
    assert len(entries) == 5
    monkeypatch.setattr(cache_module, "__version__", "99.0.0")
    other = LoadCache(tmp_path / "cache")
    _same(cold, compile_mesh(mesh, cache=other))
    assert other.hits == 0 and len(list((tmp_path / "cache").glob("*.json"))) == 10
    monkeypatch.undo()
    for entry in entries:  # tampered with or truncated: loaded again from the file
        entry.write_text('{"data": ')
    again = LoadCache(tmp_path / "cache")
    _same(cold, compile_mesh(mesh, cache=again))
    assert again.hits == 0 and again.misses == 5


def test_validate_and_plan_keep_the_cache_beside_the_mesh(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["validate", str(mesh)]).exit_code == 0
    assert len(list((tmp_path / ".meshctl" / "cache").glob("*.json"))) == 5
    out = tmp_path / "p.toml"
    assert runner.invoke(main, ["plan", str(mesh), "-o", str(out)]).exit_code == 0
    assert out.read_text() == compile_mesh(mesh).plan.to_toml()
