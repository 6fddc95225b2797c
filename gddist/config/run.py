"""How a run goes: the trainer loop, checkpoints, early stopping, logging, engine, processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gddist.config.schema import UserError, build_dataclass, check_choice, check_positive

NONFINITE = ("stop", "skip")


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
    # A val/* metric: at each evaluation where it improved (best_mode: min or max), rank 0 writes
    # the weights to <checkpoint dir>/best.pt (+ best.json), which keep_last never prunes.
    save_best: str | None = None
    best_mode: str = "min"  # min: lower is better (val/loss, val/mse); max: val/accuracy, ...

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
        check_choice("checkpoint.best_mode", self.best_mode, ("min", "max"))
        if self.save_best is not None and not str(self.save_best).startswith("val/"):
            raise UserError(
                f"checkpoint.save_best={self.save_best!r} must be a validation metric such as "
                "val/loss (with checkpoint.best_mode=min) or val/accuracy (best_mode=max)"
            )


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
    # A function's dotted path, called on rank 0 when a run has trained to its end:
    # fn(run_dir, config dict, model) -> dict of extra summary entries (baselines, samples, plots).
    on_end: str | None = None
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
    # DDP's find_unused_parameters: for models with parameters that some steps do not use.
    find_unused_parameters: bool = False

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
