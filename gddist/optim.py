"""Optimizers, learning-rate schedules and the L1/L2 penalties.

Schedules are stepped once per optimizer step (never per micro-batch), identically on every rank;
`plateau` is the one exception: it steps at each evaluation on the global val/loss, which every rank
computes alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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
