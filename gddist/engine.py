"""How the model is wrapped and its gradients are synchronized, clipped and measured.

The native engine wraps the model in DistributedDataParallel when the world has more than one
process (gradient_as_bucket_view: gradients live in DDP's buckets, no extra copy). Micro-batches
before the last one of an optimizer step run under `no_sync()`, so gradients are all-reduced exactly
once per optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gddist.dist import Dist


class DDPEngine:
    def __init__(self, model: nn.Module, dist: Dist) -> None:
        self.module = model  # the plain model: state_dict keys without "module."
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(
                model, device_ids=device_ids, gradient_as_bucket_view=True
            )
        else:
            self.model = model

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: all-reduce gradients only when `sync`."""
        if sync or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def clip_gradients(self, clip_norm: float | None, clip_value: float | None) -> torch.Tensor:
        """Clip the (already all-reduced) gradients; return the global norm before norm clipping.

        The norm is a device tensor (no host sync). After the all-reduce every rank holds the same
        gradients, so every rank computes the same norm: a non-finite norm is a decision all ranks
        share without another collective.
        """
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.module.parameters(), clip_value)
        norm = torch.nn.utils.get_total_norm(grads)
        if clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), clip_norm, norm)
        return norm
