"""Issue 13's robustness table: aggregation rules, clean and under sign-flipping domains.

The workload of benchmarks/fl_workload.py (digits, Dirichlet(0.5) over N = 16 domains,
20 rounds, 1 local epoch, MLP 64-128-10, SGD lr 0.05 momentum 0.9). Each domain trains
with meshctl's own kernel (`train_local`, the daemon's call and seeds) and each round
is aggregated by the runtime's `Strategy` (the coordinator's dispatch), simulated in
this one process: the runtime has no attacker hook, so an attacker is simulated here.
An attacker trains honestly, then sends `w - 10 (update - w)` (sign flip x10) with its
true example count. Accuracy is on the 360-sample global test set after the last round.

Beside the table: the floor, the plain sequential FedAvg loop of shared/bench/workload.py
(what fl_workload.py prints as "FedAvg ref"). `--e2e` also runs `meshctl up --headless`
(real daemons, ZeroMQ, Curve) clean for the chosen strategies and prints its accuracy.

    python benchmarks/robustness.py                    # every strategy, 0, 1 and 3 attackers
    python benchmarks/robustness.py --quick            # fewer strategies, 0 and 1 attacker
    python benchmarks/robustness.py --strategies multi_krum,centered_clip --attackers 0,3
    python benchmarks/robustness.py --strategies fedavgm:server_momentum=0.7 --e2e
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_data import dirichlet_partition, load_data, write_mesh

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.coordinator.strategy import make_strategy
from meshctl.runtime.kernels import evaluate, mlp, train_local
from meshctl.runtime.kernels.metrics import finish

ALL = ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "multi_krum:server_momentum=0.9", "bulyan",
       "bulyan:server_momentum=0.9", "centered_clip", "centered_clip:server_momentum=0.9", "fedavgm",
       "fedavgm:server_lr=1.5;server_momentum=0.8", "fedadam", "fedadam:server_lr=0.01"]
QUICK = ["fedavg", "median", "multi_krum", "multi_krum:server_momentum=0.9", "centered_clip:server_momentum=0.9",
         "fedavgm", "fedadam"]
SCALE = 10.0
"""An attacker sends w - SCALE (update - w)."""


def parse(name: str) -> tuple[str, dict[str, float]]:
    """`strategy[:key=value,...]` -> (strategy, settings)."""
    kind, _, rest = name.partition(":")
    settings = {}
    for item in filter(None, rest.split(";")):
        key, value = item.split("=")
        settings[key] = int(value) if value.isdigit() else float(value)
    return kind, settings


def aggregation(name: str, attackers: int) -> PlanAggregation:
    """The plan's aggregation for `name`; the Byzantine rules tolerate `max(1, attackers)`,
    bounded by what 16 updates allow (bulyan: 4f + 3 <= 16, so f <= 3)."""
    kind, settings = parse(name)
    if kind in ("krum", "multi_krum", "bulyan") and "byzantine" not in settings:
        settings["byzantine"] = max(1, attackers)
    return PlanAggregation(strategy=kind, **settings)


def attacker_ids(n: int, k: int) -> list[int]:
    """k domains spread evenly over 0..n-1 (0; 0, 5, 10 for n = 16)."""
    return [i * n // k for i in range(k)] if k else []


def simulate(name: str, n: int, rounds: int, attackers: int, threads: int) -> tuple[list[float], float]:
    """(accuracy after each round, seconds) of one federation, simulated in-process."""
    torch.set_num_threads(threads)
    x_tr, y_tr, x_te, y_te = load_data()
    parts = dirichlet_partition(n)
    data = [(torch.from_numpy(x_tr[list(p)]), torch.from_numpy(y_tr[list(p)])) for p in parts]
    xt, yt = torch.from_numpy(x_te), torch.from_numpy(y_te)
    model = mlp(64, [128], 10, seed=0)
    names = list(model.state_dict())
    weights = [model.state_dict()[k].detach().clone() for k in names]
    bad = set(attacker_ids(n, attackers))
    strategy = make_strategy(aggregation(name, attackers))
    domains = [f"client-{i}" for i in range(n)]
    accs, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        updates, examples = [], []
        for i, (x, y) in enumerate(data):
            model.load_state_dict(dict(zip(names, weights)))
            train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle_seed=1000 * r + i)
            upd = [model.state_dict()[k].detach().clone() for k in names]
            if i in bad:
                upd = [w - SCALE * (u - w) for u, w in zip(upd, weights)]
            updates.append(upd)
            examples.append(len(y))
        weights, _ = strategy.aggregate(weights, domains, updates, examples)
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    return accs, time.perf_counter() - t0


def floor_accuracy(n: int, rounds: int, threads: int) -> float:
    """The plain sequential FedAvg loop of shared/bench/workload.py (fl_workload's floor)."""
    from fl_workload import floor

    return floor(n, rounds, [128], threads)["accuracy"][-1]


def e2e_accuracy(name: str, n: int, rounds: int, threads: int, tmp: Path) -> float:
    """`meshctl up --headless` on the digits mesh with this aggregation: the last round's accuracy."""
    from fl_workload import run_meshctl

    kind, settings = parse(name)
    agg = ", ".join([f"strategy: {kind}", *(f"{k}: {v}" for k, v in settings.items())])
    mesh = write_mesh(tmp / name.replace(":", "_").replace("=", "-").replace(";", "_"), n, rounds=rounds)
    mesh.write_text(mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{{agg}}}"))
    return run_meshctl(mesh, threads)["accuracy"][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer strategies; 0 and 1 attacker")
    ap.add_argument("--strategies", help="comma list, strategy[:key=value;...]")
    ap.add_argument("--attackers", help="comma list of attacker counts (default 0,1,3)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--e2e", action="store_true", help="also run meshctl up --headless, clean, per strategy")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    args = ap.parse_args()
    names = args.strategies.split(",") if args.strategies else QUICK if args.quick else ALL
    counts = [int(k) for k in (args.attackers or ("0,1" if args.quick else "0,1,3")).split(",")]
    ref = floor_accuracy(args.n, args.rounds, args.threads)
    rows = []
    for name in names:
        row = {}
        for k in counts:
            accs, secs = simulate(name, args.n, args.rounds, k, args.threads)
            row[k] = accs[-1]
            print(f"  {name} attackers={k}: {accs[-1]:.4f} ({secs:.1f}s)", file=sys.stderr, flush=True)
        if args.e2e:
            with tempfile.TemporaryDirectory(prefix="meshctl-robust-") as tmp:
                row["e2e"] = e2e_accuracy(name, args.n, args.rounds, args.threads, Path(tmp))
            print(f"  {name} meshctl up: {row['e2e']:.4f}", file=sys.stderr, flush=True)
        rows.append((name, row))
    print(f"\ndigits, N={args.n}, Dirichlet(0.5), {args.rounds} rounds, 1 local epoch; accuracy on the "
          f"360-sample test set after the last round.\nsimulated in-process (meshctl's train_local + the "
          f"runtime's Strategy.aggregate); attackers (sign flip x{SCALE:g}, true example counts): "
          + "; ".join(f"{k}: {', '.join(f'client-{i}' for i in attacker_ids(args.n, k)) or 'none'}"
                      for k in counts)
          + f".\nByzantine rules tolerate f = max(1, attackers). floor (plain sequential FedAvg, "
          f"shared/bench/workload.py): {ref:.4f}\n")
    head = f"{'strategy':<42}" + "".join(f"{f'{k} of {args.n}':>10}" for k in counts)
    head += f"{'meshctl up':>12}" if args.e2e else ""
    print(head)
    print("-" * len(head))
    for name, row in rows:
        line = f"{name:<42}" + "".join(f"{row[k]:>10.4f}" for k in counts)
        print(line + (f"{row['e2e']:>12.4f}" if args.e2e else ""))


if __name__ == "__main__":
    main()
