"""Per-step cost of DP-SGD (meshctl.runtime.kernels.privacy) next to plain training, one thread.

For an MLP: plain minibatch SGD, DP-SGD by the Linear-stack shortcut (what an MLP takes: per-example
gradient norms from |g|·|a|, no per-example gradients), and DP-SGD by the general torch.func path
(vmap of grad, what any other module takes) forced on the same MLP. For the CNN of
examples/digits-cnn: plain and DP-SGD (torch.func). Each figure is the best of 5 epochs, divided
by the epoch's expected steps; the first call (which imports torch._dynamo for torch.func) is not
counted.

    python benchmarks/dp_step_cost.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from meshctl.runtime.kernels import mlp, privacy
from meshctl.runtime.kernels.privacy import dp_train_local, steps_per_epoch
from meshctl.runtime.kernels.train import train_local

ROOT = Path(__file__).resolve().parents[1]


def best(fn: Callable[[], object], reps: int = 5) -> float:
    fn()  # warm: imports, allocator
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return min(out)


def case(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
         general_too: bool) -> None:
    steps = steps_per_epoch(len(x), batch)
    plain = best(lambda: train_local(model, x, y, epochs=1, batch_size=batch, lr=0.01))
    dp = best(lambda: dp_train_local(model, x, y, epochs=1, batch_size=batch, lr=0.01, clip=1.0, sigma=1.0,
                                     seed=0))
    line = f"{name:38s} batch {batch:3d}: plain {plain / steps * 1e3:6.2f} ms/step  DP-SGD {dp / steps * 1e3:6.2f}"
    if general_too:
        shortcut = privacy._linear_stack
        privacy._linear_stack = lambda m: None  # type: ignore[assignment]
        try:
            general = best(lambda: dp_train_local(model, x, y, epochs=1, batch_size=batch, lr=0.01, clip=1.0,
                                                  sigma=1.0, seed=0))
        finally:
            privacy._linear_stack = shortcut  # type: ignore[assignment]
        line += f" (Linear shortcut)  torch.func {general / steps * 1e3:6.2f}"
    else:
        line += " (torch.func)"
    print(line + " ms/step")


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    case("mlp 64 -> [32] -> 10", mlp(64, [32], 10), x, y, 32, True)
    case("mlp 64 -> [128] -> 10 (digits example)", mlp(64, [128], 10), x, y, 32, True)
    case("mlp 64 -> [128, 64] -> 10", mlp(64, [128, 64], 10), x, y, 64, True)
    sys.path.insert(0, str(ROOT / "examples" / "digits-cnn"))
    from digits_cnn.model import build

    torch.manual_seed(0)
    images = torch.rand(1024, 1, 8, 8, generator=g)
    case("cnn digits-cnn (channels 16)", build([1, 8, 8], 10, channels=16), images, y, 32, False)


if __name__ == "__main__":
    main()
