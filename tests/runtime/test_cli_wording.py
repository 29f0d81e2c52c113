"""Wording a reviewer found wrong: plural agreement of the run resolver's hint, the duration of a run
that logged only its failure, and the summary line of a resumed job."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshctl.errors import UserError
from meshctl.runtime import events as ev
from meshctl.runtime.launcher import RunResult, summary_lines
from meshctl.runtime.run import RunDir, RunManifest, resolve_run

T0 = 1_780_000_000.0


def _make_run(root: Path, run: str, events: list[ev.Event] = ()) -> Path:
    d = root / ".meshctl" / "runs" / run
    (d / "logs").mkdir(parents=True)
    RunManifest(run=run, run_dir=str(d), base_dir=str(root), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p", domain_keys={}).write()
    if events:
        lines = [e.model_copy(update={"seq": i, "ts": T0 + i}).to_json() for i, e in enumerate(events, 1)]
        (d / "events.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_the_hint_for_an_unknown_run_agrees_in_number(tmp_path):
    # Prepare
    _make_run(tmp_path, "20260101-000000-abcd")
    # Execute
    with pytest.raises(UserError) as err:
        resolve_run("nosuchrun", tmp_path)
    # Assert
    assert "`meshctl runs` lists the run under" in err.value.hint


def test_a_run_that_logged_only_its_failure_lasts_the_seconds_it_says(tmp_path):
    # Prepare
    d = _make_run(tmp_path, "20260101-000000-abcd",
                  [ev.RunCompleted(run="r", ok=False, seconds=5.04, reason="domains did not join")])
    # Execute / Assert
    assert RunDir(d).duration == pytest.approx(5.04)


def test_a_resumed_job_says_after_which_round_its_time_counts(tmp_path):
    # Prepare
    events = (ev.RunResumed(run="r", rounds={"digits-mlp": 12}, reason="by meshctl resume: gone"),
              ev.JobCompleted(job="digits-mlp", rounds=20, metrics={"accuracy": 0.9},
                              model_path="models/digits-mlp.safetensors", seconds=0.52))
    # Execute
    lines = summary_lines(RunResult(True, tmp_path, events=events))
    # Assert
    assert lines[0].startswith("job digits-mlp: 20 rounds (resumed after round 12) in 0.52s")



def test_headless_passed_quality_checks_are_one_line_per_product_failures_in_full() -> None:
    # Prepare
    from meshctl.runtime.launcher import headless_lines

    def check(product: str, rule: str, passed: bool = True) -> ev.ContractChecked:
        return ev.ContractChecked(product=product, domain="d", contract="c@1", rule=rule, observed=0.0,
                                  operator="mustBe", threshold=0.0, passed=passed)

    events = [check("a.x", "r1"), check("a.x", "r2"), check("a.x", "r3", passed=False), check("b.y", "r1"),
              ev.JobStarted(job="j", participants=["a", "b"], rounds=2, parameters=1, quorum=2),
              check("c.z", "r1")]
    # Execute
    lines = list(headless_lines(events))
    # Assert
    assert lines[0] == "a.x r3 observed 0 mustBe 0.0: FAILED (error)"
    assert lines[1:3] == ["a.x: 2 quality checks passed", "b.y: 1 quality check passed"]
    assert lines[-1] == "c.z: 1 quality check passed"
    assert not [line for line in lines if line.endswith(": passed")]
