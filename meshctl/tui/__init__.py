"""The Textual dashboard: consumes run-time events, computes nothing.

`make_app` builds the app (CLI and tests alike); `EventBridge` feeds it from the
coordinator's CurveZMQ event stream, `FileReplay` from an `events.jsonl` file, and
`PacedReplay` (`meshctl dash --replay`) from one at its recorded pace.
"""

from meshctl.tui.app import MeshApp, make_app
from meshctl.tui.bridge import EventBridge, FileReplay
from meshctl.tui.replay import PacedReplay
from meshctl.tui.state import MeshState, reduce

__all__ = ["EventBridge", "FileReplay", "MeshApp", "MeshState", "PacedReplay", "make_app",
           "reduce"]
