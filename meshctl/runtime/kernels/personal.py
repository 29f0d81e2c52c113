"""Personalisation in a domain: local layers (FedPer) and fine-tuning of the final model.

A job with `personalization.local` splits its model's state in two: the shared
tensors (the plan's `tensors`, the only ones on the wire) and the local ones
(`personalization.local_tensors`), which each domain keeps in its own model
object from round to round. Loading the global weights replaces the shared
tensors and leaves the local ones as this domain trained them; an update carries
the shared tensors only. Evaluation then scores this domain's personal model.

`fine_tune_epochs` trains each domain's final model further on its own training
rows after the last round. What leaves the domain are holdout metric sums before
and after (`meshctl.runtime.kernels.metrics.eval_stats`), never the model: the
daemon writes the personal model under the domain's own directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from meshctl.runtime.kernels.train import train_local

if TYPE_CHECKING:
    from meshctl.compiler.plan import PlanJob


def local_names(job: PlanJob) -> set[str]:
    """Names of the tensors each domain keeps (empty without `personalization.local`)."""
    personal = job.personalization
    return {t.name for t in personal.local_tensors} if personal is not None else set()


def load_shared(model: nn.Module, weights: dict[str, torch.Tensor], job: PlanJob) -> None:
    """Load the global shared `weights` into `model`, keeping its local tensors as they are."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    local = local_names(job)
    if unexpected or set(missing) - local:
        raise ValueError(f"weights do not match the model: missing {sorted(set(missing) - local)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")


def shared_state(model: nn.Module, job: PlanJob) -> dict[str, torch.Tensor]:
    """What an update carries: the plan's shared tensors, copied, in plan order."""
    state = model.state_dict()
    return {t.name: state[t.name].detach().clone() for t in job.tensors}


def fine_tune(model: nn.Module, job: PlanJob, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> float:
    """Train `model` `fine_tune_epochs` epochs on (x, y) with the job's training settings (at
    `fine_tune_lr` when given); returns the last epoch's mean loss."""
    personal, t = job.personalization, job.training
    assert personal is not None
    return train_local(model, x, y, epochs=personal.fine_tune_epochs, batch_size=t.batch_size,
                       optimizer=t.optimizer, lr=personal.fine_tune_lr or t.lr, momentum=t.momentum,
                       weight_decay=t.weight_decay, shuffle_seed=seed, loss=job.loss_name,
                       huber_delta=job.huber_delta or 1.0)
