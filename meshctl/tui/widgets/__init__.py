"""The dashboard's widgets, one module per screen area; each renders a `MeshState`."""

from meshctl.tui.widgets.domain_table import DomainTable
from meshctl.tui.widgets.event_filter import EventsView, FilteredLog
from meshctl.tui.widgets.event_log import EventLog
from meshctl.tui.widgets.policy_table import PolicyTable
from meshctl.tui.widgets.rounds_table import RoundsTable
from meshctl.tui.widgets.run_header import RunHeader

__all__ = ["DomainTable", "EventLog", "EventsView", "FilteredLog", "PolicyTable", "RoundsTable",
           "RunHeader"]
