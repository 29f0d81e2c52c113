"""A declared coordinator key is the run's key: a standalone daemon on its own "host", given only
what mesh.yaml declares, joins `meshctl up` and the job completes (real processes, real Curve)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from test_keys_cli import DIGITS, meshctl, two_domain_mesh


def _wait_for_manifest(runs: Path, up: subprocess.Popen[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(runs.glob("*/run.json")) if runs.is_dir() else []
        if found:
            try:
                return json.loads(found[-1].read_text())
            except ValueError:  # being written
                pass
        assert up.poll() is None, up.communicate()
        time.sleep(0.05)
    raise AssertionError("no run.json")


def test_up_runs_with_the_declared_coordinator_key_and_a_remote_daemon_trusts_it(tmp_path):
    hospital, coord = tmp_path / "hospital", tmp_path / "coordinator"
    (hospital / "data").mkdir(parents=True)
    (hospital / "data" / "client-1.parquet").symlink_to(DIGITS / "data" / "client-1.parquet")
    domain_line = meshctl("keys", "generate", "client-1", "--dir", str(hospital / "keys"), cwd=tmp_path).stdout
    coord_line = meshctl("keys", "generate", "coordinator", "--mesh", str(coord / "mesh.yaml"), cwd=tmp_path).stdout
    declared = coord_line.split('"')[1]
    mesh = two_domain_mesh(coord, ["address: tcp://127.0.0.1", domain_line.strip()], [coord_line.strip()])
    plan = hospital / "mesh.plan.toml"  # what the hospital compiles from its checkout of the same repo
    assert meshctl("plan", str(mesh), "-o", str(plan), cwd=tmp_path).returncode == 0

    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"],
                          cwd=coord, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon = None
    try:
        m = _wait_for_manifest(coord / ".meshctl" / "runs", up)
        assert m["coordinator_public"] == declared
        assert m["coordinator_key"] == str(coord / ".meshctl" / "keys" / "coordinator.key_secret")
        # the hospital knows the coordinator's key from mesh.yaml: --server-key is the DECLARED key
        daemon = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "daemon", "--plan", str(plan), "--domain", "client-1",
             "--coordinator", m["router"], "--server-key", declared, "--key",
             str(hospital / "keys" / "client-1.key_secret"), "--base-dir", str(hospital)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, err = up.communicate(timeout=120)
        daemon_out, _ = daemon.communicate(timeout=60)
    finally:
        for p in (up, daemon):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert up.returncode == 0, (out, err, daemon_out)
    assert daemon.returncode == 0, daemon_out
    assert "digits-mlp  round   2/2  participants 2" in out
    run_dir = Path(m["run_dir"])
    assert not (run_dir / "keys" / "coordinator.key_secret").exists(), "no ephemeral coordinator key was made"
    assert (coord / ".meshctl" / "keys" / "coordinator.key_secret").is_file(), "the declared secret stays"
    assert not list((run_dir / "keys").glob("*.key_secret")), "the run's ephemeral secrets are removed"


def test_a_daemon_takes_the_plans_coordinator_key_and_refuses_another(tmp_path):
    coord = tmp_path / "coordinator"
    line = meshctl("keys", "generate", "coordinator", "--mesh", str(coord / "mesh.yaml"), cwd=tmp_path).stdout
    domain = meshctl("keys", "generate", "client-1", "--dir", str(tmp_path / "k"), cwd=tmp_path).stdout
    mesh = two_domain_mesh(coord, ["address: tcp://127.0.0.1", domain.strip()], [line.strip()])
    plan = tmp_path / "mesh.plan.toml"
    assert meshctl("plan", str(mesh), "-o", str(plan), cwd=tmp_path).returncode == 0
    other = meshctl("keys", "generate", "x", "--dir", str(tmp_path / "k"), cwd=tmp_path).stdout.split('"')[1]
    base = ["daemon", "--plan", str(plan), "--domain", "client-1", "--coordinator", "tcp://127.0.0.1:1",
            "--key", str(tmp_path / "k" / "client-1.key_secret")]
    out = meshctl(*base, "--server-key", other, cwd=tmp_path)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "is not the coordinator key the plan declares" in out.stderr and "Traceback" not in out.stderr


def test_resume_keeps_the_declared_coordinator_key(tmp_path):
    import psutil

    coord = tmp_path / "coordinator"
    line = meshctl("keys", "generate", "coordinator", "--mesh", str(coord / "mesh.yaml"), cwd=tmp_path).stdout
    declared = line.split('"')[1]
    mesh = two_domain_mesh(coord, [], [line.strip()])
    (coord / "data" / "client-1.parquet").symlink_to(DIGITS / "data" / "client-1.parquet")
    mesh.write_text(mesh.read_text().replace("training: {rounds: 2,", "training: {rounds: 40,"))
    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"],
                          cwd=coord, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for out in up.stdout:
        if "round   3/40" in out:
            break
    procs = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # a forked process that ended on its own just now
            pass
    up.communicate(timeout=10)
    psutil.wait_procs(procs, timeout=10)
    [run] = list((coord / ".meshctl" / "runs").iterdir())

    wrong = meshctl("keys", "generate", "other", "--mesh", str(mesh), cwd=tmp_path)
    assert wrong.returncode == 0
    out = meshctl("resume", "latest", "--headless", "--mesh", str(mesh), "--coordinator-key",
                  str(coord / ".meshctl" / "keys" / "other.key_secret"), cwd=coord)
    assert out.returncode == 1 and "is not the coordinator key mesh.yaml declares" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    out = meshctl("resume", "latest", "--headless", "--mesh", str(mesh), cwd=coord)
    assert out.returncode == 0, out.stdout + out.stderr
    m = json.loads((run / "run.json").read_text())
    assert m["coordinator_public"] == declared
    assert m["coordinator_key"] == str(coord / ".meshctl" / "keys" / "coordinator.key_secret")
    assert (coord / ".meshctl" / "keys" / "coordinator.key_secret").is_file()
    assert not list((run / "keys").glob("*.key_secret"))
