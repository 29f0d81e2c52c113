"""An in-memory Link with a fake clock: the round logic's tests run in milliseconds, without sleeps.

The hub is the coordinator's `Link`; each domain gets `Connection`s (a daemon's
DEALER socket). Messages cross as encoded wire frames, so every check of
`wire.decode` applies. Time moves only when the coordinator waits with nothing
to read (`poll` runs the timers due and advances the clock) or when a test calls
`clock.advance`:

    clock = FakeClock()
    hub = MemoryHub(clock)
    a = hub.connect("client-0", on_message=answer)   # answer(conn, msg, tensors)
    hub.every(2.0, lambda: a.send(wire.Heartbeat(state="idle")))
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from meshctl.runtime import wire
from meshctl.runtime.transport.base import Inbound, Unreachable

OnMessage = Callable[["Connection", Any, wire.Tensors], None]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def monotonic(self) -> float:
        """The fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        self.now += seconds


class Connection:
    """One domain's connection to the hub: what it sends is queued for the coordinator's next poll."""

    def __init__(self, hub: MemoryHub, domain: str | None, identity: bytes, on_message: OnMessage | None):
        self.hub, self.domain, self.identity, self.on_message = hub, domain, identity, on_message
        self.received: list[tuple[Any, wire.Tensors]] = []
        """Everything the coordinator sent to this connection, decoded, in order."""
        self.closed = False

    def send(self, msg: Any, tensors: wire.Tensors | None = None) -> None:
        """Send `msg` (its sender set to this connection's domain) to the coordinator."""
        if self.closed:
            return
        if self.domain is not None and not msg.sender:
            msg = msg.model_copy(update={"sender": self.domain})
        self.send_frames([bytes(f) for f in wire.encode(msg, tensors)])

    def send_frames(self, frames: list[bytes]) -> None:
        """Send raw frames (a malformed message, say)."""
        if not self.closed:
            self.hub.queue.append(Inbound(self.identity, self.domain, frames))

    def close(self) -> None:
        """Drop the connection: the coordinator's sends to it fail from now on."""
        self.closed = True

    def _deliver(self, frames: list[Any]) -> None:
        msg, tensors = wire.decode(frames)
        self.received.append((msg, tensors))
        if self.on_message is not None:
            self.on_message(self, msg, tensors)


class MemoryHub:
    """The coordinator's Link over in-memory connections, driven by a FakeClock."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.queue: deque[Inbound] = deque()
        self.connections: dict[bytes, Connection] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.published: list[str] = []
        self.refused: list[str] = []
        """Handshake refusals to report (a test appends lines, as the ZAP authenticator would)."""
        self._ids = itertools.count(1)

    def connect(self, domain: str | None, on_message: OnMessage | None = None, *,
                identity: bytes | None = None) -> Connection:
        """A new connection authenticated as `domain` (None: a key no domain owns)."""
        conn = Connection(self, domain, identity or b"conn-%d" % next(self._ids), on_message)
        self.connections[conn.identity] = conn
        return conn

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` when the clock reaches `when` (while the coordinator waits)."""
        heapq.heappush(self.timers, (when, next(self._ids), action))

    def after(self, seconds: float, action: Callable[[], None]) -> None:
        """Run `action` `seconds` from now."""
        self.at(self.clock.now + seconds, action)

    def every(self, seconds: float, action: Callable[[], bool | None]) -> None:
        """Run `action` every `seconds` until it returns False."""
        def tick() -> None:
            if action() is not False:
                self.after(seconds, tick)
        self.after(seconds, tick)

    # -- Link ------------------------------------------------------------------------
    def send(self, identity: bytes, msg: Any, tensors: wire.Tensors | None = None) -> int:
        conn = self.connections.get(identity)
        if conn is None or conn.closed:
            raise Unreachable("Host unreachable")
        frames = wire.encode(msg, tensors)
        conn._deliver([bytes(f) for f in frames])
        return wire.frames_size(frames)

    def reply(self, identity: bytes, msg: Any) -> None:
        try:
            self.send(identity, msg)
        except Unreachable:
            pass

    def poll(self, timeout_s: float) -> list[Inbound]:
        until = self.clock.now + timeout_s
        while not self.queue and self.timers and self.timers[0][0] <= until:
            when, _, action = heapq.heappop(self.timers)
            self.clock.now = max(self.clock.now, when)
            action()
        if not self.queue:
            self.clock.now = max(self.clock.now, until)
        out = list(self.queue)
        self.queue.clear()
        return out

    def publish(self, line: str) -> None:
        self.published.append(line)

    def refusals(self) -> list[str]:
        out, self.refused = self.refused, []
        return out
