"""Split learning with `entrypoint:` bottom and top models (issue 15 on issue 12's custom models) on the
in-memory hub: each scripted domain is the real SplitDomain over examples/vertical's data (DuckDB);
a domain whose copy of the code differs from the plan's refuses the job in one line, before it reads
a row. The split protocol with custom modules equals the centralised network (the peer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sinks import ListSink
from split_hub import split_service

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import Coordinator, JobAborted
from meshctl.runtime.coordinator.split import top_path
from meshctl.runtime.domain.split import bottom_path
from meshctl.runtime.kernels.split import (
    BottomWorker,
    TopWorker,
    build_bottom,
    build_top,
    train_centralised,
    train_split_in_process,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "vertical"
NETS = '''\
from torch import nn


def bottom(input_shape, output_dim, width=6):
    assert output_dim is None  # a bottom chooses its width
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.Tanh(), nn.Linear(12, width))


def top(input_shape, output_dim, hidden=5):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, output_dim))
'''
EDITS = (("epochs: 30", "epochs: 1"), ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1"),
         ("        bottom: {hidden: [16], out: 8}\n",
          '        bottom: {entrypoint: "vmodels.nets:bottom", args: {width: 6}}\n'),
         ("    top: {hidden: [16]}\n", '    top: {entrypoint: "vmodels.nets:top", args: {hidden: 5}}\n'))


def _write(root: Path) -> Path:
    text = (EXAMPLE / "mesh.yaml").read_text()
    for old, new in EDITS:
        assert old in text, old
        text = text.replace(old, new, 1)
    shutil.copytree(EXAMPLE / "data", root / "data")
    (root / "vmodels").mkdir()
    (root / "vmodels" / "__init__.py").write_text("")
    (root / "vmodels" / "nets.py").write_text(NETS)
    (root / "mesh.yaml").write_text(text)
    return root / "mesh.yaml"


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models cache after one compile (its key does not depend on the folder)."""
    root = tmp_path_factory.mktemp("warm")
    assert compile_mesh(_write(root)).plan is not None
    return root / ".meshctl" / "cache" / "models"


def _room(tmp_path: Path, warm: Path) -> tuple[Coordinator, ListSink]:
    """examples/vertical, the lab's bottom and the top by entrypoint, served as the daemon does (daemon._split)."""
    shutil.copytree(warm, tmp_path / ".meshctl" / "cache" / "models")
    plan = compile_mesh(_write(tmp_path)).plan
    assert plan is not None
    return split_service(tmp_path, plan)


def test_a_custom_bottom_and_top_train_and_stay_where_they_belong(tmp_path, warm):
    c, sink = _room(tmp_path, warm)
    c._work()
    done = next(e for e in sink.events if isinstance(e, ev.JobCompleted))
    assert set(done.metrics) == {"loss", "accuracy"}
    path = bottom_path(tmp_path, "r1", "lab", "malignancy")
    with safe_open(str(path), "pt") as f:  # the weights name the code they fit
        assert f.metadata()["code_hash"] == c.plan.split_models[0].parts[0].architecture.code.hash
    lab = load_file(str(path))
    assert {k: list(v.shape) for k, v in lab.items()} == {"0.weight": [12, 10], "0.bias": [12],
                                                          "2.weight": [6, 12], "2.bias": [6]}
    top = load_file(str(top_path(tmp_path / "run", "malignancy")))
    assert {k: list(v.shape) for k, v in top.items()} == {"0.weight": [5, 22], "0.bias": [5],
                                                          "2.weight": [2, 5], "2.bias": [2]}


def test_a_domain_whose_code_differs_from_the_plans_refuses_the_job(tmp_path, warm):
    c, sink = _room(tmp_path, warm)
    (tmp_path / "vmodels" / "nets.py").write_text(NETS.replace("nn.Tanh()", "nn.ReLU()"))
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain lab refused: model code file vmodels/nets.py "
                                         r"differs from the plan's \(sha256 [0-9a-f]{12} here, [0-9a-f]{12} in the plan\)"):
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.IntersectionComputed)]
    assert not bottom_path(tmp_path, "r1", "lab", "malignancy").exists()


def test_split_with_custom_modules_equals_the_centralised_network(tmp_path):
    _write(tmp_path)
    root = str(tmp_path)
    torch.manual_seed(1)
    parts, y = [torch.randn(40, 3), torch.randn(40, 2)], torch.randint(0, 2, (40,))
    custom = {"kind": "custom", "entrypoint": "vmodels.nets:bottom", "args": '{"width":4}'}
    top_arch = {"kind": "custom", "entrypoint": "vmodels.nets:top", "args": {"hidden": 5}}

    def models() -> tuple[list[torch.nn.Module], torch.nn.Module]:
        bottoms = [build_bottom(custom, 3, 0, root=root), build_bottom({"kind": "mlp", "hidden": [4], "out": 3}, 2, 1)]
        return bottoms, build_top(top_arch, 7, 2, 2, root=root)

    opt = {"name": "sgd", "lr": 0.1}
    bottoms, top = models()
    train_centralised(bottoms, top, parts, y, epochs=2, batch_size=8, optimizer=opt)
    split_bottoms, split_top = models()
    workers = [BottomWorker(b, opt) for b in split_bottoms]
    train_split_in_process(workers, TopWorker(split_top, None, "cross_entropy", opt), parts, y, epochs=2, batch_size=8)
    for a, b in zip([*bottoms, top], [*split_bottoms, split_top]):
        for (name, x), (_, z) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6, msg=name)
