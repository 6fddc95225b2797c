"""The `data` section: which source, its split, batch sizes and how batches are served."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gddist.config.schema import UserError, check_choice, check_positive

DATA_NAMES = ("purchase", "csv", "npy", "regression", "function", "dataset")
# How training batches are served: indexing in-memory tensors, or a torch DataLoader with workers.
LOADERS = ("auto", "memory", "dataloader")
TASKS = ("auto", "binary", "multiclass", "regression")


@dataclass
class DataConfig:
    name: str = "purchase"
    num_samples: int | None = 1000  # purchase, regression; function: rows of the dummy data
    path: str | None = None  # csv: the file; npy: the directory of features.npy + target.npy
    target: str | None = None  # csv only
    task: str = "auto"
    batch_size: int = 64  # GLOBAL samples per optimizer step
    eval_batch_size: int = 1024  # per rank
    val_fraction: float = 0.2
    # Tabular sources (purchase, regression, csv, npy) and data=dataset without data.test: the
    # fraction of ALL rows held out as a test split, cut by the seeded split before the val rows
    # (so turning it on moves the val and train rows). The test rows are never trained on nor
    # validated on; 0: no test split (the split of a run without one, bit for bit).
    test_fraction: float = 0.0
    # auto: npy (memory-mapped, read as needed) -> dataloader, everything else -> memory.
    loader: str = "auto"
    num_workers: int = 2  # dataloader: reader processes per rank (0: read in the training process)
    pin_memory: bool = True  # dataloader on CUDA: page-locked batches, copied without blocking
    persistent_workers: bool = True  # dataloader: keep the workers between evaluations
    prefetch_factor: int = 2  # dataloader: batches each worker reads ahead
    # data=dataset (gddist/data/dataset.py): _target_ nodes of the user's map-style Datasets.
    train: dict[str, Any] | None = None
    val: dict[str, Any] | None = None  # null: data.val_fraction of train is held out
    test: dict[str, Any] | None = None  # null: data.test_fraction of train (0: no test split)
    collate: Any = None  # null: default_collate; a function's dotted path or a _target_ node
    target_key: str = "labels"  # dict samples: the key holding the target
    seed_per_sample: bool = True  # seed torch/numpy/random from (seed, epoch, index) per sample

    def validate(self) -> None:
        check_choice("data", self.name, DATA_NAMES)
        check_choice("data.task", self.task, TASKS)
        check_choice("data.loader", self.loader, LOADERS)
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be >= 0 (0: no workers)")
        check_positive("data.prefetch_factor", self.prefetch_factor)
        check_positive("data.batch_size", self.batch_size)
        check_positive("data.eval_batch_size", self.eval_batch_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(
                f"data.val_fraction={self.val_fraction} must be between 0 and 1 (exclusive); "
                "use e.g. data.val_fraction=0.2"
            )
        if not 0.0 <= self.test_fraction < 1.0 or self.test_fraction + self.val_fraction >= 1:
            raise UserError(
                f"data.test_fraction={self.test_fraction} must be >= 0 and leave training rows "
                f"beside data.val_fraction={self.val_fraction} (their sum must be < 1); "
                "use e.g. data.test_fraction=0.2"
            )
        if self.test_fraction and self.name == "function":
            raise UserError("data.test_fraction does not apply to model=function; drop it")
        generated = self.name in ("purchase", "regression")
        if generated and (self.num_samples is None or self.num_samples < 10):
            raise UserError(
                f"data.num_samples={self.num_samples} must be at least 10 for data={self.name}"
            )
        if self.name == "function" and (self.num_samples is None or self.num_samples < 1):
            raise UserError(
                f"data.num_samples={self.num_samples} must be at least 1 for model=function "
                "(its dummy data rows)"
            )
        if self.name == "npy" and not self.path:
            raise UserError(
                "data.path is required for data=npy; pass data.path=DIR (a directory holding "
                "features.npy and target.npy)"
            )
        if self.name == "dataset":
            self._validate_dataset()
        elif self.test not in (None, {"_target_": None}):
            raise UserError(
                f"data.test applies to data=dataset only (this run has data={self.name}); "
                "use data.test_fraction to hold out test rows"
            )
        elif self.train is not None or self.val not in (None, {"_target_": None}) or self.collate:
            key = "data.train" if self.train is not None else "data.val"
            key = key if self.train is not None or self.val is not None else "data.collate"
            raise UserError(f"{key} applies to data=dataset only (this run has data={self.name})")
        if self.name == "csv":
            if not self.path:
                raise UserError("data.path is required for data=csv; pass data.path=my.csv")
            if not self.target:
                raise UserError(
                    "data.target is required for data=csv; pass data.target=<label column>"
                )

    def _validate_dataset(self) -> None:
        empty = isinstance(self.val, dict) and self.val.get("_target_") is None
        if empty and "_object_" not in self.val:  # the preset's empty node: hold out val rows
            self.val = None
        empty = isinstance(self.test, dict) and self.test.get("_target_") is None
        if empty and "_object_" not in self.test:
            self.test = None
        nodes = (("data.train", self.train), ("data.val", self.val), ("data.test", self.test))
        for key, node in nodes:
            if node is None and key != "data.train":
                continue
            if not isinstance(node, dict) or not ("_target_" in node or "_object_" in node):
                raise UserError(
                    f"{key} must be a node with a _target_ for data=dataset: pass "
                    f"{key}._target_=my_pkg.data.MyDataset (a map-style torch Dataset class or "
                    "factory) and its arguments as +{key}.<arg>=..."
                )
            if node.get("_target_") == "???":
                raise UserError(f"{key}._target_ is required; pass {key}._target_=my_pkg.MyDataset")
        if self.loader == "memory":
            raise UserError(
                "data.loader=memory does not apply to data=dataset: its samples are read by "
                "__getitem__ through a DataLoader; drop data.loader"
            )
        if not self.target_key:
            raise UserError("data.target_key must name the key of a dict sample holding the target")

    @property
    def uses_dataloader(self) -> bool:
        """True when training batches come from a torch DataLoader (see gddist/data/feeds.py)."""
        return self.loader == "dataloader" or (
            self.loader == "auto" and self.name in ("npy", "dataset")
        )
