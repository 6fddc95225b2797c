"""Typed run configuration: the schema, its defaults, and validation done once.

The Hydra entry turns the composed DictConfig into a plain dict and calls `Config.from_dict`;
nothing below the entry sees a DictConfig. Every check that can be done without the data or the
process group happens here, and each failure is a `UserError` whose message names the key, the
value and the fix. Each section's dataclass lives beside its validation: `data`, `model` (and
`loss`), `optim` (optimizer, scheduler, regularization), `run` (trainer, checkpoint,
early_stopping, logger, engine, dist); `schema` turns plain dicts into them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gddist.config.data import DATA_NAMES, LOADERS, TASKS, DataConfig
from gddist.config.metrics import MetricsConfig
from gddist.config.model import (
    FUNCTION_NAMES,
    LOSS_NAMES,
    MODEL_NAMES,
    MODEL_OWN_KEYS,
    LossConfig,
    ModelConfig,
)
from gddist.config.optim import (
    OPTIMIZER_NAMES,
    SCHEDULER_NAMES,
    OptimizerConfig,
    RegularizationConfig,
    SchedulerConfig,
)
from gddist.config.run import (
    NONFINITE,
    CheckpointConfig,
    DistConfig,
    EarlyStoppingConfig,
    EngineConfig,
    LoggerConfig,
    TrainerConfig,
)
from gddist.config.schema import UserError, build_dataclass

__all__ = [
    "DATA_NAMES", "FUNCTION_NAMES", "LOADERS", "LOSS_NAMES", "MODEL_NAMES", "MODEL_OWN_KEYS",
    "NONFINITE", "OPTIMIZER_NAMES", "SCHEDULER_NAMES", "TASKS",
    "CheckpointConfig", "Config", "DataConfig", "DistConfig", "EarlyStoppingConfig",
    "EngineConfig", "LoggerConfig", "LossConfig", "MetricsConfig", "ModelConfig", "OptimizerConfig",
    "RegularizationConfig", "SchedulerConfig", "TrainerConfig", "UserError",
]  # fmt: skip


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    # The value the run returns to a Hydra sweeper (gddist/hparams.py): train/loss or a val/*
    # metric; null: the run returns its summary dict. conf/hparams_search/* set it.
    optimized_metric: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build and validate a Config from a plain (resolved) dict; raises UserError."""
        d = {k: v for k, v in d.items() if k not in ("hydra", "experiment")}
        cfg = build_dataclass(cls, d, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed={self.seed} must be an int >= 0")
        metric = self.optimized_metric
        if metric is not None and not (
            isinstance(metric, str) and (metric == "train/loss" or metric.startswith("val/"))
        ):
            raise UserError(
                f"optimized_metric={metric!r} must be train/loss or a validation metric such as "
                "val/loss or val/accuracy (or null: no objective)"
            )
        for section in (
            self.data,
            self.model,
            self.loss,
            self.optimizer,
            self.scheduler,
            self.regularization,
            self.trainer,
            self.checkpoint,
            self.early_stopping,
            self.logger,
            self.engine,
            self.metrics,
            self.dist,
        ):
            section.validate()
        self._check_function_pairing()
        self._check_dataset_pairing()

    def _check_function_pairing(self) -> None:
        """The dummy data of a function (data.name=function, which model=function sets) makes
        sense only with model=function, and model=function only with it (see
        gddist/data/synthetic.py)."""
        if (self.data.name == "function") != (self.model.name == "function"):
            raise UserError(
                f"data.name={self.data.name} with model={self.model.name}: a function is minimized "
                "with model=function alone (it sets data.name=function itself); drop the other one"
            )

    def _check_dataset_pairing(self) -> None:
        """A user Dataset has no feature count to size a built-in model: it takes model=custom.
        loss=auto and metrics=auto follow a tabular task; a Dataset's task comes from the loss."""
        if self.data.name != "dataset":
            return
        if self.model.name != "custom":
            raise UserError(
                f"model={self.model.name} needs tabular data (its sizes come from the columns); "
                "with data=dataset use model=custom model._target_=my_pkg.nets.MyNet"
            )
        if self.loss.name == "auto" and self.data.task == "auto":
            raise UserError(
                "data=dataset needs a loss: pass loss=cross_entropy, bce, mse, model (the model "
                "computes it) or custom (loss._target_=...); or data.task=binary / multiclass / "
                "regression for that task's loss"
            )

    def check_world(self, world_size: int) -> None:
        """Global-batch contract: batch_size splits evenly over ranks and micro-batches."""
        parts = world_size * self.trainer.grad_accum_steps
        if self.data.batch_size % parts:
            raise UserError(
                f"data.batch_size={self.data.batch_size} does not divide by world_size "
                f"({world_size}) x trainer.grad_accum_steps ({self.trainer.grad_accum_steps}) "
                f"= {parts}; choose a data.batch_size that is a multiple of {parts}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
