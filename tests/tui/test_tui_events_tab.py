"""Issue 14, "Data that disappears": the Events tab keeps every event of a long run, shows them
at once, and finds joins, policy decisions and a round's events by kind, domain, job and round."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tui_events import DOMAINS, long_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.replay import ScrubReplay
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import FilteredLog
from meshctl.tui.widgets.event_filter import EventFilter, matches


def _write(path: Path, events: list[ev.Event]) -> Path:
    path.write_text("".join(e.to_json() + "\n" for e in events), encoding="utf-8")
    return path


def test_filter_fields_words_and_round_ranges() -> None:
    lines = reduce_all(long_run(8)).events
    assert [ln.kind for ln in matches(lines, "kind:domain_joined")] == ["domain_joined"] * 3
    assert {ln.domain for ln in matches(lines, "kind:policy domain:karolinska")} == {"karolinska"}
    third = matches(lines, "job:malignancy round:3")
    assert [ln.kind for ln in third] == ["round_started", "update_received", "update_received",
                                         "update_received", "round_completed", "checkpoint_written"]
    assert {ln.round for ln in matches(lines, "round:2-4 kind:round_completed")} == {2, 3, 4}
    assert [ln.text for ln in matches(lines, "kind:policy round:8")] == [
        "policy round-size allows round.malignancy.8: 3 participants"]  # round from its subject
    assert matches(lines, "type:domain_lost vhio") == matches(lines, "kind:domain_lost")
    assert EventFilter.parse("round:x") == EventFilter(("round:x",))  # not a round: a word


def test_a_400_round_run_keeps_every_event_and_filters_find_the_early_ones(tmp_path: Path) -> None:
    events = long_run(400)
    assert 2_800 <= len(events) <= 3_000
    replay = ScrubReplay(_write(tmp_path / "events.jsonl", events), speed=0)
    app = make_app(event_source=replay)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            while not replay.done:
                await pilot.pause(0.1)
            app.flush()
            await pilot.pause()
            started = time.monotonic()
            await pilot.press("5")
            log = app.query_one(FilteredLog)
            while log.shown_count < len(events) or log.region.height == 0:
                assert time.monotonic() - started < 2.0, "the Events tab took over 2 s to fill"
                await pilot.pause(0.05)
            assert len(app.mesh_state.events) >= len(events)  # nothing dropped (plus the summary lines)
            bottom = log.render_line(log.scrollable_content_region.height - 1).text
            assert "summary: job malignancy completed, 400/400 rounds" in bottom  # follows the end

            async def filtered(query: str) -> list[str]:
                await pilot.press("slash", "ctrl+u", *query)
                await pilot.pause(0.2)
                return log.plain_lines

            joins = await filtered("kind:domain_joined")
            assert [line.split()[2] for line in joins] == ["domain", "domain", "domain"]
            assert [line.split()[3] for line in joins] == DOMAINS
            top = log.render_line(0).text  # and it is on screen
            assert "domain_joined" in top and "domain charite joined" in top

            decisions = await filtered("kind:policy_decided")
            assert len(decisions) == 2 + 100  # the two at the start and one every fourth round
            mine = await filtered("kind:policy domain:vhio")
            assert len(mine) == 1 + 33 and {ln.domain for ln in log.shown} == {"vhio"}

            round_7 = await filtered("job:malignancy round:7")
            assert len(round_7) == 6 and "round 7" in round_7[0]
            assert str(log.border_subtitle).startswith(f"6 of {len(app.mesh_state.events)} matching")

    asyncio.run(run())
