"""What a checkpoint must carry besides the weights: RNG states, and whether a resume is sound.

Everything here is made of tensors, numbers, strings, lists, tuples and dicts, so a checkpoint
loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from gddist.config import Config, UserError

# Config keys that define the optimization a checkpoint belongs to. Changing one of them and
# resuming would silently continue a different run. The world size and grad_accum_steps are NOT
# here: global-batch semantics make the optimization independent of both.
RESUME_KEYS = ("seed", "data", "model", "optimizer.name")
IGNORED = ("data.eval_batch_size",)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU (and CUDA), numpy, python `random`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened RESUME_KEYS of `cfg` (e.g. {"data.batch_size": 64, ...})."""
    flat = _flatten(cfg.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if any(k == key or k.startswith(key + ".") for key in RESUME_KEYS) and k not in IGNORED
    }


def check_resumable(
    saved: dict[str, Any], cfg: Config, model: nn.Module, where: str, allow_changes: bool
) -> None:
    """Raise UserError naming the first difference that makes `saved` not resume this run."""
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = {k: tuple(v.shape) for k, v in saved["model"].items()}
    if current != before:
        diff = sorted(set(current.items()) ^ set(before.items()))[0][0]
        raise UserError(
            f"checkpoint {where} cannot be resumed: its model differs at {diff!r} "
            f"(checkpoint {before.get(diff)}, now {current.get(diff)}); use the same model "
            "settings, checkpoint.resume=never, or another hydra.run.dir"
        )
    old, new = saved["fingerprint"], fingerprint(cfg)
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    if diffs and not allow_changes:
        raise UserError(
            f"checkpoint {where} was made with other settings ({'; '.join(diffs)}), so resuming "
            "would not continue the same run; restore them, or pass checkpoint.allow_changes=true"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
