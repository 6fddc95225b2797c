"""The `data` section: which source, its split, batch sizes and how batches are served."""

from __future__ import annotations

from dataclasses import dataclass

from gddist.config.schema import UserError, check_choice, check_positive

DATA_NAMES = ("purchase", "csv", "npy", "regression", "function")
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
    # auto: npy (memory-mapped, read as needed) -> dataloader, everything else -> memory.
    loader: str = "auto"
    num_workers: int = 2  # dataloader: reader processes per rank (0: read in the training process)
    pin_memory: bool = True  # dataloader on CUDA: page-locked batches, copied without blocking
    persistent_workers: bool = True  # dataloader: keep the workers between evaluations
    prefetch_factor: int = 2  # dataloader: batches each worker reads ahead

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
        if self.name == "csv":
            if not self.path:
                raise UserError("data.path is required for data=csv; pass data.path=my.csv")
            if not self.target:
                raise UserError(
                    "data.target is required for data=csv; pass data.target=<label column>"
                )

    @property
    def uses_dataloader(self) -> bool:
        """True when training batches come from a torch DataLoader (see gddist/data/feeds.py)."""
        return self.loader == "dataloader" or (self.loader == "auto" and self.name == "npy")
