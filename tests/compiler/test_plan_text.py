"""The plan's text made per resource (meshctl.compiler.plantext, issue 16): the bytes of the whole
plan's data through the writer, cold and from the texts a compile server keeps over random edits;
`meshctl plan`'s diff from the kept blocks gives the whole diff; the plan file is read once."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from compiler_util import ROOT_MESH
from test_include_cache import EDITS as FILE_EDITS
from test_incremental import EDITS as POLICY_EDITS
from test_incremental import _mesh
from test_plan_split import MESHES
from test_plan_split import _edit as plan_edit

from meshctl.cli import main
from meshctl.compiler import plantext
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan, PlanDecision, PlanGrant
from meshctl.compiler.plandiff import _blocks, diff_plan_texts, diff_plans
from meshctl.compiler.server import ResidentCache


def _reference(plan: Plan) -> str:
    """The plan's text from its whole data, dumped at once (as before plantext); its hash checked."""
    if plan.plan.hash:
        unhashed = plan.model_copy(update={"plan": plan.plan.model_copy(update={"hash": ""})})
        body = unhashed._dumped_texts()[0]
        assert plan.plan.hash == f"sha256:{hashlib.sha256(body.encode()).hexdigest()}"
    return "".join(plan._dumped_texts())


@pytest.fixture
def resident() -> Iterator[plantext.PlanTexts]:
    """Plan texts kept as a compile server keeps them while it runs a command."""
    texts = plantext.PlanTexts()
    plantext.RESIDENT = texts
    yield texts
    plantext.RESIDENT = None


@pytest.mark.parametrize("mesh", MESHES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_plan_made_per_resource_is_the_whole_plan_dumped(mesh: Path) -> None:
    result = compile_mesh(mesh, hashed=False)
    if result.plan is None:
        pytest.skip("does not compile here (data or modules missing)")
    plan = result.plan
    assert plan.to_toml() == _reference(plan)
    made = plantext.assemble(plan)
    again = plantext.assemble(plan, made)
    assert again.new == 0 and again.head + again.rest() + again.positions == _reference(plan)
    hashed = plan.with_hash()  # its blocks are the ones plandiff cuts from its text
    made = plantext.assembly_of(hashed.to_toml())
    assert made is not None or not hashed.to_toml().startswith("[plan]")  # (an inline section first)
    assert made is None or made.cut()[1] == _blocks(hashed.to_toml())[1]


def test_kept_texts_give_the_cold_bytes_and_diff_over_random_edits(tmp_path: Path, resident) -> None:
    """A split mesh compiled through a kept ResidentCache and kept plan texts after each random
    edit (policies, contracts, positions, syntax errors...): the cold compile's plan bytes, the
    reference text, and the whole diff against the previous plan, from kept blocks."""
    mesh = _mesh(tmp_path / "mesh")
    files = [mesh, *sorted((mesh.parent / "domains").glob("*.yaml")), mesh.parent / "contracts.yaml"]
    originals = {f: f.read_text() for f in files}
    cache = ResidentCache(tmp_path / "resident")
    rng = random.Random(7)
    previous: Plan | None = None
    reused = compiled = 0
    for _ in range(30):
        old, new = rng.choice(POLICY_EDITS + FILE_EDITS)
        targets = [f for f in files if old in f.read_text()]
        if targets:
            target = rng.choice(targets)
            target.write_text(target.read_text().replace(old, new, 1))
        served = compile_mesh(mesh, cache=cache).plan
        cache.end()
        plantext.RESIDENT = None
        cold = compile_mesh(mesh).plan
        plantext.RESIDENT = resident
        assert (served is None) == (cold is None)
        if cold is None:  # undo every edit: the next compile is the first plan again
            for f, text in originals.items():
                f.write_text(text)
            continue
        compiled += 1
        assert served.to_toml() == cold.to_toml() == _reference(cold)
        reused += resident.last.new < len(resident.last.used)  # (domains, jobs, policies: new objects)
        if previous is not None:
            diffs = resident.diffs
            assert diff_plan_texts(previous.to_toml(), served.to_toml()) == diff_plans(previous, cold)
            assert resident.diffs == diffs + (previous.to_toml() != served.to_toml())
        previous = served
    assert compiled > 10 and reused > compiled // 2  # most compiles reused texts (products, decisions)


def test_kept_texts_over_random_plan_edits(resident) -> None:
    """Products changed, added, removed, reordered; decisions with escaped keys; job edits: each
    plan's text from the kept texts is the reference, and the diff from kept blocks the whole diff."""
    first = compile_mesh(ROOT_MESH).plan
    rng = random.Random(16)
    previous = first
    for _ in range(40):
        plan = previous
        for _ in range(1 + rng.randrange(3)):
            plan = plan_edit(plan, rng)
        hashed = plan.with_hash()
        assert hashed.to_toml() == _reference(hashed)
        assert diff_plan_texts(previous.to_toml(), hashed.to_toml()) == diff_plans(previous, hashed)
        previous = hashed
    assert resident.diffs >= 30  # (not: an unchanged text)


def test_a_section_that_fits_inline_and_a_decision_with_its_own_position(resident) -> None:
    """tomli-w writes a section inline when every table fits 100 characters (before `[plan]`: the
    hash line is then filled in by writing the text again); a decision whose position is not its
    policy's keeps it, and one whose policy moved is written again."""
    plan = compile_mesh(ROOT_MESH).plan
    short = [PlanDecision(policy="p", scope="model", subject=f"m{i}", effect="allow", reason="r")
             for i in range(3)]
    inline = plan.model_copy(update={"decisions": short, "grants": [PlanGrant(
        id="a->model:b", product="a", subject="model:b", purpose="x", at="mesh.yaml:1:1")]})
    hashed = inline.with_hash()
    assert hashed.to_toml().startswith("decisions = [\n    { policy = ")
    assert hashed.to_toml() == _reference(hashed)
    decisions = list(plan.decisions)
    decisions[0] = decisions[0].model_copy(update={"at": "elsewhere.yaml:3:4"})
    own = plan.model_copy(update={"decisions": decisions}).with_hash()
    assert 'at = "elsewhere.yaml:3:4"' in own.to_toml() and own.to_toml() == _reference(own)
    moved = own.model_copy(update={"policies": [p.model_copy(update={"at": "moved.yaml:1:1"})
                                                for p in own.policies]}).with_hash()
    assert moved.to_toml() == _reference(moved)  # every decision's `at` is now its own: kept in it
    assert resident.last.new >= len(moved.decisions)


def test_a_plan_naming_a_resource_twice_is_diffed_whole(resident) -> None:
    plan = compile_mesh(ROOT_MESH).plan.with_hash()
    twice = plan.model_copy(update={"products": [*plan.products, plan.products[0]]}).with_hash()
    edited = twice.model_copy(update={"products": [twice.products[0].model_copy(
        update={"classification": "public"}), *twice.products[1:]]}).with_hash()
    assert resident.made[-1].cut() is None  # (named twice: no cut)
    assert diff_plan_texts(twice.to_toml(), edited.to_toml()) == diff_plans(
        Plan.from_toml(twice.to_toml()), Plan.from_toml(edited.to_toml()))


def test_plan_reads_the_plan_file_once(tmp_path: Path, monkeypatch) -> None:
    """`meshctl plan` reads the previous plan file once: for the diff and to skip an unchanged write."""
    mesh = _mesh(tmp_path / "mesh")
    out = mesh.parent / "mesh.plan.toml"
    runner = CliRunner()
    assert runner.invoke(main, ["plan", str(mesh)]).exit_code == 0
    reads: list[Path] = []
    read_text = Path.read_text

    def counted(self: Path, *args, **kwargs) -> str:
        if self.name == out.name:
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    before = out.stat()
    got = runner.invoke(main, ["plan", str(mesh)])
    assert got.exit_code == 0 and "No changes." in got.stdout
    assert len(reads) == 1 and out.stat().st_mtime_ns == before.st_mtime_ns
    edit = mesh.parent / "contracts.yaml"
    edit.write_text(edit.read_text().replace("purposes: [cancer-research]", "purposes: [cancer-research, audit]", 1))
    got = runner.invoke(main, ["plan", str(mesh)])
    assert got.exit_code == 0 and "Plan: 0 to add, 1 to change" in got.stdout
    assert len(reads) == 2 and Plan.read(out).to_toml() == out.read_text()
