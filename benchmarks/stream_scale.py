"""Streamed training at scale: rows/s and peak RSS of a domain daemon, next to DuckDB's own scan.

It writes a parquet of N rows (20 float features, a 3-class label and a train/test split
column) with DuckDB in one streamed COPY, so generating it needs no GBs, then measures each
of these in its own subprocess (peak RSS is the kernel's high-water mark of that process,
VmHWM, cross-checked by sampling it with psutil every 20 ms):

- imports: torch, DuckDB, pyarrow and the daemon imported, no row read (the baseline);
- scan: DuckDB's own rate over the same columns (the job's casts, fetched as Arrow batches,
  doing nothing): the floor;
- read: meshctl's streamed read alone (every training batch converted to tensors, no model);
- stream: a real `Daemon`'s `load()` and one round's `_train` (one local epoch) and
  `_evaluate`, with `data: stream`: the instructions the coordinator sends, without sockets;
- memory: the same with `data: memory`, at a size that fits (`--memory-rows`).

    python benchmarks/stream_scale.py                     # 10M rows streamed; 1M both ways
    python benchmarks/stream_scale.py --rows 2000000 --memory-rows 500000
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"f{i}" for i in range(20)]
CLASSES = ["a", "b", "c"]


def write_parquet(path: Path, rows: int) -> None:
    """N rows of a linearly separable-with-noise 3-class problem, deterministic (hashes of the row)."""
    import duckdb

    feats = ", ".join(f"(hash(i, {k}) % 1000000) / 1000000.0 - 0.5 AS f{k}" for k in range(20))
    score = [" + ".join(f"{math.sin(7 * c + k):.3f} * f{k}" for k in range(20)) for c in range(3)]
    noise = "((hash(i, 99) % 1000000) / 1000000.0 - 0.5) * 0.3"
    label = ("CASE WHEN s0 >= s1 AND s0 >= s2 THEN 'a' WHEN s1 >= s2 THEN 'b' ELSE 'c' END")
    split = "CASE WHEN hash(i, 7) % 5 = 0 THEN 'test' ELSE 'train' END"
    with duckdb.connect() as con:
        con.execute("SET preserve_insertion_order = true")
        con.execute(f"""COPY (
            SELECT {', '.join(FEATURES)}, {label} AS label, split FROM (
                SELECT *, {score[0]} + {noise} AS s0, {score[1]} AS s1, {score[2]} AS s2 FROM (
                    SELECT i, {feats}, {split} AS split FROM range({rows}) t(i)))
            ) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 100000)""")


def make_plan(source: Path, data: str, batch_size: int, buffer_rows: int | None):
    """A one-domain plan over `source` (the runtime reads plans; no mesh.yaml needed)."""
    from meshctl.compiler.plan import (
        Plan,
        PlanArchitecture,
        PlanColumn,
        PlanCoordinator,
        PlanDomain,
        PlanEvaluation,
        PlanHeader,
        PlanJob,
        PlanProduct,
        PlanRead,
        PlanTraining,
        mlp_tensors,
    )

    cols = [PlanColumn(name=f, type="float") for f in FEATURES] + [
        PlanColumn(name="label", type="category", values=CLASSES), PlanColumn(name="split", type="string")]
    product = PlanProduct(id="bank.rows", domain="bank", name="rows", source=str(source), format="parquet",
                          columns=cols)
    tensors = mlp_tensors(20, [64], 3)
    job = PlanJob(name="scale", participants=["bank"], reads=[PlanRead(domain="bank", product="bank.rows",
                                                                        client_id=0)],
                  features=FEATURES, target="label", classes=CLASSES,
                  architecture=PlanArchitecture(input_dim=20, hidden=[64], output_dim=3), tensors=tensors,
                  parameters=sum(math.prod(t.shape) for t in tensors),
                  training=PlanTraining(rounds=1, batch_size=batch_size, lr=0.05, momentum=0.9, data=data,
                                        buffer_rows=buffer_rows),
                  evaluation=PlanEvaluation(holdout_column="split", holdout_value="test"), quorum=1)
    return Plan(plan=PlanHeader(mesh="stream-scale", meshctl_version="0.1.0", protocol_version=1,
                                spec_hash="bench"),
                coordinator=PlanCoordinator(address="tcp://127.0.0.1:0"),
                domains=[PlanDomain(name="bank", address="local")], products=[product], jobs=[job]).with_hash()


def _high_water_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not `ru_maxrss`: Linux carries that across
    fork and exec, so a child of a large parent (a pytest worker holding torch) reports the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, source: Path, batch_size: int, buffer_rows: int | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    if mode == "imports":  # what every row below holds before it reads a row
        import duckdb
        import pyarrow  # noqa: F401

        from meshctl.runtime import daemon

        return {"rows": 0, "epoch_s": 0.0}
    if mode == "scan":
        import duckdb

        from meshctl.runtime.stream import FETCH_ROWS

        start, rows = time.perf_counter(), 0
        with duckdb.connect() as con:
            con.execute("SET threads TO 1")
            select = ", ".join(f"CAST({f} AS FLOAT) AS {f}" for f in FEATURES)
            sql = f"SELECT {select}, CAST(label AS VARCHAR) AS label, CAST(split AS VARCHAR) AS split " \
                  f"FROM read_parquet('{source}')"
            for batch in con.sql(sql).to_arrow_reader(FETCH_ROWS):
                rows += batch.num_rows
        return {"rows": rows, "epoch_s": time.perf_counter() - start}
    if mode.endswith("-path"):
        return data_path(mode.removesuffix("-path"), source, batch_size, buffer_rows)
    from meshctl.runtime import wire
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair
    from meshctl.runtime.stream import StreamData

    plan = make_plan(source, "memory" if mode == "memory" else "stream", batch_size, buffer_rows)
    keys = KeyPair.generate()
    daemon = Daemon(DaemonConfig(domain="bank", plan=plan, base_dir=source.parent, coordinator="tcp://127.0.0.1:1",
                                 server_key=keys.public, keys=keys, run="bench"))
    start = time.perf_counter()
    daemon.load()
    load_s = time.perf_counter() - start
    if "scale" not in daemon.jobs:
        raise SystemExit(f"the daemon refused the job: {daemon.refused}")
    st = daemon.jobs["scale"]
    if mode == "read":
        assert isinstance(st.data, StreamData)
        start, rows = time.perf_counter(), 0
        for _, y in st.data.batches("train"):
            rows += len(y)
        return {"rows": rows, "load_s": load_s, "epoch_s": time.perf_counter() - start}
    from meshctl.runtime.kernels.models import build_model

    weights = dict(build_model(plan.jobs[0]).state_dict())
    start = time.perf_counter()
    res, update = daemon._train(wire.TrainIns(job="scale", round=1, version=0), weights)
    epoch_s = time.perf_counter() - start
    assert isinstance(res, wire.TrainRes), res
    start = time.perf_counter()
    ev = daemon._evaluate(wire.EvalIns(job="scale", round=1, version=1), update)  # the trained model
    eval_s = time.perf_counter() - start
    return {"rows": res.examples, "load_s": load_s, "epoch_s": epoch_s, "eval_s": eval_s,
            "accuracy": ev.correct / max(ev.examples, 1), "test_rows": ev.examples}


def data_path(mode: str, source: Path, batch_size: int, buffer_rows: int | None) -> dict:
    """The data path alone (what `Daemon.load`, `_train` and `_evaluate` call for the job, without the
    domain's contract checks): read or open, one local epoch, one evaluation."""
    from meshctl.runtime.data import load_job_data
    from meshctl.runtime.kernels.models import build_model
    from meshctl.runtime.kernels.train import evaluate, evaluate_stream, train_local, train_stream
    from meshctl.runtime.stream import BUFFER_ROWS, StreamData

    plan = make_plan(source, mode, batch_size, buffer_rows)
    job, product = plan.jobs[0], plan.products[0]
    model = build_model(job, seed=0)
    start = time.perf_counter()
    if mode == "stream":
        data = StreamData.open(job, product, source.parent, 0)
        load_s, start = time.perf_counter() - start, time.perf_counter()
        train_stream(model, lambda: data.batches("train"), batch_size=batch_size,
                     buffer_rows=buffer_rows or BUFFER_ROWS)
        epoch_s = time.perf_counter() - start
        stats = evaluate_stream(model, data.batches("test"), classes=job.classes)
        rows = data.n_train
    else:
        held = load_job_data(job, product, source.parent, 0)
        load_s, start = time.perf_counter() - start, time.perf_counter()
        train_local(model, held.x_train, held.y_train, batch_size=batch_size)
        epoch_s = time.perf_counter() - start
        stats = evaluate(model, held.x_test, held.y_test, classes=job.classes)
        rows = len(held.y_train)
    k = len(job.classes)
    return {"rows": rows, "load_s": load_s, "epoch_s": epoch_s,
            "accuracy": sum(stats["confusion"][::k + 1]) / max(stats["n"][0], 1)}


def measure(mode: str, source: Path, batch_size: int, buffer_rows: int | None) -> dict:
    """Run `child` in a subprocess; its result plus its peak RSS (ru_maxrss, and psutil's samples)."""
    cmd = [sys.executable, __file__, "--child", mode, "--source", str(source), "--batch-size", str(batch_size)]
    if buffer_rows:
        cmd += ["--buffer", str(buffer_rows)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["sampled_mb"] = peak[0] / 2**20
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the streamed table (default 10M)")
    ap.add_argument("--memory-rows", type=int, default=1_000_000,
                    help="rows of the table trained both ways (default 1M)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=None, help="buffer_rows (default: meshctl's)")
    ap.add_argument("--data", type=Path, default=None, help="directory for the parquet files (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--source", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.source, args.batch_size, args.buffer)
        result["peak_mb"] = _high_water_mb()
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        where = args.data or Path(tmp)
        big, small = where / f"rows-{args.rows}.parquet", where / f"rows-{args.memory_rows}.parquet"
        for path, n in ((big, args.rows), (small, args.memory_rows)):
            if not path.exists():
                start = time.perf_counter()
                write_parquet(path, n)
                print(f"wrote {n:,} rows ({path.stat().st_size / 2**20:.0f} MB parquet) in "
                      f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
        runs = [("imports only (baseline)", "imports", big), ("DuckDB scan (floor)", "scan", big), ("meshctl streamed read", "read", big),
                ("meshctl streamed epoch", "stream", big), ("meshctl streamed epoch", "stream", small),
                ("meshctl in-memory epoch", "memory", small)]
        print(f"batch_size {args.batch_size}, buffer_rows {args.buffer or 'default'}, torch 1 thread, "
              f"DuckDB 1 thread\n")
        print(f"| {'what':<24} | {'rows':>10} | {'load s':>7} | {'epoch s':>7} | {'rows/s':>10} | "
              f"{'peak RSS MB':>11} | {'test acc':>8} |")
        print(f"|{'-' * 26}|{'-' * 12}:|{'-' * 8}:|{'-' * 8}:|{'-' * 11}:|{'-' * 12}:|{'-' * 9}:|")
        for label, mode, path in runs:
            r = measure(mode, path, args.batch_size, args.buffer)
            acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
            load = f"{r['load_s']:.1f}" if "load_s" in r else "-"
            print(f"| {label:<24} | {r['rows']:>10,} | {load:>7} | {r['epoch_s']:>7.1f} | "
                  f"{r['rows'] / r['epoch_s'] if r['rows'] else 0:>10,.0f} | "
                  f"{max(r['peak_mb'], r['sampled_mb']):>11.0f} | "
                  f"{acc:>8} |", flush=True)


if __name__ == "__main__":
    main()
