"""A small, hand-written run of events, shared by the dashboard tests."""

from __future__ import annotations

from meshctl.runtime import events as ev

DOMAINS = ["charite", "karolinska", "vhio"]


def sample_run(*, rounds: int = 2, ok: bool = True) -> list[ev.Event]:
    """A run of one job over three domains, `rounds` rounds, then the end of the run."""
    seq = iter(range(1, 10_000))
    t0 = 1_700_000_000.0

    def at() -> dict[str, float | int]:
        n = next(seq)
        return {"seq": n, "ts": t0 + n}

    out: list[ev.Event] = [
        ev.RunStarted(**at(), run="r-0001", mesh="oncology-network", plan_hash="ab12cd34ef56ab78",
                      run_dir=".meshctl/runs/r-0001", jobs=["malignancy"], domains=DOMAINS),
        ev.PolicyDecided(**at(), policy="minimum-cohort", scope="model", subject="malignancy",
                         effect="allow", reason="3 participants"),
        ev.PolicyDecided(**at(), policy="fresh-data", scope="product", subject="vhio.biopsies",
                         effect="warn", reason="data is 9 days old", stage="run"),
    ]
    out += [ev.DomainJoined(**at(), domain=d, products=[f"{d}.biopsies"], rows={"biopsies": 200})
            for d in DOMAINS]
    out += [
        ev.JobStarted(**at(), job="malignancy", participants=DOMAINS, rounds=rounds,
                      parameters=2_209, quorum=3),
        ev.JobWaiting(**at(), job="malignancy", have=DOMAINS[:2], need=3),
    ]
    for r in range(1, rounds + 1):
        out.append(ev.RoundStarted(**at(), job="malignancy", round=r, participants=DOMAINS))
        out += [ev.UpdateReceived(**at(), job="malignancy", round=r, domain=d, examples=160 + i,
                                  loss=0.7 / r + i / 100, seconds=0.05 * (i + 1), bytes=8_836)
                for i, d in enumerate(DOMAINS)]
        out.append(ev.RoundCompleted(**at(), job="malignancy", round=r, rounds=rounds,
                                     participants=DOMAINS, train_loss=0.7 / r,
                                     metrics={"loss": 0.6 / r, "accuracy": 0.8 + r / 100},
                                     bytes_in=26_508, bytes_out=3 * 8_836, seconds=0.25))
        out.append(ev.CheckpointWritten(**at(), job="malignancy", round=r,
                                        path=f".meshctl/runs/r-0001/ckpt/{r}.safetensors"))
    out.append(ev.MessageRejected(**at(), sender="vhio", reason="round 9 is not running"))
    out.append(ev.DomainLost(**at(), domain="vhio", reason="heartbeat timeout"))
    if ok:
        out.append(ev.JobCompleted(**at(), job="malignancy", rounds=rounds,
                                   metrics={"loss": 0.3, "accuracy": 0.82},
                                   model_path=".meshctl/runs/r-0001/model.safetensors",
                                   seconds=1.5))
    else:
        out.append(ev.JobFailed(**at(), job="malignancy", round=rounds, reason="quorum lost"))
    out.append(ev.RunCompleted(**at(), run="r-0001", ok=ok, seconds=2.0,
                               reason="" if ok else "job malignancy failed"))
    return out


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
"""A real `meshctl up --headless` run on the root mesh.yaml: events.jsonl and plan.toml."""

HOSPITALS = ["charite", "karolinska", "amsterdam-umc"]


def recorded() -> list[ev.Event]:
    """The recorded run's events."""
    return ev.read_events(str(FIXTURES / "events.jsonl"))


def catalog_events(ts: float = 1_795_475_096.3) -> list[ev.Event]:
    """What the runtime publishes for the catalog at run start, for the three hospitals."""
    columns = [{"name": "patient_name", "type": "string", "pii": "direct", "masking": "drop"},
               {"name": "date_of_birth", "type": "date", "pii": "indirect",
                "masking": "generalize"},
               {"name": "radius_mean", "type": "float", "pii": "none", "masking": None},
               {"name": "diagnosis", "type": "category", "pii": "none", "masking": None}]
    out: list[ev.Event] = []
    for i, d in enumerate(HOSPITALS):
        out.append(ev.ProductListed(ts=ts, product=f"{d}.biopsies", domain=d,
                                    owner=f"data@{d}.example", classification="restricted",
                                    contract="tumor-biopsy@1.0.0", columns=columns,
                                    freshness="7d", tags=["oncology"],
                                    description="Fine-needle aspirate biopsies."))
        out.append(ev.ContractChecked(ts=ts, product=f"{d}.biopsies", domain=d,
                                      contract="tumor-biopsy@1.0.0", rule="rowCount",
                                      observed=100.0 + 50 * i, operator="mustBeGreaterThan",
                                      threshold=100.0, passed=i > 0))
        out.append(ev.ContractChecked(ts=ts, product=f"{d}.biopsies", domain=d,
                                      contract="tumor-biopsy@1.0.0",
                                      rule="nullValues(radius_mean)", observed=0.0,
                                      operator="mustBeLessThan", threshold=1.0, passed=True))
    return out


def recorded_with_catalog() -> list[ev.Event]:
    """The recorded run with the catalog events put after its run_started."""
    events = recorded()
    return events[:1] + catalog_events(events[0].ts) + events[1:]


def long_run(rounds: int = 400) -> list[ev.Event]:
    """`sample_run` over `rounds` rounds, with a heartbeat every round and a round-policy
    decision every fourth (400 rounds: about 2,900 events), numbered and timed in order."""
    base = sample_run(rounds=rounds)
    out: list[ev.Event] = []
    for e in base:
        out.append(e)
        if isinstance(e, ev.RoundCompleted):
            out.append(ev.DomainHeartbeat(domain=DOMAINS[e.round % 3], state="idle"))
            if e.round % 4 == 0:
                out.append(ev.PolicyDecided(policy="round-size", scope="round",
                                            subject=f"round.malignancy.{e.round}", effect="allow",
                                            reason="3 participants", stage="runtime",
                                            domain=DOMAINS[e.round % 3]))
    t0 = 1_700_000_000.0
    return [e.model_copy(update={"seq": i, "ts": t0 + i * 0.01}) for i, e in enumerate(out, 1)]
