"""Step time and peak memory: gddist's Trainer against a plain hand-written loop (see
gddist/bench/__init__.py for what is measured and how)."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gddist.bench.system import clean_env, median


@dataclass(frozen=True)
class Workload:
    """One timed training problem: the purchase data and an MLP of `hidden` widths."""

    size: str
    hidden: tuple[int, ...]
    batch_size: int  # global
    steps: int  # measured steps
    warmup: int  # steps run before the clock starts
    num_samples: int = 1000
    lr: float = 0.01

    @property
    def total(self) -> int:
        return self.warmup + self.steps


# small: ~4.5k parameters, a step costs about as much as the framework around it (overhead-bound).
# large: ~2.1M parameters, batch 256: matrix products dominate (compute-bound).
WORKLOADS = {
    "small": Workload("small", (64, 64), 64, steps=300, warmup=20),
    "large": Workload("large", (1024, 1024, 1024), 256, steps=20, warmup=3),
}
QUICK = {
    "small": Workload("small", (64, 64), 64, steps=6, warmup=2),
    "large": Workload("large", (128, 128), 64, steps=3, warmup=1),
}


# ---------------------------------------------------------------------------- shared pieces


def _config(w: Workload, init_method: str = "env://") -> Any:
    """gddist's config for workload `w`, with logging, evaluation, checkpoints and plots at a
    minimum (one each, after the last step) so that what is timed is the step loop."""
    from gddist.config import Config

    cfg = Config()
    cfg.data.num_samples, cfg.data.batch_size = w.num_samples, w.batch_size
    cfg.model.name, cfg.model.hidden_sizes = "mlp", list(w.hidden)
    cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum = "sgd", w.lr, 0.9
    cfg.trainer.max_steps = cfg.trainer.log_every = w.total
    cfg.trainer.eval_every = 0
    cfg.checkpoint.every_steps, cfg.checkpoint.resume = 0, "never"
    cfg.logger.plots, cfg.logger.progress = False, "none"
    cfg.dist.init_method = init_method
    cfg.validate()
    return cfg


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading a clock (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: the GPU's peak allocation, or the process's resident-set
    high-water mark (Linux /proc/self/clear_refs; elsewhere the peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib(device: torch.device) -> float:
    """Peak memory since the last `_reset_peak`: GPU allocations on CUDA, else resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class StepClock:
    """Wraps a step function: clock from the start of call `warmup + 1` to the end of call
    `total`; `at_end` runs right after that last call (e.g. to read peak memory)."""

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.calls = 0
        self.start = self.end = math.nan
        self.at_end: Callable[[], None] = lambda: None

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.calls == self.warmup:
                _sync(self.device)
                self.start = time.perf_counter()
            out = step(*args, **kwargs)
            self.calls += 1
            if self.calls == self.total:
                _sync(self.device)
                self.end = time.perf_counter()
                self.at_end()
            return out

        return timed

    @property
    def per_step_s(self) -> float:
        if self.calls != self.total:
            raise RuntimeError(f"the step ran {self.calls} times, expected {self.total}")
        return (self.end - self.start) / (self.total - self.warmup)


def run_gddist(cfg: Any, data: Any, dist: Any, run_dir: Path, clock: StepClock) -> None:
    """Train with gddist's Trainer, its `train_step` timed by `clock`."""
    from gddist.trainer import Trainer

    trainer = Trainer(cfg, data, dist, run_dir)
    trainer.train_step = clock.wrap(trainer.train_step)  # instance attribute: fit() calls it
    summary = trainer.fit()
    if summary["diverged"]:
        raise RuntimeError(f"gddist diverged in the benchmark: {summary.get('error')}")


def run_plain(cfg: Any, data: Any, dist: Any, clock: StepClock) -> torch.nn.Module:
    """The loop a user writes by hand, on the same model, data order and optimizer."""
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel

    from gddist import models
    from gddist.data import generator

    device = dist.device
    torch.manual_seed(cfg.seed)  # gddist seeds the same way: the same initial weights
    model = models.build(cfg.model, data.num_features, data.num_outputs).to(device)
    net = model
    if dist.distributed:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.SGD(net.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    batch, n = cfg.data.batch_size, len(y_all)
    per_rank = batch // dist.world_size
    first = dist.rank * per_rank
    steps_per_epoch = n // batch

    def step(i: int, perm: torch.Tensor) -> None:
        start = (i % steps_per_epoch) * batch + first
        rows = perm[start : start + per_rank]
        x, y = x_all[rows], y_all[rows]
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        loss.backward()
        opt.step()

    timed = clock.wrap(step)
    perm = torch.empty(0)
    for i in range(clock.total):
        if i % steps_per_epoch == 0:  # a new epoch: gddist's order (stream 3), to compare weights
            epoch = i // steps_per_epoch
            perm = torch.randperm(n, generator=generator(cfg.seed, 3, epoch)).to(device)
        timed(i, perm)
    return model


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double().cpu() - b[k].double().cpu()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------- 1. step time


def compare(w: Workload, reps: int, dist: Any, tmp: Path) -> dict[str, Any]:
    """Time gddist and the plain loop `reps` times each, alternating which goes first.

    A collective call on every rank of `dist`; the result is meaningful on rank 0.
    """
    from gddist import data as data_mod

    cfg = _config(w, "env://")
    data = data_mod.build(cfg.data, cfg.seed)
    times: dict[str, list[float]] = {"gddist": [], "plain": []}
    diffs = []
    for rep in range(reps):
        finals: dict[str, dict[str, torch.Tensor]] = {}
        order = ("gddist", "plain") if rep % 2 == 0 else ("plain", "gddist")
        for impl in order:
            dist.barrier()  # both ranks start together
            clock = StepClock(w.warmup, w.total, dist.device)
            if impl == "gddist":
                run_dir = tmp / f"{w.size}-{dist.world_size}-{rep}"
                run_gddist(cfg, data, dist, run_dir, clock)
                if dist.is_main:
                    finals[impl] = torch.load(run_dir / "model.pt", weights_only=True)
                dist.barrier()
                if dist.is_main:
                    shutil.rmtree(run_dir)
            else:
                finals[impl] = run_plain(cfg, data, dist, clock).state_dict()
            times[impl].append(clock.per_step_s * 1e3)
        if dist.is_main:
            diffs.append(_max_diff(finals["gddist"], finals["plain"]))
    g, p = median(times["gddist"]), median(times["plain"])
    return {
        "size": w.size,
        "nproc": dist.world_size,
        "hidden": list(w.hidden),
        "params": sum(t.numel() for t in finals["plain"].values()) if dist.is_main else 0,
        "batch": w.batch_size,
        "steps": w.steps,
        "warmup": w.warmup,
        "reps": reps,
        "gddist_ms": g,
        "plain_ms": p,
        "ratio": g / p,
        "gddist_ms_all": times["gddist"],
        "plain_ms_all": times["plain"],
        "max_weight_diff": max(diffs, default=math.nan),
    }


def _worker(rank: int, world: int, store: str, out: str, loads: list[dict], reps: int) -> None:
    """One spawned rank: join the group through the file store, time every workload."""
    from gddist import dist as dist_mod

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the CPU is shared by the ranks
    workloads = [Workload(**{**w, "hidden": tuple(w["hidden"])}) for w in loads]
    cfg = _config(workloads[0], f"file://{store}")
    dist = dist_mod.init(cfg.dist, dist_mod.detect_launch())
    try:
        results = [compare(w, reps, dist, Path(out)) for w in workloads]
    finally:
        dist.close()
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps(results))


def step_times(workloads: list[Workload], nprocs: list[int], reps: int, tmp: Path) -> list[dict]:
    """Part 1 for every (workload, process count); rows in that order."""
    from gddist import dist as dist_mod

    rows: list[dict[str, Any]] = []
    for nproc in nprocs:
        if nproc == 1:
            dist = dist_mod.init(_config(workloads[0]).dist, dist_mod.LaunchEnv("none"))
            rows += [compare(w, reps, dist, tmp) for w in workloads]
            continue
        if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
            print(f"skipping {nproc} processes: NCCL needs {nproc} GPUs", file=sys.stderr)
            continue
        out = Path(tempfile.mkdtemp(dir=tmp))
        loads = [asdict(w) for w in workloads]
        torch.multiprocessing.start_processes(
            _worker,
            args=(nproc, str(out / "store"), str(out), loads, reps),
            nprocs=nproc,
            start_method="spawn",
        )
        rows += json.loads((out / "result.json").read_text())
    return rows


# ---------------------------------------------------------------------------- 2. memory


def memory_child(spec: str) -> None:
    """Entry of a fresh process: train one side of one workload alone, print its memory as JSON.

    Imports what that side needs before the baseline is read, so the growth counts training
    memory (model, gradients, optimizer state, activations) and the peak counts everything.
    """
    from gddist import data as data_mod
    from gddist import dist as dist_mod

    args = json.loads(spec)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    w = Workload(**{**args["workload"], "hidden": tuple(args["workload"]["hidden"])})
    cfg = _config(w)
    dist = dist_mod.init(cfg.dist, dist_mod.LaunchEnv("none"))
    data = data_mod.build(cfg.data, cfg.seed).to(dist.device)
    # Module imports belong to the baseline: gddist's own, and torch._dynamo, which the first
    # torch.optim optimizer imports in any training (tens of MiB of code and data).
    importlib.import_module("torch._dynamo")
    if args["impl"] == "gddist":
        importlib.import_module("gddist.trainer")
    _reset_peak(dist.device)
    base = _peak_mib(dist.device)
    clock = StepClock(w.warmup, w.total, dist.device)

    def report_and_exit() -> None:
        # Measured: what follows the last step (gddist's final evaluation and outputs) is not
        # part of the comparison, so the process ends here (the parent removes the run dir).
        peak = _peak_mib(dist.device)
        print(json.dumps({"peak_mib": peak, "growth_mib": peak - base}), flush=True)
        os._exit(0)

    clock.at_end = report_and_exit
    if args["impl"] == "gddist":
        run_gddist(cfg, data, dist, Path(args["run_dir"]), clock)
    else:
        run_plain(cfg, data, dist, clock)
    raise RuntimeError("the step clock never reached the last step")


def memory(workloads: list[Workload], threads: int | None, tmp: Path) -> list[dict[str, Any]]:
    """Part 2: one fresh process per (workload, side), run side by side (peaks are per process,
    so concurrency does not change them; it only saves time)."""
    code = "import sys; from gddist.bench.loop import memory_child; memory_child(sys.argv[1])"
    procs = {}
    for w in workloads:
        for impl in ("gddist", "plain"):
            run_dir = str(tmp / f"memory-{w.size}-{impl}")
            spec = {"workload": asdict(w), "impl": impl, "threads": threads, "run_dir": run_dir}
            procs[w.size, impl] = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(spec)],
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
    found = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory measurement {key} failed:\n{stderr[-3000:]}")
        found[key] = json.loads(stdout.strip().splitlines()[-1])
    rows = []
    for w in workloads:
        g, p = found[w.size, "gddist"], found[w.size, "plain"]
        rows.append(
            {
                "size": w.size,
                "nproc": 1,
                "gddist_peak_mib": g["peak_mib"],
                "plain_peak_mib": p["peak_mib"],
                "ratio": g["peak_mib"] / p["peak_mib"],
                "gddist_growth_mib": g["growth_mib"],
                "plain_growth_mib": p["growth_mib"],
            }
        )
    return rows
