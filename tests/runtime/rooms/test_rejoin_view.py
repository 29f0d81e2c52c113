"""A rejoin shows: the dashboard's state and the event's one line."""

from __future__ import annotations

from meshctl.runtime import events as ev
from meshctl.tui.state import reduce, reduce_all


def test_the_dashboard_shows_a_lost_domain_joined_again_after_it_rejoins() -> None:
    state = reduce_all([
        ev.DomainJoined(domain="a", ts=1.0),
        ev.DomainLost(domain="a", reason="no heartbeat for 16s", ts=2.0),
        ev.RoundStarted(job="j", round=2, participants=["b"], ts=3.0),
    ])
    assert state.domains["a"].state == "lost"
    reduce(state, ev.DomainRejoined(domain="a", job="j", round=3, was="no heartbeat for 16s", pid=7, ts=4.0))
    assert state.domains["a"].state == "joined" and state.domains["a"].reason == ""
    assert state.domains["a"].last_seen == 4.0
    line = ev.DomainRejoined(domain="a", job="j", round=3, was="no heartbeat for 16s").message()
    assert line == "domain a rejoined at job j round 3 (was lost: no heartbeat for 16s)"


def test_the_summary_names_the_domains_the_result_covers() -> None:
    done = ev.JobCompleted(job="j", rounds=3, metrics={"loss": 0.5}, model_path="models/j.safetensors", seconds=1.0,
                           domains=["a", "b"], left_out={"c": "lost: no heartbeat for 16s"})
    assert done.message() == ("job j completed after 3 rounds: loss=0.5000; model models/j.safetensors; covers a, b; "
                              "without c (lost: no heartbeat for 16s)")
    assert ev.parse_event(done.to_json()) == done


def _live_run(root, events: list[ev.Event]):
    """A run directory whose events are `events` and whose lock is held (a live run), and the lock's fd."""
    from meshctl.runtime.run import RunManifest, hold_run

    d = root / ".meshctl" / "runs" / "r"
    (d / "logs").mkdir(parents=True)
    RunManifest(run="r", run_dir=str(d), base_dir=str(root), router="tcp://127.0.0.1:1", events="tcp://127.0.0.1:2",
                coordinator_key="k", coordinator_public="p", domain_keys={}).write()
    lines = [e.model_copy(update={"seq": i, "ts": 1_780_000_000.0 + i}).to_json() for i, e in enumerate(events, 1)]
    (d / "events.jsonl").write_text("\n".join(lines) + "\n")
    return d, hold_run(d)


def _started() -> ev.RunStarted:
    return ev.RunStarted(run="r", mesh="m", plan_hash="h", run_dir="d", jobs=["j"], domains=["a", "b", "c"])


def test_status_shows_a_rejoined_domain_connected_again_and_the_rerun_round(tmp_path) -> None:
    import os

    from meshctl.runtime.run import RunDir
    from meshctl.runview import render_status

    d, fd = _live_run(tmp_path, [
        _started(), *(ev.DomainJoined(domain=n, pid=i) for i, n in enumerate("abc", 1)),
        ev.JobStarted(job="j", participants=["a", "b", "c"], rounds=5, parameters=10, quorum=3),
        ev.DomainLost(domain="c", reason="no heartbeat for 16s"),
        ev.DomainRejoined(domain="c", job="j", round=2, was="no heartbeat for 16s", pid=99),
        ev.RoundRetried(job="j", round=2, attempt=2, phase="train", domains=["c"],
                        reason="domain c lost: no heartbeat for 16s"),
    ])
    try:
        states = {x.name: (x.state, x.reason, x.pid) for x in RunDir(d).domains()}
        assert states["c"] == ("connected", "", 99)
        text = render_status(d)
        assert "domains: 3 connected, 0 missing, 0 lost or refused" in text
        assert "round 2 re-run (attempt 2): c back" in text
    finally:
        os.close(fd)


def test_status_names_the_awaited_domains_and_what_brings_each(tmp_path) -> None:
    import os

    from meshctl.runtime.run import RunDir
    from meshctl.runview import render_status

    cmd = "meshctl serve --domain c --coordinator tcp://hub.example:7700"
    d, fd = _live_run(tmp_path, [
        _started(), ev.DomainJoined(domain="a", pid=1), ev.DomainJoined(domain="b", pid=2),
        ev.JobWaiting(job="j", have=["a", "b"], need=3),
        ev.DomainsAwaited(job="j", domains=["c"], waited_s=20.0, commands={"c": cmd}),
    ])
    try:
        [job] = RunDir(d).jobs()
        assert (job.state, job.detail) == ("waiting", "waits for c (20s)")
        assert {x.name: (x.state, x.reason) for x in RunDir(d).domains()}["c"] == (
            "missing", f"awaited for 20s: {cmd}")
        text = render_status(d)
        assert "domains: 2 connected, 1 missing, 0 lost or refused" in text and cmd in text
    finally:
        os.close(fd)


def test_the_dashboard_takes_a_rerun_round_without_failing() -> None:
    state = reduce_all([ev.DomainJoined(domain="a", ts=1.0)])
    retried = ev.RoundRetried(job="j", round=2, attempt=2, phase="train", domains=["a"], reason="domain a lost: x")
    reduce(state, retried)
    assert ev.parse_event(retried.to_json()) == retried
    assert retried.message() == "job j round 2: train re-run (attempt 2) with a back (was domain a lost: x)"
