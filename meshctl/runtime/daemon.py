"""One domain's daemon: holds its data warm, trains and evaluates where the data is.

The daemon connects a DEALER (Curve client) to the coordinator's ROUTER, says
Hello with its row counts, then serves TrainIns / EvalIns until Shutdown. One
started without a run id (`meshctl daemon` on another host) first asks the
coordinator which run it serves (Knock -> RunInfo): its secure-aggregation masks and
its privacy ledger are bound to that run id. It says each state change in one line
on stderr (`say`). It reads
its products once, at start, through `data.py`; what it sends is the header of
each reply plus model tensors. Rows and PII never reach this module's sockets.

The domain has the final word: before Hello it decides, with its own copy of the
plan, every job it is asked to take part in (governance.py) and checks the
contracts of the products those jobs read (quality.py). A job it refuses is
never loaded, and an instruction for it is answered with an ErrorReply.

Once joined, a small thread sends a Heartbeat every `HEARTBEAT_S` seconds on a
second DEALER socket under the same Curve key (the coordinator knows a domain by
its key), so the daemon stays visibly alive while the main thread trains.

The link itself carries ZMTP heartbeats (`dial`): a coordinator that is gone, or
silent past `lost_after()`, closes the connection. A one-run daemon whose
connection stays down that long ends with CoordinatorLost (exit 1); the
long-lived `meshctl serve` (meshctl.runtime.domain.service) dials again instead,
on a new socket, and serves run after run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshctl.compiler.plan import Plan, PlanJob, PlanRead
from meshctl.errors import InternalError, MeshctlError, UserError
from meshctl.runtime import governance, wire
from meshctl.runtime.data import DataError, JobData, count_rows, feature_sums, load_job_data
from meshctl.runtime.features import categorical, input_width
from meshctl.runtime.heldout import held_out_of, load_held_out, score_held_out
from meshctl.runtime.kernels import evaluate, personal, privacy, train_local
from meshctl.runtime.kernels.models import build_model
from meshctl.runtime.kernels.privacy import NotPrivate, check_private, dp_train_local
from meshctl.runtime.kernels.train import evaluate_stream, train_stream
from meshctl.runtime.keys import KeyPair, curve_client, fast_reconnect, fingerprint
from meshctl.runtime.liveness import heartbeat_timeout
from meshctl.runtime.stream import BUFFER_ROWS, StreamData, streams

if TYPE_CHECKING:
    import duckdb

POLL_MS = 500
SEND_TIMEOUT_MS = 120_000
HEARTBEAT_S = 2.0
"""A joined daemon sends a Heartbeat this often, also while it trains."""


def lost_after() -> float:
    """How long a daemon's coordinator connection may stay down (or silent) before it is lost: the
    heartbeat timeout of `meshctl.runtime.liveness`, the coordinator's own."""
    return heartbeat_timeout()


class CoordinatorLost(UserError):
    """The coordinator connection closed (or went silent past the ZMTP heartbeat timeout) and did not
    come back within the daemon's grace (`Daemon.lost_grace`)."""


def heartbeat_interval() -> float:
    """`HEARTBEAT_S`, or less when MESHCTL_HEARTBEAT_TIMEOUT_S makes the coordinator stricter."""
    try:
        timeout = float(os.environ.get("MESHCTL_HEARTBEAT_TIMEOUT_S", ""))
    except ValueError:
        return HEARTBEAT_S
    return max(0.1, min(HEARTBEAT_S, timeout / 4))


@dataclass
class DaemonConfig:
    domain: str
    plan: Plan
    base_dir: Path
    """Directory that product sources are relative to (the mesh.yaml's)."""
    coordinator: str
    """Endpoint of the coordinator's ROUTER, tcp://host:port."""
    server_key: bytes
    """The coordinator's Z85 Curve public key."""
    keys: KeyPair
    run: str = ""
    threads: int = 1
    join_timeout_s: float = 30.0
    parent_pid: int | None = None
    """Exit when this process is no longer our parent (the launcher died)."""


@dataclass
class _JobState:
    job: PlanJob
    data: JobData | StreamData
    model: torch.nn.Module
    version: int = -1
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """The global weights of `version`, as received."""
    standardized: bool = False
    vocab: dict[str, list[str]] | None = None
    """The agreed vocabulary of the job's categorical features, once TrainIns brought it."""
    loaded: int = -1
    """Version the model holds unchanged (-1 after training): no reload needed."""
    sigma: float = 0.0
    """DP training: the noise multiplier that spends the job's ε over its rounds on this data."""
    done: tuple[float, int] = (0.0, 0)
    """DP training, resumed run: (sigma, steps) that a previous process of this run charged."""
    trained: int = 0
    """DP training: rounds this process has charged."""
    spent: float = 0.0
    """DP training: ε of the rounds trained so far in this run (what the ledger has been charged)."""
    client_noise: Any = None
    """Client-level DP: the job's `client_dp.Noise`, once its first round is charged."""
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    """Top-k compression: what earlier rounds' updates did not send (error feedback), by tensor."""
    server_control: dict[str, torch.Tensor] = field(default_factory=dict)
    """SCAFFOLD: the server's control variate c of `version`, as received beside the weights."""
    control: dict[str, torch.Tensor] = field(default_factory=dict)
    """SCAFFOLD: this domain's control variate c_i, kept across rounds (empty: zero)."""
    state_round: int = 0
    """The round after which `control` and `residual` are as they are (0: zero, as before round 1)."""


class Daemon:
    """A domain daemon. `run()` returns the process exit code."""

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.jobs: dict[str, _JobState] = {}
        self.reserved = False
        """Whether this daemon holds ε reservations in the privacy ledger (released when it exits)."""
        self.rows: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self.round_gates: dict[str, governance.RoundGate] = {}
        """This domain's own `scope: round` policies per job, compiled on first use."""
        """Jobs this domain will not take part in, with the denying policies."""
        self.secagg: dict[str, Any] = {}
        self.secagg_rounds: dict[tuple[str, int, int], dict[str, Any]] = {}
        """Secure aggregation: (job, round, attempt) -> this domain's self-mask seed and share pair of it."""
        self.secagg_revealed: set[str] = set()
        """Public keys (base64) whose mask-key shares this domain revealed: it never reveals their seeds."""
        self.held_out: dict[str, JobData] = {}
        """Job -> the rows of its evaluation product, when this domain holds it (all test data)."""
        """Secure aggregation: job -> this domain's X25519 private key for it (made at start, never sent)."""
        self.decisions: list[wire.Decision] = []
        self.checks: list[wire.CheckOutcome] = []
        self.beat_every = heartbeat_interval()
        self.state = "idle"
        """What the main thread is doing, as heartbeats report it."""
        self.link = "connecting"
        """The coordinator connection: connecting, up (handshake done) or lost (dropped since)."""
        self.lost_at = 0.0
        self.lost_grace = lost_after()
        """Seconds `_serve` waits for a lost connection to come back before it raises CoordinatorLost
        (`meshctl serve` sets 0: it reconnects on a new socket at once)."""
        self.tap_lock = threading.Lock()
        tap = os.environ.get("MESHCTL_WIRE_TAP")
        self.tap = open(Path(tap) / f"{cfg.domain}.tap", "ab") if tap else None  # noqa: SIM115
        """Audit tap: every frame this daemon sends, appended as (u64 length, bytes)."""

    # -- start-up ----------------------------------------------------------------
    def load(self) -> None:
        """Decide every job of this domain, check its contracts, read what the accepted jobs use."""
        import duckdb

        plan, me = self.cfg.plan, self.cfg.domain
        if me not in {d.name for d in plan.domains}:
            raise UserError(f"domain {me!r} is not in the plan")
        with duckdb.connect() as con:  # one connection for the counts, the checks and the reads
            # DuckDB's buffers grow with its threads (all cores by default): a daemon's footprint
            # must not grow with its host (docs/streaming.md)
            con.execute(f"SET threads TO {max(1, self.cfg.threads)}")
            for product in plan.products:
                if product.domain == me:
                    try:
                        self.rows[product.id] = count_rows(product, self.cfg.base_dir, con)
                    except DataError:  # read by split parts only: the job refuses it when it starts (data)
                        if any(r.product == product.id for j in [*plan.jobs, *plan.analyses] for r in j.reads) or not any(
                                p.product == product.id for s in plan.split_models for p in s.parts):
                            raise
            self.govern(con=con)
            self._load_held_out(con)
            for job in plan.jobs:
                read = next((r for r in job.reads if r.domain == me), None)
                if read is None or job.name in self.refused:
                    continue
                try:
                    data = self._job_data(job, read, con)
                except DataError as err:
                    self._refuse_bad_data(job, err)
                    continue
                model = self._build_model(job)
                if model is None or not self._private(job, model):
                    continue
                self.jobs[job.name] = _JobState(job, data, model)
                if job.privacy.secure_aggregation:
                    from meshctl.runtime.kernels import secagg

                    self.secagg[job.name] = secagg.new_key()

    def _job_data(self, job: PlanJob, read: PlanRead, con: duckdb.DuckDBPyConnection) -> JobData | StreamData:
        """The job's rows as tensors, or, for a streamed job (meshctl.runtime.stream), what re-reading them needs."""
        product = self.cfg.plan.product(read.product)
        if streams(job, product, self.rows.get(product.id, 0)):
            data = StreamData.open(job, product, self.cfg.base_dir, read.client_id, threads=self.cfg.threads)
            say(f"job {job.name}: streaming {data.rows} rows of {product.id} "
                f"(buffer {job.training.buffer_rows or BUFFER_ROWS} rows)")
            return data
        return load_job_data(job, product, self.cfg.base_dir, read.client_id, con)

    def _load_held_out(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read the evaluation products this domain holds for the jobs it accepted: every row is test
        data (meshctl.runtime.heldout). A domain that only holds one gets a job state that
        never trains."""
        plan = self.cfg.plan
        for job in plan.jobs:
            pid = held_out_of(plan, job, self.cfg.domain)
            if not pid or job.name in self.refused:
                continue
            try:
                data = load_held_out(job, plan.product(pid), self.cfg.base_dir, con)
            except DataError as err:
                self._refuse_bad_data(job, err)
                continue
            if self.cfg.domain not in job.participants:
                model = self._build_model(job)
                if model is None:
                    continue
                self.jobs[job.name] = _JobState(job, data, model)
            self.held_out[job.name] = data

    def _build_model(self, job: PlanJob) -> torch.nn.Module | None:
        """The job's model, or None after refusing the job: an entrypoint's code must hash on this
        host as the plan pins it (the reason names the first file that differs or is missing)."""
        from meshctl.compiler.entrypoint import check_code

        reason = check_code(job.architecture, self.cfg.base_dir)
        if reason is None:
            try:
                # seeded as the coordinator's initial model: layers that never come from the
                # coordinator (personalisation's local ones) start from the same weights every run
                return build_model(job, root=self.cfg.base_dir.resolve(), seed=job.training.seed)
            except Exception as err:  # noqa: BLE001 - user code: refuse the job in one line
                reason = f"cannot build model {job.architecture.entrypoint}: {type(err).__name__}: {err}"
        reason = reason.splitlines()[0][:1000]
        log_locally(UserError(f"job {job.name}: {reason}"))
        decision = wire.Decision(policy="invariant:model-code", scope="model", subject=f"model.{job.name}",
                                 effect="deny", reason=reason, domain=self.cfg.domain)
        self.decisions.append(decision)
        self.refused[job.name] = governance.refusal([decision])
        return None

    def _private(self, job: PlanJob, model: torch.nn.Module) -> bool:
        """Whether DP-SGD can train `model` (a DP job's model without per-example gradients is refused)."""
        if job.privacy.dp is None:
            return True
        try:
            check_private(model)
        except NotPrivate as err:
            decision = wire.Decision(policy="invariant:dp-sgd", scope="model", subject=f"model.{job.name}",
                                     effect="deny", reason=str(err)[:4096], domain=self.cfg.domain)
            self.decisions.append(decision)
            self.refused[job.name] = governance.refusal([decision])
            return False
        return True

    def _refuse_bad_data(self, job: PlanJob, err: DataError) -> None:
        """Refuse `job` over data it cannot train on; the detail stays in this domain's log."""
        log_locally(err)
        decision = wire.Decision(policy="data", scope="product", subject=f"model.{job.name}", effect="deny",
                                 reason=err.message[:4096], domain=self.cfg.domain)
        self.decisions.append(decision)
        self.refused[job.name] = governance.refusal([decision])

    def _spent(self, plan: Plan, jobs: list[PlanJob]) -> dict[str, float]:
        """ε already spent, or reserved by other live runs, on this domain's capped products read by
        DP jobs (privacy ledger)."""
        ids = self._capped(plan, jobs)
        if not ids:
            return {}
        from meshctl.runtime.ledger import Ledger, ledger_path

        ledger, run = Ledger(ledger_path(self.cfg.base_dir)), self.cfg.run
        # what this run charged before a coordinator crash is part of the job's own ε, not of the past;
        # without a run id nothing is this run's own (an empty id would match every run that had none)
        return {pid: ledger.spent(pid) - (ledger.spent(pid, run=run) if run else 0.0)
                + ledger.held(pid, exclude_run=run or None) for pid in sorted(ids)}

    def _capped(self, plan: Plan, jobs: list[PlanJob]) -> set[str]:
        """This domain's products with an ε budget that DP jobs among `jobs` read."""
        return {r.product for j in jobs if (j.privacy.dp or j.privacy.client_dp) is not None for r in j.reads
                if r.domain == self.cfg.domain and plan.product(r.product).epsilon_budget is not None}

    def _reserve(self, jobs: list[PlanJob]) -> None:
        """Admission: reserve each accepted DP job's whole ε on every capped product it reads here,
        atomically against every other run; a product that cannot pay it refuses the job."""
        from meshctl.runtime.ledger import BudgetExceeded, Ledger, ledger_path

        plan = self.cfg.plan
        for job in jobs:
            dp = job.privacy.dp or job.privacy.client_dp
            for pid in sorted(self._capped(plan, [job])):
                try:
                    Ledger(ledger_path(self.cfg.base_dir)).reserve(
                        pid, dp.epsilon, plan.product(pid).epsilon_budget,  # type: ignore[union-attr]
                        subject=f"model:{job.name}", run=self.cfg.run)
                    self.reserved = True
                except BudgetExceeded as err:
                    denial = wire.Decision(
                        policy="invariant:epsilon-budget", scope="model", subject=f"model.{job.name}",
                        effect="deny", domain=self.cfg.domain,
                        reason=f"cannot reserve the job's ε {err.epsilon:g} on {pid}: {err}")
                    self.decisions.append(denial)
                    self.refused[job.name] = governance.refusal([denial])
                    break

    def _release(self) -> None:
        """Give back what this daemon's reservations hold and its rounds did not spend."""
        if self.reserved:
            from meshctl.runtime.ledger import Ledger, ledger_path

            Ledger(ledger_path(self.cfg.base_dir)).release(self.cfg.run)

    def govern(self, today: datetime | None = None, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Decide every job involving this domain, then check the contracts of what it would read
        (in `con`, the domain's DuckDB connection, when given)."""
        plan, me = self.cfg.plan, self.cfg.domain
        day = (today or datetime.now(UTC)).date()
        mine = [j for j in plan.jobs if me in j.participants or any(r.domain == me for r in j.reads)
                or held_out_of(plan, j, me)]
        splits = [s for s in plan.split_models if me in s.participants]
        if not mine and not splits:
            return
        integrity = governance.plan_integrity(plan, me)
        self.decisions.append(integrity)
        for split in splits:  # split models: the same model policies, their own invariants (no ledger, no checks)
            decisions = governance.evaluate_split(plan, split, me, day)
            self.decisions += decisions
            reason = governance.refusal([integrity, *decisions])
            if reason:
                self.refused[split.name] = reason
        spent = self._spent(plan, mine)
        for job in mine:
            decisions = governance.evaluate_job(plan, job, me, day, spent)
            self.decisions += decisions
            reason = governance.refusal([integrity, *decisions])
            if reason:
                self.refused[job.name] = reason
        self._check_contracts([j for j in mine if j.name not in self.refused], con)
        self._reserve([j for j in mine if j.name not in self.refused])

    def _check_contracts(self, jobs: list[PlanJob], con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Run the contract checks of each product the accepted jobs read; a blocking failure refuses them."""
        from meshctl.runtime.quality import check_product

        plan, me = self.cfg.plan, self.cfg.domain
        contracts = {c.id: c for c in plan.contracts}
        products = sorted({r.product for j in jobs for r in j.reads if r.domain == me}
                          | {held_out_of(plan, j, me) for j in jobs} - {""})
        blocked: dict[str, wire.Decision] = {}
        for pid in products:
            product = plan.product(pid)
            results = check_product(con, product, contracts.get(product.contract), self.cfg.base_dir)
            local = {r.rule: r.observed for r in results if r.author_query}
            if local:  # a SQL rule's result may be a data value: it stays in this domain's log
                print(f"{pid}: SQL rules observed {local}", file=sys.stderr)
            results = [r.shared() for r in results]
            self.checks += [wire.CheckOutcome(product=pid, contract=product.contract, rule=r.rule,
                                              observed=r.observed, operator=r.operator, threshold=r.threshold,
                                              passed=r.passed, severity=r.severity) for r in results]
            for r in results:
                if r.log:  # the library's text (it can quote a cell) stays in this domain
                    print(f"{pid}: rule {r.rule} could not run: {r.detail} [detail: {r.log}]", file=sys.stderr)
            failed = [r for r in results if not r.passed and r.severity == "error"]
            if failed:
                why = "; ".join(f"{r.rule} observed {_num(r.observed)}, {r.operator} {r.threshold}"
                                for r in failed)
                blocked[pid] = wire.Decision(policy=f"contract:{product.contract or pid}", scope="product",
                                             subject=f"product.{pid}", effect="deny",
                                             reason=f"{pid} fails its contract: {why}", domain=me)
        for job in jobs:
            denials = [blocked[r.product] for r in job.reads if r.domain == me and r.product in blocked]
            if denials:
                self.decisions += [d.model_copy(update={"subject": f"model.{job.name}"}) for d in denials]
                self.refused[job.name] = governance.refusal(denials)

    # -- serving -----------------------------------------------------------------
    def run(self) -> int:
        if self.cfg.domain not in {d.name for d in self.cfg.plan.domains}:  # before waiting for anyone
            raise UserError(f"domain {self.cfg.domain!r} is not in the plan")
        torch.set_num_threads(max(1, self.cfg.threads))
        ctx = zmq.Context()
        sock, monitor = self.open_link(ctx)
        say(f"connecting to {self.cfg.coordinator} (coordinator key {fingerprint(self.cfg.server_key)})")
        sock.connect(self.cfg.coordinator)
        try:
            if not self.cfg.run and not self._await_run(sock, monitor):
                return 0
            try:
                self.load()
            except Exception as err:  # noqa: BLE001 - whatever it was, only our own words leave
                safe = outbound(err)
                self._send(sock, wire.ErrorReply(code="data", reason=safe.message[:4096]), block=False)
                raise safe from None
            return self._serve(sock, monitor)
        finally:
            self._release()
            self._stop_pulse()
            sock.disable_monitor()
            monitor.close(0)
            sock.close()
            ctx.term()

    def open_link(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        """A new DEALER to the coordinator and its monitor (see `dial`); not connected yet."""
        return dial(ctx, self.cfg.keys, self.cfg.server_key, beat_every=self.beat_every,
                    fast=self.cfg.parent_pid is not None)  # forked by a coordinator that is binding right now

    def _serve(self, sock: zmq.Socket, monitor: zmq.Socket) -> int:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        joined = hello_sent = False
        started = time.monotonic()
        for job, why in sorted(self.refused.items()):
            say(f"refused job {job}: {why}")
        while True:
            if not hello_sent:  # no peer until the handshake succeeds: never block on it
                hello = wire.Hello(plan_hash=self.cfg.plan.plan.hash, pid=os.getpid(), rows=self.rows,
                                   stats=self._stats(), refused=self.refused, decisions=self.decisions,
                                   checks=self.checks, secagg_keys=self._secagg_public(),
                                   category_counts=self._category_counts())
                hello_sent = self._send(sock, hello, block=False)
            ready = dict(poller.poll(POLL_MS))
            if monitor in ready and sock not in ready:  # what came before a drop is read first
                self._link_event(recv_monitor_message(monitor))
            if sock in ready:
                got = _receive(sock)
                if got is None:
                    continue
                msg, tensors = got
                if isinstance(msg, wire.Welcome):
                    self._welcomed(msg)
                    joined = True
                    self._start_pulse(sock.context)
                elif isinstance(msg, wire.Refused):
                    raise UserError(f"coordinator refused domain {self.cfg.domain!r}: {msg.reason}")
                elif isinstance(msg, wire.Shutdown):
                    say(f"coordinator said shutdown: {msg.reason or 'no reason given'}")
                    if msg.completed:
                        self._drop_state()
                    return 0
                else:
                    self._dispatch(sock, msg, tensors)
                continue
            if self.cfg.parent_pid is not None and os.getppid() != self.cfg.parent_pid:
                print("launcher is gone; exiting", file=sys.stderr)
                return 1
            if self.link == "lost" and time.monotonic() - self.lost_at >= self.lost_grace:
                raise CoordinatorLost(f"lost the coordinator at {self.cfg.coordinator}: no connection for "
                                      f"{time.monotonic() - self.lost_at:.0f}s",
                                      hint="`meshctl serve` reconnects and serves run after run")
            if not joined and time.monotonic() - started > self.cfg.join_timeout_s:
                raise UserError(f"no answer from the coordinator at {self.cfg.coordinator} within "
                                f"{self.cfg.join_timeout_s:.0f}s")

    # -- the run and the link: what this daemon learns, and says, as it goes -----------
    def _await_run(self, sock: zmq.Socket, monitor: zmq.Socket) -> bool:
        """Ask the coordinator which run it serves (Knock -> RunInfo) and take that run id, before
        anything bound to the run is decided; False when the coordinator ended the run first."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        sent, started = False, time.monotonic()
        while True:
            if not sent:  # no peer until the handshake succeeds: never block on it
                sent = self._send(sock, wire.Knock(), block=False)
            ready = dict(poller.poll(POLL_MS))
            if monitor in ready:
                self._link_event(recv_monitor_message(monitor))
            if sock in ready:
                got = _receive(sock)
                if got is None:
                    continue
                msg = got[0]
                if isinstance(msg, wire.RunInfo):
                    self.cfg.run = self._checked_run(msg.run)
                    if msg.plan_hash != self.cfg.plan.plan.hash:
                        say(f"plan out of date: the coordinator runs plan {_short(msg.plan_hash)}, this domain "
                            f"has {_short(self.cfg.plan.plan.hash)}")
                    return True
                if isinstance(msg, wire.Refused):
                    raise UserError(f"coordinator refused domain {self.cfg.domain!r}: {msg.reason}")
                if isinstance(msg, wire.Shutdown):
                    say(f"coordinator said shutdown: {msg.reason or 'no reason given'}")
                    return False
            if time.monotonic() - started > self.cfg.join_timeout_s:
                raise UserError(f"no answer from the coordinator at {self.cfg.coordinator} within "
                                f"{self.cfg.join_timeout_s:.0f}s")

    def _checked_run(self, run: str) -> str:
        """The run id a coordinator sent, if it is one (it keys this domain's ledger and masks)."""
        if not RUN_ID.fullmatch(run):
            raise UserError(f"coordinator at {self.cfg.coordinator} sent no usable run id ({run[:40]!r})")
        return run

    def _welcomed(self, msg: wire.Welcome) -> None:
        """Joined: check the run and plan the Welcome names against this daemon's, and say so."""
        mine = self.cfg.plan.plan.hash
        if msg.plan_hash and msg.plan_hash != mine:
            raise UserError(f"plan out of date: the coordinator runs plan {_short(msg.plan_hash)}, "
                            f"this domain has {_short(mine)}")
        if msg.run != self.cfg.run:
            raise UserError(f"the coordinator runs run {msg.run[:40]!r}, this daemon was started for "
                            f"run {self.cfg.run!r}")
        splits = [s.name for s in self.cfg.plan.split_models if self.cfg.domain in s.participants]
        jobs = ", ".join(sorted({*self.jobs, *(s for s in splits if s not in self.refused)})) or "none"
        refused = f"; refused: {', '.join(sorted(self.refused))}" if self.refused else ""
        say(f"joined run {self.cfg.run} (plan {_short(mine)}; jobs: {jobs}{refused})")

    def _link_event(self, evt: dict[str, Any]) -> None:
        """A monitor event of the coordinator connection: a failed handshake ends the daemon;
        a dropped or restored connection is said once."""
        kind = evt["event"]
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise UserError(f"coordinator at {self.cfg.coordinator} refused domain "
                            f"{self.cfg.domain!r}: its Curve key is not the one in the plan")
        if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if self.link == "lost":  # the key worked before: the link is what fails (the grace decides)
                return
            raise UserError(f"Curve handshake with {self.cfg.coordinator} failed "
                            f"(is the coordinator's public key right?)")
        if kind == zmq.EVENT_DISCONNECTED and self.link == "up":
            self.link, self.lost_at = "lost", time.monotonic()
            say("lost the coordinator (its connection closed); reconnecting")
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.link == "lost":
                say("reconnected")
            self.link = "up"

    def _dispatch(self, sock: zmq.Socket, msg: object, tensors: wire.Tensors) -> None:
        """Serve one instruction; anything this daemon's plan does not allow gets an ErrorReply."""
        if isinstance(msg, wire.TrainIns):
            self.state = "training"
            shared = self._secagg_share(msg)  # secure aggregation: the shares go out before training
            if shared is not None:
                self._send(sock, shared)
            if not isinstance(shared, wire.ErrorReply):
                _slow_down()  # (a test hook; a no-op unless set)
                reply, update = self._train(msg, tensors)
                self._send(sock, reply, update)
                say(_trained(msg, reply))
        elif isinstance(msg, wire.SecaggUnmaskIns):
            self._send(sock, self._secagg_unmask(msg))
        elif isinstance(msg, wire.EvalIns):
            self.state = "evaluating"
            self._send(sock, self._evaluate(msg, tensors))
        elif isinstance(msg, wire.AnalyzeIns):  # federated analytics: gated aggregates only
            from meshctl.runtime.analytics_domain import answer

            self.state = "analyzing"
            self._send(sock, answer(self.cfg.plan, self.cfg.domain, self.cfg.base_dir, msg, self.cfg.run))
        elif isinstance(msg, wire.SplitIns):  # split learning: activations and gradients only
            self.state = "training"
            self._split(sock, msg, tensors)
        else:
            kind = getattr(msg, "type", type(msg).__name__)
            self._send(sock, wire.ErrorReply(code="unexpected", reason=f"a daemon does not serve {kind}"))
        splits = getattr(self, "splits", None)  # inside a split job (its intersection to its `finish`): busy
        self.state = "training" if splits is not None and splits.jobs else "idle"  # between its steps too

    def _split(self, sock: zmq.Socket, msg: wire.SplitIns, tensors: wire.Tensors) -> None:
        """Serve one split-learning step (meshctl.runtime.domain.split); a failure is one ErrorReply line."""
        from meshctl.runtime.domain.split import SplitDomain

        if msg.job in self.refused:  # decided before Hello (governance.evaluate_split): no data is read
            self._send(sock, wire.ErrorReply(code="refused", reason=f"split job {msg.job}: {self.refused[msg.job]}",
                                             job=msg.job))
            return
        if getattr(self, "splits", None) is None:
            self.splits = SplitDomain(self.cfg.plan, self.cfg.domain, self.cfg.base_dir, self.cfg.run)
        replies = self.splits.answer(msg, tensors, log=lambda line: print(line, file=sys.stderr, flush=True))
        for reply, out in replies:
            self._send(sock, reply, out)
        if isinstance(replies[0][0] if replies else None, wire.ErrorReply):
            return
        if msg.step in ("psi_order", "finish"):
            say(f"split job {msg.job}: {msg.step.replace('_', ' ')} done")

    # -- heartbeats ----------------------------------------------------------------
    def _start_pulse(self, ctx: zmq.Context) -> None:
        if getattr(self, "pulse", None) is None:
            self.pulse_stop = threading.Event()
            self.pulse = threading.Thread(target=self._pulse, args=(ctx,), name="heartbeat", daemon=True)
            self.pulse.start()

    def _stop_pulse(self) -> None:
        if getattr(self, "pulse", None) is not None:
            self.pulse_stop.set()
            self.pulse.join(5)
            self.pulse = None

    def _pulse(self, ctx: zmq.Context) -> None:
        """Heartbeat thread: its own socket (zmq sockets are not shared across threads)."""
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 4
        curve_client(sock, self.cfg.keys, self.cfg.server_key)
        sock.connect(self.cfg.coordinator)
        try:
            while not self.pulse_stop.wait(self.beat_every):
                beat = wire.Heartbeat(state=self.state, sender=self.cfg.domain, run=self.cfg.run)
                frames = wire.encode(beat)
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue  # not connected (yet): the coordinator will notice the silence
                self._tap_frames(frames)
        finally:
            sock.close(0)

    def _state(self, job: str, version: int, tensors: wire.Tensors, rnd: int) -> _JobState | wire.ErrorReply:
        if job in self.refused:
            print(f"rejected an instruction for job {job!r}, which this domain refused: {self.refused[job]}",
                  file=sys.stderr)
            return wire.ErrorReply(code="refused", reason=f"domain {self.cfg.domain} refused job {job!r}: "
                                   f"{self.refused[job]}"[:4096], job=job)
        st = self.jobs.get(job)
        if st is None:
            return wire.ErrorReply(code="unknown-job", reason=f"domain {self.cfg.domain} has no job {job!r}", job=job)
        if rnd > st.job.training.rounds:
            return wire.ErrorReply(code="bad-round", reason=f"job {job!r} has {st.job.training.rounds} rounds, "
                                   f"not {rnd}", job=job)
        if tensors:
            expect = {t.name: (t.shape, t.dtype) for t in st.job.tensors}
            if uses_control(st.job):  # SCAFFOLD: the server's c travels beside the weights
                expect |= {CONTROL + t.name: (t.shape, t.dtype) for t in st.job.tensors}
            got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
            if got != expect:
                print(f"rejected weights for job {job!r} that do not match this domain's plan", file=sys.stderr)
                return wire.ErrorReply(code="bad-weights", reason="weights do not match the plan's model", job=job)
            st.server_control = {k.removeprefix(CONTROL): v for k, v in tensors.items() if k.startswith(CONTROL)}
            tensors = {k: v for k, v in tensors.items() if not k.startswith(CONTROL)}
            st.version, st.weights = version, tensors
        elif st.version != version:
            return wire.ErrorReply(code="stale", reason=f"have weights v{st.version}, asked for v{version}", job=job)
        if st.loaded != st.version:
            if st.job.personalization is not None:  # its local tensors stay as this domain trained them
                personal.load_shared(st.model, st.weights, st.job)
            else:
                st.model.load_state_dict(st.weights)
            st.loaded = st.version
        return st

    def _stats(self) -> dict[str, wire.FeatureStats]:
        """Feature sums of jobs that standardize (aggregates; the coordinator pools them)."""
        out = {}
        for name, st in self.jobs.items():
            if st.job.training.standardize:
                n, s, q = st.data.sums if isinstance(st.data, StreamData) else feature_sums(st.data.x_train)
                out[name] = wire.FeatureStats(count=n, sum=s, sumsq=q)
        return out

    def _category_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per job, per categorical feature: counts of the values at least k training rows hold (never rarer ones)."""
        return {name: counts for name, st in self.jobs.items() if (counts := st.data.category_counts(st.job))}

    def _vocabulary(self, st: _JobState, ins: wire.TrainIns) -> wire.ErrorReply | None:
        """One-hot the job's categorical features over the vocabulary the coordinator agreed (first TrainIns)."""
        if st.vocab is not None or not categorical(st.job):
            return None
        if ins.vocab is None or any(len(ins.vocab.get(f.name, [])) >= f.width for f in categorical(st.job)):
            return wire.ErrorReply(code="bad-vocabulary", reason="missing or malformed vocabulary", job=ins.job)
        st.vocab = {f.name: list(ins.vocab.get(f.name, [])) for f in categorical(st.job)}
        st.data = st.data.with_vocabulary(st.job, st.vocab)
        if ins.job in self.held_out:  # this domain's evaluation product too
            self.held_out[ins.job] = self.held_out[ins.job].with_vocabulary(st.job, st.vocab)
        return None

    def _standardize(self, st: _JobState, ins: wire.TrainIns) -> wire.ErrorReply | None:
        if not st.job.training.standardize or st.standardized:
            return None
        d = input_width(st.job)
        if ins.mean is None or ins.std is None or len(ins.mean) != d or len(ins.std) != d \
                or any(not (v > 0) for v in ins.std):
            return wire.ErrorReply(code="bad-standardization", reason="missing or malformed mean/std", job=ins.job)
        mean, std = torch.tensor(ins.mean), torch.tensor(ins.std)
        data = st.data
        st.data = data.standardized(mean, std) if isinstance(data, StreamData) else \
            replace(data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std)
        st.standardized = True
        return None

    def _train(self, ins: wire.TrainIns, tensors: wire.Tensors) -> tuple[object, dict[str, torch.Tensor] | None]:
        st = self._state(ins.job, ins.version, tensors, ins.round)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round}), None
        denied = self._round_denied(st.job, ins)
        if denied is not None:
            return denied, None
        problem = self._vocabulary(st, ins) or self._standardize(st, ins) or self._restore_state(st, ins.round)
        if problem is not None:
            return problem.model_copy(update={"round": ins.round}), None
        t = st.job.training
        start = time.perf_counter()
        read = next(r for r in st.job.reads if r.domain == self.cfg.domain)
        charges: list[wire.LedgerCharge] = []
        if st.job.privacy.client_dp is not None:
            charged = self._charge_client_round(st, read.product, ins.round)
            if isinstance(charged, wire.ErrorReply):
                return charged, None
            charges = [charged]
        if st.job.privacy.dp is not None:
            charged = self._charge_round(st, read.product, ins.round)
            if isinstance(charged, wire.ErrorReply):
                return charged, None
            charges = [charged]
            dp = st.job.privacy.dp
            loss = dp_train_local(st.model, st.data.x_train, st.data.y_train, epochs=t.local_epochs,
                                  batch_size=t.batch_size, lr=t.lr, clip=dp.clip, sigma=st.sigma,
                                  momentum=t.momentum, weight_decay=t.weight_decay, prox_mu=_prox_mu(st.job),
                                  loss=st.job.loss_name, huber_delta=st.job.huber_delta or 1.0)
        elif isinstance(st.data, StreamData):  # a local epoch walks the table in Arrow batches
            data = st.data
            loss = train_stream(st.model, lambda: data.batches("train"), epochs=t.local_epochs,
                                batch_size=t.batch_size, buffer_rows=t.buffer_rows or BUFFER_ROWS,
                                optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay, shuffle_seed=1000 * ins.round + read.client_id,
                                prox_mu=_prox_mu(st.job), loss=st.job.loss_name,
                                huber_delta=st.job.huber_delta or 1.0, control=_correction(st))
        else:
            loss = train_local(st.model, st.data.x_train, st.data.y_train, epochs=t.local_epochs,
                               batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay, shuffle_seed=1000 * ins.round + read.client_id,
                               prox_mu=_prox_mu(st.job), loss=st.job.loss_name,
                               huber_delta=st.job.huber_delta or 1.0, control=_correction(st))
        seconds = time.perf_counter() - start
        st.loaded = -1
        update = personal.shared_state(st.model, st.job)  # a personalised job's local tensors stay here
        update = _sign_flipped(self.cfg.domain, update, st.weights)  # (a test hook; a no-op unless set)
        examples = st.data.n_train if isinstance(st.data, StreamData) else len(st.data.y_train)
        res = wire.TrainRes(job=ins.job, round=ins.round, examples=examples, loss=loss,
                            seconds=seconds, charges=charges, attempt=ins.attempt)
        if st.job.privacy.client_dp is not None or st.job.privacy.secure_aggregation:
            kept = self._keep_state(st, ins.round)  # (local layers: before the update leaves)
            if kept is not None:
                return kept, None
            if st.job.privacy.client_dp is not None:
                return self._client_update(st, ins, res, update)
            masked = self._masked(st, ins, update, examples)
            if isinstance(masked, wire.ErrorReply):
                return masked, None
            return res, {"masked": masked}
        if st.job.compression is not None:
            sent = self._compressed(st, update)
        elif uses_control(st.job):
            sent = {**update, **_controlled(st, update, examples)}
        else:
            sent = update
        kept = self._keep_state(st, ins.round)  # (before the update leaves: a resume finds it)
        return (res, sent) if kept is None else (kept, None)

    def _keep_state(self, st: _JobState, rnd: int) -> wire.ErrorReply | None:
        """Write what this domain carries across the job's rounds, as it is after round `rnd`
        (meshctl.runtime.domain.state); the domain leaves the job when it cannot."""
        from meshctl.runtime.domain import state

        st.state_round = rnd
        if not state.carried(st.job):
            return None
        directory = state.job_dir(self.cfg.base_dir, self.cfg.run, self.cfg.domain, st.job.name)
        try:
            state.save(directory, rnd, st.control, st.residual, state.local_state(st.model, st.job))
        except OSError as err:
            reason = f"cannot keep the state of job {st.job.name} round {rnd}: {err.strerror or 'write failed'}"
            say(f"{reason} ({directory}: {err})")
            return wire.ErrorReply(code="refused", reason=reason, job=st.job.name, round=rnd)
        return None

    def _drop_state(self) -> None:
        """The run completed (it will not be resumed): delete the state this domain kept to resume it
        (`.meshctl/state/<run>/<domain>/`); its outputs (personal models, split bottom models) stay."""
        import shutil

        from meshctl.runtime.domain import split_state, state

        if not self.cfg.run:
            return
        split_state.drop(self.cfg.base_dir, self.cfg.run, self.cfg.domain)  # (a split job's epochs)
        mine = state.job_dir(self.cfg.base_dir, self.cfg.run, self.cfg.domain, "x").parent
        if mine.is_dir():
            shutil.rmtree(mine, ignore_errors=True)
            with contextlib.suppress(OSError):  # the run's directory, once no domain of this host has any
                mine.parent.rmdir()

    def _restore_state(self, st: _JobState, rnd: int) -> wire.ErrorReply | None:
        """Before training round `rnd`: take up the state this domain kept after its last round before
        `rnd` when memory does not hold it (a new daemon of a resumed run; a coordinator resumed from an
        earlier round). SCAFFOLD's c_i cannot start again from zero: without it the domain leaves the job.
        Top-k's residual can (error feedback restarts; the update of that round lacks the unsent rest): said
        in one line."""
        from meshctl.runtime.domain import state

        if not state.carried(st.job) or 0 < st.state_round < rnd:  # (memory holds it)
            return None
        if rnd == 1:  # (the job starts again from its first round: zero; local layers as initialised)
            st.state_round, st.control, st.residual = 0, {}, {}
            return None
        directory = state.job_dir(self.cfg.base_dir, self.cfg.run, self.cfg.domain, st.job.name)
        try:
            found = state.newest(directory, rnd - 1)
        except ValueError as err:  # (the host path stays in this domain's log, never on the wire)
            found, problem, here = None, "its state file of the round before does not read", str(err)
        else:
            problem, here = f"no state of a round before {rnd} kept", str(directory)
        if found is not None:
            st.state_round, st.control, st.residual = rnd - 1, found[1], found[2]
            if found[3]:  # personalisation's local layers, as this domain had trained them
                st.model.load_state_dict(found[3], strict=False)
            say(f"job {st.job.name}: took up the state this domain kept after round {found[0]}")
            return None
        st.state_round, st.control, st.residual = rnd - 1, {}, {}
        if not uses_control(st.job) and st.job.compression is None:  # local layers alone
            say(f"job {st.job.name}: {problem} ({here}): its local layers start again from their initial "
                f"values at round {rnd}")
            return None
        if uses_control(st.job) and st.job.sampling is None:
            reason = f"cannot restore the SCAFFOLD control variate of job {st.job.name} before round {rnd}: {problem}"
            say(f"{reason} ({here})")
            return wire.ErrorReply(code="refused", reason=reason, job=st.job.name, round=rnd)
        what = "SCAFFOLD control variate" if uses_control(st.job) else "top-k error-feedback residual"
        say(f"job {st.job.name}: {problem} ({here}): the {what} starts again from zero at round {rnd}")
        return None

    @staticmethod
    def _compressed(st: _JobState, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update's change to the round's global weights, compressed as the plan says (top-k keeps
        what it did not send in the job's residual, added to the next round's change)."""
        from meshctl.runtime.kernels import compress

        comp = st.job.compression
        assert comp is not None
        delta = {name: t - st.weights[name].to(t.dtype) for name, t in update.items()}
        sent, st.residual = compress.compress(comp.kind, comp.k, delta, st.residual)
        return sent

    def _secagg_public(self) -> dict[str, str]:
        from meshctl.runtime.kernels import secagg

        return {job: base64.b64encode(secagg.public_bytes(key)).decode() for job, key in self.secagg.items()}

    def _client_update(self, st: _JobState, ins: wire.TrainIns, res: wire.TrainRes,
                       update: dict[str, torch.Tensor]) -> tuple[object, dict[str, torch.Tensor] | None]:
        """Client-level DP: the update Δ = w_local - w_global clipped to the round's clip norm (and, with
        `noise: domain`, this domain's noise share), with the adaptive clipping bit; masked under secure
        aggregation (Δ then, and the bit as one more word), else sent as w_global + Δ with the bit beside."""
        from meshctl.runtime.kernels import client_dp

        job, cdp = st.job, st.job.privacy.client_dp
        assert cdp is not None
        bound = ins.clip if ins.clip is not None else cdp.clip
        base = [st.weights[t.name] for t in job.tensors]
        delta, bit, _ = client_dp.domain_update(base, [update[t.name] for t in job.tensors], bound,
                                                st.client_noise, domain_noise=cdp.noise == "domain",
                                                gen=client_dp.generator())
        if job.privacy.secure_aggregation:
            values = {t.name: d for t, d in zip(job.tensors, delta)}
            extra = [torch.tensor([bit], dtype=torch.float64)] if cdp.adaptive is not None else []
            masked = self._masked(st, ins, values, 1, extra)
            if isinstance(masked, wire.ErrorReply):
                return masked, None
            return res, {"masked": masked}
        sent = {t.name: (b.double() + d).to(b.dtype) for t, b, d in zip(job.tensors, base, delta)}
        if job.compression is not None:  # fp16, int8 (topk is refused: MESH546)
            sent = self._compressed(st, sent)
        return res.model_copy(update={"clip_bit": bit if cdp.adaptive is not None else None}), sent

    def _charge_client_round(self, st: _JobState, product: str, rnd: int) -> wire.LedgerCharge | wire.ErrorReply:
        """Client-level DP: charge the ledger ε(after round `rnd`) - ε(charged so far in this run), before
        training; every participant pays the same (the accountant of meshctl.runtime.kernels.client_dp)."""
        from meshctl.runtime.kernels import client_dp
        from meshctl.runtime.ledger import BudgetExceeded, Ledger, ledger_path

        job = st.job
        ledger = Ledger(ledger_path(self.cfg.base_dir))
        subject = f"model:{job.name}"
        if st.client_noise is None:
            try:
                st.client_noise = client_dp.job_noise(job)
            except ValueError as err:
                return wire.ErrorReply(code="policy:privacy-ledger", reason=f"{product}: {err}", job=job.name,
                                       round=rnd)
            if self.cfg.run:  # a resumed run: what this run charged before counts
                st.spent = ledger.spent(product, subject=subject, run=self.cfg.run)
        after = st.client_noise.epsilon(rnd)
        try:
            charge = ledger.charge(product, max(0.0, after - st.spent), self.cfg.plan.product(product).epsilon_budget,
                                   subject=subject, run=self.cfg.run)
        except BudgetExceeded as err:
            return wire.ErrorReply(code="policy:privacy-ledger", reason=str(err), job=job.name, round=rnd)
        st.spent, st.trained = max(st.spent, after), st.trained + 1
        return wire.LedgerCharge(product=charge.product, epsilon=charge.epsilon, total=charge.total, cap=charge.cap)

    def _masked(self, st: _JobState, ins: wire.TrainIns, update: dict[str, torch.Tensor],
                examples: int, extra: list[torch.Tensor] | None = None) -> torch.Tensor | wire.ErrorReply:
        """The example-weighted update, fixed-point and masked pairwise with the round's other participants."""
        from meshctl.runtime.kernels import secagg

        me, job = self.cfg.domain, st.job
        mine = base64.b64encode(secagg.public_bytes(self.secagg[job.name])).decode()

        def refuse(why: str) -> wire.ErrorReply:
            return wire.ErrorReply(code="secagg", reason=f"secure aggregation: {why}", job=job.name, round=ins.round)

        if set(ins.peer_keys) != set(ins.participants) or ins.peer_keys.get(me) != mine:
            return refuse("the round's keys do not match its participants and this domain's key")
        if len(ins.participants) < secagg.MIN_PARTICIPANTS:
            return refuse(f"a round of {len(ins.participants)} would let a participant learn another's update "
                          f"from the aggregate; it needs {secagg.MIN_PARTICIPANTS}")
        try:
            encoded = secagg.encode([update[t.name] for t in job.tensors] + (extra or []), float(examples))
        except secagg.EncodeError as err:
            return refuse(str(err))
        peers = {d: base64.b64decode(k) for d, k in ins.peer_keys.items()}
        context = secagg.context(self.cfg.run, job.name, ins.attempt)
        held = getattr(self, "secagg_rounds", {}).get((job.name, ins.round, ins.attempt))
        if held is None:
            return refuse("this round's self-mask seed was never shared")
        masked = secagg.mask(encoded, me, self.secagg[job.name], peers, context, ins.round, self_seed=held["seed"])
        return torch.from_numpy(masked.view(np.int64))

    def _secagg_share(self, ins: wire.TrainIns) -> wire.SecaggShares | wire.ErrorReply | None:
        """A fresh self-mask seed for the round and Shamir shares of it and of this domain's mask key,
        each participant's pair sealed for it; None when the job has no secure aggregation (or
        `_masked` refuses the round)."""
        from meshctl.runtime.kernels import secagg, shamir

        st, me = self.jobs.get(ins.job), self.cfg.domain
        if st is None or not st.job.privacy.secure_aggregation or ins.job not in self.secagg:
            return None
        job, key = st.job, self.secagg[ins.job]
        n = len(ins.participants)
        t = secagg.threshold(n, job.privacy.secagg_threshold)
        if set(ins.peer_keys) != set(ins.participants) or me not in ins.participants or n < secagg.MIN_PARTICIPANTS:
            return None  # `_masked` refuses it with the reason
        if n < t:
            return wire.ErrorReply(code="secagg", job=job.name, round=ins.round, reason=(
                f"secure aggregation: a round of {n} participants is below the reconstruction threshold {t}"))
        if (job.name, ins.round, ins.attempt) in self.secagg_rounds:  # (two seeds for one attempt: two masked
            return wire.ErrorReply(code="secagg", job=job.name, round=ins.round, reason=(  # updates to compare)
                f"secure aggregation: round {ins.round} attempt {ins.attempt} was shared already; "
                "a re-run is a new attempt"))
        seed, order = secagg.new_seed(), sorted(ins.participants)
        pairs = zip(shamir.split(seed, n, t), shamir.split(secagg.private_bytes(key), n, t))
        context, sealed, own = secagg.context(self.cfg.run, job.name, ins.attempt), {}, b""
        for v, ((_, b), (_, s)) in zip(order, pairs):
            pair = b.to_bytes(shamir.SHARE_BYTES, "big") + s.to_bytes(shamir.SHARE_BYTES, "big")
            if v == me:
                own = pair
                continue
            label = f"{me}>{v}|{ins.round}|{ins.attempt}".encode()
            sealed[v] = base64.b64encode(secagg.seal(key, base64.b64decode(ins.peer_keys[v]), context, label,
                                                     pair)).decode()
        for old in [k for k in self.secagg_rounds if k[0] == job.name and k[1] < ins.round - 1]:
            del self.secagg_rounds[old]
        self.secagg_rounds[(job.name, ins.round, ins.attempt)] = {
            "seed": seed, "order": order, "keys": dict(ins.peer_keys), "own": own, "threshold": t, "answered": False}
        return wire.SecaggShares(job=job.name, round=ins.round, attempt=ins.attempt, shares=sealed)

    def _secagg_unmask(self, ins: wire.SecaggUnmaskIns) -> wire.SecaggUnmaskRes | wire.ErrorReply:
        """This domain's shares of the survivors' seeds and the dropped domains' mask keys, once per
        round attempt; never both for one domain, and never a seed of a key whose shares it revealed."""
        from meshctl.runtime.kernels import secagg, shamir

        me = self.cfg.domain
        held = self.secagg_rounds.get((ins.job, ins.round, ins.attempt))

        def refuse(why: str) -> wire.ErrorReply:
            return wire.ErrorReply(code="secagg", job=ins.job, round=ins.round,
                                   reason=f"secure aggregation: {me} will not unmask round {ins.round}: {why}")

        if held is None:
            return refuse("it holds no shares of that round")
        survivors, dropped, order = set(ins.survivors), set(ins.dropped), held["order"]
        if held["answered"]:
            return refuse("it already answered for that round")
        if survivors & dropped or not survivors | dropped <= set(order) or me not in survivors:
            return refuse("the survivors and the dropped must split the round's participants")
        if len(survivors) < held["threshold"]:
            return refuse(f"{len(survivors)} survivors are below the threshold {held['threshold']}")
        if any(held["keys"][u] in self.secagg_revealed for u in survivors):
            return refuse("a survivor's mask key was revealed in an earlier round")
        if set(ins.shares) != (survivors | dropped) - {me}:
            return refuse("the relayed shares are not those of the survivors and the dropped")
        key, context = self.secagg[ins.job], secagg.context(self.cfg.run, ins.job, ins.attempt)
        held["answered"] = True
        seeds, keys, w = {}, {}, shamir.SHARE_BYTES
        for u in sorted(survivors | dropped):
            if u == me:
                pair = held["own"]
            else:
                try:
                    pair = secagg.open_sealed(key, base64.b64decode(held["keys"][u]), context,
                                              f"{u}>{me}|{ins.round}|{ins.attempt}".encode(),
                                              base64.b64decode(ins.shares[u]))
                except secagg.RecoveryError as err:
                    return refuse(f"the share from {u}: {err}")
            if u in survivors:
                seeds[u] = base64.b64encode(pair[:w]).decode()
            else:
                keys[u] = base64.b64encode(pair[w:]).decode()
                self.secagg_revealed.add(held["keys"][u])
        return wire.SecaggUnmaskRes(job=ins.job, round=ins.round, attempt=ins.attempt,
                                    index=order.index(me) + 1, seeds=seeds, keys=keys)

    def _charge_round(self, st: _JobState, product: str, rnd: int) -> wire.LedgerCharge | wire.ErrorReply:
        """Charge the privacy ledger what DP training round `rnd` costs, before training it.

        The noise multiplier is set once per job so that all rounds together spend the
        job's ε on this domain's data; each round is charged ε(after it) − ε(before it),
        so the ledger holds exactly what the rounds trained so far have spent.
        """
        from meshctl.runtime.ledger import BudgetExceeded, Ledger, ledger_path

        job, dp = st.job, st.job.privacy.dp
        assert dp is not None
        t = job.training
        n = len(st.data.y_train)
        q = min(1.0, t.batch_size / max(n, 1))
        per_round = t.local_epochs * privacy.steps_per_epoch(max(n, 1), t.batch_size)
        ledger = Ledger(ledger_path(self.cfg.base_dir))
        subject = f"model:{job.name}"
        if not st.sigma:
            try:
                planned = privacy.noise_multiplier(q, per_round * t.rounds, dp.epsilon, dp.delta)
                before = ledger.count(product, subject=subject, run=self.cfg.run) if self.cfg.run else 0
                if before:  # a resumed run: the rounds charged before the crash were released;
                    # the rounds left (retrained ones included) get the noise the rest of ε allows
                    st.done = (planned, before * per_round)
                    st.spent = ledger.spent(product, subject=subject, run=self.cfg.run)
                    st.sigma = privacy.noise_multiplier(q, per_round * (t.rounds - rnd + 1), dp.epsilon,
                                                        dp.delta, done=st.done)
                else:
                    st.sigma = planned
            except ValueError as err:
                return wire.ErrorReply(code="policy:privacy-ledger", reason=f"{product}: {err}", job=job.name,
                                       round=rnd)
        after = privacy.composed_epsilon(q, [st.done, (st.sigma, per_round * (st.trained + 1))], dp.delta)
        cost = max(0.0, after - st.spent)
        try:
            charge = ledger.charge(
                product, cost, self.cfg.plan.product(product).epsilon_budget,
                subject=f"model:{job.name}", run=self.cfg.run)
        except BudgetExceeded as err:
            return wire.ErrorReply(code="policy:privacy-ledger", reason=str(err), job=job.name, round=rnd)
        st.spent, st.trained = after, st.trained + 1
        return wire.LedgerCharge(product=charge.product, epsilon=charge.epsilon, total=charge.total, cap=charge.cap)

    def _round_denied(self, job: PlanJob, ins: wire.TrainIns) -> wire.ErrorReply | None:
        """This domain's own `scope: round` decisions on the round it is asked to train."""
        gate = self.round_gates.get(job.name)
        if gate is None:
            gate = self.round_gates[job.name] = governance.RoundGate(self.cfg.plan, job, self.cfg.domain)
        st = self.jobs.get(job.name)  # DP: the ε this domain has spent on the job so far, before this round
        for d in gate.evaluate(ins.round, list(ins.participants), [], epsilon_spent=st.spent if st else 0.0):
            if d.effect == "deny":
                reason = f"round policy {d.policy} denies round {ins.round} of job {job.name!r}: {d.reason}"
                print(f"refused: {reason}", file=sys.stderr)
                return wire.ErrorReply(code=f"policy:{d.policy}"[:64], reason=reason[:4096], job=job.name,
                                       round=ins.round)
            if d.effect == "warn":
                print(f"warning: round policy {d.policy} on round {ins.round}: {d.reason}", file=sys.stderr)
        return None

    def _evaluate(self, ins: wire.EvalIns, tensors: wire.Tensors) -> object:
        if ins.on == "product" or ins.model:  # the evaluation product, or another domain's local model
            return score_held_out(self, ins, tensors)
        st = self._state(ins.job, ins.version, tensors, ins.round)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round})
        res = self._scored(ins, st)
        if st.job.personalization is not None and ins.round == st.job.training.rounds:
            res = res.model_copy(update={"personal": self._personalize(ins, st)})
        return res

    def _personalize(self, ins: wire.EvalIns, st: _JobState) -> dict[str, dict[str, list[float]]] | None:
        """After the final round: fine-tune a copy of this domain's model on its own training rows (when
        declared) and keep the personal model in this domain's directory; the holdout sums after the
        fine-tuning (the EvalRes's own are those before), never the model."""
        import copy

        job = st.job
        assert job.personalization is not None
        epochs = job.personalization.fine_tune_epochs
        out = None
        model = st.model
        if epochs:
            model = copy.deepcopy(st.model)
            read = next(r for r in job.reads if r.domain == self.cfg.domain)
            data = st.data
            if isinstance(data, StreamData):
                t = job.training
                train_stream(model, lambda: data.batches("train"), epochs=epochs, batch_size=t.batch_size,
                             buffer_rows=t.buffer_rows or BUFFER_ROWS, optimizer=t.optimizer,
                             lr=job.personalization.fine_tune_lr or t.lr, momentum=t.momentum,
                             weight_decay=t.weight_decay, shuffle_seed=7919 + read.client_id,
                             loss=job.loss_name, huber_delta=job.huber_delta or 1.0)
            else:
                personal.fine_tune(model, job, data.x_train, data.y_train, seed=7919 + read.client_id)
            out = {"after": self._scored(ins, replace(st, model=model)).stats}
        path = personal_path(self.cfg.base_dir, self.cfg.run, self.cfg.domain, job.name)
        try:
            save_personal(path, model, {"job": job.name, "run": self.cfg.run, "domain": self.cfg.domain,
                                        "round": str(ins.round), "fine_tune_epochs": str(epochs)})
            say(f"job {job.name}: personal model kept in this domain at {path}")
        except OSError as err:
            say(f"job {job.name}: cannot write the personal model {path}: {err.strerror or err}")
        return out

    def _scored(self, ins: wire.EvalIns, st: _JobState) -> wire.EvalRes:
        """The EvalRes of `st.model` on `st.data`'s test rows (meshctl.runtime.heldout scores other models
        and the evaluation product through this too)."""
        job = st.job
        how = {"task": job.task_name, "loss": job.loss_name, "classes": job.classes,
               "huber_delta": job.huber_delta or 1.0, "auroc": "auroc" in job.evaluation.metrics}
        stats = evaluate_stream(st.model, st.data.batches("test"), **how) if isinstance(st.data, StreamData) \
            else evaluate(st.model, st.data.x_test, st.data.y_test, **how)
        k = len(job.classes)
        correct = int(sum(stats["confusion"][::k + 1])) if "confusion" in stats else 0
        return wire.EvalRes(job=ins.job, round=ins.round, examples=int(stats["n"][0]), loss_sum=stats["loss"][0],
                            correct=correct, stats=stats)

    def _send(self, sock: zmq.Socket, msg: object, tensors: dict[str, torch.Tensor] | None = None,
              *, block: bool = True) -> bool:
        """Send `msg`; with `block` off, False when the coordinator is not connected (yet)."""
        msg = msg.model_copy(update={"sender": self.cfg.domain, "run": self.cfg.run})  # type: ignore[attr-defined]
        frames = wire.encode(msg, tensors)
        try:
            sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not block:
                return False
            raise UserError(f"coordinator at {self.cfg.coordinator} stopped taking messages "
                            f"for {SEND_TIMEOUT_MS // 1000}s") from None
        self._tap_frames(frames)
        return True

    def _tap_frames(self, frames: list) -> None:
        if self.tap is not None:
            with self.tap_lock:
                for f in frames:
                    self.tap.write(len(f).to_bytes(8, "little"))
                    self.tap.write(f)
                self.tap.flush()


def dial(ctx: zmq.Context, keys: KeyPair, server_key: bytes, *, beat_every: float,
         fast: bool = False) -> tuple[zmq.Socket, zmq.Socket]:
    """A new DEALER (Curve client, a new identity) to the coordinator and a monitor of its link.

    ZMTP heartbeats (a PING every `beat_every` seconds) close a connection whose coordinator went
    silent for `lost_after()` seconds, so a link that dies without a FIN is noticed as one that closed.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.sndtimeo = SEND_TIMEOUT_MS
    sock.maxmsgsize = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES
    sock.heartbeat_ivl = int(beat_every * 1000)
    sock.heartbeat_timeout = sock.heartbeat_ttl = int(lost_after() * 1000)
    curve_client(sock, keys, server_key)
    if fast:
        fast_reconnect(sock)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_DISCONNECTED)
    return sock, monitor


def read_tap(path: Path) -> list[bytes]:
    """The frames a daemon's audit tap (MESHCTL_WIRE_TAP) recorded, in the order they were sent."""
    raw, frames, i = path.read_bytes(), [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 8], "little")
        frames.append(raw[i + 8:i + 8 + n])
        i += 8 + n
    return frames


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a run id from the coordinator may look like (runs are named `20260101-120000-ab12`)."""


def say(line: str) -> None:
    """One line of this daemon's story (its state changes) on stderr: its log, or the operator's terminal."""
    print(line, file=sys.stderr, flush=True)


def _short(plan_hash: str) -> str:
    return plan_hash[:19] + "…" if len(plan_hash) > 19 else plan_hash or "(none)"


SIGN_FLIP_ENV = "MESHCTL_TEST_SIGN_FLIP"
"""Tests and benchmarks only: `client-0:10,client-5:10` makes those domains attack, sending
`w - s (u - w)` (their update sign-flipped and scaled by s) instead of their trained weights `u`."""


def _sign_flipped(domain: str, update: dict[str, torch.Tensor], weights: wire.Tensors) -> dict[str, torch.Tensor]:
    """`update`, or its sign flip x s when MESHCTL_TEST_SIGN_FLIP names this domain with scale s."""
    spec = os.environ.get(SIGN_FLIP_ENV, "")
    if not spec:
        return update
    scales = dict(item.rsplit(":", 1) for item in spec.split(",") if ":" in item)
    if domain not in scales:
        return update
    s = float(scales[domain])
    return {k: w - s * (u - w) if (w := weights.get(k)) is not None else u for k, u in update.items()}


SLOW_TRAIN_ENV = "MESHCTL_TEST_SLOW_TRAIN_S"
"""Tests only: seconds a daemon waits before it trains each round, as a slow domain would. A test
that needs a run to stay live (to stop it, signal it, ask its status) sets it, so that the run's
rounds do not take the CPU the test's own commands need (docs/ci.md)."""


def _slow_down() -> None:
    """Wait MESHCTL_TEST_SLOW_TRAIN_S seconds when it is set."""
    pause = float(os.environ.get(SLOW_TRAIN_ENV) or 0)
    if pause > 0:
        time.sleep(pause)


def _trained(ins: wire.TrainIns, reply: object) -> str:
    """The line for one round: plan names and counts (and the training loss), never data."""
    if isinstance(reply, wire.TrainRes):
        return f"job {ins.job} round {ins.round}: trained {reply.examples} examples, loss {reply.loss:.4g}"
    code = getattr(reply, "code", "error")
    return f"job {ins.job} round {ins.round}: not trained ({code})"


def personal_path(base_dir: Path, run: str, domain: str, job: str) -> Path:
    """Where a domain keeps its personal model of `job` from run `run`: inside its own directory (named
    by domain too: local domains of one mesh share a directory)."""
    return base_dir / ".meshctl" / "personal" / (run or "no-run") / domain / f"{job}.safetensors"


def save_personal(path: Path, model: torch.nn.Module, meta: dict[str, str]) -> None:
    """Write a personal model's whole state (safetensors, atomically); it never leaves the domain."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)


CONTROL = "control/"
"""SCAFFOLD: the prefix of a control variate's tensor name on the wire (c beside the weights, delta c_i
beside the update)."""


def uses_control(job: PlanJob) -> bool:
    """Whether the job trains with SCAFFOLD's control variates (never under secure aggregation: MESH549)."""
    return job.aggregation.strategy == "scaffold" and not job.privacy.secure_aggregation


def _correction(st: _JobState) -> list[torch.Tensor | None] | None:
    """SCAFFOLD: `c - c_i` per model parameter (None for one the wire does not carry); None otherwise."""
    if not uses_control(st.job):
        return None
    out: list[torch.Tensor | None] = []
    for name, p in st.model.named_parameters():
        c = st.server_control.get(name)
        if c is None:
            out.append(None)
            continue
        ci = st.control.get(name)
        out.append((c - ci if ci is not None else c.clone()).to(p.dtype))
    return out


def control_lr(lr: float, momentum: float) -> float:
    """The step size SCAFFOLD's option II divides by: lr, or lr / (1 - momentum) under SGD momentum (a
    heavy-ball step moves about that far per gradient, so c_i stays a gradient, not 1/(1 - momentum) of one)."""
    return lr / (1.0 - momentum) if 0 < momentum < 1 else lr


def _controlled(st: _JobState, update: dict[str, torch.Tensor], examples: int) -> dict[str, torch.Tensor]:
    """SCAFFOLD after local training: keep c_i+ (option II) and return delta c_i, named CONTROL + tensor."""
    from meshctl.runtime.kernels.scaffold import client_control
    from meshctl.runtime.kernels.train import local_steps

    t, names = st.job.training, list(update)
    zero = [torch.zeros_like(update[n]) for n in names]
    c_i = [st.control.get(n, z) for n, z in zip(names, zero)]
    c = [st.server_control.get(n, z) for n, z in zip(names, zero)]
    new, delta = client_control(c_i, c, [st.weights[n] for n in names], [update[n] for n in names],
                                local_steps(examples, t.local_epochs, t.batch_size), control_lr(t.lr, t.momentum))
    st.control = dict(zip(names, new))
    return {CONTROL + n: d for n, d in zip(names, delta)}


def _prox_mu(job: PlanJob) -> float:
    """FedProx's proximal weight for local training; 0 for every other strategy."""
    return job.aggregation.settings()["mu"] if job.aggregation.strategy == "fedprox" else 0.0


def prepare_fork(plan: Plan | None) -> None:
    """Do once, in a parent about to fork local daemons, what each would otherwise repeat.

    The data path's imports (DuckDB, the contract checks, the ledger) and the CEL programs
    of the plan's policies (the parser tables alone take 0.15 s to build) are then shared,
    copy-on-write, by every forked daemon. Nothing here starts a thread or opens a file.
    """
    import duckdb  # noqa: F401

    from meshctl.runtime import ledger, quality  # noqa: F401

    if plan is not None and any(j.privacy.dp is not None and j.architecture.kind in ("cnn", "custom")
                                for j in plan.jobs):
        import torch._dynamo  # noqa: F401 - torch.func's grad imports it (2-4 s) on DP-SGD's first step

    for policy in plan.policies if plan is not None else ():
        for source in (policy.when, policy.require):
            if source:
                try:
                    governance._program(source)
                except governance.PolicyError:
                    pass  # the daemon reports it, as a denying decision, when it decides


def _receive(sock: zmq.Socket) -> tuple[object, wire.Tensors] | None:
    """The coordinator's next message; None for a malformed one (dropped, and said in the log).
    Another protocol version is a UserError: nothing this daemon says could be understood."""
    try:
        return wire.decode(sock.recv_multipart(copy=False))
    except wire.WireError as err:
        if "protocol version" in str(err):
            raise UserError(f"coordinator speaks another protocol: {err}") from None
        print(f"dropped malformed message from coordinator: {err}", file=sys.stderr)
        return None


def log_locally(err: MeshctlError) -> None:
    """Write the full story of `err` (its host path, the library's text) to this domain's log: stderr."""
    print(err.local() if isinstance(err, DataError) else err.render(), file=sys.stderr, flush=True)


def outbound(err: Exception) -> MeshctlError:
    """What of a failed start may leave the domain: the error's message in the domain's own words,
    without its host path; the whole of it (or the traceback of a bug) goes to the local log first."""
    if isinstance(err, MeshctlError):
        log_locally(err)
        return (UserError if err.exit_code == 1 else InternalError)(err.message, hint=err.hint)
    import traceback

    traceback.print_exc()
    return InternalError(f"the daemon failed to start ({type(err).__name__}); the traceback is in its log")


def _num(value: float | None) -> str:
    return "nothing" if value is None else f"{value:g}"
