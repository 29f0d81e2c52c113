"""The digits mesh spread over the namespaces of a `netlab.Lab`, as hospitals would run it: one
directory per host (`hosts/coordinator`, `hosts/client-0`, …) holding that host's checkout of
mesh.yaml, its own secret key and — for a domain — only its own data file.

`DOMAIN_COMMAND` is the one place that says how a domain host starts its daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from netlab import COORDINATOR_IP, SUBNET, Lab

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
PORT = 7710
ROUTER = f"tcp://{COORDINATOR_IP}:{PORT}"
MESHCTL = [sys.executable, "-m", "meshctl"]
DOMAINS = ["client-0", "client-1", "client-2"]
ROUNDS = 3
"""Rounds of the fault-free and impaired runs (and of the one-host reference)."""


def daemon_command(host: Path, domain: str) -> list[str]:
    """Today's one-shot domain daemon (docs/deploy.md): serves the run the coordinator runs, then exits."""
    return [*MESHCTL, "daemon", "--plan", str(host / "mesh.plan.toml"), "--domain", domain, "--coordinator", ROUTER,
            "--key", str(host / ".meshctl" / "keys" / f"{domain}.key_secret"), "--base-dir", str(host)]


def serve_command(host: Path, domain: str) -> list[str]:
    """The long-lived domain service of issue 10 (`meshctl serve`), compiled from the host's own mesh.yaml."""
    return [*MESHCTL, "serve", "--domain", domain, "--mesh", str(host / "mesh.yaml"), "--coordinator", ROUTER,
            "--key", str(host / ".meshctl" / "keys" / f"{domain}.key_secret"), "--data-root", str(host)]


DOMAIN_COMMAND: Callable[[Path, str], list[str]] = (
    daemon_command if os.environ.get("MESHCTL_MULTIHOST_DOMAIN") == "daemon" else serve_command)
"""How a domain host runs its domain: `meshctl serve` (the default), or today's one-shot `meshctl daemon`
with MESHCTL_MULTIHOST_DOMAIN=daemon (to compare the two)."""
ONE_SHOT = DOMAIN_COMMAND is daemon_command
"""A one-shot daemon exits after its run; a service stays up for the next one."""


def mesh_text(domains: list[str], rounds: int, remote: dict[str, str] | None, coordinator_key: str = "",
              quorum: int | None = None, round_timeout_s: float | None = None,
              local_epochs: int | None = None) -> str:
    """The digits example's mesh.yaml cut to `domains`; `remote` maps domain -> public key (None: all local)."""
    spec: dict[str, Any] = yaml.safe_load((DIGITS / "mesh.yaml").read_text())
    spec["mesh"]["coordinator"] = {"address": f"tcp://{COORDINATOR_IP if remote else '127.0.0.1'}:{PORT}"}
    if remote and coordinator_key:
        spec["mesh"]["coordinator"]["public_key"] = coordinator_key
    spec["domains"] = [d for d in spec["domains"] if d["name"] in domains]
    for i, d in enumerate(spec["domains"]):
        if remote:
            d["address"] = f"tcp://{SUBNET}.{10 + i}"
            d["public_key"] = remote[d["name"]]
    spec["products"] = [p for p in spec["products"] if p["domain"] in domains]
    model = spec["models"][0]
    model["training"]["rounds"] = rounds
    if quorum is not None:
        model["quorum"] = quorum
    if round_timeout_s is not None:
        model["round_timeout_s"] = round_timeout_s
    if local_epochs is not None:
        model["training"]["local_epochs"] = local_epochs
    return yaml.safe_dump(spec, sort_keys=False, width=200)


def meshctl(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*MESHCTL, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


def generate_keys(hosts: Path, domains: list[str]) -> dict[str, str]:
    """Each host makes its own key pair (`meshctl keys generate`); the public keys, as printed."""
    def one(name: str) -> tuple[str, str]:
        host = hosts / name
        host.mkdir(parents=True, exist_ok=True)
        line = meshctl("keys", "generate", name, "--mesh", str(host / "mesh.yaml")).stdout.strip()
        assert line.startswith("public_key: "), line
        return name, json.loads(line.removeprefix("public_key: "))

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, ["coordinator", *domains]))


@dataclass
class Mesh:
    """Host directories of one multi-host mesh (copied per test from a keyring)."""

    root: Path
    domains: list[str]
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    def host(self, domain: str) -> Path:
        return self.root / domain

    @classmethod
    def build(cls, keyring: Path, root: Path, domains: list[str], rounds: int, **model: Any) -> Mesh:
        """Copy the keyring's host directories to `root`, write the reviewed mesh.yaml into every host's
        checkout, give each domain host only its own data file, and compile the plan on each domain host."""
        shutil.copytree(keyring, root)
        keys = json.loads((root / "public_keys.json").read_text())
        text = mesh_text(domains, rounds, {d: keys[d] for d in domains}, keys["coordinator"], **model)
        mesh = cls(root, domains)
        for name in ["coordinator", *domains]:
            (root / name / "mesh.yaml").write_text(text)
        for d in domains:
            (mesh.host(d) / "data").mkdir()
            shutil.copy(DIGITS / "data" / f"{d}.parquet", mesh.host(d) / "data")
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda d: meshctl("plan", str(mesh.host(d) / "mesh.yaml")), domains))
        return mesh

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def start_coordinator(self, lab: Lab, *args: str) -> subprocess.Popen[str]:
        """`meshctl up --headless` (or `resume …`) on the coordinator host, in its own process group."""
        cmd = list(args) or ["up", str(self.coordinator / "mesh.yaml"), "--headless"]
        with open(self.coordinator / f"up-{len(self.procs)}.log", "w") as log:
            proc = lab.popen(lab.coordinator, [*MESHCTL, *cmd], cwd=self.coordinator, stdout=log,
                             stderr=subprocess.STDOUT, text=True, env=self._env(), start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_domain(self, lab: Lab, domain: str) -> subprocess.Popen[str]:
        """The domain's daemon on its own host (its namespace), dialling the coordinator."""
        host = self.host(domain)
        n = sum(1 for _ in host.glob("daemon-*.log"))
        with open(host / f"daemon-{n}.log", "w") as log:
            proc = lab.popen(lab.links[domain].netns, DOMAIN_COMMAND(host, domain), cwd=host, stdout=log,
                             stderr=subprocess.STDOUT, text=True, env=self._env(), start_new_session=True)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """Every log of this mesh's processes, for a failure message."""
        parts = []
        for f in sorted(self.root.glob("*/*.log")):
            parts.append(f"--- {f.relative_to(self.root)}\n{f.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGKILL every process group this mesh started that still runs."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def run_dir(self, timeout: float = 30.0) -> Path:
        """The newest run directory of the coordinator host (waits for its events.jsonl)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            runs = sorted((self.coordinator / ".meshctl" / "runs").glob("*/events.jsonl"))
            if runs:
                return runs[-1].parent
            time.sleep(0.2)
        raise AssertionError(f"no run started within {timeout:.0f}s\n{self.logs()}")


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def wait_event(run_dir: Path, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
               logs: Callable[[], str] = lambda: "") -> dict[str, Any]:
    """The first event of the run satisfying `pred`, polling events.jsonl up to `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in events(run_dir):
            if pred(e):
                return e
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:.0f}s\n{logs()}")


def wait(proc: subprocess.Popen[str], timeout: float, what: str, logs: Callable[[], str]) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} still runs after {timeout:.0f}s\n{logs()}") from None


def model(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "models").glob("*.safetensors"))
    assert files, f"no model in {run_dir / 'models'}"
    return load_file(str(files[0]))
