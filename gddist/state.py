"""What a checkpoint must carry besides the weights: RNG states, and whether a resume is sound.

A checkpoint holds the run's config (`Config.to_dict()`). Resuming compares it key by key with the
current config; `gddist.keys.kind` says what each difference means: speed keys change freely,
length and applied keys are applied (the trainer logs each and writes the new hyperparameters into
the restored optimizer and schedule), refused keys stop the resume unless
`checkpoint.allow_changes=true`.

Everything here is made of tensors, numbers, strings, lists, tuples and dicts, so a checkpoint
loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gddist import keys as config_keys
from gddist.config import Config, UserError


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


UNSET = "<unset>"  # a key one of the two configs does not have (an older schema)


@dataclass(frozen=True)
class Change:
    """One config key whose value differs between a checkpoint and this run."""

    key: str
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        """One of "speed", "length", "refused", "applied" (see gddist.keys)."""
        return config_keys.kind(self.key)

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every dotted key of two `Config.to_dict()` trees whose values differ, sorted by key. A key
    the old config lacks (a checkpoint from before the key existed) counts as its default."""
    a, b = _leaves(old), _leaves(new)
    defaults = _leaves(Config().to_dict())
    a.update({k: defaults[k] for k in b.keys() - a.keys() if k in defaults})
    return [
        Change(k, a.get(k, UNSET), b.get(k, UNSET))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, UNSET) != b.get(k, UNSET)
    ]


def check_resumable(
    saved: dict[str, Any], cfg: Config, model: nn.Module, where: str, allow_changes: bool
) -> list[Change]:
    """The config changes between checkpoint `saved` and this run, or UserError when resuming
    would not continue the same run: a model of another shape (always), or a change of a key of
    kind "refused" (unless `allow_changes`). The message names every refused key in one line."""
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = {k: tuple(v.shape) for k, v in saved["model"].items()}
    if current != before:
        diff = sorted(set(current.items()) ^ set(before.items()))[0][0]
        raise UserError(
            f"checkpoint {where} cannot be resumed: its model differs at {diff!r} "
            f"(checkpoint {before.get(diff)}, now {current.get(diff)}); use the same model "
            "settings, checkpoint.resume=never, or another hydra.run.dir"
        )
    changes = config_changes(saved["config"], cfg.to_dict())
    refused = [c for c in changes if c.kind == "refused"]
    if refused and not allow_changes:
        raise UserError(
            f"checkpoint {where} was made with other settings "
            f"({'; '.join(map(str, refused))}), so resuming would not continue the same run; "
            "restore them, or pass checkpoint.allow_changes=true"
        )
    return changes


def _leaves(config: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of a `Config.to_dict()` tree."""
    flat = config_keys.flatten({k: v for k, v in config.items() if k not in config_keys.NOT_CONFIG})
    return {k: _plain(v) for k, v in flat.items()}


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a value compares equal however it was stored."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _show(value: Any) -> str:
    """A value as it is written on the command line (null, true, 0.1, [64,64], 'sgd')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return value if value is UNSET else repr(value)


def seed_rank(seed: int, rank: int) -> None:
    """Seed every RNG the loop or user code may draw from, distinct per rank."""
    s = seed * 1000 + rank + 1
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
