"""Compare the jobs of a Hydra multirun: `python -m gddist.report MULTIRUN_DIR`.

(`python -m gddist.report --examples [RUNS_DIR]` instead trains or reads the application presets
and writes their results table: gddist/examples/table.py.)

Reads every job dir of the sweep (JOB/.hydra/overrides.yaml, JOB/summary.json,
JOB/metrics.jsonl) and writes MULTIRUN_DIR/report.md (a Markdown table, also printed) and
MULTIRUN_DIR/report.png (the compared metric against step for every job; for model=function runs,
also the paths on the function's contours).

Table: one row per job, in job order. Columns: the swept parameters (overrides whose value differs
between jobs; the common ones are listed above the table), `steps` (optimizer steps run),
`samples` (steps x global batch), the final metrics from summary.json, `steps to target` and
`samples to target`, `diverged` and `wall time (s)`; optionally `sparsity` and `best`.

Steps to target (how fast a job converged): the first logged step at which `metric` (train/loss
by default: the mean over each log interval) is at or below TARGET = OPTIMUM + `tolerance`, where
OPTIMUM is `optimum` when the problem's minimum is known, else the lowest value of `metric` that
any job of the sweep logged. "-" means never within the run.

Sparsity: the fraction of weight-matrix entries (parameters with ndim >= 2, the ones L1/L2
penalize) with |w| < `sparsity_threshold`, from JOB/model.pt.

Optuna sweeps (`python train.py -m hparams_search=optuna ...`, docs/hparams-search.md): one row
per trial, first `trial` (its number, the job's) and the searched parameters (every key of
`hydra.sweeper.params` and every override that differs between trials; floats to 4 significant
digits), then `objective (METRIC)` (gddist.hparams.objective of the trial's summary: what the
trial returned to Optuna, inf / -inf for a diverged one) and `best trial` (✓ on the trial with the
best objective for `hydra.sweeper.direction`). A note names the best trial and, when the sweep
finished, the best value Optuna wrote to MULTIRUN_DIR/optimization_results.yaml.

The experiment presets (conf/experiment/*.yaml) set these options through the Hydra callback in
gddist/hydra_callbacks.py; run by hand, the options are read from MULTIRUN_DIR/multirun.yaml (the
basic sweeper's) or the first job's .hydra/hydra.yaml (the Optuna sweeper writes no
multirun.yaml) when the sweep used that callback, and command-line flags override them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CALLBACK = "gddist.hydra_callbacks.SweepReport"


@dataclass
class ReportSpec:
    """What a report compares (see the module docstring for the definitions)."""

    metric: str = "train/loss"  # the curve in report.png and the steps-to-target metric
    tolerance: float = 0.01  # TARGET = OPTIMUM + tolerance (units of `metric`)
    optimum: float | None = None  # the known minimum of `metric`; None: best in the sweep
    columns: list[str] | None = None  # summary keys shown; None: train/loss and every val/*
    sparsity_threshold: float | None = None  # show weight sparsity with this |w| threshold
    best: bool = False  # mark the non-diverged job with the lowest final `metric`
    labels: dict[str, str] = field(default_factory=dict)  # override key -> column title
    log_y: bool | None = None  # log scale in report.png; None: when values span > 2 decades
    x_axis: str = "step"  # report.png's x axis: step | samples (steps x global batch)

    def __post_init__(self) -> None:
        if self.x_axis not in ("step", "samples"):
            raise ValueError(f"x_axis={self.x_axis!r} must be step or samples")


@dataclass
class Job:
    dir: Path
    overrides: dict[str, str]  # key -> value, as written on the command line
    summary: dict[str, Any] | None  # None: the job left no summary.json (it crashed)
    rows: list[dict[str, Any]]
    config: dict[str, Any] | None  # JOB/.hydra/config.yaml


@dataclass
class Study:
    """An Optuna sweep's search, as its jobs and the sweeper recorded it."""

    metric: str  # optimized_metric
    direction: str  # minimize | maximize
    params: list[str]  # the keys of hydra.sweeper.params
    best_value: float | None  # optimization_results.yaml (None: the sweep did not finish)


def sweep_hydra_config(multirun_dir: Path) -> dict[str, Any]:
    """The sweep's `hydra` node: MULTIRUN_DIR/multirun.yaml (basic sweeper), else the first job's
    .hydra/hydra.yaml (every job has the sweep's hydra config; the Optuna sweeper writes no
    multirun.yaml); {} when neither exists."""
    from omegaconf import OmegaConf

    multirun_dir = Path(multirun_dir)
    paths = [multirun_dir / "multirun.yaml"]
    paths += sorted(multirun_dir.glob("*/.hydra/hydra.yaml"), key=_job_order)
    for path in paths:
        if path.exists():
            cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return cfg.get("hydra") or {}
    return {}


def load_study(multirun_dir: Path, jobs: list[Job]) -> Study | None:
    """The Optuna search of the sweep (None when its sweeper was not Optuna's)."""
    from omegaconf import OmegaConf

    from gddist.hparams import direction_of

    sweeper = sweep_hydra_config(multirun_dir).get("sweeper") or {}
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    metric = next(
        (j.config["optimized_metric"] for j in jobs if (j.config or {}).get("optimized_metric")),
        None,
    )
    if metric is None:
        raise FileNotFoundError(
            f"the Optuna sweep {multirun_dir} has no optimized_metric in its jobs' "
            ".hydra/config.yaml; set optimized_metric=val/loss (hparams_search=optuna does)"
        )
    results = Path(multirun_dir) / "optimization_results.yaml"
    best_value = None
    if results.exists():
        best_value = OmegaConf.to_container(OmegaConf.load(results)).get("best_value")
    direction = direction_of(sweeper.get("direction") or "minimize")
    return Study(metric, direction, list(sweeper.get("params") or {}), best_value)


def load_jobs(multirun_dir: Path) -> list[Job]:
    """Every job dir under `multirun_dir` (a dir with .hydra/overrides.yaml), in job order."""
    from omegaconf import OmegaConf

    from gddist.plots import read_rows

    dirs = [p.parent.parent for p in Path(multirun_dir).glob("*/.hydra/overrides.yaml")]
    dirs.sort(key=lambda d: _job_order(d / ".hydra"))
    jobs = []
    for d in dirs:
        overrides = {}
        for item in OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "overrides.yaml")):
            key, _, value = str(item).partition("=")
            overrides[key] = value
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        rows = read_rows(d) if (d / "metrics.jsonl").exists() else []
        config_path = d / ".hydra" / "config.yaml"
        config = (
            OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.exists() else None
        )
        jobs.append(Job(d, overrides, summary, rows, config))
    return jobs


def swept_keys(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, {key: value} of the ones all jobs share)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in swept and k in jobs[0].overrides}
    if len(jobs) == 1:  # nothing varies: show the job's own overrides as its columns
        swept, common = keys, {}
    return swept, common


def target_value(jobs: list[Job], spec: ReportSpec) -> float | None:
    """OPTIMUM + tolerance (None when no job logged a finite value of the metric)."""
    if spec.optimum is not None:
        return spec.optimum + spec.tolerance
    values = [v for j in jobs for v in _values(j, spec.metric)]
    return min(values) + spec.tolerance if values else None


def steps_to_target(job: Job, metric: str, target: float | None) -> int | None:
    """The first logged step whose `metric` is <= target (None: never)."""
    if target is None:
        return None
    for row in job.rows:
        value = row.get(metric)
        if _finite(value) and value <= target:
            return row["step"]
    return None


def weight_sparsity(job_dir: Path, threshold: float) -> float | None:
    """Fraction of weight-matrix entries with |w| < threshold in JOB/model.pt (None: no model)."""
    path = job_dir / "model.pt"
    if not path.exists():
        return None
    import torch

    state = torch.load(path, weights_only=True)
    weights = [t.flatten() for t in state.values() if t.ndim >= 2]
    if not weights:
        return None
    flat = torch.cat(weights)
    return (flat.abs() < threshold).float().mean().item()


def table(
    jobs: list[Job], spec: ReportSpec, study: Study | None = None
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the report table; `study`: the Optuna sweep's trial columns."""
    swept, common = swept_keys(jobs)
    if study is not None:  # a searched key stays a column even if every trial drew one value
        searched = [k for k in study.params if any(k in j.overrides for j in jobs)]
        swept = searched + [k for k in swept if k not in searched]
        common = {k: v for k, v in common.items() if k not in swept}
    metric_cols = spec.columns or _default_columns(jobs)
    target = target_value(jobs, spec)
    best = _best_job(jobs, spec) if spec.best and study is None else None
    header = [spec.labels.get(k, k) for k in swept] + ["steps", "samples"] + metric_cols
    header += ["steps to target", "samples to target", "diverged", "wall time (s)"]
    if spec.sparsity_threshold is not None:
        header.append(f"sparsity (abs(w) < {spec.sparsity_threshold:g})")
    if spec.best and study is None:
        header.append("best")
    best_trial = None
    if study is not None:
        header = ["trial", *header, f"objective ({study.metric})", "best trial"]
        best_trial = _best_trial(jobs, study)
    body = []
    for job in jobs:
        s = job.summary or {}
        batch = (job.config or {}).get("data", {}).get("batch_size")
        step = s.get("step")
        row = [job.overrides.get(k, "") for k in swept]
        if study is not None:
            row = [job.dir.name] + [_fmt_value(v) for v in row]
        row += [_fmt(step), _fmt(step * batch if step is not None and batch else None)]
        row += [_fmt(s.get(c)) for c in metric_cols]
        reached = steps_to_target(job, spec.metric, target)
        row += [_fmt(reached), _fmt(reached * batch if reached is not None and batch else None)]
        if job.summary is None:
            row.append("no summary.json (crashed?)")
        elif s.get("diverged"):
            row.append(f"yes (step {s.get('diverged_at_step')})")
        else:
            row.append("no")
        row.append(_fmt(s.get("wall_time_s"), digits=3))
        if spec.sparsity_threshold is not None:
            row.append(_fmt(weight_sparsity(job.dir, spec.sparsity_threshold)))
        if spec.best and study is None:
            row.append("✓" if job is best else "")
        if study is not None:
            row.append(_fmt(_objective(job, study)) if job.summary is not None else "-")
            row.append("✓" if job is best_trial else "")
        body.append(row)
    notes = []
    if common:
        notes.append("Common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()))
    how = f"{spec.optimum:g} (known minimum)" if spec.optimum is not None else "best in sweep"
    notes.append(
        f"Target: {spec.metric} ≤ optimum + {spec.tolerance:g} = {_fmt(target)}; optimum: {how}."
    )
    if best is not None:
        label = ", ".join(f"{spec.labels.get(k, k)}={best.overrides.get(k, '')}" for k in swept)
        label = label or best.dir.name
        notes.append(f"Best: {label} (final {spec.metric} {_fmt(_final(best, spec.metric))}).")
    if study is not None:
        notes.append(_study_note(jobs, study, swept, best_trial))
    return header, body, notes


def markdown(header: list[str], body: list[list[str]], notes: list[str]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # | ends a cell

    lines = [line(header), "|" + "---|" * len(header)] + [line(row) for row in body]
    return "\n\n".join(notes) + "\n\n" + "\n".join(lines) + "\n"


def write_report(multirun_dir: Path, spec: ReportSpec | None = None) -> str:
    """Write MULTIRUN_DIR/report.md and report.png; return the Markdown."""
    multirun_dir = Path(multirun_dir)
    spec = spec or ReportSpec()
    jobs = load_jobs(multirun_dir)
    if not jobs:
        raise FileNotFoundError(
            f"no Hydra job dirs (*/.hydra/overrides.yaml) under {multirun_dir}; pass the sweep dir "
            "of a `python train.py -m ...` run, e.g. multirun/2025-01-31/12-00-00"
        )
    header, body, notes = table(jobs, spec, load_study(multirun_dir, jobs))
    text = f"# Sweep report: {multirun_dir}\n\n" + markdown(header, body, notes)
    text += "\n![curves](report.png)\n"
    (multirun_dir / "report.md").write_text(text)
    plot_report(jobs, spec, multirun_dir / "report.png")
    return text


def plot_report(jobs: list[Job], spec: ReportSpec, path: Path) -> None:
    """`metric` against step for every job in one chart (+ function paths on contours)."""
    from gddist import plots

    swept, _ = swept_keys(jobs)
    function = _function_of(jobs)
    ncols = 2 if function else 1
    fig, axes = plots.plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.6), squeeze=False)
    ax = axes[0][0]
    kept = []  # values of the jobs that did not diverge: they set the y range
    for job in jobs:
        steps, values = plots.series(job.rows, spec.metric)
        if spec.x_axis == "samples":
            batch = (job.config or {}).get("data", {}).get("batch_size") or 1
            steps = [s * batch for s in steps]
        label = ", ".join(f"{spec.labels.get(k, k)}={job.overrides.get(k, '')}" for k in swept)
        label = label or job.dir.name
        diverged = bool(job.summary and job.summary.get("diverged"))
        if diverged:
            label += " (diverged)"
        else:
            kept += values
        marker = "o" if len(steps) < 5 else None  # a diverged job may have one point
        ax.plot(steps, values, label=label, linewidth=1.3, marker=marker)
    log_y = spec.log_y if spec.log_y is not None else plots.spans_decades(kept)
    if log_y:
        ax.set_yscale("log")
    if kept:  # diverging curves leave through the top instead of flattening the others
        low, high = min(kept), max(kept)
        if log_y:
            ax.set_ylim(low / 1.5, high * 3)
        else:
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + 3 * pad)
    ax.set_xlabel("samples seen" if spec.x_axis == "samples" else "step")
    ax.set_ylabel(spec.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if function:
        ax = axes[0][1]
        plots.draw_contours(ax, function)
        for job in jobs:
            model = (job.config or {}).get("model", {})
            start = plots.function_start(model, (job.config or {}).get("seed", 0))
            plots.draw_path(ax, start, job.rows, label=None)
    fig.subplots_adjust(left=0.12 / ncols, right=0.98, bottom=0.12, top=0.93, wspace=0.25)
    fig.savefig(path, dpi=plots.DPI)
    plots.plt.close(fig)


# ---------------------------------------------------------------------------- options


def spec_from_multirun(multirun_dir: Path) -> ReportSpec:
    """The options the sweep's SweepReport callback had (sweep_hydra_config), else the
    defaults."""
    callbacks = sweep_hydra_config(multirun_dir).get("callbacks") or {}
    for params in callbacks.values():
        if params.get("_target_") == CALLBACK:
            return spec_from_dict({k: v for k, v in params.items() if k != "_target_"})
    return ReportSpec()


def spec_from_dict(options: dict[str, Any]) -> ReportSpec:
    known = {f.name for f in fields(ReportSpec)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown report option(s) {unknown}; known: {', '.join(sorted(known))}")
    return ReportSpec(**options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gddist.report",
        description="Compare the jobs of a Hydra multirun: writes report.md and report.png. "
        "With --examples: the application presets' results table (RUNS_DIR/examples.md).",
    )
    parser.add_argument(
        "multirun_dir", type=Path, nargs="?", help="e.g. multirun/2025-01-31/12-00-00"
    )
    parser.add_argument(
        "--examples", action="store_true", help="train/read the presets into the given dir "
        "(default outputs/examples) and write their table"
    )  # fmt: skip
    parser.add_argument("--nproc", type=int, default=1, help="--examples: processes (torchrun)")
    parser.add_argument("--only", nargs="+", help="--examples: these presets only")
    parser.add_argument("--metric", help="compared metric (default: train/loss)")
    parser.add_argument("--tolerance", type=float, help="target = optimum + tolerance")
    parser.add_argument("--optimum", type=float, help="known minimum (default: best in sweep)")
    parser.add_argument("--sparsity-threshold", type=float, help="also report weight sparsity")
    parser.add_argument("--best", action="store_true", help="mark the best job")
    parser.add_argument("--x-axis", choices=("step", "samples"), help="report.png's x axis")
    args = parser.parse_args(argv)
    if args.examples:
        from gddist.examples import table

        print(table.main(args.multirun_dir or Path("outputs/examples"), args.nproc, args.only))
        return 0
    if args.multirun_dir is None:
        parser.error("give MULTIRUN_DIR (or --examples)")
    spec = spec_from_multirun(args.multirun_dir)
    for name in ("metric", "tolerance", "optimum", "sparsity_threshold", "x_axis"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    spec.best = spec.best or args.best
    try:
        print(write_report(args.multirun_dir, spec))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------- helpers


def _values(job: Job, metric: str) -> list[float]:
    return [r[metric] for r in job.rows if _finite(r.get(metric))]


def _final(job: Job, metric: str) -> float | None:
    value = (job.summary or {}).get(metric)
    if _finite(value):
        return value
    values = _values(job, metric)
    return values[-1] if values else None


def _job_order(hydra_dir: Path) -> tuple[bool, int | str]:
    """Job dirs (given by their .hydra/ or any file in them) in job number order."""
    name = hydra_dir.parent.name if hydra_dir.name == ".hydra" else hydra_dir.parent.parent.name
    return (not name.isdigit(), int(name) if name.isdigit() else name)


def _objective(job: Job, study: Study) -> float:
    from gddist.hparams import objective

    return objective(job.summary or {}, study.metric, study.direction)


def _best_trial(jobs: list[Job], study: Study) -> Job | None:
    """The finished trial with the best objective (the first of equals, as Optuna keeps it)."""
    done = [j for j in jobs if j.summary is not None]
    if not done:
        return None
    sign = 1 if study.direction == "minimize" else -1
    return min(done, key=lambda j: sign * _objective(j, study))


def _study_note(jobs: list[Job], study: Study, swept: list[str], best: Job | None) -> str:
    from gddist.hparams import worst

    diverged = sum(1 for j in jobs if j.summary is not None and not _finite(_objective(j, study)))
    text = (
        f"Optuna search: {len(jobs)} trials, {study.direction} {study.metric}; a diverged trial "
        f"returns {_fmt(worst(study.direction))} "
        f"({diverged} here)."
    )
    if best is not None:
        values = " ".join(f"{k}={_fmt_value(best.overrides.get(k, ''))}" for k in swept)
        text += f" Best trial: {best.dir.name} ({values}), {study.metric} "
        text += _fmt(_objective(best, study)) + "."
    if study.best_value is not None:
        text += f" optimization_results.yaml: best_value {_fmt(float(study.best_value))}."
    return text


def _fmt_value(value: str) -> str:
    """An override value as a table cell: a float (Optuna's full repr) to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value and "e" not in value.lower() else f"{number:.4g}"


def _best_job(jobs: list[Job], spec: ReportSpec) -> Job | None:
    candidates = [
        (_final(j, spec.metric), i)
        for i, j in enumerate(jobs)
        if j.summary and not j.summary.get("diverged") and _final(j, spec.metric) is not None
    ]
    return jobs[min(candidates)[1]] if candidates else None


def _default_columns(jobs: list[Job]) -> list[str]:
    keys = {k for j in jobs for k in (j.summary or {}) if k.startswith("val/")}
    ordered = ["train/loss"] + (["val/loss"] if "val/loss" in keys else [])
    return ordered + sorted(keys - {"val/loss"})


def _function_of(jobs: list[Job]) -> str | None:
    for job in jobs:
        model = (job.config or {}).get("model", {})
        if model.get("name") == "function" and any("point/x" in r for r in job.rows):
            return model["function"]
    return None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


if __name__ == "__main__":
    sys.exit(main())
