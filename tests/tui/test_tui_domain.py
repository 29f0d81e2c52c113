"""The domain drill-down (enter on a domain row): products, checks, decisions, rounds, own metrics."""

from __future__ import annotations

import asyncio

from rich.console import Console
from tui_events import recorded_with_catalog, sample_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import DomainTable
from meshctl.tui.widgets.domain_screen import DomainScreen, domain_detail


def _text(sections) -> str:
    console = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for s in sections:
        console.print(s)
    return console.export_text()


def test_the_detail_is_the_domains_own_facts() -> None:
    events = recorded_with_catalog()
    state = reduce_all(events)
    text = _text(domain_detail(state, "charite"))
    assert "charite.biopsies" in text and "passed 1/2" in text
    assert "rowCount" in text and "failed (error)" in text and "100 mustBeGreaterThan 100.0" in text
    mine = [u for u in events if isinstance(u, ev.UpdateReceived) and u.domain == "charite"]
    rows = [line for line in text.splitlines() if line.startswith("malignancy ")]
    assert len(rows) == len(mine) == 15  # one row per round it contributed to, in order
    assert rows[0].split()[4:7:2] == [str(mine[0].examples), f"{mine[0].loss:.4f}"]
    assert "karolinska" not in text  # nothing of another domain
    assert _text(domain_detail(state, "nobody")).strip() == "no domain nobody in this run"


def test_decisions_and_own_metrics_are_shown() -> None:
    events = sample_run()
    done = next(i for i, e in enumerate(events) if isinstance(e, ev.RoundCompleted))
    e = events[done]
    events[done] = e.model_copy(update={"domain_metrics": {"vhio": {"accuracy": 0.75}, "charite": {"accuracy": 0.9}},
                                        "domain_examples": {"vhio": 40}})
    text = _text(domain_detail(reduce_all(events), "vhio"))
    assert "fresh-data" in text and "vhio.biopsies" in text  # the decision about its product
    assert "own metrics" in text and "0.7500" in text and "0.9000" not in text
    assert "lost" in text and "heartbeat timeout" in text


def test_enter_on_a_domain_row_opens_it_and_escape_goes_back() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            for event in recorded_with_catalog():
                app.feed(event)
            await pilot.pause()
            app.flush()
            await pilot.pause()
            app.query_one(DomainTable).focus()
            await pilot.press("down", "enter")  # the second row: karolinska
            await pilot.pause()
            assert isinstance(app.screen, DomainScreen) and app.screen.domain == "karolinska"
            assert "karolinska.biopsies" in _text(app.screen.sections)
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, DomainScreen)

    asyncio.run(run())
