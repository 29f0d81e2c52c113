"""What a domain keeps of a split job after each epoch, so a resumed run takes the job up (docs/split-learning.md).

After epoch k, each part's domain writes `<its directory>/.meshctl/split/<run>/<domain>/<job>/epoch-NNNN.safetensors`
(atomically): its bottom model, its optimizer's state, the torch RNG state its modules draw from (dropout in
an entrypoint model) and, at the label owner, the top model and its optimizer's state; the metadata (JSON)
holds the job, the epoch, the plan hash, this part's standardization and a hash of the aligned rows' keys
(never sent: it lets a resumed domain refuse an intersection or data that changed). The activation noise's
generator is never kept: a resumed job draws fresh secret noise. Read with safetensors alone (no pickle,
no `torch.load`); nothing here crosses the wire.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

KEEP = 3
"""Epoch files a domain keeps per job (its newest): the coordinator records an epoch after every domain kept it."""


def job_dir(base_dir: Path, run: str, domain: str, job: str) -> Path:
    """The directory of one domain's epoch files of split job `job` in run `run`."""
    return Path(base_dir) / ".meshctl" / "split" / (run or "no-run") / domain / job


def drop(base_dir: Path, run: str, domain: str) -> None:
    """The run completed (it will not be resumed): delete this domain's epoch files of every split job of
    it; the final bottom models (`<job>.safetensors` beside them) stay."""
    import shutil

    for directory in (Path(base_dir) / ".meshctl" / "split" / (run or "no-run") / domain).glob("*/"):
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


def rows_hash(keys: list[str]) -> str:
    """sha256 of the aligned rows' keys in their order (kept locally, never sent)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def optimizer_state(opt: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, JSON-able rest) of a `torch.optim` optimizer's or kernels.train._SGD's state."""
    if hasattr(opt, "bufs"):  # kernels.train._SGD: its momentum buffers (None before the first step)
        bufs = opt.bufs
        return ({f"buf/{i}": b for i, b in enumerate(bufs)} if bufs is not None else {}), {"bufs": bufs is not None}
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for idx, values in opt.state_dict()["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{key}"] = value
            else:
                rest.setdefault(str(idx), {})[key] = value
    return tensors, {"state": rest}


def load_optimizer(opt: Any, tensors: dict[str, torch.Tensor], rest: Any) -> None:
    """Put back what `optimizer_state` took; the hyperparameters stay the plan's (the optimizer was rebuilt)."""
    if hasattr(opt, "bufs"):
        opt.bufs = [tensors[f"buf/{i}"].clone() for i in range(len(tensors))] if rest.get("bufs") else None
        return
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value.clone()
    for idx, values in (rest.get("state") or {}).items():
        state.setdefault(int(idx), {}).update(values)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def save(directory: Path, epoch: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write the state after `epoch` atomically; delete all but the KEEP newest and any of a later epoch
    (a timeline a resume went back from). Raises OSError."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**meta, "epoch": str(epoch)})
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own error for a full disk
        raise OSError(str(err)) from None
    tmp.replace(path)
    kept = sorted((int(p.stem.removeprefix("epoch-")), p) for p in directory.glob("epoch-*.safetensors")
                  if p.stem.removeprefix("epoch-").isdigit())
    for _, old in [*kept[:-KEEP], *((e, p) for e, p in kept if e > epoch)]:
        old.unlink(missing_ok=True)
    return path


def load(directory: Path, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the state after `epoch`. Raises ValueError (one line) when it is missing or damaged."""
    from safetensors import safe_open

    path = directory / f"epoch-{epoch:04d}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise ValueError(f"no state of epoch {epoch} kept") from None
    except Exception as err:  # noqa: BLE001 - a damaged file: safetensors' own error
        raise ValueError(f"the state of epoch {epoch} does not read ({type(err).__name__})") from None
    if meta.get("epoch") != str(epoch):
        raise ValueError(f"the state file of epoch {epoch} holds epoch {meta.get('epoch')!r}")
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, without it."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
