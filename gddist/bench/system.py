"""Startup time and checkpoint stall (see gddist/bench/__init__.py for what is measured and how)."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
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


# The hand-written counterpart of `train.py trainer.max_steps=1`: one step of the default problem's
# shape (3 features, batch 64, logistic regression, SGD with momentum), then exit.
PLAIN_SCRIPT = """
import torch
from torch import nn
from torch.nn import functional as F

model = nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(64, 3), torch.rand(64).round()
opt.zero_grad(set_to_none=True)
F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
opt.step()
"""


def _time_command(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def startup(reps: int, tmp: Path, importtime: bool) -> dict[str, Any]:
    """Part 3: `import torch`, a plain one-step script and `train.py trainer.max_steps=1`, one of
    each per repetition (interleaved, so load drift hits all three alike)."""
    train_py = _train_py()
    if train_py is None:
        return {"skipped": "train.py not found (run from a source checkout)"}
    env = clean_env()
    runs: dict[str, list[float]] = {"import_torch": [], "plain_step": [], "first_step": []}
    runs["exit"] = []
    for rep in range(reps):
        runs["import_torch"].append(_time_command([sys.executable, "-c", "import torch"], env))
        runs["plain_step"].append(_time_command([sys.executable, "-c", PLAIN_SCRIPT], env))
        first, total = _time_train(train_py, tmp / f"startup-{rep}", env)
        runs["first_step"].append(first)
        runs["exit"].append(total)
    result: dict[str, Any] = {"reps": reps, "target_s": STARTUP_TARGET_S}
    for name, values in runs.items():
        result[f"{name}_s"] = median(values)
        result[f"{name}_s_all"] = values
    result["overhead_s"] = result["first_step_s"] - result["import_torch_s"]
    if importtime and result["overhead_s"] > STARTUP_TARGET_S:
        result["heavy_imports"] = heavy_imports(train_py, tmp / "importtime", env)
    return result


def heavy_imports(train_py: Path, run_dir: Path, env: dict[str, str], top: int = 10) -> dict:
    """Where one `train.py trainer.max_steps=1` spends import time beyond `import torch`
    (`python -X importtime`), before and after the end of step 1 (its log line): see
    `parse_importtime`."""
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
    imports (made by the script itself, or lazily by a function at run time), each charged the
    self time of every module in its subtree that is not in `known` (what `import torch` loads:
    the baseline), in milliseconds, before and after the log line of step 1.

    importtime prints a module after the modules it imported (deeper indented), so the lines
    since the previous top-level one are the subtree of the next top-level one.
    """
    phases: dict[str, dict[str, float]] = {"before_first_step": {}, "after_first_step": {}}
    phase = phases["before_first_step"]
    subtree_us = 0
    for line in text.splitlines():
        if "step 1/1" in line and "train/loss" in line:
            phase = phases["after_first_step"]
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        if name.strip() not in known:
            subtree_us += int(self_us)
        if not name[1:].startswith(" "):  # a top-level import ends its subtree
            if subtree_us:
                phase[name.strip()] = phase.get(name.strip(), 0.0) + subtree_us / 1e3
            subtree_us = 0
    ranked = {k: sorted(found.items(), key=lambda kv: -kv[1])[:top] for k, found in phases.items()}
    return {k: [{"module": m, "ms": ms} for m, ms in found] for k, found in ranked.items()}


# ---------------------------------------------------------------------------- 4. checkpoints


def checkpoint_stall(params: int, reps: int, tmp: Path) -> dict[str, Any]:
    """Part 4: the extra loop time caused by one save early in a training loop that runs on for
    about 1.5x a synchronous save's duration (so a background write ends inside the loop).

    Modes run interleaved (none, sync, async, async_steady, then reversed); a mode's stall is
    the median over repetitions of its loop time minus the save-free loop's time in the same
    repetition. "sync" and "async" save with a fresh Checkpointer, as the first save of a run
    (an async one reserves its staging buffers after the loop's first step, as the trainer does:
    they are allocated in the background, and a save that comes before they are ready waits);
    "async_steady" with one that has saved before, as every later save of a run does.
    """
    from torch import nn

    from gddist import dist as dist_mod
    from gddist.checkpoint import Checkpointer
    from gddist.config import CheckpointConfig, DistConfig

    dist = dist_mod.init(DistConfig(), dist_mod.LaunchEnv("none"))
    device = dist.device
    width = max(8, round(math.sqrt(params / 3)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(3))).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(4, width, device=device)
    n_params = sum(p.numel() for p in model.parameters())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def state() -> tuple[dict[str, Any], dict[str, Any]]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}, {
            "rng": torch.get_rng_state()
        }

    def save(ckpt: Any, step: int) -> float:
        sync()
        t0 = time.perf_counter()
        ckpt.save(step, *state())
        return time.perf_counter() - t0

    # Untimed: the momentum buffers come to exist (full-size state), the page cache warms up,
    # and a step and a synchronous save are timed to size the loop.
    train_step()
    sync()
    t0 = time.perf_counter()
    train_step()
    sync()
    step_s = time.perf_counter() - t0
    save_s = save(Checkpointer(CheckpointConfig(keep_last=1), tmp / "ckpt-warmup", dist), 0)
    shutil.rmtree(tmp / "ckpt-warmup")
    steady = Checkpointer(CheckpointConfig(keep_last=1, async_save=True), tmp / "ckpt-steady", dist)
    save(steady, 0)
    steady.wait()
    at = 2  # the save follows step 3
    steps = at + 2 + min(200, math.ceil(1.5 * save_s / step_s))
    modes = ("none", "sync", "async", "async_steady")
    blocked: dict[str, list[float]] = {m: [] for m in modes}
    loop: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            cfg = CheckpointConfig(keep_last=1, async_save=mode == "async")
            ckpt = (
                steady
                if mode == "async_steady"
                else Checkpointer(cfg, tmp / f"ckpt-{mode}-{rep}", dist)
            )
            t0 = time.perf_counter()
            for i in range(steps):
                train_step()
                if i == 0 and mode == "async":  # as the trainer does after its first step
                    ckpt.reserve(*state())
                if i == at and mode != "none":
                    blocked[mode].append(save(ckpt, 1 + rep * steps + i))
            sync()
            loop[mode].append(time.perf_counter() - t0)
            ckpt.wait()  # a background write still running ends here, outside the timed loop
            shutil.rmtree(tmp / f"ckpt-{mode}-{rep}", ignore_errors=True)
    result: dict[str, Any] = {
        "params": n_params,
        "state_mib": 2 * n_params * 4 / 2**20,  # weights + momentum, float32
        "steps": steps,
        "reps": reps,
        "step_ms": median(loop["none"]) / steps * 1e3,
        "loop_ms_all": {m: [t * 1e3 for t in loop[m]] for m in modes},
    }
    for mode in ("sync", "async", "async_steady"):
        extra = [t - base for t, base in zip(loop[mode], loop["none"], strict=True)]
        result[mode] = {
            "blocked_ms": median(blocked[mode]) * 1e3,
            "stall_ms": median(extra) * 1e3,
            "blocked_ms_all": [t * 1e3 for t in blocked[mode]],
        }
    result["async_over_sync"] = result["async"]["stall_ms"] / result["sync"]["stall_ms"]
    result["async_steady_over_sync"] = (
        result["async_steady"]["stall_ms"] / result["sync"]["stall_ms"]
    )
    return result
