"""Event sources: the ZeroMQ subscriber bridge and the events.jsonl replay.

Both run in a plain daemon thread and hand events to the app with `app.feed`,
which posts a message (thread-safe); the app's thread does all the rendering.
A frame or line that does not parse is counted in `skipped` and reported to the
app as `FrameSkipped`; it never stops the source.
"""

from __future__ import annotations

import threading
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshctl.runtime.events import Event, RunCompleted, parse_event
from meshctl.runtime.keys import fast_reconnect
from meshctl.tui.messages import BridgeNote, EventHost, FrameSkipped

__all__ = ["EventBridge", "FileReplay"]


class _Feeder:
    """Parses raw events and feeds them to an app; counts what it drops."""

    def __init__(self) -> None:
        self.app: EventHost | None = None
        self.received = 0
        """Events delivered to the app."""
        self.skipped = 0
        """Frames or lines dropped because they did not parse."""
        self.last_error = ""
        self.finished = False
        """Whether the run's `run_completed` went by (a coordinator that goes away after it is no news)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver(self, raw: bytes | str) -> Event | None:
        """Parse one JSON event and feed it to the app; None (and counted) if malformed."""
        try:
            event = parse_event(raw)
        except Exception as err:  # noqa: BLE001 - a bad frame must never stop the source
            self.skip(_short(err))
            return None
        self.received += 1
        self._post_event(event)
        return event

    def skip(self, reason: str) -> None:
        """Count a dropped frame and tell the app why."""
        self.skipped += 1
        self.last_error = reason
        self._post(FrameSkipped(reason))

    def replay(self, path: str | Path) -> int:
        """Feed every event of an `events.jsonl` file, in order; return how many were fed."""
        before = self.received
        with open(path, encoding="utf-8") as f:
            for line in f:
                if self._stop.is_set():
                    break
                if line.strip():
                    self.deliver(line)
        return self.received - before

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to finish and wait for it (at most `timeout` seconds)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the source's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _start_thread(self, app: EventHost, name: str) -> None:
        self.app = app
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _post_event(self, event: Event) -> None:
        if isinstance(event, RunCompleted):
            self.finished = True
        if self.app is None:
            return
        try:
            self.app.feed(event)
        except RuntimeError:  # the app's loop has closed under us
            self._stop.set()

    def _post(self, message: BridgeNote | FrameSkipped) -> None:
        if self.app is None:
            return
        try:
            self.app.post_message(message)
        except RuntimeError:
            self._stop.set()


class EventBridge(_Feeder):
    """Subscribe to a coordinator's event stream over CurveZMQ and feed the app.

    Args:
        endpoint: The coordinator's XPUB endpoint, e.g. `tcp://127.0.0.1:7701`.
        curve_serverkey: The coordinator's Curve public key (Z85, 40 bytes).
        curve_publickey: This observer's Curve public key (Z85), which the
            coordinator must allow.
        curve_secretkey: This observer's Curve secret key (Z85).
        context: The ZeroMQ context to use; a private one by default.
        poll_ms: How long each poll waits; bounds how fast `stop()` returns.
    """

    def __init__(self, endpoint: str, *, curve_serverkey: bytes, curve_publickey: bytes,
                 curve_secretkey: bytes, context: zmq.Context | None = None,
                 poll_ms: int = 100) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._keys = (curve_serverkey, curve_publickey, curve_secretkey)
        self._context = context
        self.poll_ms = poll_ms
        self.connected = threading.Event()
        """Set once the Curve handshake with the coordinator has succeeded."""

    def start(self, app: EventHost) -> None:
        """Connect and start receiving in a daemon thread; returns at once."""
        self._start_thread(app, "meshctl-event-bridge")

    def _run(self) -> None:
        own = self._context is None
        ctx = zmq.Context() if own else self._context
        assert ctx is not None
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._keys
        fast_reconnect(sock)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(self.endpoint)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self._stop.is_set():
                ready = dict(poller.poll(self.poll_ms))
                if monitor in ready:
                    info = recv_monitor_message(monitor)
                    if info.get("event") == zmq.EVENT_DISCONNECTED:
                        self._drain(sock)  # the frames that came before it (run_completed) first
                    self._on_monitor(info)
                if sock in ready:
                    self._on_frames(sock.recv_multipart())
                elif not ready:
                    self._idle()
        except zmq.ZMQError as err:
            self._post(BridgeNote("error", f"event bridge stopped: {err}"))
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            if own:
                ctx.term()

    def _idle(self) -> None:
        """Called when a poll found nothing to read; a hook for subclasses."""

    def _drain(self, sock: zmq.Socket) -> None:
        """Read every frame already queued on `sock`, without waiting."""
        while not self._stop.is_set():
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self.skip(f"expected one frame, got {len(frames)}")
        else:
            self.deliver(frames[0])

    def _on_monitor(self, info: dict[str, object]) -> None:
        event = info.get("event")
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if not self.connected.is_set():
                self.connected.set()
                self._post(BridgeNote("info", f"subscribed to {self.endpoint}"))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._post(BridgeNote("error", f"{self.endpoint} refused this dashboard's key"))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self._post(BridgeNote("error", f"Curve handshake with {self.endpoint} failed"))
        elif event == zmq.EVENT_DISCONNECTED and self.connected.is_set():
            self.connected.clear()
            if not self.finished:  # after run_completed the coordinator closing is its normal exit
                self._post(BridgeNote("warning", f"disconnected from {self.endpoint}; retrying"))


class FileReplay(_Feeder):
    """Feed the events of an `events.jsonl` file, once, in a daemon thread."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.done = threading.Event()
        """Set when every line has been fed."""

    def start(self, app: EventHost) -> None:
        """Start replaying into `app`; returns at once."""
        self._start_thread(app, "meshctl-event-replay")

    def _run(self) -> None:
        try:
            self.replay(self.path)
        except OSError as err:
            self._post(BridgeNote("error", f"cannot replay {self.path}: {err}"))
        finally:
            self.done.set()


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= 120 else first[:117] + "..."
