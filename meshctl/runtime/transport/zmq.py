"""The real Link: a CurveZMQ ROUTER for the domains, an XPUB for observers, the ZAP allow-list.

The only coordinator-side module that imports zmq. Setup follows pyzmq's ironhouse
order: authenticator first, then the keypair and `curve_server` before `bind`; the
sender of every message is the key's domain from the frame's `User-Id`, never what
the message claims.
"""

from __future__ import annotations

import queue
import socket
import time
from typing import Any

import zmq

from meshctl.runtime import wire
from meshctl.runtime.keys import (
    EVENTS_ZAP_DOMAIN,
    MESH_ZAP_DOMAIN,
    KeyPair,
    curve_server,
    start_authenticator,
)
from meshctl.runtime.transport.base import Inbound, Unreachable

BATCH = 1000
"""At most this many messages per poll, so that liveness and signals are checked in between."""


class ZmqLink:
    """ROUTER (domains) + XPUB (observers) bound with the coordinator's Curve key.

    `domain_keys` maps each domain's public key to its name (the allow-list of the
    mesh ZAP domain); `observer_keys` may subscribe to events. `wake` is a socket whose
    readability interrupts `poll` (a signal handler writes to its peer).
    """

    def __init__(self, keys: KeyPair, router: str, events: str, domain_keys: dict[bytes, str],
                 observer_keys: set[bytes], max_frame: int, wake: socket.socket | None = None):
        self.by_key = dict(domain_keys)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, {MESH_ZAP_DOMAIN: set(self.by_key), EVENTS_ZAP_DOMAIN: observer_keys})
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 1000
        self.router.router_mandatory = True
        self.router.maxmsgsize = wire.MAX_HEADER_BYTES + max_frame  # ZeroMQ drops a larger frame unread
        curve_server(self.router, keys, MESH_ZAP_DOMAIN)
        self.router.bind(router)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 2000
        self.pub.sndhwm = 1_000_000
        curve_server(self.pub, keys, EVENTS_ZAP_DOMAIN)
        self.pub.bind(events)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        self.wake = wake
        if wake is not None:
            self.poller.register(wake.fileno(), zmq.POLLIN)
        self.subscribed = False
        """An observer has subscribed to the events (the dashboard of `up`)."""

    def send(self, identity: bytes, msg: Any, tensors: wire.Tensors | None = None) -> int:
        frames = wire.encode(msg, tensors)
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as err:  # peer gone (router_mandatory)
            raise Unreachable(str(err)) from None
        return wire.frames_size(frames)

    def reply(self, identity: bytes, msg: Any) -> None:
        try:
            self.router.send_multipart([identity, *wire.encode(msg)])
        except zmq.ZMQError:
            pass

    def poll(self, timeout_s: float) -> list[Inbound]:
        ready = dict(self.poller.poll(int(timeout_s * 1000)))
        if self.wake is not None and self.wake.fileno() in ready:
            while True:
                try:
                    if not self.wake.recv(512):
                        break
                except BlockingIOError:
                    break
        if self.pub in ready and self.pub.recv()[:1] == b"\x01":
            self.subscribed = True
        out: list[Inbound] = []
        if self.router in ready:
            for _ in range(BATCH):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) < 2:
                    continue
                user = frames[1].get("User-Id")
                key = user.encode() if isinstance(user, str) else user
                out.append(Inbound(frames[0].bytes, self.by_key.get(key), frames[1:]))
        return out

    def wait_for_observer(self, seconds: float, stop: Any) -> None:
        """Wait up to `seconds` for a subscriber to the events; `stop()` is called between polls."""
        poller = zmq.Poller()  # the pub socket only: what domains send waits in the router's queue
        poller.register(self.pub, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while seconds and not self.subscribed and time.monotonic() < deadline:
            ready = dict(poller.poll(50))
            stop()
            if self.pub in ready and self.pub.recv()[:1] == b"\x01":
                self.subscribed = True

    def publish(self, line: str) -> None:
        self.pub.send_string(line)

    def refusals(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.auth.refusals.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop the authenticator, close the sockets (lingering for what is queued), end the context."""
        self.auth.stop()
        self.router.close()
        self.pub.close()
        self.ctx.term()
