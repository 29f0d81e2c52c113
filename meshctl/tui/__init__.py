"""The Textual dashboard: consumes run-time events, computes nothing.

`make_app` builds the app (CLI and tests alike); `EventBridge` feeds it from the
coordinator's CurveZMQ event stream, `FileReplay` from an `events.jsonl` file.
"""

from meshctl.tui.app import MeshApp, make_app
from meshctl.tui.bridge import EventBridge, FileReplay
from meshctl.tui.state import MeshState, reduce

__all__ = ["EventBridge", "FileReplay", "MeshApp", "MeshState", "make_app", "reduce"]
