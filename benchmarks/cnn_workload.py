"""The CNN round time next to its floor: examples/digits-cnn (a user's entrypoint CNN on 8x8
images kept as a tensor column, 4 domains), measured end to end as fl_workload.py does for the MLP.

It copies the example to a temporary folder, runs `meshctl up --headless` as a real subprocess
(memory of every process sampled), reads the run's events, and prints, next to the median
round time, the floor measured in the same run: the same local epochs of the same module on
the same rows, run sequentially in this one process with plain torch (SGD, momentum, batch 32,
one shuffle per client and round), plus the accuracy that sequential FedAvg loop reaches.

    python benchmarks/cnn_workload.py              # R = 20
    python benchmarks/cnn_workload.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits-cnn"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_workload import _mb, _version, run_meshctl


def _example_data():
    spec = importlib.util.spec_from_file_location("digits_cnn_data", EXAMPLE / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.tables()


def floor(rounds: int, threads: int, channels: int = 16, lr: float = 0.1, momentum: float = 0.9) -> dict:
    """Sequential FedAvg of the example's CNN in this process: local compute summed per round."""
    torch.set_num_threads(threads)
    sys.path.insert(0, str(EXAMPLE))
    from digits_cnn.model import build

    clients, tests = [], []
    for table in _example_data().values():
        x = torch.tensor(table.column("pixels").to_pylist(), dtype=torch.float32).view(-1, 1, 8, 8)
        y = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
        train = torch.tensor([s == "train" for s in table.column("split").to_pylist()])
        clients.append((x[train], y[train]))
        tests.append((x[~train], y[~train]))
    x_test, y_test = torch.cat([x for x, _ in tests]), torch.cat([y for _, y in tests])
    torch.manual_seed(0)
    model = build([1, 8, 8], 10, channels=channels)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = torch.nn.CrossEntropyLoss()
    times, accs = [], []
    for r in range(1, rounds + 1):
        spent, results = 0.0, []
        for i, (x, y) in enumerate(clients):
            model.load_state_dict(weights)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            t = time.perf_counter()
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 * r + i))
            model.train()
            for s in range(0, len(y), 32):
                b = perm[s:s + 32]
                opt.zero_grad()
                loss_fn(model(x[b]), y[b]).backward()
                opt.step()
            spent += time.perf_counter() - t
            results.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, len(y)))
        total = sum(n for _, n in results)
        weights = {k: sum(w[k] * (n / total) for w, n in results) for k in weights}
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            accs.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        times.append(spent)
    return {"floor_median": statistics.median(times[1:] or times), "accuracy": accs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshctl-cnn-bench-") as tmp:
        root = Path(tmp) / "digits-cnn"
        shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
        mesh = root / "mesh.yaml"
        mesh.write_text(mesh.read_text().replace("rounds: 15,", f"rounds: {args.rounds},"))
        m = run_meshctl(mesh, args.threads)
    f = floor(args.rounds, args.threads)
    print(f"\nmeshctl {_version()} on {os.cpu_count()} cores, torch {torch.__version__}, "
          f"BENCH_THREADS={args.threads}; floor = same local epochs, sequential, one process, plain torch\n")
    head = (f"{'model':<10}{'N':>3}{'R':>4}{'round s':>10}{'floor s':>10}{'ratio':>7}{'launch→r1 s':>13}"
            f"{'acc R':>8}{'FedAvg ref':>11}{'in/round':>11}{'out/round':>11}{'PSS MB':>8}{'procs':>6}")
    print(head)
    print("-" * len(head))
    print(f"{'cnn-entry':<10}{4:>3}{args.rounds:>4}{m['round_median']:>10.4f}{f['floor_median']:>10.4f}"
          f"{m['round_median'] / f['floor_median']:>7.2f}{m['launch_to_r1']:>13.2f}"
          f"{m['accuracy'][-1]:>8.4f}{f['accuracy'][-1]:>11.4f}"
          f"{_mb(m['bytes_in']):>11}{_mb(m['bytes_out']):>11}{m['pss'] / 2**20:>8.0f}{m['procs']:>6}")


if __name__ == "__main__":
    main()
