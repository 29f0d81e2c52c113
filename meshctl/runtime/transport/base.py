"""What the round logic needs from a transport: `Link`, `Inbound`, `Clock`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from meshctl.runtime import wire


class Unreachable(Exception):
    """A message could not be handed to the connection it was addressed to (the peer is gone)."""


@dataclass(frozen=True)
class Inbound:
    """One message as it arrived: the connection, the domain its Curve key belongs to, the raw frames."""

    identity: bytes
    """The connection it came over (a ZeroMQ routing id); replies go back to it."""
    domain: str | None
    """The domain whose key authenticated the connection; None for a key no domain owns."""
    frames: list[Any]
    """Header frame then tensor frames, undecoded: `wire.decode` checks them."""


class Link(Protocol):
    """The coordinator's side of the conversation with every domain."""

    def send(self, identity: bytes, msg: Any, tensors: wire.Tensors | None = None) -> int:
        """Encode and send `msg` to connection `identity`; the bytes sent. Raises Unreachable."""
        ...

    def reply(self, identity: bytes, msg: Any) -> None:
        """Send `msg` to `identity` if it is still there (a refusal to a peer that may have gone)."""
        ...

    def poll(self, timeout_s: float) -> list[Inbound]:
        """What arrived within `timeout_s` (empty when nothing did)."""
        ...

    def publish(self, line: str) -> None:
        """Publish one events.jsonl line to the run's observers."""
        ...

    def refusals(self) -> list[str]:
        """Handshakes refused (a key the run does not know) since the last call, one line each."""
        ...


class Clock(Protocol):
    """Monotonic seconds: the round logic's only source of time (tests pass a fake one)."""

    def monotonic(self) -> float:
        """Seconds since an arbitrary fixed point; never goes back."""
        ...


class SystemClock:
    """The real monotonic clock."""

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()
