"""Models: built-ins (linear, mlp) and any user nn.Module named by `_target_`.

Contract for a user model: `target(in_features=..., out_features=..., **kwargs)` returns an
nn.Module mapping [batch, in_features] floats to [batch, out_features] logits (or predictions for
regression). Input and output sizes always come from the data.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from gddist.config import ModelConfig, UserError


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout blocks, then a linear head."""

    def __init__(
        self, in_features: int, out_features: int, hidden_sizes: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(cfg: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    if cfg.name == "linear":
        return nn.Linear(in_features, out_features)
    if cfg.name == "mlp":
        return MLP(in_features, out_features, cfg.hidden_sizes, cfg.dropout)
    factory = _import(cfg.target)
    try:
        model = factory(in_features=in_features, out_features=out_features, **cfg.kwargs)
    except TypeError as e:
        raise UserError(
            f"model._target_={cfg.target} could not be built ({e}); it must accept "
            "in_features=, out_features= and the other model.* keys"
        ) from None
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise UserError(f"model._target_={cfg.target} returned a {kind}, not an nn.Module")
    return model


def _import(path: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(
            f"model._target_={path} cannot be imported ({e}); give a dotted path to an "
            "nn.Module class, e.g. my_pkg.models.MyNet"
        ) from None


def weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Parameters the L1/L2 penalties apply to: weight matrices/kernels (ndim >= 2), no biases."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
