"""The training loop: read it top to bottom in `fit` and `train_step`.

One optimizer step = `grad_accum_steps` micro-batches of this rank's slice of the global batch ->
forward -> loss (+ L1/L2 penalty) -> backward (all-reduce only on the last micro-batch) -> clip ->
optimizer step -> LR schedule. Host syncs happen only at log / eval / end: per-step losses and
gradient norms stay on the device in a short list that each log step drains.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gddist import models, tracking
from gddist.config import Config, UserError
from gddist.data import GlobalBatches, TensorData
from gddist.dist import Dist
from gddist.engine import DDPEngine
from gddist.io import atomic_save_json, atomic_torch_save
from gddist.metrics import Evaluator, task_loss
from gddist.optim import Penalty, build_optimizer, build_scheduler, is_plateau

log = logging.getLogger("gddist")


class Diverged(Exception):
    """The loss or the gradient became non-finite under trainer.on_nonfinite=stop."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(
            f"diverged at step {step}: loss={loss:.6g}, lr={lr:.6g}; "
            "lower optimizer.lr or set trainer.grad_clip_norm"
        )
        self.step = step


class Trainer:
    def __init__(self, cfg: Config, data: TensorData, dist: Dist, run_dir: Path) -> None:
        self.cfg = cfg
        self.dist = dist
        self.run_dir = Path(run_dir)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = data.to(dist.device)
        self.batches = GlobalBatches(len(data.y_train), cfg.data.batch_size, cfg.seed, dist.device)
        tc = cfg.trainer
        self.max_steps = tc.max_steps or tc.max_epochs * self.batches.steps_per_epoch
        n_val = len(data.y_val)
        if n_val < dist.world_size:
            raise UserError(
                f"{n_val} validation rows cannot be shared by {dist.world_size} processes; "
                "raise data.val_fraction"
            )
        # Each rank evaluates a contiguous shard; no padding, so no row is counted twice.
        bounds = torch.linspace(0, n_val, dist.world_size + 1).round().long().tolist()
        lo, hi = bounds[dist.rank], bounds[dist.rank + 1]
        self.x_val, self.y_val = data.x_val[lo:hi], data.y_val[lo:hi]

        # Same initial weights on every rank and at every world size; then per-rank streams
        # (dropout) so ranks do not draw identical masks.
        torch.manual_seed(cfg.seed)
        model = models.build(cfg.model, data.num_features, data.num_outputs).to(dist.device)
        seed_rank(cfg.seed, dist.rank)
        self.engine = DDPEngine(model, dist)
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        self.scheduler = build_scheduler(
            cfg.scheduler, self.optimizer, cfg.optimizer.lr, self.max_steps
        )
        self.penalty = Penalty(cfg.regularization, models.weight_matrices(model))
        self.evaluator: Evaluator | None = None  # built at the first evaluation (lazy import)
        self.tracker = tracking.build(self.run_dir, dist.is_main, cfg.logger, cfg.to_dict())

        self.step = 0  # optimizer steps completed
        self.skipped_steps = 0
        self.last_train_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        # Per-step (step, loss, grad norm, lr) since the last log, drained by _drain(): bounded.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self._interval_start = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to trainer.max_steps (or max_epochs) and write the outputs; return the summary."""
        tc = self.cfg.trainer
        start = time.perf_counter()
        self.engine.model.train()
        divergence: Diverged | None = None
        try:
            while self.step < self.max_steps:
                self.train_step()
                self.step += 1
                last = self.step == self.max_steps
                if self.step % tc.log_every == 0 or last:
                    self.log_train()
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    self.evaluate()
        except Diverged as e:
            divergence = e
            if self.dist.is_main:
                log.error(str(e))
        return self.finish(divergence, time.perf_counter() - start)

    def train_step(self) -> None:
        tc = self.cfg.trainer
        accum, rank, world = tc.grad_accum_steps, self.dist.rank, self.dist.world_size
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            rows = self.batches.rows(self.step, micro, accum, rank, world)
            x, y = self.data.x_train[rows], self.data.y_train[rows]
            # Gradients are all-reduced once per optimizer step: on the last micro-batch.
            with self.engine.sync_context(sync=micro == accum - 1):
                loss = task_loss(self.data.task, self.engine.model(x), y)
                objective = loss + self.penalty() if self.penalty.active else loss
                (objective / accum).backward()
            losses.append(loss.detach())
        step_loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        grad_norm = self.engine.clip_gradients(tc.grad_clip_norm, tc.grad_clip_value)
        lr = self.optimizer.param_groups[0]["lr"]
        # `stop` looks at the next log step (no per-step host sync); `skip` must decide now, and
        # all ranks must agree: a loss can be non-finite on one rank while the gradients are not.
        if tc.on_nonfinite == "skip" and self._any_nonfinite(step_loss, grad_norm):
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self._pending.append((self.step + 1, step_loss, grad_norm, lr))
        if not is_plateau(self.scheduler):
            self.scheduler.step()

    def log_train(self) -> None:
        losses, norms, lrs = self._drain()
        if not len(losses):  # every step of the interval was skipped
            return
        elapsed = time.perf_counter() - self._interval_start
        self._interval_start = time.perf_counter()
        self.last_train_loss = losses.mean().item()
        row = {
            "step": self.step,
            "epoch": self.batches.epoch_of(self.step - 1),
            "train/loss": self.last_train_loss,
            "lr": lrs[-1],
            "grad_norm": norms.mean().item(),
            "samples/s": len(losses) * self.cfg.data.batch_size / max(elapsed, 1e-9),
        }
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        self.tracker.log(row)

    def evaluate(self) -> None:
        self._drain()  # never evaluate (or later save) a model that has already diverged
        if self.evaluator is None:
            self.evaluator = Evaluator(
                self.data.preprocessing, self.dist.device, self.cfg.data.eval_batch_size
            )
        metrics = self.evaluator.evaluate(self.engine.module, self.x_val, self.y_val)
        if is_plateau(self.scheduler):
            self.scheduler.step(metrics["val/loss"])
        self.last_eval = metrics
        self.tracker.log(
            {"step": self.step, "epoch": self.batches.epoch_of(self.step - 1), **metrics}
        )

    def finish(self, divergence: Diverged | None, wall_time: float) -> dict[str, Any]:
        summary = {
            "step": self.step,
            "epoch": self.batches.epoch_of(max(self.step - 1, 0)),
            "train/loss": self.last_train_loss,
            **self.last_eval,
            "diverged": divergence is not None,
            "wall_time_s": wall_time,
        }
        if divergence is not None:
            summary["diverged_at_step"] = divergence.step
            summary["error"] = str(divergence)
        if self.skipped_steps:
            summary["skipped_steps"] = self.skipped_steps
        if self.dist.is_main:
            # A diverged model holds non-finite weights: no model.pt, so nothing misleading on disk.
            if divergence is None:
                state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
                atomic_torch_save(state, self.run_dir / "model.pt")
            self.data.preprocessing.save(self.run_dir / "preprocessing.json")
            atomic_save_json(summary, self.run_dir / "summary.json")
        self.tracker.finish(summary)
        self.tracker.close()
        return summary

    # ------------------------------------------------------------------ helpers

    def _any_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(grad_norm)).float()
        return self.dist.all_reduce_sum(bad.reshape(1)).item() > 0

    def _drain(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Read the pending per-step values (one host sync); raise Diverged on a non-finite one.

        Losses are averaged over ranks here, once per log interval instead of once per step.
        """
        pending, self._pending = self._pending, []
        if not pending:
            empty = torch.empty(0)
            return empty, empty, []
        losses = torch.stack([p[1] for p in pending]).float()
        norms = torch.stack([p[2] for p in pending]).float()
        lrs = [p[3] for p in pending]
        losses = self.dist.all_reduce_mean(losses).cpu()
        norms = norms.cpu()
        bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise Diverged(pending[i][0], losses[i].item(), lrs[i])
        return losses, norms, lrs


def seed_rank(seed: int, rank: int) -> None:
    """Seed every RNG the loop or user code may draw from, distinct per rank."""
    s = seed * 1000 + rank + 1
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
