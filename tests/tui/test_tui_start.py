"""`meshctl up` shows the app at once and starts the run beside it (`meshctl.tui.run._Starter`): the
header says what it is doing until the run speaks; a start that fails closes the app and is raised."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshctl.errors import UserError
from meshctl.tui import make_app
from meshctl.tui.run import StartCancelled, _Starter
from meshctl.tui.widgets import JobsPanel, RunHeader


async def _until(pilot, cond, what: str, tries: int = 200) -> None:
    for _ in range(tries):
        await pilot.pause(0.02)
        if cond():
            return
    raise AssertionError(f"never: {what}")


def _app(start):
    starter = _Starter(start)
    app = make_app(event_source=starter, ask_on_quit=True, watch=True, alive=starter.alive)
    app.mesh_state.phase = "compiling mesh.yaml"
    return app, starter


def test_the_app_says_what_up_is_doing_then_closes_on_a_failed_start() -> None:
    compiled, prepared = threading.Event(), threading.Event()

    def start(say):
        compiled.wait(10)
        say("preparing the run")
        prepared.wait(10)
        raise UserError("mesh does not compile", where="mesh.yaml")

    app, starter = _app(start)

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            header = app.query_one(RunHeader)
            await _until(pilot, lambda: "compiling mesh.yaml" in header.text, "compiling")
            assert "STARTING" in header.text
            coordinator = str(app.query_one(JobsPanel).query_one("#coordinator").render())
            assert "coordinator compiling mesh.yaml" in coordinator
            compiled.set()
            await _until(pilot, lambda: "preparing the run" in header.text, "preparing")
            prepared.set()
            await _until(pilot, lambda: app._exit, "the app closing")

    asyncio.run(run())
    with pytest.raises(UserError, match="does not compile"):
        starter.wait()


def test_closing_the_app_before_the_run_started_starts_none() -> None:
    gate = threading.Event()
    launched = []

    def start(say):
        gate.wait(10)
        say("preparing the run")  # raises: the app has closed
        launched.append(True)

    app, starter = _app(start)

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            app.exit()

    asyncio.run(run())
    gate.set()
    with pytest.raises(StartCancelled):
        starter.wait()
    assert launched == []


def test_the_quit_question_asked_while_compiling_names_the_run_once_it_has_an_id() -> None:
    from tui_events import sample_run

    from meshctl.tui.widgets import QuitDialog

    app = make_app(ask_on_quit=True, watch=True, alive=lambda: True)
    app.mesh_state.phase = "compiling mesh.yaml"

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("q")
            await _until(pilot, lambda: isinstance(app.screen, QuitDialog), "the question")
            question = app.screen.query_one("#quit-question")
            assert str(question.render()) == "The run is still going. Stop it?"
            app.apply_events(sample_run())
            app.flush()
            await _until(pilot, lambda: "has completed" in str(question.render()), "the run's end")
            assert str(question.render()) == "Run r-0001 has completed. Close the dashboard?"

    asyncio.run(run())


def test_before_its_jobs_wait_the_coordinator_line_counts_the_domains_joined() -> None:
    from tui_events import sample_run

    from meshctl.tui.state import MeshState, coordinator_status, reduce_all

    assert coordinator_status(MeshState(phase="compiling mesh.yaml")) == "compiling mesh.yaml"
    events = sample_run()
    started = [e for e in events if e.type in ("run_started", "domain_joined")]
    assert coordinator_status(reduce_all(started[:1])) == "waiting for domains 0/3"
    assert coordinator_status(reduce_all(started[:2])) == "waiting for domains 1/3"


@pytest.mark.filterwarnings("error::RuntimeWarning", "error::pytest.PytestUnraisableExceptionWarning")
# (no call posted to the closed app: Textual made its coroutine and never ran it)
def test_keep_running_answered_before_the_run_started_still_starts_it() -> None:
    """"Keep running" while `up` compiles means the same as after: the run starts, and `up` leaves
    it going (before: the close cancelled the start, so no run was left at all)."""
    from meshctl.tui.widgets import QuitDialog

    gate = threading.Event()
    launched = []

    def start(say):
        gate.wait(10)
        say("preparing the run")  # raised StartCancelled before the fix
        launched.append(True)
        return "the run"

    app, starter = _app(start)

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("q")
            await _until(pilot, lambda: isinstance(app.screen, QuitDialog), "the question")
            await pilot.press("k")
            await _until(pilot, lambda: app._exit, "the app closing")

    asyncio.run(run())
    assert app.quit_choice == "detach"
    gate.set()
    assert starter.wait() == "the run"
    assert launched == [True]
