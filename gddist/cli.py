"""The glue between Hydra and gddist: resolvers, early override checks, the task function.

Exit codes of `python train.py`: 0 done (or early-stopped); 2 bad config or data (one line on
stderr); 3 the run diverged under trainer.on_nonfinite=stop (summary.json says diverged: true);
4 another rank died or hung past dist.timeout_s; 128+N stopped by signal N after saving a
checkpoint (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1): rerun the same command to resume.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gddist.config import UserError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PEER_FAILURE = 4
NONZERO_RANK_EXIT_DELAY_S = 10.0

log = logging.getLogger("gddist")


def run_name_resolver(*, _root_: Any) -> str:
    """`${gddist_run_name:}`: the run dir name from the composed config (gddist.rundir.run_name).

    OmegaConf hands a resolver the config root when it asks for `_root_`; Hydra resolves
    `hydra.run.dir` in the full config, so the task keys (everything but `hydra`) are resolved
    here on their own, without touching the node being resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from gddist.rundir import run_name

    config = {}
    for key in _root_:
        if key == "hydra":
            continue
        value = _root_[key]
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        config[key] = value
    return run_name(config)


def call_resolver(path: str) -> Any:
    """`${gddist_call:pkg.module.fn}`: the value `fn()` returns, computed wherever the config is
    resolved (every rank, before any data is read). For a value a small step must produce first,
    e.g. `data.path: ${gddist_call:gddist.examples.healthcare.csv_path}` writes a CSV and names
    it; the function must be deterministic and safe to run on several ranks at once."""
    from gddist.targets import import_target

    fn = import_target("${gddist_call:...}", path, "a function of no arguments")
    return fn()


def output_subdir() -> str | None:
    """Hydra writes .hydra/ (the composed config) from rank 0 only."""
    from gddist.dist import detect_launch

    return ".hydra" if detect_launch().rank == 0 else None


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("gddist_run_name", run_name_resolver, replace=True)
    OmegaConf.register_new_resolver("gddist_output_subdir", output_subdir, replace=True)
    OmegaConf.register_new_resolver("gddist_call", call_resolver, replace=True)


def check_overrides(argv: Sequence[str], conf_dir: Path) -> None:
    """Reject bad command-line overrides with one line, before Hydra starts.

    Hydra would reject them too, but with a multi-line report. An unknown `group=option` lists the
    choices; any other composition error (an unknown key, a bad value type) is condensed to its
    message. Runs only for plain `key=value` command lines (not with Hydra flags like -m or -cn).
    First, on any command line, an Optuna sweep started under torchrun or srun is refused
    (gddist.hparams.check_sweep_launch).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gddist.hparams import check_sweep_launch

    check_sweep_launch(argv, conf_dir)

    flags = any(a.startswith("-") for a in argv)  # -m, --cfg job, -cn NAME ...
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # a malformed override
        raise UserError(_one_line(e)) from None
    _check_run_dir(overrides)
    dirs = _config_dirs(argv, overrides, conf_dir)
    for o in overrides:
        group = o.key_or_group
        if group.startswith("hydra/"):  # Hydra's own groups also take installed plugins' options
            if group == "hydra/launcher" and o.value() == "slurm":
                _require_submitit()
            if group == "hydra/sweeper" and o.value() == "optuna":
                _require_optuna()
            continue
        if group == "hparams_search" and not o.is_delete():  # every preset uses the optuna sweeper
            _require_optuna()
        if dirs is None or o.is_delete() or o.package:
            continue
        groups = [d / group for d in dirs if (d / group).is_dir()]
        if not groups:
            continue
        choices = sorted({p.stem for g in groups for p in g.glob("*.yaml")})
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        for value in values:
            if value is not None and str(value) not in choices:
                raise UserError(
                    f"unknown {group} option {str(value)!r}; choose one of: {', '.join(choices)}"
                )
    if flags or any(o.is_sweep_override() for o in overrides):
        return  # composition of sweeps and flagged command lines is left to Hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        try:
            compose("config", overrides=list(argv))
        except Exception as e:
            raise UserError(_one_line(e)) from None


def _config_dirs(argv: Sequence[str], overrides: list[Any], conf_dir: Path) -> list[Path] | None:
    """conf/ plus the user's config dirs (`--config-dir DIR` / `-cd DIR`, `hydra.searchpath`),
    whose groups and options count as known; None when one is not a plain directory (e.g. a
    `pkg://` search path entry): then the options of every group are left to Hydra to check."""
    dirs = [conf_dir]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    for o in overrides:
        if o.key_or_group != "hydra.searchpath" or o.is_delete():
            continue
        entries = o.value() if isinstance(o.value(), list) else [o.value()]
        for entry in map(str, entries):
            if entry.startswith("file://"):
                dirs.append(Path(entry[len("file://") :]))
            elif "://" in entry:
                return None
            else:
                dirs.append(Path(entry))
    return dirs


def _check_run_dir(overrides: list[Any]) -> None:
    """A run dir that cannot be created fails here in one line, not in Hydra with a traceback:
    the explicit `hydra.run.dir`, else `outputs/` (the default run dirs' parent)."""
    from gddist.rundir import check_creatable

    run_dir = "outputs"
    for o in overrides:
        if o.key_or_group == "hydra.run.dir" and not o.is_delete():
            run_dir = str(o.value())
    if "${" not in run_dir:  # interpolated dirs are resolved by Hydra
        check_creatable(Path(run_dir))


def _require_submitit() -> None:
    """conf/hydra/launcher/slurm.yaml extends the plugin's submitit_slurm: say how to get it."""
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise UserError(
            "hydra/launcher=slurm needs the Hydra submitit launcher; "
            "pip install 'gddist[slurm]' (or hydra-submitit-launcher)"
        )


def _require_optuna() -> None:
    """conf/hparams_search/* choose the plugin's optuna sweeper: say how to get it."""
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise UserError(
            "hparams_search (hydra/sweeper=optuna) needs the Hydra Optuna sweeper; "
            "pip install 'gddist[optuna]' (or hydra-optuna-sweeper)"
        )


def _one_line(e: Exception) -> str:
    unknown = re.match(r"Could not override '([^']+)'", str(e))
    if unknown:
        key = unknown.group(1)
        return f"unknown config key {key!r}; check the spelling, or add a new key with +{key}=..."
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(" ")]
    return "; ".join(lines) or type(e).__name__


def fail(message: str) -> None:
    """Print a user error as one line (rank 0 only) and exit with EXIT_USER_ERROR.

    Every rank meets the same config/data error. The others wait a little before exiting: when
    one exits, torchrun kills the rest, and rank 0 must have printed the message by then.
    """
    from gddist.dist import detect_launch

    if detect_launch().rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(NONZERO_RANK_EXIT_DELAY_S)
    sys.exit(EXIT_USER_ERROR)


def task(cfg: Any) -> dict[str, Any] | float | None:
    """The body of the Hydra task function: DictConfig in, a trained run in the Hydra run dir.

    Returns the run's summary dict, or, when `optimized_metric` is set, its objective as a float
    (gddist.hparams.objective: the metric's final value; the worst value of
    `hydra.sweeper.direction`, +inf or -inf, for a diverged run), the job's return value that
    Hydra's sweepers read. Every rank returns it; launchers of multi-process jobs report rank 0's.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import gddist
    from gddist.dist import PeerFailure, detect_launch
    from gddist.hparams import direction_of, objective

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if detect_launch().rank != 0:
        logging.getLogger("gddist").setLevel(logging.WARNING)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        metric = plain.get("optimized_metric")
        if metric is not None:  # checked before training: the basic sweeper has no direction
            direction = direction_of(hydra_cfg.sweeper.get("direction", "minimize"))
        summary = gddist.run(plain, run_dir)
    except UserError as e:
        fail(str(e))
    except PeerFailure as e:  # every surviving rank says it: rank 0 may be the one that died
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PEER_FAILURE)
    except Exception as e:  # omegaconf's MissingMandatoryValue and interpolation errors
        if type(e).__module__.startswith("omegaconf"):
            fail(f"config: {e}".splitlines()[0])
        raise
    if "signal" in summary:  # gddist.run said how to resume
        sys.exit(128 + summary["signal"])
    multirun = str(hydra_cfg.mode) == "RunMode.MULTIRUN"
    if summary["diverged"] and not multirun:  # in a sweep a diverged job is a result, not a crash
        sys.exit(EXIT_DIVERGED)
    if metric is None:
        return summary
    value = objective(summary, metric, direction)
    log.info("objective %s (%s): %s", metric, direction, value)
    return value
