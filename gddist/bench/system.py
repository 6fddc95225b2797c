"""Startup time and checkpoint stall (see gddist/bench/__init__.py for what is measured and how)."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

STARTUP_TARGET_S = 1.5
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------- 3. startup


def clean_env() -> dict[str, str]:
    """This environment without launcher variables: the children run as one plain process."""
    return {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")
    }


def _train_py() -> Path | None:
    """train.py of a source checkout (it is not part of the installed package)."""
    path = Path(__file__).resolve().parents[2] / "train.py"
    return path if path.is_file() else None


def _time_train(train_py: Path, run_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first metrics row, seconds to exit) of one `train.py trainer.max_steps=1`."""
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(train_py), "trainer.max_steps=1", f"hydra.run.dir={run_dir}"],
        cwd=train_py.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = math.nan
    while proc.poll() is None:  # the row of step 1 is written right after step 1 ends
        if metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
            break
        time.sleep(0.002)
    _, stderr = proc.communicate()
    total = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"train.py failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return (total if math.isnan(first) else first), total


def startup(reps: int, tmp: Path, importtime: bool) -> dict[str, Any]:
    """Part 3, interleaved (import torch, train.py, import torch, ...)."""
    train_py = _train_py()
    if train_py is None:
        return {"skipped": "train.py not found (run from a source checkout)"}
    env = clean_env()
    torch_s, first_s, total_s = [], [], []
    for rep in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
        torch_s.append(time.perf_counter() - t0)
        first, total = _time_train(train_py, tmp / f"startup-{rep}", env)
        first_s.append(first)
        total_s.append(total)
    result: dict[str, Any] = {
        "reps": reps,
        "import_torch_s": median(torch_s),
        "first_step_s": median(first_s),
        "exit_s": median(total_s),
        "target_s": STARTUP_TARGET_S,
        "import_torch_s_all": torch_s,
        "first_step_s_all": first_s,
        "exit_s_all": total_s,
    }
    result["overhead_s"] = result["first_step_s"] - result["import_torch_s"]
    if importtime and result["overhead_s"] > STARTUP_TARGET_S:
        result["heavy_imports"] = heavy_imports(train_py, tmp / "importtime", env)
    return result


def heavy_imports(train_py: Path, run_dir: Path, env: dict[str, str], top: int = 10) -> dict:
    """What one `train.py trainer.max_steps=1` imports beyond `import torch`, by cumulative
    milliseconds (`python -X importtime`), split at the end of step 1 (its log line).

    Listed: top-level imports (made by train.py, or lazily inside a function at run time) of
    modules that `import torch` does not load; each one's time includes what it pulls in.
    """
    baseline = subprocess.run(
        [sys.executable, "-c", "import sys, torch; print(chr(10).join(sys.modules))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(train_py), "trainer.max_steps=1"]
        + [f"hydra.run.dir={run_dir}", "logger.progress=lines"],
        cwd=train_py.parent,
        env={**env, "PYTHONUNBUFFERED": "1"},  # keeps the log line in order with importtime's
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return parse_importtime(proc.stdout, set(baseline), top)


def parse_importtime(text: str, known: set[str], top: int = 10) -> dict[str, list[dict]]:
    """`-X importtime` output interleaved with the run's log -> the `top` heaviest top-level
    imports not in `known`, before and after the log line of step 1 (see `heavy_imports`)."""
    phases: dict[str, dict[str, float]] = {"before_first_step": {}, "after_first_step": {}}
    phase = phases["before_first_step"]
    for line in text.splitlines():
        if "step 1/1" in line and "train/loss" in line:
            phase = phases["after_first_step"]
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if name.startswith("  ") or name.strip() in known:
            continue  # nested (counted in its parent) or loaded by `import torch` already
        phase[name.strip()] = phase.get(name.strip(), 0.0) + int(cumulative) / 1e3
    ranked = {k: sorted(found.items(), key=lambda kv: -kv[1])[:top] for k, found in phases.items()}
    return {k: [{"module": m, "ms": ms} for m, ms in found] for k, found in ranked.items()}


# ---------------------------------------------------------------------------- 4. checkpoints


def checkpoint_stall(params: int, reps: int, tmp: Path) -> dict[str, Any]:
    """Part 4: the extra loop time caused by one save early in a training loop that runs on for
    about 1.5x a synchronous save's duration (so a background write ends inside the loop)."""
    from torch import nn

    from gddist import dist as dist_mod
    from gddist.checkpoint import Checkpointer
    from gddist.config import CheckpointConfig, DistConfig

    width = max(8, round(math.sqrt(params / 3)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(3)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(4, width)
    dist = dist_mod.init(DistConfig(), dist_mod.LaunchEnv("none"))
    n_params = sum(p.numel() for p in model.parameters())

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def save(ckpt: Any, step: int) -> float:
        t0 = time.perf_counter()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        ckpt.save(step, state, {"rng": torch.get_rng_state()})
        return time.perf_counter() - t0

    # Untimed: the momentum buffers come to exist (full-size state), the page cache warms, and
    # one step and one synchronous save are timed to size the loop.
    t0 = time.perf_counter()
    train_step()
    step_s = time.perf_counter() - t0
    save_s = save(Checkpointer(CheckpointConfig(keep_last=1), tmp / "ckpt-warmup", dist), 0)
    shutil.rmtree(tmp / "ckpt-warmup")
    at = 2
    steps = at + 2 + min(200, math.ceil(1.5 * save_s / step_s))
    modes = ["none", "sync"] + (["async"] if _async_field() else [])
    blocked: dict[str, list[float]] = {m: [] for m in modes}
    loop: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            cfg = CheckpointConfig(keep_last=1)
            if mode == "async":
                cfg = replace(cfg, **{_async_field(): True})
            ckpt = Checkpointer(cfg, tmp / f"ckpt-{mode}-{rep}", dist)
            t0 = time.perf_counter()
            for i in range(steps):
                train_step()
                if i == at and mode != "none":
                    blocked[mode].append(save(ckpt, i))
            loop[mode].append(time.perf_counter() - t0)
            _close(ckpt)  # a background write still running ends here, outside the timed loop
            shutil.rmtree(tmp / f"ckpt-{mode}-{rep}", ignore_errors=True)
    base = median(loop["none"])
    result: dict[str, Any] = {
        "params": n_params,
        "state_mib": 2 * n_params * 4 / 2**20,  # weights + momentum, float32
        "steps": steps,
        "reps": reps,
        "step_ms": base / steps * 1e3,
    }
    for mode in modes[1:]:
        result[mode] = {
            "blocked_ms": median(blocked[mode]) * 1e3,
            "stall_ms": (median(loop[mode]) - base) * 1e3,
            "blocked_ms_all": [t * 1e3 for t in blocked[mode]],
            "loop_ms_all": [t * 1e3 for t in loop[mode]],
        }
    result["none"] = {"loop_ms_all": [t * 1e3 for t in loop["none"]]}
    if "async" in result:
        result["async_over_sync"] = result["async"]["stall_ms"] / result["sync"]["stall_ms"]
    else:
        result["async"] = {"pending": "this gddist has no checkpoint.async yet"}
    return result


def _async_field() -> str | None:
    """The CheckpointConfig field that turns on asynchronous saves (None: this gddist has none)."""
    from gddist.config import CheckpointConfig

    return next((n for n in ("async_save", "async_") if hasattr(CheckpointConfig(), n)), None)


def _close(ckpt: Any) -> None:
    """Wait for a background checkpoint write, if the Checkpointer has one."""
    for name in ("wait", "close"):
        if hasattr(ckpt, name):
            getattr(ckpt, name)()
            return
