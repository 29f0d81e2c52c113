"""A federated job that fails before its first round says so, as a split job does: `failed before
round 1`, not `failed in round 0` (round 0 is the join, the data checks or the resume)."""

from __future__ import annotations

from meshctl.runtime import events as ev


def test_a_job_failed_before_its_first_round_says_before_round_1() -> None:
    early = ev.JobFailed(job="malignancy", round=0, reason="domain lab: data/lab.parquet is not a parquet file")
    assert early.message() == ("job malignancy failed before round 1: "
                               "domain lab: data/lab.parquet is not a parquet file")


def test_a_job_failed_in_a_round_names_it() -> None:
    assert ev.JobFailed(job="malignancy", round=3, reason="quorum lost").message() == \
        "job malignancy failed in round 3: quorum lost"


def test_split_jobs_say_epoch_for_both() -> None:
    for number, where in ((0, "before epoch 1"), (2, "in epoch 2")):
        failed = ev.JobFailed(job="progression", round=number, reason="x")
        assert ev.in_epochs(failed, failed.message(), {"progression"}) == f"job progression failed {where}: x"
