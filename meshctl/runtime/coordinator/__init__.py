"""The coordinator, in rooms (see docs/reliability.md, "The coordinator in rooms").

    service.py    Coordinator: owns the link, the event sink and the stop request; runs one workflow per job
    training.py   the round template of a training job (Flower's Strategy.start is the model)
    strategy.py   Strategy base + the STRATEGIES registry; one thin class per strategy over the kernels
    members.py    join, refuse, lose, rejoin at a round boundary, liveness, quorum
    collector.py  replies checked against the plan; a phase collected with its deadline and stragglers
    outputs.py    the event log (EventSink), checkpoints, metrics.csv, resume points
    process.py    the supervisor that resumes a dead coordinator, the warm fork, the forked daemons

Every room talks to domains through meshctl.runtime.transport's `Link` and reads time
from its `Clock`, so the logic runs the same on ZeroMQ and on the in-memory hub.
"""

from meshctl.runtime.coordinator.collector import (
    REJECT_CODES,
    Collector,
    JobAborted,
    RoundInterrupted,
)
from meshctl.runtime.coordinator.members import HEARTBEAT_EVENT_S, Members, Peer
from meshctl.runtime.coordinator.outputs import EventSink, _drop_torn_line
from meshctl.runtime.coordinator.process import (
    MAX_RESUMES,
    WATCH_S,
    _coordinate,
    _daemon_child,
    _kill_leftovers,
    main,
    warm_main,
)
from meshctl.runtime.coordinator.service import (
    INTERNAL_ERROR,
    POLL_MS,
    REJECTION_CODES,
    Coordinator,
    Stopped,
    _daemon_said,
)
from meshctl.runtime.liveness import HEARTBEAT_TIMEOUT_S, heartbeat_timeout

__all__ = [
    "HEARTBEAT_EVENT_S", "HEARTBEAT_TIMEOUT_S", "INTERNAL_ERROR", "MAX_RESUMES", "POLL_MS", "REJECTION_CODES",
    "REJECT_CODES", "WATCH_S", "Collector", "Coordinator", "EventSink", "JobAborted", "Members", "Peer",
    "RoundInterrupted", "Stopped",
    "_coordinate", "_daemon_child", "_daemon_said", "_drop_torn_line", "_kill_leftovers", "heartbeat_timeout",
    "main", "warm_main",
]
