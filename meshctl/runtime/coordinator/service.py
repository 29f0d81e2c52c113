"""The coordinator: runs a plan's jobs round by round over a Link, emits events.

Per round of a job: send TrainIns to every participant (weights attached only to
daemons that lack the current version) -> collect TrainRes -> aggregate -> send
EvalIns with the new weights, and right behind it the next round's TrainIns (no
weights: the daemon just received them) -> collect EvalRes -> emit RoundCompleted,
checkpoint in the background. Everything is pushed; nothing polls a peer.

The work is split in rooms: `members` (join, refuse, lose, rejoin, liveness, quorum),
`collector` (replies checked against the plan, a phase collected with its deadline),
`outputs` (event log, checkpoints, metrics); this class owns the link, the event
sink and the stop request, and runs the round template of each job. A domain lost
mid-job that says Hello again is re-admitted at the next round boundary and gets
the current weights with that round's instruction.

Governance at run time: each domain's Hello carries its own decisions on the
plan's jobs (emitted as PolicyDecided with stage `runtime`) and its contract
checks (ContractChecked); a domain that refuses a job is left out of it. A job
runs with the participants that remain when at least `quorum` do; a round waits
up to `round_timeout_s` and then goes on without stragglers if quorum replied;
`scope: round` policies gate each aggregation. A domain silent for
`HEARTBEAT_TIMEOUT_S` is declared lost.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import outputs
from meshctl.runtime.coordinator.analysis import Analysis
from meshctl.runtime.coordinator.collector import Collector, JobAborted
from meshctl.runtime.coordinator.members import Members, Peer
from meshctl.runtime.coordinator.split import SPLIT_MAX_BYTES, SplitRoom
from meshctl.runtime.coordinator.training import Training
from meshctl.runtime.kernels import client_dp, compress
from meshctl.runtime.keys import KeyPair
from meshctl.runtime.liveness import heartbeat_timeout
from meshctl.runtime.run import EVENTS_FILE, RunManifest, last_line, stop_reason
from meshctl.runtime.transport import Clock, Link, SystemClock

POLL_MS = 250
INTERNAL_ERROR = 2
"""Exit status (meshctl.errors.InternalError's) of a coordinator whose run ended on an unexpected error;
it wrote run_completed ok=false with the reason, so the run is over and not to be resumed."""
REJECTION_CODES = frozenset({"refused", "unknown-job", "bad-round", "bad-weights", "stale",
                             "bad-standardization", "unexpected"})
"""ErrorReply codes by which a domain rejects one instruction (it leaves the job, not the run)."""


AWAIT_EVENT_S = 10.0
"""While a job waits for domains to join, a DomainsAwaited this often names the missing ones."""


class Stopped(BaseException):  # not an Exception: no `except Exception` may swallow it
    """SIGTERM/SIGINT asked the coordinator to stop."""


def _room(room: str, name: str) -> property:
    """An attribute of one of the rooms, readable and settable on the coordinator (older callers use it)."""
    return property(lambda self: getattr(getattr(self, room), name),
                    lambda self, value: setattr(getattr(self, room), name, value))


class Coordinator:
    """Executes a plan. `run()` returns the process exit code (0 ok, 1 a job failed, 2 an internal error).

    `link` and `clock` are the transport seam: `run()` binds a ZmqLink unless a link is given;
    tests pass meshctl.runtime.transport.memory's hub and fake clock and drive `_work()`.
    """

    def __init__(self, manifest: RunManifest, plan: Plan, children: dict[int, str] | None = None,
                 resumed: str = "", *, link: Link | None = None, clock: Clock | None = None):
        self.m = manifest
        self.plan = plan
        self.resumed = resumed
        """Why the previous coordinator process of this run ended, when this one resumes it."""
        self.children = dict(children or {})
        """pid -> domain, for daemons this process forked."""
        self.run_dir = manifest.path
        self.by_key = {k.encode(): d for d, k in manifest.domain_keys.items()}
        self.clock = clock or SystemClock()
        self.members = Members(plan, manifest.run, self.clock, heartbeat_timeout(), logs={
            d: self.run_dir / "logs" / f"{d}.log" for d in manifest.local_domains})
        self.members.exited = self._exited_child
        self.collector = Collector(self.members, self.clock, self._pump)
        self.outputs = outputs.Checkpoints(self.run_dir)
        self._link: Link | None = None
        self._sink: Any = None
        if link is not None:
            self.link = link
        self.stop_reason = ""
        self.closing = False
        self.analysis: Analysis | None = None
        """The analysis workflow of a `meshctl analyze` run, once it started."""
        self.split: SplitRoom | None = None
        """The split-learning job running now, if any."""

    peers = _room("members", "peers")
    failed = _room("members", "failed")
    refused = _room("members", "refused")
    dropped = _room("members", "dropped")
    heartbeat_timeout = _room("members", "heartbeat_timeout")
    inbox = _room("collector", "inbox")
    closed = _room("collector", "closed")
    current = _room("collector", "current")
    round = _room("collector", "round")
    norms = _room("collector", "norms")
    bytes_in = _room("collector", "bytes_in")
    job_epsilon = _room("collector", "job_epsilon")
    write_error = _room("outputs", "error")

    @property
    def link(self) -> Link:
        return self._link  # type: ignore[return-value]

    @link.setter
    def link(self, link: Link) -> None:
        self._link = self.members.link = link

    @property
    def sink(self) -> Any:
        return self._sink

    @sink.setter
    def sink(self, sink: Any) -> None:
        self._sink = self.members.sink = self.collector.sink = sink

    # -- lifecycle -----------------------------------------------------------------
    def run(self, *, restore_signals: bool = True) -> int:
        """Coordinate the run; `restore_signals=False` (the coordinator process, about to exit) keeps
        SIGINT/SIGTERM ignored after the last event, so a late signal cannot change the exit status."""
        from meshctl.runtime.transport.zmq import ZmqLink

        torch.set_num_threads(max(1, self.m.threads))
        # A signal only records the request and wakes the poller (its C handler writes to this
        # socket); the main loop raises Stopped at a safe point, never inside a lock, a queue or a write.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        link = ZmqLink(KeyPair.load(self.m.coordinator_key), self.m.router, self.m.events, self.by_key,
                       {k.encode() for k in self.m.observer_keys}, self.limits[0], wake=wake_r)
        self.link = link
        self.sink = outputs.EventSink(self.run_dir / EVENTS_FILE, link)
        self.outputs.start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        started = time.time()
        code, ok, reason = 1, True, ""
        try:
            link.wait_for_observer(self.m.wait_for_observer_s, self._check_stop)
            if self.resumed:  # what RunStarted and the compile-time decisions said is in the log already
                self.sink.emit(ev.RunResumed(run=self.m.run, reason=self.resumed, rounds={
                    **{name: rnd for name, (rnd, _) in self.resume_points.items()},
                    **{name: epoch for name, (epoch, _) in self.split_resume_points.items()}}))
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
            self.outputs.stop()
            if ok and self.write_error:  # the final model (or a checkpoint) was not written
                ok, reason = False, self.write_error
            self.outputs.report(self.sink)
            self.sink.emit(ev.RunCompleted(run=self.m.run, ok=ok, seconds=time.time() - started, reason=reason))
            self._shutdown_daemons(reason or "run completed", completed=ok)
            self.sink.close()
            link.close()
            for secret in (self.run_dir / "keys").glob("*.key_secret"):  # also when `up` detached
                secret.unlink(missing_ok=True)
            signal.set_wakeup_fd(previous_wakeup)
            wake_r.close()
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

    def _shutdown_daemons(self, reason: str, *, completed: bool = False) -> None:
        self.closing = self.members.closing = True
        for peer in [*self.peers.values(), *self.members.waiting.values()]:  # (waiting: back, not yet in)
            self._send(peer, wire.Shutdown(reason=reason, completed=completed))
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
        """What this run does, for RunStarted: the plan's jobs, or `analysis:NAME` for an analysis run."""
        if self.m.analysis:
            return [f"analysis:{self.m.analysis}"]
        return [j.name for j in self.plan.jobs] + [s.name for s in self.plan.split_models]

    def _work(self) -> None:
        """One workflow per job: `Training` for each of the plan's models, or the run's one `Analysis`."""
        if self.m.analysis:
            self.analysis = Analysis(self.plan, self.plan.analysis(self.m.analysis), self.members, self.sink,
                                     self.clock, self._pump, self.run_dir, self.m.run,
                                     join_timeout_s=self.m.join_timeout_s)
            self.analysis.run()
            return
        for job in self.plan.jobs:
            if job.name not in self.completed:
                self._run_job(job)
        for split in self.plan.split_models:  # split learning (meshctl.runtime.coordinator.split)
            if split.name not in self.completed:
                remote = [d for d in split.participants if d not in self.m.local_domains]
                wait = (self.m.join_timeout_s if not remote else math.inf if self.m.remote_join_timeout_s is None
                        else max(self.m.join_timeout_s, self.m.remote_join_timeout_s))
                self.split = SplitRoom(self.plan, split, self.members, self.sink, self.clock, self._pump,
                                       self.run_dir, join_timeout_s=wait, checkpoint=self.m.checkpoint,
                                       resume=self.split_resume_points.get(split.name, (0, {})),
                                       root=Path(self.m.base_dir))
                self.split.run()
                self.split = None

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

    @functools.cached_property
    def split_resume_points(self) -> dict[str, tuple[int, dict[str, float]]]:
        """Split job -> (epoch, its metrics) of its newest resume point, for those a resumed run still has to do."""
        if not self.resumed:
            return {}
        return {s.name: outputs.newest_split_point(self.run_dir, self.plan, s.name)
                for s in self.plan.split_models if s.name not in self.completed}

    def _checkpoint(self, job: PlanJob) -> tuple[int, wire.Tensors | None]:
        """(round, weights) of the job's newest valid checkpoint, else (0, None)."""
        return outputs.newest_checkpoint(self.run_dir, self.plan, job)

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
        self.collector.start(job)
        self.members.start_job()
        try:
            self._train_job(job)
        except JobAborted as err:
            self.sink.emit(ev.JobFailed(job=job.name, round=self.round, reason=str(err)))
            raise
        finally:
            self.collector.start(None)
            self.collector.gated = False

    def _train_job(self, job: PlanJob) -> None:
        """Wait for the job's participants, then run its rounds (meshctl.runtime.coordinator.training)."""
        participants = self._await_quorum(job)
        Training(self.plan, job, self.members, self.collector, self.sink, self.outputs, self.run_dir,
                 checkpoint=self.m.checkpoint, resume=self.resume_points.pop(job.name, (0, None)),
                 root=Path(self.m.base_dir)).run(participants)

    def _excluded(self, job: PlanJob) -> dict[str, str]:
        """Participants that cannot take part in `job` now, each with a reason naming who decided."""
        return self.members.excluded(job)

    def _active(self, participants: list[str]) -> list[str]:
        return self.members.active(participants)

    def _await_quorum(self, job: PlanJob) -> list[str]:
        """The participants the job starts with: all of them, or at least `quorum` once the rest answered
        (refused, failed) or their join timeout passed (local domains: `join_timeout_s`; remote ones:
        `remote_join_timeout_s`, None waits for ever). Fewer fail the job with every domain's reason.
        While some are missing, a DomainsAwaited every AWAIT_EVENT_S names them and what brings each."""
        start = self.clock.monotonic()
        remote = math.inf if self.m.remote_join_timeout_s is None else self.m.remote_join_timeout_s
        timeout = {d: self.m.join_timeout_s if d in self.m.local_domains else remote for d in job.participants}
        announced: tuple[str, ...] | None = None
        note = start + AWAIT_EVENT_S
        while True:
            self.members.admit(job.name, 0)
            have, pending, out = self.members.quorum(job)
            now = self.clock.monotonic()
            if not [d for d in pending if now - start <= timeout[d]]:
                if len(have) >= job.quorum:
                    return have
                late = [f"domains {', '.join(ds)} did not join within {t:.0f}s" for t, ds in
                        _group(pending, timeout).items()]
                why = list(out.values()) + late
                raise JobAborted(f"job {job.name}: {len(have)} of {len(job.participants)} participants can take "
                                 f"part, quorum is {job.quorum}: {'; '.join(why)}")
            if tuple(have) != announced:
                announced = tuple(have)
                self.sink.emit(ev.JobWaiting(job=job.name, have=have, need=job.quorum))
            if now >= note and pending:
                note = now + AWAIT_EVENT_S
                self.sink.emit(ev.DomainsAwaited(job=job.name, domains=pending, waited_s=now - start, commands={
                    d: self._serve_command(d) for d in pending if d not in self.m.local_domains}))
            self._pump()

    def _serve_command(self, domain: str) -> str:
        """What the operator of remote `domain` runs to bring it into this run."""
        scheme, _, rest = self.m.router.partition("://")
        host, _, port = rest.rpartition(":")
        if host in ("", "*", "0.0.0.0", "[::]", "::"):  # bound to every interface: name this host
            host = socket.getfqdn()
        return f"meshctl serve --domain {domain} --coordinator {scheme}://{host}:{port}"

    def _collect(self, job: PlanJob, kind: str, rnd: int, participants: list[str]) -> dict[str, tuple[Any, wire.Tensors]]:
        return self.collector.collect(job, kind, rnd, participants)

    # -- messages ------------------------------------------------------------------
    def _pump(self) -> None:
        """Handle whatever arrives within one poll interval; check children when idle."""
        self._check_stop()
        inbound = self.link.poll(POLL_MS / 1000)
        self._check_stop()
        for item in inbound:
            self._dispatch(item.identity, item.domain, item.frames)
        if not inbound:
            self._reap()
        for line in self.link.refusals():  # each Curve handshake the authenticator refused (and logged)
            self.sink.emit(ev.MessageRejected(sender="unknown peer", reason=line))
        self.members.check_liveness()

    def _dispatch(self, identity: bytes, domain: str | None, body: list[Any]) -> None:
        """Handle one message from connection `identity`, whose Curve key belongs to `domain` (None: no domain)."""
        who = domain or "unknown peer"
        try:
            msg, tensors = wire.decode(body, max_bytes=self.limits[1])
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
        if not self.members.seen(identity, domain, msg):
            return
        if isinstance(msg, wire.Heartbeat):
            self.members.heartbeat(domain, msg)
        elif isinstance(msg, wire.Hello):
            self.members.hello(identity, domain, msg)
        elif isinstance(msg, wire.ErrorReply):
            if msg.code.startswith("policy:"):  # the domain's own round policy denied
                self.sink.emit(ev.PolicyDecided(
                    policy=msg.code.removeprefix("policy:"), scope="round", subject=f"round.{msg.job}.{msg.round}",
                    effect="deny", reason=msg.reason, stage="runtime", domain=domain))
                if self.split is not None and msg.job == self.split.split.name:  # a split batch: the job ends
                    self.split.policy_refused(domain, msg.reason)
                else:
                    self._rejected(domain, msg)
            elif msg.code in REJECTION_CODES:
                self._rejected(domain, msg)
            elif msg.code == "split-data" and self.split is not None:  # a part refused its data (coordinator/split)
                self.split.data_refused(domain, msg.reason)
            elif msg.code == "split-refused" and self.split is not None:  # its state to resume: refused, not lost
                self.split.resume_refused(domain, msg.reason)
            elif msg.code == "split-failed" and self.split is not None:  # a step diverged: the job fails, not lost
                self.split.step_failed(domain, msg.reason)
            else:
                self._fail(domain, msg.reason)
        elif isinstance(msg, (wire.TrainRes, wire.EvalRes)):
            self.collector.receive(domain, msg, tensors, wire.frames_size(body))
        elif isinstance(msg, (wire.SecaggShares, wire.SecaggUnmaskRes)):
            self.collector.receive_secagg(domain, msg)
        elif not self._handle_other(domain, msg, tensors):
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"unexpected {msg.type} message"))

    def _handle_other(self, domain: str, msg: Any, tensors: wire.Tensors) -> bool:
        """Handle a message kind the training loop does not know (the analysis room's); False rejects it."""
        if self.split is not None and self.split.receive(domain, msg, tensors):
            return True
        return self.analysis is not None and self.analysis.receive(domain, msg, tensors)

    @functools.cached_property
    def limits(self) -> tuple[int, int]:
        """(largest tensor frame, largest tensor payload of one message) in bytes the plan lets a domain send."""
        frame = total = 0
        for job in self.plan.jobs:
            sizes = [math.prod(t.shape) * wire.DTYPES[t.dtype].itemsize for t in job.tensors]
            if job.privacy.secure_aggregation:
                # the masked update: one int64 word per shared parameter (and adaptive client DP's bit)
                sizes = [(job.shared_parameters + client_dp.extra_words(job)) * 8]
            elif job.aggregation.strategy == "scaffold":
                sizes += sizes  # SCAFFOLD: each tensor's control variate change follows the update
            elif job.compression is not None:  # its frames follow from the plan (top-k over k = 0.5 is larger)
                sizes = [math.prod(shape) * wire.DTYPES[dtype].itemsize for _, shape, dtype in compress.layout(
                    job.compression.kind, job.compression.k, [(t.name, t.shape) for t in job.tensors])]
            frame = max(frame, min(wire.CHUNK_BYTES, max(sizes, default=0)))
            total = max(total, sum(sizes))
        if self.plan.split_models:  # PSI points and activations grow with the rows, unknown to the plan
            frame, total = wire.CHUNK_BYTES, max(total, SPLIT_MAX_BYTES)
        return frame, total

    def _rejected(self, domain: str, msg: wire.ErrorReply) -> None:
        """A domain rejected one instruction: record it, and leave it out of that job."""
        what = f"job {msg.job!r} round {msg.round}" if msg.job else "an instruction"
        self.sink.emit(ev.MessageRejected(sender="coordinator",
                                          reason=f"domain {domain} rejected {what} ({msg.code}): {msg.reason}"))
        if self.current is not None and msg.job == self.current.name:
            self.dropped.setdefault(domain, f"rejected {what}: {msg.reason}")

    def _check_result(self, domain: str, msg: Any, tensors: wire.Tensors) -> tuple[str, float | None]:
        return self.collector.check(domain, msg, tensors)

    def _fail(self, domain: str, reason: str) -> None:
        """The domain itself reported a failure it cannot go on from: lost, and no round waits for it."""
        self.members.lose(domain, reason, final=True, cause="error reported")

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
            if domain is not None:
                self._reap_exited(domain, os.waitstatus_to_exitcode(status))

    def _exited_child(self, domain: str, wait_s: float = 0.2) -> bool:
        """`domain`'s connection closed: when its daemon is a child of this process that exited (or exits
        within `wait_s`: a killed process closes its sockets just before it can be reaped), reap it and
        lose the domain with its exit code (`killed`, `exited with code -9`) rather than `unreachable`."""
        pid = next((p for p, d in self.children.items() if d == domain), None)
        deadline = time.monotonic() + wait_s
        while pid is not None:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return False
            if got:
                del self.children[pid]
                self._reap_exited(domain, os.waitstatus_to_exitcode(status))
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return False

    def _reap_exited(self, domain: str, code: int) -> None:
        """A forked daemon exited with `code`: lost for good (nothing restarts it; no round waits for it)."""
        if domain in self.peers or self.current is not None or code != 0:
            joined = domain in self.peers or domain in self.members.failed or domain in self.members.waiting
            self.members.lose(domain, f"daemon exited with code {code}: {_daemon_said(self.run_dir, domain)}",
                              final=True, cause=f"exited with code {code}" if joined else "data refused")

    def _send(self, peer: Peer, msg: Any, tensors: wire.Tensors | None = None) -> int:
        return self.members.send(peer, msg, tensors)

    def _reply(self, identity: bytes, msg: Any) -> None:
        self.link.reply(identity, msg.model_copy(update={"run": self.m.run, "sender": "coordinator"}))


def _group(domains: list[str], timeout: dict[str, float]) -> dict[float, list[str]]:
    """`domains` grouped by their join timeout."""
    out: dict[float, list[str]] = {}
    for d in domains:
        out.setdefault(timeout[d], []).append(d)
    return out


def _daemon_said(run_dir: Path, domain: str) -> str:
    """The last line of a forked daemon's log when it is one of the daemon's own closing lines
    (`error: …`, `internal error: …`, built from the domain's vocabulary); anything else in that
    log (a library's text, a traceback, a host path) stays in the log."""
    line = last_line(run_dir / "logs" / f"{domain}.log")
    if line.startswith(("error: ", "internal error: ")) or line in ("no log", "no output"):
        return line
    return "see its log"
