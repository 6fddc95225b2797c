"""Task losses and validation metrics over the WHOLE validation set across ranks.

Each rank evaluates its own contiguous shard of the validation rows (no padding, no duplicates);
torchmetrics sums the per-rank statistics (and gathers predictions for ROC AUC) at compute(), so the
result equals a single-process computation on the full set. torchmetrics is imported on first use to
keep startup fast.

Which metrics: the `metrics` config (gddist/config/metrics.py). A preset (auto, classification,
regression, none) plus `metrics.extra` torchmetrics nodes, logged as val/<name>. Every metric, the
preset's and the extras, gets the same (preds, target) pair for a batch:

- binary (one output): preds = sigmoid(logit), shape (N,); target = 0/1 labels, long, shape (N,)
- multiclass (K outputs): preds = softmax(logits), shape (N, K); target = class ids, long, (N,)
- regression: preds and target in the target's original units (the standardization undone)
- generic (a user Dataset whose loss and metrics preset name no task): the model's predictions
  and the target as they are; only val/loss and metrics.extra are computed

Probabilities, not logits: torchmetrics' classification metrics apply sigmoid / softmax themselves
only when some value lies outside [0, 1], so logits that all happen to lie inside [0, 1] would be
taken for probabilities; passing probabilities is right whatever the values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from gddist.config import EarlyStoppingConfig, MetricsConfig, UserError
from gddist.data.tensors import Preprocessing
from gddist.losses import predictions, task_loss  # task_loss: loss=auto, kept importable here
from gddist.models import forward
from gddist.targets import import_target

# The val/* metrics of each preset besides val/loss (built by `Evaluator`); known before any data
# is read, so a config naming another one fails before training.
CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "roc_auc")
REGRESSION = ("mse", "mae", "r2")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": CLASSIFICATION,
    "multiclass": CLASSIFICATION,
    "regression": REGRESSION,
    "objective": (),
    "generic": (),
}
_PREDS = {
    "binary": "one probability per sample",
    "multiclass": "one probability per class and sample",
    "regression": "one number per sample",
}
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MetricPlan:
    """What the evaluation computes: `kind` says how model outputs become predictions (binary,
    multiclass, regression, objective), `preset` the preset's metric names, `width` the model
    output width the metrics expect, `num_classes` the classes (0 unless classification)."""

    kind: str
    preset: tuple[str, ...]
    width: int
    num_classes: int


def plan(cfg: MetricsConfig, task: str, width: int) -> MetricPlan:
    """The metrics of `cfg` for data of `task` and a model with `width` outputs; UserError when
    they do not fit (classification metrics of a regression target, classes != output width)."""
    if task == "objective":  # model=function: its output IS the loss; nothing else to measure
        if cfg.name not in ("auto", "none") or cfg.extra:
            raise UserError(
                f"metrics={cfg.name}{' with metrics.extra' if cfg.extra else ''} does not apply "
                "to model=function (its output is the loss, logged as val/loss); drop it"
            )
        return MetricPlan("objective", (), width, 0)
    preset = _preset_names(cfg, task)
    if task == "generic":
        return MetricPlan("generic", (), width, 0)
    if cfg.name == "classification" and task == "regression":
        raise UserError(
            "metrics=classification needs class labels, but the data's task is regression; "
            "use metrics=regression (or auto), or data.task=binary / multiclass"
        )
    if cfg.name == "regression" and task != "regression":
        raise UserError(
            f"metrics=regression needs a numeric target, but the data's task is {task}; "
            "use metrics=classification (or auto)"
        )
    if task == "regression":
        return MetricPlan("regression", preset, 1, 0)
    k = cfg.num_classes or (2 if width == 1 else width)
    if k != (2 if width == 1 else width):
        raise UserError(
            f"metrics.num_classes={k} does not fit the model's {width} output(s): a binary model "
            "has 1 output (num_classes=2), a K-class model K outputs; drop metrics.num_classes "
            "or change the model"
        )
    return MetricPlan("binary" if width == 1 else "multiclass", preset, width, k)


def metric_names(task: str, metrics: MetricsConfig | None = None) -> list[str]:
    """Every key `Evaluator.evaluate` returns for `task` and the `metrics` config, sorted."""
    cfg = metrics or MetricsConfig()
    return sorted({"val/loss", *(f"val/{m}" for m in (*_preset_names(cfg, task), *cfg.extra))})


def _preset_names(cfg: MetricsConfig, task: str) -> tuple[str, ...]:
    if task in ("objective", "generic") or cfg.name == "none":
        return ()
    if cfg.name == "auto":
        return TASK_METRICS[task]
    return CLASSIFICATION if cfg.name == "classification" else REGRESSION


def check_monitor(
    cfg: EarlyStoppingConfig,
    task: str,
    metrics: MetricsConfig | None = None,
    num_outputs: int | None = None,
    objects: Mapping[str, Any] | None = None,
) -> None:
    """Before training: raise UserError when the metrics config does not fit the data (its task
    and, when given, the model's `num_outputs`), when an extra metric cannot be built, or when
    early stopping is on and watches a metric the run does not compute."""
    metrics = metrics or MetricsConfig()
    if num_outputs is not None:
        p = plan(metrics, task, num_outputs)
        build_extras(metrics, p, objects)  # import, type and constructor of each extra, dropped
    names = metric_names(task, metrics)
    preset = "" if metrics.name == "auto" else f", metrics={metrics.name}"
    if cfg.patience and cfg.monitor not in names:
        raise UserError(
            f"early_stopping.monitor={cfg.monitor!r} is not a validation metric of this task "
            f"({task}{preset}); choose one of: {', '.join(names)}"
        )


def check_save_best(save_best: str | None, task: str, metrics: MetricsConfig | None = None) -> None:
    """Before training: UserError when checkpoint.save_best names a metric the run does not
    compute."""
    names = metric_names(task, metrics)
    if save_best is not None and save_best not in names:
        raise UserError(
            f"checkpoint.save_best={save_best!r} is not a validation metric of this run "
            f"({task}); choose one of: {', '.join(names)}"
        )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_extras(
    cfg: MetricsConfig, p: MetricPlan, objects: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """{name: torchmetrics.Metric} of `cfg.extra`, each built from its `_target_` and the node's
    other keys (or a copy of the Metric object gddist.fit passed in `objects`); UserError naming
    the node when a target is not importable, is not a Metric, or its constructor raises (its
    message kept)."""
    if not cfg.extra:
        return {}
    import torchmetrics  # lazy: about a second of imports

    built = {}
    for name, node in cfg.extra.items():
        key = f"metrics.extra.{name}"
        if "_object_" in node:
            given = (objects or {}).get(key)
            if not isinstance(given, torchmetrics.Metric):
                raise UserError(
                    f"{key} ({node['_object_']}) is not a torchmetrics.Metric object; pass "
                    "metrics={name: a torchmetrics.Metric} to gddist.fit"
                )
            built[name] = given.clone()  # the caller's object stays as it was
            continue
        target = node["_target_"]
        kwargs = {k: v for k, v in node.items() if k != "_target_"}
        factory = import_target(
            f"{key}._target_",
            target,
            "a torchmetrics.Metric class, e.g. torchmetrics.classification.MulticlassAccuracy",
        )
        if not callable(factory) or (
            isinstance(factory, type) and not issubclass(factory, torchmetrics.Metric)
        ):
            raise UserError(
                f"{key}._target_={target} is not a torchmetrics.Metric class (it is "
                f"{factory!r}); give one such as torchmetrics.classification.MulticlassAccuracy"
            )
        classes = kwargs.get("num_classes")
        if p.kind == "multiclass" and isinstance(classes, int) and classes != p.num_classes:
            raise UserError(
                f"{key}.num_classes={classes} does not fit the model's {p.num_classes} outputs "
                f"(classes); pass {key}.num_classes={p.num_classes}"
            )
        try:
            metric = factory(**kwargs)
        except Exception as e:  # the user's constructor: any error is a config mistake
            raise UserError(f"{key} ({target}) could not be built: {_one_line(e)}") from None
        if not isinstance(metric, torchmetrics.Metric):
            raise UserError(
                f"{key}._target_={target} returned a {type(metric).__name__}, not a "
                "torchmetrics.Metric"
            )
        # Binary preds are (N,) probabilities, multiclass ones (N, K): a metric of the other
        # kind would take them for class ids and be silently wrong, so it is refused.
        wrong = {"binary": ("Multiclass", "Multilabel"), "multiclass": ("Binary", "Multilabel")}
        cls_name = type(metric).__name__
        if cls_name.startswith(wrong.get(p.kind, ())):
            raise UserError(
                f"{key} is a {cls_name} but this run's predictions are {p.kind} "
                f"({_PREDS[p.kind]}); use the {p.kind.capitalize()} variant of the metric"
            )
        built[name] = metric
    return built


def _width(output: Any, cfg: MetricsConfig) -> int:
    """The output width the metrics follow: the predictions' last dimension (1 for one value per
    sample); metrics that need no predictions take any."""
    try:
        out = predictions(output)
    except UserError:
        if cfg.name in ("auto", "none") and not cfg.extra:
            return 1  # val/loss only: no predictions needed
        raise
    return out.shape[-1] if out.ndim > 1 else 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous shard of `n` rows: the shards of ranks 0..world-1
    cover [0, n) exactly, sizes differ by at most one. Integer arithmetic (exact at any n)."""
    return n * rank // world, n * (rank + 1) // world


def _preset_metrics(p: MetricPlan) -> dict[str, Any]:
    from torchmetrics import classification as C
    from torchmetrics import regression as R

    if not p.preset:
        return {}
    if p.kind == "binary":
        return {
            "accuracy": C.BinaryAccuracy(),
            "precision": C.BinaryPrecision(),
            "recall": C.BinaryRecall(),
            "f1": C.BinaryF1Score(),
            "roc_auc": C.BinaryAUROC(),
        }
    if p.kind == "multiclass":
        k = p.num_classes
        return {
            "accuracy": C.MulticlassAccuracy(k, average="micro"),
            "precision": C.MulticlassPrecision(k, average="macro"),
            "recall": C.MulticlassRecall(k, average="macro"),
            "f1": C.MulticlassF1Score(k, average="macro"),
            "roc_auc": C.MulticlassAUROC(k, average="macro"),
        }
    return {"mse": R.MeanSquaredError(), "mae": R.MeanAbsoluteError(), "r2": R.R2Score()}


def batch_size(inputs: Any, target: Any) -> int:
    """Samples in a batch: the target's rows, else the first tensor's among the inputs."""
    for value in (target, inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return len(value)
    leaves = inputs.values() if isinstance(inputs, dict) else inputs
    if isinstance(leaves, Iterable) and not isinstance(leaves, torch.Tensor | str):
        for value in leaves:
            n = batch_size(value, None) if not isinstance(value, torch.Tensor) else len(value)
            if n:
                return n
    return 0


class Evaluator:
    """Computes val/loss and the metrics of `metrics` (default: auto); every rank must call
    `evaluate` (it contains collectives). `num_outputs` is the model's output width (default:
    the data's classes for tabular data; for a user Dataset, whose width only its model knows,
    the width of the first batch's output); `loss` computes val/loss from (output, target)
    (default: the task's loss)."""

    def __init__(
        self,
        prep: Preprocessing,
        device: torch.device,
        metrics: MetricsConfig | None = None,
        num_outputs: int | None = None,
        loss: LossFn | None = None,
        objects: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = metrics or MetricsConfig()
        self.prep = prep
        self.task = prep.task
        self.device = device
        self.objects = objects
        self.loss_fn: LossFn = loss or partial(task_loss, self.task)
        self._width_checked = False
        self.plan: MetricPlan | None = None
        if num_outputs is None and (prep.classes or prep.task in ("binary", "regression")):
            num_outputs = len(prep.classes) if prep.task == "multiclass" else 1
        if num_outputs is not None:
            self._build(num_outputs)

    def _build(self, num_outputs: int) -> None:
        import torchmetrics  # lazy: about a second of imports

        cfg, device = self.cfg, self.device
        self.plan = plan(cfg, self.task, num_outputs)
        preset = _preset_metrics(self.plan)
        assert tuple(preset) in (self.plan.preset, ()), "TASK_METRICS is out of date"
        preset = {k: v for k, v in preset.items() if k not in cfg.extra}  # an extra replaces it
        self.metrics = torchmetrics.MetricCollection(preset, prefix="val/").to(device)
        extras = build_extras(cfg, self.plan, self.objects)
        self.extra = {k: m.to(device) for k, m in extras.items()}
        self.loss = torchmetrics.MeanMetric().to(device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[tuple[Any, Any]]) -> dict[str, float]:
        """Metrics of `model` on this rank's shard, given as (inputs, target) batches, reduced
        over all ranks (every rank must call this, with its own shard)."""
        was_training = model.training
        model.eval()
        if self.plan is not None:
            self._reset()
        for xb, yb in batches:
            out = forward(model, xb)
            if self.plan is None:  # a user Dataset: the first output says the width
                self._build(_width(out, self.cfg))
                self._reset()
            measured = bool(self.metrics or self.extra)
            if measured:
                if yb is None:
                    raise UserError(
                        "the val/* metrics need the target, but the batches carry none (dict "
                        f"samples without {self.prep.target!r}, data.target_key); add it to the "
                        "samples or choose metrics=none"
                    )
                # Before the loss: its shape error would be less clear.
                self._check_width(predictions(out))
            self.loss.update(self.loss_fn(out, yb), weight=batch_size(xb, yb))
            if measured:
                preds, target = self._predictions(predictions(out), yb)
                if self.metrics:
                    self.metrics.update(preds, target)
                self._update_extras(preds, target)
        model.train(was_training)
        result = {"val/loss": self.loss.compute().item()}
        if self.metrics:
            result.update({k: v.item() for k, v in self.metrics.compute().items()})
        for name, metric in self.extra.items():
            result[f"val/{name}"] = self._scalar(name, metric.compute())
        return result

    def _reset(self) -> None:
        self.metrics.reset()
        self.loss.reset()
        for m in self.extra.values():
            m.reset()

    def _check_width(self, out: torch.Tensor) -> None:
        """Once: the model's actual output width is the one the metrics were built for (a
        custom model may not output what model.out_features asked for)."""
        if self._width_checked or self.plan.kind == "generic":
            return
        width = out.shape[-1] if out.ndim > 1 else 1
        if width != self.plan.width:
            raise UserError(
                f"the model outputs {width} value(s) per sample but the {self.plan.kind} metrics "
                f"expect {self.plan.width} (metrics.num_classes / the data's classes); make the "
                "model output one logit per class (one for binary) or fix metrics.num_classes"
            )
        self._width_checked = True

    def _update_extras(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for name, metric in self.extra.items():
            try:
                metric.update(preds, target)
            except Exception as e:  # the user's metric: any error is a config mistake
                raise UserError(
                    f"metrics.extra.{name} ({type(metric).__name__}) cannot take this run's "
                    f"{self.plan.kind} predictions (preds {tuple(preds.shape)} "
                    f"{preds.dtype}, target {tuple(target.shape)} {target.dtype}): "
                    f"{_one_line(e)}"
                ) from None

    @staticmethod
    def _scalar(name: str, value: Any) -> float:
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(
                f"metrics.extra.{name} computes {shape}, not one number; configure it to "
                "return a scalar (e.g. average=macro)"
            )
        return value.item()

    def _predictions(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.plan.kind == "binary":
            return torch.sigmoid(out.squeeze(-1)), y.long()
        if self.plan.kind == "multiclass":
            return torch.softmax(out, dim=-1), y.long()
        if self.plan.kind == "generic":
            return out, y
        # Regression metrics are reported in the target's original units.
        scale, shift = self.prep.target_std, self.prep.target_mean
        return out.squeeze(-1) * scale + shift, y * scale + shift
