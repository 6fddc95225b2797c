"""The `model` and `loss` sections: what is trained, and on which objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gddist.config.schema import UserError, build_dataclass, check_choice

MODEL_NAMES = ("linear", "mlp", "custom", "function")
# model.* keys of every model kind that are gddist's, never a user constructor's argument.
MODEL_OWN_KEYS = ("name", "sync_batchnorm")
# 2-D test functions for model=function (implemented in gddist/models.py: FUNCTIONS).
FUNCTION_NAMES = ("rosenbrock", "styblinski_tang")
# loss= options (built by gddist/losses.py); auto: the task's loss, as before the loss group.
LOSS_NAMES = ("auto", "cross_entropy", "bce", "mse", "model", "custom")


@dataclass
class ModelConfig:
    name: str = "linear"
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # mlp
    dropout: float = 0.0  # mlp
    target: str | None = None  # custom: import path of an nn.Module class or factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom: extra constructor arguments
    function: str = "rosenbrock"  # function: which test function to minimize
    init: list[float] | None = None  # function: start point; null: uniform in its box from seed
    # Any model: BatchNorm layers become SyncBatchNorm with N > 1 processes (gddist/batchnorm.py).
    sync_batchnorm: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "_target_" in d:  # a user model: the keys but _target_ and gddist's own are its kwargs
            own = {k: d.pop(k) for k in MODEL_OWN_KEYS if k in d}
            own.update(name="custom", target=d.pop("_target_"), kwargs=d)
            return build_dataclass(cls, own, "model")
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
class LossConfig:
    name: str = "auto"
    target: str | None = None  # custom: import path of a loss class or function (`_target_`)
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom: the other loss.* keys

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossConfig:
        d = dict(d)
        if "_target_" in d:  # a user loss: everything but _target_ (and name) is its kwargs
            target = d.pop("_target_")
            d.pop("name", None)
            return cls(name="custom", target=target, kwargs=d)
        return build_dataclass(cls, d, "loss")

    def validate(self) -> None:
        check_choice("loss", self.name, LOSS_NAMES)
        if self.name == "custom" and (not self.target or self.target == "???"):
            raise UserError(
                "loss._target_ is required for loss=custom; pass loss._target_=my_pkg.my_loss "
                "(a function (output, target) -> scalar, or a class such as torch.nn.HuberLoss)"
            )
