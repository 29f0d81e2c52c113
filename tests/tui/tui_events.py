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
