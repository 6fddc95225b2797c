"""gddist: Hydra-configured distributed data-parallel training of mini-batch gradient descent."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def run(cfg: Any, run_dir: str | Path) -> dict[str, Any]:
    """Train one run described by `cfg` (a `Config` or a plain dict) into `run_dir`.

    Order matters (DESIGN.md invariant 6): config, world-size and data checks all happen before the
    process group is joined, so a user mistake fails fast with one line on every rank. The process
    group is always torn down, whatever happens.
    """
    from gddist import data as data_mod
    from gddist import dist as dist_mod
    from gddist.config import Config
    from gddist.engine import check_precision
    from gddist.metrics import check_monitor
    from gddist.signals import requeue_slurm_job
    from gddist.trainer import Trainer

    if not isinstance(cfg, Config):
        cfg = Config.from_dict(cfg)
    env = dist_mod.detect_launch()
    cfg.check_world(env.world_size)
    check_precision(cfg.trainer.precision, dist_mod.pick_device(cfg.dist.device, env.local_rank))
    data = data_mod.build(cfg.data, cfg.seed)
    check_monitor(cfg.early_stopping, data.task)  # the task's metrics are known from here on
    dist = dist_mod.init(cfg.dist, env)
    try:
        summary = Trainer(cfg, data, dist, Path(run_dir)).fit()
        if summary.get("signal") == signal.SIGUSR1:  # preempted on SLURM: come back and resume
            if dist.is_main:
                requeue_slurm_job()  # a no-op outside SLURM
            dist.barrier()  # no rank exits (and gets the job torn down) before the requeue
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
        dist.close()
    return summary
