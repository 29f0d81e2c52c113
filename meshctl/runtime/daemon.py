"""One domain's daemon: holds its data warm, trains and evaluates where the data is.

The daemon connects a DEALER (Curve client) to the coordinator's ROUTER, says
Hello with its row counts, then serves TrainIns / EvalIns until Shutdown. It reads
its products once, at start, through `data.py`; what it sends is the header of
each reply plus model tensors. Rows and PII never reach this module's sockets.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.errors import MeshctlError, UserError
from meshctl.runtime import wire
from meshctl.runtime.data import JobData, count_rows, feature_sums, load_job_data
from meshctl.runtime.keys import KeyPair, curve_client
from meshctl.runtime.kernels import evaluate, mlp, train_local

POLL_MS = 500
SEND_TIMEOUT_MS = 120_000


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
    data: JobData
    model: torch.nn.Module
    version: int = -1
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """The global weights of `version`, as received."""
    standardized: bool = False
    loaded: int = -1
    """Version the model holds unchanged (-1 after training): no reload needed."""


class Daemon:
    """A domain daemon. `run()` returns the process exit code."""

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.jobs: dict[str, _JobState] = {}
        self.rows: dict[str, int] = {}
        tap = os.environ.get("MESHCTL_WIRE_TAP")
        self.tap = open(Path(tap) / f"{cfg.domain}.tap", "ab") if tap else None  # noqa: SIM115
        """Audit tap: every frame this daemon sends, appended as (u64 length, bytes)."""

    # -- start-up ----------------------------------------------------------------
    def load(self) -> None:
        """Read every product this domain contributes to a job of the plan."""
        plan, me = self.cfg.plan, self.cfg.domain
        if me not in {d.name for d in plan.domains}:
            raise UserError(f"domain {me!r} is not in the plan")
        for product in plan.products:
            if product.domain == me:
                self.rows[product.id] = count_rows(product, self.cfg.base_dir)
        for job in plan.jobs:
            read = next((r for r in job.reads if r.domain == me), None)
            if read is None:
                continue
            data = load_job_data(job, plan.product(read.product), self.cfg.base_dir, read.client_id)
            arch = job.architecture
            model = mlp(arch.input_dim, arch.hidden, arch.output_dim, seed=None)
            self.jobs[job.name] = _JobState(job, data, model)

    # -- serving -----------------------------------------------------------------
    def run(self) -> int:
        torch.set_num_threads(max(1, self.cfg.threads))
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 1000
        sock.sndtimeo = SEND_TIMEOUT_MS
        sock.maxmsgsize = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES
        curve_client(sock, self.cfg.keys, self.cfg.server_key)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.cfg.coordinator)
        try:
            try:
                self.load()
            except MeshctlError as err:
                self._send(sock, wire.ErrorReply(code="data", reason=err.message), block=False)
                raise
            return self._serve(sock, monitor)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close()
            ctx.term()

    def _serve(self, sock: zmq.Socket, monitor: zmq.Socket) -> int:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        joined = hello_sent = False
        started = time.monotonic()
        while True:
            if not hello_sent:  # no peer until the handshake succeeds: never block on it
                hello = wire.Hello(plan_hash=self.cfg.plan.plan.hash, pid=os.getpid(), rows=self.rows,
                                   stats=self._stats())
                hello_sent = self._send(sock, hello, block=False)
            ready = dict(poller.poll(POLL_MS))
            if monitor in ready:
                evt = recv_monitor_message(monitor)
                if evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise UserError(f"coordinator at {self.cfg.coordinator} refused domain "
                                    f"{self.cfg.domain!r}: its Curve key is not the one in the plan")
                raise UserError(f"Curve handshake with {self.cfg.coordinator} failed "
                                f"(is the coordinator's public key right?)")
            if sock in ready:
                frames = sock.recv_multipart(copy=False)
                try:
                    msg, tensors = wire.decode(frames)
                except wire.WireError as err:
                    if "protocol version" in str(err):
                        raise UserError(f"coordinator speaks another protocol: {err}") from None
                    print(f"dropped malformed message from coordinator: {err}", file=sys.stderr)
                    continue
                if isinstance(msg, wire.Welcome):
                    joined = True
                elif isinstance(msg, wire.Refused):
                    raise UserError(f"coordinator refused domain {self.cfg.domain!r}: {msg.reason}")
                elif isinstance(msg, wire.Shutdown):
                    return 0
                elif isinstance(msg, wire.TrainIns):
                    self._send(sock, *self._train(msg, tensors))
                elif isinstance(msg, wire.EvalIns):
                    self._send(sock, self._evaluate(msg, tensors))
                continue
            if self.cfg.parent_pid is not None and os.getppid() != self.cfg.parent_pid:
                print("launcher is gone; exiting", file=sys.stderr)
                return 1
            if not joined and time.monotonic() - started > self.cfg.join_timeout_s:
                raise UserError(f"no answer from the coordinator at {self.cfg.coordinator} within "
                                f"{self.cfg.join_timeout_s:.0f}s")

    def _state(self, job: str, version: int, tensors: wire.Tensors) -> _JobState | wire.ErrorReply:
        st = self.jobs.get(job)
        if st is None:
            return wire.ErrorReply(code="unknown-job", reason=f"domain {self.cfg.domain} has no job {job!r}", job=job)
        if tensors:
            expect = {t.name: t.shape for t in st.job.tensors}
            got = {k: list(v.shape) for k, v in tensors.items()}
            if got != expect:
                return wire.ErrorReply(code="bad-weights", reason="weights do not match the plan's model", job=job)
            st.version, st.weights = version, tensors
        elif st.version != version:
            return wire.ErrorReply(code="stale", reason=f"have weights v{st.version}, asked for v{version}", job=job)
        if st.loaded != st.version:
            st.model.load_state_dict(st.weights)
            st.loaded = st.version
        return st

    def _stats(self) -> dict[str, wire.FeatureStats]:
        """Feature sums of jobs that standardize (aggregates; the coordinator pools them)."""
        out = {}
        for name, st in self.jobs.items():
            if st.job.training.standardize:
                n, s, q = feature_sums(st.data.x_train)
                out[name] = wire.FeatureStats(count=n, sum=s, sumsq=q)
        return out

    def _standardize(self, st: _JobState, ins: wire.TrainIns) -> wire.ErrorReply | None:
        if not st.job.training.standardize or st.standardized:
            return None
        d = len(st.job.features)
        if ins.mean is None or ins.std is None or len(ins.mean) != d or len(ins.std) != d \
                or any(not (v > 0) for v in ins.std):
            return wire.ErrorReply(code="bad-standardization", reason="missing or malformed mean/std", job=ins.job)
        mean, std = torch.tensor(ins.mean), torch.tensor(ins.std)
        data = st.data
        st.data = JobData((data.x_train - mean) / std, data.y_train, (data.x_test - mean) / std, data.y_test,
                          data.rows, data.skipped)
        st.standardized = True
        return None

    def _train(self, ins: wire.TrainIns, tensors: wire.Tensors) -> tuple[object, dict[str, torch.Tensor] | None]:
        st = self._state(ins.job, ins.version, tensors)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round}), None
        problem = self._standardize(st, ins)
        if problem is not None:
            return problem.model_copy(update={"round": ins.round}), None
        t = st.job.training
        start = time.perf_counter()
        read = next(r for r in st.job.reads if r.domain == self.cfg.domain)
        loss = train_local(st.model, st.data.x_train, st.data.y_train, epochs=t.local_epochs,
                           batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay, shuffle_seed=1000 * ins.round + read.client_id)
        seconds = time.perf_counter() - start
        st.loaded = -1
        update = {k: v.detach().clone() for k, v in st.model.state_dict().items()}
        res = wire.TrainRes(job=ins.job, round=ins.round, examples=len(st.data.y_train), loss=loss,
                            seconds=seconds)
        return res, update

    def _evaluate(self, ins: wire.EvalIns, tensors: wire.Tensors) -> object:
        st = self._state(ins.job, ins.version, tensors)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round})
        loss_sum, correct, n = evaluate(st.model, st.data.x_test, st.data.y_test)
        return wire.EvalRes(job=ins.job, round=ins.round, examples=n, loss_sum=loss_sum, correct=correct)

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
            for f in frames:
                self.tap.write(len(f).to_bytes(8, "little"))
                self.tap.write(f)
            self.tap.flush()
