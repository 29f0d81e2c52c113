"""What a domain carries across a job's rounds, kept on its own disk so a resumed run takes it up.

SCAFFOLD's control variate c_i and top-k compression's error-feedback residual live in the
daemon's memory; after each round it trains, the daemon writes them (safetensors, atomically)
to `<its directory>/.meshctl/state/<run>/<domain>/<job>/round-NNNN.safetensors`, before its
update leaves. A new daemon of the same run (the coordinator was resumed from its checkpoint
of round r, or the daemon itself was restarted) reads the newest file of a round <= r, never
a later one: the state as it was when the round it trains next began. Nothing here crosses
the wire; the file is this domain's own (never a peer's bytes), read by safetensors alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meshctl.compiler.plan import PlanJob

CONTROL = "control/"
RESIDUAL = "residual/"
LOCAL = "local/"
KEEP = 3
"""State files a domain keeps per job (its newest): a resume goes back to the coordinator's newest
checkpoint, written a round or two behind at most; older files are deleted."""


def carried(job: PlanJob) -> bool:
    """Whether a domain keeps state of `job` across rounds: SCAFFOLD's c_i (not under secure aggregation,
    MESH549), top-k's residual, or personalisation's local layers."""
    scaffold = job.aggregation.strategy == "scaffold" and not job.privacy.secure_aggregation
    local = job.personalization is not None and bool(job.personalization.local_tensors)
    return scaffold or local or (job.compression is not None and job.compression.kind == "topk")


def local_state(model: torch.nn.Module, job: PlanJob) -> dict[str, torch.Tensor]:
    """The tensors of `model` that personalisation keeps in the domain (none without local layers)."""
    if job.personalization is None or not job.personalization.local_tensors:
        return {}
    state = model.state_dict()
    return {t.name: state[t.name] for t in job.personalization.local_tensors}


def job_dir(base_dir: Path, run: str, domain: str, job: str) -> Path:
    """The directory of one domain's state files of `job` in run `run` (local domains of one mesh share
    `base_dir`: the domain names it)."""
    return base_dir / ".meshctl" / "state" / (run or "no-run") / domain / job


def save(directory: Path, rnd: int, control: dict[str, torch.Tensor], residual: dict[str, torch.Tensor],
         local: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the state after round `rnd` (atomically: a killed process leaves the old file or the new one);
    delete all but the KEEP newest, and any of a later round. Raises OSError."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{rnd:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    tensors = {**{CONTROL + k: v for k, v in control.items()}, **{RESIDUAL + k: v for k, v in residual.items()},
               **{LOCAL + k: v for k, v in (local or {}).items()}}
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"round": str(rnd)})
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own error for a full disk
        raise OSError(str(err)) from None
    tmp.replace(path)
    rounds = _rounds(directory)  # (files of later rounds are a timeline a resume went back from)
    for _, old in [*rounds[:-KEEP], *((r, p) for r, p in rounds if r > rnd)]:
        old.unlink(missing_ok=True)
    return path


def _rounds(directory: Path) -> list[tuple[int, Path]]:
    """(round, path) of the state files in `directory`, oldest first."""
    return sorted((int(p.stem.removeprefix("round-")), p) for p in directory.glob("round-*.safetensors")
                  if p.stem.removeprefix("round-").isdigit())


def newest(directory: Path, last: int) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                dict[str, torch.Tensor]] | None:
    """(round, control, residual, local layers) of the newest state file of a round <= `last`; None when
    there is none.
    Raises ValueError when that file does not read (an older one would be the wrong state)."""
    from safetensors import safe_open

    kept = [(r, p) for r, p in _rounds(directory) if r <= last]
    if not kept:
        return None
    rnd, path = kept[-1]
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # noqa: BLE001 - a damaged file
        raise ValueError(f"cannot read {path}: {err}") from None
    control = {k.removeprefix(CONTROL): v for k, v in tensors.items() if k.startswith(CONTROL)}
    residual = {k.removeprefix(RESIDUAL): v for k, v in tensors.items() if k.startswith(RESIDUAL)}
    local = {k.removeprefix(LOCAL): v for k, v in tensors.items() if k.startswith(LOCAL)}
    return rnd, control, residual, local
