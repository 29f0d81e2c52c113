"""Plans built directly (the runtime reads plans, never specs) over the committed digits data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pg_server import pg_server  # noqa: F401  (a throwaway PostgreSQL server, session-scoped)

from meshctl.compiler.plan import (
    Plan,
    PlanArchitecture,
    PlanColumn,
    PlanCoordinator,
    PlanDomain,
    PlanEvaluation,
    PlanHeader,
    PlanJob,
    PlanProduct,
    PlanRead,
    PlanTraining,
    mlp_tensors,
)

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def digits_plan(n: int = 2, rounds: int = 3, remote: dict[str, str] | None = None,
                round_timeout_s: float = 60.0) -> Plan:
    """A plan over the first `n` digits clients; `remote` maps domain -> public key."""
    remote = remote or {}
    feats = [f"px{i}" for i in range(64)]
    classes = [str(i) for i in range(10)]
    cols = [PlanColumn(name=f, type="float") for f in feats] + [
        PlanColumn(name="label", type="category", values=classes), PlanColumn(name="split", type="string")]
    names = [f"client-{i}" for i in range(n)]
    domains = [PlanDomain(name=d, address="tcp://127.0.0.1:1" if d in remote else "local",
                          public_key=remote.get(d, "")) for d in names]
    products = [PlanProduct(id=f"{d}.digits", domain=d, name="digits", source=f"data/{d}.parquet",
                            format="parquet", columns=cols) for d in names]
    tensors = mlp_tensors(64, [32], 10)
    job = PlanJob(
        name="digits", participants=names,
        reads=[PlanRead(domain=d, product=f"{d}.digits", client_id=i) for i, d in enumerate(names)],
        features=feats, target="label", classes=classes,
        architecture=PlanArchitecture(input_dim=64, hidden=[32], output_dim=10), tensors=tensors,
        parameters=sum(math.prod(t.shape) for t in tensors),
        training=PlanTraining(rounds=rounds, lr=0.05, momentum=0.9),
        evaluation=PlanEvaluation(holdout_column="split", holdout_value="test"), quorum=n,
        round_timeout_s=round_timeout_s)
    return Plan(plan=PlanHeader(mesh="digits-test", meshctl_version="0.1.0", protocol_version=1, spec_hash="test"),
                coordinator=PlanCoordinator(address="tcp://127.0.0.1:0"), domains=domains, products=products,
                jobs=[job]).with_hash()


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    """A mesh.yaml path whose directory holds the digits data (so .meshctl/ lands in tmp)."""
    (tmp_path / "data").symlink_to(DIGITS / "data")
    path = tmp_path / "mesh.yaml"
    path.write_text("# plans in these tests are built directly\n")
    return path


@pytest.fixture
def make_plan():
    """The `digits_plan` builder."""
    return digits_plan
