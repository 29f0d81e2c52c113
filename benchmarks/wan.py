"""The digits mesh across a wide-area link: round time and bytes per round over links of 0, 50 and
200 ms one-way delay, next to the floor (local compute per round + the link's RTT); and the time
from a domain's link coming back to its first accepted update.

Every host is a Linux network namespace (tests/multihost/netlab.py: one coordinator, three domains
client-0..2 of the digits example, each with only its own data and key); every domain link runs
through the userspace impairer (tests/multihost/impair.py), which adds the delay in each direction;
the first row (`veth`) runs over the kernel's veth pairs instead, to show what the impairer costs.
The coordinator is `meshctl up --headless`, each domain `meshctl serve` (tests/multihost/meshlab.py
DOMAIN_COMMAND; MESHCTL_MULTIHOST_DOMAIN=daemon for the one-shot `meshctl daemon`). Needs root.

    sudo python benchmarks/wan.py                    # delays 0, 50, 200 ms; 10 rounds each; rejoin at 50 ms
    sudo python benchmarks/wan.py --delays 0,50 --rounds 6 --no-rejoin
    sudo python benchmarks/wan.py --delays 200 --tcp 'reno,ssai=1;reno,ssai=0'

`--tcp` adds rows at the largest delay with other TCP settings in every namespace: the congestion
control and net.ipv4.tcp_slow_start_after_idle (`CC,ssai=0|1`).

Floor = the same local epochs with no framework, summed over the 3 clients per round (the WORKLOAD
definition, ../shared/bench/WORKLOAD.md) + one RTT of the link (2 x one-way delay). Round time is the
median time between consecutive `round_completed` events, round 1 excluded. Bytes per round are the
coordinator's message bytes (in + out, `round_completed`), and on the wire: every frame the three
impairers forwarded between the end of round 1 and the end of the last round (Ethernet, IP and TCP
headers, retransmissions and heartbeats included), divided by the rounds in between.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "multihost"))
import meshlab
import netlab

WORKLOAD = ROOT.parent / "shared" / "bench" / "workload.py"
N_CLIENTS = 4
"""The digits example is partitioned over 4 clients; the mesh here uses the first 3 of them."""


def compute_floor(rounds: int, domains: int) -> float:
    """Median over rounds 2.. of the local epochs of `domains` clients, run sequentially in this process
    with the WORKLOAD's reference loop (no framework), FedAvg between rounds."""
    if not WORKLOAD.exists():
        raise SystemExit(f"{WORKLOAD} not found: the floor needs the WORKLOAD reference")
    spec = importlib.util.spec_from_file_location("workload", WORKLOAD)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)  # type: ignore[union-attr]
    os.environ.setdefault("BENCH_THREADS", "1")
    ref.set_threads()
    model = ref.build_model("small")
    clients = [ref.client_data(i, N_CLIENTS) for i in range(domains)]
    weights = ref.get_weights(model)
    times = []
    for r in range(1, rounds + 1):
        results, spent = [], 0.0
        for i, (x, y) in enumerate(clients):
            ref.set_weights(model, weights)
            t = time.perf_counter()
            ref.train_epoch(model, x, y, shuffle_seed=1000 * r + i)
            spent += time.perf_counter() - t
            results.append((ref.get_weights(model), len(y)))
        weights = ref.fedavg(results)
        times.append(spent)
    return statistics.median(times[1:] or times)


def keyring(root: Path) -> Path:
    hosts = root / "keyring"
    keys = meshlab.generate_keys(hosts, meshlab.DOMAINS)
    (hosts / "public_keys.json").write_text(json.dumps(keys))
    return hosts


def tcp_setting(spec: str) -> dict[str, str]:
    """The sysctls every namespace gets for `CC,ssai=0|1` (congestion control, tcp_slow_start_after_idle)."""
    cc, *rest = spec.split(",")
    opts = dict(w.split("=") for w in rest)
    return {"net.ipv4.tcp_congestion_control": cc, "net.ipv4.tcp_slow_start_after_idle": opts.get("ssai", "1")}


def measure(keys: Path, root: Path, delay_ms: float, rounds: int, link: str = "tap", tcp: str = "") -> dict:
    """One run of the mesh with every domain link delayed by `delay_ms` each way (`link="veth"`: the
    kernel's veth pairs, no impairer, no delay), with the TCP setting `tcp` (see tcp_setting; "": the
    host's)."""
    mesh = meshlab.Mesh.build(keys, root, meshlab.DOMAINS, rounds)
    sysctl = tcp_setting(tcp) if tcp else {}
    with netlab.Lab(meshlab.DOMAINS, link=link, delay=delay_ms / 1000, sysctl=sysctl) as lab:
        rtt = statistics.median(r for r in (lab.rtt(d) for d in meshlab.DOMAINS) if r is not None)
        t0 = time.time()
        try:
            up = mesh.start_coordinator(lab)
            for d in meshlab.DOMAINS:
                mesh.start_domain(lab, d)
            run_dir = mesh.run_dir(60)
            rc = meshlab.wait(up, 600, "meshctl up", mesh.logs)
            if rc != 0:
                raise SystemExit(f"meshctl up failed ({rc}):\n{mesh.logs()}")
            done = [e for e in meshlab.events(run_dir) if e["type"] == "round_completed"]
            ends = [e["ts"] for e in done]
            wire = (sum(lab.bytes_between(d, ends[0], ends[-1]) for d in meshlab.DOMAINS) if link == "tap"
                    else float("nan"))
        finally:
            mesh.stop()
    return {
        "rtt": rtt,
        "round": statistics.median(b - a for a, b in itertools.pairwise(ends)),
        "launch_to_r1": ends[0] - t0,
        "msg_bytes": statistics.median(e["bytes_in"] + e["bytes_out"] for e in done[1:]),
        "wire_bytes": wire / (len(done) - 1),
        "accuracy": done[-1]["metrics"]["accuracy"],
    }


def rejoin(keys: Path, root: Path, delay_ms: float, outage_s: float, wait_s: float) -> str:
    """Cut client-0's link after round 2 for `outage_s` (longer than the heartbeat timeout), mend it, and
    time the first update of client-0 the coordinator accepts after that."""
    mesh = meshlab.Mesh.build(keys, root, meshlab.DOMAINS, 400, quorum=2)
    mesh.env["MESHCTL_HEARTBEAT_TIMEOUT_S"] = "3"
    victim = "client-0"
    with netlab.Lab(meshlab.DOMAINS, link="tap", delay=delay_ms / 1000) as lab:
        try:
            mesh.start_coordinator(lab)
            for d in meshlab.DOMAINS:
                mesh.start_domain(lab, d)
            run_dir = mesh.run_dir(60)
            meshlab.wait_event(run_dir, lambda e: e["type"] == "round_completed" and e["round"] >= 2, 120,
                               "round 2", mesh.logs)
            lab.set_link(victim, False)
            time.sleep(outage_s)
            lost = [e for e in meshlab.events(run_dir) if e["type"] == "domain_lost" and e["domain"] == victim]
            lab.set_link(victim, True)
            back = time.time()
            after = max(e["round"] for e in meshlab.events(run_dir) if e["type"] == "round_completed")
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                for e in meshlab.events(run_dir):
                    if e["type"] == "update_received" and e["domain"] == victim and e["round"] > after:
                        return f"{e['ts'] - back:.2f} s (update for round {e['round']})"
                time.sleep(0.1)
            last = (mesh.host(victim) / "daemon-0.log").read_text().splitlines()[-1:]
            why = "lost" if lost else "never declared lost"
            return (f"n/a: no accepted update within {wait_s:.0f} s of the link coming back ({victim} {why}; "
                    f"its domain's last line: {last})")
        finally:
            mesh.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,50,200", help="one-way delays in ms, comma-separated")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds client-0's link is down")
    parser.add_argument("--no-rejoin", action="store_true", help="skip the rejoin measurement")
    parser.add_argument("--tcp", default="reno,ssai=1;reno,ssai=0",
                        help="extra rows at the largest delay, ';'-separated: CC,ssai=0|1 sets every namespace's "
                             "congestion control and tcp_slow_start_after_idle; '' for none")
    args = parser.parse_args()
    why = netlab.available()
    if why:
        raise SystemExit(f"error: {why}")
    delays = [float(d) for d in args.delays.split(",")]
    cc, ssai = (Path("/proc/sys/net/ipv4", k).read_text().strip()
                for k in ("tcp_congestion_control", "tcp_slow_start_after_idle"))
    floor = compute_floor(args.rounds, len(meshlab.DOMAINS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshctl-wan-") as tmp:
        keys = keyring(Path(tmp))
        rows.append(("veth", measure(keys, Path(tmp) / "run-veth", 0, args.rounds, link="veth")))
        for d in delays:
            rows.append((d, measure(keys, Path(tmp) / f"run-{d:g}", d, args.rounds)))
            print(f"  done {d:g} ms", file=sys.stderr, flush=True)
        for i, spec in enumerate(t for t in args.tcp.split(";") if t):
            rows.append((delays[-1], measure(keys, Path(tmp) / f"run-tcp{i}", delays[-1], args.rounds, tcp=spec)
                         | {"tcp": spec}))
            print(f"  done {delays[-1]:g} ms {spec}", file=sys.stderr, flush=True)
        rejoined = "" if args.no_rejoin else rejoin(keys, Path(tmp) / "rejoin", 50, args.outage, 40)
    print(f"\ndigits mesh, 3 domains, {args.rounds} rounds, {os.cpu_count()} cores; every domain link through "
          f"impair.py; floor = local compute {floor * 1000:.1f} ms (3 clients, sequential, no framework) + RTT\n")
    head = (f"{'one-way ms':>10}{'RTT ms':>9}{'round ms':>10}{'floor ms':>10}{'ratio':>7}{'RTTs/round':>12}"
            f"{'msg KB/round':>14}{'wire KB/round':>15}{'launch→r1 s':>13}{'accuracy':>10}  tcp")
    host_tcp = f"host: {cc},ssai={ssai}"
    print(head)
    print("-" * len(head))
    for d, m in rows:
        fl = floor + m["rtt"]
        rtts = (m["round"] - floor) / m["rtt"] if d not in (0, "veth") else float("nan")
        print(f"{d if d == 'veth' else format(d, 'g'):>10}{m['rtt'] * 1000:>9.1f}{m['round'] * 1000:>10.1f}{fl * 1000:>10.1f}{m['round'] / fl:>7.2f}"
              f"{rtts:>12.2f}{m['msg_bytes'] / 1000:>14.1f}{m['wire_bytes'] / 1000:>15.1f}"
              f"{m['launch_to_r1']:>13.2f}{m['accuracy']:>10.4f}  {m.get('tcp', host_tcp)}")
    if not args.no_rejoin:
        print(f"\nlink of client-0 down {args.outage:g} s after round 2 (50 ms one-way, heartbeat timeout 3 s); "
              f"from the link coming back to its first accepted update: {rejoined}")


if __name__ == "__main__":
    main()
