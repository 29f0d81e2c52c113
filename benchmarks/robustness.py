"""Issue 13's robustness table: aggregation rules, clean and under sign-flipping domains.

The workload of benchmarks/fl_workload.py (digits, Dirichlet(0.5) over N = 16 domains,
20 rounds, 1 local epoch, MLP 64-128-10, SGD lr 0.05 momentum 0.9). Each domain trains
with meshctl's own kernel (`train_local`, the daemon's call and seeds) and each round
is aggregated by the runtime's `Strategy` (the coordinator's dispatch), simulated in
this one process. An attacker trains honestly, then sends `w - 10 (update - w)` (sign
flip x10) with its true example count (over real daemons, MESHCTL_TEST_SIGN_FLIP does the same). Accuracy is on the 360-sample global test set after the last round.

Beside the table: the floor, the plain sequential FedAvg loop of shared/bench/workload.py
(what fl_workload.py prints as "FedAvg ref"). `--e2e` also runs `meshctl up --headless`
(real daemons, ZeroMQ, Curve) clean for the chosen strategies and prints its accuracy.

    python benchmarks/robustness.py                    # every strategy, 0, 1 and 3 attackers
    python benchmarks/robustness.py --quick            # fewer strategies, 0 and 1 attacker
    python benchmarks/robustness.py --strategies multi_krum,centered_clip --attackers 0,3
    python benchmarks/robustness.py --strategies fedavgm:server_momentum=0.7 --e2e
    python benchmarks/robustness.py --strategies fedavg,multi_krum,median:bucketing=2  # + the goal table

After the strategy table comes issue 13's goal table (the rows it can answer: clean best, best robust
rule under 1 and under 3 attackers, against the `fedavg` row); `strategy:bucketing=s` runs a robust
rule over bucket means, `strategy:server_momentum=0` without its default momentum.
    python benchmarks/robustness.py --strategies fedavg,fedavg+exclude=norm,fedavg+exclude=cosine  # exclude policies
    python benchmarks/robustness.py --only updates_fp32,updates_int8,updates_fp16,updates_topk  # compression
    python benchmarks/robustness.py --only client_dp,client_dp_adaptive  # client-level DP (DP-FedAvg)
    python benchmarks/robustness.py --only secagg_dropout  # SecAgg+ with 2 of 16 killed mid-round
    python benchmarks/robustness.py --only scaffold,fedavg_sampled,scaffold_sampled  # SCAFFOLD, sampling
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_data import dirichlet_partition, load_data, write_mesh

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.coordinator.strategy import make_strategy
from meshctl.runtime.kernels import evaluate, mlp, train_local
from meshctl.runtime.kernels.metrics import finish

EXCLUDE_POLICIES = {"norm": "update.norm_ratio <= 3.0", "cosine": "update.cosine > 0.0"}
"""`STRATEGY+exclude=KIND[+suspend=N]`: a round policy `effect: exclude` (docs/governance.md) with this
`require`, decided by the runtime's RoundGate on each update before the strategy aggregates the rest."""
EXCLUDE_ROWS = ["fedavg+exclude=norm", "fedavg+exclude=cosine", "fedavg+exclude=norm+suspend=3"]
ROBUST = ["median", "median:bucketing=2", "trimmed_mean", "krum", "krum:bucketing=3", "multi_krum",
          "multi_krum:bucketing=2", "bulyan", "centered_clip", "centered_clip:bucketing=2"]
"""The robust rules with their defaults (server momentum 0.9, no buckets) and with bucketing."""
NO_MOMENTUM = [f"{rule}:server_momentum=0" for rule in
               ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clip")]
"""The robust rules as they were before their server momentum default (issue 13's 'today')."""
ALL = ["fedavg", "fedavgm", "fedavgm:server_lr=1.5;server_momentum=0.8", "fedadam", "fedadam:server_lr=0.01",
       "fedyogi", *ROBUST, *NO_MOMENTUM, *EXCLUDE_ROWS]
QUICK = ["fedavg", "fedavgm", "fedadam", "median", "multi_krum", "centered_clip", "median:server_momentum=0"]
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


def exclusion_gate(name: str, n: int, rounds: int) -> tuple[str, Any]:
    """(the strategy part of `name`, the RoundGate of its `+exclude=` policy or None)."""
    from types import SimpleNamespace

    from meshctl.compiler.plan import PlanPolicy
    from meshctl.runtime.governance import RoundGate

    name, *extras = name.split("+")
    opts = dict(e.split("=") for e in extras)
    if "exclude" not in opts:
        return name, None
    policy = PlanPolicy(name=f"exclude-{opts['exclude']}", scope="round", effect="exclude",
                        require=EXCLUDE_POLICIES[opts["exclude"]],
                        suspend_after=int(opts["suspend"]) if "suspend" in opts else None)
    plan = SimpleNamespace(policies=[policy], coordinator=SimpleNamespace(jurisdiction="", address=""))
    job = SimpleNamespace(name="digits", participants=[f"client-{i}" for i in range(n)],
                          training=SimpleNamespace(rounds=rounds))
    return name, RoundGate(plan, job)  # type: ignore[arg-type]


def excluded(gate: Any, r: int, weights: list[torch.Tensor], domains: list[str], updates: list[list[torch.Tensor]],
             examples: list[int], suspended: set[str]) -> set[str]:
    """The domains whose round-r update the gate excludes, as the coordinator decides it (norms of the
    update, cosines to the median update); those it suspends are added to `suspended`."""
    from meshctl.runtime.governance import RoundUpdate, update_cosines

    cos = update_cosines(weights, dict(zip(domains, updates))) if gate.reads_cosine else {}
    facts = [RoundUpdate(d, e, 0.0, float(torch.sqrt(sum(((u - w) ** 2).sum() for u, w in zip(upd, weights)))),
                         cos.get(d, 1.0)) for d, upd, e in zip(domains, updates, examples)]
    out = set()
    for d, _, suspend in gate.exclusions(r, domains, facts):
        out.add(d)
        if suspend is not None:
            suspended.add(d)
    return out


def _workload(n: int, threads: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor,
                                              torch.nn.Module, list[str]]:
    """The benchmark's data over `n` domains (Dirichlet(0.5)), the test set, the seeded MLP and its
    state names: what every experiment starts from."""
    torch.set_num_threads(threads)
    x_tr, y_tr, x_te, y_te = load_data()
    data = [(torch.from_numpy(x_tr[list(p)]), torch.from_numpy(y_tr[list(p)])) for p in dirichlet_partition(n)]
    model = mlp(64, [128], 10, seed=0)
    return data, torch.from_numpy(x_te), torch.from_numpy(y_te), model, list(model.state_dict())


def simulate(name: str, n: int, rounds: int, attackers: int, threads: int) -> tuple[list[float], float]:
    """(accuracy after each round, seconds) of one federation, simulated in-process."""
    name, gate = exclusion_gate(name, n, rounds)
    suspended: set[str] = set()
    dropped = []
    data, xt, yt, model, names = _workload(n, threads)
    weights = [model.state_dict()[k].detach().clone() for k in names]
    bad = set(attacker_ids(n, attackers))
    strategy = make_strategy(aggregation(name, attackers))
    domains = [f"client-{i}" for i in range(n)]
    accs, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        updates, examples = [], []
        for i, (x, y) in enumerate(data):
            if domains[i] in suspended:  # (by an exclude policy's suspend_after)
                continue
            model.load_state_dict(dict(zip(names, weights)))
            train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle_seed=1000 * r + i)
            upd = [model.state_dict()[k].detach().clone() for k in names]
            if i in bad:
                upd = [w - SCALE * (u - w) for u, w in zip(upd, weights)]
            updates.append(upd)
            examples.append(len(y))
        taking = [d for d in domains if d not in suspended]
        if gate is not None:
            out = excluded(gate, r, weights, taking, updates, examples, suspended)
            dropped.append(sorted(out))
            kept = [i for i, d in enumerate(taking) if d not in out]
            taking, updates, examples = [taking[i] for i in kept], [updates[i] for i in kept], [examples[i] for i in kept]
        weights, _ = strategy.aggregate(weights, taking, updates, examples)
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    if gate is not None:
        attackers_out = sum(d in {f"client-{i}" for i in bad} for out in dropped for d in out)
        honest_out = sum(len(out) for out in dropped) - attackers_out
        print(f"    {name}+exclude: {attackers_out} attacker and {honest_out} honest update(s) excluded over {rounds} "
              f"rounds; suspended: {', '.join(sorted(suspended)) or 'none'}", file=sys.stderr, flush=True)
    return accs, time.perf_counter() - t0


def simulate_scaffold(n: int, rounds: int, threads: int, fraction: float = 1.0,
                      strategy: str = "scaffold", epochs: int = 1) -> tuple[list[float], float]:
    """(accuracy after each round, seconds) of SCAFFOLD (or `strategy`) clean, with the daemon's steps:
    `train_local(control=c - c_i)`, `client_control` (option II) and the runtime's Scaffold strategy;
    `fraction` < 1 trains a seeded sample each round (`sample_round`, seed 0), the others idle."""
    from meshctl.compiler.plan import PlanSampling
    from meshctl.runtime.coordinator.strategy import Scaffold
    from meshctl.runtime.coordinator.training import sample_round
    from meshctl.runtime.daemon import control_lr
    from meshctl.runtime.kernels.scaffold import client_control
    from meshctl.runtime.kernels.train import local_steps

    data, xt, yt, model, names = _workload(n, threads)
    weights = [model.state_dict()[k].detach().clone() for k in names]
    strat = make_strategy(PlanAggregation(strategy=strategy))
    domains = [f"client-{i}" for i in range(n)]
    per_round = max(1, math.ceil(round(fraction * n, 9)))  # as the compiler resolves `fraction`
    job = type("Job", (), {"sampling": PlanSampling(per_round=per_round, seed=0) if fraction < 1 else None})()
    c_i = [[torch.zeros_like(w) for w in weights] for _ in range(n)]
    accs, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        sample = sample_round(job, domains, r)
        c = strat.controls_for(weights) if isinstance(strat, Scaffold) else None
        updates, deltas, examples = [], [], []
        for i, (x, y) in enumerate(data):
            if domains[i] not in sample:
                continue
            model.load_state_dict(dict(zip(names, weights)))
            corr = [a - b for a, b in zip(c, c_i[i])] if c is not None else None
            train_local(model, x, y, epochs=epochs, batch_size=32, lr=0.05, momentum=0.9,
                        shuffle_seed=1000 * r + i, control=corr)
            upd = [model.state_dict()[k].detach().clone() for k in names]
            if c is not None:
                c_i[i], delta = client_control(c_i[i], c, weights, upd, local_steps(len(y), epochs, 32),
                                               control_lr(0.05, 0.9))
                deltas.append(delta)
            updates.append(upd)
            examples.append(len(y))
        if isinstance(strat, Scaffold):
            weights, _ = strat.aggregate_controlled(weights, sample, updates, deltas, examples, n)
        else:
            weights, _ = strat.aggregate(weights, sample, updates, examples)
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    return accs, time.perf_counter() - t0


def simulate_compressed(kind: str | None, n: int, rounds: int, threads: int,
                        k: float | None = None) -> tuple[list[float], float, str]:
    """(accuracy after each round, seconds, bytes note) of FedAvg clean with each domain's update compressed as
    the daemon does (`compress.compress` of local - global, a top-k residual per domain) and restored as the
    coordinator does (`compress.restore`, added to the global weights); `kind` None sends float32 weights.
    Bytes: the round's TrainRes messages as `wire.encode` frames them (header and tensor frames), beside
    what the same messages weigh with float32 weights."""
    from meshctl.runtime import wire
    from meshctl.runtime.kernels import compress

    data, xt, yt, model, names = _workload(n, threads)
    shapes = [(k_, list(model.state_dict()[k_].shape)) for k_ in names]
    weights = [model.state_dict()[k_].detach().clone() for k_ in names]
    strategy = make_strategy(PlanAggregation())
    domains = [f"client-{i}" for i in range(n)]
    residuals: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    accs, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        updates, examples, size, full = [], [], 0, 0
        for i, (x, y) in enumerate(data):
            model.load_state_dict(dict(zip(names, weights)))
            loss = train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle_seed=1000 * r + i)
            local = {k_: model.state_dict()[k_].detach().clone() for k_ in names}
            res = wire.TrainRes(job="digits-mlp", round=r, examples=len(y), loss=loss, seconds=0.1)
            full += wire.frames_size(wire.encode(res, local))
            if kind is None:
                size += wire.frames_size(wire.encode(res, local))
                updates.append(list(local.values()))
            else:
                delta = {k_: local[k_] - w for k_, w in zip(names, weights)}
                sent, residuals[i] = compress.compress(kind, k, delta, residuals[i])
                size += wire.frames_size(wire.encode(res, sent))
                back = compress.restore(kind, k, shapes, sent)
                updates.append([w + back[k_] for k_, w in zip(names, weights)])
            examples.append(len(y))
        weights, _ = strategy.aggregate(weights, domains, updates, examples)
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    return accs, time.perf_counter() - t0, (f"last round's update bytes {size:,} "
                                            f"({full / size:.2f}x fewer than float32's {full:,})")


def simulate_client_dp(n: int, rounds: int, threads: int, epsilon: float = 8.0, delta: float = 1e-5,
                       clip: float = 1.0, adaptive: bool = False, strategy: str = "fedavg",
                       domain_noise: bool = False, target_quantile: float = 0.5) -> tuple[list[float], float, str]:
    """(accuracy after each round, seconds, ε note) of client-level DP (DP-FedAvg) clean, with the daemon's
    and the coordinator's steps: `client_dp.domain_update` (clip the whole update, the bit, a noise share
    under `domain_noise`), `client_dp.noised_mean` over the expected count, the strategy's `from_mean`,
    `next_clip` (adaptive: `target_quantile`, lr 0.2). The note: ε of the accountant after the last
    round beside opacus' RDP accountant for the same q, z and rounds."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from meshctl.runtime.kernels import client_dp
    from meshctl.runtime.kernels.privacy import ORDERS

    data, xt, yt, model, names = _workload(n, threads)
    weights = [model.state_dict()[k_].detach().clone() for k_ in names]
    strat = make_strategy(PlanAggregation(strategy=strategy))
    noise = client_dp.plan_noise(epsilon, delta, rounds, n, adaptive=adaptive)
    gen = client_dp.generator(0)
    bound, norms = clip, []
    accs, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        total = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
        bits = 0.0
        for i, (x, y) in enumerate(data):
            model.load_state_dict(dict(zip(names, weights)))
            train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle_seed=1000 * r + i)
            local = [model.state_dict()[k_].detach().clone() for k_ in names]
            delta_i, bit, size = client_dp.domain_update(weights, local, bound, noise, domain_noise=domain_noise,
                                                         gen=gen)
            total = [t + d for t, d in zip(total, delta_i)]
            bits += bit
            norms.append(size)
        mean, unclipped, _ = client_dp.noised_mean(total, bits, bound, noise,
                                                   noised_shares=n if domain_noise else 0, gen=gen)
        weights = strat.from_mean(weights, [(w.double() + m).float() for w, m in zip(weights, mean)])
        if adaptive:
            bound = client_dp.next_clip(bound, unclipped, target_quantile, 0.2)
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    orders = [float(a) for a in ORDERS]
    peer, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=noise.q, noise_multiplier=noise.z, steps=rounds,
                                                               orders=orders), delta=delta)
    norms.sort()
    return accs, time.perf_counter() - t0, (
        f"ε {noise.epsilon(rounds):.4f} at δ {delta:g} (opacus RDP {float(peer):.4f}); z {noise.z:.3f}, "
        f"noise std on the mean {noise.z_delta * bound / noise.expected:.4f}/coord; clip {clip:g}"
        + (f" -> {bound:.4f}" if adaptive else "") + f"; median update norm {norms[len(norms) // 2]:.3f}")


def simulate_secagg_dropout(n: int, rounds: int, threads: int, killed: int = 2,
                            at_round: int = 10) -> tuple[list[float], float, str]:
    """FedAvg under secure aggregation with dropout recovery, the daemons' and the coordinator's kernels
    in-process (Shamir shares of every seed and key, double masking, unmasking): `killed` domains share
    their masks in round `at_round`, then die before their masked update and never come back. Each
    round is also aggregated as plain FedAvg over the same survivors' updates: the note gives the
    largest difference of the weights (fixed-point precision is 2^-20 of a weighted unit)."""
    from meshctl.runtime.kernels import secagg, shamir

    data, xt, yt, model, names = _workload(n, threads)
    weights = [model.state_dict()[k].detach().clone() for k in names]
    fedavg = make_strategy(PlanAggregation(strategy="fedavg"))
    domains = [f"client-{i}" for i in range(n)]
    keys = {d: secagg.new_key() for d in domains}
    public = {d: secagg.public_bytes(k) for d, k in keys.items()}
    victims = set(domains[3:3 + killed * 5:5][:killed])
    alive, accs, worst, t0 = list(domains), [], 0.0, time.perf_counter()
    for r in range(1, rounds + 1):
        t, ctx = secagg.threshold(len(alive)), secagg.context("bench", "digits")
        seeds = {d: secagg.new_seed() for d in alive}  # shares go out before training
        b_sh = {d: shamir.split(seeds[d], len(alive), t) for d in alive}
        s_sh = {d: shamir.split(secagg.private_bytes(keys[d]), len(alive), t) for d in alive}
        survivors = [d for d in alive if not (r == at_round and d in victims)]
        updates, examples, masked = [], [], []
        for d in survivors:
            i = domains.index(d)
            x, y = data[i]
            model.load_state_dict(dict(zip(names, weights)))
            train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle_seed=1000 * r + i)
            upd = [model.state_dict()[k].detach().clone() for k in names]
            updates.append(upd)
            examples.append(len(y))
            peers = {v: public[v] for v in alive}
            masked.append(secagg.mask(secagg.encode(upd, float(len(y))), d, keys[d], peers, ctx, r, seeds[d]))
        dropped = [d for d in alive if d not in survivors]
        at = [alive.index(v) for v in survivors][:t]  # t survivors answer the unmasking
        b = {u: shamir.reconstruct([b_sh[u][j] for j in at], t) for u in survivors}
        s = {d: shamir.reconstruct([s_sh[d][j] for j in at], t) for d in dropped}
        total = secagg.unmask(secagg.add(masked), survivors, b, s, public, ctx, r)
        mean = secagg.decode(total, [w.shape for w in weights], float(sum(examples)))
        secure = fedavg.from_mean(weights, mean)
        plain, _ = fedavg.aggregate(weights, survivors, updates, examples)
        worst = max(worst, max(float((a - p).abs().max()) for a, p in zip(secure, plain)))
        weights, alive = secure, survivors
        model.load_state_dict(dict(zip(names, weights)))
        accs.append(finish("classification", ["accuracy"], [evaluate(model, xt, yt)])["accuracy"])
    return accs, time.perf_counter() - t0, (f"{', '.join(sorted(victims))} killed in round {at_round}; round "
                                            f"completed; max |secure - plain FedAvg over survivors| = {worst:.1e}")


EXPERIMENTS = {
    "secagg_dropout": ("SecAgg, 2 of 16 killed mid-round (goal: = FedAvg)",
                       lambda a: simulate_secagg_dropout(a.n, a.rounds, a.threads)),
    "scaffold": ("scaffold, clean (server_lr 1)", lambda a: simulate_scaffold(a.n, a.rounds, a.threads)),
    "fedavg_sampled": ("fedavg, 50% sampling (per_round 8), clean",
                       lambda a: simulate_scaffold(a.n, a.rounds, a.threads, 0.5, "fedavg")),
    "scaffold_sampled": ("scaffold, 50% sampling (per_round 8), clean",
                         lambda a: simulate_scaffold(a.n, a.rounds, a.threads, 0.5)),
    "fedavg_5ep": ("fedavg, 5 local epochs, clean",
                   lambda a: simulate_scaffold(a.n, a.rounds, a.threads, 1.0, "fedavg", epochs=5)),
    "scaffold_5ep": ("scaffold, 5 local epochs, clean",
                     lambda a: simulate_scaffold(a.n, a.rounds, a.threads, epochs=5)),
}
EXPERIMENTS.update({
    "updates_fp32": ("fedavg, float32 updates", lambda a: simulate_compressed(None, a.n, a.rounds, a.threads)),
    "updates_fp16": ("fedavg, fp16 updates (~2x fewer bytes)",
                     lambda a: simulate_compressed("fp16", a.n, a.rounds, a.threads)),
    "updates_int8": ("fedavg, int8 updates (goal: <= 0.5 pt, >= 3.5x)",
                     lambda a: simulate_compressed("int8", a.n, a.rounds, a.threads)),
    "updates_topk": ("fedavg, top-k 10% updates, error feedback",
                     lambda a: simulate_compressed("topk", a.n, a.rounds, a.threads, k=0.1)),
})
EXPERIMENTS.update({
    "client_dp": ("client-level DP, ε=8, δ=1e-5 over 20 rounds, clip 1",
                  lambda a: simulate_client_dp(a.n, a.rounds, a.threads)),
    "client_dp_clip03": ("client-level DP, ε=8, δ=1e-5 over 20 rounds, clip 0.3",
                         lambda a: simulate_client_dp(a.n, a.rounds, a.threads, clip=0.3)),
    "client_dp_adaptive": ("client-level DP, ε=8, adaptive clip (from 1)",
                           lambda a: simulate_client_dp(a.n, a.rounds, a.threads, adaptive=True)),
    "client_dp_fedavgm": ("client-level DP, ε=8, fedavgm, clip 1",
                          lambda a: simulate_client_dp(a.n, a.rounds, a.threads, strategy="fedavgm")),
    "client_dp_domain": ("client-level DP, ε=8, domain noise, adaptive",
                         lambda a: simulate_client_dp(a.n, a.rounds, a.threads, adaptive=True, domain_noise=True)),
    "client_dp_eps_inf": ("client-level DP, clip 1, ε=1e9 (z at its 0.05 floor)",
                          lambda a: simulate_client_dp(a.n, a.rounds, a.threads, epsilon=1e9)),
})
"""`--only NAME,...`: experiments beside the strategy table, each printed as one row."""


def goal_table(rows: list[tuple[str, dict[Any, float | None]]], n: int) -> list[tuple[str, str, str, str, bool]]:
    """Issue 13's goal rows the strategy table answers: (experiment, before (the issue's "today"), measured,
    goal, met). A robust rule is a row whose strategy is one of plan.ROBUST_STRATEGIES; clean FedAvg is the
    `fedavg` row; ties go to the row listed first (the defaults)."""
    from meshctl.compiler.plan import ROBUST_STRATEGIES

    def acc(name: str, k: int) -> float | None:
        return dict(rows).get(name, {}).get(k)

    out = []
    clean = [(row[0], name) for name, row in rows if row.get(0) is not None]
    if clean:
        best, name = max(clean, key=lambda t: t[0])
        plain = [(a, m) for a, m in clean if ":" not in m and "+" not in m]
        at_defaults = "; at defaults {:.4f}, {}".format(*max(plain, key=lambda t: t[0])) if plain else ""
        out.append(("clean, best strategy", "0.964", f"{best:.4f} ({name}{at_defaults})", ">= 0.970",
                    best >= 0.970 - 1e-9))
    fedavg = acc("fedavg", 0)
    robust = [name for name, _ in rows if parse(name)[0] in ROBUST_STRATEGIES and "+" not in name]
    for k, points in ((1, 2.0), (3, 5.0)):
        hit = [(acc(name, k), name) for name in robust if acc(name, k) is not None]
        if not hit or fedavg is None:
            continue
        best, name = max(hit, key=lambda t: t[0])
        own = acc(name, 0)
        if k == 1:
            goal = "within 2 of its clean and 3 of clean FedAvg"
            met = own is not None and best >= own - 0.02 - 1e-9 and best >= fedavg - 0.03 - 1e-9
            clean_note = f"clean {own:.4f}, " if own is not None else ""
        else:
            goal, met, clean_note = "within 5 of clean FedAvg", best >= fedavg - 0.05 - 1e-9, ""
        out.append((f"{k} of {n} sign-flip x{SCALE:g}, best robust rule", "0.767" if k == 1 else "0.678",
                    f"{best:.4f} ({name}; {clean_note}clean FedAvg {fedavg:.4f})", goal, met))
    return out


def floor_accuracy(n: int, rounds: int, threads: int) -> float:
    """The plain sequential FedAvg loop of shared/bench/workload.py (fl_workload's floor)."""
    from fl_workload import floor

    return floor(n, rounds, [128], threads)["accuracy"][-1]


def e2e_accuracy(name: str, n: int, rounds: int, threads: int, tmp: Path, attackers: int = 0) -> float:
    """`meshctl up --headless` on the digits mesh with this aggregation: the last round's accuracy. With
    `attackers`, those of `attacker_ids` sign-flip x SCALE in their daemons (MESHCTL_TEST_SIGN_FLIP)."""
    from fl_workload import run_meshctl

    base, gate = exclusion_gate(name, n, rounds)
    kind, settings = parse(base)
    agg = ", ".join([f"strategy: {kind}", *(f"{k}: {v}" for k, v in settings.items())])
    mesh = write_mesh(tmp / name.replace(":", "_").replace("=", "-").replace(";", "_").replace("+", "_"), n,
                      rounds=rounds)
    text = mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{{agg}}}")
    if gate is not None:  # the exclude policy, and a quorum that lets a round go on without a few updates
        p = gate.excluders[0]
        suspend = f", suspend_after: {p.suspend_after}" if p.suspend_after else ""
        text = text.replace("policies:\n", f"policies:\n  - {{name: {p.name}, scope: round, effect: exclude, "
                            f"require: '{p.require}'{suspend}}}\n", 1)
        text = text.replace("    aggregation:", f"    quorum: {n // 2 + 1}\n    aggregation:", 1)
    mesh.write_text(text)
    flip = ",".join(f"client-{i}:{SCALE:g}" for i in attacker_ids(n, attackers))
    os.environ["MESHCTL_TEST_SIGN_FLIP"] = flip  # (the daemons inherit it)
    try:
        return run_meshctl(mesh, threads)["accuracy"][-1]
    finally:
        os.environ.pop("MESHCTL_TEST_SIGN_FLIP", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer strategies; 0 and 1 attacker")
    ap.add_argument("--strategies", help="comma list, strategy[:key=value;...]")
    ap.add_argument("--attackers", help="comma list of attacker counts (default 0,1,3)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--e2e", action="store_true", help="also run meshctl up --headless, clean, per strategy")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--only", help=f"comma list of experiments, one row each: {', '.join(EXPERIMENTS)}")
    args = ap.parse_args()
    if args.only:
        for name in args.only.split(","):
            label, run = EXPERIMENTS[name]
            accs, secs, *note = run(args)
            print(f"{label:<48}{accs[-1]:>10.4f}  ({secs:.1f}s; best round {max(accs):.4f})"
                  + "".join(f"; {x}" for x in note), flush=True)
        return
    names = args.strategies.split(",") if args.strategies else QUICK if args.quick else ALL
    counts = [int(k) for k in (args.attackers or ("0,1" if args.quick else "0,1,3")).split(",")]
    ref = floor_accuracy(args.n, args.rounds, args.threads)
    rows = []
    for name in names:
        row = {}
        for k in counts:
            try:
                accs, secs = simulate(name, args.n, args.rounds, k, args.threads)
            except ValueError as err:  # e.g. too few buckets for f = k
                row[k] = None
                print(f"  {name} attackers={k}: not run ({err})", file=sys.stderr, flush=True)
                continue
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
          + f".\nByzantine rules tolerate f = max(1, attackers) (with bucketing, f of the buckets; '-': too few "
          f"buckets for f). Robust rules default to server_momentum 0.9 and no buckets.\nfloor (plain "
          f"sequential FedAvg, shared/bench/workload.py): {ref:.4f}\n")
    head = f"{'strategy':<42}" + "".join(f"{f'{k} of {args.n}':>10}" for k in counts)
    head += f"{'meshctl up':>12}" if args.e2e else ""
    print(head)
    print("-" * len(head))
    for name, row in rows:
        line = f"{name:<42}" + "".join(f"{row[k]:>10.4f}" if row[k] is not None else f"{'-':>10}" for k in counts)
        print(line + (f"{row['e2e']:>12.4f}" if args.e2e else ""))
    goals = goal_table(rows, args.n)
    if goals:
        print(f"\nissue 13's goals (digits, N={args.n}, {args.rounds} rounds, 1 local epoch)")
        print(f"{'experiment':<41}{'before':<8}{'measured':<82}{'goal':<45}met")
        print("-" * 179)
        for experiment, before, measured, goal, met in goals:
            print(f"{experiment:<41}{before:<8}{measured:<82}{goal:<45}{'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
