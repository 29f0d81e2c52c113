"""Round policies over a split job's activations and gradients (docs/governance.md, "Round policies of split
jobs"): real CEL policies in examples/vertical's mesh.yaml, the real SplitDomains over its data and the
coordinator on the in-memory hub. The coordinator decides the global ones before each relay; each part's
domain decides the global and its own local ones on what it sends and receives. A deny fails the job in
one line naming the policy, the epoch, the batch, the domain and the norm."""

from __future__ import annotations

import re

import pytest
from sinks import ListSink
from test_split_resume_room import SGD, _coordinator, _mesh

from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import JobAborted

ONE_EPOCH = ("epochs: 3", "epochs: 1")


def _policies(text: str) -> tuple[str, str]:
    """An edit that puts `text` (YAML list items) under a top-level `policies:`."""
    return ("split_models:", f"policies:\n{text}split_models:")


def _lab_policy(text: str) -> tuple[str, str]:
    """An edit that gives the lab domain its own (local) policies."""
    return ('  - {name: lab, description: "cytology lab: nucleus measurements, means"}',
            f'  - name: lab\n    description: "cytology lab"\n    policies:\n{text}')


def test_a_global_bound_on_activation_norms_is_decided_by_the_member_before_they_leave(tmp_path):
    """A global round policy is decided by each part's domain too (as a federated one): the lab's own activations
    are denied in the lab, before they cross."""
    plan = _mesh(tmp_path, SGD, ONE_EPOCH, _policies(
        "  - name: bounded-activations\n    scope: round\n    when: round.kind == \"split\"\n"
        "    require: round.activations.all(a, a.max_row_norm <= 0.01)\n    message: activations too large\n"))
    sink = ListSink()
    with pytest.raises(JobAborted) as err:
        _coordinator(tmp_path, plan, sink, checkpoint=False)._work()
    line = str(err.value)
    assert re.fullmatch(r"split job malignancy: domain lab refused: round policy bounded-activations denies epoch 1 "
                        r"batch 1: the activations of lab \(32 rows, norm [0-9.]+, max row norm [0-9.]+\): "
                        r"activations too large", line), line
    denied = [e for e in sink.of(ev.PolicyDecided) if e.effect == "deny"]  # (the imaging centre's too: both send)
    assert (denied[0].policy, denied[0].scope, denied[0].subject, denied[0].stage, denied[0].domain) == (
        "bounded-activations", "round", "round.malignancy.1", "runtime", "lab")
    assert not sink.of(ev.RoundCompleted)


def test_the_coordinator_decides_a_global_policy_on_every_relay_before_it_forwards_it(tmp_path):
    """A policy over what only the coordinator sees (both members' activations): each member allows its own,
    the coordinator denies the batch before the label owner gets it."""
    plan = _mesh(tmp_path, SGD, ONE_EPOCH, _policies(
        "  - name: one-sender\n    scope: round\n    when: round.kind == \"split\"\n"
        "    require: size(round.activations) <= 1\n    message: one part at a time\n"))
    sink = ListSink()
    with pytest.raises(JobAborted, match=r"^split job malignancy: round policy one-sender denies epoch 1 batch 1: "
                                         r"one part at a time$"):
        _coordinator(tmp_path, plan, sink, checkpoint=False)._work()
    (denied,) = [e for e in sink.of(ev.PolicyDecided) if e.effect == "deny"]
    assert (denied.policy, denied.domain, denied.subject) == ("one-sender", "", "round.malignancy.1")


def test_a_bound_the_clip_keeps_lets_the_job_train_and_a_warn_is_one_event_per_epoch(tmp_path):
    plan = _mesh(tmp_path, SGD, ("epochs: 3", "epochs: 2"),
                 ("min_intersection: 100", "min_intersection: 100\n    activations: {clip: 3.0}"), _policies(
                     "  - name: clipped\n    scope: round\n    when: round.kind == \"split\"\n"
                     "    require: round.activations.all(a, a.max_row_norm <= 3.0 + 1e-6)\n"
                     "  - name: small-gradients\n    scope: round\n    effect: warn\n"
                     "    when: round.kind == \"split\" && round.batch > 0\n"
                     "    require: round.gradients.all(g, g.max_row_norm < 1e-9)\n"
                     "  - name: three-per-round\n    scope: round\n    require: size(round.participants) >= 5\n"))
    sink = ListSink()
    _coordinator(tmp_path, plan, sink, checkpoint=False)._work()
    assert sink.of(ev.JobCompleted)  # (three-per-round does not test round.kind: federated rounds only)
    warns = [e for e in sink.of(ev.PolicyDecided) if e.effect == "warn"]
    assert [(e.policy, e.subject) for e in warns] == [("small-gradients", "round.malignancy.1"),
                                                      ("small-gradients", "round.malignancy.2")]
    assert re.match(r"round policy small-gradients warns on epoch 1 batch 1: ", warns[0].reason), warns[0].reason
    assert not [e for e in sink.of(ev.PolicyDecided) if e.effect == "deny"]


def test_a_bound_on_gradients_names_the_member_whose_gradient_it_denies(tmp_path):
    """The label owner decides on the gradients it returns, before they leave it."""
    plan = _mesh(tmp_path, SGD, ONE_EPOCH, _policies(
        "  - name: bounded-gradients\n    scope: round\n    when: round.kind == \"split\"\n"
        "    require: round.gradients.all(g, g.domain != \"imaging\" || g.norm < 1e-9)\n"))
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain clinic refused: round policy "
                                         r"bounded-gradients denies epoch 1 batch 1: the gradient of imaging \(32 rows, norm [0-9.e-]+, max row norm "
                                         r"[0-9.e-]+\): requires "):
        _coordinator(tmp_path, plan, ListSink(), checkpoint=False)._work()


def test_a_domain_decides_its_own_local_bound_before_its_activations_leave(tmp_path):
    plan = _mesh(tmp_path, SGD, ONE_EPOCH, _lab_policy(
        "      - name: own-bound\n        scope: round\n        when: round.kind == \"split\"\n"
        "        require: round.activations.all(a, a.max_row_norm <= 0.01)\n"))
    sink = ListSink()
    with pytest.raises(JobAborted) as err:
        _coordinator(tmp_path, plan, sink, checkpoint=False)._work()
    line = str(err.value)
    assert re.fullmatch(r"split job malignancy: domain lab refused: round policy lab.own-bound denies epoch 1 batch 1: "
                        r"the activations of lab \(32 rows, norm [0-9.]+, max row norm [0-9.]+\): requires .*",
                        line), line
    (denied,) = [e for e in sink.of(ev.PolicyDecided) if e.effect == "deny"]
    assert (denied.policy, denied.domain, denied.subject) == ("lab.own-bound", "lab", "round.malignancy.1")
