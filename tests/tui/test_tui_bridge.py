"""The event bridge over a real CurveZMQ XPUB, and the events.jsonl replay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from tui_events import sample_run
from zmq.auth.thread import ThreadAuthenticator

from meshctl.tui import EventBridge, FileReplay, MeshApp, make_app
from meshctl.tui.widgets import EventLog, RoundsTable, RunHeader

ZAP_DOMAIN = "events"


@dataclass
class Publisher:
    """A coordinator stand-in: an XPUB Curve server that admits one client key."""

    sock: zmq.Socket
    endpoint: str
    server_public: bytes

    def wait_for_subscriber(self, timeout: float = 3.0) -> None:
        assert self.sock.poll(int(timeout * 1000)), "no subscription arrived on the XPUB"
        assert self.sock.recv() == b"\x01"  # subscribe-to-everything


class _AllowOne:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return domain == ZAP_DOMAIN and key == self.key


@pytest.fixture
def curve() -> Iterator[tuple[Publisher, dict[str, bytes], Callable[[], tuple[bytes, bytes]]]]:
    ctx = zmq.Context()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_AllowOne(client_public))
    sock = ctx.socket(zmq.XPUB)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey = server_secret, server_public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    pub = Publisher(sock, f"tcp://127.0.0.1:{port}", server_public)
    keys = {"curve_serverkey": server_public, "curve_publickey": client_public,
            "curve_secretkey": client_secret}
    try:
        yield pub, keys, zmq.curve_keypair
    finally:
        sock.close(linger=0)
        auth.stop()
        ctx.term()


async def _until(pilot, cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)


def test_bridge_feeds_curve_events_and_skips_malformed_frames(curve) -> None:
    pub, keys, _ = curve
    bridge = EventBridge(pub.endpoint, poll_ms=20, **keys)
    events = sample_run()
    first_round = next(i for i, e in enumerate(events) if e.type == "round_completed")

    async def run() -> MeshApp:
        app = make_app(event_source=bridge)
        async with app.run_test(size=(120, 40)) as pilot:
            await asyncio.to_thread(pub.wait_for_subscriber)
            for event in events[: first_round + 1]:
                pub.sock.send(event.to_json().encode())
            pub.sock.send(b"{not json")
            pub.sock.send(b'{"type": "round_completed", "job": "j"}')
            pub.sock.send_multipart([b"{}", b"{}"])
            await _until(pilot, lambda: bridge.skipped == 3)
            for event in events[first_round + 1:]:
                pub.sock.send(event.to_json().encode())
            await _until(pilot, lambda: app.mesh_state.state == "completed")
            app.flush()  # redraws are batched (every refresh_s); draw the last batch now

            assert bridge.connected.is_set()
            assert bridge.received == len(events)
            assert app.mesh_state.skipped == 3
            assert app.query_one(RoundsTable).row_count == 2
            assert "COMPLETED" in app.query_one(RunHeader).text
            assert "3 skipped" in app.query_one(RunHeader).text
            log = app.query_one(EventLog).plain_lines
            assert sum("skipped a malformed frame" in line for line in log) == 3
            assert any(f"subscribed to {pub.endpoint}" in line for line in log)
            await pilot.press("q")
        return app

    app = asyncio.run(run())
    assert not app.is_running
    assert not bridge.running  # the app's unmount stopped the thread


def test_bridge_with_an_unknown_key_is_refused(curve) -> None:
    pub, keys, keypair = curve
    stranger_public, stranger_secret = keypair()
    bridge = EventBridge(pub.endpoint, curve_serverkey=keys["curve_serverkey"],
                         curve_publickey=stranger_public, curve_secretkey=stranger_secret,
                         poll_ms=20)

    async def run() -> None:
        app = make_app(event_source=bridge)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: any(
                "refused this dashboard's key" in line
                for line in app.query_one(EventLog).plain_lines))
            assert not bridge.connected.is_set()
            assert not pub.sock.poll(50)  # no subscription got through
            await pilot.press("q")

    asyncio.run(run())
    assert not bridge.running


def test_bridge_stop_is_prompt_and_idempotent(curve) -> None:
    pub, keys, _ = curve
    bridge = EventBridge(pub.endpoint, poll_ms=20, **keys)
    app = make_app()
    bridge.start(app)  # not running: feed() posts nothing, but the thread must still stop
    t0 = time.monotonic()
    bridge.stop()
    bridge.stop()
    assert not bridge.running
    assert time.monotonic() - t0 < 1.0


def test_replay_file_and_eventbridge_replay(tmp_path: Path) -> None:
    events = sample_run(rounds=3)
    path = tmp_path / "events.jsonl"
    lines = [e.to_json() for e in events]
    lines.insert(3, "garbage")
    path.write_text("\n".join(lines) + "\n\n")
    replay = FileReplay(path)

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: app.mesh_state.state == "completed")
            # the feeder thread sets `done` right after posting the last event; the app may reduce
            # that event first
            await _until(pilot, replay.done.is_set)
            assert replay.done.is_set()
            assert (replay.received, replay.skipped) == (len(events), 1)
            await _until(pilot, lambda: app.query_one(RoundsTable).row_count == 3)
            assert app.mesh_state.skipped == 1

    asyncio.run(run())

    async def run_direct() -> None:
        app = make_app()
        bridge = EventBridge("tcp://127.0.0.1:1", curve_serverkey=b"", curve_publickey=b"",
                             curve_secretkey=b"")
        async with app.run_test(size=(80, 24)) as pilot:
            bridge.app = app
            assert bridge.replay(path) == len(events)
            await _until(pilot, lambda: app.query_one(RoundsTable).row_count == 3)

    asyncio.run(run_direct())


@pytest.mark.parametrize("finished", [True, False], ids=["after-run-completed", "mid-run"])
def test_coordinator_closing_after_the_run_ended_is_no_disconnect(curve, finished: bool) -> None:
    """Issue 14: every normal finish logged a false `disconnected from tcp://…; retrying`."""
    pub, keys, _ = curve
    bridge = EventBridge(pub.endpoint, poll_ms=20, **keys)
    events = sample_run()
    sent = events if finished else events[:10]

    async def run() -> list[str]:
        app = make_app(event_source=bridge)
        async with app.run_test(size=(120, 40)) as pilot:
            await asyncio.to_thread(pub.wait_for_subscriber)
            await _until(pilot, bridge.connected.is_set)
            for event in sent:
                pub.sock.send(event.to_json().encode())
            await _until(pilot, lambda: bridge.received == len(sent))
            pub.sock.close(linger=0)  # the coordinator exits
            await _until(pilot, lambda: not bridge.connected.is_set())
            await pilot.pause(0.3)
            app.flush()
            lines = [line.text for line in app.mesh_state.events]
            await pilot.press("q")
        return lines

    lines = asyncio.run(run())
    retrying = [line for line in lines if "disconnected from" in line]
    assert retrying == ([] if finished else [f"disconnected from {pub.endpoint}; retrying"])


def test_run_completed_queued_with_the_disconnect_is_read_before_it(curve) -> None:
    """A reviewer saw `disconnected from …; retrying` at the end of every successful run: the
    coordinator's close and its last frames (run_completed) reach the dashboard in the same poll,
    and the close was handled first."""
    pub, keys, _ = curve
    release, blocked = threading.Event(), threading.Event()
    notes: list[str] = []

    class Held(EventBridge):
        def _on_frames(self, frames: list[bytes]) -> None:
            if not blocked.is_set():  # the first frame: hold the thread until all the rest is queued
                blocked.set()
                assert release.wait(10)
            super()._on_frames(frames)

    class Host:
        def feed(self, event) -> None:
            pass

        def post_message(self, message) -> bool:
            notes.append(getattr(message, "text", ""))
            return True

    ctx = zmq.Context()
    bridge = Held(pub.endpoint, poll_ms=20, **keys)
    watcher = ctx.socket(zmq.SUB)  # a second subscriber: it sees the coordinator go away
    watcher.curve_serverkey, watcher.curve_publickey, watcher.curve_secretkey = (
        keys["curve_serverkey"], keys["curve_publickey"], keys["curve_secretkey"])
    watcher.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = watcher.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        bridge.start(Host())  # type: ignore[arg-type]
        pub.wait_for_subscriber()
        watcher.connect(pub.endpoint)
        assert monitor.poll(3000) and recv_monitor(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        deadline = time.monotonic() + 3
        while not bridge.connected.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        events = sample_run()
        pub.sock.send(events[0].to_json().encode())
        assert blocked.wait(3)
        for event in events[1:]:
            pub.sock.send(event.to_json().encode())
        pub.sock.close(linger=2000)  # the coordinator exits after its last event went out
        assert monitor.poll(3000) and recv_monitor(monitor) == zmq.EVENT_DISCONNECTED
        release.set()
        deadline = time.monotonic() + 3
        while bridge.received < len(events) or bridge.connected.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        release.set()
        bridge.stop()
        monitor.close(linger=0)
        watcher.close(linger=0)
        ctx.term()
    assert bridge.finished
    assert [n for n in notes if "disconnected from" in n] == []


def recv_monitor(monitor: zmq.Socket) -> int:
    from zmq.utils.monitor import recv_monitor_message

    return int(recv_monitor_message(monitor)["event"])
