"""The coordinator's transport seam: a `Link` to the domains and a `Clock`.

The round logic (meshctl.runtime.coordinator) talks to domains only through a
`Link`: `zmq.py` is the real one (ROUTER + CurveZMQ + the ZAP allow-list),
`memory.py` an in-memory hub with a fake clock on which membership, quorum,
stragglers and rejoin are tested in milliseconds.
"""

from meshctl.runtime.transport.base import Clock, Inbound, Link, SystemClock, Unreachable

__all__ = ["Clock", "Inbound", "Link", "SystemClock", "Unreachable"]
