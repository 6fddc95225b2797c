"""The application presets' results table: `python -m gddist.report --examples [RUNS_DIR]`.

For each preset of `gddist.examples.EXAMPLES` it runs `python train.py experiment=<name>
hydra.run.dir=RUNS_DIR/<name>` (with `--nproc N`: under `torchrun --standalone
--nproc_per_node=N`) and reads the run's summary.json. A run that is already complete is not
trained again (rerunning the command says so and leaves its outputs), so a second call only
redraws the table. Writes RUNS_DIR/examples.md (also printed): one row per preset with its metric,
gddist's value, the baselines of the same run (`REPORT` of each example module), steps and wall
time. The README's table is this command's output.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gddist.examples import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]


def command(name: str, run_dir: Path, nproc: int, overrides: list[str]) -> list[str]:
    """The command line that trains preset `name` into `run_dir`."""
    train = [str(ROOT / "train.py"), f"experiment={name}", f"hydra.run.dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, *train]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *launcher, *train]


def run_preset(name: str, runs: Path, nproc: int = 1, overrides: list[str] | None = None) -> dict:
    """Train (or find complete) preset `name` under `runs`; its summary plus "command" and
    "seconds" (this call's wall time: about 0 for a run that was already complete)."""
    run_dir = runs / name
    cmd = command(name, run_dir, nproc, list(overrides or []))
    began = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"experiment={name} failed (exit {proc.returncode}): {' | '.join(tail)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "seconds": time.perf_counter() - began, "command": " ".join(cmd[1:])}


def row(name: str, summary: dict[str, Any]) -> str:
    """The table row of preset `name` from its summary (`REPORT` says which keys)."""
    spec = importlib.import_module(f"gddist.examples.{name}").REPORT
    baselines = ", ".join(
        f"{label} {_fmt(summary.get(key))}" for key, label in spec["baselines"].items()
    )
    metric = spec["metric"]
    return (
        f"| {spec['task']} | `{name}` | {metric} | {_fmt(summary.get(metric))} | {baselines} | "
        f"{summary.get('step', '-')} | {_fmt(summary.get('wall_time_s'), 2)} |"
    )


def table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| application | preset | metric | gddist | baselines (same split) | steps | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, summary) for name, summary in summaries.items()]
    return "\n".join(lines)


def main(runs: Path, nproc: int = 1, names: list[str] | None = None) -> str:
    """Run (or reuse) every preset under `runs` and write runs/examples.md; return the table."""
    runs.mkdir(parents=True, exist_ok=True)
    summaries = {name: run_preset(name, runs, nproc) for name in names or EXAMPLES}
    text = table(summaries) + "\n"
    (runs / "examples.md").write_text(text)
    return text


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"
