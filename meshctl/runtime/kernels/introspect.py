"""The subprocess that tells the compiler what an entrypoint model is.

Reads a JSON request on stdin (`root`, `entrypoint`, `args`, `input_shape`, `output_dim`),
imports the factory with `root` first on sys.path, builds the module, runs it once on
zeros, and prints one JSON line: `{"tensors": [{name, shape, dtype}], "parameters": n, "output_dim": k}`
(`output_dim` null in the request: the factory gets None and k is read from its [2, k] output),
or `{"code": "MESH5xx", "error": "<one line>"}`. Run as
`python -m meshctl.runtime.kernels.introspect`; the compiler itself never imports torch.
"""

from __future__ import annotations

import json
import sys
from typing import Any

MARK = "meshctl-introspect: "
"""Prefix of the answer line on stdout."""


class Refused(Exception):
    """The model cannot be used; `code` is its diagnostic."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def describe(request: dict[str, Any]) -> dict[str, Any]:
    """The model's state tensors and parameter count, or raise Refused."""
    import torch

    from meshctl.runtime.kernels.models import FLOAT_ONLY_HINT, load_factory

    torch.set_num_threads(1)
    shape = list(request["input_shape"])
    output_dim = None if request["output_dim"] is None else int(request["output_dim"])  # None: learned (split bottoms)
    try:
        factory = load_factory(request["entrypoint"], request["root"])
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to see, in one line
        raise Refused("MESH505", str(err) if isinstance(err, LookupError) else f"cannot import: {_line(err)}") from None
    torch.manual_seed(0)
    try:
        module = factory(shape, output_dim, **request["args"])
    except Exception as err:  # noqa: BLE001
        raise Refused("MESH505", f"the factory raised {_line(err)}") from None
    if not isinstance(module, torch.nn.Module):
        raise Refused("MESH505", f"the factory returned {type(module).__name__}, not a torch.nn.Module")
    state = module.state_dict()
    if not state:
        raise Refused("MESH505", "the model has no parameters")
    for name, value in state.items():
        if value.dtype != torch.float32:
            raise Refused("MESH517", f"state '{name}' is {str(value.dtype).removeprefix('torch.')}; "
                                     f"only float32 state is federated ({FLOAT_ONLY_HINT})")
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception as err:  # noqa: BLE001
        raise Refused("MESH519", f"forward on a {[2, *shape]} input failed: {_line(err)}") from None
    if output_dim is None and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 2 \
            and out.shape[1] >= 1:
        output_dim = int(out.shape[1])
    if output_dim is None:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise Refused("MESH576", f"forward on a {[2, *shape]} input gave {got}, not [2, k] activations")
    if not isinstance(out, torch.Tensor) or list(out.shape) != [2, output_dim]:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise Refused("MESH519", f"forward on a {[2, *shape]} input gave {got}, not [2, {output_dim}] "
                                 f"(output_dim {output_dim})")
    tensors = [{"name": n, "shape": list(v.shape), "dtype": "float32"} for n, v in state.items()]
    answer: dict[str, Any] = {"tensors": tensors, "parameters": sum(v.numel() for v in state.values()),
                              "output_dim": output_dim}
    mixing = [n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if mixing:  # layers without per-example gradients: DP-SGD cannot train the model (MESH534)
        answer["batch_norm"] = mixing
    return answer


def main() -> None:
    try:
        answer = describe(json.loads(sys.stdin.read()))
    except Refused as err:
        answer = {"code": err.code, "error": str(err)}
    print(f"\n{MARK}{json.dumps(answer)}", flush=True)  # on its own line, whatever the module printed


if __name__ == "__main__":
    main()
