"""A finished run dir read back: its config, its model with trained weights, its data.

The contract the after-training commands (evaluate, predict, explain) build on:

- `RUN_DIR/config.json`: the run's resolved, validated config (`Config.to_dict()`), written by
  the trainer with summary.json at the end of every run.
- `RUN_DIR/model.pt`: the final weights (a plain state_dict); a checkpoint directory holds the
  weights of its step under `state.pt["model"]`.
- `RUN_DIR/preprocessing.json`: how raw tabular columns become model inputs.

`load(run_dir, weights, overrides)` rebuilds the model exactly as the run built it (the data
decides its sizes) and loads the weights, with `weights_only=True`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gddist.config import Config, UserError

CONFIG = "config.json"


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: nn.Module  # on CPU, in eval mode
    data: Any  # the source gddist.data.build made for cfg (tabular, npy or dataset)


def config(run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The run's config dict with dotted `key=value` overrides applied (values parsed as YAML,
    so data.path=new.csv, data.val_fraction=0.3 and model.dropout=0 all do what they say)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(
            f"{run_dir} has no {CONFIG}: it is not a finished gddist run dir (or was trained by "
            "a gddist that did not write one); train it (again) to completion first"
        )
    cfg = json.loads(path.read_text())
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} must be key=value, e.g. data.path=new.csv")
        node = cfg
        *parents, leaf = key.lstrip("+").split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"override {override!r}: the run's config has no section {part!r}")
            node = node[part]
        if leaf not in node and not key.startswith("+"):
            raise UserError(
                f"override {override!r}: the run's config has no key {key.lstrip('+')!r} (add it "
                f"with +{key})"
            )
        node[leaf] = yaml.safe_load(raw) if raw else None
    return cfg


def best_path(run_dir: Path) -> Path:
    """checkpoint.save_best's file of a run: best.pt in its checkpoint dir."""
    ck = json.loads((Path(run_dir) / CONFIG).read_text()).get("checkpoint", {})
    return (Path(ck["dir"]) if ck.get("dir") else Path(run_dir) / "checkpoints") / "best.pt"


def weights(run_dir: Path, which: str = "final") -> dict[str, torch.Tensor]:
    """The state_dict of `which`: "final" (model.pt), "best" (checkpoint.save_best's best.pt)
    or a checkpoint directory's path."""
    from gddist.checkpoint_files import STATE, CorruptCheckpoint, safe_load, verify

    if which == "best":
        path = best_path(run_dir)
        if not path.is_file():
            raise UserError(
                f"{path} does not exist: the run was trained without checkpoint.save_best "
                "(pass checkpoint.save_best=val/<metric> when training), or use --checkpoint final"
            )
        try:
            return safe_load(path)["model"]
        except (CorruptCheckpoint, OSError, KeyError) as e:
            raise UserError(f"{path} cannot be used: {e}") from None
    if which == "final":
        path = Path(run_dir) / "model.pt"
        if not path.is_file():
            raise UserError(
                f"{path} does not exist: the run did not finish (resume it to completion), or "
                "name a checkpoint directory instead"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
    path = Path(which)
    if not path.exists():
        raise UserError(
            f"checkpoint {path} does not exist; pass final, best, a checkpoint directory "
            "(RUN_DIR/checkpoints/step_*) or a weights file"
        )
    if path.is_file():  # a state_dict file (model.pt) or a best.pt
        try:
            state = safe_load(path)
        except CorruptCheckpoint as e:
            raise UserError(f"checkpoint {path} cannot be used: {e}") from None
        return state["model"] if isinstance(state, dict) and "model" in state else state
    try:
        verify(path)
        return safe_load(path / STATE)["model"]
    except (CorruptCheckpoint, OSError, KeyError) as e:
        raise UserError(f"checkpoint {path} cannot be used: {e}") from None


def load(run_dir: Path, which: str = "final", overrides: Sequence[str] = ()) -> LoadedRun:
    """The run's model with the weights of `which`, its config (with `overrides`) and data."""
    from gddist import data as data_mod

    cfg = Config.from_dict(config(run_dir, overrides))
    data = data_mod.build(cfg.data, cfg.seed, loss=cfg.loss.name, metrics=cfg.metrics.name)
    model = build_model(run_dir, cfg, data.num_features, data.num_outputs, which)
    return LoadedRun(Path(run_dir), cfg, model, data)


def build_model(
    run_dir: Path, cfg: Config, num_features: int | None, num_outputs: int | None, which: str
) -> nn.Module:
    """The model of `cfg` with the given sizes and the weights of `which`, on CPU, in eval mode
    (for callers that know the sizes without reading the training data, e.g. from
    preprocessing.json)."""
    from gddist import models

    torch.manual_seed(cfg.seed)  # as the trainer: a model whose init draws stays reproducible
    model = models.build(cfg.model, num_features, num_outputs)
    state = weights(run_dir, which)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"the weights of {which} do not fit the model of {run_dir}'s config: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return model.eval()
