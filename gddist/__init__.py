"""gddist: Hydra-configured distributed data-parallel training of mini-batch gradient descent."""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["UserError", "fit", "run"]


def __getattr__(name: str) -> Any:
    """`gddist.fit` and `gddist.UserError`, imported on first use (train.py starts without them)."""
    if name == "fit":
        from gddist.api import fit

        return fit
    if name == "UserError":
        from gddist.config import UserError

        return UserError
    raise AttributeError(f"module 'gddist' has no attribute {name!r}")


def run(cfg: Any, run_dir: str | Path, objects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one run described by `cfg` (a `Config` or a plain dict) into `run_dir`.

    `objects` are Python objects standing for config nodes (`gddist.fit` passes them): by key,
    "data.train", "data.val", "data.collate" (named `{"_object_": qualname}` in the config),
    "model" (a module or factory), "loss" (a callable).

    Order matters (docs/architecture.md, invariant 6): config, run-dir, world-size and data checks
    all happen before the process group is joined, so a user mistake fails fast with one line on
    every rank. Then rank 0 takes the run dir's lock (one live run per run dir; a second launch
    fails with one line naming the holder). The lock is released and the process group torn
    down whatever happens.
    """
    from gddist import data as data_mod
    from gddist import dist as dist_mod
    from gddist import rundir
    from gddist.config import Config
    from gddist.engine import check_precision
    from gddist.hparams import check_metric
    from gddist.metrics import check_monitor, check_save_best, metric_names
    from gddist.signals import requeue_slurm_job
    from gddist.trainer import Trainer

    if not isinstance(cfg, Config):
        cfg = Config.from_dict(cfg)
    env = dist_mod.detect_launch()
    rundir.check_creatable(Path(run_dir))
    cfg.check_world(env.world_size)
    check_precision(cfg.trainer.precision, dist_mod.pick_device(cfg.dist.device, env.local_rank))
    data = data_mod.build(
        cfg.data, cfg.seed, loss=cfg.loss.name, metrics=cfg.metrics.name, objects=objects
    )
    # The task's metrics are known from here on: the metrics config, its extras and the
    # monitored metric are checked before the process group is joined.
    check_monitor(cfg.early_stopping, data.task, cfg.metrics, data.num_outputs, objects)
    check_save_best(cfg.checkpoint.save_best, data.task, cfg.metrics)
    check_metric(cfg.optimized_metric, metric_names(data.task, cfg.metrics))
    dist = dist_mod.init(cfg.dist, env)
    lock = None
    try:
        lock = rundir.lock(Path(run_dir), dist)
        summary = Trainer(cfg, data, dist, Path(run_dir), objects).fit()
        if "signal" in summary:
            if dist.is_main:
                if summary["signal"] == signal.SIGUSR1:  # preempted on SLURM: come back, resume
                    requeue_slurm_job()  # a no-op outside SLURM
                print(
                    f"gddist: stopped by {signal.Signals(summary['signal']).name} at step "
                    f"{summary['step']} after saving a checkpoint in {run_dir}; to resume, run: "
                    f"{rundir.resume_command(Path(run_dir), summary['signal'])}",
                    file=sys.stderr,
                    flush=True,
                )
            # No rank exits (and gets the others killed by torchrun, or the job torn down by
            # SLURM) before rank 0 has requeued the job and said how to resume.
            dist.barrier()
    except Exception as e:
        if not (dist.distributed and dist_mod.is_peer_failure(e)):
            raise
        missing = dist.unresponsive_ranks()
        who = f"rank(s) {', '.join(map(str, missing))}" if missing else "another rank"
        raise dist_mod.PeerFailure(
            f"rank {dist.rank}: {who} died or did not answer within dist.timeout_s="
            f"{cfg.dist.timeout_s:g}s ({str(e).splitlines()[0][:200]}); rerun the same command "
            "to resume from the last checkpoint"
        ) from None
    finally:
        if lock is not None:
            lock.release()
        dist.close()
    return summary
