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

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.errors import MeshctlError, UserError
from meshctl.runtime import wire
from meshctl.runtime.data import JobData, count_rows, load_job_data
from meshctl.runtime.keys import KeyPair, curve_client
from meshctl.runtime.kernels import evaluate, mlp, train_local

POLL_MS = 500


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


class Daemon:
    """A domain daemon. `run()` returns the process exit code."""

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.jobs: dict[str, _JobState] = {}
        self.rows: dict[str, int] = {}

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
        sock.maxmsgsize = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES
        curve_client(sock, self.cfg.keys, self.cfg.server_key)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.cfg.coordinator)
        try:
            try:
                self.load()
            except MeshctlError as err:
                self._send(sock, wire.ErrorReply(code="data", reason=err.render()))
                raise
            self._send(sock, wire.Hello(plan_hash=self.cfg.plan.plan.hash, pid=os.getpid(), rows=self.rows))
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
        joined = False
        started = time.monotonic()
        while True:
            ready = dict(poller.poll(POLL_MS))
            if monitor in ready:
                evt = zmq.utils.monitor.recv_monitor_message(monitor)
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
        st.model.load_state_dict(st.weights)
        return st

    def _train(self, ins: wire.TrainIns, tensors: wire.Tensors) -> tuple[object, dict[str, torch.Tensor] | None]:
        st = self._state(ins.job, ins.version, tensors)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round}), None
        t = st.job.training
        start = time.perf_counter()
        read = next(r for r in st.job.reads if r.domain == self.cfg.domain)
        loss = train_local(st.model, st.data.x_train, st.data.y_train, epochs=t.local_epochs,
                           batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay, shuffle_seed=1000 * ins.round + read.client_id)
        seconds = time.perf_counter() - start
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

    def _send(self, sock: zmq.Socket, msg: object, tensors: dict[str, torch.Tensor] | None = None) -> None:
        msg = msg.model_copy(update={"sender": self.cfg.domain, "run": self.cfg.run})  # type: ignore[attr-defined]
        sock.send_multipart(wire.encode(msg, tensors), copy=False)
