"""App-wide messages: how events and bridge notes reach the app's thread."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from textual.message import Message
from textual.timer import Timer

from meshctl.runtime.events import Event


class EventHost(Protocol):
    """What an event source (bridge.py, replay.py) needs of the app it feeds; `MeshApp` is one.
    The sources see the app only through this, so they never import app.py (which imports them)."""

    def post_message(self, message: Message) -> bool: ...
    def set_interval(self, interval: float, callback: Callable[[], Any] | None = None) -> Timer: ...
    def feed(self, event: Event) -> bool: ...
    def apply_events(self, events: Iterable[Event]) -> None: ...
    def rebuild(self, events: Iterable[Event]) -> None: ...


@dataclass
class EventReceived(Message):
    """A run-time event arrived (from the bridge, a replay, or `MeshApp.feed`)."""

    event: Event


@dataclass
class BridgeNote(Message):
    """Something the event source itself has to say (connected, auth failed, …)."""

    level: str
    text: str


@dataclass
class FrameSkipped(Message):
    """The event source dropped a frame it could not parse."""

    reason: str
