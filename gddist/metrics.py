"""Task losses and validation metrics over the WHOLE validation set across ranks.

Each rank evaluates its own contiguous shard of the validation rows (no padding, no duplicates);
torchmetrics sums the per-rank statistics (and gathers predictions for ROC AUC) at compute(), so the
result equals a single-process computation on the full set. torchmetrics is imported on first use to
keep startup fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gddist.config import EarlyStoppingConfig, UserError
from gddist.data.tensors import Preprocessing
from gddist.losses import predictions, task_loss  # task_loss: loss=auto, kept importable here

# The val/* metrics of each task besides val/loss (built by `Evaluator`); known before any data
# is read, so a config naming another one fails before training.
CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "roc_auc")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": CLASSIFICATION,
    "multiclass": CLASSIFICATION,
    "regression": ("mse", "mae", "r2"),
    "objective": (),
}


def metric_names(task: str) -> list[str]:
    """Every key `Evaluator.evaluate` returns for `task`, sorted."""
    return sorted(["val/loss", *(f"val/{m}" for m in TASK_METRICS[task])])


def check_monitor(cfg: EarlyStoppingConfig, task: str) -> None:
    """Raise UserError when early stopping is on and watches a metric `task` does not have."""
    names = metric_names(task)
    if cfg.patience and cfg.monitor not in names:
        raise UserError(
            f"early_stopping.monitor={cfg.monitor!r} is not a validation metric of this task "
            f"({task}); choose one of: {', '.join(names)}"
        )


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous shard of `n` rows: the shards of ranks 0..world-1
    cover [0, n) exactly, sizes differ by at most one. Integer arithmetic (exact at any n)."""
    return n * rank // world, n * (rank + 1) // world


class Evaluator:
    """Computes val/* metrics; every rank must call `evaluate` (it contains collectives)."""

    def __init__(
        self,
        prep: Preprocessing,
        device: torch.device,
        loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`loss`: the training loss (gddist.losses.build), so that val/loss is the loss that
        is trained; None: the task's loss (loss=auto)."""
        import torchmetrics  # lazy: about a second of imports
        from torchmetrics import classification as C
        from torchmetrics import regression as R

        self.prep = prep
        self.task = prep.task
        if self.task == "binary":
            metrics = {
                "accuracy": C.BinaryAccuracy(),
                "precision": C.BinaryPrecision(),
                "recall": C.BinaryRecall(),
                "f1": C.BinaryF1Score(),
                "roc_auc": C.BinaryAUROC(),
            }
        elif self.task == "multiclass":
            k = len(prep.classes)
            metrics = {
                "accuracy": C.MulticlassAccuracy(k, average="micro"),
                "precision": C.MulticlassPrecision(k, average="macro"),
                "recall": C.MulticlassRecall(k, average="macro"),
                "f1": C.MulticlassF1Score(k, average="macro"),
                "roc_auc": C.MulticlassAUROC(k, average="macro"),
            }
        elif self.task == "objective":
            metrics = {}  # val/loss is the function value; there is nothing else to measure
        else:
            metrics = {
                "mse": R.MeanSquaredError(),
                "mae": R.MeanAbsoluteError(),
                "r2": R.R2Score(),
            }
        assert tuple(metrics) == TASK_METRICS[self.task], "TASK_METRICS is out of date"
        self.metrics = torchmetrics.MetricCollection(metrics, prefix="val/").to(device)
        self.loss = torchmetrics.MeanMetric().to(device)
        self.loss_fn = loss or functools.partial(task_loss, self.task)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, float]:
        """Metrics of `model` on this rank's shard, given as (x, y) batches, reduced over all
        ranks (every rank must call this, with its own shard)."""
        was_training = model.training
        model.eval()
        self.metrics.reset()
        self.loss.reset()
        for xb, yb in batches:
            out = model(xb)
            self.loss.update(self.loss_fn(out, yb), weight=len(xb))
            if self.metrics:
                self.metrics.update(*self._predictions(predictions(out), yb))
        model.train(was_training)
        result = {"val/loss": self.loss.compute().item()}
        if self.metrics:
            result.update({k: v.item() for k, v in self.metrics.compute().items()})
        return result

    def _predictions(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "binary":
            return torch.sigmoid(out.squeeze(-1)), y.long()
        if self.task == "multiclass":
            return torch.softmax(out, dim=-1), y
        # Regression metrics are reported in the target's original units.
        scale, shift = self.prep.target_std, self.prep.target_mean
        return out.squeeze(-1) * scale + shift, y * scale + shift
