"""Split learning (issue 15) on examples/vertical, measured next to its centralised floor.

Reads the three domains' files (lab, imaging, clinic), intersects their patient ids with
ECDH-PSI (meshctl.runtime.psi, the clinic leads), aligns the rows, holds out 20% of the
agreed order (kernels.split.holdout_split), standardises each domain's columns with its own
training statistics, and trains the same network two ways:

* centralised floor: one nn.Module on the joined rows (kernels.split.train_centralised);
* split, in process: kernels.split.train_split_in_process, every batch's activations and
  gradients encoded and decoded with meshctl.runtime.wire (what crosses, without sockets).

It prints one table: PSI time (the example, 10,000 ids per party), time per epoch, the bytes
that cross per batch (computed from the parts, `crossing`, with the top model at the label owner
and at the coordinator; with `--up` asserted equal to the run's measured update_bytes), holdout accuracy (the issue's goal: split within 1 point of centralised), and a
scikit-learn logistic regression on the joined rows as a sanity peer. When
examples/vertical/mesh.yaml exists and `--up` is given, it also runs `meshctl up` on it.

    python benchmarks/split_workload.py
    python benchmarks/split_workload.py --epochs 40 --noise 0.1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import duckdb
import torch

from meshctl.runtime import psi, wire
from meshctl.runtime.kernels import split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "vertical" / "data"
FILES = {"lab": "lab.parquet", "imaging": "imaging.parquet", "clinic": "clinic.csv"}
MESH = ROOT / "examples" / "vertical" / "mesh.yaml"
DEFAULTS = {"leader": "clinic", "classes": ["benign", "malignant"], "hidden": [16], "out": 8, "top_hidden": [16],
            "epochs": 30, "batch_size": 32, "optimizer": "adam", "lr": 0.01, "seed": 0, "holdout": 0.2}


def _config() -> tuple[dict, str]:
    """The split job's settings from examples/vertical/mesh.yaml when it compiles, else DEFAULTS."""
    if not MESH.exists():
        return dict(DEFAULTS), "defaults (no examples/vertical/mesh.yaml)"
    from meshctl.compiler.compile import compile_mesh

    plan = compile_mesh(MESH).plan
    jobs = getattr(plan, "split_models", None) or []
    if not jobs:
        return dict(DEFAULTS), "defaults (examples/vertical/mesh.yaml has no compiled split job)"
    j = jobs[0]
    domains = [p.domain for p in j.parts]
    if sorted(domains) != sorted(FILES):
        return dict(DEFAULTS), f"defaults (the mesh's parts are {domains})"
    return {"leader": j.label_domain, "classes": list(j.classes), "order": domains,
            "features": {p.domain: p.features for p in j.parts}, "key": {p.domain: p.key for p in j.parts},
            "label": j.label_column, "hidden": {p.domain: p.hidden for p in j.parts},
            "out": {p.domain: p.out for p in j.parts}, "top_hidden": j.top_hidden, "epochs": j.epochs,
            "batch_size": j.batch_size, "optimizer": j.optimizer, "lr": j.lr, "seed": j.seed,
            "holdout": j.holdout}, f"split job {j.name} of examples/vertical/mesh.yaml"


class _Acts(wire._Msg):
    """Stand-in for the runtime's activation/gradient message: the same header framing."""

    type: Literal["bench_split_batch"] = "bench_split_batch"
    step: int = 0


def _read(domain: str, cfg: dict) -> tuple[list[str], torch.Tensor, list[str] | None]:
    """(keys, features [n, f] float32, labels or None) of one domain's file."""
    path = DATA / FILES[domain]
    scan = f"read_parquet('{path}')" if path.suffix == ".parquet" else f"read_csv('{path}')"
    cols = duckdb.connect().execute(f"SELECT * FROM {scan}").fetchnumpy()
    ids = [str(v) for v in cols.pop(cfg.get("key", {}).get(domain, "patient_id"))]
    label_col = cfg.get("label", "diagnosis")
    label = [str(v) for v in cols[label_col]] if domain == cfg["leader"] else None
    cols.pop(label_col, None)
    features = cfg.get("features", {}).get(domain) or list(cols)
    x = torch.tensor([[float(v) for v in cols[f]] for f in features], dtype=torch.float32).T.reshape(len(ids), -1)
    return ids, x, label


def _psi(parties: dict[str, list[str]], leader: str) -> tuple[dict[str, list[int]], float]:
    t = time.perf_counter()
    rows = psi.intersect(parties, leader, psi.new_salt())
    return rows, time.perf_counter() - t


def _standardise(x: torch.Tensor, train: list[int]) -> torch.Tensor:
    """As the domains do (domain/split.py): train rows' mean and population std, a constant column kept."""
    mean, std = x[train].mean(0), x[train].std(0, unbiased=False)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


def _wire_round_trip(tensors: list[torch.Tensor], tag: str) -> tuple[list[torch.Tensor], int]:
    """Each tensor through wire.encode and wire.decode as its own message; the bytes on the wire."""
    out, size = [], 0
    for i, t in enumerate(tensors):
        frames = wire.encode(_Acts(step=i), {tag: t})
        size += wire.frames_size(frames)
        out.append(wire.decode(frames)[1][tag])
    return out, size


def crossing(split_job, n_train: int, n_hold: int) -> dict[str, int]:
    """The tensor bytes that cross for one split job, from its parts' widths (float32, payload only, no
    headers): per training batch of `batch_size`, what the coordinator receives (`batch_in`) and sends
    (`batch_out`), for the job's `top_at` (`label_owner`: only the other parts' activations and the
    label owner's gradients for them cross, its own part stays home; `coordinator`: every part's
    activations, their gradients, the logits and their gradients), and per epoch what it receives,
    training and holdout: the run's `update_bytes` (coordinator/split.py counts acts, grads, eval_acts
    and logit_grads)."""
    outs = {p.domain: p.out for p in split_job.parts if p.out}
    logits = 1 if split_job.task == "regression" else len(split_job.classes)
    if split_job.top_at == "coordinator":
        acts = sum(outs.values())  # every part with features; the label owner returns d loss / d logits
        row_in, row_out, hold_in = acts + logits, acts + logits, acts
    else:
        acts = sum(o for d, o in outs.items() if d != split_job.label_domain)
        row_in, row_out, hold_in = 2 * acts, 2 * acts, acts  # acts to the label owner, grads back: relayed
    bs = split_job.batch_size
    return {"batch_in": 4 * bs * row_in, "batch_out": 4 * bs * row_out,
            "epoch_update_bytes": 4 * (n_train * row_in + n_hold * hold_in)}


def _per(cfg: dict, key: str, domain: str):
    v = cfg[key]
    return v[domain] if isinstance(v, dict) else v


def _up_rows(predicted: int | None) -> list[tuple[str, str]]:
    """`meshctl up --headless examples/vertical/mesh.yaml` as a subprocess; its epochs, bytes and accuracy.
    Its measured update_bytes per epoch must be `predicted` (`crossing`), when given."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", str(MESH)], cwd=tmp,
                              capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        took = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        return [(f"meshctl up examples/vertical/mesh.yaml failed (rc {proc.returncode}): {tail[0][:70]}", "")]
    runs = sorted((MESH.parent / ".meshctl" / "runs").glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime)
    events = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e.get("type") == "round_completed"]
    size = next((e.get("size") for e in events if e.get("type") == "intersection_computed"), "?")
    if not rounds:
        return [(f"meshctl up examples/vertical/mesh.yaml: no epochs in {runs[-1].parent.name}", f"{took:.1f} s")]
    last = rounds[-1]
    if predicted is not None:
        assert last["update_bytes"] == predicted, (last["update_bytes"], predicted)
    return [
        (f"meshctl up examples/vertical/mesh.yaml: whole run ({len(rounds)} epochs, intersection {size})",
         f"{took:.1f} s"),
        ("  time per epoch, median (real processes, ZeroMQ, incl. holdout evaluation)",
         f"{statistics.median(e['seconds'] for e in rounds) * 1000:.0f} ms"),
        ("  bytes per epoch at the coordinator, in / out", f"{last['bytes_in']:,} / {last['bytes_out']:,} B"),
        ("  update_bytes per epoch, measured = computed",
         f"{last['update_bytes']:,} B = {predicted if predicted is not None else '?':,} B"),
        ("  holdout accuracy, last epoch", f"{last['metrics'].get('accuracy', float('nan')) * 100:.2f}%"),
    ]


def _plan_job():
    """The example's compiled split job (None: the mesh does not compile to one)."""
    if not MESH.exists():
        return None
    from meshctl.compiler.compile import compile_mesh

    jobs = getattr(compile_mesh(MESH).plan, "split_models", None) or []
    return jobs[0] if jobs else None


def _crossing_rows(order: list[str], leader: str, bs: int, n_train: int, n_hold: int,
                   encoded: int) -> list[tuple[str, str]]:
    """What crosses per batch, computed from the parts (`crossing`) for both places of the top model,
    beside the bytes the in-process run encoded for the label-owner case (with headers)."""
    job = _plan_job()
    if job is None:
        return [(f"bytes per batch of {bs} that cross, encoded with headers (the other parts' acts + grads)",
                 f"{encoded:,} B")]
    away = [p for p in job.parts if p.domain != job.label_domain and p.out]
    rows = []
    for top_at in (None, "coordinator"):
        c = crossing(job.model_copy(update={"top_at": top_at}), n_train, n_hold)
        feeds = away if top_at is None else [p for p in job.parts if p.out]
        what = f"{len(feeds)} acts + {len(feeds)} grads, {sum(p.out for p in feeds)} floats/row" + (
            "" if top_at is None else "; logits")
        rows += [(f"bytes per batch of {bs}, top at {top_at or 'label_owner'} ({what}), coordinator in / out",
                  f"{c['batch_in']:,} / {c['batch_out']:,} B"),
                 (f"  update_bytes per epoch ({n_train} train + {n_hold} holdout rows)", f"{c['epoch_update_bytes']:,} B")]
    label_owner = crossing(job.model_copy(update={"top_at": None}), n_train, n_hold)["batch_in"]
    rows.append((f"  top at label_owner, as encoded in process ({len(away)} + {len(away)} messages, headers)",
                 f"{encoded:,} B (payload {label_owner:,} B)"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.1, help="activation noise for the noisy split row")
    ap.add_argument("--psi-ids", type=int, default=10_000)
    ap.add_argument("--up", action="store_true", help="also run meshctl up examples/vertical/mesh.yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)
    wire._with_messages(_Acts)  # here, not at import: a test imports `crossing` without touching the wire
    cfg, source = _config()
    leader = cfg["leader"]
    order = cfg.get("order") or [d for d in FILES if d != leader] + [leader]
    out: list[tuple[str, str]] = [(f"settings: {source}", "")]

    data = {d: _read(d, cfg) for d in order}
    rows, t_psi = _psi({d: data[d][0] for d in order}, leader)
    n = len(rows[leader])
    out.append((f"PSI, the example ({', '.join(f'{d} {len(data[d][0])}' for d in order)} ids -> {n})",
                f"{t_psi * 1000:.0f} ms"))
    big = {d: [f"id-{i}" for i in range(k * args.psi_ids // 4, k * args.psi_ids // 4 + args.psi_ids)]
           for k, d in enumerate(order)}
    big_rows, t_big = _psi(big, leader)
    out.append((f"PSI, {args.psi_ids:,} ids per party, {len(order)} parties (-> {len(big_rows[leader]):,})",
                f"{t_big:.2f} s"))

    # the agreed rows ordered by key in every domain, as domain/split.py does
    aligned = {d: sorted(rows[d], key=lambda r, d=d: data[d][0][r]) for d in order}
    index = {c: i for i, c in enumerate(cfg["classes"])}
    y = torch.tensor([index[data[leader][2][r]] for r in aligned[leader]], dtype=torch.int64)
    train, hold = split.holdout_split(n, cfg["holdout"], cfg["seed"])
    parts = [_standardise(data[d][1][aligned[d]], train) for d in order]
    tr_parts, ho_parts = [x[train] for x in parts], [x[hold] for x in parts]
    y_tr, y_ho = y[train], y[hold]
    opt = {"name": cfg["optimizer"], "lr": cfg["lr"]}
    epochs, bs, seed = cfg["epochs"], cfg["batch_size"], cfg["seed"]
    bottoms = [split.build_bottom({"kind": "mlp", "hidden": _per(cfg, "hidden", d), "out": _per(cfg, "out", d)},
                                  x.shape[1], seed + i) for i, (d, x) in enumerate(zip(order, parts))]
    width = sum(_per(cfg, "out", d) for d in order)
    top = split.build_top({"kind": "mlp", "hidden": cfg["top_hidden"]}, width, len(cfg["classes"]), seed + len(order))

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y_ho).float().mean())

    # warm-up (torch.optim.Adam's first use imports torch._dynamo): not timed
    split.train_centralised(copy.deepcopy(bottoms), copy.deepcopy(top), tr_parts, y_tr, epochs=1, batch_size=bs,
                            optimizer=opt, loss="cross_entropy", seed=seed)
    cb, ct = copy.deepcopy(bottoms), copy.deepcopy(top)
    t = time.perf_counter()
    split.train_centralised(cb, ct, tr_parts, y_tr, epochs=epochs, batch_size=bs, optimizer=opt,
                            loss="cross_entropy", seed=seed)
    t_central = (time.perf_counter() - t) / epochs
    with torch.no_grad():
        acc_central = accuracy(split.SplitNet(cb, ct).eval()(ho_parts))

    def run_split(noise: float, through_wire: bool) -> tuple[float, float, int]:
        workers = [split.BottomWorker(copy.deepcopy(b), opt, noise=noise, seed=seed + i) for i, b in enumerate(bottoms)]
        top_w = split.TopWorker(copy.deepcopy(top), "classification", "cross_entropy", opt)
        sizes: list[int] = []

        def on_batch(acts: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            # only the other parts' tensors cross (the label owner's own part stays home), as encoded
            away = [i for i, d in enumerate(order) if d != leader]
            got_a, a = _wire_round_trip([acts[i] for i in away], "acts")
            got_g, g = _wire_round_trip([grads[i] for i in away], "grad")
            assert all(torch.equal(u, v) for u, v in zip(got_a + got_g, [acts[i] for i in away]
                                                         + [grads[i] for i in away]))
            sizes.append(a + g)

        t = time.perf_counter()
        split.train_split_in_process(workers, top_w, tr_parts, y_tr, epochs=epochs, batch_size=bs, seed=seed,
                                     on_batch=on_batch if through_wire else None)
        per_epoch = (time.perf_counter() - t) / epochs
        return per_epoch, accuracy(split.predict_split(workers, top_w, ho_parts)), max(sizes, default=0)

    t_split, acc_split, _ = run_split(0.0, False)
    t_wire, acc_wire, batch_bytes = run_split(0.0, True)
    _, acc_noisy, _ = run_split(args.noise, False)

    out += [
        (f"aligned rows: {n} ({len(train)} train, {len(hold)} holdout); {epochs} epochs, batch {bs}, "
         + f"{opt['name']} lr {opt['lr']}", ""),
        ("time per epoch, centralised floor (one nn.Module, joined rows)", f"{t_central * 1000:.1f} ms"),
        ("time per epoch, split in process", f"{t_split * 1000:.1f} ms"),
        ("time per epoch, split in process, acts+grads through wire.encode/decode", f"{t_wire * 1000:.1f} ms"),
        *_crossing_rows(order, leader, bs, len(train), len(hold), batch_bytes),
        ("holdout accuracy, centralised on the joined rows", f"{acc_central * 100:.2f}%"),
        ("holdout accuracy, split (no noise)", f"{acc_split * 100:.2f}%  (through the wire: {acc_wire * 100:.2f}%)"),
        (f"holdout accuracy, split (activation noise sigma {args.noise})", f"{acc_noisy * 100:.2f}%"),
    ]
    try:
        from sklearn.linear_model import LogisticRegression

        joined_tr, joined_ho = torch.cat(tr_parts, 1).numpy(), torch.cat(ho_parts, 1).numpy()
        peer = LogisticRegression(max_iter=2000).fit(joined_tr, y_tr.numpy())
        out.append(("holdout accuracy, scikit-learn LogisticRegression (joined rows)",
                    f"{peer.score(joined_ho, y_ho.numpy()) * 100:.2f}%"))
    except ImportError:
        pass

    if args.up and MESH.exists():
        job = _plan_job()
        out += _up_rows(crossing(job, len(train), len(hold))["epoch_update_bytes"] if job else None)

    w = max(len(k) for k, _ in out)
    print(f"{'split learning, examples/vertical':<{w}}  value")
    print("-" * (w + 24))
    for k, v in out:
        print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
