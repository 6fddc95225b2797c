"""PNG curves of one run, from RUN_DIR/metrics.jsonl, into RUN_DIR/plots/.

- loss.png: train/loss (mean over each log interval) and val/loss against step
- val_metrics.png: every other val/* metric against step, in one chart (when there are any)
- lr.png: the learning rate against step
- path.png: model=function only: the optimization path on the function's contours

Called by the trainer at the end of a run (rank 0, `logger.plots=true`) and by
`python -m gddist.plot RUN_DIR`. matplotlib (Agg backend, no display needed) is imported only
here, and this module only when plotting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes and never opens a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

DPI = 100
SIZE = (6.4, 4.0)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as dicts; the strings "inf"/"nan" (how JSON holds them) become floats."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in row.items()})
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that have a finite value for it."""
    points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: Path, config: dict[str, Any] | None = None) -> list[Path]:
    """Write the run's PNGs into RUN_DIR/plots/ and return their paths.

    `config` is the run's resolved config (for the function path); None reads
    RUN_DIR/.hydra/config.yaml when it exists.
    """
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=SIZE)
    for key in ("train/loss", "val/loss"):
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
    _finish_axes(ax, "loss", log_y=_spans_decades(rows, ("train/loss", "val/loss")))
    written.append(_save(fig, out / "loss.png"))

    metrics = sorted({k for r in rows for k in r if k.startswith("val/") and k != "val/loss"})
    if metrics:
        fig, ax = plt.subplots(figsize=SIZE)
        for key in metrics:
            steps, values = series(rows, key)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        _finish_axes(ax, "validation metric", log_y=False)
        written.append(_save(fig, out / "val_metrics.png"))

    fig, ax = plt.subplots(figsize=SIZE)
    steps, values = series(rows, "lr")
    ax.plot(steps, values)
    _finish_axes(ax, "learning rate", log_y=False, legend=False)
    written.append(_save(fig, out / "lr.png"))

    config = config if config is not None else _hydra_config(run_dir)
    if config and config.get("model", {}).get("name") == "function":
        model = config["model"]
        fig, ax = plt.subplots(figsize=(5.5, 5.0))
        draw_contours(ax, model["function"])
        start = function_start(model, config.get("seed", 0))
        draw_path(ax, start, rows, label=None)
        written.append(_save(fig, out / "path.png"))
    return written


# ---------------------------------------------------------------------------- shared with report


def draw_contours(ax: Axes, function: str) -> None:
    """Log-spaced contours of a model=function objective over its box, its minimum marked."""
    import torch

    from gddist.models import FUNCTIONS

    fn = FUNCTIONS[function]
    x0, x1, y0, y1 = fn.box
    xs, ys = torch.linspace(x0, x1, 300), torch.linspace(y0, y1, 300)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    # Shift so the minimum is 0, then log-space the levels: valleys and rims both show.
    z = (fn.f(grid) - fn.minimum).clamp_min(1e-3).log10()
    # A light grey background so the coloured paths stand out.
    ax.contourf(xs, ys, z, levels=20, cmap="Greys_r", alpha=0.45)
    ax.contour(xs, ys, z, levels=20, colors="grey", linewidths=0.3, alpha=0.6)
    ax.plot(
        *fn.argmin,
        marker="*",
        color="gold",
        markeredgecolor="black",
        markersize=15,
        linestyle="none",
        label="global minimum",
    )
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{function}: log10(f - min)", fontsize=10)


def draw_path(ax: Axes, start: list[float], rows: list[dict[str, Any]], label: str | None) -> None:
    """The logged points (point/x, point/y) of one run, from its start point."""
    points = [(r["point/x"], r["point/y"]) for r in rows if "point/x" in r]
    xs = [start[0]] + [p[0] for p in points if _finite(p[0]) and _finite(p[1])]
    ys = [start[1]] + [p[1] for p in points if _finite(p[0]) and _finite(p[1])]
    (line,) = ax.plot(xs, ys, linewidth=1.4, label=label)
    ax.plot(xs[0], ys[0], marker="o", color=line.get_color(), markersize=5)
    ax.plot(xs[-1], ys[-1], marker="x", color=line.get_color(), markersize=8)


def function_start(model: dict[str, Any], seed: int) -> list[float]:
    from gddist.models import function_start as start

    return start(model["function"], model.get("init"), seed)


def spans_decades(values: list[float]) -> bool:
    """Log scale helps when positive values span more than two decades."""
    finite = [v for v in values if _finite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


# ---------------------------------------------------------------------------- helpers


def _spans_decades(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> bool:
    return spans_decades([r[k] for r in rows for k in keys if k in r])


def _finish_axes(ax: Axes, ylabel: str, log_y: bool, legend: bool = True) -> None:
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    # Fixed margins, not tight_layout: that measures every tick label and doubles the cost.
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.93)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _hydra_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
