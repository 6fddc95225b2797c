"""Tabular datasets as in-memory tensors and their preprocessing.

Every tabular source becomes a `TensorData`: standardized float features, targets in training
units, a deterministic train/val split from the seed, and the `Preprocessing` that maps raw values
to model inputs (saved next to the model so predictions can be reproduced).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gddist.config import UserError
from gddist.data.order import _STREAM_SPLIT, generator
from gddist.io import atomic_save_json


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
    x_test: torch.Tensor | None = None  # data.test_fraction > 0: the held-out test rows
    y_test: torch.Tensor | None = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def num_rows(self, split: str) -> int:
        """Rows of split "train", "val" or "test" (0 when there is no test split)."""
        y = getattr(self, f"y_{split}")
        return 0 if y is None else len(y)

    def read(
        self, split: str, rows: torch.Tensor | slice, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, targets) of `rows` (indices into split "train", "val" or "test"), batched;
        the same in every epoch."""
        return getattr(self, f"x_{split}")[rows], getattr(self, f"y_{split}")[rows]

    def to(self, device: torch.device) -> TensorData:
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


def _split(
    columns: dict[str, list],
    labels: list,
    prep: Preprocessing,
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
) -> TensorData:
    """Split rows deterministically from the seed, then fit the preprocessing on the train rows
    (never on the val or test rows)."""
    test_rows, val_rows, train_rows = (
        part.tolist() for part in split_rows3(len(labels), val_fraction, seed, test_fraction)
    )

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
    test_idx = torch.tensor(test_rows, dtype=torch.long) if test_rows else None
    return TensorData(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        task=prep.task,
        num_outputs=len(prep.classes) if prep.task == "multiclass" else 1,
        preprocessing=prep,
        x_test=None if test_idx is None else x[test_idx],
        y_test=None if test_idx is None else y[test_idx],
    )


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows) of n rows: a permutation drawn from the seed, cut once."""
    _, val, train = split_rows3(n, val_fraction, seed)
    return val, train


def split_rows3(
    n: int, val_fraction: float, seed: int, test_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(test rows, validation rows, training rows) of n rows: one permutation drawn from the
    seed, cut twice: the first round(n * test_fraction) rows are the test split (none at 0),
    the next max(1, round(n * val_fraction)) the validation split, the rest train. Both
    fractions are of all n rows; with test_fraction=0 the val and train rows are those of
    `split_rows`, and any test_fraction > 0 moves them (the test rows come first)."""
    n_test = round(n * test_fraction) if test_fraction else 0
    if test_fraction and n_test < 1:
        raise UserError(f"data.test_fraction={test_fraction} holds out no row of {n}; raise it")
    n_val = max(1, round(n * val_fraction))
    if n - n_val - n_test < 1:
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            f"training rows out of {n}"
        )
    perm = torch.randperm(n, generator=generator(seed, _STREAM_SPLIT))
    return perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]


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
