"""BatchNorm over the global batch (`model.sync_batchnorm=true`), on CUDA and on CPU (gloo).

`convert(model, device)` replaces every BatchNorm layer (1d/2d/3d) by one whose training-mode mean
and variance are those of the batch of all ranks together, and so are the running statistics it
updates: N processes train as one process on the global batch does (1e-5). The new layers share
the old ones' parameters and buffers, with the same state_dict keys, so checkpoints and model.pt
load into the plain BatchNorm model and back. In eval mode they use the running statistics, with
no communication.

- CUDA (and the other devices torch supports): torch's own `SyncBatchNorm`, built by
  `SyncBatchNorm.convert_sync_batchnorm`.
- CPU: torch refuses SyncBatchNorm there twice (its forward: `SyncBatchNorm expected input tensor
  to be on GPU`, its kernels are CUDA-only; DDP: `SyncBatchNorm layers only work with GPU
  modules`). `GlobalBatchNorm` computes the same statistics with two all-reduces through
  autograd: the per-channel sums and the count, then the centred squares (two passes, as accurate
  as BatchNorm's own kernel). Their backward all-reduces the gradients of those sums, which is the
  gradient of the global-batch objective; the affine weight and bias get local gradients that DDP
  averages, as with torch's SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of every rank's copy of the sum reaches every
    rank's input (torch.distributed.nn.functional.all_reduce does this too, but is deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad)
        return grad


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer of any dimension whose training statistics are those of the global
    batch when a process group of N > 1 ranks exists (see the module docstring); plain BatchNorm
    otherwise. Not a torch SyncBatchNorm: DDP refuses those on CPU."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average, as BatchNorm's
                factor = 1.0 / float(self.num_batches_tracked.item())
        return self._global_forward(input, factor)

    def _global_forward(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]  # every dim but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in fp32 (under bf16 autocast too), as BatchNorm's kernels do
        count = xf.new_tensor([x.numel() / x.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():  # the unbiased variance of the global batch, as BatchNorm keeps
                unbiased = var * (n / (n - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)
        return out.to(x.dtype)


def convert(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """`model` with every BatchNorm layer synced over the global batch (torch's SyncBatchNorm on
    CUDA, GlobalBatchNorm on CPU), and how many layers there were. The returned module is `model`
    itself unless `model` is a BatchNorm layer; its parameters and buffers are the same tensors
    either way (an optimizer built on `model` keeps working)."""
    if device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model, sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model = _to_global(model)
    return model, sum(isinstance(m, GlobalBatchNorm) for m in model.modules())


def _to_global(module: nn.Module) -> nn.Module:
    """torch's convert_sync_batchnorm, building GlobalBatchNorm layers."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            bias=module.bias is not None,
        )  # its own tensors are all replaced by the layer's below
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out
