"""Incremental checks and policies (issue 16): a warm compile remembers each policy
expression's value by (expression text, the exact variables it saw) in
.meshctl/cache/policies/, and gives the cold compile's diagnostics and plan byte for byte
over random edits of domain files, a contract another file uses, and global policies.
Also: edits and deploy errors name the included file that declares an item."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_include import write_split
from test_include_cache import _same

import meshctl.compiler.cache as cache_module
from meshctl.compiler.build import made
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import CompileResult, compile_mesh
from meshctl.compiler.plan import Plan, PlanColumn, PlanDecision
from meshctl.compiler.policy import decision
from meshctl.compiler.server import ResidentCache
from meshctl.deploy import k8s_manifests
from meshctl.errors import UserError
from meshctl.specedit import add_contract

PRODUCT_POLICY = ("  - name: known-classification\n    scope: product\n"
                  "    require: product.classification in ['internal', 'restricted']\n")
LOCAL_POLICY = ("    policies:\n      - name: no-secret\n        scope: product\n"
                "        require: \"product.classification != 'secret'\"\n")

EDITS = [
    ("classification: restricted", "classification: internal"),   # the warn policy's `when` flips
    ("classification: restricted", "classification: public"),     # a product policy denies (MESH410)
    ("classification: internal", "classification: restricted"),   # and back
    ("purposes: [cancer-research]", "purposes: [audit]"),          # a contract: purpose-limitation denies
    ("purposes: [audit]", "purposes: [cancer-research]"),          # fixed again
    ("size(model.participants) >= 3", "size(model.participants) >= 4"),  # a global policy denies
    ("size(model.participants) >= 4", "size(model.participants) >= 3"),
    ("require: model.privacy.secure_aggregation", "require: model.nope"),  # MESH413
    ("require: model.nope", "require: model.privacy.secure_aggregation"),
    ("require: model.privacy.secure_aggregation", "require: model.training.rounds"),  # MESH414
    ("require: model.training.rounds", "require: model.privacy.secure_aggregation"),
    ("    address: local\n", "    address: local\n" + LOCAL_POLICY),  # a domain-local policy
    ("description: ", "description: Edited. "),                   # variables unchanged
    ("\n", "\n\n"),                                                 # only positions move
    ("rounds: 15", "rounds: 16"),                                   # a model's variables change
]


def _mesh(root: Path) -> Path:
    mesh = write_split(root)
    text = mesh.read_text()
    mesh.write_text(text.replace("policies:\n", "policies:\n" + PRODUCT_POLICY, 1))
    return mesh


def test_warm_policies_equal_cold_ones_over_random_edits(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path / "mesh")
    directory = tmp_path / "cache"
    _same(compile_mesh(mesh), compile_mesh(mesh, cache=LoadCache(directory)))
    warm = LoadCache(directory)
    _same(compile_mesh(mesh), compile_mesh(mesh, cache=warm))
    assert warm.decisions.hits == 4 and warm.decisions.misses == 0  # one model, three products
    files = [mesh, *sorted((mesh.parent / "domains").glob("*.yaml")), mesh.parent / "contracts.yaml"]
    originals = {f: f.read_text() for f in files}
    rng = random.Random(16)
    hits = misses = 0
    seen: set[str] = set()
    resident = ResidentCache(tmp_path / "resident")  # a compile server's: kept across the edits
    _same(compile_mesh(mesh), _served(mesh, resident))
    for step in range(40):
        if step % 10 == 9:  # now and then, undo everything
            for f, text in originals.items():
                f.write_text(text)
        old, new = rng.choice(EDITS)
        targets = [f for f in files if old in f.read_text()]
        if targets:
            target = rng.choice(targets)
            text = target.read_text()
            spots = [i for i in range(len(text)) if text.startswith(old, i)]
            at = rng.choice(spots)
            target.write_text(text[:at] + new + text[at + len(old):])
        cache = LoadCache(directory)  # a fresh process's view: what is on disk
        cold = compile_mesh(mesh)
        _same(cold, compile_mesh(mesh, cache=cache))
        _same(cold, _served(mesh, resident))
        hits, misses = hits + cache.decisions.hits, misses + cache.decisions.misses
        seen |= {d.code for d in cold.diagnostics}
    assert {"MESH410", "MESH411", "MESH413", "MESH414"} <= seen  # every policy outcome was replayed
    assert hits > misses > 0
    assert resident.hits > 4 * 30  # the server kept most files' loads (and their items)


def _served(mesh: Path, resident: ResidentCache) -> CompileResult:
    """A compile as the compile server runs it: through its resident cache, then `end()`."""
    result = compile_mesh(mesh, cache=resident)
    resident.end()
    return result


def test_memo_of_another_version_or_a_broken_one_is_not_used(tmp_path: Path, monkeypatch) -> None:
    mesh = _mesh(tmp_path / "mesh")
    directory = tmp_path / "cache"
    cold = compile_mesh(mesh)
    compile_mesh(mesh, cache=LoadCache(directory))
    memo = directory / "policies" / "decisions.json"
    entry = json.loads(memo.read_text())
    for values in entry["subjects"].values():  # a lie: every value false
        for i in values:
            values[i] = False
    memo.write_text(json.dumps(entry))
    lied = compile_mesh(mesh, cache=LoadCache(directory))
    assert lied.errors  # the memo is what a warm compile reads ...
    odd = [None, "x", 3, ["error"], ["value", "int"], {"error": 1}, [["error"], "x"]]
    slots = [(values, i) for values in entry["subjects"].values() for i in values]
    assert len(slots) >= len(odd)
    for n, (values, i) in enumerate(slots):  # values no compile writes: decided afresh
        values[i] = odd[n % len(odd)]
    memo.write_text(json.dumps(entry))
    _same(cold, compile_mesh(mesh, cache=LoadCache(directory)))
    monkeypatch.setattr(cache_module, "__version__", "99.0.0")
    other = LoadCache(directory)  # ... but never another meshctl's
    _same(cold, compile_mesh(mesh, cache=other))
    assert other.decisions.hits == 0
    monkeypatch.undo()
    memo.write_text('{"key": ')  # truncated: decided afresh
    again = LoadCache(directory)
    _same(cold, compile_mesh(mesh, cache=again))
    assert again.decisions.hits == 0 and again.decisions.misses == 4


def _contract(**changes: object) -> dict:
    """tumor-biopsy@1 as contracts.yaml declares it, with `changes`."""
    columns = [{"name": n, "type": "float"} for n in FEATURES]
    columns.append({"name": "diagnosis", "type": "category", "values": ["benign", "malignant"]})
    return {"name": "tumor-biopsy", "version": "1.0.0", "purposes": ["cancer-research"],
            "columns": columns, **changes}


FEATURES = ["radius_mean", "texture_mean", "perimeter_mean", "area_mean", "smoothness_mean",
            "compactness_mean", "concavity_mean", "concave_points_mean", "symmetry_mean",
            "fractal_dimension_mean"]


def test_replacing_a_contract_edits_the_included_file_that_declares_it(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path)
    contracts = tmp_path / "contracts.yaml"
    before = mesh.read_text()
    assert add_contract(mesh, _contract(description="Replaced."), replace=True) == "replaced"
    assert mesh.read_text() == before  # mesh.yaml holds no contract: untouched
    assert "description: Replaced." in contracts.read_text()
    assert compile_mesh(mesh).spec.contracts[0].description == "Replaced."
    # an edit that breaks a product names the file and line of the product, not mesh.yaml's
    broken = _contract()
    broken["columns"][0]["type"] = "int"  # the products declare radius_mean a float
    with pytest.raises(UserError) as err:
        add_contract(mesh, broken, replace=True)
    assert err.value.where.startswith(f"{tmp_path}/domains/"), err.value.where
    assert "description: Replaced." in contracts.read_text()  # nothing was written


def test_deploy_names_the_included_file_of_a_domain(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path)
    with pytest.raises(UserError) as err:
        k8s_manifests(mesh, "charite")
    lines = (tmp_path / "domains" / "charite.yaml").read_text().splitlines()
    file, line, col = err.value.where.rsplit(":", 2)
    assert file == f"{tmp_path}/domains/charite.yaml"
    assert lines[int(line) - 1][int(col) - 1:] == "local"


def test_a_decision_is_what_model_construct_makes() -> None:
    fields = {"policy": "p", "scope": "model", "subject": "model.m", "effect": "deny", "reason": "r",
              "at": "mesh.yaml:3:5"}
    fast, slow = decision(dict(fields)), PlanDecision.model_construct(**fields)
    assert fast == slow and hash(fast) == hash(slow) and fast.model_dump() == slow.model_dump()
    for state in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
        assert getattr(fast, state) == getattr(slow, state), state


def test_positions_are_decoded_when_looked_up_and_a_broken_tree_is_read_again(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path / "mesh")
    charite = mesh.parent / "domains" / "charite.yaml"
    charite.write_text(charite.read_text().replace("    domain: charite", "    domain: charity"))  # MESH302
    directory = tmp_path / "cache"
    cold = compile_mesh(mesh)
    assert any(d.file.endswith("charite.yaml") for d in cold.errors)
    compile_mesh(mesh, cache=LoadCache(directory))
    for entry in directory.glob("*.json"):  # the positions of every file: broken
        data = json.loads(entry.read_text())
        assert type(data["tree"]) is str  # kept as text until a lookup needs it
        data["tree"] = data["tree"][:-3]
        entry.write_text(json.dumps(data))
    warm = LoadCache(directory)
    _same(cold, compile_mesh(mesh, cache=warm))  # positions taken from the files themselves
    assert warm.hits == 5 and warm.misses == 0  # the data still came from the cache


def test_a_plan_object_is_what_model_construct_makes() -> None:
    fields = {"name": "age", "type": "float", "range": [0.0, 120.0]}
    fast, slow = made(PlanColumn, **fields), PlanColumn.model_construct(**fields)
    assert fast == slow and fast.model_dump() == slow.model_dump()
    assert list(fast.__dict__) == list(PlanColumn.model_fields)  # field order: the TOML's key order
    for state in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
        assert getattr(fast, state) == getattr(slow, state), state
    assert fast.values is not made(PlanColumn, **fields).values  # a default list is a fresh one
    with pytest.raises(TypeError):
        made(PlanColumn, name="age")  # type is required
    with pytest.raises(TypeError):
        made(PlanColumn, name="age", type="int", nope=1)


def test_the_plan_is_what_validation_makes_and_equal_columns_are_one_object(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path)
    for domain, low in (("charite", "-0.0"), ("karolinska", "0.0")):  # equal as floats, not in TOML
        path = tmp_path / "domains" / f"{domain}.yaml"
        path.write_text(path.read_text().replace("{name: radius_mean, type: float}",
                                                 f"{{name: radius_mean, type: float, range: [{low}, 30]}}"))
    plan = compile_mesh(mesh).plan
    assert plan is not None
    assert plan.to_toml() == Plan.model_validate(plan.model_dump()).to_toml()  # validation converts nothing
    columns = {p.domain: {c.name: c for c in p.columns} for p in plan.products}
    assert repr(columns["charite"]["radius_mean"].range[0]) == "-0.0"
    assert repr(columns["karolinska"]["radius_mean"].range[0]) == "0.0"
    assert columns["charite"]["texture_mean"] is columns["karolinska"]["texture_mean"]


def test_a_resident_cache_reuses_what_unchanged_files_made(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path / "mesh")
    resident = ResidentCache(tmp_path / "resident")
    first = _served(mesh, resident).plan
    edited = mesh.parent / "domains" / "charite.yaml"
    edited.write_text(edited.read_text().replace("description: ", "description: Edited. ", 1))
    second = _served(mesh, resident).plan
    assert first is not None and second is not None
    for old, new in zip(first.products, second.products, strict=True):
        assert (old is new) == (old.domain != "charite"), old.id  # only the edited file's product is new
    assert all(old is new for old, new in zip(first.contracts, second.contracts, strict=True))
    assert [d is e for d, e in zip(first.decisions, second.decisions, strict=True)].count(True) >= 3
    assert second.to_toml() == compile_mesh(mesh).plan.to_toml()
