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
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.keys import EVENTS_ZAP_DOMAIN, MESH_ZAP_DOMAIN, KeyPair, curve_server, start_authenticator
from meshctl.runtime.data import pooled_mean_std
from meshctl.runtime.kernels import fedavg, mlp
from meshctl.runtime.run import RunManifest, last_line

POLL_MS = 250


class JobAborted(Exception):
    """The current job cannot go on; the message says why."""


class Stopped(Exception):
    """SIGTERM/SIGINT asked the coordinator to stop."""


class EventSink:
    """Numbers events, appends them to events.jsonl and publishes them on XPUB."""

    def __init__(self, path: Path, pub: zmq.Socket):
        self.file = path.open("a", encoding="utf-8")
        self.pub = pub
        self.seq = 0
        self.log: list[ev.Event] = []

    def emit(self, event: ev.Event) -> ev.Event:
        self.seq += 1
        event = event.model_copy(update={"seq": self.seq, "ts": time.time()})
        line = event.to_json()
        self.file.write(line + "\n")
        self.file.flush()
        self.pub.send_string(line)
        self.log.append(event)
        return event

    def close(self) -> None:
        self.file.close()


@dataclass
class _Peer:
    domain: str
    identity: bytes
    rows: dict[str, int] = field(default_factory=dict)
    stats: dict[str, wire.FeatureStats] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    """Weights version each job's daemon holds."""


class Coordinator:
    """Executes a plan. `run()` returns the process exit code (0 ok, 1 a job failed)."""

    def __init__(self, manifest: RunManifest, plan: Plan, children: dict[int, str] | None = None):
        self.m = manifest
        self.plan = plan
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
        self.stop_reason = ""
        self.closing = False
        self.checkpoints: queue.Queue[tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None] = queue.Queue()
        self.written: queue.Queue[tuple[str, int, Path]] = queue.Queue()

    # -- lifecycle -----------------------------------------------------------------
    def run(self) -> int:
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
        self.router.maxmsgsize = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES
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
        self.sink = EventSink(self.run_dir / "events.jsonl", self.pub)
        writer = threading.Thread(target=self._write_checkpoints, name="checkpoints", daemon=True)
        writer.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        started = time.time()
        ok, reason = True, ""
        try:
            self._wait_for_observer()
            self.sink.emit(ev.RunStarted(run=self.m.run, mesh=self.plan.plan.mesh, plan_hash=self.plan.plan.hash,
                                         run_dir=str(self.run_dir), jobs=[j.name for j in self.plan.jobs],
                                         domains=[d.name for d in self.plan.domains]))
            for d in self.plan.decisions:
                self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject,
                                                effect=d.effect, reason=d.reason, at=d.at))
            for job in self.plan.jobs:
                self._run_job(job)
        except JobAborted as err:
            ok, reason = False, str(err)
        except Stopped:
            ok, reason = False, self.stop_reason
        finally:
            self.checkpoints.put(None)
            writer.join()
            self._report_checkpoints()
            self.sink.emit(ev.RunCompleted(run=self.m.run, ok=ok, seconds=time.time() - started, reason=reason))
            self._shutdown_daemons(reason or "run completed")
            self.sink.close()
            self.auth.stop()
            self.router.close()
            self.pub.close()
            self.ctx.term()
        return 0 if ok else 1

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_reason = f"stopped by {signal.Signals(signum).name}"
        raise Stopped(self.stop_reason)

    def _wait_for_observer(self) -> None:
        deadline = time.monotonic() + self.m.wait_for_observer_s
        while self.m.wait_for_observer_s and time.monotonic() < deadline:
            if self.pub.poll(50, zmq.POLLIN) and self.pub.recv()[:1] == b"\x01":
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
    def _run_job(self, job: PlanJob) -> None:
        self.current = job
        self._await_quorum(job)
        participants = [d for d in job.participants if d in self.peers]
        self.sink.emit(ev.JobStarted(job=job.name, participants=participants, rounds=job.training.rounds,
                                     parameters=job.parameters, quorum=job.quorum))
        arch = job.architecture
        model = mlp(arch.input_dim, arch.hidden, arch.output_dim, seed=job.training.seed)
        weights = {t.name: model.state_dict()[t.name].detach().clone() for t in job.tensors}
        started = time.time()
        version = 0
        metrics: dict[str, float] = {}
        norm = self._standardization(job, participants)
        round_start = {1: time.time()}
        self.sink.emit(ev.RoundStarted(job=job.name, round=1, participants=participants))
        self._broadcast(job, participants, wire.TrainIns(job=job.name, round=1, version=0, **norm), weights, 1)
        for r in range(1, job.training.rounds + 1):
            results = self._collect(job, "train_res", r, participants)
            total = sum(msg.examples for msg, _ in results.values())
            new = fedavg([[results[d][1][t.name] for t in job.tensors] for d in participants],
                         [results[d][0].examples for d in participants])
            weights = {t.name: w for t, w in zip(job.tensors, new)}
            version = r
            train_loss = sum(m.loss * m.examples for m, _ in results.values()) / max(total, 1)
            self._broadcast(job, participants, wire.EvalIns(job=job.name, round=r, version=r), weights, r)
            if r < job.training.rounds:
                round_start[r + 1] = time.time()
                self.sink.emit(ev.RoundStarted(job=job.name, round=r + 1, participants=participants))
                self._broadcast(job, participants, wire.TrainIns(job=job.name, round=r + 1, version=r),
                                weights, r + 1)
            evals = self._collect(job, "eval_res", r, participants)
            n = sum(m.examples for m, _ in evals.values())
            metrics = {"loss": sum(m.loss_sum for m, _ in evals.values()) / max(n, 1),
                       "accuracy": sum(m.correct for m, _ in evals.values()) / max(n, 1)}
            self.sink.emit(ev.RoundCompleted(
                job=job.name, round=r, rounds=job.training.rounds, participants=participants,
                train_loss=train_loss, metrics=metrics, bytes_in=self.bytes_in.pop((job.name, r), 0),
                bytes_out=self.bytes_out.pop((job.name, r), 0), seconds=time.time() - round_start.pop(r)))
            self._append_metrics(job, r, len(participants), train_loss, metrics)
            if self.m.checkpoint:
                path = self.run_dir / "checkpoints" / job.name / f"round-{r:04d}.safetensors"
                self.checkpoints.put((path, weights, self._model_meta(job, r, norm)))
            self._report_checkpoints()
        model_path = self.run_dir / "models" / f"{job.name}.safetensors"
        self.checkpoints.put((model_path, weights, self._model_meta(job, version, norm)))
        self.sink.emit(ev.JobCompleted(job=job.name, rounds=version, metrics=metrics,
                                       model_path=str(model_path.relative_to(self.run_dir)),
                                       seconds=time.time() - started))
        self.current = None

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

    def _await_quorum(self, job: PlanJob) -> None:
        deadline = time.monotonic() + self.m.join_timeout_s
        announced = -1
        while True:
            lost = [d for d in job.participants if d in self.failed]
            if lost:
                raise JobAborted(f"job {job.name}: domain {lost[0]} {self.failed[lost[0]]}")
            have = [d for d in job.participants if d in self.peers]
            if len(have) == len(job.participants):
                return
            if len(have) != announced:
                announced = len(have)
                self.sink.emit(ev.JobWaiting(job=job.name, have=have, need=job.quorum))
            if time.monotonic() > deadline:
                missing = [d for d in job.participants if d not in self.peers]
                raise JobAborted(f"job {job.name}: domains {', '.join(missing)} did not join within "
                                 f"{self.m.join_timeout_s:.0f}s")
            self._pump()

    def _collect(self, job: PlanJob, kind: str, rnd: int, participants: list[str]) -> dict[str, tuple[Any, wire.Tensors]]:
        deadline = time.monotonic() + job.round_timeout_s
        while True:
            lost = [d for d in participants if d in self.failed]
            if lost:
                raise JobAborted(f"job {job.name} round {rnd}: domain {lost[0]} {self.failed[lost[0]]}")
            if all((kind, rnd, d) in self.inbox for d in participants):
                return {d: self.inbox.pop((kind, rnd, d)) for d in participants}
            if time.monotonic() > deadline:
                missing = [d for d in participants if (kind, rnd, d) not in self.inbox]
                raise JobAborted(f"job {job.name} round {rnd}: no reply from {', '.join(missing)} within "
                                 f"{job.round_timeout_s:.0f}s")
            self._pump()

    def _broadcast(self, job: PlanJob, participants: list[str], msg: Any, weights: wire.Tensors, rnd: int) -> None:
        for d in participants:
            peer = self.peers[d]
            attach = isinstance(msg, wire.EvalIns) or peer.versions.get(job.name) != msg.version
            sent = self._send(peer, msg, weights if attach else None)
            if attach:
                peer.versions[job.name] = msg.version
            self.bytes_out[(job.name, rnd)] = self.bytes_out.get((job.name, rnd), 0) + sent

    # -- messages ------------------------------------------------------------------
    def _pump(self) -> None:
        """Handle whatever arrives within one poll interval; check children when idle."""
        ready = dict(self.poller.poll(POLL_MS))
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

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) < 2:
            return
        user = frames[1].get("User-Id")
        domain = self.by_key.get(user.encode() if isinstance(user, str) else user)
        who = domain or "unknown peer"
        try:
            msg, tensors = wire.decode(frames[1:])
        except wire.WireError as err:
            self.sink.emit(ev.MessageRejected(sender=who, reason=str(err)))
            if "protocol version" in str(err):
                self._reply(identity, wire.Refused(reason=str(err)))
            return
        if domain is None or msg.sender != domain:
            self.sink.emit(ev.MessageRejected(sender=who, reason=f"sender claims {msg.sender!r} but its Curve key "
                                              f"belongs to {domain!r}"))
            return
        size = wire.frames_size(frames[1:])
        if isinstance(msg, wire.Hello):
            self._hello(domain, identity, msg)
        elif isinstance(msg, wire.ErrorReply):
            self._fail(domain, msg.reason)
        elif isinstance(msg, (wire.TrainRes, wire.EvalRes)):
            problem, norm = self._check_result(domain, msg, tensors)
            if problem:
                self.sink.emit(ev.MessageRejected(sender=domain, reason=problem))
                return
            self.bytes_in[(msg.job, msg.round)] = self.bytes_in.get((msg.job, msg.round), 0) + size
            self.inbox[(msg.type, msg.round, domain)] = (msg, tensors)
            if isinstance(msg, wire.TrainRes):
                self.sink.emit(ev.UpdateReceived(job=msg.job, round=msg.round, domain=domain, examples=msg.examples,
                                                 loss=msg.loss, seconds=msg.seconds, bytes=size, update_norm=norm))
        else:
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"unexpected {msg.type} message"))

    def _hello(self, domain: str, identity: bytes, msg: wire.Hello) -> None:
        if msg.plan_hash != self.plan.plan.hash:
            reason = f"plan hash differs: domain has {msg.plan_hash[:19]}, coordinator runs {self.plan.plan.hash[:19]}"
            self._reply(identity, wire.Refused(reason=reason))
            self.sink.emit(ev.DomainRefused(domain=domain, reason=reason))
            return
        self.peers[domain] = _Peer(domain, identity, dict(msg.rows), dict(msg.stats))
        self._send(self.peers[domain], wire.Welcome())
        self.sink.emit(ev.DomainJoined(domain=domain, products=sorted(msg.rows), rows=dict(msg.rows), pid=msg.pid))

    def _check_result(self, domain: str, msg: Any, tensors: wire.Tensors) -> tuple[str, float]:
        """(problem or "", update norm); the norm is finite only if every value is, so one pass checks both."""
        job = self.current
        if job is None or msg.job != job.name:
            return f"{msg.type} for job {msg.job!r}, which is not running", 0.0
        if domain not in job.participants:
            return f"{domain} is not a participant of job {job.name}", 0.0
        if (msg.type, msg.round, domain) in self.inbox:
            return f"duplicate {msg.type} for round {msg.round}", 0.0
        if isinstance(msg, wire.TrainRes):
            expect = [(t.name, t.shape, t.dtype) for t in job.tensors]
            got = [(s.name, s.shape, s.dtype) for s in msg.tensors]
            if got != expect:
                return "update tensors do not match the plan's model", 0.0
            if not math.isfinite(msg.loss):
                return "non-finite training loss", 0.0
            if msg.examples <= 0:
                return "update trained on no examples", 0.0
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
                                 for t in tensors.values()))
            if not math.isfinite(norm):
                return "update holds non-finite values", norm
            return "", norm
        if tensors:
            return "evaluation results carry tensors", 0.0
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
                log = self.run_dir / "logs" / f"{domain}.log"
                self._fail(domain, f"daemon exited with code {code}: {last_line(log)}")

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
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["job", "round", "participants", "train_loss", "test_loss", "test_accuracy"])
            w.writerow([job.name, rnd, participants, f"{loss:.6f}", f"{metrics['loss']:.6f}",
                        f"{metrics['accuracy']:.6f}"])

    def _write_checkpoints(self) -> None:
        """Writer thread: safetensors files (weights only), atomically; reports what it wrote."""
        from safetensors.torch import save_file

        while (item := self.checkpoints.get()) is not None:
            path, weights, meta = item
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=meta)
            tmp.replace(path)
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


def main(run_dir: str | Path) -> int:
    """The coordinator process: fork the local daemons (sharing imported torch), then coordinate.

    Forking here, after the heavy imports and before any thread or socket exists,
    is what makes a local mesh start in about the time of one `import torch`.
    """
    import sys

    from meshctl.errors import MeshctlError

    manifest = RunManifest.read(run_dir)
    plan = Plan.read(manifest.path / "plan.toml")
    children: dict[int, str] = {}
    for domain, key_file in manifest.local_domains.items():
        pid = os.fork()
        if pid == 0:
            os._exit(_daemon_child(manifest, plan, domain, key_file))
        children[pid] = domain
    try:
        return Coordinator(manifest, plan, children).run()
    except MeshctlError as err:
        print(err.render(), file=sys.stderr)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        return err.exit_code


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
        print(err.render(), file=sys.stderr)
        code = err.exit_code
    except BaseException:  # noqa: BLE001 - a daemon must never die silently
        traceback.print_exc()
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code
