"""The training loop: read it top to bottom in `fit` and `train_step`.

One optimizer step = `grad_accum_steps` micro-batches of this rank's slice of the global batch ->
forward -> loss (+ L1/L2 penalty) -> backward (all-reduce only on the last micro-batch) -> clip ->
optimizer step -> LR schedule. Host syncs happen only at log / eval / checkpoint / stop-check
steps: per-step losses and gradient norms stay on the device in a short list that each log step
drains.

Everything the next step depends on is in `state_dict()` (plus each rank's RNG states), so a run
resumed from a checkpoint continues bit for bit (docs/architecture.md, invariant 2).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gddist import engine as engine_mod
from gddist import losses as loss_mod
from gddist import models, pending, rundir, tracking
from gddist.checkpoint import Checkpointer
from gddist.config import Config, UserError
from gddist.data import GlobalBatches, feeds
from gddist.dist import Dist
from gddist.early_stopping import EarlyStopping
from gddist.io import atomic_save_json, atomic_torch_save, disk_errors, read_json
from gddist.metrics import Evaluator, check_monitor, check_save_best, shard_bounds
from gddist.optim import Penalty, build_optimizer, build_scheduler, horizon, is_constant, is_plateau
from gddist.pending import Diverged
from gddist.resume import restore
from gddist.signals import StopSignals
from gddist.state import rng_state, seed_rank
from gddist.stopvote import StopVote
from gddist.targets import import_target

log = logging.getLogger("gddist")

BEST = "best.pt"  # checkpoint.save_best's weights, in the checkpoint dir


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: Any,
        dist: Dist,
        run_dir: Path,
        objects: Mapping[str, Any] | None = None,
    ) -> None:
        """`data` is a source of gddist.data.build; `objects` are gddist.fit's Python objects by
        config key (its "model" is a module or factory used instead of model._target_)."""
        self.cfg = cfg
        self.dist = dist
        self.run_dir = Path(run_dir)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # In memory: the tensors move to the device once. DataLoader: rows stay where they are
        # (CPU memory, or disk for data=npy) and each batch is moved as it is read.
        workers = cfg.data.uses_dataloader
        self.data = data if workers else data.to(dist.device)
        order_device = torch.device("cpu") if workers else dist.device
        self.batches = GlobalBatches(
            data.num_rows("train"), cfg.data.batch_size, cfg.seed, order_device
        )
        tc = cfg.trainer
        self.max_steps = tc.max_steps or tc.max_epochs * self.batches.steps_per_epoch
        self.feed = feeds.build(
            cfg.data,
            self.data,
            self.batches,
            tc.grad_accum_steps,
            dist.rank,
            dist.world_size,
            dist.device,
            self.max_steps,
        )
        # As gddist.run does, for direct callers: metrics and monitor fit the data and model.
        self.objects = objects or {}
        check_monitor(cfg.early_stopping, data.task, cfg.metrics, data.num_outputs, self.objects)
        check_save_best(cfg.checkpoint.save_best, data.task, cfg.metrics)
        n_val = data.num_rows("val")
        if n_val < dist.world_size:
            raise UserError(
                f"{n_val} validation rows cannot be shared by {dist.world_size} processes; "
                "raise data.val_fraction"
            )
        # Each rank evaluates a contiguous shard; no padding, so no row is counted twice.
        self.val_shard = shard_bounds(n_val, dist.rank, dist.world_size)  # [lo, hi) of val rows

        # Same initial weights on every rank and at every world size; then per-rank streams
        # (dropout) so ranks do not draw identical masks.
        torch.manual_seed(cfg.seed)
        prebuilt = self.objects.get("model")
        model = models.build(cfg.model, data.num_features, data.num_outputs, prebuilt)
        model = model.to(dist.device)
        seed_rank(cfg.seed, dist.rank)
        # Checked at its first call.
        self.loss = loss_mod.build(cfg.loss, data.task, dist.device, self.objects.get("loss"))
        self.engine = engine_mod.build(cfg, model, dist)
        self.optimizer = self.engine.prepare_optimizer(
            build_optimizer(cfg.optimizer, model.parameters())
        )
        # The run's max steps when it started: the LR schedule's horizon unless
        # scheduler.total_steps says otherwise (restored by a resume: see gddist/resume.py).
        self.start_max_steps = self.max_steps
        self.scheduler = build_scheduler(
            cfg.scheduler, self.optimizer, cfg.optimizer.lr, horizon(cfg.scheduler, self.max_steps)
        )
        # A constant LR needs no per-step scheduler call (~10 us of Python on the hot path); its
        # state stays the same whether or not a run was resumed. Plateau steps at evaluations.
        self._step_scheduler = not is_plateau(self.scheduler) and not is_constant(cfg.scheduler)
        self.penalty = Penalty(cfg.regularization, models.weight_matrices(model))
        self.evaluator: Evaluator | None = None  # built at the first evaluation (lazy import)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, dist, cfg.dist.timeout_s)
        self.signals = StopSignals()
        # logger.on_end: imported now, so that a bad path fails before training.
        self.on_end = None
        if cfg.logger.on_end:
            self.on_end = import_target(
                "logger.on_end", cfg.logger.on_end, "a function (run_dir, config, model) -> dict"
            )

        self.step = 0  # optimizer steps completed
        self.skipped_steps = 0
        self.last_train_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.early_stopping = EarlyStopping(cfg.early_stopping)
        # checkpoint.save_best: {"metric", "mode", "value", "step"} of the weights in best.pt, in
        # the trainer state, so that a resumed run only replaces them with better ones.
        self.best: dict[str, Any] | None = None
        self.stop_reason: str | None = None  # "early_stopping" or a signal name
        self.stop_signal: int | None = None
        self.stop_vote: StopVote | None = None  # created by fit()
        self.saved_step = -1  # step of the newest checkpoint this process wrote or loaded
        # Per-step (step, loss, grad norm, lr) since the last log, drained by _drain(): bounded.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []

        run_id = None
        resume = rundir.continue_or_archive(
            self.run_dir, self.checkpointer, cfg.checkpoint.resume, dist
        )
        if resume is not None:
            run_id = self.load_checkpoint(resume)
        elif dist.is_main:
            log.info("run dir %s: fresh start (%d steps)", self.run_dir, self.max_steps)
        self.tracker = tracking.build(
            self.run_dir,
            dist.is_main,
            cfg.logger,
            cfg.to_dict(),
            run_id=run_id,
            total_steps=self.max_steps,
            start_step=self.step,
        )
        self._interval_start = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to trainer.max_steps (or max_epochs, or an agreed stop) and write the outputs.

        Returns the summary. A stop signal ends the loop on a step every rank agrees on, after a
        checkpoint; the caller maps `summary["signal"]` to the exit code.
        """
        if self.is_complete():
            return self._already_complete()
        tc, every = self.cfg.trainer, self.cfg.checkpoint.every_steps
        start = time.perf_counter()
        self.engine.model.train()
        divergence: Diverged | None = None
        reserve = self.cfg.checkpoint.async_save  # staging for async saves, after one step
        self.stop_vote = StopVote(self.dist, tc.stop_check_every, tc.stop_check_s, self.step)
        with self.signals:
            try:
                while self.step < self.max_steps:
                    self.train_step()
                    self.step += 1
                    if reserve:  # the optimizer state exists now: its shapes are final
                        self.checkpointer.reserve(self.state_dict(), {"rng": rng_state()})
                        reserve = False
                    last = self.step == self.max_steps
                    if self.step % tc.log_every == 0 or last:
                        self.log_train()
                    if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                        self.evaluate()
                    if every and self.step % every == 0:
                        self.save_checkpoint()
                    if self.should_stop():
                        break
                self.save_checkpoint()  # the final state, or the state to resume from
            except Diverged as e:
                divergence = e
                if self.dist.is_main:
                    log.error(str(e))
        return self.finish(divergence, time.perf_counter() - start)

    def should_stop(self) -> bool:
        """Early stopping (decided from global metrics, so alike on all ranks) or a stop signal
        that any rank received (agreed by the vote of gddist/stopvote.py: on the same step on
        every rank, within trainer.stop_check_every steps or trainer.stop_check_s seconds)."""
        if self.stop_reason is not None:
            return True
        signum = self.stop_vote.poll(self.step, self.signals.received or 0)
        if signum:
            self.stop_signal = signum
            self.stop_reason = signal.Signals(signum).name
            if self.dist.is_main:
                log.warning("stopping at step %d on %s", self.step, self.stop_reason)
        return signum > 0

    def train_step(self) -> None:
        tc = self.cfg.trainer
        accum = tc.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            x, y = self.feed.train(self.step, micro)
            # Gradients are all-reduced once per optimizer step: on the last micro-batch.
            with self.engine.sync_context(sync=micro == accum - 1):
                with self.engine.autocast():
                    loss = self.loss(models.forward(self.engine.model, x), y)
                    objective = loss + self.penalty() if self.penalty.active else loss
                self.engine.backward(objective / accum if accum > 1 else objective)
            losses.append(loss.detach())
        step_loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        # The norm is measured on log steps (and wherever clipping or `skip` needs it).
        logs = (self.step + 1) % tc.log_every == 0 or self.step + 1 == self.max_steps
        measure = logs or tc.on_nonfinite == "skip"
        grad_norm = self.engine.clip_gradients(
            self.optimizer, tc.grad_clip_norm, tc.grad_clip_value, measure
        )
        lr = self.optimizer.param_groups[0]["lr"]
        # `stop` looks at the next log step (no per-step host sync); `skip` must decide now, and
        # all ranks must agree: a loss can be non-finite on one rank while the gradients are not.
        if tc.on_nonfinite == "skip" and self._any_nonfinite(step_loss, grad_norm):
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.engine.step(self.optimizer)
            self._pending.append((self.step + 1, step_loss, grad_norm, lr))
        if self._step_scheduler:
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
            "grad_norm": torch.nanmean(norms).item(),
            "samples/s": len(losses) * self.cfg.data.batch_size / max(elapsed, 1e-9),
        }
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        if hasattr(self.engine.module, "extra_log"):  # a model's own values, e.g. function's point
            row.update(self.engine.module.extra_log())
        self.tracker.log(row)

    def save_checkpoint(self) -> None:
        if self.step == self.saved_step:
            return
        self._check_finite()  # never checkpoint a model that has already diverged
        self.checkpointer.save(self.step, self.state_dict(), {"rng": rng_state()})
        self.saved_step = self.step

    def evaluate(self) -> None:
        # Never evaluate (or later save) a model that has already diverged; the pending losses
        # stay for the next train log row, and the evaluation's time is not training time.
        self._check_finite()
        began = time.perf_counter()
        self._evaluate()
        self._interval_start += time.perf_counter() - began

    def _evaluate_build(self) -> None:
        self.evaluator = Evaluator(
            self.data.preprocessing,
            self.dist.device,
            self.cfg.metrics,
            self.data.num_outputs,
            loss=self.loss,
            objects=self.objects,
        )

    def _evaluate(self) -> None:
        if self.evaluator is None:
            self._evaluate_build()
        batches = self.feed.val(*self.val_shard, self.cfg.data.eval_batch_size)
        metrics = self.evaluator.evaluate(self.engine.module, batches)
        if is_plateau(self.scheduler):
            self.scheduler.step(metrics["val/loss"])
        self.last_eval = metrics
        self._save_best(metrics)
        self._early_stopping(metrics)
        self.tracker.log(
            {"step": self.step, "epoch": self.batches.epoch_of(self.step - 1), **metrics}
        )

    @property
    def best_path(self) -> Path:
        """checkpoint.save_best's weights: outside the step_* dirs, so pruning never sees them."""
        return self.checkpointer.dir / BEST

    def _save_best(self, metrics: dict[str, float]) -> None:
        """checkpoint.save_best: rank 0 writes the weights when the metric improved on the best
        so far (the decision is made from global metrics, alike on every rank). A best of
        another metric or mode (changed on resume) does not count."""
        ck = self.cfg.checkpoint
        if ck.save_best is None:
            return
        value = metrics[ck.save_best]  # checked before training (check_save_best)
        best = self.best
        if best is not None and (best["metric"], best["mode"]) == (ck.save_best, ck.best_mode):
            better = value < best["value"] if ck.best_mode == "min" else value > best["value"]
            if not better:
                return
        self.best = {"metric": ck.save_best, "mode": ck.best_mode, "value": value}
        self.best["step"] = self.step
        if self.dist.is_main:
            weights = self.engine.module.state_dict().items()
            state = {k: v.detach().cpu() for k, v in weights}
            with disk_errors(self.best_path, "checkpoint.dir"):
                self.best_path.parent.mkdir(parents=True, exist_ok=True)
                # One file holds weights and facts, renamed into place when complete: a crash
                # leaves the previous best or this one, never a mix. best.json is a copy to read.
                atomic_torch_save({"model": state, **self.best}, self.best_path)
                atomic_save_json(self.best, self.best_path.with_suffix(".json"))

    def _test_metrics(self) -> dict[str, float]:
        """test/<metric> of the final model and, with checkpoint.save_best, test_best/<metric>
        of the best one, on the test split (every rank evaluates its shard: exact over the
        whole split, like val). Empty without a test split."""
        n = self.data.num_rows("test")
        if n == 0:
            return {}
        if n < self.dist.world_size:
            raise UserError(
                f"{n} test rows cannot be shared by {self.dist.world_size} processes; raise "
                "data.test_fraction"
            )
        shard = shard_bounds(n, self.dist.rank, self.dist.world_size)
        bs = self.cfg.data.eval_batch_size
        if self.evaluator is None:
            self._evaluate_build()
        model = self.engine.module
        out = self.evaluator.evaluate(model, self.feed.val(*shard, bs, "test"))
        result = {"test/" + k.removeprefix("val/"): v for k, v in out.items()}
        # Rank 0 wrote best.pt during an evaluation; a collective orders that before the reads.
        self.dist.barrier()
        if self.cfg.checkpoint.save_best and self.best_path.is_file():
            import copy

            best = copy.deepcopy(model)
            saved = torch.load(self.best_path, map_location=self.dist.device, weights_only=True)
            best.load_state_dict(saved["model"])
            out = self.evaluator.evaluate(best, self.feed.val(*shard, bs, "test"))
            result.update({"test_best/" + k.removeprefix("val/"): v for k, v in out.items()})
            result["test_best/step"] = saved["step"]
        return result

    def finish(self, divergence: Diverged | None, wall_time: float) -> dict[str, Any]:
        self.checkpointer.wait()  # an async save still being written completes first
        tested = {}
        if divergence is None and self.stop_signal is None:
            tested = self._test_metrics()
        self.feed.close()  # DataLoader workers exit
        if self.stop_vote is not None:  # complete the collective in flight
            self.stop_vote.close()
        summary = {
            "step": self.step,
            "epoch": self.batches.epoch_of(max(self.step - 1, 0)),
            "train/loss": self.last_train_loss,
            **self.last_eval,
            **tested,
            "diverged": divergence is not None,
            "wall_time_s": wall_time,
        }
        if divergence is not None:
            summary["diverged_at_step"] = divergence.step
            summary["error"] = str(divergence)
        if self.skipped_steps:
            summary["skipped_steps"] = self.skipped_steps
        if self.stop_reason is not None:
            summary["stopped_by"] = self.stop_reason
        if self.stop_signal is not None:
            summary["signal"] = self.stop_signal
        if self.dist.is_main:
            # model.pt is the FINAL model: not written for a diverged run (non-finite weights) nor
            # for one stopped by a signal (its checkpoint resumes it; the resumed run writes it).
            with disk_errors(self.run_dir):  # a full disk is one line, not a traceback
                if divergence is None and self.stop_signal is None:
                    weights = self.engine.module.state_dict().items()
                    state = {k: v.detach().cpu() for k, v in weights}
                    atomic_torch_save(state, self.run_dir / "model.pt")
                    summary.update(self._on_end())
                self.data.preprocessing.save(self.run_dir / "preprocessing.json")
                # What gddist.runs reads back (evaluate, predict, explain), with the summary.
                atomic_save_json(self.cfg.to_dict(), self.run_dir / "config.json")
                atomic_save_json(summary, self.run_dir / "summary.json")
                if self.cfg.logger.plots:
                    from gddist.plots import plot_run  # lazy: matplotlib is a second of imports

                    plot_run(self.run_dir, self.cfg.to_dict())
        self.tracker.finish(summary)
        self.tracker.close()
        return summary

    def _on_end(self) -> dict[str, Any]:
        """logger.on_end's extra summary entries (rank 0, a run trained to its end): e.g. an
        example's baselines on the same split, a text sample, a prediction plot."""
        if self.on_end is None:
            return {}
        model = self.engine.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                extra = self.on_end(self.run_dir, self.cfg.to_dict(), model)
        finally:
            model.train(was_training)
        return dict(extra or {})

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks that the next step depends on (rank 0 saves it)."""
        return {
            "step": self.step,
            "epoch": self.batches.epoch_of(self.step),
            "position_in_epoch": self.step % self.batches.steps_per_epoch,
            # Device tensors: torch.save copies them out (sync), or the async staging copies them
            # into pinned buffers without blocking; loading maps them to CPU.
            "model": {k: v.detach() for k, v in self.engine.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "engine": self.engine.state_dict(),  # the fp16 GradScaler, when there is one
            "trainer": {
                "skipped_steps": self.skipped_steps,
                "last_train_loss": self.last_train_loss,
                "last_eval": self.last_eval,
                **self.early_stopping.state_dict(),
                "best": self.best,
                "start_max_steps": self.start_max_steps,
            },
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "tracker_run_id": self.tracker.run_id,
        }

    def load_checkpoint(self, path: Path) -> str | None:
        """Restore the state saved in `path` (see `gddist.resume.restore`); return the tracker
        run id it carries."""
        return restore(self, path)

    # ------------------------------------------------------------------ run dir

    def is_complete(self) -> bool:
        """Whether the resumed run had already finished: trained to max_steps, or early-stopped."""
        return self.step >= self.max_steps or self.early_stopping.stopped

    def _already_complete(self) -> dict[str, Any]:
        """A rerun of a finished run: say so and train nothing. Its outputs are returned as they
        are, or written now if the run ended before writing them (stopped at its last step)."""
        if self.dist.is_main:
            log.info(
                "run dir %s: complete at step %d; nothing to train. To train longer, raise "
                "trainer.max_steps (or max_epochs); to start afresh, pass "
                "checkpoint.resume=never (the finished run is archived)",
                self.run_dir,
                self.step,
            )
        prior = read_json(self.run_dir / "summary.json") if self.dist.is_main else None
        prior = self.dist.broadcast_object(prior)
        done = (
            prior is not None
            and prior.get("step") == self.step
            and "signal" not in prior
            and not prior.get("diverged")
        )
        if not done:
            return self.finish(None, 0.0)
        self.feed.close()
        self.tracker.close()
        return prior

    # ------------------------------------------------------------------ helpers

    def _early_stopping(self, metrics: dict[str, float]) -> None:
        if self.early_stopping.update(metrics):
            self.stop_reason = "early_stopping"
            if self.dist.is_main:
                es = self.cfg.early_stopping
                log.info(
                    "early stopping at step %d: %s has not improved on %.6g for %d evaluations",
                    self.step,
                    es.monitor,
                    self.early_stopping.best_metric,
                    es.patience,
                )

    def _any_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss)).float()
        if not self.engine.skips_nonfinite_steps:  # fp16's GradScaler handles overflowing grads
            bad = bad + (~torch.isfinite(grad_norm)).float()
        return self.dist.all_reduce_sum(bad.reshape(1)).item() > 0

    def _check_finite(self) -> None:
        """Raise Diverged if a pending step was non-finite; keep the values for the next log."""
        self._read_pending()

    def _drain(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Read and clear the pending per-step values (see `_read_pending`)."""
        values = self._read_pending()
        self._pending = []
        return values

    def _read_pending(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The pending per-step values (see `gddist.pending.read`): raise Diverged on a
        non-finite one."""
        return pending.read(self._pending, self.dist, self.engine.skips_nonfinite_steps)
