"""The Rounds tab (table, contributions, plots) and the Catalog tab (search, detail)."""

from __future__ import annotations

import asyncio
import itertools

from tui_events import FIXTURES, catalog_events, recorded, recorded_with_catalog, sample_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.plan_info import load_plan
from meshctl.tui.state import lineage, product_status, reduce_all
from meshctl.tui.widgets import CatalogTable, CatalogView, ContributionTable, RoundPlot, RoundsTable


async def _fed(app, pilot, events) -> None:
    for e in events:
        app.feed(e)
    await pilot.pause()
    app.flush()
    await pilot.pause()


def test_rounds_tab_lists_rounds_plots_them_and_enter_shows_contributions() -> None:
    events = recorded()

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await _fed(app, pilot, events)
            await pilot.press("2")
            await pilot.pause()
            table = app.query_one(RoundsTable)
            assert table.row_count == 15 and app.focused is table
            assert [str(c) for c in table.get_row_at(14)][:3] == ["malignancy", "15/15", "3"]
            contrib = app.query_one(ContributionTable)
            assert contrib.round == ("malignancy", 15)  # follows the newest round
            ups = [e for e in events if e.type == "update_received" and e.round == 3]
            await pilot.press("up", "up", "up", "up", "up", "up", "up", "up", "up", "up", "up",
                              "up", "enter")  # to round 3
            await pilot.pause()
            assert contrib.round == ("malignancy", 3)
            rows = contrib.plain_rows
            assert [r[0] for r in rows] == [u.domain for u in ups]  # arrival order
            assert rows[0][1:4] == [str(ups[0].examples), f"{ups[0].loss:.4f}",
                                    f"{ups[0].update_norm:.4f}"]
            app.feed(ev.DomainHeartbeat(domain="charite"))  # new events keep the pick
            await pilot.pause(0.2)
            assert contrib.round == ("malignancy", 3)
            await pilot.click(RoundsTable, offset=(5, 2))  # the top visible row
            await pilot.click(RoundsTable, offset=(5, 2))
            await pilot.pause()
            assert contrib.round == table.selected() and contrib.round != ("malignancy", 3)
            loss = app.query_one("#loss-plot", RoundPlot)
            assert "malignancy loss" in loss.plt.build()
            accuracy = [r.metrics["accuracy"] for r in app.mesh_state.rounds]
            metric = app.query_one("#metric-plot", RoundPlot)
            assert metric.series == {"accuracy": (list(range(1, 16)), accuracy)}
            assert loss.series["train"][1] == [r.train_loss for r in app.mesh_state.rounds]

    asyncio.run(run())


def test_epsilon_column_when_budget_is_spent() -> None:
    events = sample_run(rounds=2)
    first = next(i for i, e in enumerate(events) if e.type == "round_completed")
    events.insert(first, ev.BudgetSpent(product="charite.biopsies", subject="model.malignancy",
                                        epsilon=0.5, total=0.5, cap=8.0))
    state = reduce_all(events)
    assert [r.epsilon for r in state.rounds] == [0.5, 0.5]
    assert state.products["charite.biopsies"].epsilon == 0.5

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await _fed(app, pilot, events)
            table = app.query_one(RoundsTable)
            assert [str(table.get_row_at(i)[-1]) for i in range(2)] == ["0.50", "0.50"]

    asyncio.run(run())


def test_catalog_status_lineage_and_rows_from_events() -> None:
    state = reduce_all(recorded_with_catalog())
    charite, karolinska = state.products["charite.biopsies"], state.products["karolinska.biopsies"]
    assert (charite.rows, karolinska.rows) == (259, 146)  # from domain_joined
    assert product_status(charite) == "failed" and product_status(karolinska) == "passed"
    assert lineage(state, "charite.biopsies") == ["model malignancy"]  # by domain, no plan


def test_catalog_tab_search_and_detail() -> None:
    events = recorded_with_catalog()

    async def run() -> None:
        app = make_app(plan=load_plan(FIXTURES))
        async with app.run_test(size=(120, 40)) as pilot:
            await _fed(app, pilot, events)
            await pilot.press("4")
            await pilot.pause()
            table = app.query_one(CatalogTable)
            assert app.focused is table
            rows = table.plain_rows
            assert [r[0] for r in rows] == ["charite.biopsies", "karolinska.biopsies",
                                            "amsterdam-umc.biopsies"]
            assert rows[0][1:] == ["failed 1/2", "259", "restricted", "7d", "tumor-biopsy@1.0.0",
                                   "data@charite.example", "charite"]
            assert rows[1][1] == "passed 2/2"
            view = app.query_one(CatalogView)
            text = view.detail_text
            assert "charite.biopsies" in text and "restricted" in text
            assert "patient_name" in text and "direct" in text and "drop" in text
            assert "rowCount" in text and "100" in text and "FAIL (error)" in text
            assert "read by model malignancy in this run" in text
            await pilot.press("down", "enter")
            await pilot.pause()
            assert view.detail_text.startswith("karolinska.biopsies")
            await pilot.press("slash")
            assert app.focused is app.query_one("#catalog-search")
            await pilot.press(*"amsterdam")
            await pilot.pause()
            assert [r[0] for r in table.plain_rows] == ["amsterdam-umc.biopsies"]
            assert table.border_subtitle == "1 of 3 products"
            assert view.detail_text.startswith("amsterdam-umc.biopsies")
            await pilot.press(*"zzz")
            await pilot.pause()
            assert table.row_count == 0 and "no product matches" in view.detail_text
            await pilot.press("escape")
            assert app.focused is table

    asyncio.run(run())


def test_catalog_without_product_listed_still_lists_joined_products() -> None:
    events = sample_run()

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await _fed(app, pilot, events + catalog_events()[:0])
            await pilot.press("4")
            await pilot.pause()
            rows = app.query_one(CatalogTable).plain_rows
            assert [r[0] for r in rows] == ["charite.biopsies", "karolinska.biopsies",
                                            "vhio.biopsies"]
            assert rows[0][1] == "unchecked" and rows[0][2] == "200"

    asyncio.run(run())


def test_round_ticks_are_integers_and_the_best_round_is_marked() -> None:
    from meshctl.tui.widgets.rounds_view import best_round, round_ticks

    assert round_ticks(1, 15) == [1, 5, 9, 15]  # not 13 and 15: two cells apart on a narrow plot
    for last in range(2, 401):
        ticks = round_ticks(1, last)
        step = -(-(last - 1) // 4)
        assert ticks[0] == 1 and ticks[-1] == last and len(ticks) <= 5
        assert min(b - a for a, b in itertools.pairwise(ticks)) >= step, (last, ticks)
    assert round_ticks(1, 2) == [1, 2] and round_ticks(3, 3) == [3]
    assert all(isinstance(t, int) for t in round_ticks(1, 400)) and len(round_ticks(1, 400)) <= 5
    loss = {"train": ([1, 2, 3], [0.9, 0.5, 0.4]), "test": ([1, 2, 3], [0.8, 0.3, 0.35])}
    assert best_round(loss) == (2, "test")  # the lowest test loss
    assert best_round({"accuracy": ([1, 2, 3], [0.7, 0.9, 0.8])}) == (2, "accuracy")  # the highest
    assert best_round({"mae": ([1, 2], [3.0, 2.0])}) == (2, "mae")
    assert best_round({"accuracy": ([], [])}) is None
