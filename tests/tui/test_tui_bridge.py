"""The event bridge over a real CurveZMQ XPUB, and the events.jsonl replay."""

from __future__ import annotations

import asyncio
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
