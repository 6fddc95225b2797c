"""Optimizers, learning-rate schedules and the L1/L2 penalties.

Schedules are stepped once per optimizer step (never per micro-batch), identically on every rank;
`plateau` is the one exception: it steps at each evaluation on the global val/loss, which every rank
computes alike.

A schedule's horizon (the steps a cosine spans) is `scheduler.total_steps`, or by default the run's
max steps when it STARTED: a resume with a larger trainer.max_steps keeps the LR continuous.
`apply_settings` makes a restored optimizer and schedule follow changed hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gddist.config import OptimizerConfig, RegularizationConfig, SchedulerConfig


def build_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    wd = cfg.weight_decay
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd
        )
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd
        )
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, weight_decay=wd
        )
    raise AssertionError(cfg.name)  # names are validated in config.py


def lr_factor(cfg: SchedulerConfig, lr: float, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base lr used by optimizer step `step` (0-based)."""
    warmup = cfg.warmup_steps
    floor = min(cfg.min_lr / lr, 1.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        after = step - warmup
        if cfg.name == "step":
            return cfg.gamma ** (after // cfg.step_size)
        if cfg.name in ("cosine", "warmup_cosine"):
            progress = min(after / max(1, total_steps - warmup), 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0  # constant

    return factor


def build_scheduler(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=cfg.factor,
            patience=cfg.patience,
            threshold=cfg.threshold,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, base_lr, total_steps))


def horizon(cfg: SchedulerConfig, start_max_steps: int) -> int:
    """The optimizer steps the schedule spans: scheduler.total_steps, else the run's max steps
    when it started (`start_max_steps`, kept across resumes)."""
    return cfg.total_steps or start_max_steps


def group_settings(cfg: OptimizerConfig) -> dict[str, Any]:
    """The optimizer hyperparameters a param group can hold, besides the lr (each optimizer type
    has only some of them: `apply_settings` writes those its groups have)."""
    return {
        "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "betas": tuple(cfg.betas),
        "eps": cfg.eps,
        "alpha": cfg.alpha,
    }


def apply_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    opt_cfg: OptimizerConfig,
    sched_cfg: SchedulerConfig,
    total_steps: int,
    step: int,
    old_lr: float,
    saved_lrs: list[float] | None,
) -> None:
    """Make an optimizer and a scheduler restored from a checkpoint at optimizer step `step`
    follow `opt_cfg` / `sched_cfg` (same optimizer type) from that step on.

    The param groups get the new hyperparameters, the schedule the new base lr and horizon: the
    next step runs at the new schedule's lr for `step`. For plateau: the new base lr times the
    reductions made so far (`saved_lrs`, the checkpoint's group lrs, over `old_lr`, the base lr
    they were reduced from; None: no reductions, a plateau that starts now). Optimizer state is
    kept; a state entry the new settings need (RMSprop's momentum buffer when momentum was 0)
    starts at zero. Call it only when a setting changed: it recomputes the lr even if not.
    """
    settings = group_settings(opt_cfg)
    for group in optimizer.param_groups:
        group.update({k: v for k, v in settings.items() if k in group})
        if group.get("momentum", 0) > 0 and "alpha" in group:  # RMSprop reads the buffer blindly
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
    groups = optimizer.param_groups
    if is_plateau(scheduler):
        scheduler.factor, scheduler.patience = sched_cfg.factor, sched_cfg.patience
        scheduler.threshold = sched_cfg.threshold
        for group, saved in zip(groups, saved_lrs or [old_lr] * len(groups), strict=True):
            group["lr"] = saved if opt_cfg.lr == old_lr else opt_cfg.lr * (saved / old_lr)
    else:
        factor = lr_factor(sched_cfg, opt_cfg.lr, total_steps)
        scheduler.lr_lambdas = [factor] * len(groups)
        scheduler.base_lrs = [opt_cfg.lr] * len(groups)
        scheduler.last_epoch = step  # also when the old schedule was constant (never stepped)
        for group in groups:
            group["initial_lr"] = opt_cfg.lr
            group["lr"] = opt_cfg.lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in groups]


def is_plateau(scheduler: object) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def is_constant(cfg: SchedulerConfig) -> bool:
    """True when the LR never changes (scheduler=constant without warmup)."""
    return cfg.name == "constant" and not cfg.warmup_steps


class Penalty:
    """l1 * sum|w| + (l2 / 2) * sum w^2 over weight matrices; None when both are zero."""

    def __init__(self, cfg: RegularizationConfig, weights: list[nn.Parameter]) -> None:
        self.l1, self.l2 = cfg.l1, cfg.l2
        self.weights = weights

    @property
    def active(self) -> bool:
        return (self.l1 > 0 or self.l2 > 0) and bool(self.weights)

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), device=self.weights[0].device)
        if self.l1 > 0:
            total = total + self.l1 * sum(w.abs().sum() for w in self.weights)
        if self.l2 > 0:
            total = total + 0.5 * self.l2 * sum(w.pow(2).sum() for w in self.weights)
        return total
