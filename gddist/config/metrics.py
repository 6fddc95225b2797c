"""The `metrics:` config section (conf/metrics/*.yaml): which val/* metrics a run computes.

Checked here without importing torch or torchmetrics: the preset, `num_classes` and the shape of
each extra node. Whether an extra's `_target_` imports, is a torchmetrics.Metric and can be built,
and whether the classes fit the model's output width, needs the data's task and width:
gddist.metrics.check_monitor checks those, also before training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gddist.config.schema import UserError, build_dataclass, check_choice

# auto: today's metrics by data task; classification / regression: those sets whatever the task
# says (refused on data whose targets do not fit); none: only val/loss.
METRICS_PRESETS = ("auto", "classification", "regression", "none")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclass
class MetricsConfig:
    name: str = "auto"
    num_classes: int | None = None  # classification: null -> the model's output width (1: binary)
    # Extra torchmetrics metrics, logged as val/<name>: {name: {_target_: dotted.Class, **kwargs}}.
    # An extra named like a preset metric replaces it.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricsConfig:
        cfg = build_dataclass(cls, d, "metrics")
        cfg.extra = dict(cfg.extra or {})
        return cfg

    def validate(self) -> None:
        check_choice("metrics", self.name, METRICS_PRESETS)
        if self.num_classes is not None:
            if self.name != "classification":
                raise UserError(
                    f"metrics.num_classes={self.num_classes} applies to metrics=classification "
                    f"only (this run has metrics={self.name}); drop it or pass "
                    "metrics=classification"
                )
            if self.num_classes < 2:
                raise UserError(
                    f"metrics.num_classes={self.num_classes} must be >= 2 (2: binary, one logit)"
                )
        for name, node in self.extra.items():
            self._check_extra(str(name), node)

    @staticmethod
    def _check_extra(name: str, node: Any) -> None:
        key = f"metrics.extra.{name}"
        if not _NAME.fullmatch(name):
            raise UserError(
                f"{key}: {name!r} is not a metric name (letters, digits, _ and -, not starting "
                "with a digit); it is logged as val/<name>"
            )
        if name == "loss":
            raise UserError(f"{key}: val/loss is the validation loss; give the metric another name")
        if not isinstance(node, dict):
            raise UserError(
                f"{key}={node!r} must be a node with a _target_, e.g. "
                f"+{key}._target_=torchmetrics.classification.MulticlassAccuracy"
            )
        if "_object_" in node:  # a torchmetrics object gddist.fit passes (named by its class)
            return
        target = node.get("_target_")
        if target in (None, "", "???"):
            raise UserError(
                f"{key}._target_ is missing; pass +{key}._target_=<a torchmetrics.Metric class, "
                "e.g. torchmetrics.classification.MulticlassAccuracy>"
            )
        if not isinstance(target, str):
            raise UserError(f"{key}._target_={target!r} must be a dotted class path (a string)")
