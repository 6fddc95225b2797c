"""Resuming with changed settings: what a difference between checkpoint and config does.

`gddist.state.check_resumable` has refused what cannot continue the same run; every other
difference is applied here, each logged in one line by rank 0 (`optimizer.lr: 0.1 -> 0.01
(applied)`), speed keys at debug level only:

- optimizer and scheduler hyperparameters are written into the restored param groups and the
  schedule (`gddist.optim.apply_settings`): the lr logged after the resume is the new
  schedule's value at the resume step;
- a length change (trainer.max_steps / max_epochs) moves the end of the run, not the LR
  schedule's horizon: that stays the run's max steps at its start (saved in the checkpoint) unless
  scheduler.total_steps is set, so the LR is continuous across the resume;
- early_stopping with another monitor or mode starts counting afresh (the best value so far was
  of another metric or direction); every other key is read from the config where it is used;
- with checkpoint.allow_changes=true a refused key is applied too; another optimizer type starts
  from a fresh optimizer state, another kind of schedule (plateau <-> per-step) from a fresh
  schedule at the resume step.

When nothing differs, nothing is touched: the resume is bit-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gddist.early_stopping import STATE_KEYS as ES_STATE_KEYS
from gddist.io import truncate_jsonl
from gddist.optim import apply_settings, horizon, is_plateau
from gddist.state import Change, check_resumable, seed_rank, set_rng_state

if TYPE_CHECKING:
    from gddist.trainer import Trainer

log = logging.getLogger("gddist")

HORIZON_SCHEDULES = ("cosine", "warmup_cosine")  # the schedules whose shape depends on it


def restore(t: Trainer, path: Path) -> str | None:
    """Load checkpoint `path` into trainer `t`: refuse what cannot continue this run
    (`gddist.state.check_resumable`), restore model, engine, step, trainer state, optimizer and
    schedule, apply the changed settings, this rank's RNG states; return the tracker run id."""
    state, own = t.checkpointer.load(path)
    changes = check_resumable(
        state, t.cfg, t.engine.module, str(path), t.cfg.checkpoint.allow_changes
    )
    t.engine.module.load_state_dict(state["model"])
    t.engine.load_state_dict(state["engine"])
    t.step = t.saved_step = state["step"]
    t.early_stopping.load_state_dict(state["trainer"])
    for key, value in state["trainer"].items():
        if key not in ES_STATE_KEYS:
            setattr(t, key, value)
    apply_changes(t, state, changes)  # loads the optimizer and scheduler states
    if own is not None:
        set_rng_state(own["rng"])
    else:  # a rank the checkpoint did not have (resumed on more processes): a fresh stream
        seed_rank(t.cfg.seed + t.step, t.dist.rank)
    if t.dist.is_main:
        # Rows logged after this checkpoint by the interrupted run are replayed by this one.
        truncate_jsonl(t.run_dir / "metrics.jsonl", max_step=t.step)
        log.info(
            "run dir %s: resumed from %s at step %d (saved by %d process(es), now %d)",
            t.run_dir,
            path,
            t.step,
            state["world_size"],
            t.dist.world_size,
        )
    return state["tracker_run_id"]


def apply_changes(trainer: Trainer, saved: dict[str, Any], changes: list[Change]) -> None:
    """Load the optimizer and scheduler states of checkpoint `saved` into `trainer` (whose step
    and trainer state are already restored) and apply `changes` (see the module docstring)."""
    t, cfg, old = trainer, trainer.cfg, saved["config"]
    keys = {c.key for c in changes}
    fresh_optimizer = "optimizer.name" in keys
    if not fresh_optimizer:
        t.optimizer.load_state_dict(saved["optimizer"])
    same_schedule = (old["scheduler"]["name"] == "plateau") == is_plateau(t.scheduler)
    if same_schedule:
        t.scheduler.load_state_dict(saved["scheduler"])
    if "start_max_steps" not in saved["trainer"]:  # older checkpoints: their own max steps
        tc = old["trainer"]
        t.start_max_steps = tc["max_steps"] or tc["max_epochs"] * t.batches.steps_per_epoch
    span = horizon(cfg.scheduler, t.start_max_steps)
    retune = (
        fresh_optimizer
        or not same_schedule
        or span != horizon(cfg.scheduler, t.max_steps)  # what the scheduler was built with
        or any(k.startswith(("optimizer.", "scheduler.")) for k in keys)
    )
    if retune:
        saved_lrs = [g["lr"] for g in saved["optimizer"]["param_groups"]]
        apply_settings(
            t.optimizer,
            t.scheduler,
            cfg.optimizer,
            cfg.scheduler,
            span,
            t.step,
            old["optimizer"]["lr"],
            saved_lrs if same_schedule else None,
        )
    if keys & {"early_stopping.monitor", "early_stopping.mode"}:
        t.early_stopping.reset()
    if t.dist.is_main:
        for change in changes:
            _log(change, cfg.scheduler.name, cfg.scheduler.total_steps, span, same_schedule)


def _log(change: Change, schedule: str, total_steps: int | None, span: int, same: bool) -> None:
    kind = change.kind
    if kind == "speed":
        log.debug("%s (speed only)", change)
    elif kind == "length":
        note = ""
        if schedule in HORIZON_SCHEDULES and total_steps is None:
            note = (
                f"; the LR schedule keeps its horizon of {span} steps "
                "(scheduler.total_steps=N sets another)"
            )
        log.info("%s (applied)%s", change, note)
    elif kind == "applied":
        log.info("%s (applied)", change)
    else:
        fresh = {"optimizer.name": "; fresh optimizer state"}
        if not same:
            fresh["scheduler.name"] = "; fresh schedule from this step"
        log.warning(
            "%s (applied: checkpoint.allow_changes=true%s)", change, fresh.get(change.key, "")
        )
