"""The dashboard's widgets, one module per screen area; each renders a `MeshState`."""

from meshctl.tui.widgets.analysis_table import AnalysisTable
from meshctl.tui.widgets.catalog_view import CatalogTable, CatalogView
from meshctl.tui.widgets.domain_table import DomainTable
from meshctl.tui.widgets.event_filter import EventsView, FilteredLog
from meshctl.tui.widgets.event_log import EventLog
from meshctl.tui.widgets.failure_banner import FailureBanner
from meshctl.tui.widgets.help_screen import HelpScreen
from meshctl.tui.widgets.jobs_panel import JobsPanel
from meshctl.tui.widgets.policy_table import PolicyTable
from meshctl.tui.widgets.quit_dialog import QuitDialog
from meshctl.tui.widgets.rounds_table import RoundsTable
from meshctl.tui.widgets.rounds_view import ContributionTable, RoundPlot, RoundsView
from meshctl.tui.widgets.run_header import RunHeader

__all__ = ["AnalysisTable", "CatalogTable", "CatalogView", "ContributionTable", "DomainTable", "EventLog",
           "EventsView", "FailureBanner", "FilteredLog", "HelpScreen", "JobsPanel", "PolicyTable", "QuitDialog", "RoundPlot",
           "RoundsTable", "RoundsView", "RunHeader"]
