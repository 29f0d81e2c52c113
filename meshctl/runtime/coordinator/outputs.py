"""The outputs room: the event log (EventSink), checkpoints, metrics.csv and resume points."""

from __future__ import annotations

import csv
import json
import math
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from meshctl.compiler.plan import Plan, PlanJob, PlanSplit
from meshctl.runtime import events as ev
from meshctl.runtime import wire


class EventSink:
    """Numbers events, appends them hash-chained to events.jsonl and publishes them.

    Each line carries the audit chain's `prev` and `hash` (meshctl.runtime.audit); `close()`
    records the head in run.json and appends the run to the mesh-wide `.meshctl/audit.jsonl`.
    `pub` is an XPUB socket or a Link (anything with `send_string` or `publish`);
    `anchor` defaults to the one computed from the run directory's run.json and plan.toml.
    """

    def __init__(self, path: Path, pub: Any, anchor: str | None = None):
        from meshctl.runtime.audit import Chain

        _drop_torn_line(path)
        self.chain = Chain.open(path, anchor)
        self.file = path.open("a", encoding="utf-8")
        self.pub = pub
        self.publish = pub.send_string if hasattr(pub, "send_string") else pub.publish
        self.seq = len(self.chain.hashes)
        """Events so far: a resumed run's coordinator numbers on from the last line."""

    def emit(self, event: ev.Event) -> ev.Event:
        self.seq += 1
        event = event.model_copy(update={"seq": self.seq, "ts": time.time()})
        try:
            line = self.chain.seal(event.to_dict())
            self.file.write(line + "\n")
            self.file.flush()
        except BaseException:  # e.g. KeyboardInterrupt in a host process, between sealing and writing
            self.file.flush()
            self.chain.resync(Path(self.file.name))
            raise
        self.publish(line)
        return event

    def close(self) -> None:
        self.file.close()
        try:
            self.chain.finish(Path(self.file.name).parent)
        except (OSError, ValueError) as err:  # the run's own log is complete; say what is missing
            print(f"warning: audit head not recorded: {err}", file=sys.stderr)


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that a killed process left half written (it was never an event)."""
    try:
        f = path.open("r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, 2)
        if not size or (f.seek(size - 1), f.read(1))[1] == b"\n":
            return
        f.seek(max(0, size - (1 << 20)))  # a torn line is one event: look back at most 1 MiB
        tail = f.read()
        f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


class Checkpoints:
    """A writer thread for safetensors files (weights only, written atomically); reports what it wrote."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.todo: queue.Queue[tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None] = queue.Queue()
        self.written: queue.Queue[tuple[str, int, Path]] = queue.Queue()
        self.error = ""
        """Why a write failed (a full disk, say); the run fails with it."""
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._write, name="checkpoints", daemon=True)
        self.thread.start()

    def put(self, path: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.todo.put((path, weights, meta))

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.todo.put(None)
        if self.thread is not None:
            self.thread.join()

    def report(self, sink: Any) -> None:
        """Emit CheckpointWritten for every per-round file written so far (main thread only)."""
        while True:
            try:
                job, rnd, path = self.written.get_nowait()
            except queue.Empty:
                return
            if path.parent.name == job and path.parent.parent.name == "checkpoints":  # per-round weights (the
                # final model has its own event; a round's state beside them is no checkpoint of its own)
                sink.emit(ev.CheckpointWritten(job=job, round=rnd, path=str(path.relative_to(self.run_dir))))

    def _write(self) -> None:
        from safetensors.torch import save_file

        while (item := self.todo.get()) is not None:
            path, weights, meta = item
            if self.error:  # after a failed write the rest is drained, not written
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=meta)
                tmp.replace(path)
            except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
                self.error = f"cannot write {path}: {getattr(err, 'strerror', None) or err}"
                continue
            self.written.put((meta["job"], int(meta["round"]), path))


def newest_checkpoint(run_dir: Path, plan: Plan, job: PlanJob) -> tuple[int, wire.Tensors | None]:
    """(round, weights) of the job's newest valid checkpoint, else (0, None)."""
    from safetensors import safe_open

    expect = {t.name: (t.shape, t.dtype) for t in job.tensors}
    for path in sorted((run_dir / "checkpoints" / job.name).glob("round-*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception:  # noqa: BLE001, S112 - a damaged file: try the one before
            continue
        got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in weights.items()}
        if got == expect and meta.get("plan_hash") == plan.plan.hash:
            return int(meta["round"]), weights
    return 0, None


def split_point_path(run_dir: Path, job: str, epoch: int) -> Path:
    """Where the coordinator records that every part of split job `job` kept its state after `epoch`
    (a safetensors file without tensors: the job, epoch, plan hash and the epoch's metrics as metadata)."""
    return run_dir / "checkpoints" / job / f"round-{epoch:04d}.safetensors"


def write_split_point(run_dir: Path, plan: Plan, job: str, epoch: int, metrics: dict[str, float]) -> Path:
    """Record split job `job`'s resume point after `epoch` (atomically, now: the domains kept their state
    already). Raises OSError."""
    from safetensors.torch import save_file

    path = split_point_path(run_dir, job, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"job": job, "round": str(epoch), "plan_hash": plan.plan.hash, "split": "true",
            "metrics": json.dumps(metrics)}
    try:
        save_file({}, str(tmp), metadata=meta)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own error for a full disk
        raise OSError(str(err)) from None
    tmp.replace(path)
    return path


def newest_split_point(run_dir: Path, plan: Plan, job: str) -> tuple[int, dict[str, float]]:
    """(epoch, that epoch's holdout metrics) of split job `job`'s newest resume point of this plan, else (0, {})."""
    from safetensors import safe_open

    for path in sorted((run_dir / "checkpoints" / job).glob("round-*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            metrics = json.loads(meta.get("metrics", "{}"))
            epoch = int(meta.get("round", ""))
        except Exception:  # noqa: BLE001, S112 - a damaged file: try the one before
            continue
        if meta.get("job") == job and meta.get("split") == "true" and meta.get("plan_hash") == plan.plan.hash \
                and path == split_point_path(run_dir, job, epoch) and isinstance(metrics, dict):
            return epoch, {str(k): float(v) for k, v in metrics.items()}
    return 0, {}


def state_path(run_dir: Path, job: str, rnd: int) -> Path:
    """Where the coordinator keeps what job `job` carries across rounds as it was after round `rnd`
    (strategy state, adaptive clip norm, policy counters): beside the round's weights, written before them."""
    return run_dir / "checkpoints" / job / "state" / f"round-{rnd:04d}.safetensors"


def state_meta(plan: Plan, job: PlanJob, rnd: int, scalars: dict[str, Any]) -> dict[str, str]:
    """The metadata of a state file: the job, round and plan it belongs to, and the scalars as JSON."""
    return {"job": job.name, "round": str(rnd), "plan_hash": plan.plan.hash, "scalars": json.dumps(scalars)}


def load_state(run_dir: Path, plan: Plan, job: PlanJob, rnd: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) the job's state file of round `rnd` holds. Raises ValueError (one line) when it is
    missing, damaged or of another plan: the resumed job cannot go on as it would have."""
    from safetensors import safe_open

    path = state_path(run_dir, job.name, rnd)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        scalars = json.loads(meta.get("scalars", "{}"))
    except FileNotFoundError:
        raise ValueError(f"no state of round {rnd} at {path.relative_to(run_dir)}") from None
    except Exception as err:  # noqa: BLE001 - a damaged file: safetensors' or json's own error
        raise ValueError(f"cannot read {path.relative_to(run_dir)}: {err}") from None
    if meta.get("plan_hash") != plan.plan.hash or meta.get("round") != str(rnd) or not isinstance(scalars, dict):
        raise ValueError(f"{path.relative_to(run_dir)} is not the state of this plan's round {rnd}")
    return tensors, scalars


def model_meta(plan: Plan, job: PlanJob, rnd: int, norm: dict[str, list[float]] | None = None) -> dict[str, str]:
    """The safetensors metadata of a checkpoint or model: what a reader needs to use the weights."""
    meta = {"job": job.name, "round": str(rnd), "plan_hash": plan.plan.hash,
            "features": ",".join(job.features), "classes": ",".join(job.classes),
            "architecture": job.architecture.model_dump_json()}
    norm = dict(norm or {})
    if "vocab" in norm:  # the agreed one-hot vocabulary of categorical features
        meta["vocabulary"] = json.dumps(norm.pop("vocab"))
    if norm:
        meta["standardize"] = json.dumps(norm)
    return meta


METRIC_COLUMNS = ("auroc", "f1", "precision", "recall", "mae", "rmse", "r2")
"""metrics.csv's `test_<metric>` columns after the first 8 (loss and accuracy are among them), the same for
every job: a job's cell is empty when it does not declare the metric, or when it is undefined (NaN)."""
DOMAIN_COLUMNS = ("loss", "accuracy", *METRIC_COLUMNS)


def trim_metrics(run_dir: Path, job: PlanJob | PlanSplit, last: int) -> None:
    """Drop metrics.csv and domain_metrics.csv rows of `job` after round `last` (they are trained again)."""
    for name in ("metrics.csv", "domain_metrics.csv"):
        path = run_dir / name
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if not (r[0] == job.name and int(r[1]) > last)]
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


def _cell(metrics: dict[str, float], name: str) -> str:
    value = metrics.get(name)
    return "" if value is None or not math.isfinite(value) else f"{value:.6f}"


def append_row(path: Path, header: list[str], row: dict[str, object]) -> None:
    """Append `row` under the file's header (written if the file is new; an older file keeps its own)."""
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), header)
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerow([row.get(h, "") for h in header])


def write_personal(run_dir: Path, event: Any) -> None:
    """personal.csv rows of a Personalized event: job, domain (or `pooled`), phase (before/after),
    metric, value, and the holdout examples behind it. Raises OSError."""
    header = ["job", "domain", "phase", "metric", "value", "examples"]
    for domain, sides in [*event.domains.items(), ("pooled", event.pooled)]:
        n = event.examples.get(domain, sum(event.examples.values()))
        for phase, values in sides.items():
            for metric in values:
                append_row(run_dir / "personal.csv", header, {"job": event.job, "domain": domain, "phase": phase,
                                                           "metric": metric, "value": _cell(values, metric),
                                                           "examples": n})


def append_metrics(run_dir: Path, job: PlanJob, rnd: int, participants: int, loss: float,
                   metrics: dict[str, float], *, evaluated: int, eval_examples: int,
                   domain_metrics: dict[str, dict[str, float]] | None = None,
                   domain_examples: dict[str, int] | None = None,
                   held_out: tuple[dict[str, float], int] | None = None, product_columns: bool = False,
                   wire_bytes: tuple[int, int, int] | None = None) -> None:
    """One metrics.csv row for a completed round, with how many domains and holdout examples its test
    metrics cover (they change when a domain drops out), and one domain_metrics.csv row per evaluating
    domain. `product_columns`: the file has the evaluation product's columns (some job of the run's plan
    declares one: the header is the run's, whichever job writes first). `wire_bytes`: the round's bytes in,
    out and of its updates (the last columns). Raises OSError (a full disk, say)."""
    header = ["job", "round", "participants", "train_loss", "test_loss", "test_accuracy", "evaluated",
              "eval_examples", *(f"test_{m}" for m in METRIC_COLUMNS)]
    row: dict[str, object] = {"job": job.name, "round": rnd, "participants": participants,
                              "train_loss": f"{loss:.6f}", "evaluated": evaluated, "eval_examples": eval_examples}
    row.update({f"test_{m}": _cell(metrics, m) for m in DOMAIN_COLUMNS})
    if product_columns or job.evaluation.product:  # the evaluation product's score: product_<metric> columns
        header += ["product_examples", *(f"product_{m}" for m in DOMAIN_COLUMNS)]
        values, examples = held_out or ({}, "")
        row.update({"product_examples": examples, **{f"product_{m}": _cell(values, m) for m in DOMAIN_COLUMNS}})
    header += ["bytes_in", "bytes_out", "update_bytes"]
    row.update(dict(zip(["bytes_in", "bytes_out", "update_bytes"], wire_bytes or ("", "", ""))))
    append_row(run_dir / "metrics.csv", header, row)
    if domain_metrics is None:
        return
    header = ["job", "round", "domain", "examples", *(f"test_{m}" for m in DOMAIN_COLUMNS)]
    for domain, values in domain_metrics.items():
        row = {"job": job.name, "round": rnd, "domain": domain, "examples": (domain_examples or {}).get(domain, "")}
        row.update({f"test_{m}": _cell(values, m) for m in DOMAIN_COLUMNS})
        append_row(run_dir / "domain_metrics.csv", header, row)
