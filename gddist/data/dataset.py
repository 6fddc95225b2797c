"""data=dataset: the user's own map-style `torch.utils.data.Dataset`, read sample by sample.

`data.train` (and optionally `data.val`) are Hydra `_target_` nodes that each rank builds itself
(`hydra.utils.instantiate`), or, through `gddist.fit`, Dataset objects handed over directly.
When `data.val` is null, `data.val_fraction` of the train indices is held out by the seeded split
(`split_rows3`, as for tabular data). A test split (never trained or validated on) is
`data.test` (`+data.test._target_=...`), or else `data.test_fraction` of the train indices, held
out first. A batch is `__getitem__` of each of its rows, then
`default_collate` (or `data.collate`), then (inputs, target):

- a sample `(input, target)`: the model gets `input`, the loss `target`;
- a sample dict: the target is `batch[data.target_key]` (default "labels"), removed from the
  model's inputs, which reach the model as `model(**inputs)`; with loss=model it stays among the
  inputs (the Hugging Face convention) and the model computes its loss.

Augmentation randomness keyed by sample (`data.seed_per_sample`, default on): before each
`__getitem__`, torch, numpy and `random` are seeded from a counter-based hash of (seed, epoch,
sample index). A sample's augmentation is then a pure function of its epoch and index, so it is
the same whatever `data.num_workers`, world size, prefetch or resume point: resume is exact and
N processes read what 1 process reads. In the training process (num_workers=0) its global RNG
states are restored around each batch, so reading leaves its dropout stream alone; a DataLoader
worker's states are left as they are (only reading draws from them). Off: `__getitem__` draws
from each reader's own stream, which runs on from batch to batch (a worker's, seeded by the
DataLoader; in the training process one of its own, seeded from data.seed); runs repeat from a
fresh start with the same num_workers and world size, but a resume or another num_workers or
world size reads other augmentations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from gddist.config import UserError
from gddist.data.tensors import Preprocessing, split_rows3
from gddist.losses import describe
from gddist.targets import import_target

_MASK = (1 << 64) - 1
VAL_EPOCH = -1  # validation samples are seeded alike at every evaluation
READER_EPOCH = -2  # seeds the training process's own reader stream when samples are not seeded


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample `index` of epoch `epoch`: a hash of the three, no state."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ (epoch & _MASK)) ^ index) >> 1


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """`_splitmix64` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: Sequence[int]) -> list[int]:
    """`sample_seed(seed, epoch, i)` for every i in `indices` (non-negative), in one numpy pass:
    the same values, a fraction of the per-sample cost of the Python-int hash."""
    key = _splitmix64(_splitmix64(seed) ^ (epoch & _MASK))
    with np.errstate(over="ignore"):
        x = _splitmix64_np(np.asarray(indices, dtype=np.uint64) ^ np.uint64(key))
    return (x >> np.uint64(1)).tolist()


def seed_everything(s: int) -> None:
    """Seed the three generators a `__getitem__` may draw from. Only torch's CPU generator:
    torch.manual_seed would also reseed every CUDA generator (the training process's dropout
    on GPU, when it reads with num_workers=0), which `_RngGuard` does not restore."""
    torch.default_generator.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class _RngGuard:
    """Saves the reading process's torch / numpy / random states and restores them on exit.

    With `own_seed` the reads inside draw from a stream of their own instead, which runs on from
    one `with` to the next (seeded from `own_seed` at the first): a reader whose samples are not
    seeded one by one (data.seed_per_sample=false) must not read every batch from the same
    restored state, which would repeat one batch's augmentations in every batch."""

    def __init__(self, own_seed: int | None = None) -> None:
        self.own_seed = own_seed
        self.own: tuple[Any, Any, Any] | None = None

    def __enter__(self) -> None:
        self.states = _get_states()
        if self.own_seed is not None:
            if self.own is None:
                seed_everything(self.own_seed)
            else:
                _set_states(self.own)

    def __exit__(self, *exc: object) -> None:
        if self.own_seed is not None:
            self.own = _get_states()
        _set_states(self.states)


def _get_states() -> tuple[Any, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_states(states: tuple[Any, Any, Any]) -> None:
    t, n, r = states
    torch.set_rng_state(t)
    np.random.set_state(n)
    random.setstate(r)


def check_dataset(key: str, ds: Any) -> int:
    """The length of `ds`, or a UserError naming `key` when it is not a non-empty map-style
    Dataset."""
    if isinstance(ds, IterableDataset) or not (
        hasattr(ds, "__getitem__") and hasattr(ds, "__len__")
    ):
        raise UserError(
            f"{key} is a {type(ds).__name__}, not a map-style Dataset (one with __len__ and "
            "__getitem__); gddist reads samples by index so that a step's batch is a pure "
            "function of the step: wrap an iterable dataset in a map-style one"
        )
    n = len(ds)
    if n == 0:
        raise UserError(f"{key} ({type(ds).__name__}) is empty: it has no samples to train on")
    return n


def _structure(value: Any) -> str:
    """A sample's layout for messages: tensors as dtype[shape], containers recursively."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_structure(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_structure(v) for v in value) + ")"
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype}{list(value.shape)}"
    return describe(value)


class DatasetData:
    """The train and val splits of user Datasets, serving `num_rows(split)` and
    `read(split, rows, epoch) -> (inputs, target)` like the tabular sources (see the module
    docstring for what a batch is)."""

    num_features = None  # a user model is built from its own model.* keys: no in/out sizes
    num_outputs = None  # the metrics take the output width from the first evaluation

    def __init__(
        self,
        train: Any,
        val: Any | None,
        *,
        val_fraction: float,
        seed: int,
        task: str,
        target_key: str,
        keep_target: bool,
        seed_per_sample: bool,
        collate: Callable[[list[Any]], Any] | None = None,
        names: tuple[str, ...] = ("data.train", "data.val", "data.test"),
        test: Any | None = None,
        test_fraction: float = 0.0,
    ) -> None:
        self.seed, self.task = seed, task
        self.target_key, self.keep_target = target_key, keep_target
        self.seed_per_sample = seed_per_sample
        self.collate = collate or default_collate
        self.collate_name = "data.collate" if collate else "default_collate"
        # Reads in the training process (num_workers=0) keep its dropout stream alone; unseeded
        # samples draw from a reader stream of their own (see _RngGuard).
        own = None if seed_per_sample else sample_seed(seed, READER_EPOCH, 0)
        self._guard = _RngGuard(own)
        n = check_dataset(names[0], train)
        test_name = names[2] if len(names) > 2 else "data.test"
        # Held out of train by the seeded split, test rows first (split_rows3): only the
        # fractions whose split has no Dataset of its own.
        held_test = test_fraction if test is None else 0.0
        test_rows, val_rows, train_rows = split_rows3(
            n, val_fraction if val is None else 0.0, seed, held_test
        )
        if val is None:
            self._splits = {"train": (train, train_rows.tolist(), names[0])}
            self._splits["val"] = (train, val_rows.tolist(), f"{names[0]} (held out)")
        else:
            m = check_dataset(names[1], val)
            rows = torch.cat([val_rows, train_rows]).sort().values.tolist() if held_test else None
            self._splits = {
                "train": (train, rows or list(range(n)), names[0]),
                "val": (val, list(range(m)), names[1]),
            }
        if test is not None:
            self._splits["test"] = (test, list(range(check_dataset(test_name, test))), test_name)
        elif held_test:
            self._splits["test"] = (train, test_rows.tolist(), f"{names[0]} (held-out test)")
        self.preprocessing = Preprocessing(task=task, target=target_key)
        self._check_first_sample()

    def num_rows(self, split: str) -> int:
        """Rows of split "train", "val" or "test" (0: no test split)."""
        return len(self._splits[split][1]) if split in self._splits else 0

    def read(self, split: str, rows: torch.Tensor | slice, epoch: int = VAL_EPOCH) -> Any:
        """(inputs, target) of `rows` of `split` (train rows seeded by `epoch`)."""
        ds, indices, name = self._splits[split]
        picked = indices[rows] if isinstance(rows, slice) else [indices[i] for i in rows.tolist()]
        epoch = epoch if split == "train" else VAL_EPOCH
        if get_worker_info() is not None:
            # A DataLoader worker's global RNG states belong to reading alone (nothing else in
            # the worker draws from them): no guard, and with seeding off the worker's own
            # stream runs on from batch to batch.
            samples = self._samples(ds, picked, epoch)
        else:
            with self._guard:
                samples = self._samples(ds, picked, epoch)
        return self._split_target(self._collate(samples, picked, name), name)

    def _samples(self, ds: Any, picked: list[int], epoch: int) -> list[Any]:
        if not self.seed_per_sample:
            return [ds[index] for index in picked]
        samples = []
        for index, s in zip(picked, sample_seeds(self.seed, epoch, picked), strict=True):
            seed_everything(s)
            samples.append(ds[index])
        return samples

    # ------------------------------------------------------------------ checks and batching

    def _check_first_sample(self) -> None:
        """Before any training: the first sample of each split has a layout gddist can use."""
        for split in self._splits:
            ds, indices, name = self._splits[split]
            with _RngGuard():
                sample = ds[indices[0]]
            self._split_target(self._collate([sample], indices[:1], name), name)

    def _collate(self, samples: list[Any], indices: Sequence[int], name: str) -> Any:
        try:
            return self.collate(samples)
        except Exception as e:
            raise UserError(self._collate_error(samples, indices, name, e)) from None

    def _collate_error(
        self, samples: list[Any], indices: Sequence[int], name: str, e: Exception
    ) -> str:
        cause = " ".join(str(e).split())[:300] or type(e).__name__
        first = _structure(samples[0])
        for sample, index in zip(samples[1:], indices[1:], strict=True):
            if _structure(sample) != first:
                return (
                    f"{name}: sample {index} cannot be collated with sample {indices[0]} of the "
                    f"same batch ({self.collate_name}: {cause}): sample {indices[0]} is {first}, "
                    f"sample {index} is {_structure(sample)}; return samples of one shape and "
                    "type, or pass data.collate=<a function that batches them>"
                )
        return (
            f"{name}: samples {list(indices)[:8]} cannot be collated ({self.collate_name}: "
            f"{cause}); sample {indices[0]} is {first}: return tensors, numbers or containers "
            "of them, or pass data.collate=<a function that batches them>"
        )

    def _split_target(self, batch: Any, name: str) -> tuple[Any, Any]:
        if isinstance(batch, Mapping):
            if self.target_key not in batch:
                if self.keep_target:  # loss=model: the model needs no separate target
                    return dict(batch), None
                raise UserError(
                    f"{name}: a sample is a dict with keys {sorted(map(str, batch))}, without "
                    f"the target key {self.target_key!r} (data.target_key); set "
                    "data.target_key=<the key holding the target>, or loss=model if the model "
                    "computes its own loss"
                )
            inputs = dict(batch)
            target = inputs[self.target_key] if self.keep_target else inputs.pop(self.target_key)
            return inputs, target
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return batch[0], batch[1]
        raise UserError(
            f"{name}: a sample is {_structure(batch)} after collation; a sample must be an "
            f"(input, target) pair or a dict holding {self.target_key!r} (data.target_key)"
        )


def dataset_task(task: str, loss: str, metrics: str) -> str:
    """The task a user dataset's metrics follow: data.task when given, else the loss's (bce:
    binary, cross_entropy: multiclass, mse: regression), else the metrics preset's; "generic"
    (val/loss and any metrics.extra only) when none says."""
    if task != "auto":
        return task
    by_loss = {"bce": "binary", "cross_entropy": "multiclass", "mse": "regression"}
    if loss in by_loss:
        return by_loss[loss]
    return {"classification": "multiclass", "regression": "regression"}.get(metrics, "generic")


def instantiate(key: str, node: Any, objects: Mapping[str, Any] | None = None) -> Any:
    """Build the object of config node `key`: a Hydra `_target_` node (instantiated here, in
    this process), a dotted path string (imported), or `{"_object_": qualname}`, which names an
    object `gddist.fit` passed in `objects`. One-line UserError when it cannot be built."""
    if isinstance(node, str):
        return import_target(key, node, "a function, e.g. my_pkg.data.collate")
    if not isinstance(node, Mapping) or not ("_target_" in node or "_object_" in node):
        raise UserError(
            f"{key}={node!r} must be a config node with a _target_ (e.g. "
            f"{key}._target_=my_pkg.data.Digits), the class or function that builds it"
        )
    if "_object_" in node:
        if objects is None or key not in objects:
            raise UserError(
                f"{key} names the Python object {node['_object_']}, which only gddist.fit can "
                f"pass; in a config give {key}._target_=<the class or function that builds it>"
            )
        return objects[key]
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    target = str(node["_target_"])
    import_target(f"{key}._target_", target, "a class or function, e.g. my_pkg.data.Digits")
    try:
        return hydra_instantiate(dict(node), _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        message = " ".join(str(cause).split())[:300]
        raise UserError(
            f"{key}._target_={target} could not be built: {type(cause).__name__}: {message}"
        ) from None
    except Exception as e:  # the factory itself raised
        message = " ".join(str(e).split())[:300]
        raise UserError(
            f"{key}._target_={target} could not be built: {type(e).__name__}: {message}"
        ) from None


def build(cfg: Any, seed: int, loss: str, metrics: str, objects: Mapping | None) -> DatasetData:
    """data=dataset from the data config `cfg` (a DataConfig), for a run with loss `loss` and
    metrics preset `metrics`; `objects` are gddist.fit's Python objects by config key."""
    collate = None
    if cfg.collate is not None:
        collate = instantiate("data.collate", cfg.collate, objects)
        if not callable(collate):
            raise UserError(
                f"data.collate built a {type(collate).__name__}, which is not callable; give a "
                "function list-of-samples -> batch (a node with _partial_: true for one with "
                "arguments)"
            )
    train = instantiate("data.train", cfg.train, objects)
    val = None if cfg.val is None else instantiate("data.val", cfg.val, objects)
    test = None if cfg.test is None else instantiate("data.test", cfg.test, objects)
    return DatasetData(
        train,
        val,
        val_fraction=cfg.val_fraction,
        seed=seed,
        task=dataset_task(cfg.task, loss, metrics),
        target_key=cfg.target_key,
        keep_target=loss == "model",
        seed_per_sample=cfg.seed_per_sample,
        collate=collate,
        test=test,
        test_fraction=cfg.test_fraction,
    )
