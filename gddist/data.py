"""Datasets as in-memory tensors, their preprocessing, and the global-batch order.

Every dataset becomes a `TensorData`: standardized float features, targets in training units, a
deterministic train/val split from the seed, and the `Preprocessing` that maps raw values to model
inputs (saved next to the model so predictions can be reproduced).

Global-batch semantics (docs/architecture.md, invariant 1): `GlobalBatches` orders the training
set of epoch e by a permutation drawn from (seed, e); optimizer step s reads global batch
s mod steps_per_epoch of epoch s // steps_per_epoch, and every rank takes its slice of each
micro-batch. The position is a pure function of the step, so resuming at step s continues the same
sample order at any world size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gddist.config import DataConfig, UserError
from gddist.io import atomic_save_json

if TYPE_CHECKING:
    from gddist.npydata import NpyData

# The purchase problem's true logistic model on RAW features:
# logit = PURCHASE_BIAS + 0.05 * age + 0.04 * income_k + 0.8 * education_level
PURCHASE_FEATURES = ("age", "income_k", "education_level")
PURCHASE_COEF = (0.05, 0.04, 0.8)
PURCHASE_BIAS = -6.0

# The regression problem (data=regression): REGRESSION_FEATURES independent standard normal
# features, of which only the first len(REGRESSION_COEF) matter (the rest are pure noise, which
# L1 regularization should zero out); y = REGRESSION_BIAS + x . REGRESSION_COEF + noise.
REGRESSION_FEATURES = 8
REGRESSION_COEF = (2.0, -1.0, 0.5)
REGRESSION_BIAS = 3.0
REGRESSION_NOISE = 0.5

# Independent random streams derived from the one user seed.
_STREAM_DATA, _STREAM_SPLIT, _STREAM_ORDER = 1, 2, 3


def generator(seed: int, stream: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator for (seed, stream, epoch): the same numbers on every rank and every run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919 + epoch)


@dataclass
class Preprocessing:
    """How raw columns become model inputs, and model outputs become target units (JSON-able)."""

    task: str
    # One dict per input column: name, kind ("numeric": mean, std | "text": categories).
    features: list[dict] = field(default_factory=list)
    target: str = "label"
    classes: list = field(default_factory=list)  # classification labels, index = class id
    target_mean: float = 0.0  # regression: y_train = (y - target_mean) / target_std
    target_std: float = 1.0

    def transform(self, columns: dict[str, list]) -> torch.Tensor:
        """Raw column values (numbers or strings, keyed by name) -> standardized float features."""
        parts = []
        for spec in self.features:
            values = columns[spec["name"]]
            if spec["kind"] == "numeric":
                col = torch.tensor([float(v) for v in values], dtype=torch.float64)
                parts.append(((col - spec["mean"]) / spec["std"]).unsqueeze(1))
            else:
                cats = {c: i for i, c in enumerate(spec["categories"])}
                onehot = torch.zeros(len(values), len(cats), dtype=torch.float64)
                for row, v in enumerate(values):
                    if v in cats:  # an unseen category encodes as all zeros
                        onehot[row, cats[v]] = 1.0
                parts.append(onehot)
        return torch.cat(parts, dim=1).float()

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        atomic_save_json(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> Preprocessing:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class TensorData:
    """A train/val split held as tensors (moved to the training device once)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: str  # binary | multiclass | regression
    num_outputs: int
    preprocessing: Preprocessing
    true_coef: torch.Tensor | None = None  # purchase: the generating model in standardized units
    true_bias: float | None = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def num_rows(self, split: str) -> int:
        """Rows of split "train" or "val"."""
        return len(self.y_train if split == "train" else self.y_val)

    def read(self, split: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, targets) of `rows` (indices into split "train" or "val"), batched."""
        if split == "train":
            return self.x_train[rows], self.y_train[rows]
        return self.x_val[rows], self.y_val[rows]

    def to(self, device: torch.device) -> TensorData:
        for name in ("x_train", "y_train", "x_val", "y_val"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def build(cfg: DataConfig, seed: int) -> TensorData | NpyData:
    """Load or generate the dataset named by `cfg`; raises UserError on bad data.

    In-memory data is a `TensorData`; data=npy with the dataloader is an `NpyData`, which reads
    its rows from disk on demand. Both serve `num_rows(split)` and batched `read(split, rows)`.
    """
    if cfg.name == "purchase":
        columns, labels = make_purchase(cfg.num_samples, seed)
        task = "binary" if cfg.task == "auto" else cfg.task
        if task != "binary":
            raise UserError(f"data=purchase is a binary task; data.task={cfg.task} does not apply")
        specs = [{"name": n, "kind": "numeric"} for n in PURCHASE_FEATURES]
        prep = Preprocessing(task="binary", features=specs, target="purchased", classes=[0.0, 1.0])
        data = _split(columns, labels, prep, cfg.val_fraction, seed)
        # The generating logit in standardized units: w_raw . (mean + std * z) + b.
        std = torch.tensor([f["std"] for f in prep.features], dtype=torch.float64)
        mean = torch.tensor([f["mean"] for f in prep.features], dtype=torch.float64)
        coef = torch.tensor(PURCHASE_COEF, dtype=torch.float64)
        data.true_coef = (coef * std).float()
        data.true_bias = float(PURCHASE_BIAS + (coef * mean).sum())
        return data
    if cfg.name == "regression":
        if cfg.task not in ("auto", "regression"):
            raise UserError(
                f"data=regression is a regression task; data.task={cfg.task} does not apply"
            )
        columns, target = make_regression(cfg.num_samples, seed)
        specs = [{"name": n, "kind": "numeric"} for n in columns]
        prep = Preprocessing(task="regression", features=specs, target="y")
        return _split(columns, target, prep, cfg.val_fraction, seed)
    if cfg.name == "function":
        return function_data(cfg)
    if cfg.name == "npy":
        from gddist.npydata import NpyData  # memory-mapped: rows are read as batches need them

        disk = NpyData.open(cfg.path, cfg.task, cfg.val_fraction, seed)
        return disk if cfg.uses_dataloader else disk.materialize()
    from gddist.csvdata import infer_task, read_csv  # only CSV runs pay for the csv module

    features, label = read_csv(cfg.path, cfg.target)
    task, classes = infer_task(label, cfg.task, cfg.path)
    specs = [{"name": c.name, "kind": c.kind} for c in features]
    prep = Preprocessing(task=task, features=specs, target=label.name, classes=classes)
    data = _split({c.name: c.values for c in features}, label.values, prep, cfg.val_fraction, seed)
    return data


def make_purchase(num_samples: int, seed: int) -> tuple[dict[str, list], list[float]]:
    """Raw purchase data: age in years, income in k$, education level 1-4, label purchased 0/1."""
    g = generator(seed, _STREAM_DATA)
    n = num_samples
    age = torch.randint(18, 71, (n,), generator=g).double()
    income = torch.exp(math.log(50.0) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    income = torch.round(income * 10) / 10
    education = torch.multinomial(torch.tensor([0.3, 0.4, 0.2, 0.1]), n, True, generator=g) + 1.0
    raw = torch.stack([age, income, education.double()], dim=1)
    logit = PURCHASE_BIAS + raw @ torch.tensor(PURCHASE_COEF, dtype=torch.float64)
    label = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)).double()
    columns = {name: raw[:, j].tolist() for j, name in enumerate(PURCHASE_FEATURES)}
    return columns, label.tolist()


def make_regression(num_samples: int, seed: int) -> tuple[dict[str, list], list[float]]:
    """Raw regression data: features x0..x7 ~ N(0, 1), y = 3 + 2 x0 - x1 + 0.5 x2 + N(0, 0.5^2)."""
    g = generator(seed, _STREAM_DATA)
    x = torch.randn(num_samples, REGRESSION_FEATURES, generator=g, dtype=torch.float64)
    coef = torch.zeros(REGRESSION_FEATURES, dtype=torch.float64)
    coef[: len(REGRESSION_COEF)] = torch.tensor(REGRESSION_COEF, dtype=torch.float64)
    noise = REGRESSION_NOISE * torch.randn(num_samples, generator=g, dtype=torch.float64)
    y = REGRESSION_BIAS + x @ coef + noise
    columns = {f"x{j}": x[:, j].tolist() for j in range(REGRESSION_FEATURES)}
    return columns, y.tolist()


def function_data(cfg: DataConfig) -> TensorData:
    """Dummy rows for model=function (which sets data.name=function): the "model" is the point
    being optimized and its output is the function value there (task "objective": the loss is
    the model output). Every row is the same zero feature, so any batch size and any world size
    compute the same gradient; the validation set is the same rows, so val/loss is the function
    value at the current point."""
    if cfg.task != "auto":
        raise UserError(f"model=function is an objective; data.task={cfg.task} does not apply")
    rows = torch.zeros(cfg.num_samples, 1)
    prep = Preprocessing(task="objective", target="f")
    return TensorData(
        x_train=rows,
        y_train=torch.zeros(cfg.num_samples),
        x_val=rows.clone(),
        y_val=torch.zeros(cfg.num_samples),
        task="objective",
        num_outputs=1,
        preprocessing=prep,
    )


def _split(
    columns: dict[str, list], labels: list, prep: Preprocessing, val_fraction: float, seed: int
) -> TensorData:
    """Split rows deterministically from the seed, then fit the preprocessing on the train rows."""
    val_rows, train_rows = (part.tolist() for part in split_rows(len(labels), val_fraction, seed))

    def rows(values: list, idx: list[int]) -> list:
        return [values[i] for i in idx]

    for spec in prep.features:
        train_values = rows(columns[spec["name"]], train_rows)
        if spec["kind"] == "numeric":
            col = torch.tensor(train_values, dtype=torch.float64)
            std = col.std(unbiased=False).item() if len(col) > 1 else 0.0
            spec["mean"], spec["std"] = col.mean().item(), std if std > 0 else 1.0
        else:  # the vocabulary is taken from all rows: it carries no label information
            spec["categories"] = sorted(set(columns[spec["name"]]))
    x = prep.transform(columns)
    y = _encode_target(labels, prep, train_rows)
    val_idx, train_idx = torch.tensor(val_rows), torch.tensor(train_rows)
    return TensorData(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        task=prep.task,
        num_outputs=len(prep.classes) if prep.task == "multiclass" else 1,
        preprocessing=prep,
    )


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows) of n rows: a permutation drawn from the seed, cut once."""
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise UserError(f"data.val_fraction={val_fraction} leaves no training rows out of {n}")
    perm = torch.randperm(n, generator=generator(seed, _STREAM_SPLIT))
    return perm[:n_val], perm[n_val:]


def _encode_target(labels: list, prep: Preprocessing, train_rows: list[int]) -> torch.Tensor:
    if prep.task == "regression":
        y = torch.tensor(labels, dtype=torch.float64)
        train = y[torch.tensor(train_rows)]
        std = train.std(unbiased=False).item() if len(train) > 1 else 0.0
        prep.target_mean, prep.target_std = train.mean().item(), std if std > 0 else 1.0
        return ((y - prep.target_mean) / prep.target_std).float()
    index = {c: i for i, c in enumerate(prep.classes)}
    y = torch.tensor([index[v] for v in labels])
    return y.float() if prep.task == "binary" else y


class GlobalBatches:
    """The training order: which rows optimizer step `s` reads, on which rank, in which micro-batch.

    Epoch e is a permutation of the training rows drawn from (seed, e); step s uses global batch
    s % steps_per_epoch of epoch s // steps_per_epoch (the last partial batch of an epoch is
    dropped, so every step has exactly `batch_size` rows). Each global batch is cut into `accum`
    micro-batches and each micro-batch into `world` equal rank slices.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size > num_rows:
            raise UserError(
                f"data.batch_size={batch_size} is larger than the {num_rows} training rows; "
                f"use data.batch_size<={num_rows}"
            )
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.steps_per_epoch = num_rows // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of training rows (cached for the current epoch)."""
        if epoch != self._epoch:
            g = generator(self.seed, _STREAM_ORDER, epoch)
            self._perm = torch.randperm(self.num_rows, generator=g).to(self.device)
            self._epoch = epoch
        return self._perm

    def rows(self, step: int, micro: int, accum: int, rank: int, world: int) -> torch.Tensor:
        """Row indices for (step, micro-batch, rank): a contiguous slice of the global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        per_rank = self.batch_size // (accum * world)
        start = pos * self.batch_size + (micro * world + rank) * per_rank
        return self.order(epoch)[start : start + per_rank]
