"""Fixtures of the multi-host tests: the namespaces (netlab.py), a key pair per host made once per
session, and the one-host reference run every multi-host run is compared with.

These tests need root (network namespaces). Without it they skip on a developer's machine and FAIL
in CI (the env var CI set), so the proof can never silently drop out of CI."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # netlab, meshlab, impair: test infrastructure beside this file

import meshlab
import netlab
from meshlab import DOMAINS, ROUNDS


@pytest.fixture(scope="session")
def namespaces_ok() -> None:
    why = netlab.available()
    if why is None:
        netlab.sweep()
        return
    if os.environ.get("CI"):
        pytest.fail(f"multi-host tests cannot run: {why}; CI must run them (as root)", pytrace=False)
    pytest.skip(f"multi-host tests need network namespaces: {why}")


@pytest.fixture(scope="session")
def keyring(namespaces_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hosts/<name>/.meshctl/keys/ for the coordinator and each domain, made by `meshctl keys generate`
    on each host's own directory, and public_keys.json (what each operator pasted into the PR)."""
    hosts = tmp_path_factory.mktemp("keyring")
    keys = meshlab.generate_keys(hosts, DOMAINS)
    (hosts / "public_keys.json").write_text(json.dumps(keys))
    return hosts


@pytest.fixture
def lab_factory() -> Iterator[type[netlab.Lab]]:
    """Labs made in the test are torn down after it, also when it fails."""
    made: list[netlab.Lab] = []

    class _Lab(netlab.Lab):
        def __enter__(self) -> Self:
            made.append(self)
            return super().__enter__()

    yield _Lab
    for lab in made:
        lab.close()


@pytest.fixture(scope="session")
def reference(namespaces_ok: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`meshctl up --headless` of the same mesh with every domain `local`, on one host (a namespace with
    only `lo`): its model tensors and its last round's metrics."""
    root = tmp_path_factory.mktemp("one-host")
    (root / "mesh.yaml").write_text(meshlab.mesh_text(DOMAINS, ROUNDS, remote=None))
    (root / "data").mkdir()
    for d in DOMAINS:
        (root / "data" / f"{d}.parquet").symlink_to(meshlab.DIGITS / "data" / f"{d}.parquet")
    with netlab.Lab([]) as lab:
        out = lab.run(lab.coordinator, [*meshlab.MESHCTL, "up", str(root / "mesh.yaml"), "--headless"],
                      timeout=120, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = max((root / ".meshctl" / "runs").glob("*/events.jsonl")).parent
    last = [e for e in meshlab.events(run_dir) if e["type"] == "round_completed"][-1]
    return {"model": meshlab.model(run_dir), "metrics": last["metrics"], "run_dir": run_dir}
