"""The federated-learning benchmark of shared/bench/WORKLOAD.md, measured end to end.

For each configuration it writes the digits mesh (examples/digits/make_data.py),
runs `meshctl up --headless` as a real subprocess, samples the memory of every
process of the run, reads the run's events.jsonl, and prints, next to them, the
floor measured in the same run: the same local epochs run sequentially in this
one process with no framework (the WORKLOAD's reference loop when
shared/bench/workload.py is present, else meshctl's own kernel), plus the plain
FedAvg accuracy that loop reaches and the centralized baseline.

    python benchmarks/fl_workload.py                 # N = 4, 8, 16 (R = 20) and large N = 4 (R = 5)
    python benchmarks/fl_workload.py --quick         # N = 4 only
    python benchmarks/fl_workload.py --sizes 4,8     # a subset
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
import itertools

from make_data import write_mesh

WORKLOAD = ROOT.parent / "shared" / "bench" / "workload.py"
MESHCTL = [sys.executable, "-m", "meshctl"]


def _reference():
    """The WORKLOAD's reference module, or None."""
    if not WORKLOAD.exists():
        return None
    spec = importlib.util.spec_from_file_location("workload", WORKLOAD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


class MemorySampler(threading.Thread):
    """Peak of the summed PSS and RSS of a process and all its descendants.

    Sampled every 250 ms: reading smaps of every process costs CPU that the run
    under test would otherwise have.
    """

    def __init__(self, pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            pss = rss = n = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                pss += info.pss
                rss += info.rss
                n += 1
            if pss > self.peak_pss:
                self.peak_pss, self.peak_procs = pss, n
            self.peak_rss = max(self.peak_rss, rss)
            self.stop.wait(self.every_s)


def run_meshctl(mesh: Path, threads: int) -> dict:
    env = {**os.environ, "BENCH_THREADS": str(threads)}
    t0 = time.time()
    proc = subprocess.Popen([*MESHCTL, "up", "--headless", "--address", "tcp://127.0.0.1:0",
                             "--threads", str(threads), str(mesh)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=mesh.parent)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate(timeout=900)
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"meshctl up failed ({proc.returncode}):\n{out}")
    run_dir = Path(out.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["type"] == "round_completed"]
    ends = [e["ts"] for e in rounds]
    per_round = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "launch_to_r1": ends[0] - t0,
        "round_median": statistics.median(per_round) if per_round else float("nan"),
        "accuracy": [e["metrics"]["accuracy"] for e in rounds],
        "bytes_in": statistics.median(e["bytes_in"] for e in rounds[1:] or rounds),
        "bytes_out": statistics.median(e["bytes_out"] for e in rounds[1:] or rounds),
        "pss": sampler.peak_pss, "rss": sampler.peak_rss, "procs": sampler.peak_procs,
        "wall": time.time() - t0,
    }


def floor(n_clients: int, rounds: int, hidden: list[int], threads: int) -> dict:
    """Sequential FedAvg in this process: per-round local compute summed over clients."""
    torch.set_num_threads(threads)
    ref = _reference()
    if ref is not None:
        os.environ.setdefault("BENCH_THREADS", str(threads))
        size = "small" if hidden == [128] else "large"
        model = ref.build_model(size)
        x_test, y_test = ref.test_data()
        clients = [ref.client_data(i, n_clients) for i in range(n_clients)]
        n_train = [len(y) for _, y in clients]

        def train(m, i, r):
            x, y = clients[i]
            return ref.train_epoch(m, x, y, shuffle_seed=1000 * r + i)

        evaluate = lambda m: ref.evaluate(m, x_test, y_test)[1]
        get, put, avg = ref.get_weights, ref.set_weights, ref.fedavg
        central = _central(ref, rounds) if hidden == [128] else float("nan")
    else:  # pragma: no cover - used only without shared/
        raise SystemExit(f"{WORKLOAD} not found: the floor needs the WORKLOAD reference")
    weights = get(model)
    times, accs = [], []
    for r in range(1, rounds + 1):
        results, spent = [], 0.0
        for i in range(n_clients):
            put(model, weights)
            t = time.perf_counter()
            train(model, i, r)
            spent += time.perf_counter() - t
            results.append((get(model), n_train[i]))
        weights = avg(results)
        put(model, weights)
        accs.append(evaluate(model))
        times.append(spent)
    return {"floor_median": statistics.median(times[1:] or times), "accuracy": accs, "central": central,
            "sizes": n_train}


def _central(ref, epochs: int) -> float:
    x, y, xt, yt = ref.load_data()
    model = ref.build_model("small")
    opt = torch.optim.SGD(model.parameters(), lr=ref.LR, momentum=ref.MOMENTUM)
    for e in range(epochs):
        ref.train_epoch(model, x, y, optimizer=opt, shuffle_seed=1000 * e)
    return ref.evaluate(model, xt, yt)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only N=4, small model")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--sizes", default="4,8,16,large", help="comma list of N (small model) and/or 'large'")
    args = ap.parse_args()
    wanted = ["4"] if args.quick else args.sizes.split(",")
    configs = [(int(n), 20, [128]) for n in wanted if n != "large"]
    if "large" in wanted:
        configs.append((4, 5, [3000, 3000]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshctl-bench-") as tmp:
        for n, rounds, hidden in configs:
            mesh = write_mesh(Path(tmp) / f"n{n}-{'x'.join(map(str, hidden))}", n, rounds=rounds, hidden=hidden)
            m = run_meshctl(mesh, args.threads)
            f = floor(n, rounds, hidden, args.threads)
            rows.append((n, rounds, hidden, m, f))
            print(f"  done N={n} R={rounds} hidden={hidden}: {m['wall']:.1f}s", file=sys.stderr, flush=True)
    print(f"\nmeshctl {_version()} on {os.cpu_count()} cores, torch {torch.__version__}, "
          f"BENCH_THREADS={args.threads}; floor = same local epochs, sequential, one process, no framework\n")
    head = (f"{'model':<7}{'N':>3}{'R':>4}{'round s':>10}{'floor s':>10}{'ratio':>7}{'launch→r1 s':>13}"
            f"{'acc R':>8}{'FedAvg ref':>11}{'central':>9}{'in/round':>11}{'out/round':>11}"
            f"{'PSS MB':>8}{'RSS MB':>8}{'procs':>6}")
    print(head)
    print("-" * len(head))
    for n, rounds, hidden, m, f in rows:
        name = "small" if hidden == [128] else "large"
        print(f"{name:<7}{n:>3}{rounds:>4}{m['round_median']:>10.4f}{f['floor_median']:>10.4f}"
              f"{m['round_median'] / f['floor_median']:>7.2f}{m['launch_to_r1']:>13.2f}"
              f"{m['accuracy'][-1]:>8.4f}{f['accuracy'][-1]:>11.4f}{f['central']:>9.4f}"
              f"{_mb(m['bytes_in']):>11}{_mb(m['bytes_out']):>11}"
              f"{m['pss'] / 2**20:>8.0f}{m['rss'] / 2**20:>8.0f}{m['procs']:>6}")
    n, rounds, hidden, m, f = rows[0]
    print(f"\naccuracy per round, N={n} {'small' if hidden == [128] else 'large'} (meshctl vs sequential FedAvg reference):")
    for r, (a, b) in enumerate(zip(m["accuracy"], f["accuracy"]), 1):
        print(f"  round {r:>2}: {a:.4f}  {b:.4f}")
    print(f"partition sizes N={n}: {f['sizes']}")


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def _version() -> str:
    from meshctl import __version__

    return __version__


if __name__ == "__main__":
    main()
