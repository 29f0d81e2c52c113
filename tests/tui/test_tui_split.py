"""The dashboard replays a split-learning run (issue 15): its intersection line, its epochs as rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.replay import ScrubReplay
from meshctl.tui.widgets import FilteredLog

PARTS = ["lab", "imaging", "clinic"]


def _events() -> list[ev.Event]:
    out: list[ev.Event] = [ev.RunStarted(run="r1", mesh="vertical", plan_hash="sha256:0", run_dir="/tmp/r1",
                                         jobs=["malignancy"], domains=PARTS)]
    out += [ev.DomainJoined(domain=d, products=[f"{d}.x"]) for d in PARTS]
    out += [ev.JobStarted(job="malignancy", participants=PARTS, rounds=2, parameters=1290, quorum=3),
            ev.IntersectionComputed(job="malignancy", size=484, parties=PARTS, min_intersection=100)]
    for epoch in (1, 2):
        out += [ev.RoundStarted(job="malignancy", round=epoch, participants=PARTS),
                ev.RoundCompleted(job="malignancy", round=epoch, rounds=2, participants=PARTS, train_loss=0.3,
                                  metrics={"loss": 0.2, "accuracy": 0.9}, bytes_in=55744, bytes_out=72014,
                                  seconds=0.08)]
    out += [ev.JobCompleted(job="malignancy", rounds=2, metrics={"loss": 0.2, "accuracy": 0.9},
                            model_path="models/malignancy.top.safetensors", seconds=3.0, domains=PARTS),
            ev.RunCompleted(run="r1", ok=True, seconds=5.0)]
    return [e.model_copy(update={"seq": i + 1, "ts": 1000.0 + i}) for i, e in enumerate(out)]


def test_a_split_run_replays_with_its_intersection_and_epochs(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(e.to_json() + "\n" for e in _events()))
    replay = ScrubReplay(path, speed=0)
    app = make_app(event_source=replay)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            while not replay.done:
                await pilot.pause(0.1)
            app.flush()
            await pilot.pause()
            job = app.mesh_state.jobs["malignancy"]
            assert (job.state, job.current_round, job.rounds_total) == ("completed", 2, 2)
            await pilot.press("5")
            await pilot.press("slash", "ctrl+u", *"kind:intersection_computed")
            await pilot.pause(0.2)
            lines = app.query_one(FilteredLog).plain_lines
            assert len(lines) == 1 and "484 entities shared by lab, imaging, clinic" in lines[0]

    asyncio.run(run())
