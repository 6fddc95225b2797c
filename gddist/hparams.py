"""Hyperparameter search: what a trial returns to Hydra's Optuna sweeper, and where a search runs.

    python train.py -m hparams_search=optuna experiment=lr_sweep     # conf/hparams_search/

The root key `optimized_metric` (null by default) names the value a run reports as its result:
`train/loss` (the mean over the last log interval) or a `val/*` metric of the final evaluation.
When it is set, the task function returns `objective(...)`, a float, which Hydra's sweepers read
as the job's return value; the Optuna sweeper minimizes or maximizes it
(`hydra.sweeper.direction`).

A diverged trial is a result, not a crash: its objective is the worst value of the direction,
+inf when minimizing and -inf when maximizing. Optuna records an infinite value as a COMPLETE
trial and TPE ranks it below every finite one, so the search moves away from it and goes on.
NaN it rejects (`study.tell` raises; the sweeper then marks the trial FAIL, a failure counted
against `max_failure_rate`, not a result). Trials are not pruned: a diverged run stops at once
(trainer.on_nonfinite=stop) and reports. A run whose objective is NaN or infinite without
being flagged diverged (e.g. under `trainer.on_nonfinite=skip`) counts as diverged too.

One sweeper per search: the sweep is driven by ONE process (`python train.py -m ...`), which
launches each trial as a normal run (in-process with Hydra's basic launcher, or a SLURM job of N
processes with `hydra/launcher=slurm`). Under torchrun or srun every process would run its own
sweeper, each asking its own sampler for trials; `check_sweep_launch` refuses that in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gddist.config import UserError

DIRECTIONS = ("minimize", "maximize")


def direction_of(value: Any) -> str:
    """The sweeper's `direction` as "minimize" | "maximize" (it may be a string, the optuna
    plugin's Direction enum, or a one-element list); UserError for a multi-objective list."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 1:
            raise UserError(
                f"hydra.sweeper.direction={list(map(str, value))}: a gddist run returns one "
                "objective (optimized_metric); give one direction, minimize or maximize"
            )
        value = value[0]
    name = getattr(value, "name", value)  # the plugin's Direction enum, or its name
    name = str(name)
    if name not in DIRECTIONS:
        raise UserError(f"hydra.sweeper.direction={name!r} must be minimize or maximize")
    return name


def worst(direction: str) -> float:
    """The objective of a diverged trial: the worst value for `direction`."""
    return math.inf if direction == "minimize" else -math.inf


def objective(summary: Mapping[str, Any], metric: str, direction: str = "minimize") -> float:
    """The value a finished run reports for `metric`: summary[metric], or `worst(direction)` when
    the run diverged or the value is missing or not finite. Never NaN (see the module docstring).
    """
    value = summary.get(metric)
    if summary.get("diverged") or not _finite(value):
        return worst(direction)
    return float(value)


def check_metric(metric: str | None, names: Sequence[str]) -> None:
    """Before training: `metric` is train/loss or one of the run's validation metrics `names`."""
    if metric is None or metric == "train/loss" or metric in names:
        return
    raise UserError(
        f"optimized_metric={metric!r} is not a metric of this run; choose train/loss or one of: "
        f"{', '.join(names)}"
    )


def check_sweep_launch(argv: Sequence[str], conf_dir: Path) -> None:
    """Refuse an Optuna sweep started under a multi-process launcher (torchrun, srun), one line.

    Only under a launcher with a world size > 1 is the command line composed (without its sweep
    overrides, which name the searched values, not the sweeper) to read `hydra.sweeper` and
    `hydra.mode`: the sweeper may come from `hparams_search=...`, `hydra/sweeper=optuna` or a
    preset. A command line that does not compose is left to the later checks and to Hydra."""
    from gddist.dist import detect_launch

    env = detect_launch()
    if env.world_size <= 1:
        return
    # Compose (a second of every rank's start) only for a command line that can be a search: a
    # multirun flag, or an override choosing a search preset, a sweeper or the run mode.
    hints = ("hparams_search", "hydra/sweeper", "hydra.mode", "experiment")
    flagged = any(a in ("-m", "--multirun") for a in argv)
    if not flagged and not any(h in a for a in argv for h in hints):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return
    plain = [a for a, o in zip(args, parsed, strict=True) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=plain, return_hydra_config=True)
    except Exception:
        return
    finally:
        GlobalHydra.instance().clear()
    sweeper = str(cfg.hydra.sweeper.get("_target_", ""))
    multirun = flagged or "MULTIRUN" in str(cfg.hydra.mode)
    if multirun and "optuna" in sweeper.lower():
        raise UserError(
            f"a hyperparameter search runs in one driver process, not under {env.launcher} "
            f"(rank {env.rank} of {env.world_size} here: one Optuna sweeper per process); run "
            "`python train.py -m hparams_search=...` without torchrun, and give each trial N "
            "processes with hydra/launcher=slurm hydra.launcher.tasks_per_node=N"
        )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
