"""Typed run configuration: the schema, its defaults, and validation done once.

The Hydra entry turns the composed DictConfig into a plain dict and calls `Config.from_dict`;
nothing below the entry sees a DictConfig. Every check that can be done without the data or the
process group happens here, and each failure is a `UserError` whose message names the key, the
value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gddist.metrics_config import MetricsConfig
from gddist.schema import UserError, build_dataclass, check_choice, check_positive

DATA_NAMES = ("purchase", "csv", "npy", "regression", "function")
# How training batches are served: indexing in-memory tensors, or a torch DataLoader with workers.
LOADERS = ("auto", "memory", "dataloader")
TASKS = ("auto", "binary", "multiclass", "regression")
MODEL_NAMES = ("linear", "mlp", "custom", "function")
# 2-D test functions for model=function (implemented in gddist/models.py: FUNCTIONS).
FUNCTION_NAMES = ("rosenbrock", "styblinski_tang")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULER_NAMES = ("constant", "step", "cosine", "warmup_cosine", "plateau")
NONFINITE = ("stop", "skip")


@dataclass
class DataConfig:
    name: str = "purchase"
    num_samples: int | None = 1000  # purchase, regression; function: rows of the dummy data
    path: str | None = None  # csv: the file; npy: the directory of features.npy + target.npy
    target: str | None = None  # csv only
    task: str = "auto"
    batch_size: int = 64  # GLOBAL samples per optimizer step
    eval_batch_size: int = 1024  # per rank
    val_fraction: float = 0.2
    # auto: npy (memory-mapped, read as needed) -> dataloader, everything else -> memory.
    loader: str = "auto"
    num_workers: int = 2  # dataloader: reader processes per rank (0: read in the training process)
    pin_memory: bool = True  # dataloader on CUDA: page-locked batches, copied without blocking
    persistent_workers: bool = True  # dataloader: keep the workers between evaluations
    prefetch_factor: int = 2  # dataloader: batches each worker reads ahead

    def validate(self) -> None:
        check_choice("data", self.name, DATA_NAMES)
        check_choice("data.task", self.task, TASKS)
        check_choice("data.loader", self.loader, LOADERS)
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be >= 0 (0: no workers)")
        check_positive("data.prefetch_factor", self.prefetch_factor)
        check_positive("data.batch_size", self.batch_size)
        check_positive("data.eval_batch_size", self.eval_batch_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(
                f"data.val_fraction={self.val_fraction} must be between 0 and 1 (exclusive); "
                "use e.g. data.val_fraction=0.2"
            )
        generated = self.name in ("purchase", "regression")
        if generated and (self.num_samples is None or self.num_samples < 10):
            raise UserError(
                f"data.num_samples={self.num_samples} must be at least 10 for data={self.name}"
            )
        if self.name == "function" and (self.num_samples is None or self.num_samples < 1):
            raise UserError(
                f"data.num_samples={self.num_samples} must be at least 1 for model=function "
                "(its dummy data rows)"
            )
        if self.name == "npy" and not self.path:
            raise UserError(
                "data.path is required for data=npy; pass data.path=DIR (a directory holding "
                "features.npy and target.npy)"
            )
        if self.name == "csv":
            if not self.path:
                raise UserError("data.path is required for data=csv; pass data.path=my.csv")
            if not self.target:
                raise UserError(
                    "data.target is required for data=csv; pass data.target=<label column>"
                )

    @property
    def uses_dataloader(self) -> bool:
        """True when training batches come from a torch DataLoader (see gddist/data/feeds.py)."""
        return self.loader == "dataloader" or (self.loader == "auto" and self.name == "npy")


@dataclass
class ModelConfig:
    name: str = "linear"
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # mlp
    dropout: float = 0.0  # mlp
    target: str | None = None  # custom: import path of an nn.Module class or factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom: extra constructor arguments
    function: str = "rosenbrock"  # function: which test function to minimize
    init: list[float] | None = None  # function: start point; null: uniform in its box from seed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "_target_" in d:  # a user model: everything but _target_ goes to its constructor
            target = d.pop("_target_")
            d.pop("name", None)
            return cls(name="custom", target=target, kwargs=d)
        return build_dataclass(cls, d, "model")

    def validate(self) -> None:
        check_choice("model", self.name, MODEL_NAMES)
        if self.name == "custom" and (not self.target or self.target == "???"):
            raise UserError(
                "model._target_ is required for model=custom; pass model._target_=my_pkg.MyNet"
            )
        if self.name == "mlp":
            if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
                raise UserError(
                    f"model.hidden_sizes={self.hidden_sizes} must be a non-empty list of positive "
                    "ints, e.g. model.hidden_sizes=[64,64]"
                )
            if not 0.0 <= self.dropout < 1.0:
                raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.name == "function":
            check_choice("model.function", self.function, FUNCTION_NAMES)
            if self.init is not None and len(self.init) != 2:
                raise UserError(
                    f"model.init={self.init} must be a 2-D point such as [-1.2,1.0] "
                    "(or null for a random start drawn from seed)"
                )


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


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # wins over max_epochs when set
    max_epochs: int | None = 20
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None
    grad_clip_value: float | None = None
    log_every: int = 10
    eval_every: int = 50  # 0: evaluate only at the end
    on_nonfinite: str = "stop"
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU and CUDA) | fp16 (CUDA, GradScaler)
    compile: bool = False  # torch.compile the model (checkpoints keep plain keys)
    compile_backend: str = "inductor"  # torch.compile backend (eager / aot_eager to debug)
    # With N > 1 processes, a stop signal is agreed by an all-reduce posted every
    # stop_check_every steps or every stop_check_s seconds, whichever comes first.
    stop_check_every: int = 10
    stop_check_s: float = 5.0

    def validate(self) -> None:
        if self.max_steps is None and self.max_epochs is None:
            raise UserError(
                "set trainer.max_steps or trainer.max_epochs (both are null); "
                "e.g. trainer.max_steps=500"
            )
        if self.max_steps is not None:
            check_positive("trainer.max_steps", self.max_steps)
        if self.max_epochs is not None:
            check_positive("trainer.max_epochs", self.max_epochs)
        check_positive("trainer.grad_accum_steps", self.grad_accum_steps)
        check_positive("trainer.log_every", self.log_every)
        check_positive("trainer.stop_check_every", self.stop_check_every)
        check_positive("trainer.stop_check_s", self.stop_check_s)
        if self.eval_every < 0:
            raise UserError(f"trainer.eval_every={self.eval_every} must be >= 0 (0: only at end)")
        for key in ("grad_clip_norm", "grad_clip_value"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise UserError(f"trainer.{key}={value} must be > 0 (or null to disable)")
        check_choice("trainer.on_nonfinite", self.on_nonfinite, NONFINITE)
        check_choice("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only the final save (and saves on a stop signal)
    keep_last: int = 3  # newest complete checkpoints kept
    resume: str = "auto"  # auto | never | <path to a checkpoint dir>
    dir: str | None = None  # default: RUN_DIR/checkpoints
    allow_changes: bool = False  # resume even if model shape / global batch / seed changed
    async_save: bool = False  # `checkpoint.async`: write in a background thread

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        d = dict(d)
        if "async" in d:  # `async` is the public key; it is a Python keyword, hence the field name
            d["async_save"] = d.pop("async")
        return build_dataclass(cls, d, "checkpoint")

    def validate(self) -> None:
        if self.every_steps < 0:
            raise UserError(f"checkpoint.every_steps={self.every_steps} must be >= 0 (0: at end)")
        check_positive("checkpoint.keep_last", self.keep_last)
        if not self.resume:
            raise UserError("checkpoint.resume must be auto, never or a checkpoint path")


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val/loss"  # any val/* metric
    mode: str = "min"  # min | max
    patience: int = 0  # evaluations without improvement before stopping; 0: off
    min_delta: float = 0.0  # smallest change that counts as an improvement

    def validate(self) -> None:
        check_choice("early_stopping.mode", self.mode, ("min", "max"))
        if self.patience < 0:
            raise UserError(f"early_stopping.patience={self.patience} must be >= 0 (0: off)")
        if not self.monitor.startswith("val/"):
            raise UserError(
                f"early_stopping.monitor={self.monitor!r} must be a validation metric such as "
                "val/loss or val/accuracy"
            )


@dataclass
class LoggerConfig:
    name: str = "jsonl"  # jsonl (always on) | wandb (jsonl + wandb)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none
    plots: bool = True  # PNG curves in RUN_DIR/plots/ at the end of a run
    # wandb only. No API key field on purpose: wandb reads WANDB_API_KEY or its login file, so
    # a key never lands in a config, a log or a checkpoint.
    project: str = "gddist"
    entity: str | None = None  # wandb team or user; null: the account's default
    mode: str | None = None  # online | offline | disabled; null: WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_choice("logger", self.name, ("jsonl", "wandb"))
        check_choice("logger.progress", self.progress, ("auto", "bar", "lines", "none"))
        if self.mode is not None:
            check_choice("logger.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class EngineConfig:
    name: str = "ddp"  # ddp (native DistributedDataParallel) | accelerate

    def validate(self) -> None:
        check_choice("engine", self.name, ("ddp", "accelerate"))


@dataclass
class DistConfig:
    backend: str = "auto"
    device: str = "auto"
    timeout_s: float = 1800.0
    init_method: str = "env://"

    def validate(self) -> None:
        check_choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        check_choice("dist.device", self.device, ("auto", "cpu", "cuda"))
        check_positive("dist.timeout_s", self.timeout_s)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
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
        for section in (
            self.data,
            self.model,
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

    def _check_function_pairing(self) -> None:
        """The dummy data of a function (data.name=function, which model=function sets) makes
        sense only with model=function, and model=function only with it (see
        gddist/data/synthetic.py)."""
        if (self.data.name == "function") != (self.model.name == "function"):
            raise UserError(
                f"data.name={self.data.name} with model={self.model.name}: a function is minimized "
                "with model=function alone (it sets data.name=function itself); drop the other one"
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
