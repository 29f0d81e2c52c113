"""Split models with `entrypoint:` bottom and top models at compile time (issue 15 on issue 12's
custom models): the width learned from the module, the code pinned per part, `meshctl plan`
showing the hash, policies over it, and the diagnostics of a module that does not fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshctl.compiler import entrypoint
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.summary import render_plan_summary

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"
LAB = "        bottom: {hidden: [16], out: 8}\n"
"""The lab part's bottom in examples/vertical (the first of three identical lines)."""
CUSTOM_LAB = '        bottom: {entrypoint: "vmodels.nets:bottom", args: {width: 6}}\n'
CUSTOM_TOP = '    top: {entrypoint: "vmodels.nets:top", args: {hidden: 5}}\n'
NETS = '''\
from torch import nn


def bottom(input_shape, output_dim, width=6):
    assert output_dim is None  # a bottom chooses its width
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.Tanh(), nn.Linear(12, width))


def top(input_shape, output_dim, hidden=5):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, output_dim))


def image(input_shape, output_dim):
    return nn.Sequential(nn.Linear(input_shape[0], 4), nn.Unflatten(1, (2, 2)))


def three(input_shape, output_dim):
    return nn.Linear(input_shape[0], 3)
'''


def write_mesh(root: Path, *edits: tuple[str, str], nets: str = NETS) -> Path:
    """examples/vertical in `root` with the `vmodels` package beside it and `edits` applied once each."""
    text = (EXAMPLE / "mesh.yaml").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    if not (root / "data").exists():
        shutil.copytree(EXAMPLE / "data", root / "data")
    (root / "vmodels").mkdir(exist_ok=True)
    (root / "vmodels" / "__init__.py").write_text("")
    (root / "vmodels" / "nets.py").write_text(nets)
    (root / "mesh.yaml").write_text(text)
    return root / "mesh.yaml"


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models cache holding the custom bottom and top (its key does not depend on the folder)."""
    root = tmp_path_factory.mktemp("warm")
    result = compile_mesh(write_mesh(root, (LAB, CUSTOM_LAB), ("    top: {hidden: [16]}\n", CUSTOM_TOP)))
    assert result.plan is not None, result.render_diagnostics()
    return root / ".meshctl" / "cache" / "models"


def _mesh(tmp_path: Path, warm: Path, *edits: tuple[str, str]) -> Path:
    shutil.copytree(warm, tmp_path / ".meshctl" / "cache" / "models")
    return write_mesh(tmp_path, *edits)


def test_custom_bottom_and_top_are_pinned_and_their_widths_learned(tmp_path, warm):
    result = compile_mesh(_mesh(tmp_path, warm, (LAB, CUSTOM_LAB), ("    top: {hidden: [16]}\n", CUSTOM_TOP)))
    plan = result.plan
    assert plan is not None and result.errors == []
    (split,) = plan.split_models
    lab, imaging = split.parts[0], split.parts[1]
    arch = lab.architecture
    assert arch is not None and imaging.architecture is None  # the other parts keep the built-in mlp
    assert (arch.kind, arch.entrypoint, arch.args, arch.input_dim) == ("custom", "vmodels.nets:bottom",
                                                                       '{"width":6}', 10)
    assert (lab.out, lab.hidden, arch.output_dim) == (6, [], 6)  # learned from the module
    assert [(t.name, t.shape) for t in lab.tensors] == [("0.weight", [12, 10]), ("0.bias", [12]),
                                                        ("2.weight", [6, 12]), ("2.bias", [6])]
    assert [f.path for f in arch.code.files] == ["vmodels/__init__.py", "vmodels/nets.py"]
    assert arch.code.hash == entrypoint.code_record("vmodels.nets:bottom", tmp_path).hash
    top = split.top_architecture
    assert top is not None and (top.entrypoint, top.input_dim, top.output_dim) == ("vmodels.nets:top", 6 + 8 + 8, 2)
    assert [(t.name, t.shape) for t in split.top_tensors] == [("0.weight", [5, 22]), ("0.bias", [5]),
                                                              ("2.weight", [2, 5]), ("2.bias", [2])]
    summary = render_plan_summary(plan)
    short = entrypoint.short_hash(arch.code)
    assert f"lab 10→6 [vmodels.nets:bottom(width=6) 10->6, code {short}]" in summary
    assert f"top 22→2 [vmodels.nets:top(hidden=5) 22->2, code {short}]" in summary
    again = compile_mesh(tmp_path / "mesh.yaml").plan
    assert again is not None and again.to_toml() == plan.to_toml()  # deterministic


def test_policies_read_each_parts_code_hash(tmp_path, warm):
    hash_ = entrypoint.code_record("vmodels.nets:bottom", write_mesh(tmp_path).parent).hash
    policies = ("policies:\n"
                "  - name: approved-code\n    scope: model\n"
                "    require: model.parts.all(p, p.bottom.entrypoint == \"\" || p.bottom.code_hash in"
                f" [\"{hash_}\"]) && model.architecture.code_hash == \"{hash_}\"\n"
                "split_models:\n")
    result = compile_mesh(_mesh(tmp_path, warm, ("split_models:\n", policies), (LAB, CUSTOM_LAB),
                                ("    top: {hidden: [16]}\n", CUSTOM_TOP)))
    assert result.plan is not None and result.errors == [], result.render_diagnostics()
    assert {(d.policy, d.effect) for d in result.plan.decisions} == {("approved-code", "allow")}
    text = (tmp_path / "mesh.yaml").read_text()  # another approved hash: the policy denies
    (tmp_path / "mesh.yaml").write_text(text.replace(f'in ["{hash_}"]', 'in ["sha256:00"]'))
    result = compile_mesh(tmp_path / "mesh.yaml")
    assert result.plan is None and [d.code for d in result.errors] == ["MESH410"], result.render_diagnostics()


@pytest.mark.parametrize(("lab", "top", "code", "says"), [
    ('        bottom: {entrypoint: "vmodels.nets:image"}\n', None, "MESH576",
     "entrypoint vmodels.nets:image: forward on a [2, 10] input gave [2, 2, 2], not [2, k] activations"),
    ('        bottom: {entrypoint: "vmodels.nets:bottom", out: 8}\n', None, "MESH576",
     "the bottom model vmodels.nets:bottom of part lab.nuclei gives 6 activations per row, `out` says 8"),
    (None, '    top: {entrypoint: "vmodels.nets:three"}\n', "MESH519",
     "entrypoint vmodels.nets:three: forward on a [2, 24] input gave [2, 3], not [2, 2] (output_dim 2)"),
    ('        bottom: {entrypoint: "vmodels.nets:bottom", hidden: [4]}\n', None, "MESH518",
     "`hidden` does not apply to an entrypoint model (pass it in `args`)"),
    ('        bottom: {hidden: [4], args: {width: 3}}\n', None, "MESH518",
     "`args` is for an entrypoint factory; a built-in takes its own keys"),
    ('        bottom: {entrypoint: "vmodels/nets.py"}\n', None, "MESH518",
     "entrypoint 'vmodels/nets.py' is not `package.module:factory`"),
    (None, '    top: {entrypoint: "nowhere.nets:top"}\n', "MESH505",
     "entrypoint nowhere.nets:top: no module named 'nowhere' beside the mesh.yaml or on sys.path"),
])
def test_a_module_that_does_not_fit_is_refused_in_one_line(tmp_path, warm, lab, top, code, says):
    edits = [(LAB, lab)] if lab else []
    edits += [("    top: {hidden: [16]}\n", top)] if top else []
    result = compile_mesh(_mesh(tmp_path, warm, *edits))
    assert result.plan is None
    assert [(d.code, d.message) for d in result.errors] == [(code, says)], result.render_diagnostics()
