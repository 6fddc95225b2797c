"""Per-step training values kept on the device between log steps, and divergence found in them.

The loop appends (step, loss, grad norm or None, lr) after each optimizer step without a host
sync; a log step, an evaluation or a checkpoint reads them all at once (`read`: one all-reduce of
the losses, one copy to the host) and so finds a non-finite loss or gradient at most one log
interval late.
"""

from __future__ import annotations

import torch

from gddist.dist import Dist

Pending = list[tuple[int, torch.Tensor, torch.Tensor | None, float]]


class Diverged(Exception):
    """The loss or the gradient became non-finite under trainer.on_nonfinite=stop."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(
            f"diverged at step {step}: loss={loss:.6g}, lr={lr:.6g}; "
            "lower optimizer.lr or set trainer.grad_clip_norm"
        )
        self.step = step


def read(
    pending: Pending, dist: Dist, skips_nonfinite: bool
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(losses averaged over ranks, gradient norms (NaN where a step measured none), lrs) of the
    pending steps, on the host; raise Diverged at the first non-finite loss or norm (norms are
    not checked when `skips_nonfinite`: fp16's GradScaler handles overflowing gradients).
    A collective: every rank calls it at the same step. `pending` is left as it is."""
    if not pending:
        empty = torch.empty(0)
        return empty, empty, []
    losses = torch.stack([p[1] for p in pending]).float()
    lrs = [p[3] for p in pending]
    losses = dist.all_reduce_mean(losses).cpu()
    measured = [i for i, p in enumerate(pending) if p[2] is not None]
    norms = torch.full((len(pending),), float("nan"))
    bad = ~torch.isfinite(losses)
    if measured:
        norms[measured] = torch.stack([pending[i][2] for i in measured]).float().cpu()
        if not skips_nonfinite:
            bad[measured] |= ~torch.isfinite(norms[measured])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise Diverged(pending[i][0], losses[i].item(), lrs[i])
    return losses, norms, lrs
