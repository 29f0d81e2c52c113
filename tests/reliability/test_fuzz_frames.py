"""A seeded, bounded frame fuzzer: mutations of valid messages through `wire.decode` and through the
coordinator's message handling (in-process, over a real ROUTER socket that nobody reads).

Every case must end as a decoded message or a WireError / MessageRejected, never another exception;
a rejected message leaves the coordinator's inbox as it was, and the inbox stays bounded.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator
from meshctl.runtime.launcher import prepare_run
from meshctl.runtime.transport.memory import FakeClock, MemoryHub

SEED = 9
CASES = 2000


class _Sink:
    """Collects events in memory (the coordinator's EventSink writes files and publishes)."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> ev.Event:
        self.events.append(event)
        return event


HOSTILE = [10**400, -1, 2**64, -(2**63) - 1, None, "", "x" * 5000, [], {}, True, 0, 1.5, [0, 2**64],
           "RAW:1e400", "RAW:-1e400", "RAW:NaN", "RAW:Infinity", "RAW:" + "9" * 5000,
           "RAW:" + "[" * 100_000 + "]" * 100_000, "RAW:" + "{\"a\":" * 50_000 + "1" + "}" * 50_000]
SHAPES = [[0, 2**64], [2**64, 0], [2**31, 2**31], [2**62, 4], [-1, 5], [10**30], [], [1] * 9, [3, 0, 2**40]]


def _dump(obj) -> bytes:
    """JSON with RAW:... strings spliced in as raw tokens (what json.dumps cannot write)."""
    raws: list[str] = []

    def swap(x):
        if isinstance(x, str) and x.startswith("RAW:"):
            raws.append(x[4:])
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(x, list):
            return [swap(v) for v in x]
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        return x

    text = json.dumps(swap(obj))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    if not path:
        return value
    target = obj
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return obj


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = [bytes(f) for f in frames]
    kind = rng.randrange(9)
    if kind == 0:  # bit flips anywhere
        i = rng.randrange(len(frames))
        buf = bytearray(frames[i]) or bytearray(b"\0")
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(buf)
    elif kind == 1:  # truncated frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif kind == 2:  # extended frame
        i = rng.randrange(len(frames))
        frames[i] += rng.randbytes(rng.choice([1, 3, 4, 100]))
    elif kind == 3:  # frames dropped, duplicated or added
        op = rng.randrange(3)
        if op == 0 and len(frames) > 1:
            del frames[rng.randrange(1, len(frames))]
        elif op == 1:
            frames.insert(rng.randrange(1, len(frames) + 1), frames[rng.randrange(len(frames))])
        else:
            frames.extend(rng.randbytes(rng.randrange(64)) for _ in range(rng.randint(1, 20)))
    elif kind in (4, 5):  # a header field set to a hostile value
        head = json.loads(frames[0])
        path = rng.choice(list(_paths(head))[1:])
        frames[0] = _dump(_set(head, path, rng.choice(HOSTILE)))
    elif kind == 6:  # tensor specs: shapes, dtypes, sizes, chunk counts
        head = json.loads(frames[0])
        if not head.get("tensors"):
            head["tensors"] = [{"name": "0.weight", "dtype": "float32", "shape": [32, 64], "nbytes": 8192,
                                "chunks": 1}]
        spec = rng.choice(head["tensors"])
        field = rng.choice(["shape", "dtype", "nbytes", "chunks", "name"])
        spec[field] = {"shape": lambda: rng.choice(SHAPES), "dtype": lambda: rng.choice(["int64", "float16", "x"]),
                       "nbytes": lambda: rng.choice([0, -8, spec["nbytes"] * 2, 2**64, 10**400]),
                       "chunks": lambda: rng.choice([0, 2, 10**9, 2**64]),
                       "name": lambda: rng.choice(["masked", "", head["tensors"][0]["name"]])}[field]()
        if field == "shape" and rng.random() < 0.5:  # sizes that agree with the hostile shape
            spec["nbytes"] = math.prod(spec["shape"]) * 4
            spec["chunks"] = 1
            frames[1:] = [b""] if spec["nbytes"] == 0 else frames[1:]
        frames[0] = _dump(head)
    elif kind == 7:  # well-formed, but hostile in meaning: other rounds, jobs, huge counts
        head = json.loads(frames[0])
        field = rng.choice(["round", "examples", "job", "loss", "correct", "type"])
        head[field] = {"round": lambda: rng.choice([0, 2, 3, 400, 10**6, 2**62]),
                       "examples": lambda: rng.choice([0, 10**18, 2**63 - 1, 10**400]),
                       "job": lambda: rng.choice(["other", ""]),
                       "loss": lambda: rng.choice([1e308, "RAW:1e400", "RAW:NaN"]),
                       "correct": lambda: rng.choice([10**12, 10**400]),
                       "type": lambda: rng.choice(["hello", "eval_res", "train_res", "analyze_res", "error"]),
                       }[field]()
        frames[0] = _dump(head)
    else:  # garbage
        frames = [rng.randbytes(rng.randrange(200)) for _ in range(rng.randint(1, 4))]
    return frames


def _valid(plan, job) -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(SEED)
    weights = {t.name: torch.randn(t.shape, generator=gen) for t in job.tensors}
    me = {"run": "r", "sender": "client-1"}
    return [[bytes(f) for f in m] for m in (
        wire.encode(wire.TrainRes(job=job.name, round=1, examples=100, loss=0.5, seconds=0.1, **me), weights),
        wire.encode(wire.TrainRes(job=job.name, round=2, examples=100, loss=0.5, seconds=0.1, **me), weights),
        wire.encode(wire.EvalRes(job=job.name, round=1, examples=50, loss_sum=20.0, correct=30, **me)),
        wire.encode(wire.Heartbeat(state="training", **me)),
        wire.encode(wire.Hello(plan_hash=plan.plan.hash, pid=1, rows={"client-1.digits": 10}, **me)),
    )]


@pytest.fixture
def coordinator(mesh_file, make_plan):
    """A coordinator of a 2-domain digits plan in the middle of round 1 of its job, both domains joined."""
    plan = make_plan(n=2, rounds=3)
    manifest, _ = prepare_run(mesh_file, plan)
    hub = MemoryHub(FakeClock())
    c = Coordinator(manifest, plan, link=hub)  # what it sends to the peers is kept on the hub, unread
    c.sink = _Sink()
    for domain in ("client-0", "client-1"):
        hub.connect(domain, identity=domain.encode())
        hello = wire.Hello(plan_hash=plan.plan.hash, pid=1, rows={f"{domain}.digits": 10}, sender=domain)
        c._dispatch(domain.encode(), domain, [bytes(f) for f in wire.encode(hello)])
    assert sorted(c.peers) == ["client-0", "client-1"]
    c.current, c.round = plan.jobs[0], 1
    yield c


def test_fuzzed_frames_are_decoded_or_rejected_never_raised(coordinator):
    c = coordinator
    job = c.current
    rng = random.Random(SEED)
    valid = _valid(c.plan, job)
    joined = c.peers["client-1"]
    crashes: list[str] = []
    decode_crashes: list[str] = []
    kept_bad: dict[object, str] = {}
    rejected = 0
    largest_inbox = 0
    for n in range(CASES):
        frames = _mutate(rng, rng.choice(valid))
        try:
            wire.decode(frames)
        except wire.WireError:
            pass
        except Exception as err:  # noqa: BLE001 - what the fuzzer counts
            decode_crashes.append(f"case {n}: {type(err).__name__}: {str(err)[:80]}")
        before = dict(c.inbox)
        seen = len(c.sink.events)
        c.peers["client-1"] = joined  # keep the domain joined (an ErrorReply case may have failed it)
        joined.last_seen = c.peers["client-0"].last_seen
        c.failed.pop("client-1", None)
        c.dropped.pop("client-1", None)
        try:
            c._dispatch(b"client-1", "client-1", frames)
        except Exception as err:  # noqa: BLE001
            crashes.append(f"case {n}: {type(err).__name__}: {str(err)[:80]}")
            continue
        new = c.sink.events[seen:]
        if any(isinstance(e, ev.MessageRejected) for e in new):
            rejected += 1
            if c.inbox != before:
                kept_bad[n] = f"case {n}: a rejected message changed the inbox"
        largest_inbox = max(largest_inbox, len(c.inbox))
        for (kind, rnd, domain), (msg, tensors) in c.inbox.items():  # whatever is kept is usable as is
            usable = domain == "client-1" and rnd in (1, 2) and msg.job == job.name
            if kind == "train_res":
                usable = usable and 0 < msg.examples <= 2**53 and math.isfinite(msg.loss) and all(
                    bool(torch.isfinite(v).all()) for v in tensors.values()) and {
                    k: list(v.shape) for k, v in tensors.items()} == {t.name: t.shape for t in job.tensors}
            if not usable:
                kept_bad[(kind, rnd, domain)] = f"case {n}: kept {kind} round {rnd}: {msg!r:.300}"
    print(f"fuzz: {CASES} cases, {rejected} rejected, {len(decode_crashes)} decode crashes, "
          f"{len(crashes)} handler crashes, {len(kept_bad)} unusable kept, largest inbox {largest_inbox}")
    assert not decode_crashes, decode_crashes[:10]
    assert not crashes, crashes[:10]
    assert not kept_bad, list(kept_bad.values())[:10]
    assert rejected > CASES // 2
    assert largest_inbox <= 4
