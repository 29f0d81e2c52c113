"""Pure tensor functions: models, local training, evaluation, aggregation.

Kernels import torch and nothing of meshctl; they do no I/O, keep no globals and
take explicit seeds.
"""

from meshctl.runtime.kernels.fedavg import fedavg
from meshctl.runtime.kernels.models import mlp
from meshctl.runtime.kernels.train import evaluate, train_local

__all__ = ["evaluate", "fedavg", "mlp", "train_local"]
