"""A model over 300 MB crosses between two real processes over Curve, in chunked frames."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import zmq

from meshctl.runtime import wire
from meshctl.runtime.keys import MESH_ZAP_DOMAIN, KeyPair, curve_server, start_authenticator

NUMEL = 80_000_000  # 320 MB of float32

SENDER = textwrap.dedent("""
    import sys, torch, zmq
    from meshctl.runtime import wire
    from meshctl.runtime.keys import KeyPair, curve_client
    endpoint, server, key_file = sys.argv[1:]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    curve_client(s, KeyPair.load(key_file), server.encode())
    s.connect(endpoint)
    big = torch.arange({numel}, dtype=torch.float32) % 977
    msg = wire.TrainRes(job="big", round=1, examples=1, loss=0.0, seconds=0.0, sender="sender")
    s.send_multipart(wire.encode(msg, {{"w": big, "b": torch.ones(3)}}), copy=False)
    s.recv()  # wait for the ack so nothing is cut off
""").format(numel=NUMEL)


def test_a_320_mb_tensor_crosses_in_chunks(tmp_path):
    server, client = KeyPair.generate(), KeyPair.generate()
    key_file = client.save(tmp_path, "client")
    ctx = zmq.Context()
    auth = start_authenticator(ctx, {MESH_ZAP_DOMAIN: {client.public}})
    router = ctx.socket(zmq.ROUTER)
    router.maxmsgsize = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES  # what the coordinator allows per frame
    curve_server(router, server, MESH_ZAP_DOMAIN)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    sender = subprocess.Popen([sys.executable, "-c", SENDER, f"tcp://127.0.0.1:{port}", server.public.decode(),
                               str(key_file)])
    try:
        assert router.poll(120_000), "nothing arrived"
        frames = router.recv_multipart(copy=False)
        msg, tensors = wire.decode(frames[1:])
        router.send_multipart([frames[0].bytes, b"ack"])
        assert sender.wait(60) == 0
    finally:
        sender.kill()
        router.close(0)
        auth.stop()
        ctx.term()
    spec = next(s for s in msg.tensors if s.name == "w")
    assert spec.nbytes == NUMEL * 4 and spec.chunks == -(-NUMEL * 4 // wire.CHUNK_BYTES) > 1
    w = tensors["w"]
    assert w.shape == (NUMEL,)
    assert torch.equal(w[:2000], torch.arange(2000, dtype=torch.float32) % 977)
    assert torch.equal(w[-5:], torch.arange(NUMEL - 5, NUMEL, dtype=torch.float32) % 977)
    assert torch.equal(w, torch.arange(NUMEL, dtype=torch.float32) % 977)
