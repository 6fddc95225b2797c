"""The global batch order: which rows optimizer step s reads, a pure function of (seed, step).

Global-batch semantics (docs/architecture.md, invariant 1): `GlobalBatches` orders the training
set of epoch e by a permutation drawn from (seed, e); optimizer step s reads global batch
s mod steps_per_epoch of epoch s // steps_per_epoch, and every rank takes its slice of each
micro-batch. The position is a pure function of the step, so resuming at step s continues the same
sample order at any world size.
"""

from __future__ import annotations

import torch

from gddist.config import UserError

# Independent random streams derived from the one user seed.
_STREAM_DATA, _STREAM_SPLIT, _STREAM_ORDER = 1, 2, 3


def generator(seed: int, stream: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator for (seed, stream, epoch): the same numbers on every rank and every run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919 + epoch)


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
