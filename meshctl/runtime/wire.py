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
from typing import Annotated, Any, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from meshctl import PROTOCOL_VERSION

CHUNK_BYTES = 64 * 1024 * 1024
"""Largest tensor frame; bigger tensors are split into several frames."""
MAX_HEADER_BYTES = 1024 * 1024
"""A header frame larger than this is rejected before parsing."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A message that does not decode: malformed, oversized or inconsistent."""


class TensorSpec(BaseModel):
    """What a tensor frame group holds; checked against the actual frames."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(max_length=256)
    dtype: Literal["float32", "float64", "float16", "int64", "int32"]
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


class Hello(_Msg):
    """Daemon -> coordinator: I am up, these are my products and row counts.

    For jobs that standardize features, `stats` carries the sums the coordinator
    pools into the mesh-wide mean and standard deviation.
    """

    type: Literal["hello"] = "hello"
    plan_hash: str
    pid: int = 0
    rows: dict[str, int] = Field(default_factory=dict)
    stats: dict[str, FeatureStats] = Field(default_factory=dict)


class Welcome(_Msg):
    """Coordinator -> daemon: you are in."""

    type: Literal["welcome"] = "welcome"


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


class TrainRes(_Msg):
    """Daemon -> coordinator: the local model after training, and how it went."""

    type: Literal["train_res"] = "train_res"
    job: str
    round: int = Field(ge=1)
    examples: int = Field(ge=0)
    loss: float
    seconds: float = Field(ge=0)


class EvalIns(_Msg):
    """Coordinator -> daemon: evaluate these (aggregated) weights of `round` on your holdout."""

    type: Literal["eval_ins"] = "eval_ins"
    job: str
    round: int = Field(ge=0)
    version: int = Field(ge=0)


class EvalRes(_Msg):
    """Daemon -> coordinator: sums over the holdout, so the coordinator can pool exactly."""

    type: Literal["eval_res"] = "eval_res"
    job: str
    round: int = Field(ge=0)
    examples: int = Field(ge=0)
    loss_sum: float
    correct: int = Field(ge=0)


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


Message = Annotated[
    Union[Hello, Welcome, Refused, TrainIns, TrainRes, EvalIns, EvalRes, ErrorReply, Shutdown],
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


def decode(frames: Sequence[Any]) -> tuple[Any, Tensors]:
    """The message and tensors of `frames` (bytes or zmq.Frame). Raises WireError.

    Every size is checked against the header before a tensor is built; tensors
    are views of the received buffers when they came in one chunk.
    """
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = json.loads(bytes(head))
    except (ValueError, UnicodeDecodeError):
        raise WireError("header is not JSON") from None
    if not isinstance(raw, dict):
        raise WireError("header is not a JSON object")
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
        numel = math.prod(spec.shape)
        if numel * dtype.itemsize != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: shape {spec.shape} does not match {spec.nbytes} bytes")
        parts = [_buffer(f) for f in body[i:i + spec.chunks]]
        i += spec.chunks
        if sum(len(p) for p in parts) != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: frames hold {sum(len(p) for p in parts)} bytes, header says {spec.nbytes}")
        if spec.name in tensors:
            raise WireError(f"tensor {spec.name!r} listed twice")
        tensors[spec.name] = _tensor(parts, dtype, spec.shape, spec.nbytes)
    return msg, tensors


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
