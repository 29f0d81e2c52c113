"""How long silence may last before a peer counts as lost: one rule for the coordinator, the
daemons, the domain service and the dashboard (no torch, no zmq: the dashboard imports it)."""

from __future__ import annotations

import os

HEARTBEAT_TIMEOUT_S = 15.0
"""A joined domain silent this long is lost (coordinator); a daemon whose coordinator connection
stays down this long gives up or reconnects; the dashboard flags a silent domain or coordinator."""


def env_seconds(name: str, default: float) -> float:
    """The environment variable `name` as a positive number of seconds, else `default`."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def heartbeat_timeout() -> float:
    """`HEARTBEAT_TIMEOUT_S`, or MESHCTL_HEARTBEAT_TIMEOUT_S when set to a positive number."""
    return env_seconds("MESHCTL_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)
