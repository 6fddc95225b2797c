"""Part 5, a per-sample Dataset: gddist's data=dataset path against a hand-written DataLoader loop
(see gddist/bench/__init__.py for what is measured and how).

The images are made here, from fixed seeds (no download, no scikit-learn): 10 classes, each a
fixed random 8x8 pattern, every image its class's pattern plus fixed noise. `__getitem__` shifts
the image by up to one pixel each way, drawn from torch's global generator: the augmentation
gddist seeds per sample (data.seed_per_sample) and a hand-written loop leaves to each worker's
own stream.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from gddist.bench.loop import StepClock
from gddist.bench.system import median

SEED = 0
LR, MOMENTUM = 0.05, 0.9


class ShiftedPatterns(Dataset):
    """(image [1, 8, 8] float32, label) pairs: class pattern + noise (fixed by `seed` and
    `split`), randomly shifted by up to `shift` pixels in `__getitem__` (torch's global RNG)."""

    def __init__(self, num_samples: int, split: str = "train", shift: int = 1, seed: int = 0):
        patterns = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
        self.labels = torch.randint(0, 10, (num_samples,), generator=g)
        noise = 0.3 * torch.randn(num_samples, 1, 8, 8, generator=g)
        self.images = patterns[self.labels] + noise
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
        return torch.roll(self.images[i], shifts=(dy, dx), dims=(1, 2)), self.labels[i]


class SmallCNN(nn.Module):
    """conv(1 -> channels) -> ReLU -> conv -> ReLU -> 2x2 max pool -> linear(10)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.head(x.flatten(1))


@dataclass(frozen=True)
class DatasetWorkload:
    """The per-sample problem: `num_samples` training images, a global batch, DataLoader workers."""

    num_samples: int = 4096
    val_samples: int = 256
    batch_size: int = 64
    steps: int = 150  # measured steps
    warmup: int = 10  # steps run before the clock starts (the workers start in these)
    workers: int = 2
    channels: int = 8

    @property
    def total(self) -> int:
        return self.warmup + self.steps


DATASET = DatasetWorkload()
DATASET_QUICK = DatasetWorkload(num_samples=512, val_samples=64, steps=6, warmup=2)

SIDES = ("gddist", "plain", "gddist_unseeded")


def _node(w: DatasetWorkload, split: str) -> dict[str, Any]:
    n = w.num_samples if split == "train" else w.val_samples
    return {"_target_": f"{__name__}.ShiftedPatterns", "num_samples": n, "split": split}


def dataset_config(w: DatasetWorkload, seed_per_sample: bool) -> Any:
    """gddist's config for `w`, composed as `train.py data=dataset model=custom
    loss=cross_entropy` composes it; logging, evaluation and checkpoints once, after the last
    step, so that what is timed is the step loop."""
    from gddist.api import compose
    from gddist.config import Config

    cfg = compose(
        [
            "data=dataset",
            "model=custom",
            "loss=cross_entropy",
            "metrics=none",
            f"seed={SEED}",
            f"data.batch_size={w.batch_size}",
            f"data.eval_batch_size={w.val_samples}",
            f"data.num_workers={w.workers}",
            f"data.seed_per_sample={str(seed_per_sample).lower()}",
            "optimizer=sgd",
            f"optimizer.lr={LR}",
            f"optimizer.momentum={MOMENTUM}",
            f"trainer.max_steps={w.total}",
            f"trainer.log_every={w.total}",
            "trainer.eval_every=0",
            "checkpoint.every_steps=0",
            "checkpoint.resume=never",
            "logger.plots=false",
            "logger.progress=none",
        ]
    )
    cfg["data"]["train"], cfg["data"]["val"] = _node(w, "train"), _node(w, "val")
    cfg["model"] = {"_target_": f"{__name__}.SmallCNN", "channels": w.channels}
    return Config.from_dict(cfg)


def run_gddist(cfg: Any, data: Any, dist: Any, run_dir: Path, clock: StepClock) -> list[float]:
    """Train with gddist's Trainer (its `train_step` timed by `clock`); the per-step train losses.

    The losses are the trainer's own record of each step (kept until the one log row after the
    last step), read when the clock stops: nothing is added to the timed steps.
    """
    from gddist.trainer import Trainer

    trainer = Trainer(cfg, data, dist, run_dir)
    losses: list[float] = []
    clock.at_end = lambda: losses.extend(float(p[1]) for p in trainer._pending)
    trainer.train_step = clock.wrap(trainer.train_step)  # instance attribute: fit() calls it
    summary = trainer.fit()
    if summary["diverged"]:
        raise RuntimeError(f"gddist diverged in the benchmark: {summary.get('error')}")
    return losses


class _StepRows:
    """A batch sampler: the rows of each step in gddist's global batch order (one process)."""

    def __init__(self, order: Any, steps: int):
        self.order, self.steps = order, steps

    def __iter__(self) -> Any:
        for step in range(self.steps):
            yield self.order.rows(step, 0, 1, 0, 1).tolist()

    def __len__(self) -> int:
        return self.steps


def run_plain(w: DatasetWorkload, clock: StepClock) -> list[float]:
    """The loop a user writes by hand: a DataLoader over the same Dataset with the same workers,
    the batches in gddist's order as a batch sampler, the same model, initial weights and
    optimizer; zero_grad, forward, loss, backward, step. The per-step train losses."""
    from gddist.data.order import GlobalBatches

    train = ShiftedPatterns(w.num_samples, "train")
    torch.manual_seed(SEED)  # gddist seeds the same way: the same initial weights
    model = SmallCNN(w.channels)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    order = GlobalBatches(len(train), w.batch_size, SEED, torch.device("cpu"))
    loader = DataLoader(
        train,
        batch_sampler=_StepRows(order, w.total),
        num_workers=w.workers,
        generator=torch.Generator().manual_seed(SEED),  # the workers' seeds
    )
    recorded: list[torch.Tensor] = []

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        recorded.append(loss.detach())  # as gddist keeps each step's loss for its log row

    timed = clock.wrap(step)
    model.train()
    for x, y in loader:
        timed(x, y)
    return [float(v) for v in recorded]


def _trained(losses: list[float]) -> dict[str, float]:
    """Mean train loss over the first and the last fifth of the steps."""
    k = max(1, len(losses) // 5)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def dataset_bench(w: DatasetWorkload, reps: int, tmp: Path) -> dict[str, Any]:
    """Part 5: gddist, the hand-written loop and gddist without per-sample seeding, `reps` times
    each, interleaved and rotating which side goes first (samples/s from the step clock)."""
    from gddist import data as data_mod
    from gddist import dist as dist_mod

    cfgs = {s: dataset_config(w, seed_per_sample=s == "gddist") for s in SIDES if s != "plain"}
    datas = {
        s: data_mod.build(c.data, c.seed, loss=c.loss.name, metrics=c.metrics.name)
        for s, c in cfgs.items()
    }
    dist = dist_mod.init(cfgs["gddist"].dist, dist_mod.LaunchEnv("none"))
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    trained: dict[str, dict[str, Any]] = {}
    first_losses: dict[str, list[float]] = {}
    for rep in range(reps):
        shift = rep % len(SIDES)
        for side in SIDES[shift:] + SIDES[:shift]:
            clock = StepClock(w.warmup, w.total, torch.device("cpu"))
            t0 = time.perf_counter()
            if side == "plain":
                losses = run_plain(w, clock)
            else:
                run_dir = tmp / f"dataset-{side}-{rep}"
                losses = run_gddist(cfgs[side], datas[side], dist, run_dir, clock)
                shutil.rmtree(run_dir)
            rates[side].append(w.batch_size / clock.per_step_s)
            if rep == 0:
                trained[side] = {"steps": clock.calls, **_trained(losses)}
                trained[side]["run_s"] = time.perf_counter() - t0
                first_losses[side] = losses
    read_us = read_cost(datas["gddist"], datas["gddist_unseeded"], w, reps)
    med = {s: median(v) for s, v in rates.items()}
    # Unseeded, gddist's workers draw from the streams the hand-written loop's workers draw
    # from (the same worker seeds, the same batches per worker): the same training.
    pairs = zip(first_losses["plain"], first_losses["gddist_unseeded"], strict=True)
    same = [abs(a - b) for a, b in pairs]
    seeded, unseeded = med["gddist"], med["gddist_unseeded"]
    return {
        "num_samples": w.num_samples,
        "batch": w.batch_size,
        "workers": w.workers,
        "steps": w.steps,
        "warmup": w.warmup,
        "reps": reps,
        "params": sum(p.numel() for p in SmallCNN(w.channels).parameters()),
        **{f"{s}_samples_s": med[s] for s in SIDES},
        **{f"{s}_samples_s_all": rates[s] for s in SIDES},
        "ratio": seeded / med["plain"],
        "unseeded_ratio": unseeded / med["plain"],
        "seeding_ratio": seeded / unseeded,  # samples/s with seeding over without
        "seeding_us_per_sample": (1 / seeded - 1 / unseeded) * 1e6,
        "read_us_per_sample": read_us,
        "read_seeding_us_per_sample": read_us["seeded"] - read_us["unseeded"],
        "unseeded_vs_plain_max_loss_diff": max(same, default=math.nan),
        "trained": trained,
    }


def read_cost(seeded: Any, unseeded: Any, w: DatasetWorkload, reps: int) -> dict[str, float]:
    """Microseconds per sample of `read` (the work a DataLoader worker does per batch:
    __getitem__ of each row, seeding when on, collate) in this process, seeded and unseeded
    interleaved; the median over `reps` passes over `w.steps` batches. Read in this process the
    reads pay for saving and restoring its RNG states around each batch (workers do not)."""
    from gddist.data.order import GlobalBatches

    order = GlobalBatches(seeded.num_rows("train"), w.batch_size, SEED, torch.device("cpu"))
    rows = [order.rows(s, 0, 1, 0, 1) for s in range(w.steps)]
    times: dict[str, list[float]] = {"seeded": [], "unseeded": []}
    for rep in range(reps):
        for name in ("seeded", "unseeded") if rep % 2 == 0 else ("unseeded", "seeded"):
            data = seeded if name == "seeded" else unseeded
            t0 = time.perf_counter()
            for step, r in enumerate(rows):
                data.read("train", r, order.epoch_of(step))
            times[name].append((time.perf_counter() - t0) / (w.steps * w.batch_size) * 1e6)
    return {name: median(v) for name, v in times.items()}
