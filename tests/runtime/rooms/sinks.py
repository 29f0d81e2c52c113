"""What the room tests read the coordinator's events from."""

from __future__ import annotations

from typing import Any

from meshctl.runtime import events as ev


class ListSink:
    """Events kept in a list (the coordinator's EventSink writes and publishes them)."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> ev.Event:
        self.events.append(event)
        return event

    def of(self, cls: type[ev.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def kinds(self) -> list[str]:
        return [e.type for e in self.events]
