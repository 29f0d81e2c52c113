"""What a compile server keeps between compiles besides loads and parsed items (issue 16): models
resolved, jobs built and policy variables made from the very objects of a previous compile; and
sources found from one listing per directory. Each edit below is one that a wrong shortcut would miss; after each, the
served compile (a ResidentCache kept across all of them) gives the cold compile's diagnostics and
plan byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_include_cache import _same

from meshctl.compiler import build
from meshctl.compiler.compile import CompileResult, compile_mesh
from meshctl.compiler.resolve import Resolver
from meshctl.compiler.server import ResidentCache, Server

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits-cnn"
COLUMNS = ("[{name: id, type: string, pii: direct}, {name: x1, type: float}, {name: x2, type: float}, "
           "{name: label, type: category, values: [no, yes]}]")
MESH = """apiVersion: meshctl/v1
mesh: {name: kept, coordinator: {address: 'tcp://127.0.0.1:7700', jurisdiction: eu}}
include: [domains/*.yaml, contracts.yaml]
policies:
  - {name: purpose, scope: model, require: "model.reads.all(p, model.purpose in p.purposes)"}
  - {name: eu, scope: model, effect: warn, require: "model.domains.all(d, d.jurisdiction == 'eu')"}
models:
  - name: every
    purpose: research
    inputs: {contract: c, features: ['x*'], target: label}
    architecture: {kind: mlp, hidden: [4]}
    training: {rounds: 2, seed: 1}
  - name: listed
    purpose: research
    participants: [b, y2, a]
    inputs: {contract: c, features: [x1], target: label}
    architecture: {kind: mlp, hidden: [3]}
    training: {rounds: 2, seed: 2}
"""
CONTRACTS = """contracts:
  - name: c
    version: 1.0.0
    purposes: [research]
    columns: [{name: x1, type: float}, {name: x2, type: float}, {name: label, type: category, values: [no, yes]}]
"""


def _domain(name: str) -> str:
    return f"  - {{name: {name}, owner: team@{name}.example, jurisdiction: eu, address: local}}\n"


def _product(domain: str, source: str | None = None) -> str:
    return (f"  - {{name: p, domain: {domain}, source: {source or f'data/{domain}.csv'}, contract: c@1, "
            f"columns: {COLUMNS}}}\n")


def write_mesh(root: Path) -> Path:
    """Domains a, b (each with its product), y1 and y2 in one file, their products in another, and
    e, which publishes nothing yet."""
    (root / "domains").mkdir(parents=True)
    (root / "data").mkdir()
    for d in ("a", "b", "y1", "y2", "e"):
        (root / "data" / f"{d}.csv").write_text("id,x1,x2,label\n")
    for d in ("a", "b"):
        (root / "domains" / f"{d}.yaml").write_text("domains:\n" + _domain(d) + "products:\n" + _product(d))
    (root / "domains" / "y.yaml").write_text("domains:\n" + _domain("y1") + _domain("y2"))
    (root / "domains" / "yp.yaml").write_text("products:\n" + _product("y1") + _product("y2"))
    (root / "domains" / "z.yaml").write_text("domains:\n" + _domain("e"))
    (root / "domains" / "not-a-file.yaml").mkdir()  # (the glob takes files only)
    (root / "contracts.yaml").write_text(CONTRACTS)
    (root / "mesh.yaml").write_text(MESH)
    return root / "mesh.yaml"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _swap_y(root: Path) -> None:
    """y2 before y1: the participants' order, from the domains' order (another file than the products')."""
    (root / "domains" / "y.yaml").write_text("domains:\n" + _domain("y2") + _domain("y1"))


EDITS = [  # (what it changes, the edit); each is compiled cold and served, then compared
    ("the domains' order only", _swap_y),
    ("a contract's classes (the target's values), in another file than model and products",
     lambda r: _edit(r / "contracts.yaml", "values: [no, yes]}]", "values: [no, yes, maybe]}]")),
    ("a contract's purposes: the policy's reads", lambda r: _edit(r / "contracts.yaml", "[research]", "[audit]")),
    ("back", lambda r: _edit(r / "contracts.yaml", "[audit]", "[research]")),
    ("a domain's jurisdiction, in another file than its product: the policies' variables",
     lambda r: _edit(r / "domains" / "y.yaml", "y1.example, jurisdiction: eu", "y1.example, jurisdiction: us")),
    ("a domain's owner, in another file than its product: the plan's product",
     lambda r: _edit(r / "domains" / "y.yaml", "owner: team@y1.example", "owner: ops@y1.example")),
    ("a contract's version, in another file than the products", lambda r: _edit(r / "contracts.yaml", "1.0.0", "1.1.0")),
    ("a product published by a domain that had none, in another file",
     lambda r: _edit(r / "domains" / "yp.yaml", "products:\n", "products:\n" + _product("e"))),
    ("a renamed domain (its product follows)",
     lambda r: (r / "domains" / "b.yaml").write_text("domains:\n" + _domain("bb") + "products:\n" + _product("bb", "data/b.csv"))),
    ("and back", lambda r: (r / "domains" / "b.yaml").write_text("domains:\n" + _domain("b") + "products:\n" + _product("b"))),
    ("a source file removed", lambda r: (r / "data" / "a.csv").unlink()),
    ("created again", lambda r: (r / "data" / "a.csv").write_text("id\n")),
    ("replaced by a directory", lambda r: ((r / "data" / "a.csv").unlink(), (r / "data" / "a.csv").mkdir())),
    ("a link to a file", lambda r: ((r / "data" / "a.csv").rmdir(), os.symlink(r / "data" / "b.csv", r / "data" / "a.csv"))),
    ("a link to nothing", lambda r: ((r / "data" / "b.csv").rename(r / "data" / "b.old"))),
    ("the file again", lambda r: ((r / "data" / "b.old").rename(r / "data" / "b.csv"))),
    ("a source written ./data/, with //, absolute",
     lambda r: (r / "domains" / "yp.yaml").write_text("products:\n" + _product("y1", "./data/y1.csv")
                                                      + _product("y2", "data//y2.csv") + _product("e", str(r / "data/e.csv")))),
    ("an absolute source that is missing, named as a file beside mesh.yaml",
     lambda r: ((r / "e.csv").write_text("id\n"), _edit(r / "domains" / "yp.yaml", str(r / "data/e.csv"), "/e.csv"))),
    ("found again", lambda r: _edit(r / "domains" / "yp.yaml", "source: /e.csv", "source: data/e.csv")),
    ("a model's own edit", lambda r: _edit(r / "mesh.yaml", "rounds: 2, seed: 2", "rounds: 3, seed: 2")),
]


def _served(mesh: Path, resident: ResidentCache) -> CompileResult:
    result = compile_mesh(mesh, cache=resident)
    resident.end()
    return result


def test_served_compiles_equal_cold_ones_over_edits_a_wrong_shortcut_would_miss(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path / "m")
    root = mesh.parent
    first = compile_mesh(mesh)
    assert first.errors == [], first.render_diagnostics()
    resident = ResidentCache(root / ".meshctl" / "cache")
    _same(first, _served(mesh, resident))
    codes: set[str] = set()
    plans: set[str] = set()
    for what, edit in EDITS:
        edit(root)
        cold = compile_mesh(mesh)
        try:
            _same(cold, _served(mesh, resident))
        except AssertionError as error:
            raise AssertionError(f"after {what}: {error}") from None
        codes |= {d.code for d in cold.diagnostics}
        plans.add(cold.plan.to_toml() if cold.plan else "")
    assert {"MESH307", "MESH410", "MESH411"} <= codes  # a missing source, a denied purpose, a warning
    assert len(plans) >= 7  # the edits changed the plan (participants, classes, reads, sources...)


def test_a_server_resolves_and_builds_only_the_models_an_edit_touches(tmp_path: Path, monkeypatch) -> None:
    mesh = write_mesh(tmp_path / "m")
    root = mesh.parent
    resolved: list[str] = []
    built: list[str] = []
    resolve_model, job = Resolver._resolve_model, build._job

    def counted_resolve(self, model, *args):
        resolved.append(model.name)
        return resolve_model(self, model, *args)

    def counted_job(r, *args):
        built.append(r.model.name)
        return job(r, *args)

    monkeypatch.setattr(Resolver, "_resolve_model", counted_resolve)
    monkeypatch.setattr(build, "_job", counted_job)
    resident = ResidentCache(root / ".meshctl" / "cache")
    _served(mesh, resident)
    assert sorted(resolved) == sorted(built) == ["every", "listed"]
    for edit, again in [(lambda: _edit(root / "domains" / "z.yaml", "owner: team@e", "owner: ops@e"), []),
                        (lambda: _edit(root / "domains" / "a.yaml", "x2, type: float", "x2, type: float, description: X"),
                         ["every", "listed"]),  # a product both read
                        (lambda: _edit(root / "mesh.yaml", "rounds: 2, seed: 1", "rounds: 3, seed: 1"),
                         ["every", "listed"]),  # (every item of an edited file is a new object)
                        (lambda: _edit(root / "domains" / "z.yaml", "owner: ops@e", "owner: team@e"), [])]:
        edit()
        cold = compile_mesh(mesh)
        resolved.clear()
        built.clear()
        _same(cold, _served(mesh, resident))
        assert sorted(resolved) == sorted(built) == again


@pytest.mark.parametrize(("source", "found"), [
    ("data/a.csv", True), ("./data/a.csv", True), ("data//a.csv", True),
    ("lnk/../a.csv", True),   # lnk is data/sub: `..` is data/, where a.csv is ...
    ("lnk/../x.csv", False),  # ... and x.csv is not (it is beside mesh.yaml)
    ("data/sub.csv", False),  # a directory
    ("/x.csv", False),        # absolute: not the x.csv beside mesh.yaml
    ("data/A.csv", False),    # another name (on a case-sensitive file system)
])
def test_a_source_is_found_as_a_stat_finds_it(tmp_path: Path, source: str, found: bool) -> None:
    mesh = write_mesh(tmp_path / "m")
    root = mesh.parent
    (root / "data" / "sub").mkdir()
    (root / "data" / "sub.csv").mkdir()
    os.symlink(root / "data" / "sub", root / "lnk")
    (root / "x.csv").write_text("id\n")
    _edit(root / "domains" / "a.yaml", "source: data/a.csv", f"source: {source}")
    assert [d.code for d in compile_mesh(mesh).errors] == ([] if found else ["MESH307"])


def test_an_entrypoint_models_code_edited_while_the_mesh_is_not(tmp_path: Path) -> None:
    """The model's network comes from its code, which the kept objects do not show: a server's
    compile after a code edit is the cold one (the code hash an allow-list policy checks, the job's
    tensors)."""
    root = tmp_path / "m"
    shutil.copytree(DIGITS, root, ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    mesh = root / "mesh.yaml"
    resident = ResidentCache(root / ".meshctl" / "cache")
    first = _served(mesh, resident)
    assert first.plan is not None, first.render_diagnostics()
    code = root / "digits_cnn" / "model.py"
    code.write_text(code.read_text().replace("channels: int = 16", "channels: int = 8"))
    cold = compile_mesh(mesh)
    assert "MESH410" in {d.code for d in cold.diagnostics}  # the allow-listed code hash
    _same(cold, _served(mesh, resident))


def test_the_first_request_after_the_servers_own_compile_loads_nothing_again(tmp_path: Path, monkeypatch) -> None:
    """The server's first compile names the files as `meshctl validate` in the mesh directory does
    (the names are part of every key): before, the first request loaded and checked every file again."""
    import meshctl.cli

    mesh = write_mesh(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    served = Server(mesh.parent, 60, meshctl.cli.main, lambda cache: setattr(meshctl.cli, "RESIDENT", cache))
    served.warm()
    loaded = served.cache.misses
    assert loaded == 7  # mesh.yaml, six included files
    answer = served.run({"argv": ["validate"], "cwd": str(mesh.parent), "env": {"NO_COLOR": "1"}})
    assert answer["exit"] == 0 and answer["out"].startswith("mesh.yaml: ok"), answer
    assert served.cache.misses == loaded and served.cache.hits == loaded
