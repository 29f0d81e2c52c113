"""The wire: one frozen message type per kind; a JSON header frame plus raw tensor frames.

A message is a ZeroMQ multipart. Frame 0 is a small JSON header validated by the
pydantic model of its `type`; frames 1..n are the raw little-endian buffers of the
tensors the header lists, in order, each split into chunks of at most
`CHUNK_BYTES` so that a model larger than 2 GB crosses. Nothing here unpickles or
`torch.load`s anything: a tensor is rebuilt with `torch.frombuffer` from bytes whose
dtype, shape and size the header declared and the receiver checked.

This is the only module that turns messages into bytes and back.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from meshctl import PROTOCOL_VERSION

CHUNK_BYTES = 64 * 1024 * 1024
"""Largest tensor frame; bigger tensors are split into several frames."""
MAX_HEADER_BYTES = 1024 * 1024
"""A header frame larger than this is rejected before parsing."""
MAX_DEPTH = 16
"""Deepest nesting of JSON arrays and objects in a header (the messages here need 5)."""
MAX_COUNT = 2**53
"""Largest integer a header may hold: every count, size and dimension is exact as a float below it."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A message that does not decode: malformed, oversized or inconsistent."""


class TensorSpec(BaseModel):
    """What a tensor frame group holds; checked against the actual frames."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(max_length=256)
    dtype: Literal["float32", "float64", "float16", "int64", "int32", "int8"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    nbytes: int = Field(ge=0)
    chunks: int = Field(ge=1)


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    v: int = PROTOCOL_VERSION
    """Protocol version; a peer of another version is refused."""
    run: str = Field(default="", max_length=128)
    sender: str = Field(default="", max_length=128)
    """Who claims to send; the coordinator checks it against the Curve User-Id."""
    tensors: list[TensorSpec] = Field(default_factory=list, max_length=4096)


class FeatureStats(BaseModel):
    """Per-feature sums over one domain's training rows: aggregates, never rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    count: int = Field(ge=0)
    sum: list[float] = Field(max_length=100_000)
    sumsq: list[float] = Field(max_length=100_000)


class Decision(BaseModel):
    """A policy decision a domain made at run time (governance.py): a verdict, never data."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: str = Field(max_length=256)
    scope: str = Field(max_length=32)
    subject: str = Field(max_length=512)
    effect: Literal["allow", "deny", "warn", "exclude"]
    """`exclude`: the coordinator left one update out of a round (a round policy's `effect: exclude`)."""
    reason: str = Field(max_length=4096)
    at: str = Field(default="", max_length=512)
    domain: str = Field(default="", max_length=128)
    """Who decided."""
    stage: str = Field(default="runtime", max_length=32)


class CheckOutcome(BaseModel):
    """One contract quality rule checked in the domain: observed numbers only, never values."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    product: str = Field(max_length=256)
    contract: str = Field(max_length=256)
    rule: str = Field(max_length=512)
    observed: float | None = None
    operator: str = Field(default="", max_length=64)
    threshold: float | list[float] | None = None
    passed: bool
    severity: Literal["info", "warning", "error"] = "error"


SecaggKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]

CategoryValue = Annotated[str, Field(max_length=1024)]
"""One value of a categorical feature, as text."""
CategoryCounts = Annotated[dict[CategoryValue, Annotated[int, Field(ge=0)]], Field(max_length=100_000)]
"""A categorical feature's counts: only values held by at least k of a domain's training rows."""
"""A 32-byte X25519 public key, base64."""


class Hello(_Msg):
    """Daemon -> coordinator: I am up, these are my products and row counts.

    For jobs that standardize features, `stats` carries the sums the coordinator
    pools into the mesh-wide mean and standard deviation. `decisions` are the
    domain's own run-time policy decisions on the plan's jobs, `refused` the jobs it
    will not take part in (job -> reason), `checks` its contract check results.
    """

    type: Literal["hello"] = "hello"
    plan_hash: str
    pid: int = 0
    rows: dict[str, int] = Field(default_factory=dict)
    stats: dict[str, FeatureStats] = Field(default_factory=dict)
    refused: dict[str, Annotated[str, Field(max_length=8192)]] = Field(default_factory=dict)
    decisions: list[Decision] = Field(default_factory=list, max_length=4096)
    checks: list[CheckOutcome] = Field(default_factory=list, max_length=4096)
    secagg_keys: dict[str, SecaggKey] = Field(default_factory=dict)
    """Secure aggregation: job -> this domain's X25519 public key for the job (base64)."""
    category_counts: dict[str, dict[str, CategoryCounts]] = Field(default_factory=dict)
    """Job -> categorical feature -> value -> count over this domain's training rows, for the values
    at least `min_count` rows hold (rarer values never leave the domain); pooled into the vocabulary."""


class Heartbeat(_Msg):
    """Daemon -> coordinator: still alive, and what it is doing."""

    type: Literal["heartbeat"] = "heartbeat"
    state: Literal["idle", "training", "evaluating", "analyzing"] = "idle"


class Welcome(_Msg):
    """Coordinator -> daemon: you are in, to run `run` (set on every coordinator message) of the
    plan `plan_hash`; the daemon checks both against what it knows."""

    type: Literal["welcome"] = "welcome"
    plan_hash: str = Field(default="", max_length=128)


class Knock(_Msg):
    """Daemon -> coordinator, before Hello: which run do you serve?

    A daemon started without a run id (`meshctl daemon` on another host) asks this before
    it decides anything bound to the run: its secure-aggregation key context and its
    privacy-ledger reservations and charges are booked under the run id of the answer.
    """

    type: Literal["knock"] = "knock"


class RunInfo(_Msg):
    """Coordinator -> daemon, the answer to Knock: the run it serves (`run`) and its plan's hash."""

    type: Literal["run_info"] = "run_info"
    plan_hash: str = Field(default="", max_length=128)


class Refused(_Msg):
    """Coordinator -> daemon: you are not in, and why."""

    type: Literal["refused"] = "refused"
    reason: str


class TrainIns(_Msg):
    """Coordinator -> daemon: train job `job` for round `round` from weights `version`.

    Tensors are attached only when the daemon does not hold that version yet.
    """

    type: Literal["train_ins"] = "train_ins"
    job: str
    round: int = Field(ge=1)
    version: int = Field(ge=0)
    mean: list[float] | None = None
    """Mesh-wide feature means to standardize with (jobs with `standardize`)."""
    std: list[float] | None = None
    vocab: dict[str, Annotated[list[CategoryValue], Field(max_length=100_000)]] | None = None
    """Categorical feature -> the agreed vocabulary (its one-hot slots, in order; the rest is "other")."""
    participants: list[str] = Field(default_factory=list)
    """The round's participants, so that each domain can decide its `scope: round` policies."""
    peer_keys: dict[str, SecaggKey] = Field(default_factory=dict)
    """Secure aggregation: every participant's X25519 public key for the job (base64)."""
    attempt: int = Field(default=1, ge=1, le=1_000)
    """Which run of this round (a round re-run after a loss is attempt 2, ...): secure aggregation
    derives fresh pairwise masks per attempt, so no two masked updates share a mask."""
    clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Client-level DP: the round's clip norm of the update (adaptive clipping moves it); None: the plan's."""


class TrainRes(_Msg):
    """Daemon -> coordinator: the local model after training, and how it went."""

    type: Literal["train_res"] = "train_res"
    job: str
    round: int = Field(ge=1)
    examples: int = Field(ge=0)
    loss: float
    seconds: float = Field(ge=0)
    charges: list[LedgerCharge] = Field(default_factory=list, max_length=64)
    """DP training: the ε this round cost, as charged to the domain's privacy ledger."""
    attempt: int = Field(default=1, ge=1, le=1_000)
    """The TrainIns attempt this answers."""
    clip_bit: float | None = Field(default=None, ge=-0.5, le=0.5)
    """Client-level DP with adaptive clipping, without secure aggregation: [||Δ|| <= clip] - 1/2."""


class EvalIns(_Msg):
    """Coordinator -> daemon: evaluate these (aggregated) weights of `round` on your holdout."""

    type: Literal["eval_ins"] = "eval_ins"
    job: str
    round: int = Field(ge=0)
    version: int = Field(ge=0)
    on: Literal["holdout", "product"] = "holdout"
    """What to score: the domain's holdout, or the job's evaluation product (every row of it)."""
    model: str = Field(default="", max_length=200)
    """Cross-site evaluation: `local:<domain>`, that domain's last local model (the attached weights, kept
    apart from the job's); "" is the global model of `version`."""


class EvalRes(_Msg):
    """Daemon -> coordinator: sums over the holdout, so the coordinator can pool exactly."""

    type: Literal["eval_res"] = "eval_res"
    job: str
    round: int = Field(ge=0)
    on: Literal["holdout", "product"] = "holdout"
    """What was scored (the EvalIns's `on`)."""
    model: str = Field(default="", max_length=200)
    """Which model was scored (the EvalIns's `model`)."""
    examples: int = Field(ge=0)
    loss_sum: float
    correct: int = Field(ge=0)
    personal: dict[Literal["after"], dict[str, list[float]]] | None = None
    """Personalisation with fine-tuning, the final round: the holdout sums (as `stats`) of this domain's
    model after its fine-tuning; `stats` are those before. Sums, never the model."""
    stats: dict[Annotated[str, Field(max_length=32)], Annotated[list[float], Field(max_length=1_000_000)]] = Field(
        default_factory=dict, max_length=16)
    """Sums the coordinator pools into every declared metric (meshctl.runtime.kernels.metrics.eval_stats);
    the collector checks their keys and lengths against the job's task."""


class ErrorReply(_Msg):
    """Either side: a request failed; `code` is machine-readable, `reason` one line."""

    type: Literal["error"] = "error"
    code: str = Field(max_length=64)
    reason: str = Field(max_length=4096)
    job: str = ""
    round: int = 0


class Shutdown(_Msg):
    """Coordinator -> daemon: the run is over; exit cleanly."""

    type: Literal["shutdown"] = "shutdown"
    reason: str = ""
    completed: bool = False
    """The run completed: nothing of it will be resumed, so a domain drops the state it kept for that."""


Message = Annotated[
    Hello | Welcome | Refused | TrainIns | TrainRes | EvalIns | EvalRes | ErrorReply | Shutdown | Heartbeat,
    Field(discriminator="type"),
]
_MESSAGE = TypeAdapter(Message)

Tensors = dict[str, torch.Tensor]


def encode(msg: Any, tensors: Tensors | None = None, *, chunk_bytes: int = CHUNK_BYTES) -> list[Any]:
    """Frames of `msg` with `tensors` attached (header first, then raw buffers, no copies).

    The returned buffers alias the tensors' memory: do not modify the tensors until
    the frames are sent.
    """
    specs: list[TensorSpec] = []
    buffers: list[Any] = []
    for name, t in (tensors or {}).items():
        t = t.detach()
        if t.dtype not in _DTYPE_NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if not t.is_contiguous():
            t = t.contiguous()
        raw = memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")
        chunks = max(1, math.ceil(len(raw) / chunk_bytes))
        specs.append(TensorSpec(name=name, dtype=_DTYPE_NAMES[t.dtype], shape=list(t.shape),
                                nbytes=len(raw), chunks=chunks))
        buffers.extend(raw[i * chunk_bytes:(i + 1) * chunk_bytes] for i in range(chunks))
    header = msg.model_copy(update={"tensors": specs}) if specs else msg
    return [header.model_dump_json().encode(), *buffers]


def decode(frames: Sequence[Any], *, max_bytes: int | None = None) -> tuple[Any, Tensors]:
    """The message and tensors of `frames` (bytes or zmq.Frame). Raises WireError, never anything else.

    Every size is checked against the header before a tensor is built; tensors
    are views of the received buffers when they came in one chunk. `max_bytes`
    bounds the tensor frames together (a receiver knows the largest message it expects).
    """
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if max_bytes is not None and (size := frames_size(frames[1:])) > max_bytes:
        raise WireError(f"tensor frames of {size} bytes exceed the {max_bytes} this peer accepts")
    raw = _parse_header(bytes(head))
    if raw.get("v") != PROTOCOL_VERSION:
        raise WireError(f"protocol version {raw.get('v')!r} differs from this peer's {PROTOCOL_VERSION}")
    try:
        msg = _MESSAGE.validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise WireError(f"bad {raw.get('type', 'untyped')!s:.32} header: {where + ': ' if where else ''}{first['msg']}") from None
    body = frames[1:]
    want = sum(s.chunks for s in msg.tensors)
    if len(body) != want:
        raise WireError(f"header lists {want} tensor frames, message has {len(body)}")
    tensors: Tensors = {}
    i = 0
    for spec in msg.tensors:
        dtype = DTYPES[spec.dtype]
        numel = math.prod(spec.shape)  # exact: Python ints do not overflow
        if numel * dtype.itemsize != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: shape {spec.shape} does not match {spec.nbytes} bytes")
        parts = [_buffer(f) for f in body[i:i + spec.chunks]]
        i += spec.chunks
        if sum(len(p) for p in parts) != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: frames hold {sum(len(p) for p in parts)} bytes, header says {spec.nbytes}")
        if spec.name in tensors:
            raise WireError(f"tensor {spec.name!r} listed twice")
        try:
            tensors[spec.name] = _tensor(parts, dtype, spec.shape, spec.nbytes)
        except (RuntimeError, ValueError, TypeError, OverflowError) as err:  # a shape torch cannot hold
            raise WireError(f"tensor {spec.name!r}: shape {spec.shape}: {str(err).splitlines()[0]:.200}") from None
    return msg, tensors


def _parse_header(head: bytes) -> dict[str, Any]:
    """The header's JSON object: at most MAX_DEPTH deep, integers within ±MAX_COUNT, numbers finite."""
    try:
        raw = json.loads(head, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise WireError(f"header nests deeper than {MAX_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise err if isinstance(err, WireError) else WireError("header is not JSON") from None
    if not isinstance(raw, dict):
        raise WireError("header is not a JSON object")
    if _depth(raw) > MAX_DEPTH:
        raise WireError(f"header nests deeper than {MAX_DEPTH}")
    return raw


def _bounded_int(text: str) -> int:
    if len(text) > 17 or abs(value := int(text)) > MAX_COUNT:  # 2**53 has 16 digits
        raise WireError(f"header number {text:.20} is out of range (at most {MAX_COUNT})")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"header number {text:.20} is not finite")
    return value


def _no_constant(text: str) -> float:
    raise WireError(f"header holds {text}, which is not a number")


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return deepest


def frames_size(frames: Sequence[Any]) -> int:
    """Total bytes of a multipart message."""
    return sum(len(_buffer(f)) for f in frames)


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, (bytes, bytearray)):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame.cast("B") if frame.format != "B" else frame
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer")
    return buf


def _tensor(parts: list[memoryview], dtype: torch.dtype, shape: list[int], nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if len(parts) == 1:
        with warnings.catch_warnings():  # received buffers are read-only; we never write to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(parts[0], dtype=dtype).reshape(shape)
    out = torch.empty(nbytes, dtype=torch.uint8)
    flat = out.numpy()
    pos = 0
    for p in parts:
        flat[pos:pos + len(p)] = np.frombuffer(p, dtype=np.uint8)
        pos += len(p)
    return out.view(dtype).reshape(shape)


# -- federated analytics (meshctl.runtime.analytics) ----------------------------------


class AnalyzeIns(_Msg):
    """Coordinator -> daemon: compute the declared aggregates of analysis `analysis`."""

    type: Literal["analyze_ins"] = "analyze_ins"
    analysis: str = Field(max_length=256)


class GroupAggregates(BaseModel):
    """One group's released statistics: JSON numbers keyed by statistic, never rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: list[str] = Field(max_length=16)
    """The group's values, in `group_by` order."""
    values: dict[str, float | list[float]] = Field(max_length=1024)
    """Statistic key (`count`, `sum(col)`, `m2(col)`, `hist(col,bins,lo,hi)`) -> number(s)."""


class LedgerCharge(BaseModel):
    """ε a domain charged to one of its products' privacy ledger for this release."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    product: str = Field(max_length=256)
    epsilon: float = Field(ge=0)
    total: float = Field(ge=0)
    """Spent on the product across runs, this charge included."""
    cap: float | None = None


class Denial(BaseModel):
    """A domain's run-time policy decision against a request."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: str = Field(max_length=128)
    reason: str = Field(max_length=4096)


class AnalyzeRes(_Msg):
    """Daemon -> coordinator: a domain's aggregates of `analysis`, or why it refused."""

    type: Literal["analyze_res"] = "analyze_res"
    analysis: str = Field(max_length=256)
    groups: list[GroupAggregates] = Field(default_factory=list, max_length=100_000)
    suppressed: int = Field(default=0, ge=0)
    """Groups this domain left out because they had fewer than `min_group_size` rows."""
    charges: list[LedgerCharge] = Field(default_factory=list, max_length=64)
    denied: list[Denial] = Field(default_factory=list, max_length=64)
    """Non-empty when the domain refused: then `groups` is empty."""


def _with_messages(*extra: type[_Msg]) -> None:
    """Add message types to the discriminated union `decode` validates against."""
    global Message, _MESSAGE
    current = get_args(get_args(Message)[0])
    Message = Annotated[Union[(*current, *extra)], Field(discriminator="type")]  # type: ignore[misc,valid-type]
    _MESSAGE = TypeAdapter(Message)


_with_messages(AnalyzeIns, AnalyzeRes)
_with_messages(Knock, RunInfo)

Sealed = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/=]{1,512}$")]
"""A Shamir share pair sealed for one participant (base64), or one opened share value."""


class SecaggShares(_Msg):
    """Daemon -> coordinator, on a secure-aggregation TrainIns before it trains: for each other
    participant, that participant's Shamir shares of this domain's self-mask seed and mask key,
    sealed with their pairwise key (the coordinator relays them and cannot read them)."""

    type: Literal["secagg_shares"] = "secagg_shares"
    job: str
    round: int = Field(ge=1)
    attempt: int = Field(default=1, ge=1, le=1_000)
    shares: dict[str, Sealed] = Field(default_factory=dict, max_length=10_000)


class SecaggUnmaskIns(_Msg):
    """Coordinator -> daemon: the round's masked updates came from `survivors`; reveal your shares
    of their self-mask seeds and of the mask keys of `dropped`. `shares`: what each of them sealed
    for you (sender -> sealed)."""

    type: Literal["secagg_unmask_ins"] = "secagg_unmask_ins"
    job: str
    round: int = Field(ge=1)
    attempt: int = Field(default=1, ge=1, le=1_000)
    survivors: list[str] = Field(default_factory=list, max_length=10_000)
    dropped: list[str] = Field(default_factory=list, max_length=10_000)
    shares: dict[str, Sealed] = Field(default_factory=dict, max_length=10_000)


class SecaggUnmaskRes(_Msg):
    """Daemon -> coordinator: this domain's share (index `index`) of each survivor's self-mask seed
    (`seeds`) and of each dropped domain's mask key (`keys`), base64."""

    type: Literal["secagg_unmask_res"] = "secagg_unmask_res"
    job: str
    round: int = Field(ge=1)
    attempt: int = Field(default=1, ge=1, le=1_000)
    index: int = Field(ge=1, le=10_000)
    seeds: dict[str, Sealed] = Field(default_factory=dict, max_length=10_000)
    keys: dict[str, Sealed] = Field(default_factory=dict, max_length=10_000)


_with_messages(SecaggShares, SecaggUnmaskIns, SecaggUnmaskRes)


TrainRes.model_rebuild()  # LedgerCharge is defined below TrainRes


SplitStep = Literal["psi_start", "psi_answer", "psi_reply", "psi_held", "psi_order", "forward", "top",
                    "backward", "eval", "eval_top", "finish", "keep", "restore", "loss", "eval_loss"]
"""What a SplitIns asks (docs/split-learning.md has the sequence; `keep` and `restore`: a resumable job)."""


class SplitIns(_Msg):
    """Coordinator -> daemon, split learning: one step of job `job`. Blinded PSI points, positions,
    activations and gradients travel as tensor frames; never a key, a feature value or a label."""

    type: Literal["split_ins"] = "split_ins"
    job: str = Field(max_length=256)
    step: SplitStep
    epoch: int = Field(default=0, ge=0)
    batch: int = Field(default=0, ge=0)
    peer: str = Field(default="", max_length=128)
    """The member a relayed PSI message comes from or is for."""
    salt: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    """psi_start: this run's PSI salt (hex)."""
    parts: list[str] = Field(default_factory=list, max_length=64)
    """top, eval_top: the members whose activations the tensors hold (named by domain)."""


class SplitRes(_Msg):
    """Daemon -> coordinator, split learning: the answer to one SplitIns (a count, a loss, metrics, tensors)."""

    type: Literal["split_res"] = "split_res"
    job: str = Field(max_length=256)
    step: Literal["ready", "psi_request", "psi_answer", "psi_held", "psi_order", "aligned", "acts", "grads",
                  "eval_acts", "metrics", "saved", "logit_grads", "kept", "restored"]
    epoch: int = Field(default=0, ge=0)
    batch: int = Field(default=0, ge=0)
    peer: str = Field(default="", max_length=128)
    size: int = Field(default=0, ge=0)
    """psi_order, aligned: rows in the agreed order."""
    examples: int = Field(default=0, ge=0)
    loss: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict, max_length=16)


_with_messages(SplitIns, SplitRes)
