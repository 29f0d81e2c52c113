"""The plan's bytes, cheap (issue 16): meshctl.compiler.tomlwrite writes exactly tomli-w's
TOML, so plan hashes do not move; `meshctl plan` diffs against the previous plan by parsing
only the resources whose TOML changed, with the changes a whole diff gives; an unchanged
plan file is not rewritten."""

from __future__ import annotations

import hashlib
import random
import tomllib
from pathlib import Path

import pytest
import tomli_w
from compiler_util import ROOT, ROOT_MESH, SPECS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_include import write_split
from test_include_cache import EDITS

from meshctl.compiler import tomlwrite
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan, PlanDecision, PlanProduct, _take_positions
from meshctl.compiler.plandiff import _blocks, diff_plan_texts, diff_plans

MESHES = [ROOT_MESH, *sorted((SPECS / "valid").glob("*.yaml")),
          *sorted((ROOT / "examples").glob("*/mesh.yaml"))]


def _plain(plan: Plan) -> dict:
    """The hashed part of a plan's data (its positions taken out)."""
    data = plan.model_dump(mode="json", exclude_none=True)
    _take_positions(data)
    return {k: v for k, v in data.items() if v != []}


def _tomli_w(plan: Plan) -> str:
    """The plan's text as tomli-w writes it: the hashed data, then the `[positions]` table."""
    data = plan.model_dump(mode="json", exclude_none=True)
    positions = _take_positions(data)
    tail = "\n" + tomli_w.dumps({"positions": positions}) if positions else ""
    return tomli_w.dumps({k: v for k, v in data.items() if v != []}) + tail


@pytest.mark.parametrize("mesh", MESHES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plans_are_tomli_w_bytes(mesh: Path) -> None:
    plan = compile_mesh(mesh).plan
    if plan is None:
        pytest.skip("does not compile here (data or modules missing)")
    assert plan.to_toml() == _tomli_w(plan)
    assert Plan.from_toml(plan.to_toml()) == plan
    fewer = plan.model_copy(update={"products": plan.products[1:], "jobs": plan.jobs[::-1]})
    assert diff_plan_texts(plan.to_toml(), fewer.to_toml()) == diff_plans(plan, fewer)
    assert _blocks(plan.to_toml()) is not None  # every example takes the block path


KEYS = st.text(max_size=6) | st.sampled_from(["name", "id", "a-b_C9", "x y", "ü", ""])
SCALARS = (st.text(max_size=12) | st.sampled_from(['"', "\\", "\n\t\x00\x7f\x1f", "é€😀"])
           | st.integers() | st.floats(allow_nan=False) | st.booleans())


def _value(children: st.SearchStrategy) -> st.SearchStrategy:
    tables = st.dictionaries(KEYS, children, max_size=4)
    return st.lists(children, max_size=4) | tables | st.lists(tables, min_size=1, max_size=3)


DATA = st.dictionaries(KEYS, st.recursive(SCALARS, _value, max_leaves=12), max_size=5)


@settings(max_examples=120, deadline=None)
@given(DATA)
def test_writer_equals_tomli_w_on_random_data(data: dict) -> None:
    text = tomlwrite.dumps(data)
    assert text == tomli_w.dumps(data)
    assert tomllib.loads(text) == data


def test_writer_refuses_what_is_not_plain_data() -> None:
    with pytest.raises(TypeError, match="not TOML serializable"):
        tomlwrite.dumps({"a": {1, 2}})
    with pytest.raises(TypeError, match="A string is required"):
        tomlwrite.dumps({"a": {1: 2}})


def _edit(plan: Plan, rng: random.Random) -> Plan:
    """One random change to a plan's resources, as a recompile could make it."""
    products, decisions, jobs = list(plan.products), list(plan.decisions), list(plan.jobs)
    what = rng.randrange(7)
    if what == 0:
        i = rng.randrange(len(products))
        products[i] = products[i].model_copy(update={"classification": f"c{rng.randrange(9)}"})
    elif what == 1 and len(products) > 1:
        products.pop(rng.randrange(len(products)))
    elif what == 2:
        new = rng.choice(products)
        products.insert(rng.randrange(len(products) + 1), PlanProduct.model_validate(
            {**new.model_dump(), "id": f"{new.domain}.n{rng.randrange(10**6)}"}))
    elif what == 3 and decisions:
        i = rng.randrange(len(decisions))
        decisions[i] = decisions[i].model_copy(update={"effect": rng.choice(["allow", "deny", "warn"])})
    elif what == 4:
        decisions.append(PlanDecision(policy=f'p"{rng.randrange(9)}/é', scope="model",  # escaped keys
                                      subject=f"model.x/{rng.randrange(9)}", effect="warn", reason="r"))
    elif what == 5 and jobs:
        i = rng.randrange(len(jobs))
        training = jobs[i].training.model_copy(update={"rounds": rng.randrange(1, 99)})
        jobs[i] = jobs[i].model_copy(update={"training": training})
    else:
        rng.shuffle(products)
    return plan.model_copy(update={"products": products, "decisions": decisions, "jobs": jobs})


def test_diff_by_blocks_equals_the_whole_diff_over_random_edits() -> None:
    first = compile_mesh(ROOT_MESH).plan
    rng = random.Random(16)
    for _ in range(60):
        old = first
        for _ in range(rng.randrange(4)):
            old = _edit(old, rng)
        new = old
        for _ in range(1 + rng.randrange(3)):
            new = _edit(new, rng)
        old_text, new_text = old.with_hash().to_toml(), new.with_hash().to_toml()
        assert diff_plan_texts(old_text, new_text) == diff_plans(old, new)
    assert diff_plan_texts(first.to_toml(), first.to_toml()) == []


def test_diff_of_a_plan_not_laid_out_as_meshctl_writes_it_is_whole() -> None:
    plan = compile_mesh(ROOT_MESH).plan
    text = plan.to_toml()
    block = text[text.index("[[products]]"):text.index("[[products]]", text.index("[[products]]") + 1)]
    edited = plan.model_copy(update={"products": [plan.products[0].model_copy(
        update={"classification": "public"}), *plan.products[1:]]})
    twice = text.replace(block, block + block, 1)  # a product named twice: diffed whole
    assert diff_plan_texts(twice, edited.to_toml()) == diff_plans(Plan.from_toml(twice), edited)
    moved = text.replace("[coordinator]\n", "[cöordinator]\n", 1)  # not a plan: as whole parsing says
    with pytest.raises(ValueError):
        diff_plan_texts(moved, edited.to_toml())
    with pytest.raises(ValueError):
        diff_plan_texts("not = [toml", text)


def test_warm_cold_and_block_diffs_agree_over_random_edits(tmp_path: Path) -> None:
    """Cold and warm (load cache) compiles of a split mesh give the same plan bytes, whose
    hash is that of tomli-w's text; each edit's block diff is the whole diff."""
    mesh = write_split(tmp_path / "mesh")
    cache = LoadCache(tmp_path / "cache")
    files = [mesh, *sorted((mesh.parent / "domains").glob("*.yaml")), mesh.parent / "contracts.yaml"]
    rng = random.Random(5)
    previous = None
    for _ in range(12):
        target = rng.choice(files)
        old, new = rng.choice(EDITS)
        text = target.read_text()
        if old in text:
            target.write_text(text.replace(old, new, 1))
        cold, warm = compile_mesh(mesh).plan, compile_mesh(mesh, cache=cache).plan
        assert (cold is None) == (warm is None)
        if cold is None:
            continue
        assert warm.to_toml() == cold.to_toml()
        unhashed = tomli_w.dumps(_plain(cold.model_copy(update={"plan": cold.plan.model_copy(
            update={"hash": ""})})))
        assert cold.plan.hash == f"sha256:{hashlib.sha256(unhashed.encode()).hexdigest()}"
        if previous is not None:
            assert diff_plan_texts(previous.to_toml(), cold.to_toml()) == diff_plans(previous, cold)
        previous = cold


def test_an_unchanged_plan_file_is_not_rewritten(tmp_path: Path) -> None:
    plan = compile_mesh(ROOT_MESH).plan
    out = tmp_path / "mesh.plan.toml"
    plan.write(out)
    before = out.stat()
    plan.write(out)
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    changed = plan.model_copy(update={"products": plan.products[1:]})
    changed.write(out)
    assert out.read_text() == changed.to_toml()
