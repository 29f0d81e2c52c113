"""Remote daemons learn the run (issue 10): a standalone `meshctl daemon` asks the coordinator which
run it serves (Knock -> RunInfo) before it decides anything bound to the run, so secure aggregation
in a mesh of local and remote domains equals an all-local run, and the privacy ledger books each run
under its own id. The daemon says what it does, one line per state change, on stderr."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meshctl.compiler.plan import PlanDp, PlanPrivacy
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.keys import KeyPair
from meshctl.runtime.launcher import start_run
from meshctl.runtime.ledger import Ledger, ledger_path

REMOTE = "client-2"


def _secure(plan):
    job = plan.jobs[0].model_copy(update={"privacy": PlanPrivacy(secure_aggregation=True)})
    return plan.model_copy(update={"jobs": [job]}).with_hash()


def _dp(plan, budget: float):
    job = plan.jobs[0].model_copy(update={"privacy": PlanPrivacy(dp=PlanDp(epsilon=1.0, delta=1e-5, clip=1.0))})
    products = [p.model_copy(update={"epsilon_budget": budget}) for p in plan.products]
    return plan.model_copy(update={"jobs": [job], "products": products}).with_hash()


def _daemon(run, key_file) -> subprocess.Popen:
    """`meshctl daemon` for the remote domain, as its operator would start it: no run id given."""
    return subprocess.Popen(
        [sys.executable, "-m", "meshctl", "daemon", "--plan", str(run.m.path / "plan.toml"), "--domain", REMOTE,
         "--coordinator", run.m.router, "--server-key", run.m.coordinator_public, "--key", str(key_file),
         "--base-dir", run.m.base_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(mesh_file, plan, key_file=None):
    """(result, events, the remote daemon's stderr or "") of one run of `plan`."""
    run = start_run(mesh_file, plan)
    daemon = _daemon(run, key_file) if key_file else None
    events = list(run.follow())
    result = run.finish()
    err = ""
    if daemon is not None:
        try:
            _, err = daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            _, err = daemon.communicate()
            pytest.fail(f"the remote daemon still runs after the run ({result.ok=}, {result.reason}): {err[-2000:]}")
        assert daemon.returncode == 0, err
    return result, events, err, run.m.run


def _model(result) -> dict[str, torch.Tensor]:
    return load_file(str(next((result.run_dir / "models").glob("*.safetensors"))))


def test_secure_aggregation_with_a_remote_daemon_equals_the_all_local_run(mesh_file, make_plan, tmp_path):
    # before: the remote daemon masked under run "" while the others used the run id, so the masks
    # did not cancel (accuracy 0.34, loss 1e31); now it learns the run id before it masks anything
    local, local_events, _, _ = _run(mesh_file, _secure(make_plan(n=4, rounds=3)))
    assert local.ok, local.reason
    keys = KeyPair.generate()
    key_file = keys.save(tmp_path / "keys", REMOTE)
    plan = _secure(make_plan(n=4, rounds=3, remote={REMOTE: keys.public.decode()}))
    mixed, events, err, run_id = _run(mesh_file, plan, key_file)
    assert mixed.ok, mixed.reason
    want = [e for e in local_events if isinstance(e, ev.RoundCompleted)]
    got = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert len(got) == len(want) == 3
    assert REMOTE in got[-1].participants
    for a, b in zip(want, got, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, abs=1e-6)
        for name in ("loss", "accuracy"):
            assert b.metrics[name] == pytest.approx(a.metrics[name], abs=1e-6), (b.round, name)
    a, b = _model(local), _model(mixed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # the remote daemon's own story, one line per state change, without data values
    lines = err.splitlines()
    assert lines[0].startswith(f"connecting to {plan_router(mixed)} (coordinator key ")
    assert f"joined run {run_id} (plan {plan.plan.hash[:19]}…; jobs: digits)" in lines
    for rnd in (1, 2, 3):
        assert any(line.startswith(f"job digits round {rnd}: trained ") and " examples, loss " in line
                   for line in lines), err
    assert lines[-1].startswith("coordinator said shutdown: "), err
    # a local (forked) daemon tells the same story in its log
    log = (mixed.run_dir / "logs" / "client-0.log").read_text().splitlines()
    assert f"joined run {run_id} (plan {plan.plan.hash[:19]}…; jobs: digits)" in log
    assert sum(line.startswith("job digits round ") for line in log) == 3


def plan_router(result) -> str:
    from meshctl.runtime.run import RunManifest

    return RunManifest.read(result.run_dir).router


def test_two_runs_with_a_remote_daemon_are_booked_each_under_its_own_run(mesh_file, make_plan, tmp_path):
    # before: both runs were booked under run "", and the second was charged as a resume of the first
    keys = KeyPair.generate()
    key_file = keys.save(tmp_path / "keys", REMOTE)
    plan = _dp(make_plan(n=3, rounds=2, remote={REMOTE: keys.public.decode()}), budget=10.0)
    ledger = Ledger(ledger_path(mesh_file.parent))
    runs, lines = [], []
    for _ in range(2):
        result, _, err, run_id = _run(mesh_file, plan, key_file)
        assert result.ok, result.reason
        runs.append(run_id)
        lines.append(err)
    product = f"{REMOTE}.digits"
    assert runs[0] != runs[1]
    assert ledger.spent(product, run="") == 0.0
    assert ledger.count(product, subject="model:digits", run=runs[0]) == 2
    assert ledger.count(product, subject="model:digits", run=runs[1]) == 2
    first, second = (ledger.spent(product, run=r) for r in runs)
    assert 0.9 < first <= 1.0 + 1e-9
    assert second == pytest.approx(first, abs=1e-9)  # a fresh run spends the job's ε again, as the first did
    assert ledger.spent(product) == pytest.approx(first + second)
    # its admission reserved the job's ε under the run's id too (and released it when the daemon exited)
    import sqlite3

    with sqlite3.connect(ledger.path) as con:
        held = con.execute("SELECT run, released IS NOT NULL FROM reservations WHERE product = ? ORDER BY ts",
                           (product,)).fetchall()
    assert held == [(runs[0], 1), (runs[1], 1)]
    # booked under the same run ids as the local domains' charges
    assert all(ledger.count("client-0.digits", subject="model:digits", run=r) == 2 for r in runs)
    for run_id, err in zip(runs, lines, strict=True):
        assert f"joined run {run_id} " in err


def test_knock_is_answered_with_the_run_and_plan_hash_and_welcome_carries_the_plan():
    # the wire: a Knock round-trips, and so do RunInfo and Welcome with their plan hashes
    for msg in (wire.Knock(sender="d"), wire.RunInfo(run="r1", plan_hash="sha256:ab"),
                wire.Welcome(run="r1", plan_hash="sha256:ab")):
        back, _ = wire.decode(wire.encode(msg))
        assert back == msg


def test_a_daemon_takes_only_a_run_id_that_is_one(make_plan, tmp_path):
    from meshctl.errors import UserError
    from meshctl.runtime.daemon import Daemon, DaemonConfig

    cfg = DaemonConfig(domain="client-0", plan=make_plan(n=2), base_dir=tmp_path, coordinator="tcp://127.0.0.1:1",
                       server_key=b"", keys=KeyPair.generate())
    daemon = Daemon(cfg)
    assert daemon._checked_run("20261206-101500-ab12") == "20261206-101500-ab12"
    for bad in ("", "../etc", "a b", "x" * 200):
        with pytest.raises(UserError, match="no usable run id"):
            daemon._checked_run(bad)


def test_without_a_run_id_no_earlier_run_counts_as_this_ones_own(make_plan, tmp_path):
    # a daemon that (still) has no run id must not take the charges of an earlier run booked under ""
    from meshctl.runtime.daemon import Daemon, DaemonConfig

    plan = _dp(make_plan(n=2), budget=5.0)
    Ledger(ledger_path(tmp_path)).charge("client-0.digits", 1.5, 5.0, subject="model:digits", run="")
    cfg = DaemonConfig(domain="client-0", plan=plan, base_dir=tmp_path, coordinator="tcp://127.0.0.1:1",
                       server_key=b"", keys=KeyPair.generate())
    assert Daemon(cfg)._spent(plan, plan.jobs) == {"client-0.digits": 1.5}


class _FakeCoordinator:
    """A real Curve ROUTER that speaks the coordinator's side by hand (to drop and restore the link)."""

    def __init__(self, server: KeyPair, client: KeyPair, port: int = 0):
        import zmq

        from meshctl.runtime.keys import MESH_ZAP_DOMAIN, curve_server, start_authenticator

        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, {MESH_ZAP_DOMAIN: {client.public}})
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        curve_server(self.router, server, MESH_ZAP_DOMAIN)
        if port:
            self.router.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        else:
            self.port = self.router.bind_to_random_port("tcp://127.0.0.1")

    def receive(self, kind):
        """The next message of type `kind` (heartbeats skipped) and its connection."""
        while True:
            assert self.router.poll(60_000), "the daemon went quiet"
            frames = self.router.recv_multipart()
            msg = wire.decode(frames[1:])[0]
            if isinstance(msg, kind):
                return frames[0], msg

    def send(self, identity, msg):
        self.router.send_multipart([identity, *wire.encode(msg.model_copy(update={"sender": "coordinator"}))])

    def close(self):
        self.router.close(0)
        self.auth.stop()
        self.ctx.term()


_READERS: dict[int, queue.Queue[str | None]] = {}


def _wait_line(proc, text: str, seen: list[str], timeout: float = 60.0) -> None:
    """Wait for a stderr line of `proc` holding `text`, appending every line read to `seen`. A reader
    thread per process owns the pipe (select + readline would miss a second line already buffered)."""
    import queue
    import threading
    import time

    lines = _READERS.get(proc.pid)
    if lines is None:
        lines = _READERS[proc.pid] = queue.Queue()

        def pump() -> None:
            for line in proc.stderr:
                lines.put(line.rstrip("\n"))
            lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
    end = time.monotonic() + timeout
    while not any(text in line for line in seen):
        left = end - time.monotonic()
        assert left > 0, f"no {text!r} in {seen}"
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        assert line is not None, f"the daemon exited before {text!r}: {seen}"
        seen.append(line)


def _standalone_daemon(plan, tmp_path: Path, mesh_file: Path, server: KeyPair, client: KeyPair,
                      port: int) -> subprocess.Popen[str]:
    """`meshctl daemon` for client-0 of `plan`, dialling a coordinator on `port` with `server`'s key."""
    plan_file = tmp_path / "plan.toml"
    plan.write(plan_file)
    key_file = client.save(tmp_path / "keys", "client-0")
    return subprocess.Popen(
        [sys.executable, "-m", "meshctl", "daemon", "--plan", str(plan_file), "--domain", "client-0",
         "--coordinator", f"tcp://127.0.0.1:{port}", "--server-key", server.public.decode(),
         "--key", str(key_file), "--base-dir", str(mesh_file.parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_daemon_says_when_it_loses_the_coordinator_and_when_it_is_back(make_plan, tmp_path, mesh_file):
    from meshctl.runtime.keys import fingerprint

    plan = make_plan(n=2)
    server, client = KeyPair.generate(), KeyPair.generate()
    coord = _FakeCoordinator(server, client)
    daemon = _standalone_daemon(plan, tmp_path, mesh_file, server, client, coord.port)
    seen: list[str] = []
    try:
        identity, _ = coord.receive(wire.Knock)  # nothing run-bound before the run id is known
        coord.send(identity, wire.RunInfo(run="r-1", plan_hash=plan.plan.hash))
        identity, hello = coord.receive(wire.Hello)
        assert hello.run == "r-1"
        coord.send(identity, wire.Welcome(run="r-1", plan_hash=plan.plan.hash))
        _wait_line(daemon, "joined run r-1", seen)
        _, beat = coord.receive(wire.Heartbeat)
        assert beat.run == "r-1"
        coord.close()  # the coordinator goes away ...
        _wait_line(daemon, "lost the coordinator", seen)
        coord = _FakeCoordinator(server, client, coord.port)  # ... and comes back on its address
        _wait_line(daemon, "reconnected", seen)
    finally:
        daemon.kill()
        daemon.communicate()
        coord.close()
    assert seen[0] == f"connecting to tcp://127.0.0.1:{coord.port} (coordinator key {fingerprint(server.public)})"
    assert seen[1:] == [f"joined run r-1 (plan {plan.plan.hash[:19]}…; jobs: digits)",
                        "lost the coordinator (its connection closed); reconnecting", "reconnected"]


def test_a_daemon_behind_the_coordinators_plan_says_so_and_exits_with_the_refusal(make_plan, tmp_path, mesh_file):
    plan = make_plan(n=2)
    server, client = KeyPair.generate(), KeyPair.generate()
    coord = _FakeCoordinator(server, client)
    daemon = _standalone_daemon(plan, tmp_path, mesh_file, server, client, coord.port)
    try:
        identity, _ = coord.receive(wire.Knock)
        coord.send(identity, wire.RunInfo(run="r-2", plan_hash="sha256:" + "0" * 64))
        identity, _ = coord.receive(wire.Hello)  # it still says Hello, so the coordinator records why it is out
        coord.send(identity, wire.Refused(reason="plan hash differs"))
        _, err = daemon.communicate(timeout=60)
    finally:
        daemon.kill()
        coord.close()
    assert daemon.returncode == 1 and "Traceback" not in err
    lines = err.splitlines()
    assert f"plan out of date: the coordinator runs plan sha256:000000000000…, this domain has " \
           f"{plan.plan.hash[:19]}…" in lines
    assert lines[-1].endswith("error: coordinator refused domain 'client-0': plan hash differs")
