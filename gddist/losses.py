"""The training loss chosen by the `loss=` config group: one callable for training and val/loss.

Contract: `loss(output, target)` takes the model's output for a batch and the batch's target and
returns a 0-dim tensor. Training and evaluation (val/loss) call the same object, so they agree.

- `auto`: the task's loss (`task_loss`), bit for bit what runs computed before the loss group.
- `cross_entropy`: logits [B, C] (C >= 2) and class indices [B]; float targets holding whole
  numbers are converted to integers.
- `bce`: BCE with logits; output [B] or [B, 1], targets in [0, 1] (integers are converted).
- `mse`: output [B] or [B, 1], targets [B].
- `model`: the model computes its loss: its output is a scalar tensor, or carries it as
  `output["loss"]` / `output.loss` (the Hugging Face convention); the target is not used. With
  tabular (x, y) batches the model receives only x, so this is for models whose loss comes from
  their input; for the val/* metrics of a task its predictions are `output["logits"]` /
  `output.logits`.
- `custom`: `loss._target_` names a class or a function. A class (e.g. `torch.nn.HuberLoss`) is
  built once with the other `loss.*` keys as keyword arguments and the instance is called
  `(output, target)`; a function is called `fn(output, target, **other keys)` at each step.

An output [B, 1] with a target [B] reaches bce, mse and custom losses as [B] (the one-output
heads of tabular data).

The first call in a process (its first training step) is checked: a target the loss cannot take
names the output's and target's shapes and dtypes, and an output without a loss or a non-scalar
or non-finite first loss is a `UserError` (one line, exit 2, before any checkpoint). Only that
call reads values back to the host; later calls go straight to the loss (no per-step sync).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gddist.config import LossConfig, UserError
from gddist.targets import import_target

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

# What each built-in loss takes, for the message of a first step that does not fit.
WANTS = {
    "cross_entropy": "logits [B, C] with C >= 2 and class indices [B] in [0, C)",
    "bce": "logits [B] or [B, 1] and targets [B] in [0, 1]",
    "mse": "predictions [B] or [B, 1] and targets [B]",
}
# The way out of a mismatch, for every built-in loss.
FIX = "loss=auto picks the task's loss (binary: bce, multiclass: cross_entropy, regression: mse)"


def describe(value: Any) -> str:
    """A tensor as dtype[shape] (float32[64, 1]); anything else by its type (and dict keys)."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def task_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss=auto: binary cross-entropy on logits (binary), cross-entropy (multiclass), MSE
    (regression); for an objective (model=function) the model output IS the loss."""
    if task == "objective":
        return output.mean()
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.squeeze(-1), target)
    if task == "multiclass":
        return F.cross_entropy(output, target)
    return F.mse_loss(output.squeeze(-1), target)


def _flat(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, 1] -> [B] when the target is [B]: a one-output head against one target per row."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        return output.squeeze(-1)
    return output


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target.long() if target.is_floating_point() else target)


def bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    output = _flat(output, target)
    target = target if target.is_floating_point() else target.to(output.dtype)
    return F.binary_cross_entropy_with_logits(output, target)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    output = _flat(output, target)
    target = target if target.is_floating_point() else target.to(output.dtype)
    return F.mse_loss(output, target)


def half_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * mse: the least-squares objective whose gradient is X^T (Xw - y) / n and Hessian
    X^T X / n (no factor 2), for loss=custom loss._target_=gddist.losses.half_mse."""
    return 0.5 * mse(output, target)


def model_loss(output: Any, target: torch.Tensor) -> Any:
    """The loss the model computed: the output itself, output["loss"] or output.loss (None when
    there is none; the first-step check says so)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None)


def predictions(output: Any) -> torch.Tensor:
    """The tensor the val/* metrics read: the output, or output["logits"] / output.logits for a
    model that returns its loss with its predictions (loss=model)."""
    if isinstance(output, torch.Tensor) and output.dim() > 0:
        return output
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    raise UserError(
        f"the model's output ({describe(output)}) has no predictions for this task's val/* "
        "metrics; return a dict {'loss': ..., 'logits': ...} (or an object with .logits)"
    )


class Loss:
    """The run's loss (see the module docstring): `loss(output, target) -> 0-dim tensor`."""

    def __init__(self, label: str, fn: LossFn, kind: str) -> None:
        self.label = label  # how messages name it: "loss=bce", "loss=custom (pkg.fn)"
        self.fn = fn
        # A LossConfig name. "model" never reads the target: a dict-batch feed can then leave the
        # target among the model's inputs (the Hugging Face convention) instead of removing it.
        self.kind = kind
        self.checked = False

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.fn(output, target)
        loss = self._first(output, target)
        self.checked = True
        return loss

    def _first(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The first call: the inputs fit, the loss exists, is a scalar and is finite."""
        shapes = f"output {describe(output)} and target {describe(target)}"
        if self.kind in WANTS:
            problem = _misfit(self.kind, output, target)
            if problem:
                raise UserError(
                    f"{self.label}: {shapes} do not fit ({problem}): {self.kind} wants "
                    f"{WANTS[self.kind]}; {FIX}"
                )
        try:
            loss = self.fn(output, target)
        except UserError:
            raise
        except Exception as e:  # the user's loss, or torch refusing these shapes or dtypes
            message = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"{self.label}: {shapes} do not fit: {message}") from None
        if self.kind == "model" and not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            found = "is not a scalar loss" if loss is output else "has no loss"
            raise UserError(
                f"loss=model: the model's output ({describe(output)}) {found}: with loss=model the "
                "model returns a scalar tensor, a dict with 'loss' or an object with .loss; for a "
                "model that returns predictions, choose loss=auto, cross_entropy, bce, mse, custom"
            )
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise UserError(
                f"{self.label}: the first loss is {describe(loss)}, not a scalar tensor "
                f"(from {shapes}); the loss must reduce the batch to one value (e.g. .mean())"
            )
        if not torch.isfinite(loss.detach()).item():  # once per process: the only host sync
            raise UserError(
                f"{self.label}: the first loss is {loss.item()} (from {shapes}); check the data "
                "for nan/inf values and the model's initial output"
            )
        return loss


def _misfit(kind: str, output: Any, target: torch.Tensor) -> str | None:
    """Why `output` and `target` do not fit built-in loss `kind`, or None. Reads the target's
    values (a host sync): called at the first step only."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return "the output must be a floating-point tensor"
    if kind == "cross_entropy":
        if output.dim() != 2 or output.shape[1] < 2:
            return "the output must be logits [B, C] with C >= 2"
        if target.dim() != 1 or target.shape[0] != output.shape[0]:
            return "the target must be one class index per row"
        if target.is_complex() or target.dtype == torch.bool:
            return "the target must hold class indices"
        if target.is_floating_point() and not torch.equal(target, target.round()):
            return "the float target holds values that are not whole numbers"
        low, high = target.min().item(), target.max().item()
        if low < 0 or high >= output.shape[1]:
            return f"class indices span [{low:g}, {high:g}], outside [0, {output.shape[1] - 1}]"
        return None
    flat = _flat(output, target)
    if flat.shape != target.shape:
        return "the output must have one value per target row"
    if kind == "bce":
        low, high = target.min().item(), target.max().item()
        if low < 0 or high > 1:
            return f"targets span [{low:g}, {high:g}], outside [0, 1]"
    return None


def build(cfg: LossConfig, task: str, device: torch.device, prebuilt: Any = None) -> Loss:
    """The loss of config `cfg` for data of `task`; a custom `_target_` is imported (and a class
    instantiated) here, so a bad one fails before training with one line. `prebuilt` is
    gddist.fit's loss callable, used as a custom loss."""
    if prebuilt is not None:
        if not callable(prebuilt):
            kind = type(prebuilt).__name__
            raise UserError(f"the loss passed to gddist.fit is a {kind}, not callable")
        if isinstance(prebuilt, nn.Module):
            prebuilt = prebuilt.to(device)
        return Loss(f"loss=custom ({cfg.target})", _flat_args(prebuilt), "custom")
    if cfg.name == "auto":
        return Loss("loss=auto", functools.partial(task_loss, task), "auto")
    builtins: dict[str, LossFn] = {
        "cross_entropy": cross_entropy,
        "bce": bce,
        "mse": mse,
        "model": model_loss,
    }
    if cfg.name in builtins:
        return Loss(f"loss={cfg.name}", builtins[cfg.name], cfg.name)
    return Loss(f"loss=custom ({cfg.target})", _custom(cfg, device), "custom")


def _custom(cfg: LossConfig, device: torch.device) -> LossFn:
    """`loss._target_`: a class built once with the kwargs, or a function given them per call."""
    target = import_target(
        "loss._target_",
        cfg.target or "",
        "a loss class or function, e.g. torch.nn.HuberLoss or my_pkg.losses.my_loss",
    )
    key = f"loss._target_={cfg.target}"
    if inspect.isclass(target):
        try:
            instance = target(**cfg.kwargs)
        except Exception as e:  # the factory's own message is the useful part
            message = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"{key} could not be built: {type(e).__name__}: {message}") from None
        if not callable(instance):
            raise UserError(f"{key} built a {type(instance).__name__}, which is not callable")
        if isinstance(instance, nn.Module):
            if any(True for _ in instance.parameters()):
                # Only the model's parameters are trained and checkpointed.
                raise UserError(
                    f"{key} has parameters, which gddist would neither train nor checkpoint; "
                    "make them part of the model (model=custom)"
                )
            instance = instance.to(device)  # buffers such as class weights
        fn: Callable[..., torch.Tensor] = instance
    elif callable(target):
        _check_kwargs(target, cfg.kwargs, key)
        fn = functools.partial(target, **cfg.kwargs) if cfg.kwargs else target
    else:
        raise UserError(f"{key} is a {type(target).__name__}, not a loss class or function")

    return _flat_args(fn)


def _flat_args(fn: Callable[..., torch.Tensor]) -> LossFn:
    """`fn` called with a one-output head's [B, 1] output flattened against a [B] target."""

    def custom(output: Any, target: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor):
            output = _flat(output, target)
        return fn(output, target)

    return custom


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], key: str) -> None:
    """A function must take (output, target, **the other loss.* keys)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the first step will tell
        return
    try:
        signature.bind(None, None, **kwargs)
    except TypeError as e:
        raise UserError(
            f"{key} cannot be called as fn(output, target, {', '.join(f'{k}=' for k in kwargs)}) "
            f"({e}); a loss function takes (output, target) and the other loss.* keys"
        ) from None
