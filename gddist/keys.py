"""What each config key means to a run: one table for the run dir's identity and for resume.

Every key of the resolved config (dotted, e.g. `optimizer.lr`) is of exactly one kind:

- SPEED: how fast, how visibly or where a run goes, never which optimization it computes
  (DataLoader workers, logging, checkpoint cadence, the engine, the device, gradient accumulation:
  global-batch semantics make the optimization independent of the micro-batch split). They change
  freely, on a rerun and on resume, and are not part of the run's identity.
- LENGTH: how long the run trains (`trainer.max_steps`, `trainer.max_epochs`). Not part of the
  identity, so that rerunning with a larger `trainer.max_steps` continues the run; on resume the
  change is applied and logged (the LR schedule keeps the horizon the run started with).
- REFUSED: what the run *is* (its data, model, loss, seed, global batch, optimizer and scheduler
  type). Part of the identity; resuming a checkpoint with another value is refused in one line
  unless `checkpoint.allow_changes=true`.
- APPLIED: every other key (optimizer and scheduler hyperparameters, clipping, penalties, ...).
  Part of the identity; resuming with another value (possible only with an explicit run dir)
  applies it and logs `key: old -> new (applied)`.

A prefix names a whole section (`logger` covers `logger.progress`, ...). The first match in the
order SPEED, LENGTH, REFUSED wins, so `data.num_workers` is SPEED although `data` is REFUSED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SPEED = (
    "data.loader",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.eval_batch_size",
    "logger",
    "trainer.log_every",
    "trainer.stop_check_every",
    "trainer.stop_check_s",
    "trainer.grad_accum_steps",
    "trainer.compile",
    "trainer.compile_backend",
    "checkpoint",
    "engine",
    "dist",
    # Which val/* metrics are computed changes what is measured, not the weights. What early
    # stopping watches is early_stopping.monitor (REFUSED/APPLIED, so in the identity); redefining
    # the watched extra metric itself on resume is the user's call, like changing the val split.
    "metrics",
    # What the run reports to a hyperparameter sweeper (gddist/hparams.py), not what it trains.
    "optimized_metric",
)
LENGTH = ("trainer.max_steps", "trainer.max_epochs")
REFUSED = ("seed", "data", "model", "loss", "optimizer.name", "scheduler.name")
# Not part of a run's config at all: Hydra's own node and the experiment preset's name (the
# preset's values are already merged into the other keys).
NOT_CONFIG = ("hydra", "experiment")


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def kind(key: str) -> str:
    """ "speed" | "length" | "refused" | "applied" for a dotted config key."""
    if _matches(key, SPEED):
        return "speed"
    if _matches(key, LENGTH):
        return "length"
    if _matches(key, REFUSED):
        return "refused"
    return "applied"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened keys of a resolved config that make the run what it is (REFUSED and APPLIED
    kinds): two configs with equal identities are the same run.

    A key whose value is the schema's default is left out, so that a key added to the schema
    later (at a default that keeps today's behaviour) does not change the identity, and with it
    the run dir, of every existing command."""
    from gddist.config import Config  # the schema's defaults; config never imports this module

    defaults = flatten(Config().to_dict())
    flat = flatten({k: v for k, v in config.items() if k not in NOT_CONFIG})
    return {
        k: v
        for k, v in sorted(flat.items())
        if kind(k) in ("refused", "applied") and not (k in defaults and defaults[k] == v)
    }
