"""Benchmark gddist against a plain hand-written PyTorch loop, on this machine, in one run.

    python -m gddist.bench                               # everything (a few minutes on 2 CPU cores)
    python -m gddist.bench --size small --nproc 1 --reps 9
    python -m gddist.bench --quick --json bench.json     # a tiny run: checks the tool, not speed
    python -m gddist.bench --only dataset                # the per-sample Dataset part alone

Compare the ratios, not the absolute times: both sides run on the same machine at the same time.
The report is a set of Markdown tables on stdout (and everything, per repetition, as JSON).

1. Step time. One model (gddist's MLP, same initial weights), one dataset (the purchase problem,
   same global-batch order), one optimizer (SGD, momentum 0.9), one global batch, trained by
   `Trainer(cfg, data, dist, run_dir).fit()` (logging, evaluation, checkpoints and plots turned
   down to once at the end) and by the loop a user writes by hand: zero_grad(set_to_none=True),
   forward, loss, backward, step, with `DistributedDataParallel(model)` on 2 processes, each rank
   taking its half of every global batch. Repetitions alternate which one goes first (gddist,
   plain, plain, gddist, ...) so drift in machine load hits both alike.
   The clock runs from the start of step `warmup + 1` to the end of the last step. For gddist a
   thin wrapper around `Trainer.train_step` reads it (two clock reads per run), so the trainer's
   bookkeeping between steps is measured while its setup, final evaluation, final checkpoint and
   output files are not. Table: the median over repetitions of the mean step time, and
   gddist/plain of those medians. Both must end with the same weights (max abs weight diff): the
   timing means something only if they did the same work.
   Two processes: spawned workers joined by a file:// store in a temp dir (no port), gloo with
   one thread each on CPU, NCCL on GPU (needs 2 GPUs); rank 0's clock is reported. One process
   on CPU uses `--threads` (default 1, like each of the two). Targets: gddist/plain <= 1.03
   (small) and <= 1.01 (large).
2. Peak memory: each side trains alone in a fresh process (one process, the same steps), with
   the modules it needs already imported (torch._dynamo too, which the first torch.optim
   optimizer imports anyway) and the data built. CPU: the resident-set high-water mark
   (Linux VmHWM, reset just before the model is built) read at the end of the last step, so
   gddist's final evaluation is not counted; "growth" is that peak minus the resident set at the
   reset (it includes the pages of torch's kernels first used by training, alike for both). GPU:
   `torch.cuda.max_memory_allocated` over the same span. Target: peak within 10% of plain.
3. Startup: `python train.py trainer.max_steps=1` (default config, fresh run dir) until its first
   metrics row is written (the end of step 1) and until it exits, against `python -c "import
   torch"` and a plain script that builds a model and an SGD optimizer and takes one step (the
   first optimizer also imports torch._dynamo, so any PyTorch training pays that). Target: step 1
   <= import torch + 1.5 s. When over target, the modules `train.py` imports beyond torch are
   listed with their times (`python -X importtime`), before and after step 1.
4. Checkpoint stall: a ~50M-parameter model (3 square Linear layers) with its SGD momentum,
   saved once by `gddist.checkpoint.Checkpointer` early in a training loop that runs on for about
   1.5x the duration of a synchronous save: the time `save()` blocks the caller, and the loop's
   extra wall time against the same loop without a save ("stall", which also counts steps slowed
   by a background writer), for `checkpoint.async=false` and `true`. An asynchronous save is
   measured twice: as the first save of a run (its staging buffers are allocated then) and as
   any later one (the buffers are reused). Target: async stall <= 0.2x the sync stall.

5. A per-sample Dataset (`--only dataset`; `--workers N`, `--dataset-samples N`, `--steps N`): a
   small CNN on 8x8 single-channel images made in the bench (class patterns plus fixed noise, no
   download), randomly shifted in `__getitem__`, read by 2 DataLoader workers. Three sides,
   interleaved with a rotating first: gddist (`Trainer` with `data=dataset model=custom
   loss=cross_entropy`, composed like train.py), a hand-written loop (a DataLoader over the same
   Dataset with gddist's global batch order as its batch sampler, the same model, initial
   weights, SGD and workers), and gddist with `data.seed_per_sample=false`. Samples/s from the
   step clock of part 1; ratios against the hand-written loop (target >= 1.00) and the cost of
   per-sample seeding (seeded over unseeded samples/s, and us/sample), also measured directly
   as `read` in one process, seeded and unseeded. Unseeded, gddist's workers draw from the
   streams the hand-written loop's workers draw from, so the two train identically (max abs
   train loss diff, expected 0).

Code: `loop.py` (parts 1 and 2), `system.py` (parts 3 and 4), `dataset.py` (part 5), this file
(options and report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gddist.bench.dataset import DATASET, DATASET_QUICK, dataset_bench
from gddist.bench.loop import QUICK, WORKLOADS, memory, step_times
from gddist.bench.system import checkpoint_stall, startup


def _machine(threads: int | None) -> dict[str, Any]:
    """What the numbers were measured on (the load average says how busy the machine was)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    return {
        "device": device,
        "name": name,
        "cpu_count": os.cpu_count(),
        "threads_1proc": threads or torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def report(result: dict[str, Any]) -> str:
    """The result as Markdown tables (the numbers are the JSON's, rounded)."""
    m = result["machine"]
    load = m["load_avg_1min"]
    lines = [
        f"gddist benchmark on {m['device']} ({m['name']}, {m['cpu_count']} cores"
        + (f", {m['threads_1proc']} thread(s) per process" if m["device"] == "cpu" else "")
        + f"), torch {m['torch']}"
        + (f", load average {load:.2f} at the start" if load is not None else "")
        + ". Medians over repetitions; compare the ratios.",
        "",
    ]
    if result.get("step_time"):
        lines += [
            "| workload | procs | params | global batch | gddist ms/step | plain ms/step "
            "| gddist/plain | max abs weight diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["step_time"]:
            name = f"{r['size']} MLP {r['hidden']}".replace(" ", " ", 1)
            lines.append(
                f"| {name} | {r['nproc']} | {r['params']:,} | {r['batch']} | "
                f"{_fmt(r['gddist_ms'])} | {_fmt(r['plain_ms'])} | {r['ratio']:.3f} | "
                f"{r['max_weight_diff']:.1g} |"
            )
        lines.append("")
    if result.get("memory"):
        lines += [
            "| peak memory, 1 process | gddist MiB | plain MiB | gddist/plain "
            "| gddist growth MiB | plain growth MiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["memory"]:
            lines.append(
                f"| {r['size']} | {r['gddist_peak_mib']:.1f} | {r['plain_peak_mib']:.1f} | "
                f"{r['ratio']:.3f} | {r['gddist_growth_mib']:.1f} | {r['plain_growth_mib']:.1f} |"
            )
        lines.append("")
    s = result.get("startup")
    if s and "skipped" not in s:
        lines += [
            f"| startup ({s['reps']} runs) | seconds |",
            "|---|---|",
            f'| `python -c "import torch"` | {s["import_torch_s"]:.2f} |',
            f"| a plain PyTorch script, one training step | {s['plain_step_s']:.2f} |",
            f"| `python train.py trainer.max_steps=1`, to the end of step 1 | "
            f"{s['first_step_s']:.2f} |",
            f"| the same, to exit | {s['exit_s']:.2f} |",
            f"| step 1 minus import torch (target <= {s['target_s']}) | {s['overhead_s']:.2f} |",
            "",
        ]
        for phase, found in s.get("heavy_imports", {}).items():
            heavy = ", ".join(f"{h['module']} {h['ms']:.0f}" for h in found if h["ms"] >= 1)
            what = phase.replace("_", " ")
            lines += [f"Imports beyond `import torch`, {what}, ms (`-X importtime`): {heavy}", ""]
    elif s:
        lines += [f"startup: skipped ({s['skipped']})", ""]
    c = result.get("checkpoint")
    if c:
        lines += [
            f"| checkpoint of {c['params'] / 1e6:.1f}M params + SGD momentum "
            f"({c['state_mib']:.0f} MiB), {c['reps']} runs | save() blocks ms "
            f"| loop stall ms |",
            "|---|---|---|",
            f"| synchronous | {c['sync']['blocked_ms']:.0f} | {c['sync']['stall_ms']:.0f} |",
        ]
        a, steady = c["async"], c["async_steady"]
        lines += [
            f"| asynchronous, first save of a run | {a['blocked_ms']:.0f} | {a['stall_ms']:.0f} |",
            f"| asynchronous, every later save | {steady['blocked_ms']:.0f} "
            f"| {steady['stall_ms']:.0f} |",
            f"| async stall / sync stall (target <= 0.2): first, later "
            f"| | {c['async_over_sync']:.2f}, {c['async_steady_over_sync']:.2f} |",
        ]
        lines.append("")
    d = result.get("dataset")
    if d:
        r = d["read_us_per_sample"]
        lines += [
            f"| per-sample Dataset: CNN ({d['params']:,} params) on 8x8 images, shift in "
            f"__getitem__, batch {d['batch']}, {d['workers']} workers, {d['reps']} runs "
            "| samples/s | / hand-written | loss first -> last fifth |",
            "|---|---|---|---|",
        ]
        names = {
            "plain": "hand-written DataLoader loop (same batch order)",
            "gddist": "gddist data=dataset (seed_per_sample=true)",
            "gddist_unseeded": "gddist, data.seed_per_sample=false",
        }
        for side, name in names.items():
            t = d["trained"][side]
            lines.append(
                f"| {name} | {_fmt(d[side + '_samples_s'])} "
                f"| {d[side + '_samples_s'] / d['plain_samples_s']:.3f} "
                f"| {t['loss_first']:.3f} -> {t['loss_last']:.3f} |"
            )
        lines += [
            f"| gddist/hand-written (target >= 1.00) | | {d['ratio']:.3f} | |",
            f"| per-sample seeding: seeded/unseeded samples/s, us/sample "
            f"| | {d['seeding_ratio']:.3f}, {d['seeding_us_per_sample']:.1f} | |",
            f"| per-sample seeding, one process reading: us/sample seeded, unseeded, cost "
            f"| | {r['seeded']:.1f}, {r['unseeded']:.1f}, "
            f"{d['read_seeding_us_per_sample']:.1f} | |",
            "",
            "Unseeded gddist against the hand-written loop (the same worker streams), max abs "
            f"train loss diff: {d['unseeded_vs_plain_max_loss_diff']:.1g}",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


PARTS = ("step_time", "memory", "startup", "checkpoint", "dataset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gddist.bench",
        description="Time gddist against a plain PyTorch loop on this machine (see the module "
        "docstring for what is measured and how).",
    )
    p.add_argument(
        "--size",
        choices=("small", "large", "both"),
        default="both",
        help="small MLP (overhead-bound) and/or large MLP (compute-bound)",
    )
    p.add_argument(
        "--nproc",
        choices=("1", "2", "both"),
        default="both",
        help="processes for the step-time comparison",
    )
    p.add_argument("--steps", type=int, help="measured steps per run (default: per size)")
    p.add_argument("--reps", type=int, help="repetitions of each measurement (default 5)")
    p.add_argument(
        "--ckpt-params",
        type=float,
        default=50e6,
        help="parameters of the checkpoint-stall model (default 50M)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the 1-process runs on CPU (default 1, as each of the 2 processes "
        "has; a shared machine gives steadier times); 0: torch's default",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=PARTS,
        help="leave a part out",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        choices=PARTS,
        help="run only this part (repeatable; --skip still applies)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help=f"DataLoader workers of the dataset part (default {DATASET.workers})",
    )
    p.add_argument(
        "--dataset-samples",
        type=int,
        help=f"training images of the dataset part (default {DATASET.num_samples})",
    )
    p.add_argument(
        "--no-importtime",
        action="store_true",
        help="do not list heavy imports when startup is over target (--quick never does)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="checks the tool, not the speed: tiny models, few steps, 2 reps, memory of the "
        "small size only, 1 startup run, a 1M-parameter checkpoint",
    )
    p.add_argument("--json", type=Path, help="also write the full result (every rep) here")
    args = p.parse_args(argv)
    if any(v is not None and v < 1 for v in (args.reps, args.steps)):
        p.error("--reps and --steps must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark described by `argv`; print the report, return the result dict."""
    args = parse_args(argv)
    threads = args.threads if args.threads and not torch.cuda.is_available() else None
    if threads:
        torch.set_num_threads(threads)
    table = QUICK if args.quick else WORKLOADS
    sizes = ("small", "large") if args.size == "both" else (args.size,)
    workloads = [
        table[s] if args.steps is None else replace(table[s], steps=args.steps) for s in sizes
    ]
    nprocs = [1, 2] if args.nproc == "both" else [int(args.nproc)]
    reps = args.reps or (2 if args.quick else 5)
    importtime = not (args.quick or args.no_importtime)
    dataset_load = DATASET_QUICK if args.quick else DATASET
    changes = {
        "steps": args.steps,
        "workers": args.workers,
        "num_samples": args.dataset_samples,
    }
    dataset_load = replace(dataset_load, **{k: v for k, v in changes.items() if v is not None})
    result: dict[str, Any] = {
        "machine": _machine(threads),
        "args": vars(args) | {"json": str(args.json) if args.json else None},
    }
    with tempfile.TemporaryDirectory(prefix="gddist-bench-") as tmp_name:
        tmp = Path(tmp_name)
        parts: dict[str, Callable[[], Any]] = {
            "step_time": lambda: step_times(workloads, nprocs, reps, tmp),
            # --quick: one size shows the tool works; each memory run is a fresh process.
            "memory": lambda: memory(workloads[:1] if args.quick else workloads, threads, tmp),
            "startup": lambda: startup(1 if args.quick else reps, tmp, importtime),
            "checkpoint": lambda: checkpoint_stall(
                int(1e6 if args.quick else args.ckpt_params), 1 if args.quick else min(reps, 3), tmp
            ),
            "dataset": lambda: dataset_bench(dataset_load, reps, tmp),
        }
        result["part_s"] = {}
        for name, part in parts.items():
            if name not in args.skip and (not args.only or name in args.only):
                t0 = time.perf_counter()
                result[name] = part()
                result["part_s"][name] = time.perf_counter() - t0
    print(report(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
