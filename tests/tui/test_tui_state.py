"""The reducer: events in, dashboard state out; deterministic."""

from __future__ import annotations

from tui_events import DOMAINS, sample_run

from meshctl.runtime import events as ev
from meshctl.tui.state import MeshState, reduce, reduce_all


def test_run_header_fields_and_final_state(events: list[ev.Event]) -> None:
    state = reduce_all(events)
    assert (state.run_id, state.mesh, state.plan_hash) == ("r-0001", "oncology-network",
                                                           "ab12cd34ef56ab78")
    assert state.state == "completed"
    assert state.seconds == 2.0
    assert state.event_count == len(events)


def test_state_before_any_event_is_starting() -> None:
    assert MeshState().state == "starting"


def test_run_started_is_running() -> None:
    state = reduce_all(sample_run()[:1])
    assert state.state == "running"
    assert {n: d.state for n, d in state.domains.items()} == dict.fromkeys(DOMAINS, "connecting")
    assert state.jobs["malignancy"].state == "waiting"


def test_domain_states_follow_the_rounds(events: list[ev.Event]) -> None:
    def upto(kind: str, nth: int = 1) -> MeshState:
        idx = [i for i, e in enumerate(events) if e.type == kind][nth - 1]
        return reduce_all(events[: idx + 1])

    assert {d.state for d in upto("domain_joined", 3).domains.values()} == {"joined"}
    assert {n: d.state for n, d in upto("job_waiting").domains.items()} == {
        "charite": "waiting", "karolinska": "waiting", "vhio": "joined"}
    assert {d.state for d in upto("round_started").domains.values()} == {"training"}
    after_one = upto("update_received")
    assert after_one.domains["charite"].state == "evaluating"  # its update is in
    assert after_one.domains["karolinska"].state == "training"
    charite = after_one.domains["charite"]
    assert (charite.last_examples, charite.last_loss, charite.last_seconds) == (160, 0.7, 0.05)
    first_update = next(e for e in events if e.type == "update_received")
    assert (charite.last_bytes, charite.last_update_ts) == (8_836, first_update.ts)
    assert charite.products == ["charite.biopsies"]
    assert {d.state for d in upto("round_completed").domains.values()} == {"idle"}

    final = reduce_all(events)
    assert final.domains["vhio"].state == "lost"
    assert final.domains["vhio"].reason == "heartbeat timeout"
    assert final.domains["charite"].state == "done"  # the run ended: its final state


def test_lost_domain_stays_lost_until_it_rejoins() -> None:
    state = reduce_all([
        ev.DomainJoined(domain="a", ts=1.0),
        ev.DomainLost(domain="a", reason="gone"),
        ev.RoundStarted(job="j", round=1, participants=["a"]),
    ])
    assert state.domains["a"].state == "lost"
    reduce(state, ev.DomainJoined(domain="a"))
    assert state.domains["a"].state == "joined"
    reduce(state, ev.DomainRefused(domain="b", reason="unknown key"))
    assert state.domains["b"].state == "refused"


def test_job_progress_waiting_then_training_then_completed(events: list[ev.Event]) -> None:
    started = next(i for i, e in enumerate(events) if e.type == "job_waiting")
    job = reduce_all(events[: started + 1]).jobs["malignancy"]
    assert (job.state, job.waiting_have, job.quorum, job.rounds_total) == (
        "waiting", ["charite", "karolinska"], 3, 2)

    job = reduce_all(events[: started + 2]).jobs["malignancy"]
    assert (job.state, job.current_round) == ("training", 1)

    job = reduce_all(events).jobs["malignancy"]
    assert (job.state, job.current_round, job.rounds_total) == ("completed", 2, 2)
    assert job.participants == DOMAINS
    assert job.metrics == {"loss": 0.3, "accuracy": 0.82}
    assert job.checkpoint.endswith("2.safetensors")
    assert job.model_path.endswith("model.safetensors")


def test_rounds_rows(events: list[ev.Event]) -> None:
    state = reduce_all(events)
    rows = state.jobs["malignancy"].rounds
    assert [r.round for r in rows] == [1, 2]
    assert state.rounds == rows
    first = rows[0]
    assert (first.job, first.rounds, first.participants, first.train_loss) == (
        "malignancy", 2, 3, 0.7)
    assert first.metrics == {"loss": 0.6, "accuracy": 0.81}
    assert (first.bytes_in, first.bytes_out, first.seconds) == (26_508, 26_508, 0.25)


def test_decisions_and_rejections(events: list[ev.Event]) -> None:
    state = reduce_all(events)
    assert [(d.policy, d.effect, d.stage) for d in state.decisions] == [
        ("minimum-cohort", "allow", "compile"), ("fresh-data", "warn", "run")]
    assert state.rejected == 1


def test_every_event_is_logged_with_its_level_and_a_summary_closes(
        events: list[ev.Event]) -> None:
    state = reduce_all(events)
    lines = list(state.events)
    by_kind = [line for line in lines if line.kind != "summary"]
    assert [line.text for line in by_kind] == [e.message() for e in events]
    levels = {line.kind: line.level for line in by_kind}
    assert levels["domain_lost"] == "error"
    assert levels["message_rejected"] == "warning"
    assert levels["round_completed"] == "info"
    summary = [line.text for line in lines if line.kind == "summary"]
    assert summary[0] == "summary: run r-0001 completed in 2.00s"
    assert summary[1].startswith("summary: job malignancy completed, 2/2 rounds, loss=0.3000")


def test_failed_run() -> None:
    state = reduce_all(sample_run(ok=False))
    assert state.state == "failed"
    assert state.reason == "job malignancy failed"
    job = state.jobs["malignancy"]
    assert (job.state, job.reason) == ("failed", "quorum lost")
    assert [line.level for line in state.events if line.kind == "summary"] == ["error", "error"]


def test_unknown_event_type_only_goes_to_the_log() -> None:
    class Heartbeat(ev.Event):
        type = "heartbeat_seen"

    state = reduce_all([Heartbeat(seq=1)])
    assert [line.text for line in state.events] == ["heartbeat_seen"]
    assert state == reduce_all([Heartbeat(seq=1)])
    assert not state.domains and not state.jobs and state.state == "starting"


def test_same_events_give_equal_states(events: list[ev.Event]) -> None:
    assert reduce_all(events) == reduce_all(list(events))
    assert reduce_all(events) != reduce_all(events[:-1])


def test_log_keeps_every_line() -> None:
    state = reduce_all(ev.MessageRejected(sender="x", reason=str(i)) for i in range(5_000))
    assert len(state.events) == state.logged == 5_000
    assert state.events[0].index == 1 and state.events[0].domain == "x"
