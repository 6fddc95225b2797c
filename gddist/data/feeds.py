"""Where a step's batch comes from: batched indexing of in-memory tensors, or DataLoader workers.

Both feeds serve `train(step, micro)`: this rank's slice of micro-batch `micro` of optimizer step
`step` (`GlobalBatches.rows`), on the training device, and `val(lo, hi, batch_size)`: this rank's
validation shard in batches. A batch is (inputs, target): tensors for tabular data; for a user
Dataset (data=dataset) inputs may be a dict (or any nesting of tensors) and the target None
(loss=model). A batch is a pure function of the step, so the exact-resume position
is the step number alone; a resumed run starts reading at its checkpoint's step and reads the rows
an uninterrupted run would have read, with or without workers.

- `MemoryFeed` (data.loader=memory; the default for the built-in and CSV data): the dataset is
  tensors on the device and a batch is one indexing op: no per-sample __getitem__, no collate.
- `WorkerFeed` (data.loader=dataloader; the default for data=npy and data=dataset): a torch
  DataLoader whose "samples" are whole batches (batch_size=None; the dataset's key is (step,
  micro); a user Dataset's per-sample __getitem__ calls happen inside that read), read by
  `data.num_workers` worker processes up to `data.prefetch_factor` batches each ahead of the
  loop, into pinned memory on CUDA and copied to the device without blocking. Training reads one
  iteration over every remaining step (its workers live for the run); the validation loader is
  iterated once per evaluation and keeps its workers between evaluations
  (data.persistent_workers).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gddist.config import DataConfig, UserError
from gddist.data.order import GlobalBatches
from gddist.signals import STOP_SIGNALS

Batch = tuple[Any, Any]  # (inputs, target): tensors, or a user Dataset's (nested) containers


class _Failed:
    """A worker's UserError (e.g. a sample that cannot be collated), sent back as a value: the
    training process raises it as the same one line (a raised error would arrive wrapped in the
    worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _checked(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except UserError as e:
        return _Failed(str(e))


def _raise_failed(batch: Any) -> Any:
    if isinstance(batch, _Failed):
        raise UserError(batch.message)
    return batch


class _TrainBatches(Dataset):
    """Key (step, micro) -> (step, micro, x, y): this rank's rows of that micro-batch."""

    def __init__(self, data: Any, order: GlobalBatches, accum: int, rank: int, world: int):
        self.data, self.order = data, order
        self.accum, self.rank, self.world = accum, rank, world

    def read(self, step: int, micro: int) -> Batch:
        rows = self.order.rows(step, micro, self.accum, self.rank, self.world)
        return self.data.read("train", rows, self.order.epoch_of(step))

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        return (*key, _checked(self.read, *key))


class _ValBatches(Dataset):
    """Key (start, stop) -> rows start:stop of `split` (validation, or the test split)."""

    def __init__(self, data: Any, split: str = "val"):
        self.data, self.split = data, split

    def __getitem__(self, key: tuple[int, int]) -> Batch | _Failed:
        return _checked(self.data.read, self.split, slice(*key))


def _val_keys(lo: int, hi: int, batch_size: int) -> list[tuple[int, int]]:
    """The (start, stop) batches of validation rows lo:hi."""
    return [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]


class MemoryFeed:
    """Batches by indexing the dataset's tensors (already on the training device)."""

    def __init__(self, data: Any, order: GlobalBatches, accum: int, rank: int, world: int):
        self._train = _TrainBatches(data, order, accum, rank, world)
        self._data = data

    def train(self, step: int, micro: int) -> Batch:
        return self._train.read(step, micro)

    def val(self, lo: int, hi: int, batch_size: int, split: str = "val") -> Iterator[Batch]:
        """Rows lo:hi of `split` ("val" or "test") in batches of `batch_size`."""
        rows = _ValBatches(self._data, split)
        return (_raise_failed(rows[key]) for key in _val_keys(lo, hi, batch_size))

    def close(self) -> None:
        """Nothing to release (see WorkerFeed.close)."""


class WorkerFeed:
    """Batches read by DataLoader worker processes ahead of the loop (see the module docstring).

    `train` must be asked for keys in loop order (step by step, micro by micro); any other key,
    such as the first one after a resume, starts a fresh iteration at that key.
    """

    def __init__(
        self,
        data: Any,
        order: GlobalBatches,
        accum: int,
        rank: int,
        world: int,
        cfg: DataConfig,
        device: torch.device,
        stop_step: int,
    ):
        self.accum, self.stop_step, self.device = accum, stop_step, device
        self._train_set = _TrainBatches(data, order, accum, rank, world)
        self._data = data
        workers = cfg.num_workers
        self._options: dict[str, Any] = {
            "batch_size": None,  # the dataset returns whole batches: no per-sample collate
            "num_workers": workers,
            "pin_memory": cfg.pin_memory and device.type == "cuda",
            "prefetch_factor": cfg.prefetch_factor if workers else None,
            "worker_init_fn": _ignore_stop_signals if workers else None,
        }
        self._persistent = cfg.persistent_workers and workers > 0
        self._train_iter: Iterator | None = None
        self._next: tuple[int, int] | None = None  # the key the running iteration yields next
        self._val_loader: DataLoader | None = None
        self._val_key: tuple[int, int, int, str] | None = None

    def train(self, step: int, micro: int) -> Batch:
        if self._next != (step, micro):
            self._train_iter = iter(self._train_loader(step, micro))
        got_step, got_micro, batch = next(self._train_iter)
        if (got_step, got_micro) != (step, micro):  # the DataLoader reorders nothing: a bug
            raise RuntimeError(f"loader yielded step {got_step}.{got_micro}, not {step}.{micro}")
        self._next = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        x, y = _raise_failed(batch)
        return self._to_device(x), self._to_device(y)

    def val(self, lo: int, hi: int, batch_size: int, split: str = "val") -> Iterator[Batch]:
        """Rows lo:hi of `split` ("val" or "test"), read by the workers."""
        if self._val_loader is None or self._val_key != (lo, hi, batch_size, split):
            self._val_loader = DataLoader(
                _ValBatches(self._data, split),
                sampler=_val_keys(lo, hi, batch_size),
                persistent_workers=self._persistent,
                generator=_own_rng(),
                **self._options,
            )
            self._val_key = (lo, hi, batch_size, split)
        for batch in self._val_loader:
            x, y = _raise_failed(batch)
            yield self._to_device(x), self._to_device(y)

    def close(self) -> None:
        """Stop the worker processes (dropping the iterators shuts them down)."""
        self._train_iter = self._next = None
        self._val_loader = None

    def _train_loader(self, step: int, micro: int) -> DataLoader:
        first = [(step, m) for m in range(micro, self.accum)]
        keys = _Keys(first, step + 1, self.stop_step, self.accum)
        return DataLoader(self._train_set, sampler=keys, generator=_own_rng(), **self._options)

    def _to_device(self, batch: Any) -> Any:
        return to_device(batch, self.device, self._options["pin_memory"])


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """`batch` with every tensor in it (nested in dicts, lists, tuples) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        moved = [to_device(v, device, non_blocking) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class _Keys:
    """The (step, micro) keys from a start position to stop_step (exclusive), in loop order."""

    def __init__(self, first: list[tuple[int, int]], start: int, stop: int, accum: int):
        self.first, self.start, self.stop, self.accum = first, start, stop, accum

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from self.first
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                yield step, micro

    def __len__(self) -> int:
        return len(self.first) + max(0, self.stop - self.start) * self.accum


def _own_rng() -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iteration starts: from the global RNG
    unless given a generator. Drawing from the global RNG would shift the stream dropout uses,
    so a run with workers, or one resumed mid-run (whose iteration starts at another step),
    would no longer match. Batches are read without randomness; the seed itself is unused."""
    return torch.Generator().manual_seed(0)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stop signals to the training process: Ctrl-C, SLURM's SIGTERM or SIGUSR1
    reach the whole process group, and a worker that died of one would break the graceful stop
    (the loop runs on to the agreed step). Workers exit with their parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build(
    cfg: DataConfig,
    data: Any,
    order: GlobalBatches,
    accum: int,
    rank: int,
    world: int,
    device: torch.device,
    stop_step: int,
) -> MemoryFeed | WorkerFeed:
    """The feed data.loader asks for (see DataConfig.uses_dataloader)."""
    if cfg.uses_dataloader:
        return WorkerFeed(data, order, accum, rank, world, cfg, device, stop_step)
    return MemoryFeed(data, order, accum, rank, world)
