"""Real runs: a coordinator process that forks daemons, Curve on every socket, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import zmq

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.keys import KeyPair, curve_client
from meshctl.runtime.launcher import start_run


def test_local_run_trains_and_leaves_its_run_directory(mesh_file, make_plan):
    run = start_run(mesh_file, make_plan(n=2, rounds=3))
    seen = [type(e).__name__ for e in run.follow()]
    result = run.finish()
    assert result.ok, result.reason
    assert seen.count("RoundCompleted") == 3 and seen[-1] == "RunCompleted"
    d = result.run_dir
    lines = (d / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(seen)
    assert sorted(p.name for p in (d / "checkpoints" / "digits").iterdir()) == [
        "round-0001.safetensors", "round-0002.safetensors", "round-0003.safetensors"]
    assert (d / "models" / "digits.safetensors").stat().st_size > 4 * 2000
    assert (d / "metrics.csv").read_text().count("\n") == 4
    assert not list((d / "keys").glob("*.key_secret")), "ephemeral secret keys are removed after the run"
    from safetensors.torch import load_file  # weights only, never a pickle

    state = load_file(d / "models" / "digits.safetensors")
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def _daemon(run, domain, key_file):
    return subprocess.Popen(
        [sys.executable, "-m", "meshctl", "daemon", "--plan", str(run.m.path / "plan.toml"), "--domain", domain,
         "--coordinator", run.m.router, "--server-key", run.m.coordinator_public, "--key", str(key_file),
         "--base-dir", run.m.base_dir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_key_not_in_the_plan_cannot_join_and_the_plan_key_can(mesh_file, tmp_path, make_plan):
    good = KeyPair.generate()
    good_file = good.save(tmp_path / "keys", "good")
    bad_file = KeyPair.generate().save(tmp_path / "keys", "bad")
    run = start_run(mesh_file, make_plan(n=2, rounds=2, remote={"client-1": good.public.decode()}))
    events = run.follow()
    while not isinstance(next(events), ev.DomainJoined):  # client-0 is local
        pass

    # a daemon with the wrong key is refused by the Curve handshake
    imposter = _daemon(run, "client-1", bad_file)
    out, _ = imposter.communicate(timeout=60)
    assert imposter.returncode == 1
    assert "refused domain 'client-1'" in out and "Curve key" in out and "Traceback" not in out

    # the right key, but junk frames and a spoofed sender: rejected as events, the coordinator carries on
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    curve_client(s, good, run.m.coordinator_public.encode())
    s.connect(run.m.router)
    s.send_multipart([b"\x80\x04not a pickle"])
    s.send_multipart(wire.encode(wire.Hello(plan_hash="x", sender="client-0")))
    rejected = []
    while len(rejected) < 2:
        e = next(events)
        if isinstance(e, ev.MessageRejected) and "Curve handshake" not in e.reason:  # (the imposter's own)
            rejected.append(e)
    s.close(0)
    ctx.term()
    assert "not JSON" in rejected[0].reason
    assert "claims 'client-0'" in rejected[1].reason and rejected[1].sender == "client-1"

    # the domain's own key joins and the job completes
    real = _daemon(run, "client-1", good_file)
    kinds = [type(e).__name__ for e in events]
    result = run.finish()
    real.wait(30)
    assert result.ok, result.reason
    assert kinds.count("RoundCompleted") == 2
    assert real.returncode == 0


def test_a_daemon_that_dies_fails_the_run_with_its_name_and_log(mesh_file, make_plan):
    run = start_run(mesh_file, make_plan(n=2, rounds=10_000))
    pids = {}
    started = time.monotonic()
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 2:
            os.kill(pids["client-1"], signal.SIGKILL)
    result = run.finish()
    assert time.monotonic() - started < 60
    assert not result.ok
    assert "client-1" in result.reason and "exited with code -9" in result.reason
    assert "client-1.log" in result.reason


def test_a_storm_of_stop_signals_still_ends_the_run_in_order(mesh_file, make_plan):
    """Signals arriving anywhere (mid-write, mid-queue, mid-send, again and again) must not cut
    the run's last events short or wedge the coordinator: the handler only records the request."""
    run = start_run(mesh_file, make_plan(n=2, rounds=100_000))
    pids = []
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            pids.append(e.pid)
        if isinstance(e, ev.RoundCompleted) and e.round == 3:
            break
    for i in range(40):
        os.kill(run.proc.pid, signal.SIGTERM if i % 2 else signal.SIGINT)
        time.sleep(0.002)
    assert run.proc.wait(30) == 1
    lines = (run.m.path / "events.jsonl").read_text().splitlines()
    last = ev.read_events(str(run.m.path / "events.jsonl"))[-1]
    assert isinstance(last, ev.RunCompleted) and not last.ok and last.reason == "stopped by SIGINT", lines[-1]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)



def _alive(pid: int) -> bool:
    """Running, or at least not a zombie (which is dead for our purposes)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
