"""The analysis room: the workflow of one `analyses:` entry, next to training (`meshctl analyze`).

Wait for every participant -> AnalysisStarted -> send AnalyzeIns to each -> collect one
AnalyzeRes per participant, each checked with the output gate the domains apply ->
BudgetSpent per ledger charge, PolicyDecided per refusal (a refusal aborts) -> merge
(meshctl.runtime.analytics) -> `analyses/<name>.json` -> AnalysisCompleted. Like
`Training`, it talks to domains only through the service's members and pump.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshctl.compiler.plan import Plan, PlanAnalysis
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.analytics import REPLY_TIMEOUT_S, merge, result_path
from meshctl.runtime.analytics_domain import GateError, gate
from meshctl.runtime.coordinator.collector import JobAborted, pump_until
from meshctl.runtime.coordinator.members import Members, Sink
from meshctl.runtime.transport import Clock


class Analysis:
    """One analysis run: from its participants' joining to its result file."""

    def __init__(self, plan: Plan, analysis: PlanAnalysis, members: Members, sink: Sink, clock: Clock,
                 pump: Callable[[], None], run_dir: Path, run: str, *, join_timeout_s: float):
        self.plan, self.analysis, self.members, self.sink, self.clock = plan, analysis, members, sink, clock
        self.pump, self.run_dir, self.run_id, self.join_timeout_s = pump, Path(run_dir), run, join_timeout_s
        self.replies: dict[str, wire.AnalyzeRes] = {}
        """Domain -> its gated aggregates."""

    def run(self) -> dict[str, Any]:
        """Ask, collect, merge and write the result; returns it. Raises JobAborted when it cannot finish."""
        analysis = self.analysis
        started = time.time()
        self._await(lambda: [d for d in analysis.participants if d not in self.members.peers],
                    self.join_timeout_s, "did not join within", prefix="domains ")
        self.sink.emit(ev.AnalysisStarted(analysis=analysis.name, participants=analysis.participants,
                                          metrics=[m.label for m in analysis.metrics]))
        for d in analysis.participants:
            self.members.send(self.members.peers[d], wire.AnalyzeIns(analysis=analysis.name))
        self._await(lambda: [d for d in analysis.participants if d not in self.replies],
                    REPLY_TIMEOUT_S, "within", prefix="no aggregates from ")
        self._report_ledger()
        result = merge(self.plan, analysis, self.replies)
        result.update(run=self.run_id, plan_hash=self.plan.plan.hash)
        path = result_path(self.run_dir, analysis.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        suppressed = sum(result["suppressed"]["by_domain"].values()) + result["suppressed"]["merged"]
        self.sink.emit(ev.AnalysisCompleted(analysis=analysis.name, groups=len(result["groups"]),
                                            suppressed=suppressed, result_path=str(path.relative_to(self.run_dir)),
                                            seconds=time.time() - started))
        return result

    def _await(self, missing: Callable[[], list[str]], timeout_s: float, late: str, *, prefix: str) -> None:
        """Pump until `missing()` is empty; a lost participant or the timeout aborts."""
        pump_until(missing, timeout_s, clock=self.clock, pump=self.pump, check=self._abort_if_lost,
                   aborted=lambda left: f"analysis {self.analysis.name}: {prefix}{', '.join(left)} {late} {timeout_s:.0f}s")

    def _abort_if_lost(self) -> None:
        failed = self.members.failed
        lost = [d for d in self.analysis.participants if d in failed]
        if lost:
            raise JobAborted(f"analysis {self.analysis.name}: domain {lost[0]} {failed[lost[0]]}")

    def _report_ledger(self) -> None:
        """BudgetSpent for every charge, PolicyDecided for every refusal; abort if any domain refused."""
        name = self.analysis.name
        subject = f"analysis.{name}"
        for _domain, res in sorted(self.replies.items()):
            for c in res.charges:
                self.sink.emit(ev.BudgetSpent(product=c.product, subject=subject, epsilon=c.epsilon,
                                              total=c.total, cap=c.cap))
        denials = [(d, x) for d, res in sorted(self.replies.items()) for x in res.denied]
        for domain, x in denials:
            self.sink.emit(ev.PolicyDecided(policy=x.policy, scope="analysis", subject=subject, effect="deny",
                                            reason=f"{domain}: {x.reason}", stage="run"))
        if denials:
            domain, x = denials[0]
            raise JobAborted(f"analysis {name}: domain {domain} refused ({x.policy}): {x.reason}")

    def receive(self, domain: str, msg: Any, tensors: wire.Tensors) -> bool:
        """Take one domain's AnalyzeRes (False: not a message of this room). A reply the plan does not
        allow is rejected, and its sender, a participant still owing aggregates, is lost for good."""
        if not isinstance(msg, wire.AnalyzeRes):
            return False
        analysis, problem = self.analysis, ""
        if msg.analysis != analysis.name:
            problem = f"aggregates for analysis {msg.analysis!r}, which is not running"
        elif domain not in analysis.participants or domain in self.replies:
            problem = f"unexpected or duplicate aggregates from {domain}"
        elif tensors:
            problem = "aggregates carry tensors"
        else:
            read = next(r for r in analysis.reads if r.domain == domain)
            try:
                gate(msg, self.plan, analysis, read.product)
            except GateError as err:
                problem = f"output gate: {err}"
        if problem:
            self.sink.emit(ev.MessageRejected(sender=domain, reason=problem))
            if domain in analysis.participants and domain not in self.replies:
                self.members.lose(domain, f"sent aggregates the plan does not allow ({problem})", final=True,
                                  cause="output gate")
            return True
        self.replies[domain] = msg
        return True
