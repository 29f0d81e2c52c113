"""Models by entrypoint at compile time: code hash, introspection subprocess, its cache, the
diagnostics of a model that cannot be built, and policies over the code hash (issue 12)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import pytest

from meshctl.compiler import entrypoint
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanArchitecture
from meshctl.compiler.plandiff import diff_plans

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-cnn"
APPROVED = 'model.architecture.code_hash in ["sha256:'


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models cache after compiling the example once (its key does not depend on the folder)."""
    root = tmp_path_factory.mktemp("warm") / "m"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    assert compile_mesh(root / "mesh.yaml").plan is not None
    return root / ".meshctl" / "cache" / "models"


@pytest.fixture
def mesh(tmp_path: Path, warm: Path) -> Path:
    """A copy of examples/digits-cnn (mesh.yaml, digits_cnn/, data/) with a warm models cache."""
    shutil.copytree(EXAMPLE, tmp_path / "m", ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    shutil.copytree(warm, tmp_path / "m" / ".meshctl" / "cache" / "models")
    return tmp_path / "m" / "mesh.yaml"


def _errors(path: Path) -> list[tuple[str, str]]:
    return [(d.code, d.message) for d in compile_mesh(path).errors]


def _model(mesh: Path, text: str) -> None:
    (mesh.parent / "digits_cnn" / "model.py").write_text(text)


def test_the_plan_pins_the_code_and_records_the_modules_state(mesh):
    plan = compile_mesh(mesh).plan
    assert plan is not None
    job = plan.jobs[0]
    arch = job.architecture
    assert (arch.kind, arch.entrypoint, arch.args) == ("custom", "digits_cnn.model:build", '{"channels":16}')
    assert [f.path for f in arch.code.files] == ["digits_cnn/__init__.py", "digits_cnn/model.py"]
    assert arch.code.hash == entrypoint.code_record("digits_cnn.model:build", mesh.parent).hash
    assert [t.name for t in job.tensors] == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    assert job.tensors[0].shape == [16, 1, 3, 3] and job.tensors[4].shape == [10, 32 * 2 * 2]
    assert job.parameters == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 10 * 128 + 10


@pytest.mark.parametrize(("source", "code", "says"), [
    ("import not_a_module\n", "MESH505", "cannot import: ModuleNotFoundError: No module named 'not_a_module'"),
    ("build = 3\n", "MESH505", "digits_cnn.model:build is a int, not a callable"),
    ("def build(s, o, channels):\n    return 'a model'\n", "MESH505", "the factory returned str, not a torch.nn.Module"),
    ("from torch import nn\ndef build(s, o, channels):\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))\n",
     "MESH517", "state '1.num_batches_tracked' is int64; only float32 state is federated"),
    ("from torch import nn\ndef build(s, o, channels):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
     "MESH519", "forward on a [2, 1, 8, 8] input gave [2, 3], not [2, 10]"),
])
def test_a_model_that_cannot_be_built_is_refused_in_one_line(mesh, source, code, says):
    _model(mesh, source)
    errors = _errors(mesh)
    assert len(errors) == 1 and errors[0][0] == code and says in errors[0][1], errors
    assert "\n" not in errors[0][1] and errors[0][1].startswith("entrypoint digits_cnn.model:build: ")


def test_a_missing_package_and_a_malformed_entrypoint(mesh):
    text = mesh.read_text()
    mesh.write_text(text.replace('"digits_cnn.model:build"', '"nowhere.model:build"'))
    assert _errors(mesh) == [("MESH505", ("entrypoint nowhere.model:build: no module named 'nowhere' "
                                         "beside the mesh.yaml or on sys.path"))]
    mesh.write_text(text.replace('"digits_cnn.model:build"', '"digits_cnn.model.build"'))
    assert [c for c, _ in _errors(mesh)] == ["MESH518"]
    mesh.write_text(text.replace("args: {channels: 16}", "args: {channels: 16}\n      hidden: [3]"))
    assert [c for c, _ in _errors(mesh)] == ["MESH518"]


def test_an_allow_list_of_code_hashes_denies_other_code(mesh):
    assert _errors(mesh) == []  # the example approves its own hash
    _model(mesh, (mesh.parent / "digits_cnn" / "model.py").read_text() + "\n# an unreviewed change\n")
    assert _errors(mesh) == [("MESH410", ("policy 'approved-model-code' denies model 'digits-cnn': "
                                         "only reviewed model code runs (a built-in, or an entrypoint whose code hash is approved)"))]
    # parameters come from the module: a policy on them sees the real count
    text = mesh.read_text().replace(APPROVED, 'model.parameters == 6090 && ' + APPROVED)
    mesh.write_text(text.replace("the model's code is not", "not"))
    assert [c for c, _ in _errors(mesh)] == ["MESH410"]


def test_a_warm_compile_starts_no_subprocess_and_a_code_change_invalidates_it(mesh):
    shutil.rmtree(mesh.parent / ".meshctl")
    runs = entrypoint.RUNS
    first = compile_mesh(mesh).plan
    assert entrypoint.RUNS == runs + 1
    assert compile_mesh(mesh).plan == first and entrypoint.RUNS == runs + 1  # cached by code hash
    assert list((mesh.parent / ".meshctl" / "cache" / "models").glob("*.json"))
    _model(mesh, (mesh.parent / "digits_cnn" / "model.py").read_text().replace("channels: int = 16", "channels: int = 8"))
    text = mesh.read_text()
    mesh.write_text(text[:text.index("  - name: approved-model-code")] + text[text.index("  - name: small-models"):])
    second = compile_mesh(mesh).plan
    assert entrypoint.RUNS == runs + 2 and second.jobs[0].architecture.code != first.jobs[0].architecture.code
    # a reviewer sees the changed code hash in the plan diff
    changes = [c.render() for c in diff_plans(first, second) if c.kind == "job"]
    old, new = entrypoint.short_hash(first.jobs[0].architecture.code), entrypoint.short_hash(second.jobs[0].architecture.code)
    assert any(f"code {old}" in c and f"code {new}" in c for c in changes), changes


def test_builtin_cnn_and_logistic_need_no_subprocess(mesh):
    text = mesh.read_text()
    runs = entrypoint.RUNS
    mesh.write_text(text.replace('entrypoint: "digits_cnn.model:build"\n      args: {channels: 16}',
                                 "kind: cnn\n      channels: [8]\n      hidden: [16]"))
    job = compile_mesh(mesh).plan.jobs[0]
    assert job.architecture.kind == "cnn" and job.architecture.code is None
    assert [t.shape for t in job.tensors] == [[8, 1, 3, 3], [8], [16, 128], [16], [10, 16], [10]]
    mesh.write_text(text.replace('entrypoint: "digits_cnn.model:build"\n      args: {channels: 16}', "kind: logistic"))
    job = compile_mesh(mesh).plan.jobs[0]
    assert [t.shape for t in job.tensors] == [[10, 64], [10]] and entrypoint.RUNS == runs
    mesh.write_text(text.replace('entrypoint: "digits_cnn.model:build"\n      args: {channels: 16}',
                                 "kind: cnn\n      kernel: 4"))
    assert [c for c, _ in _errors(mesh)] == ["MESH518"]


def test_a_module_from_an_installed_distribution_is_pinned_by_its_record(tmp_path):
    import tomli_w

    code = entrypoint.code_record("tomli_w:dumps", tmp_path)
    assert code.distribution == f"tomli_w=={importlib.metadata.version('tomli_w')}"
    where = Path(tomli_w.__file__).parent.parent
    assert {f.path: f.sha256 for f in code.files} == {
        p.relative_to(where).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(tomli_w.__file__).parent.glob("*.py")}
    arch = PlanArchitecture(kind="custom", input_dim=1, hidden=[], output_dim=1, entrypoint="tomli_w:dumps",
                            args="{}", code=code)
    assert entrypoint.check_code(arch, tmp_path) is None
    forged = code.model_copy(update={"distribution": "tomli_w==0.0.1"})
    assert "distribution tomli_w==" in entrypoint.check_code(arch.model_copy(update={"code": forged}), tmp_path)


def test_policies_see_the_same_architecture_at_compile_time_and_in_the_domains(mesh):
    from meshctl.runtime.governance import job_activation

    plan = compile_mesh(mesh).plan
    facts = job_activation(plan, plan.jobs[0])
    assert facts["architecture"]["code_hash"] == plan.jobs[0].architecture.code.hash
    assert facts["architecture"]["entrypoint"] == "digits_cnn.model:build" and facts["parameters"] == 6090
    assert {d.policy: d.effect for d in plan.decisions}["approved-model-code"] == "allow"
