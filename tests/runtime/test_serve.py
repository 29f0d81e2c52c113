"""`meshctl serve` (issue 10, "Domain services that stay up"): a remote domain runs as a long-lived
service that dials out, waits for the coordinator, reconnects, and serves run after run.

Real processes over loopback: `meshctl up --headless` on the "coordinator host" (a directory with
the mesh, the local domain's data and the coordinator's secret), `meshctl serve` on the "hospital
host" (its own checkout of the mesh, its own key, its data under --data-root). Keys come from
`meshctl keys generate`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from meshctl.cli import main

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits" / "data"
REMOTE = "client-1"
COLUMNS = [{"name": f"px{i}", "type": "float"} for i in range(64)] + [
    {"name": "label", "type": "category", "values": list(range(10))}, {"name": "split", "type": "string"}]
ENV = {**os.environ, "MESHCTL_HEARTBEAT_TIMEOUT_S": "4", "MESHCTL_RECONNECT_MAX_S": "2", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    """A port that is free, and the next one too (`up` binds its events socket on port + 1), from below
    the kernel's ephemeral range: a port from that range (a bind to port 0) can be taken as the local
    port of any outgoing connection on the machine before the coordinator binds it seconds later (a CI
    run failed so: `Address already in use`)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, low - 1)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two free ports in a row")


def _mesh(port: int, keys: dict[str, str], rounds: int = 2, dp: bool = True, epochs: int = 1,
          hidden: tuple[int, ...] = (16,), quorum: int | None = None) -> dict:
    """client-0 local (forked by `up`), client-1 remote (a service); DP, so each run books ε."""
    domains = [{"name": "client-0", "owner": "a@x.example", "jurisdiction": "eu", "address": "local"},
               {"name": REMOTE, "owner": "b@x.example", "jurisdiction": "eu", "address": "tcp://127.0.0.1",
                "public_key": keys[REMOTE]}]
    model = {"name": "digits", "purpose": "benchmark",
             "inputs": {"contract": "digits", "features": ["px*"], "target": "label"},
             "participants": "all", "architecture": {"kind": "mlp", "hidden": list(hidden)},
             "training": {"rounds": rounds, "local_epochs": epochs, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                          "seed": 0},
             "aggregation": {"strategy": "fedavg"},
             "evaluation": {"holdout_column": "split", "holdout_value": "test", "metrics": ["loss", "accuracy"]}}
    if quorum is not None:
        model["quorum"] = quorum
    if dp:
        model["privacy"] = {"dp": {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0}}
    products = [{"name": "digits", "domain": d["name"], "source": f"data/{d['name']}.parquet",
                 "classification": "internal", "contract": "digits@1", "columns": COLUMNS,
                 **({"epsilon_budget": 100.0} if dp else {})} for d in domains]
    return {"apiVersion": "meshctl/v1",
            "mesh": {"name": "serve-test", "coordinator": {"address": f"tcp://127.0.0.1:{port}",
                                                          "public_key": keys["coordinator"]}},
            "domains": domains, "products": products,
            "contracts": [{"name": "digits", "version": "1.0.0", "purposes": ["benchmark"], "columns": COLUMNS}],
            "models": [model]}


def _keys_generate(name: str, mesh: Path) -> str:
    """`meshctl keys generate NAME --mesh MESH`: the public key it prints for mesh.yaml."""
    mesh.parent.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(main, ["keys", "generate", name, "--mesh", str(mesh)])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)["public_key"]


class Hosts:
    """The coordinator host's directory and the hospital host's checkout, data root and service."""

    def __init__(self, tmp: Path, **mesh_args):
        self.coord, self.hosp, self.data_root = tmp / "coord", tmp / "hospital", tmp / "hospital-data"
        self.port = _free_port()
        keys = {"coordinator": _keys_generate("coordinator", self.coord / "mesh.yaml"),
                REMOTE: _keys_generate(REMOTE, self.hosp / "mesh.yaml")}
        self.spec = _mesh(self.port, keys, **mesh_args)
        self.text = yaml.safe_dump(self.spec, sort_keys=False)
        for host in (self.coord, self.hosp):  # the reviewed repo, checked out on both hosts
            (host / "mesh.yaml").write_text(self.text)
            (host / "data").mkdir()
            shutil.copy(DIGITS / "client-0.parquet", host / "data")  # the local domain's committed data
        (self.data_root / "data").mkdir(parents=True)  # the hospital's own data lives elsewhere
        shutil.copy(DIGITS / f"{REMOTE}.parquet", self.data_root / "data")

    def serve(self, *extra: str) -> Proc:
        return Proc([sys.executable, "-m", "meshctl", "serve", "--domain", REMOTE, "--mesh",
                     str(self.hosp / "mesh.yaml"), "--data-root", str(self.data_root), *extra], cwd=self.hosp)

    def up(self) -> Proc:
        return Proc([sys.executable, "-m", "meshctl", "up", "--headless", "mesh.yaml"], cwd=self.coord)

    def runs(self) -> list[Path]:
        return sorted(p for p in (self.coord / ".meshctl" / "runs").iterdir() if p.is_dir())

    def events(self, run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


class Proc:
    """A process whose stdout and stderr lines are collected as they come."""

    def __init__(self, argv: list[str], cwd: Path):
        self.p = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))
            if os.environ.get("SERVE_DEBUG"):  # watch the processes talk: SERVE_DEBUG=1 pytest -s
                print(f"{time.monotonic():.1f} {self.p.pid} {line.rstrip()}", file=sys.__stderr__)

    def wait_for(self, text: str, timeout: float = 90.0, after: int = 0, peer: Proc | None = None) -> int:
        """Index of the first line (from `after`) containing `text`; fails after `timeout`, or as soon
        as `peer` (the `up` this line waits on) has exited."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, line in enumerate(self.lines[after:], after):
                if text in line:
                    return i
            assert self.p.poll() is None or self.reader.is_alive(), f"exited before {text!r}:\n{self.text}"
            assert peer is None or peer.p.poll() is None, f"{peer.p.args[3:]} exited before {text!r}:\n" \
                f"{peer.text}\n---\n{self.text}"
            time.sleep(0.1)
        pytest.fail(f"no {text!r} within {timeout}s:\n{self.text}")

    def finish(self, timeout: float = 90.0) -> int:
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(f"still running after {timeout}s:\n{self.text}")
        self.reader.join(5)
        return code

    def kill_tree(self) -> None:
        """kill -9 of this process and everything it started (a coordinator runs in its own session):
        all are stopped first, until no new one appears, so none can fork or resume on the way."""
        stopped: dict[int, psutil.Process] = {}
        for _ in range(10):
            try:
                root = psutil.Process(self.p.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            new = [proc for proc in procs if proc.pid not in stopped]
            if not new:
                break
            for proc in new:
                try:
                    proc.suspend()
                    stopped[proc.pid] = proc
                except psutil.NoSuchProcess:
                    pass
        for proc in stopped.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(stopped.values()), timeout=10)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.finish(30)

    @property
    def text(self) -> str:
        return "\n".join(self.lines[-60:])


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path)
    yield h


def _served(hosts: Hosts, run: Path) -> list[int]:
    """Rounds in which the remote domain's update was received in `run`."""
    return [e["round"] for e in hosts.events(run) if e["type"] == "update_received" and e["domain"] == REMOTE]


def test_a_service_started_before_up_serves_run_after_run_and_outlives_a_killed_coordinator(tmp_path):
    from meshctl.runtime.ledger import Ledger, ledger_path

    # 40 rounds: the run killed below must still be training when the kill lands (2 rounds finished
    # before it on a quiet machine); each run is still a few seconds
    hosts = Hosts(tmp_path, rounds=40)
    service = hosts.serve()
    try:
        service.wait_for("connecting to tcp://127.0.0.1:")  # it waits for a coordinator that is not there yet
        up = hosts.up()
        assert up.finish() == 0, up.text
        service.wait_for("waiting for the next run")
        # the coordinator dies (kill -9 of `up` and all it started) in the middle of the next run ...
        mark = len(service.lines)
        up = hosts.up()
        service.wait_for("job digits round 1: trained", after=mark, peer=up)
        up.kill_tree()
        service.wait_for("lost the coordinator (its connection closed); reconnecting", after=mark)
        # ... and the run after it is served by the same, untouched, service process
        up = hosts.up()
        assert up.finish() == 0, up.text
        service.wait_for("reconnected", after=mark)
        service.wait_for("waiting for the next run", after=mark)
        assert service.p.poll() is None
    finally:
        code = service.stop()
    assert code == 0, service.text
    assert service.lines[-1] == "stopped by SIGTERM"
    assert not any("Traceback" in line for line in service.lines), service.text
    runs = hosts.runs()
    assert len(runs) == 3
    completed = [r for r in runs if any(e["type"] == "run_completed" and e["ok"] for e in hosts.events(r))]
    assert len(completed) == 2
    for run in completed:
        assert _served(hosts, run) == list(range(1, 41)), run
    joined = [line.split()[2] for line in service.lines if line.startswith("joined run ")]
    assert joined == [r.name for r in runs]  # three runs, one after another, each joined once
    # each run booked in the domain's own ledger (under its data root) as its own run
    ledger = Ledger(ledger_path(hosts.data_root))
    product = f"{REMOTE}.digits"
    first, last = (ledger.spent(product, run=r.name) for r in completed)
    assert first > 0 and last == pytest.approx(first)  # a new run spends the job's ε anew, never as a resume
    assert not (hosts.hosp / ".meshctl" / "ledger.db").exists()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@x.example", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_a_service_follows_a_key_rotation_and_an_out_of_date_plan_without_a_restart(hosts):
    from meshctl.runtime.keys import KeyPair, fingerprint

    mesh = hosts.hosp / "mesh.yaml"
    _git(hosts.hosp, "init", "-q")
    _git(hosts.hosp, "add", "mesh.yaml")
    _git(hosts.hosp, "commit", "-qm", "the mesh the coordinator runs")
    ahead = hosts.text.replace("rounds: 2", "rounds: 3")  # a reviewed change the coordinator has not pulled
    assert ahead != hosts.text and len(ahead) == len(hosts.text)
    mesh.write_text(ahead)
    _git(hosts.hosp, "commit", "-qam", "three rounds")
    # this host has not pulled the coordinator's key rotation yet: it trusts the old key
    new_key = hosts.spec["mesh"]["coordinator"]["public_key"]
    while True:  # a key that the plain textual swap leaves valid YAML (z85 has [, ], { and })
        old_key = KeyPair.generate().public.decode()
        try:
            if yaml.safe_load(ahead.replace(new_key, old_key))["mesh"]["coordinator"]["public_key"] == old_key:
                break
        except yaml.YAMLError:
            continue
    mesh.write_text(ahead.replace(new_key, old_key))
    service = hosts.serve()
    up = None
    try:
        service.wait_for("connecting to tcp://127.0.0.1:")
        up = hosts.up()
        i = service.wait_for(f"refused: Curve handshake with tcp://127.0.0.1:{hosts.port} failed", peer=up)
        assert f"fingerprint {fingerprint(old_key)}" in service.lines[i]
        mesh.write_text(ahead)  # git pull: the rotated key arrives (a changed file, no signal)
        i = service.wait_for("reloaded mesh.yaml: plan sha256:", after=i)
        i = service.wait_for("plan out of date: the coordinator runs plan sha256:", after=i)
        assert "the coordinator is behind: it runs commit " in service.lines[i], service.lines[i]
        time.sleep(2.0)
        assert service.p.poll() is None  # refused, and still there
        assert not any(line.startswith("joined run") for line in service.lines)
        # the operator puts the mesh back (same size, same mtime: only SIGHUP can tell) and signals
        before = mesh.stat()
        with mesh.open("r+") as f:
            f.write(hosts.text)
        os.utime(mesh, ns=(before.st_atime_ns, before.st_mtime_ns))
        service.p.send_signal(signal.SIGHUP)
        service.wait_for("reloaded mesh.yaml: plan sha256:", after=i)
        service.wait_for("joined run ", after=i)
        assert up.finish() == 0, up.text
    finally:
        if up is not None and up.p.poll() is None:
            up.kill_tree()
        code = service.stop()
    assert code == 0, service.text
    run, = hosts.runs()
    assert _served(hosts, run) == [1, 2]


def test_the_service_reloads_a_changed_mesh_file_between_runs(hosts):
    # in-process: the file check, without SIGHUP (the wire is covered above)
    from meshctl.runtime.domain.service import Service, ServiceConfig, compile_view

    cfg = ServiceConfig(domain=REMOTE, mesh=hosts.hosp / "mesh.yaml", data_root=hosts.data_root)
    service = Service(cfg)
    service.view = compile_view(cfg)
    old = service.view.plan.plan.hash
    assert service._maybe_reload() is False  # nothing changed
    cfg.mesh.write_text(hosts.text.replace("rounds: 2", "rounds: 4"))
    service.next_check = 0.0
    assert service._maybe_reload() is True
    assert service.view.plan.plan.hash != old
    assert service.view.plan.jobs[0].training.rounds == 4
    cfg.mesh.write_text("not: [a mesh")  # a broken edit keeps the plan being served
    service.next_check = 0.0
    assert service._maybe_reload() is False
    assert service.view.plan.jobs[0].training.rounds == 4


def test_the_service_reloads_when_an_included_file_changes_or_appears(hosts):
    """A mesh split into domain-owned files (`include:`): an edit of an included file, or a new file
    that an include glob matches, is a changed mesh too."""
    from meshctl.runtime.domain.service import Service, ServiceConfig, compile_view

    spec = dict(hosts.spec)
    products = spec.pop("products")
    spec["include"] = ["parts/*.yaml"]
    parts = hosts.hosp / "parts"
    parts.mkdir()
    (parts / "a.yaml").write_text(yaml.safe_dump({"products": products[:1]}, sort_keys=False))
    (hosts.hosp / "mesh.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = ServiceConfig(domain=REMOTE, mesh=hosts.hosp / "mesh.yaml", data_root=hosts.data_root)
    service = Service(cfg)
    service.view = compile_view(cfg)  # client-1's product is in no file yet: the model reads one product
    reads = len(service.view.plan.jobs[0].reads)
    assert reads == 1
    (parts / "b.yaml").write_text(yaml.safe_dump({"products": products[1:]}, sort_keys=False))  # a new file
    service.next_check = 0.0
    assert service._maybe_reload() is True
    assert len(service.view.plan.jobs[0].reads) == reads + 1
    old = service.view.plan.plan.hash
    (parts / "b.yaml").write_text(yaml.safe_dump({"products": [{**products[1], "classification": "restricted"}]},
                                                 sort_keys=False))  # an edit of an included file
    service.next_check = 0.0
    assert service._maybe_reload() is True and service.view.plan.plan.hash != old
    service.next_check = 0.0
    assert service._maybe_reload() is False  # nothing changed since


def _no_coordinator_key(spec: dict) -> None:
    del spec["mesh"]["coordinator"]["public_key"]


def _bind_address(spec: dict) -> None:
    spec["mesh"]["coordinator"]["address"] = "tcp://0.0.0.0:7700"


@pytest.mark.parametrize(("edit", "args", "says"), [
    (_no_coordinator_key, (), "the mesh declares no mesh.coordinator.public_key: a domain service needs"),
    (_bind_address, (), "mesh.coordinator.address tcp://0.0.0.0:7700 is where the coordinator binds"),
    (None, ("--coordinator", "127.0.0.1:7700"), "--coordinator '127.0.0.1:7700' is not tcp://HOST:PORT"),
    (None, ("--domain", "nowhere"), "domain 'nowhere' is not in the mesh (its domains: client-0, client-1)"),
    (None, ("--key", "missing.key_secret"), "missing.key_secret: error: cannot read key file"),
])
def test_a_service_that_cannot_work_says_why_in_one_line(hosts, edit, args, says):
    spec = yaml.safe_load(hosts.text)
    if edit is not None:
        edit(spec)
    mesh = hosts.hosp / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(spec, sort_keys=False))
    domain = () if "--domain" in args else ("--domain", REMOTE)
    result = CliRunner().invoke(main, ["serve", *domain, "--mesh", str(mesh), *args])
    assert result.exit_code == 1, result.output
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_reconnection_delays_grow_to_a_cap_with_jitter():
    import random

    from meshctl.runtime.domain.service import BACKOFF_BASE_S, backoff

    rng = random.Random(1)
    delays = [[backoff(n, rng, cap=8.0) for _ in range(200)] for n in range(8)]
    for n, got in enumerate(delays):
        ceiling = min(8.0, BACKOFF_BASE_S * 2 ** n)
        assert all(ceiling / 2 <= d <= ceiling for d in got), n
        assert max(got) - min(got) > ceiling / 4  # jitter: two domains rarely dial in the same instant
    assert max(delays[-1]) <= 8.0


def _one_run_daemon(plan, tmp_path: Path, mesh_file: Path, server, client, port: int) -> Proc:
    """`meshctl daemon` for client-0 of `plan`, dialling tcp://127.0.0.1:PORT with `server`'s key."""
    plan_file = tmp_path / "plan.toml"
    plan.write(plan_file)
    key_file = client.save(tmp_path / "keys", "client-0")
    return Proc([sys.executable, "-m", "meshctl", "daemon", "--plan", str(plan_file), "--domain", "client-0",
                 "--coordinator", f"tcp://127.0.0.1:{port}", "--server-key", server.public.decode(),
                 "--key", str(key_file), "--base-dir", str(mesh_file.parent)], cwd=tmp_path)


def _joined(coord, plan) -> None:
    """The fake coordinator's side of Knock -> RunInfo -> Hello -> Welcome, for run r-1."""
    from meshctl.runtime import wire

    identity, _ = coord.receive(wire.Knock)
    coord.send(identity, wire.RunInfo(run="r-1", plan_hash=plan.plan.hash))
    identity, _ = coord.receive(wire.Hello)
    coord.send(identity, wire.Welcome(run="r-1", plan_hash=plan.plan.hash))


def test_a_one_run_daemon_that_loses_its_coordinator_exits_with_one_line(make_plan, tmp_path, mesh_file,
                                                                         monkeypatch):
    # before: `meshctl daemon` said "lost the coordinator" and then waited forever, silently
    import re

    from test_remote_run import _FakeCoordinator

    from meshctl.runtime.keys import KeyPair

    monkeypatch.setitem(ENV, "MESHCTL_HEARTBEAT_TIMEOUT_S", "2")
    plan = make_plan(n=2)
    server, client = KeyPair.generate(), KeyPair.generate()
    coord = _FakeCoordinator(server, client)
    daemon = _one_run_daemon(plan, tmp_path, mesh_file, server, client, coord.port)
    try:
        _joined(coord, plan)
        daemon.wait_for("joined run r-1")
    finally:
        coord.close()  # the coordinator is gone and does not come back
    try:
        code = daemon.p.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill_tree()
        pytest.fail(f"the daemon still waits for a coordinator that is gone:\n{daemon.text}")
    daemon.reader.join(5)
    assert code == 1, daemon.text
    assert "lost the coordinator (its connection closed); reconnecting" in daemon.lines
    assert re.fullmatch(rf"error: lost the coordinator at tcp://127\.0\.0\.1:{coord.port}: no connection for "
                        r"[23]s \(hint: `meshctl serve` reconnects and serves run after run\)", daemon.lines[-1]), \
        daemon.text


def test_a_service_rejoins_its_run_when_a_killed_coordinator_is_resumed(tmp_path):
    # the coordinator proper dies (kill -9), its supervisor resumes the same run from the newest
    # checkpoint: the service reconnects by itself, says Hello again and the run goes on with it
    hosts = Hosts(tmp_path, rounds=8, dp=False, epochs=10, hidden=(256, 256))
    service = hosts.serve()
    up = hosts.up()
    try:
        service.wait_for("job digits round 2: trained")
        supervisor = next(c for c in psutil.Process(up.p.pid).children() if "coordinator" in " ".join(c.cmdline()))
        proper = supervisor.children()[0]
        proper.kill()
        assert up.finish(120) == 0, up.text
        service.wait_for("rejoining run ")
    finally:
        if up.p.poll() is None:
            up.kill_tree()
        service.stop()
    run, = hosts.runs()
    events = hosts.events(run)
    assert any(e["type"] == "run_resumed" for e in events)
    resumed_at = next(i for i, e in enumerate(events) if e["type"] == "run_resumed")
    after = [e["round"] for e in events[resumed_at:] if e["type"] == "update_received" and e["domain"] == REMOTE]
    assert after and after[-1] == 8, after
    lines = service.lines
    assert lines.index("lost the coordinator (its connection closed); reconnecting") < lines.index("reconnected")
    assert sum(line.startswith(f"joined run {run.name} ") for line in lines) == 2


def test_a_service_killed_mid_job_and_restarted_contributes_again(tmp_path):
    # the coordinator re-admits a domain that says Hello again on a new connection (a restart); the
    # restarted service knocks, learns the same run and says Hello. Quorum is both domains, so the
    # round it was lost in waits for it (up to the round timeout): with quorum 1 the run could end
    # before a slow restart (a loaded CI machine) was back, and the test would fail on timing
    hosts = Hosts(tmp_path, rounds=8, dp=False, epochs=10, hidden=(256, 256))
    service = hosts.serve()
    up = hosts.up()
    try:
        service.wait_for("job digits round 2: trained", peer=up)
        service.kill_tree()  # kill -9 mid-job ...
        service = hosts.serve()  # ... and the operator (or systemd) starts it again
        service.wait_for("joined run ", peer=up)
        assert up.finish(120) == 0, up.text
    finally:
        if up.p.poll() is None:
            up.kill_tree()
        service.stop()
    run, = hosts.runs()
    assert any(line.startswith(f"joined run {run.name} ") for line in service.lines), service.text
    rounds = _served(hosts, run)
    assert rounds[:2] == [1, 2]
    assert any(r > 3 for r in rounds[2:]), (rounds, service.text)  # it contributed again in a later round


class _Relay:
    """A TCP relay between a daemon and its coordinator that can go silent without closing (a
    partition: no FIN, no RST), the failure only heartbeats can see."""

    def __init__(self, target: int):
        self.target, self.frozen = target, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.frozen.is_set():
                continue  # held open, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.frozen.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data or self.frozen.is_set():
                return
            dst.sendall(data)
        # frozen: keep both sockets open and say nothing more


def test_a_link_that_goes_silent_without_closing_is_noticed_by_heartbeats(make_plan, tmp_path, mesh_file,
                                                                          monkeypatch):
    # before: a partition (no FIN) left the daemon waiting forever without a word
    from test_remote_run import _FakeCoordinator

    from meshctl.runtime.keys import KeyPair

    monkeypatch.setitem(ENV, "MESHCTL_HEARTBEAT_TIMEOUT_S", "2")
    plan = make_plan(n=2)
    server, client = KeyPair.generate(), KeyPair.generate()
    coord = _FakeCoordinator(server, client)
    relay = _Relay(coord.port)
    daemon = _one_run_daemon(plan, tmp_path, mesh_file, server, client, relay.port)
    try:
        _joined(coord, plan)
        i = daemon.wait_for("joined run r-1")
        relay.frozen.set()  # the coordinator is still up, its link is not
        daemon.wait_for("lost the coordinator (its connection closed); reconnecting", timeout=20, after=i)
        code = daemon.finish(20)
    finally:
        daemon.kill_tree()
        coord.close()
    assert code == 1, daemon.text
    assert daemon.lines[-1].startswith(f"error: lost the coordinator at tcp://127.0.0.1:{relay.port}: "), daemon.text
