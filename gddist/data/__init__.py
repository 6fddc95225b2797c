"""Data sources, one module per source, and what every source shares.

    synthetic   generated tabular problems (purchase, regression, function)
    csv         a CSV file with a target column
    npy         a directory of features.npy + target.npy, memory-mapped
    dataset     the user's own map-style torch Dataset, read sample by sample (DatasetData)
    tensors     TensorData (in-memory splits) and Preprocessing
    order       the global batch order: step -> rows, a pure function of (seed, step)
    feeds       how batches reach the loop: in-memory indexing or DataLoader workers

`build(cfg, seed)` returns the source named by `data.name`. Every source serves
`num_rows(split)` and `read(split, rows, epoch)` -> (inputs, target) for split "train", "val" or
"test" (`num_rows("test")` is 0 when the run has no test split: data.test_fraction=0, no
data.test).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gddist.config import DataConfig, UserError
from gddist.data.order import GlobalBatches, generator
from gddist.data.synthetic import (
    PURCHASE_BIAS,
    PURCHASE_COEF,
    PURCHASE_FEATURES,
    function_data,
    make_purchase,
    make_regression,
)
from gddist.data.tensors import Preprocessing, TensorData, _split, split_rows

if TYPE_CHECKING:
    from gddist.data.dataset import DatasetData
    from gddist.data.npy import NpyData

__all__ = [
    "GlobalBatches",
    "Preprocessing",
    "TensorData",
    "build",
    "generator",
    "make_purchase",
    "make_regression",
    "split_rows",
]


def build(
    cfg: DataConfig,
    seed: int,
    *,
    loss: str = "auto",
    metrics: str = "auto",
    objects: Mapping[str, Any] | None = None,
) -> TensorData | NpyData | DatasetData:
    """Load or generate the dataset named by `cfg`; raises UserError on bad data.

    In-memory data is a `TensorData`; data=npy with the dataloader is an `NpyData`, which reads
    its rows from disk on demand; data=dataset is a `DatasetData` over the user's Datasets (built
    here, in this process; `loss` and `metrics` name the run's loss and metrics presets, which
    say what its batches hold, and `objects` are gddist.fit's Python objects by config key).
    """
    if cfg.name == "dataset":
        from gddist.data import dataset  # user datasets: hydra.utils.instantiate

        return dataset.build(cfg, seed, loss, metrics, objects)
    if cfg.name == "purchase":
        columns, labels = make_purchase(cfg.num_samples, seed)
        task = "binary" if cfg.task == "auto" else cfg.task
        if task != "binary":
            raise UserError(f"data=purchase is a binary task; data.task={cfg.task} does not apply")
        specs = [{"name": n, "kind": "numeric"} for n in PURCHASE_FEATURES]
        prep = Preprocessing(task="binary", features=specs, target="purchased", classes=[0.0, 1.0])
        data = _split(columns, labels, prep, cfg.val_fraction, seed, cfg.test_fraction)
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
        return _split(columns, target, prep, cfg.val_fraction, seed, cfg.test_fraction)
    if cfg.name == "function":
        return function_data(cfg)
    if cfg.name == "npy":
        from gddist.data.npy import NpyData  # memory-mapped: rows are read as batches need them

        disk = NpyData.open(cfg.path, cfg.task, cfg.val_fraction, seed, cfg.test_fraction)
        return disk if cfg.uses_dataloader else disk.materialize()
    from gddist.data.csv import infer_task, read_csv  # only CSV runs pay for the csv module

    features, label = read_csv(cfg.path, cfg.target)
    task, classes = infer_task(label, cfg.task, cfg.path)
    specs = [{"name": c.name, "kind": c.kind} for c in features]
    prep = Preprocessing(task=task, features=specs, target=label.name, classes=classes)
    columns = {c.name: c.values for c in features}
    data = _split(columns, label.values, prep, cfg.val_fraction, seed, cfg.test_fraction)
    return data
