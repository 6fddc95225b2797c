"""Shared test helpers: compose the real conf/, train in-process, run the CLI, spawn gloo workers."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import gddist
from gddist.cli import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(*overrides: str) -> dict[str, Any]:
    """The real conf/ composed with `overrides`, as the plain dict train.py hands to gddist.run."""
    GlobalHydra.instance().clear()
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def train(run_dir: Path, *overrides: str, init_method: str | None = None) -> dict[str, Any]:
    """Train in this process (or a spawned worker) and return the summary."""
    cfg = compose(*overrides)
    if not any(o.startswith("logger.plots=") for o in overrides):
        cfg["logger"]["plots"] = False  # matplotlib costs ~0.5 s a run; plot tests turn it on
    if init_method:
        cfg["dist"]["init_method"] = init_method
    return gddist.run(cfg, run_dir)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables (a test may itself run under some launcher)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    # tests/ on the path: subprocesses can build test models (model._target_=models_for_tests.X).
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", PYTHONPATH=str(ROOT / "tests"), **extra)
    return env


def cli(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd or ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun(nproc: int, *args: str, cwd: Path | None = None, timeout: float = 240):
    """`torchrun --standalone --nproc_per_node=N train.py ARGS` (gloo on CPU; free port)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=cwd or ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run_dir) if "train/loss" in r}


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


# A run whose resume must be exact: dropout makes the RNG state matter; checkpoints every 35 steps
# land mid-epoch (the 800 training rows of the default data make 12 steps of 64 an epoch).
EXACT = ["model=mlp", "model.dropout=0.1", "optimizer=adam", "trainer.max_steps=400",
         "trainer.log_every=1", "trainer.eval_every=100", "checkpoint.every_steps=35"]  # fmt: skip


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def assert_same_optimization(one: Path, two: Path, steps: int, tol: float = 1e-5) -> None:
    """Two runs (e.g. 1 and 2 processes) logged a train loss at every step 1..steps, within `tol`
    of each other at each step, and ended with weights (buffers included) within `tol`."""
    a, b = train_losses(one), train_losses(two)
    assert list(a) == list(range(1, steps + 1)) and list(b) == list(a)
    assert max(abs(a[s] - b[s]) for s in a) < tol
    assert max_weight_diff(load_model(one), load_model(two)) < tol


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the process groups of the processes still running, and reap them all."""
    import signal

    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- gloo workers


def spawn(fn, world: int, tmp_path: Path, *args: Any, timeout: float = 300) -> list[Any]:
    """Run fn(rank, init_method, *args) in `world` worker processes joined by a file:// store.

    Workers come from a forkserver that has imported torch and gddist once: a worker starts in
    a fraction of the time a spawned one takes. Each worker's return value
    is saved with torch.save and returned in rank order. A worker that does not finish within
    `timeout` seconds fails the test, and every worker is killed: a hang never stalls the suite.
    """
    store = tmp_path / f"store-{os.urandom(4).hex()}"
    out = tmp_path / f"out-{os.urandom(4).hex()}"
    out.mkdir()
    # forkserver: each worker forks from a clean single-threaded server that has imported torch
    # and gddist once (fast), never from this process, whose threads (torch, gloo, pytest-xdist)
    # a forked child would inherit without their owners.
    torch.multiprocessing.set_forkserver_preload(["torch", "gddist.trainer", "helpers"])
    ctx = torch.multiprocessing.start_processes(
        _worker,
        args=(fn, world, f"file://{store}", str(out), args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException when a worker fails
            if time.monotonic() > deadline:
                raise AssertionError(f"spawned workers did not finish within {timeout}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(world)]


def _worker(rank: int, fn, world: int, init_method: str, out: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    result = fn(rank, init_method, *args)
    torch.save(result, Path(out) / f"{rank}.pt")
    gc.freeze()  # skip the final garbage collection at exit (see train.py): ~1 s per worker


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        str(ROOT / "train.py"),
        *args,
    ]


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0 when nothing is logged yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
    return max(steps, default=0)


def start(cmd: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll `predicate` every 5 ms; fail the test (not hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def children(pid: int) -> list[int]:
    """Direct child pids of `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)
