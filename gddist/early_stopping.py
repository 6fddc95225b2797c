"""Early stopping: count evaluations without improvement of `early_stopping.monitor`.

The metrics it reads are global (reduced over ranks), so every rank reaches the same decision on
the same step without a collective of its own. Its two numbers travel in checkpoints, so a resumed
run keeps counting, and a rerun of an early-stopped run is complete.
"""

from __future__ import annotations

from typing import Any

from gddist.config import EarlyStoppingConfig

STATE_KEYS = ("best_metric", "evals_without_improvement")


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best_metric: float | None = None
        self.evals_without_improvement = 0

    @property
    def stopped(self) -> bool:
        """Whether patience has run out (off when early_stopping.patience is 0)."""
        return bool(self.cfg.patience) and self.evals_without_improvement >= self.cfg.patience

    def update(self, metrics: dict[str, float]) -> bool:
        """Count this evaluation; True when it is the one that runs out of patience."""
        if not self.cfg.patience:
            return False
        value = metrics[self.cfg.monitor]  # checked before training (gddist.metrics.check_monitor)
        sign = 1.0 if self.cfg.mode == "min" else -1.0
        if self.best_metric is None or sign * (self.best_metric - value) > self.cfg.min_delta:
            self.best_metric, self.evals_without_improvement = value, 0
            return False
        self.evals_without_improvement += 1
        return self.evals_without_improvement == self.cfg.patience

    def reset(self) -> None:
        """Start counting afresh (a resume that changed what is monitored, or how)."""
        self.best_metric, self.evals_without_improvement = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in STATE_KEYS:
            setattr(self, k, state[k])
