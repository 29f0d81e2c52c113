"""The coordinator: runs a plan's jobs round by round over a Curve ROUTER, emits events.

Per round of a job: send TrainIns to every participant (weights attached only to
daemons that lack the current version) -> collect TrainRes -> FedAvg -> send
EvalIns with the new weights, and right behind it the next round's TrainIns (no
weights: the daemon just received them) -> collect EvalRes -> emit RoundCompleted,
checkpoint in the background. Everything is pushed; nothing polls a peer.

Every message is checked before use: the sender's identity is the Curve
User-Id, never the header's claim; job, round, tensor names, shapes and sizes
must match the plan. A bad message becomes a MessageRejected event and is
dropped.

Governance at run time: each domain's Hello carries its own decisions on the
plan's jobs (emitted as PolicyDecided with stage `runtime`) and its contract
checks (ContractChecked); a domain that refuses a job is left out of it. A job
runs with the participants that remain when at least `quorum` do; a round waits
up to `round_timeout_s` and then goes on without stragglers if quorum replied;
`scope: round` policies gate each aggregation. A domain silent for
`HEARTBEAT_TIMEOUT_S` is declared lost.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import queue
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.data import pooled_mean_std
from meshctl.runtime.governance import RoundGate, RoundUpdate
from meshctl.runtime.kernels import mlp
from meshctl.runtime.keys import (
    EVENTS_ZAP_DOMAIN,
    MESH_ZAP_DOMAIN,
    KeyPair,
    curve_server,
    start_authenticator,
)
from meshctl.runtime.run import DETACHED_FILE, EVENTS_FILE, RunManifest, hold_run, last_line, run_ended
from meshctl.runtime.run import PID_FILE, stop_reason
from meshctl.runtime.strategy import Strategy

POLL_MS = 250
HEARTBEAT_TIMEOUT_S = 15.0
"""A joined domain that sends nothing for this long is lost (MESHCTL_HEARTBEAT_TIMEOUT_S overrides)."""
HEARTBEAT_EVENT_S = 5.0
"""At most one DomainHeartbeat event per domain this often."""
INTERNAL_ERROR = 2
"""Exit status (meshctl.errors.InternalError's) of a coordinator whose run ended on an unexpected error;
it wrote run_completed ok=false with the reason, so the run is over and not to be resumed."""
REJECTION_CODES = frozenset({"refused", "unknown-job", "bad-round", "bad-weights", "stale",
                             "bad-standardization", "unexpected"})
"""ErrorReply codes by which a domain rejects one instruction (it leaves the job, not the run)."""


def heartbeat_timeout() -> float:
    """`HEARTBEAT_TIMEOUT_S`, or MESHCTL_HEARTBEAT_TIMEOUT_S when set to a positive number."""
    try:
        value = float(os.environ.get("MESHCTL_HEARTBEAT_TIMEOUT_S", ""))
    except ValueError:
        return HEARTBEAT_TIMEOUT_S
    return value if value > 0 else HEARTBEAT_TIMEOUT_S


class JobAborted(Exception):
    """The current job cannot go on; the message says why."""


class Stopped(BaseException):  # not an Exception: no `except Exception` may swallow it
    """SIGTERM/SIGINT asked the coordinator to stop."""


class EventSink:
    """Numbers events, appends them hash-chained to events.jsonl and publishes them on XPUB.

    Each line carries the audit chain's `prev` and `hash` (meshctl.runtime.audit); `close()`
    records the head in run.json and appends the run to the mesh-wide `.meshctl/audit.jsonl`.
    `anchor` defaults to the one computed from the run directory's run.json and plan.toml.
    """

    def __init__(self, path: Path, pub: zmq.Socket, anchor: str | None = None):
        from meshctl.runtime.audit import Chain

        _drop_torn_line(path)
        self.chain = Chain.open(path, anchor)
        self.file = path.open("a", encoding="utf-8")
        self.pub = pub
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
        self.pub.send_string(line)
        return event

    def close(self) -> None:
        import sys

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


@dataclass
class _Peer:
    domain: str
    identity: bytes
    rows: dict[str, int] = field(default_factory=dict)
    stats: dict[str, wire.FeatureStats] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    """Weights version each job's daemon holds."""
    refused: dict[str, str] = field(default_factory=dict)
    """Jobs the domain refused to take part in, with its reasons."""
    secagg: dict[str, str] = field(default_factory=dict)
    """Secure aggregation: job -> the domain's X25519 public key for it."""
    state: str = "idle"
    last_seen: float = field(default_factory=time.monotonic)
    last_beat_event: float = 0.0


class Coordinator:
    """Executes a plan. `run()` returns the process exit code (0 ok, 1 a job failed, 2 an internal error)."""

    def __init__(self, manifest: RunManifest, plan: Plan, children: dict[int, str] | None = None,
                 resumed: str = ""):
        self.m = manifest
        self.plan = plan
        self.resumed = resumed
        """Why the previous coordinator process of this run ended, when this one resumes it."""
        self.children = dict(children or {})
        """pid -> domain, for daemons this process forked."""
        self.run_dir = manifest.path
        self.by_key = {k.encode(): d for d, k in manifest.domain_keys.items()}
        self.peers: dict[str, _Peer] = {}
        self.failed: dict[str, str] = {}
        """Domains that failed, with the reason."""
        self.inbox: dict[tuple[str, int, str], tuple[Any, wire.Tensors]] = {}
        self.bytes_in: dict[tuple[str, int], int] = {}
        self.bytes_out: dict[tuple[str, int], int] = {}
        self.current: PlanJob | None = None
        self.refused: dict[str, str] = {}
        """Domains the coordinator refused (another plan), with the reason."""
        self.dropped: dict[str, str] = {}
        """Domains that left the current job by rejecting an instruction, with the reason."""
        self.closed: set[tuple[str, int]] = set()
        """(kind, round) of the current job whose collection is over: later replies are late."""
        self.norms: dict[tuple[int, str], float] = {}
        self.job_epsilon: dict[tuple[str, str], float] = {}
        """DP training: ε charged in this run per (job, product)."""
        self.gate: RoundGate | None = None
        self.round = 0
        self.heartbeat_timeout = heartbeat_timeout()
        self.next_liveness = 0.0
        self.stop_reason = ""
        self.closing = False
        self.checkpoints: queue.Queue[tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None] = queue.Queue()
        self.written: queue.Queue[tuple[str, int, Path]] = queue.Queue()
        self.write_error = ""
        """Why the checkpoint writer failed (a full disk, say); the run fails with it."""

    # -- lifecycle -----------------------------------------------------------------
    def run(self, *, restore_signals: bool = True) -> int:
        """Coordinate the run; `restore_signals=False` (the coordinator process, about to exit) keeps
        SIGINT/SIGTERM ignored after the last event, so a late signal cannot change the exit status."""
        torch.set_num_threads(max(1, self.m.threads))
        self.ctx = zmq.Context()
        keys = KeyPair.load(self.m.coordinator_key)
        self.auth = start_authenticator(self.ctx, {
            MESH_ZAP_DOMAIN: set(self.by_key),
            EVENTS_ZAP_DOMAIN: {k.encode() for k in self.m.observer_keys},
        })
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 1000
        self.router.router_mandatory = True
        self.router.maxmsgsize = wire.MAX_HEADER_BYTES + self.limits[0]  # ZeroMQ drops a larger frame unread
        curve_server(self.router, keys, MESH_ZAP_DOMAIN)
        self.router.bind(self.m.router)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 2000
        self.pub.sndhwm = 1_000_000
        curve_server(self.pub, keys, EVENTS_ZAP_DOMAIN)
        self.pub.bind(self.m.events)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        # A signal only records the request and wakes the poller (its C handler writes to this
        # socket); the main loop raises Stopped at a safe point, never inside a lock, a queue or a write.
        self.wake_r, wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.poller.register(self.wake_r.fileno(), zmq.POLLIN)
        self.sink = EventSink(self.run_dir / EVENTS_FILE, self.pub)
        writer = threading.Thread(target=self._write_checkpoints, name="checkpoints", daemon=True)
        writer.start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        started = time.time()
        code, ok, reason = 1, True, ""
        try:
            self._wait_for_observer()
            if self.resumed:  # what RunStarted and the compile-time decisions said is in the log already
                self.sink.emit(ev.RunResumed(run=self.m.run, reason=self.resumed, rounds={
                    name: rnd for name, (rnd, _) in self.resume_points.items()}))
            else:
                self.sink.emit(ev.RunStarted(run=self.m.run, mesh=self.plan.plan.mesh, plan_hash=self.plan.plan.hash,
                                             run_dir=str(self.run_dir), jobs=self._work_names(),
                                             domains=[d.name for d in self.plan.domains]))
                for d in self.plan.decisions:
                    self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject,
                                                    effect=d.effect, reason=d.reason, at=d.at))
                self._list_products()
            self._work()
        except JobAborted as err:
            ok, reason = False, str(err)
        except Stopped:
            ok, reason = False, self.stop_reason
        except Exception as err:  # noqa: BLE001 - a bug or an I/O fault: a failed run, never a success
            traceback.print_exc()  # into the coordinator's own log; the event says what and where
            code, ok, reason = INTERNAL_ERROR, False, f"internal error: {type(err).__name__}: {err}"
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the
                signal.signal(signum, signal.SIG_IGN)      # run's last events short
            self.checkpoints.put(None)
            writer.join()
            if ok and self.write_error:  # the final model (or a checkpoint) was not written
                ok, reason = False, self.write_error
            self._report_checkpoints()
            self.sink.emit(ev.RunCompleted(run=self.m.run, ok=ok, seconds=time.time() - started, reason=reason))
            self._shutdown_daemons(reason or "run completed")
            self.sink.close()
            self.auth.stop()
            self.router.close()
            self.pub.close()
            self.ctx.term()
            for secret in (self.run_dir / "keys").glob("*.key_secret"):  # also when `up` detached
                secret.unlink(missing_ok=True)
            signal.set_wakeup_fd(previous_wakeup)
            self.wake_r.close()
            wake_w.close()
            for sig, handler in previous.items() if restore_signals else ():  # never leave a host process
                signal.signal(sig, handler)  # (or its children, which inherit SIG_IGN) deaf to Ctrl-C
        return 0 if ok else code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Record a stop request; `_check_stop` acts on it where the state is consistent."""
        self.stop_reason = (self.stop_reason or stop_reason(self.run_dir)  # `meshctl stop` says who asked
                            or f"stopped by {signal.Signals(signum).name}")

    def _check_stop(self) -> None:
        if self.stop_reason:
            raise Stopped(self.stop_reason)

    def _wait_for_observer(self) -> None:
        deadline = time.monotonic() + self.m.wait_for_observer_s
        while self.m.wait_for_observer_s and time.monotonic() < deadline:
            ready = dict(self.poller.poll(50))
            self._check_stop()
            if self.pub in ready and self.pub.recv()[:1] == b"\x01":
                return

    def _shutdown_daemons(self, reason: str) -> None:
        self.closing = True
        for peer in self.peers.values():
            self._send(peer, wire.Shutdown(reason=reason))
        joined = set(self.peers)
        for pid, domain in list(self.children.items()):
            if domain not in joined:  # never in the conversation: nothing to finish
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for pid in list(self.children):
            os.kill(pid, signal.SIGTERM)
        while self.children and time.monotonic() < deadline + 5.0:
            self._reap()
            time.sleep(0.02)
        for pid in list(self.children):
            os.kill(pid, signal.SIGKILL)
            self._reap()

    # -- one job -------------------------------------------------------------------
    def _work_names(self) -> list[str]:
        """What this run does, for RunStarted (an analysis run overrides this and `_work`)."""
        return [j.name for j in self.plan.jobs]

    def _work(self) -> None:
        for job in self.plan.jobs:
            if job.name not in self.completed:
                self._run_job(job)

    @functools.cached_property
    def completed(self) -> set[str]:
        """Jobs a previous coordinator process of this run completed (none for a fresh run)."""
        if not self.resumed:
            return set()
        return {e.job for e in ev.read_events(str(self.run_dir / EVENTS_FILE)) if isinstance(e, ev.JobCompleted)}

    @functools.cached_property
    def resume_points(self) -> dict[str, tuple[int, wire.Tensors | None]]:
        """Job -> (round, weights) of its newest checkpoint, for the jobs a resumed run still has to do."""
        if not self.resumed:
            return {}
        return {j.name: self._checkpoint(j) for j in self.plan.jobs if j.name not in self.completed}

    def _checkpoint(self, job: PlanJob) -> tuple[int, wire.Tensors | None]:
        """(round, weights) of the job's newest valid checkpoint, else (0, None)."""
        from safetensors import safe_open

        expect = {t.name: (t.shape, t.dtype) for t in job.tensors}
        for path in sorted((self.run_dir / "checkpoints" / job.name).glob("round-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            except Exception:  # noqa: BLE001, S112 - a damaged file: try the one before
                continue
            got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in weights.items()}
            if got == expect and meta.get("plan_hash") == self.plan.plan.hash:
                return int(meta["round"]), weights
        return 0, None

    def _list_products(self) -> None:
        """One ProductListed per product of the plan, as the catalog shows it."""
        owners = {d.name: d.owner for d in self.plan.domains}
        for p in self.plan.products:
            self.sink.emit(ev.ProductListed(
                product=p.id, domain=p.domain, owner=owners.get(p.domain) or p.owner,
                classification=p.classification, access=p.access, contract=p.contract, tags=list(p.tags),
                description=p.description, freshness=p.sla.freshness if p.sla else "",
                columns=[{"name": c.name, "type": c.type, "pii": c.pii,
                          "masking": c.masking or ("drop" if c.pii == "indirect" else "")} for c in p.columns]))

    def _run_job(self, job: PlanJob) -> None:
        self.current, self.dropped, self.closed, self.round = job, {}, set(), 0
        try:
            self._train_job(job)
        except JobAborted as err:
            self.sink.emit(ev.JobFailed(job=job.name, round=self.round, reason=str(err)))
            raise
        finally:
            self.current, self.gate = None, None
            self.norms.clear()

    def _train_job(self, job: PlanJob) -> None:
        participants = self._await_quorum(job)
        self.gate = RoundGate(self.plan, job) or None
        self.sink.emit(ev.JobStarted(job=job.name, participants=participants, rounds=job.training.rounds,
                                     parameters=job.parameters, quorum=job.quorum))
        arch = job.architecture
        model = mlp(arch.input_dim, arch.hidden, arch.output_dim, seed=job.training.seed)
        weights = {t.name: model.state_dict()[t.name].detach().clone() for t in job.tensors}
        version, resumed = self.resume_points.pop(job.name, (0, None))
        if resumed is not None:  # a resumed run: on from the newest checkpoint
            weights = resumed
            self._trim_metrics(job, version)
        started = time.time()
        metrics: dict[str, float] = {}
        strategy = Strategy(job.aggregation)
        norm = self._standardization(job, participants)
        first = version + 1
        round_start = {first: time.time()}
        self.sink.emit(ev.RoundStarted(job=job.name, round=first, participants=participants))
        self._broadcast(job, participants, wire.TrainIns(job=job.name, round=first, version=version,
                                                          participants=participants,
                                                          peer_keys=self._peer_keys(job, participants), **norm),
                        weights, first)
        for r in range(first, job.training.rounds + 1):
            self.round = r
            asked = list(participants)
            results = self._collect(job, "train_res", r, participants)
            contributors = list(results)
            self._gate_round(job, r, results)
            total = sum(msg.examples for msg, _ in results.values())
            try:
                if job.privacy.secure_aggregation:
                    new, note = self._secure_sum(job, r, asked, results, strategy, weights), ""
                else:
                    new, note = strategy.aggregate(
                        [weights[t.name] for t in job.tensors], contributors,
                        [[results[d][1][t.name] for t in job.tensors] for d in contributors],
                        [results[d][0].examples for d in contributors])
            except ValueError as err:
                raise JobAborted(f"job {job.name} round {r}: {err}") from None
            weights = {t.name: w for t, w in zip(job.tensors, new)}
            version = r
            train_loss = sum(m.loss * m.examples for m, _ in results.values()) / max(total, 1)
            participants = self._active(participants)
            self._broadcast(job, participants, wire.EvalIns(job=job.name, round=r, version=r), weights, r)
            if r < job.training.rounds:
                round_start[r + 1] = time.time()
                self.sink.emit(ev.RoundStarted(job=job.name, round=r + 1, participants=participants))
                self._broadcast(job, participants, wire.TrainIns(job=job.name, round=r + 1, version=r,
                                                              participants=participants,
                                                              peer_keys=self._peer_keys(job, participants)),
                                weights, r + 1)
            evals = self._collect(job, "eval_res", r, participants)
            n = sum(m.examples for m, _ in evals.values())
            metrics = {"loss": sum(m.loss_sum for m, _ in evals.values()) / max(n, 1),
                       "accuracy": sum(m.correct for m, _ in evals.values()) / max(n, 1)}
            self.sink.emit(ev.RoundCompleted(
                job=job.name, round=r, rounds=job.training.rounds, participants=contributors,
                train_loss=train_loss, metrics=metrics, bytes_in=self.bytes_in.pop((job.name, r), 0),
                bytes_out=self.bytes_out.pop((job.name, r), 0), seconds=time.time() - round_start.pop(r),
                aggregation=note, epsilon=max((v for (j, _), v in self.job_epsilon.items() if j == job.name),
                                              default=None)))
            self._append_metrics(job, r, len(contributors), train_loss, metrics)
            if self.m.checkpoint:
                path = self.run_dir / "checkpoints" / job.name / f"round-{r:04d}.safetensors"
                self.checkpoints.put((path, weights, self._model_meta(job, r, norm)))
            self._report_checkpoints()
            if self.write_error:
                raise JobAborted(f"job {job.name} round {r}: {self.write_error}")
        model_path = self.run_dir / "models" / f"{job.name}.safetensors"
        self.checkpoints.put((model_path, weights, self._model_meta(job, version, norm)))
        self.sink.emit(ev.JobCompleted(job=job.name, rounds=version, metrics=metrics,
                                       model_path=str(model_path.relative_to(self.run_dir)),
                                       seconds=time.time() - started))

    def _standardization(self, job: PlanJob, participants: list[str]) -> dict[str, list[float]]:
        """Mesh-wide mean/std pooled exactly from the participants' sums; {} if not standardizing."""
        if not job.training.standardize:
            return {}
        d = len(job.features)
        stats = []
        for name in participants:
            s = self.peers[name].stats.get(job.name)
            if s is None or len(s.sum) != d or len(s.sumsq) != d:
                raise JobAborted(f"job {job.name}: domain {name} sent no usable feature sums to standardize with")
            stats.append((s.count, s.sum, s.sumsq))
        try:
            mean, std = pooled_mean_std(stats)
        except ValueError as err:
            raise JobAborted(f"job {job.name}: {err}") from None
        return {"mean": mean, "std": std}

    def _excluded(self, job: PlanJob) -> dict[str, str]:
        """Participants that cannot take part in `job` now, each with a reason naming who decided."""
        out = {}
        for d in job.participants:
            peer = self.peers.get(d)
            if d in self.refused:
                out[d] = f"domain {d} was refused: {self.refused[d]}"
            elif d in self.failed:
                out[d] = f"domain {d} {self.failed[d]}"
            elif d in self.dropped:
                out[d] = f"domain {d} {self.dropped[d]}"
            elif peer is not None and job.name in peer.refused:
                out[d] = f"domain {d} refused the job: {peer.refused[job.name]}"
        return out

    def _active(self, participants: list[str]) -> list[str]:
        return [d for d in participants if d in self.peers and d not in self.failed and d not in self.dropped]

    def _await_quorum(self, job: PlanJob) -> list[str]:
        """The participants the job starts with: all of them, or at least `quorum` once the rest answered
        (refused, failed) or the join timeout passed. Fewer fail the job with every domain's reason."""
        deadline = time.monotonic() + self.m.join_timeout_s
        announced: tuple[str, ...] | None = None
        while True:
            out = self._excluded(job)
            have = [d for d in job.participants if d in self.peers and d not in out]
            pending = [d for d in job.participants if d not in self.peers and d not in out]
            late = time.monotonic() > deadline
            if not pending or late:
                if len(have) >= job.quorum:
                    return have
                late_join = f"domains {', '.join(pending)} did not join within {self.m.join_timeout_s:.0f}s"
                why = list(out.values()) + ([late_join] if pending else [])
                raise JobAborted(f"job {job.name}: {len(have)} of {len(job.participants)} participants can take "
                                 f"part, quorum is {job.quorum}: {'; '.join(why)}")
            if tuple(have) != announced:
                announced = tuple(have)
                self.sink.emit(ev.JobWaiting(job=job.name, have=have, need=job.quorum))
            self._pump()

    def _collect(self, job: PlanJob, kind: str, rnd: int, participants: list[str]) -> dict[str, tuple[Any, wire.Tensors]]:
        """Replies of round `rnd` from the active participants; after `round_timeout_s` those of at least
        `quorum` of them (the rest are stragglers). Fewer than quorum left fails the job."""
        start = time.monotonic()
        while True:
            active = self._active(participants)
            if len(active) < job.quorum:
                gone = "; ".join(v for d, v in self._excluded(job).items() if d in participants)
                raise JobAborted(f"job {job.name} round {rnd}: {len(active)} of {len(participants)} participants "
                                 f"remain, quorum is {job.quorum}: {gone}")
            got = [d for d in active if (kind, rnd, d) in self.inbox]
            if len(got) == len(active):
                break
            waited = time.monotonic() - start
            if waited > job.round_timeout_s:
                missing = [d for d in active if d not in got]
                if len(got) < job.quorum:
                    raise JobAborted(f"job {job.name} round {rnd}: no reply from {', '.join(missing)} within "
                                     f"{job.round_timeout_s:.0f}s and only {len(got)} replied, quorum is "
                                     f"{job.quorum}")
                self.sink.emit(ev.StragglersDropped(job=job.name, round=rnd, phase=kind.removesuffix("_res"),
                                                    domains=missing, waited_s=waited))
                break
            self._pump()
        self.closed.add((kind, rnd))
        results = {d: self.inbox.pop((kind, rnd, d)) for d in got}
        for key in [k for k in self.inbox if k[:2] == (kind, rnd)]:
            del self.inbox[key]
        return results

    def _gate_round(self, job: PlanJob, rnd: int, results: dict[str, tuple[Any, wire.Tensors]]) -> None:
        """Evaluate the job's `scope: round` policies on this round's updates before aggregating them."""
        if self.gate is None:
            return
        updates = [RoundUpdate(d, m.examples, m.loss, self.norms.pop((rnd, d), 0.0)) for d, (m, _) in results.items()]
        for d in self.gate.evaluate(rnd, list(results), updates):
            if d.effect == "allow":
                continue
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                            reason=d.reason, at=d.at, stage=d.stage, domain=d.domain))
            if d.effect == "deny":
                raise JobAborted(f"job {job.name} round {rnd}: policy {d.policy} denies aggregating the round: "
                                 f"{d.reason}")

    def _peer_keys(self, job: PlanJob, participants: list[str]) -> dict[str, str]:
        """Secure aggregation: the participants' public keys for `job` (empty without it)."""
        if not job.privacy.secure_aggregation:
            return {}
        missing = [d for d in participants if job.name not in getattr(self.peers.get(d), "secagg", {})]
        if missing:
            raise JobAborted(f"job {job.name}: domain {missing[0]} sent no secure aggregation key")
        return {d: self.peers[d].secagg[job.name] for d in participants}

    def _secure_sum(self, job: PlanJob, rnd: int, asked: list[str], results: dict[str, Any],
                    strategy: Strategy, weights: wire.Tensors) -> list[torch.Tensor]:
        """The example-weighted mean from masked updates: their sum unmasks only when all are there."""
        from meshctl.runtime.kernels import secagg

        missing = [d for d in asked if d not in results]
        if missing:
            raise ValueError(f"secure aggregation: {missing[0]} sent no update, and its pairwise masks "
                             "cannot be removed without it")
        total = secagg.add([results[d][1]["masked"].numpy().view(np.uint64) for d in asked])
        examples = sum(results[d][0].examples for d in asked)
        mean = secagg.decode(total, [t.shape for t in job.tensors], float(examples))
        return strategy.from_mean([weights[t.name] for t in job.tensors], mean)

    def _broadcast(self, job: PlanJob, participants: list[str], msg: Any, weights: wire.Tensors, rnd: int) -> None:
        for d in participants:
            peer = self.peers.get(d)
            if peer is None:  # lost since the list was made
                continue
            attach = isinstance(msg, wire.EvalIns) or peer.versions.get(job.name) != msg.version
            sent = self._send(peer, msg, weights if attach else None)
            if attach:
                peer.versions[job.name] = msg.version
            self.bytes_out[(job.name, rnd)] = self.bytes_out.get((job.name, rnd), 0) + sent

    # -- messages ------------------------------------------------------------------
    def _pump(self) -> None:
        """Handle whatever arrives within one poll interval; check children when idle."""
        self._check_stop()
        ready = dict(self.poller.poll(POLL_MS))
        if self.wake_r.fileno() in ready:
            while True:
                try:
                    if not self.wake_r.recv(512):
                        break
                except BlockingIOError:
                    break
        self._check_stop()
        if self.pub in ready:
            self.pub.recv()  # (un)subscriptions; nothing to do
        if self.router in ready:
            for _ in range(1000):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
        else:
            self._reap()
        self._report_refusals()
        self._check_liveness()

    def _report_refusals(self) -> None:
        """A MessageRejected for each Curve handshake the authenticator refused (and logged) since."""
        while True:
            try:
                line = self.auth.refusals.get_nowait()
            except queue.Empty:
                return
            self.sink.emit(ev.MessageRejected(sender="unknown peer", reason=line))

    def _check_liveness(self) -> None:
        """Declare lost every joined domain silent for the heartbeat timeout (after draining the socket)."""
        now = time.monotonic()
        if now < self.next_liveness:
            return
        self.next_liveness = now + min(1.0, self.heartbeat_timeout / 4)
        for peer in list(self.peers.values()):
            silent = now - peer.last_seen
            if silent > self.heartbeat_timeout:
                self._fail(peer.domain, f"no heartbeat for {silent:.0f}s")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) < 2:
            return
        user = frames[1].get("User-Id")
        self._dispatch(identity, self.by_key.get(user.encode() if isinstance(user, str) else user), frames[1:])

    def _dispatch(self, identity: bytes, domain: str | None, body: list[Any]) -> None:
        """Handle one message from connection `identity`, whose Curve key belongs to `domain` (None: no domain)."""
        frames = [identity, *body]
        who = domain or "unknown peer"
        try:
            msg, tensors = wire.decode(frames[1:], max_bytes=self.limits[1])
        except wire.WireError as err:
            self.sink.emit(ev.MessageRejected(sender=who, reason=str(err)))
            if "protocol version" in str(err):
                self._reply(identity, wire.Refused(reason=str(err)))
            return
        if domain is None or msg.sender != domain:
            self.sink.emit(ev.MessageRejected(sender=who, reason=f"sender claims {msg.sender!r} but its Curve key "
                                              f"belongs to {domain!r}"))
            return
        if isinstance(msg, wire.Knock):  # a daemon without a run id asks which run this is, before Hello
            self._reply(identity, wire.RunInfo(plan_hash=self.plan.plan.hash))
            return
        size = wire.frames_size(frames[1:])
        peer = self.peers.get(domain)
        if (peer is not None and peer.identity != identity and not isinstance(msg, wire.Heartbeat)
                and self._other_connection(peer, identity, msg)):  # (a daemon beats on a socket of its own)
            return
        peer = self.peers.get(domain)
        if peer is not None:
            peer.last_seen = time.monotonic()
        if isinstance(msg, wire.Heartbeat):
            self._heartbeat(peer, msg)
        elif isinstance(msg, wire.Hello):
            self._hello(domain, identity, msg)
        elif isinstance(msg, wire.ErrorReply):
            if msg.code.startswith("policy:"):  # the domain's own round policy denied
                self.sink.emit(ev.PolicyDecided(
                    policy=msg.code.removeprefix("policy:"), scope="round", subject=f"round.{msg.job}.{msg.round}",
                    effect="deny", reason=msg.reason, stage="runtime", domain=domain))
                self._rejected(domain, msg)
            elif msg.code in REJECTION_CODES:
                self._rejected(domain, msg)
            else:
                self._fail(domain, msg.reason)
        elif isinstance(msg, (wire.TrainRes, wire.EvalRes)):
            problem, norm = self._check_result(domain, msg, tensors)
            if problem:
                self.sink.emit(ev.MessageRejected(sender=domain, reason=problem))
                return
            self.bytes_in[(msg.job, msg.round)] = self.bytes_in.get((msg.job, msg.round), 0) + size
            self.inbox[(msg.type, msg.round, domain)] = (msg, tensors)
            if self.gate is not None and isinstance(msg, wire.TrainRes) and norm is not None:
                self.norms[(msg.round, domain)] = norm
            if isinstance(msg, wire.TrainRes):
                for c in msg.charges:
                    key = (msg.job, c.product)
                    self.job_epsilon[key] = self.job_epsilon.get(key, 0.0) + c.epsilon
                    self.sink.emit(ev.BudgetSpent(product=c.product, subject=f"model.{msg.job}", epsilon=c.epsilon,
                                                  total=c.total, cap=c.cap))
                self.sink.emit(ev.UpdateReceived(job=msg.job, round=msg.round, domain=domain, examples=msg.examples,
                                                 loss=msg.loss, seconds=msg.seconds, bytes=size, update_norm=norm))
        elif not self._handle_other(domain, msg, tensors):
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"unexpected {msg.type} message"))

    def _handle_other(self, domain: str, msg: Any, tensors: wire.Tensors) -> bool:
        """Handle a message kind the training loop does not know; False rejects it."""
        return False

    def _other_connection(self, peer: _Peer, identity: bytes, msg: Any) -> bool:
        """A message (not a heartbeat) from a joined domain over a connection other than the one it
        joined on: True if refused.

        The joined connection keeps the domain while the domain is alive (heard from within the
        heartbeat timeout): anything else from the key is refused, a second Hello with a Refused reply.
        A Hello after the domain went silent for longer declares it lost first, then joins.
        """
        silent = time.monotonic() - peer.last_seen
        if isinstance(msg, wire.Hello) and silent > self.heartbeat_timeout:
            self._fail(peer.domain, f"no heartbeat for {silent:.0f}s")
            return False
        if isinstance(msg, wire.Hello):
            reason = (f"second Hello from {peer.domain} on a new connection refused: its joined connection "
                      f"is alive (heard from {silent:.0f}s ago)")
            self._reply(identity, wire.Refused(reason=reason))
        else:
            reason = f"{msg.type} from {peer.domain} on a connection other than the one it joined on"
        self.sink.emit(ev.MessageRejected(sender=peer.domain, reason=reason))
        return True

    @functools.cached_property
    def limits(self) -> tuple[int, int]:
        """(largest tensor frame, largest tensor payload of one message) in bytes the plan lets a domain send."""
        frame = total = 0
        for job in self.plan.jobs:
            sizes = [math.prod(t.shape) * wire.DTYPES[t.dtype].itemsize for t in job.tensors]
            if job.privacy.secure_aggregation:
                sizes = [job.parameters * 8]  # the masked update: one int64 word per parameter
            frame = max(frame, min(wire.CHUNK_BYTES, max(sizes, default=0)))
            total = max(total, sum(sizes))
        return frame, total

    def _heartbeat(self, peer: _Peer | None, msg: wire.Heartbeat) -> None:
        if peer is None:  # not joined (or already lost): liveness is only tracked for peers
            return
        peer.state = msg.state
        if peer.last_seen - peer.last_beat_event >= HEARTBEAT_EVENT_S:
            peer.last_beat_event = peer.last_seen
            self.sink.emit(ev.DomainHeartbeat(domain=peer.domain, state=msg.state))

    def _rejected(self, domain: str, msg: wire.ErrorReply) -> None:
        """A domain rejected one instruction: record it, and leave it out of that job."""
        what = f"job {msg.job!r} round {msg.round}" if msg.job else "an instruction"
        self.sink.emit(ev.MessageRejected(sender="coordinator",
                                          reason=f"domain {domain} rejected {what} ({msg.code}): {msg.reason}"))
        if self.current is not None and msg.job == self.current.name:
            self.dropped.setdefault(domain, f"rejected {what}: {msg.reason}")

    def _hello(self, domain: str, identity: bytes, msg: wire.Hello) -> None:
        if domain in self.peers:  # joined on this very connection already: a daemon says Hello once
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"second Hello from {domain} on its joined "
                                              "connection: ignored"))
            return
        if msg.plan_hash != self.plan.plan.hash:
            reason = f"plan hash differs: domain has {msg.plan_hash[:19]}, coordinator runs {self.plan.plan.hash[:19]}"
            self._reply(identity, wire.Refused(reason=reason))
            self.refused[domain] = reason
            self.sink.emit(ev.DomainRefused(domain=domain, reason=reason))
            return
        self.peers[domain] = _Peer(domain, identity, dict(msg.rows), dict(msg.stats), refused=dict(msg.refused),
                                   secagg=dict(msg.secagg_keys))
        self._send(self.peers[domain], wire.Welcome(plan_hash=self.plan.plan.hash))
        self.sink.emit(ev.DomainJoined(domain=domain, products=sorted(msg.rows), rows=dict(msg.rows), pid=msg.pid))
        for d in msg.decisions:  # who decided is the Curve-authenticated domain, whatever the message says
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                            reason=d.reason, at=d.at, stage="runtime", domain=domain))
        for c in msg.checks:
            self.sink.emit(ev.ContractChecked(product=c.product, domain=domain, contract=c.contract, rule=c.rule,
                                              observed=c.observed, operator=c.operator, threshold=c.threshold,
                                              passed=c.passed, severity=c.severity))

    def _check_result(self, domain: str, msg: Any, tensors: wire.Tensors) -> tuple[str, float | None]:
        """(problem or "", update norm); the norm is finite only if every value is, so one pass checks both.
        Under secure aggregation the norm is None: the coordinator sees masked words only."""
        job = self.current
        if job is None or msg.job != job.name:
            return f"{msg.type} for job {msg.job!r}, which is not running", 0.0
        if domain not in job.participants:
            return f"{domain} is not a participant of job {job.name}", 0.0
        if (msg.type, msg.round, domain) in self.inbox:
            return f"duplicate {msg.type} for round {msg.round}", 0.0
        if (msg.type, msg.round) in self.closed:
            return f"late {msg.type} for round {msg.round}, which went on without it", 0.0
        if not self.round <= msg.round <= self.round + 1:  # kept until collected: only what is next
            return f"{msg.type} for round {msg.round} while round {self.round} runs", 0.0
        if domain in self.dropped:
            return f"{domain} left job {job.name}: {self.dropped[domain]}", 0.0
        if isinstance(msg, wire.TrainRes):
            expect = [(t.name, t.shape, t.dtype) for t in job.tensors]
            if job.privacy.secure_aggregation:
                expect = [("masked", [job.parameters], "int64")]
            got = [(s.name, s.shape, s.dtype) for s in msg.tensors]
            if got != expect:
                return "update tensors do not match the plan's model", 0.0
            if not math.isfinite(msg.loss):
                return "non-finite training loss", 0.0
            if msg.examples <= 0:
                return "update trained on no examples", 0.0
            mine = {r.product for r in job.reads if r.domain == domain}
            if msg.charges and (job.privacy.dp is None or any(c.product not in mine for c in msg.charges)):
                return "ledger charges for a product this domain does not train on with DP", 0.0
            if job.privacy.secure_aggregation:
                return "", None  # masked words: no norm to see, and no way to check finiteness
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
                                 for t in tensors.values()))
            if not math.isfinite(norm):
                return "update holds non-finite values", norm
            return "", norm
        if tensors:
            return "evaluation results carry tensors", 0.0
        if not (math.isfinite(msg.loss_sum) and msg.loss_sum >= 0):
            return "evaluation loss is negative or not finite", 0.0
        if msg.correct > msg.examples:
            return f"evaluation counts {msg.correct} correct of {msg.examples} examples", 0.0
        return "", 0.0

    def _fail(self, domain: str, reason: str) -> None:
        if domain in self.failed or self.closing:
            return
        if domain in self.m.local_domains and "(log: " not in reason:
            reason += f" (log: {self.run_dir / 'logs' / f'{domain}.log'})"
        self.failed[domain] = reason
        self.peers.pop(domain, None)
        self.sink.emit(ev.DomainLost(domain=domain, reason=reason))

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            domain = self.children.pop(pid, None)
            if domain is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if domain in self.peers or self.current is not None or code != 0:
                self._fail(domain, f"daemon exited with code {code}: {_daemon_said(self.run_dir, domain)}")

    def _send(self, peer: _Peer, msg: Any, tensors: wire.Tensors | None = None) -> int:
        frames = wire.encode(msg.model_copy(update={"run": self.m.run, "sender": "coordinator"}), tensors)
        try:
            self.router.send_multipart([peer.identity, *frames], copy=False)
        except zmq.ZMQError as err:  # peer gone (router_mandatory)
            self._fail(peer.domain, f"unreachable: {err}")
            return 0
        return wire.frames_size(frames)

    def _reply(self, identity: bytes, msg: Any) -> None:
        frames = wire.encode(msg.model_copy(update={"run": self.m.run, "sender": "coordinator"}))
        try:
            self.router.send_multipart([identity, *frames])
        except zmq.ZMQError:
            pass

    # -- outputs -------------------------------------------------------------------
    def _trim_metrics(self, job: PlanJob, last: int) -> None:
        """Drop metrics.csv rows of `job` after round `last` (they are trained again)."""
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if not (r[0] == job.name and int(r[1]) > last)]
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)

    def _model_meta(self, job: PlanJob, rnd: int, norm: dict[str, list[float]] | None = None) -> dict[str, str]:
        meta = {"job": job.name, "round": str(rnd), "plan_hash": self.plan.plan.hash,
                "features": ",".join(job.features), "classes": ",".join(job.classes),
                "architecture": job.architecture.model_dump_json()}
        if norm:
            meta["standardize"] = json.dumps(norm)
        return meta

    def _append_metrics(self, job: PlanJob, rnd: int, participants: int, loss: float, metrics: dict[str, float]) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        try:
            with path.open("a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["job", "round", "participants", "train_loss", "test_loss", "test_accuracy"])
                w.writerow([job.name, rnd, participants, f"{loss:.6f}", f"{metrics['loss']:.6f}",
                            f"{metrics['accuracy']:.6f}"])
        except OSError as err:  # a full disk, say: the run fails with the reason
            raise JobAborted(f"job {job.name} round {rnd}: cannot write {path}: {err.strerror or err}") from None

    def _write_checkpoints(self) -> None:
        """Writer thread: safetensors files (weights only), atomically; reports what it wrote."""
        from safetensors.torch import save_file

        while (item := self.checkpoints.get()) is not None:
            path, weights, meta = item
            if self.write_error:  # after a failed write the rest is drained, not written
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=meta)
                tmp.replace(path)
            except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
                self.write_error = f"cannot write {path}: {getattr(err, 'strerror', None) or err}"
                continue
            self.written.put((meta["job"], int(meta["round"]), path))

    def _report_checkpoints(self) -> None:
        """Emit CheckpointWritten for every per-round file the writer has finished (main thread only)."""
        while True:
            try:
                job, rnd, path = self.written.get_nowait()
            except queue.Empty:
                return
            if path.parent.name == job:  # per-round checkpoints; the final model has its own event
                self.sink.emit(ev.CheckpointWritten(job=job, round=rnd, path=str(path.relative_to(self.run_dir))))


def warm_main() -> int:
    """`meshctl coordinator --warm`: import what a run needs, then run the directory read from stdin.

    Started by `meshctl up` before it compiles (meshctl.runtime.launcher.WarmCoordinator);
    end-of-file instead of a directory means no run came of it: exit quietly.
    """
    import sys

    from meshctl.runtime import daemon, governance  # noqa: F401 - the forked daemons' imports
    from meshctl.runtime.daemon import prepare_fork

    prepare_fork(None)
    governance._environment()  # the CEL parser tables, before there is a plan to need them
    line = sys.stdin.readline().strip()
    if not line:
        return 0
    log = os.open(Path(line) / "logs" / "coordinator.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return main(line)


MAX_RESUMES = 3
"""A coordinator that keeps dying without new checkpoints is not restarted more than this."""
WATCH_S = 0.2
"""How often the supervisor and the coordinator proper check that their parent is still there."""


def main(run_dir: str | Path, resume: bool = False) -> int:
    """The coordinator process: a supervisor that forks the coordinator proper and resumes it.

    The coordinator proper (`_coordinate`) runs in a child; when that child dies without
    ending the run (killed, or an internal error), the supervisor kills what it left
    behind and forks a new one that takes the run up from its newest checkpoints (a
    `run_resumed` event) — at most MAX_RESUMES times, and only while checkpoints
    advance. Analysis runs are not resumed (their ε would be charged twice). SIGTERM
    and SIGINT are passed on to the child, which ends the run in order.

    The process that started the supervisor (`meshctl up` or `meshctl resume`) owns the run:
    when it dies without having detached (the `detached` marker), the run is stopped in
    order. A run directory that has events already is only taken up with `resume`.
    """
    import sys

    manifest = RunManifest.read(run_dir)
    starter, label = os.getppid(), "meshctl resume" if resume else "meshctl up"
    has_events = (manifest.path / EVENTS_FILE).is_file() and (manifest.path / EVENTS_FILE).stat().st_size > 0
    if has_events != resume:
        print(f"{manifest.path}: error: " + (f"run {manifest.run} has events already: continue it with "
              f"`meshctl resume {manifest.run}`" if has_events else "the run never started: nothing to resume"),
              file=sys.stderr, flush=True)
        return 1
    hold_run(manifest.path)  # held (and inherited by every child) until the run's last process exits
    (manifest.path / PID_FILE).write_text(f"{os.getpid()}\n")  # whom `meshctl stop` signals
    if os.getpgrp() != os.getpid():  # `up` starts us in a session of our own; anyone else: a group
        os.setpgid(0, 0)             # of our own, so that _kill_leftovers reaches nothing else
    child = 0
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child:
            try:
                os.kill(child, signal.SIGTERM if signum == signal.SIGHUP else signum)  # its SIGHUP: starter gone
            except ProcessLookupError:  # it has ended already
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    resumed = f"resumed by {label} (its previous processes were gone)" if resume else ""
    resumes, progress = 0, None
    while True:
        child = os.fork()
        if child == 0:
            _child(run_dir, resumed, f"{label} (pid {starter}) is gone")
        code, orphaned = _wait_child(child, manifest.path, starter)
        started = (manifest.path / EVENTS_FILE).is_file()
        over = (code in (0, 1, INTERNAL_ERROR) or bool(stopping) or orphaned or bool(manifest.analysis)
                or not manifest.checkpoint or not started or _run_ended(manifest.path))
        now = None if over else _checkpoint_rounds(manifest.path)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if code > 0:
            how += f" ({last_line(manifest.path / 'logs' / 'coordinator.log')})"
        if over or resumes >= MAX_RESUMES or (resumes and now == progress):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the run is over: a late signal
                signal.signal(sig, signal.SIG_IGN)                     # must not make it "killed"
            if not _run_ended(manifest.path):
                why = ("it never started" if not started else
                       "analysis runs are not resumed" if manifest.analysis else
                       "checkpoints are off" if not manifest.checkpoint else
                       "stopped" if stopping or orphaned else
                       f"{resumes} resumes (at most {MAX_RESUMES})" if resumes >= MAX_RESUMES else
                       "no new checkpoint since the last resume")
                _kill_leftovers()
                reason = f"the coordinator {how}; gave up: {why}"
                _end_run(manifest, reason)
                print(f"coordinator {how}; gave up resuming the run: {why}", flush=True)
            _remove_secrets(manifest.path)
            return code if code >= 0 else 2
        _kill_leftovers()
        print(f"coordinator {how}; resuming from the newest checkpoints", flush=True)
        resumed, resumes, progress = f"the coordinator {how}", resumes + 1, now


def _child(run_dir: str | Path, resumed: str, gone: str) -> None:
    """Body of the forked coordinator proper: never returns into the supervisor's code."""
    import traceback

    code = 2
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        code = _coordinate(run_dir, resumed, gone)
    except BaseException:  # noqa: BLE001 - e.g. a port taken between the check and the bind
        traceback.print_exc()
    finally:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_child(child: int, run_dir: Path, starter: int) -> tuple[int, bool]:
    """Wait for the coordinator proper; SIGHUP it once when `starter` dies without detaching.

    Returns (exit code, whether the run was stopped because its starter is gone).
    """
    orphaned = False
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status), orphaned
        if not orphaned and os.getppid() != starter and not (run_dir / DETACHED_FILE).exists():
            orphaned = True
            try:
                os.kill(child, signal.SIGHUP)  # the coordinator proper ends the run: "... is gone"
            except ProcessLookupError:
                pass
        time.sleep(WATCH_S)


def _end_run(manifest: RunManifest, reason: str) -> None:
    """Append run_completed ok=false to the audit chain (no coordinator is left to do it)."""
    from meshctl.runtime.audit import Chain

    path = manifest.path / EVENTS_FILE
    _drop_torn_line(path)
    chain = Chain.open(path)
    event = ev.RunCompleted(run=manifest.run, ok=False, seconds=0.0, reason=reason)
    event = event.model_copy(update={"seq": len(chain.hashes) + 1, "ts": time.time()})
    with path.open("a", encoding="utf-8") as f:
        f.write(chain.seal(event.to_dict()) + "\n")
    try:
        chain.finish(manifest.path)
    except (OSError, ValueError) as err:
        print(f"warning: audit head not recorded: {err}", flush=True)


def _remove_secrets(run_dir: Path) -> None:
    for secret in (run_dir / "keys").glob("*.key_secret"):
        secret.unlink(missing_ok=True)


def _checkpoint_rounds(run_dir: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("round-*.safetensors")))
            for d in sorted((run_dir / "checkpoints").glob("*")) if d.is_dir()}


def _run_ended(run_dir: Path) -> bool:
    return run_ended(run_dir)


def _kill_leftovers() -> None:
    """SIGKILL every other process of this process group (the dead coordinator's daemons)."""
    import psutil

    me, group = os.getpid(), os.getpgrp()
    for proc in psutil.process_iter(["pid"]):
        pid = proc.info["pid"]
        try:
            if pid != me and os.getpgid(pid) == group:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    while True:  # reap the ones that are our children
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def _coordinate(run_dir: str | Path, resumed: str = "", gone: str = "") -> int:
    """The coordinator proper: fork the local daemons (sharing imported torch), then coordinate.

    Forking here, after the heavy imports and before any thread or socket exists,
    is what makes a local mesh start in about the time of one `import torch`.
    SIGHUP (from the supervisor: the run's starter is gone, `gone` says so) and the death of
    the supervisor itself end the run in order, with that reason.
    """
    import sys

    from meshctl.errors import MeshctlError

    reasons: list[str] = []
    coordinator: list[Coordinator] = []
    supervisor = os.getppid()

    def hang_up(_signum: int, _frame: Any) -> None:  # also wakes the coordinator's poller
        reasons.append(gone or "stopped by SIGHUP")
        if coordinator and not coordinator[0].stop_reason:
            coordinator[0].stop_reason = reasons[0]

    signal.signal(signal.SIGHUP, hang_up)
    manifest = RunManifest.read(run_dir)
    plan = Plan.read(manifest.path / "plan.toml")
    if manifest.local_domains:
        from meshctl.runtime.daemon import prepare_fork

        plan.content_hash()  # once here: every forked daemon checks it against plan.plan.hash
        prepare_fork(plan)
    children: dict[int, str] = {}
    for domain, key_file in manifest.local_domains.items():
        pid = os.fork()
        if pid == 0:
            os._exit(_daemon_child(manifest, plan, domain, key_file))
        children[pid] = domain
    cls = Coordinator
    if manifest.analysis:  # an analysis run: meshctl analyze
        from meshctl.runtime.analytics import AnalysisCoordinator as cls
    try:
        coordinator.append(cls(manifest, plan, children, resumed=resumed))
        if reasons:
            coordinator[0].stop_reason = reasons[0]
        threading.Thread(target=_watch_supervisor, args=(supervisor, reasons), name="supervisor",
                         daemon=True).start()
        return coordinator[0].run(restore_signals=False)
    except MeshctlError as err:
        print(err.render(), file=sys.stderr)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        return err.exit_code


def _watch_supervisor(supervisor: int, reasons: list[str]) -> None:
    """Thread of the coordinator proper: when the supervisor dies, end the run ("supervisor gone")."""
    while os.getppid() == supervisor:
        time.sleep(WATCH_S)
    reasons.insert(0, f"supervisor gone (pid {supervisor} died)")
    os.kill(os.getpid(), signal.SIGHUP)  # the handler runs in the main thread and wakes its poller


def _daemon_said(run_dir: Path, domain: str) -> str:
    """The last line of a forked daemon's log when it is one of the daemon's own closing lines
    (`error: …`, `internal error: …`, built from the domain's vocabulary); anything else in that
    log (a library's text, a traceback, a host path) stays in the log."""
    line = last_line(run_dir / "logs" / f"{domain}.log")
    if line.startswith(("error: ", "internal error: ")) or line in ("no log", "no output"):
        return line
    return "see its log"


def _daemon_child(manifest: RunManifest, plan: Plan, domain: str, key_file: str) -> int:
    """Body of a forked daemon process; never returns into the parent's code."""
    import sys
    import traceback

    from meshctl.errors import MeshctlError
    from meshctl.runtime.daemon import Daemon, DaemonConfig

    code = 2
    try:
        log = os.open(manifest.path / "logs" / f"{domain}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        server = manifest.coordinator_public.encode()
        cfg = DaemonConfig(domain=domain, plan=plan, base_dir=Path(manifest.base_dir), coordinator=manifest.router,
                           server_key=server, keys=KeyPair.load(key_file), run=manifest.run,
                           threads=manifest.threads, parent_pid=os.getppid())
        code = Daemon(cfg).run()
    except MeshctlError as err:
        if err.where:  # the full story (a host path) for this log; its last line travels in DomainLost
            print(err.render(), file=sys.stderr)
        print(f"error: {err.message}" + (f" (hint: {err.hint})" if err.hint else ""), file=sys.stderr)
        code = err.exit_code
    except BaseException as err:  # noqa: BLE001 - a daemon must never die silently
        traceback.print_exc()  # may quote a value: it stays here; the last line, which travels, does not
        print(f"internal error: the daemon failed ({type(err).__name__}); the traceback is above",
              file=sys.stderr)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code
