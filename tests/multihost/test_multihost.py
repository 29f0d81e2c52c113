"""Issue 10, the multi-host proof: the digits mesh on four "hosts" — Linux network namespaces made
by the test, one coordinator and three domains, each domain's namespace holding only its own data
file and its own key, addresses only inside the namespaces — run with real processes over real
ZeroMQ with CurveZMQ, on plain veth links or through the userspace impairer (impair.py).

Each domain host runs `meshctl serve` (meshlab.DOMAIN_COMMAND; MESHCTL_MULTIHOST_DOMAIN=daemon runs
the one-shot `meshctl daemon` instead: it never reconnects, so the link-down and resume scenarios
fail with it; a restarted one-shot daemon is re-admitted like a service).
A fault scenario that fails because the mesh does not heal raises `NotYet`, which says what did
not come back and what the domain's log says last.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import meshlab
import netlab
import pytest

pytestmark = pytest.mark.xdist_group("multihost")  # one worker: the drill and the reference run once
import torch
from meshlab import DOMAINS, ROUNDS, Mesh, events, wait, wait_event

HEARTBEAT_S = "3"
"""MESHCTL_HEARTBEAT_TIMEOUT_S for the fault scenarios: a 30 s outage is then certainly "lost"."""


class NotYet(AssertionError):
    """The mesh did not heal: a domain did not come back (as issue 10 asks) in time."""


def _only_own_data(mesh: Mesh) -> None:
    assert not (mesh.coordinator / "data").exists()
    for d in mesh.domains:
        assert sorted(p.name for p in (mesh.host(d) / "data").iterdir()) == [f"{d}.parquet"]
        assert sorted(p.name for p in (mesh.host(d) / ".meshctl" / "keys").glob("*.key_secret")) == \
            [f"{d}.key_secret"]


def _run(mesh: Mesh, lab, timeout: float = 150) -> Path:
    """Start the coordinator, then the three domain daemons in their namespaces; wait for the end."""
    up = mesh.start_coordinator(lab)
    daemons = [mesh.start_domain(lab, d) for d in mesh.domains]
    rc = wait(up, timeout, "meshctl up", mesh.logs)
    assert rc == 0, mesh.logs()
    for d in daemons:
        if meshlab.ONE_SHOT:
            assert wait(d, 30, "a domain daemon", mesh.logs) == 0, mesh.logs()
        else:
            assert d.poll() is None, mesh.logs()  # a service stays up for the next run
    return mesh.run_dir()


def _same_model(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        # bit-equal: the same seed, the same per-domain data and order, FedAvg over the same updates
        # in the same (domain-sorted) order; nothing on the wire is lossy (raw float32 frames)
        assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max().item())


def test_fault_free_across_four_hosts_equals_one_host(keyring, reference, lab_factory, tmp_path):
    mesh = Mesh.build(keyring, tmp_path / "hosts", DOMAINS, ROUNDS)
    _only_own_data(mesh)
    try:
        with lab_factory(DOMAINS) as lab:
            run_dir = _run(mesh, lab)
    finally:
        mesh.stop()
    _same_model(meshlab.model(run_dir), reference["model"])
    last = [e for e in events(run_dir) if e["type"] == "round_completed"][-1]
    assert last["participants"] == DOMAINS and last["round"] == ROUNDS
    assert last["metrics"] == reference["metrics"]
    for d in DOMAINS:  # each daemon dialled the coordinator's namespace address and served the run
        log = (mesh.host(d) / "daemon-0.log").read_text()
        assert f"connecting to {meshlab.ROUTER} " in log and "joined run " + run_dir.name in log, log


def test_impaired_links_100ms_rtt_5pct_loss_complete_with_the_same_result(keyring, reference, lab_factory,
                                                                           tmp_path):
    mesh = Mesh.build(keyring, tmp_path / "hosts", DOMAINS, ROUNDS)
    try:
        with lab_factory(DOMAINS, link="tap", delay=0.05) as lab:
            rtts = [lab.rtt(d) for d in DOMAINS]
            assert all(r is not None and 0.095 < r < 0.2 for r in rtts), rtts  # the impairer's delay, both ways
            for d in DOMAINS:
                lab.impair(d, loss=0.05)
            run_dir = _run(mesh, lab)
            stats = {d: lab.stats(d) for d in DOMAINS}
    finally:
        mesh.stop()
    for d, s in stats.items():  # the links really lost frames, in both directions together
        assert s["dropped"] > 0 and s["a2b_bytes"] > 100_000 and s["b2a_bytes"] > 100_000, (d, s)
    _same_model(meshlab.model(run_dir), reference["model"])


def test_a_round_over_a_200ms_link_costs_one_rtt_plus_compute(keyring, lab_factory, tmp_path):
    """Issue 10's benchmark goal, with Linux's defaults on every host: a loss-based congestion control
    (reno: this kernel lets a namespace choose only reno or bbr; Linux's default cubic is loss-based
    too) and net.ipv4.tcp_slow_start_after_idle=1. One round needs one round trip (the weights down
    with EvalIns r and TrainIns r+1, the update up) plus compute; a flow that waited for the evaluation
    before sending the next round's training, or sent the weights twice, costs a second one and fails.
    (With bbr, this host's default, pacing adds ~0.6 RTT: docs/multihost.md, Benchmark.) The first two
    to four rounds cost 2-3 RTT while reno's window grows from its initial 10 segments to a round's
    ~60 KB (the same before and after issue 12): the median of 9 rounds is the steady state."""
    mesh = Mesh.build(keyring, tmp_path / "hosts", DOMAINS, 10)
    tcp = {"net.ipv4.tcp_congestion_control": "reno", "net.ipv4.tcp_slow_start_after_idle": "1"}
    try:
        with lab_factory(DOMAINS, link="tap", delay=0.2, sysctl=tcp) as lab:
            rtt = min(r for r in (lab.rtt(d) for d in DOMAINS) if r is not None)
            run_dir = _run(mesh, lab)
    finally:
        mesh.stop()
    ends = [e["ts"] for e in events(run_dir) if e["type"] == "round_completed"]
    median = statistics.median(b - a for a, b in itertools.pairwise(ends))
    assert (median - rtt) / rtt < 0.5, f"a round took {median * 1000:.0f} ms at RTT {rtt * 1000:.0f} ms"


def _rounds_done(run_dir: Path) -> int:
    return max((e["round"] for e in events(run_dir) if e["type"] == "round_completed"), default=0)


def _updates_after(run_dir: Path, domain: str, rnd: int) -> list[int]:
    return [e["round"] for e in events(run_dir)
            if e["type"] == "update_received" and e["domain"] == domain and e["round"] > rnd]


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc), whatever their session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _until(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())


@dataclass
class Drill:
    """What one run of the fault drill did and saw; each fault test below checks its part."""

    mesh: Mesh
    run_dir: Path
    rounds: int
    link_victim: str = "client-0"
    kill_victim: str = "client-1"
    cut_round: int = 0
    link_up_round: int = 0
    back_link: bool = False
    back_kill: bool = False
    resumed_after_seq: int = 0
    back_after_resume: set[str] = field(default_factory=set)
    resume_rc: int | None = None
    logs: str = ""

    def events(self) -> list[dict]:
        return events(self.run_dir)

    def last(self, domain: str, n: int = 2) -> list[str]:
        """The last lines of every log of `domain`'s service (for a failure message)."""
        return [line for f in sorted(self.mesh.host(domain).glob("daemon-*.log"))
                for line in f.read_text().splitlines()[-n:]]


@pytest.fixture(scope="module")
def drill(keyring, tmp_path_factory) -> Drill:
    """One run of the digits mesh (links 100 ms each way, heartbeat timeout 3 s, quorum 1), three faults:

    1. after round 2, client-0's link is cut for 30 s and, at the same moment, client-1's service is
       killed with -9 and started again at once; both must come back and send accepted updates;
    2. then the coordinator's whole process tree is killed with -9 and `meshctl resume latest` started;
       the services, untouched, must find it by themselves and send updates to the resumed run;
    3. then the links go to full speed and the run must end `ok` at its last round.

    Sharing one run keeps the three scenarios to one start-up of four processes (a minute on 2 busy
    cores). The drill records what happened; it raises only when the lab itself fails."""
    rounds = 300  # ~0.4 s each while the faults last (~150 rounds), ~0.07 s each after
    mesh = Mesh.build(keyring, tmp_path_factory.mktemp("drill") / "hosts", DOMAINS, rounds, quorum=1)
    mesh.env["MESHCTL_HEARTBEAT_TIMEOUT_S"] = HEARTBEAT_S
    with netlab.Lab(DOMAINS, link="tap", delay=0.1) as lab:
        try:
            up = mesh.start_coordinator(lab)
            services = {d: mesh.start_domain(lab, d) for d in DOMAINS}
            d = Drill(mesh, mesh.run_dir(), rounds)
            wait_event(d.run_dir, lambda e: e["type"] == "round_completed" and e["round"] >= 2, 120, "round 2",
                       mesh.logs)
            # 1. a partition and a crash, at once
            lab.set_link(d.link_victim, False)
            os.kill(services[d.kill_victim].pid, signal.SIGKILL)  # `ip netns exec` exec'd it: the service itself
            services[d.kill_victim].wait()
            d.cut_round = _rounds_done(d.run_dir)
            mesh.start_domain(lab, d.kill_victim)
            time.sleep(30)
            lab.set_link(d.link_victim, True)
            d.link_up_round = _rounds_done(d.run_dir)
            assert d.link_up_round < rounds - 100, f"the job reached round {d.link_up_round} during the outage"
            _until(lambda: bool(_updates_after(d.run_dir, d.link_victim, d.link_up_round)
                                and _updates_after(d.run_dir, d.kill_victim, d.cut_round + 1)), 30)
            d.back_link = bool(_updates_after(d.run_dir, d.link_victim, d.link_up_round))
            d.back_kill = bool(_updates_after(d.run_dir, d.kill_victim, d.cut_round + 1))
            # 2. the coordinator's whole tree, after a checkpoint it can resume from
            seen = len(d.events())
            wait_event(d.run_dir, lambda e: e["type"] == "checkpoint_written" and e["seq"] > seen, 30,
                       "a checkpoint", mesh.logs)
            tree = _tree(up.pid)
            assert len(tree) >= 2, tree  # up and its coordinator
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            up.wait()
            assert _until(lambda: not [p for p in tree if Path(f"/proc/{p}").exists() and
                                       "zombie" not in Path(f"/proc/{p}/status").read_text()], 5), \
                "a coordinator process survived kill -9"
            d.resumed_after_seq = len(d.events())
            resumed = mesh.start_coordinator(lab, "resume", "latest", "--mesh", str(mesh.coordinator / "mesh.yaml"),
                                             "--headless")

            def back() -> set[str]:
                d.back_after_resume = {e["domain"] for e in d.events()[d.resumed_after_seq:]
                                       if e["type"] == "update_received"}
                return d.back_after_resume

            if _until(lambda: back() == set(DOMAINS) or resumed.poll() is not None, 40):
                # 3. the rest of the job, at full speed
                for name in DOMAINS:
                    lab.impair(name, delay=0.0)
                try:
                    d.resume_rc = resumed.wait(120)
                except subprocess.TimeoutExpired:
                    d.resume_rc = None
        finally:
            mesh.stop()
    d.logs = mesh.logs()
    return d


def test_link_down_30s_mid_job_then_up_rejoins_and_contributes(drill):
    lost = [e for e in drill.events() if e["type"] == "domain_lost" and e["domain"] == drill.link_victim]
    assert lost and "heartbeat" in lost[0]["reason"], lost  # the outage was long enough to be a loss
    if not drill.back_link:
        raise NotYet(f"{drill.link_victim} sent no accepted update within 30 s of its link coming back (after "
                     f"round {drill.link_up_round}); its log ends: {drill.last(drill.link_victim)}")
    assert any(e["type"] == "round_completed" and drill.link_victim in e["participants"]
               and e["round"] > drill.link_up_round for e in drill.events())


def test_kill_9_a_domain_service_and_restart_it_rejoins(drill):
    assert (drill.mesh.host(drill.kill_victim) / "daemon-1.log").exists()  # it was started again
    if not drill.back_kill:
        raise NotYet(f"the restarted {drill.kill_victim} sent no accepted update (killed after round "
                     f"{drill.cut_round}); its logs end: {drill.last(drill.kill_victim)}")


def test_kill_9_the_coordinator_tree_and_resume_the_domains_come_back(drill):
    evs = drill.events()
    assert any(e["type"] == "run_resumed" for e in evs[drill.resumed_after_seq:]), drill.logs
    if drill.back_after_resume != set(DOMAINS):
        raise NotYet(f"after the resume only {sorted(drill.back_after_resume)} sent an accepted update within "
                     f"40 s; the services' logs end: " + "; ".join(drill.last(d, 1)[-1] for d in DOMAINS))
    assert drill.resume_rc == 0, drill.logs
    assert evs[-1]["type"] == "run_completed" and evs[-1]["ok"], evs[-1]
    done = [e for e in evs if e["type"] == "round_completed"]
    assert done[-1]["round"] == drill.rounds and set(done[-1]["participants"]) == set(DOMAINS)
