"""Wire round-trips and the rejection of malformed frames (no sockets needed)."""

import json

import pytest
import torch

from meshctl import PROTOCOL_VERSION
from meshctl.runtime import wire


def test_round_trip_keeps_header_and_tensors():
    # Prepare
    msg = wire.TrainRes(job="j", round=3, examples=17, loss=0.25, seconds=0.5, sender="a")
    tensors = {"0.weight": torch.randn(4, 3), "0.bias": torch.arange(4, dtype=torch.float32)}
    # Execute
    out, got = wire.decode(wire.encode(msg, tensors))
    # Assert
    assert out.type == "train_res" and out.round == 3 and out.examples == 17 and out.sender == "a"
    assert [s.name for s in out.tensors] == ["0.weight", "0.bias"]
    for name, t in tensors.items():
        assert torch.equal(got[name], t)


def test_large_tensor_is_chunked_and_reassembled():
    t = torch.randn(1000)
    frames = wire.encode(wire.EvalIns(job="j", round=1, version=1), {"w": t}, chunk_bytes=1024)
    assert len(frames) == 1 + 4  # 4000 bytes in 1024-byte chunks
    msg, got = wire.decode(frames)
    assert msg.tensors[0].chunks == 4
    assert torch.equal(got["w"], t)


def test_header_is_plain_json_without_pickle():
    frames = wire.encode(wire.Hello(plan_hash="sha256:x", rows={"a.b": 3}), None)
    header = json.loads(frames[0])
    assert header["type"] == "hello" and header["v"] == PROTOCOL_VERSION and header["rows"] == {"a.b": 3}


def _frames(**override):
    head = {"type": "train_res", "v": PROTOCOL_VERSION, "job": "j", "round": 1, "examples": 1,
            "loss": 0.1, "seconds": 0.0,
            "tensors": [{"name": "w", "dtype": "float32", "shape": [2], "nbytes": 8, "chunks": 1}]}
    head.update(override)
    return [json.dumps(head).encode(), b"\0" * 8]


@pytest.mark.parametrize("frames, needle", [
    ([], "empty message"),
    ([b"\x80\x04pickle"], "not JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    (_frames(v=99), "protocol version 99"),
    (_frames(type="train_res_x"), "bad"),
    (_frames(extra_field=1), "Extra inputs"),
    (_frames(round=0), "round"),
    (_frames(tensors=[{"name": "w", "dtype": "float32", "shape": [3], "nbytes": 8, "chunks": 1}]), "does not match"),
    (_frames(tensors=[{"name": "w", "dtype": "object", "shape": [2], "nbytes": 8, "chunks": 1}]), "dtype"),
    (_frames()[:1], "lists 1 tensor frames, message has 0"),
    ([_frames()[0], b"\0" * 7], "frames hold 7 bytes"),
    ([b"{" * (wire.MAX_HEADER_BYTES + 1)], "exceeds"),
])
def test_malformed_frames_are_rejected_with_a_reason(frames, needle):
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames)
    assert needle in str(err.value)


def test_wire_module_never_unpickles():
    import inspect

    src = inspect.getsource(wire)
    for banned in ("pickle", "torch.load", "recv_pyobj", "allow_pickle"):
        assert banned not in src.replace("Nothing here unpickles or\n`torch.load`s", "")
