"""Datasets too large to parse as CSV or to hold in memory: DIR/features.npy + DIR/target.npy.

Contract: `features.npy` is a 2-D numeric array (rows x features) and `target.npy` holds one
number per row (integer class labels, or values for regression), both as written by `numpy.save`
(no pickled objects). Both are memory-mapped: a batch reads only its own rows from disk, so the
dataset may be larger than memory. Opening checks shapes and dtypes, then makes one pass over the
features in chunks of rows that checks every value is finite and measures the training split's
mean and standard deviation; rows are standardized as they are read, like CSV features. The
train/val split and the task inference are the ones of in-memory data (`gddist.data.split_rows`,
`gddist.data.csv.decide_task`), so the same seed splits the same rows.

An `NpyData` is sent to DataLoader worker processes: it pickles without its memory maps (a few
index arrays and statistics) and reopens the files in each worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gddist.config import UserError
from gddist.data.csv import decide_task
from gddist.data.tensors import Preprocessing, TensorData, split_rows3

FEATURES, TARGET = "features.npy", "target.npy"
# Rows per chunk of the opening pass (a few MB at typical widths; bounded memory at any size).
CHUNK_ROWS = 1 << 16
_NUMERIC = "biuf"  # numpy dtype kinds: bool, signed, unsigned, float


@dataclass
class NpyData:
    """A memory-mapped dataset split into train/val rows; `read` standardizes rows as it reads."""

    path: Path
    train_rows: np.ndarray  # file row of each training row, in split order
    val_rows: np.ndarray
    mean: np.ndarray  # per feature, over the training rows (float64)
    std: np.ndarray
    task: str
    num_outputs: int
    preprocessing: Preprocessing
    _maps: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    test_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def open(
        cls, path: str, task: str, val_fraction: float, seed: int, test_fraction: float = 0.0
    ) -> NpyData:
        """Check and open DIR; raises UserError (naming the file, and the row and column of a bad
        value) before any training."""
        root = Path(path)
        for name in (FEATURES, TARGET):
            if not (root / name).is_file():
                raise UserError(
                    f"data.path={path}: no {name} there; data=npy needs a directory with "
                    f"{FEATURES} (rows x features) and {TARGET} (one value per row), "
                    "as written by numpy.save"
                )
        x, y = _map(root / FEATURES), _map(root / TARGET)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise UserError(
                f"{root / FEATURES}: shape {x.shape}; it must be 2-D (rows x features), non-empty"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(
                f"{root / TARGET}: shape {y.shape}; it must hold one value per row of "
                f"{FEATURES} ({len(x)} rows)"
            )
        split = split_rows3(len(x), val_fraction, seed, test_fraction)
        test, val, train = (part.numpy() for part in split)
        mean, std = _train_statistics(root / FEATURES, x, train)
        bad = np.flatnonzero(~np.isfinite(y)) if y.dtype.kind == "f" else []
        if len(bad):
            raise UserError(
                f"{root / TARGET} row {bad[0]}: non-finite value {y[bad[0]]}; fix or drop that row"
            )
        # Every decision needs at most the first 1001 distinct values (more is "not classes"):
        # a regression target's millions of values never become a Python list.
        distinct = np.unique(y)[:1001].tolist()
        task, classes = decide_task(distinct, False, TARGET, task, str(root))
        features = [
            {"name": f"x{j}", "kind": "numeric", "mean": float(m), "std": float(s)}
            for j, (m, s) in enumerate(zip(mean, std, strict=True))
        ]
        prep = Preprocessing(task=task, features=features, target="target", classes=classes)
        if task == "regression":
            target = y[np.sort(train)].astype(np.float64)
            sd = float(target.std()) if len(target) > 1 else 0.0
            prep.target_mean, prep.target_std = float(target.mean()), sd if sd > 0 else 1.0
        return cls(
            path=root,
            train_rows=train,
            val_rows=val,
            test_rows=test,
            mean=mean,
            std=std,
            task=task,
            num_outputs=len(classes) if task == "multiclass" else 1,
            preprocessing=prep,
        )

    @property
    def num_features(self) -> int:
        return len(self.mean)

    def num_rows(self, split: str) -> int:
        """Rows of split "train", "val" or "test"."""
        return len(getattr(self, f"{split}_rows"))

    def read(
        self, split: str, rows: torch.Tensor | slice, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardized float32 features, encoded targets) of `rows` of split "train"/"val"
        (the same in every epoch).

        Targets are encoded as for in-memory data: class index (float for binary, int64 for
        multiclass) or the standardized value (regression).
        """
        index = getattr(self, f"{split}_rows")
        file_rows = index[rows.numpy() if isinstance(rows, torch.Tensor) else rows]
        features, target = self._open()
        x = (features[file_rows].astype(np.float64) - self.mean) / self.std
        y = target[file_rows]
        prep = self.preprocessing
        if self.task == "regression":
            y = torch.from_numpy((y.astype(np.float64) - prep.target_mean) / prep.target_std)
            y = y.float()
        else:
            y = torch.from_numpy(np.searchsorted(np.asarray(prep.classes), y))
            y = y.float() if self.task == "binary" else y.long()
        return torch.from_numpy(x).float(), y

    def materialize(self) -> TensorData:
        """The whole dataset read into memory (data.loader=memory): the same values `read`
        serves, so the two loaders train alike."""
        x_train, y_train = self.read("train", slice(None))
        x_val, y_val = self.read("val", slice(None))
        x_test, y_test = self.read("test", slice(None)) if len(self.test_rows) else (None, None)
        return TensorData(
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            task=self.task,
            num_outputs=self.num_outputs,
            preprocessing=self.preprocessing,
            x_test=x_test,
            y_test=y_test,
        )

    def to(self, device: torch.device) -> NpyData:
        """Rows stay on disk; each batch is moved to the device by the loader."""
        return self

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            y = _map(self.path / TARGET)
            self._maps = (_map(self.path / FEATURES), y[:, 0] if y.ndim == 2 else y)
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # a worker maps the files itself (a memmap would pickle its data)
        return state


def _map(file: Path) -> np.ndarray:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(
            f"{file}: not a readable .npy array ({str(e).splitlines()[0]}); "
            "write it with numpy.save"
        ) from None
    if array.dtype.kind not in _NUMERIC:
        raise UserError(f"{file}: dtype {array.dtype} is not numeric; store numbers")
    return array


def _train_statistics(file: Path, x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, ...]:
    """(mean, std) of the training rows of x, in one chunked pass that also rejects non-finite
    values. Chunks are combined with Chan et al.'s parallel update (stable in float64); the same
    chunking on every rank gives bit-identical statistics."""
    is_train = np.zeros(len(x), dtype=bool)
    is_train[train] = True
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for lo in range(0, len(x), CHUNK_ROWS):
        block = np.asarray(x[lo : lo + CHUNK_ROWS], dtype=np.float64)
        finite = np.isfinite(block)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise UserError(
                f"{file} row {lo + row} column {col}: non-finite value {block[row, col]}; "
                "fix or drop that row"
            )
        block = block[is_train[lo : lo + CHUNK_ROWS]]
        if not len(block):
            continue
        n_b, mean_b = len(block), block.mean(axis=0)
        m2_b = ((block - mean_b) ** 2).sum(axis=0)
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    std = np.sqrt(m2 / count)
    return mean, np.where(std > 0, std, 1.0)
