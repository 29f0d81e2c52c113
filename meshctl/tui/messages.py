"""App-wide messages: how events and bridge notes reach the app's thread."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from meshctl.runtime.events import Event


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
