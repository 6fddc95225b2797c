"""The `optimizer`, `scheduler` and `regularization` sections: how the weights move."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gddist.config.schema import UserError, check_choice, check_positive

OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULER_NAMES = ("constant", "step", "cosine", "warmup_cosine", "plateau")


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw, adagrad, rmsprop
    alpha: float = 0.99  # rmsprop smoothing constant

    def validate(self) -> None:
        check_choice("optimizer", self.name, OPTIMIZER_NAMES)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(
                f"optimizer.lr={self.lr} must be a positive number; use e.g. optimizer.lr=0.01"
            )
        if self.weight_decay < 0:
            raise UserError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.momentum < 0:
            raise UserError(f"optimizer.momentum={self.momentum} must be >= 0")
        if self.nesterov and self.momentum <= 0:
            raise UserError(
                "optimizer.nesterov=true needs optimizer.momentum > 0; e.g. optimizer.momentum=0.9"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optimizer.betas={self.betas} must be two numbers in [0, 1)")


@dataclass
class SchedulerConfig:
    name: str = "constant"
    warmup_steps: int = 0  # constant, step, cosine, warmup_cosine
    step_size: int = 100  # step
    gamma: float = 0.5  # step
    min_lr: float = 0.0  # cosine, warmup_cosine
    factor: float = 0.5  # plateau
    patience: int = 2  # plateau, in evaluations
    threshold: float = 1e-4  # plateau
    # cosine, warmup_cosine: the optimizer steps the schedule spans (its horizon). null:
    # the run's max steps when it started; a resume with a larger trainer.max_steps keeps that
    # horizon (the LR stays continuous) unless this key is set.
    total_steps: int | None = None

    def validate(self) -> None:
        check_choice("scheduler", self.name, SCHEDULER_NAMES)
        if self.total_steps is not None:
            check_positive("scheduler.total_steps", self.total_steps)
            if self.name in ("cosine", "warmup_cosine") and self.total_steps <= self.warmup_steps:
                raise UserError(
                    f"scheduler.total_steps={self.total_steps} must exceed scheduler.warmup_steps="
                    f"{self.warmup_steps} (the cosine decays over the steps after the warmup)"
                )
        if self.warmup_steps < 0:
            raise UserError(f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")
        if self.name == "warmup_cosine" and self.warmup_steps == 0:
            raise UserError(
                "scheduler=warmup_cosine needs scheduler.warmup_steps > 0 (or use scheduler=cosine)"
            )
        check_positive("scheduler.step_size", self.step_size)
        if not 0.0 < self.gamma <= 1.0:
            raise UserError(f"scheduler.gamma={self.gamma} must be in (0, 1]")
        if not 0.0 < self.factor < 1.0:
            raise UserError(f"scheduler.factor={self.factor} must be in (0, 1)")
        if self.min_lr < 0:
            raise UserError(f"scheduler.min_lr={self.min_lr} must be >= 0")


@dataclass
class RegularizationConfig:
    l1: float = 0.0
    l2: float = 0.0

    def validate(self) -> None:
        for key in ("l1", "l2"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"regularization.{key}={value} must be a number >= 0")
