"""Models: built-ins (linear, mlp) and any user nn.Module named by `_target_`.

Contract for a user model on tabular data: `target(in_features=..., out_features=...,
**kwargs)` returns an nn.Module mapping [batch, in_features] floats to [batch, out_features]
logits (or predictions for regression); input and output sizes come from the data. On a user
Dataset (data=dataset) it is called `target(**kwargs)` alone: the model knows its own sizes.
`kwargs` are the other `model.*` keys but gddist's own (config.MODEL_OWN_KEYS: `sync_batchnorm`,
applied by gddist/engine.py). `forward` is how every batch reaches a model: `model(inputs)`, or
`model(**inputs)` for a dict batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gddist.config import ModelConfig, UserError
from gddist.targets import import_target


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


@dataclass(frozen=True)
class Objective:
    """A 2-D function to minimize: f(point) -> scalar, its box (for random starts and contour
    plots) and its global minimum (value, argmin)."""

    f: Callable[[torch.Tensor], torch.Tensor]
    box: tuple[float, float, float, float]  # xmin, xmax, ymin, ymax
    minimum: float
    argmin: tuple[float, float]


def rosenbrock(p: torch.Tensor) -> torch.Tensor:
    """(1 - x)^2 + 100 (y - x^2)^2: a curved, ill-conditioned valley; minimum 0 at (1, 1)."""
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def styblinski_tang(p: torch.Tensor) -> torch.Tensor:
    """0.5 sum(p^4 - 16 p^2 + 5 p): four local minima (per coordinate -2.9035 or 2.7468); the
    global one is -78.332 at (-2.9035, -2.9035). Non-convex: the start decides the basin."""
    return 0.5 * (p**4 - 16 * p**2 + 5 * p).sum(-1)


FUNCTIONS = {
    "rosenbrock": Objective(rosenbrock, (-1.5, 1.5, -0.5, 1.5), 0.0, (1.0, 1.0)),
    "styblinski_tang": Objective(
        styblinski_tang, (-5.0, 5.0, -5.0, 5.0), -78.33233, (-2.903534, -2.903534)
    ),
}


class FunctionModel(nn.Module):
    """The point being optimized, as the model's only parameter; forward returns f(point) for
    each input row (the inputs are dummies: see gddist.data.function_data).

    Start: `init` if given, else uniform in the function's box from the global torch RNG (which
    the trainer seeds with `seed` before building the model, like any model's initial weights).
    """

    def __init__(self, function: str, init: list[float] | None = None) -> None:
        super().__init__()
        self.function = FUNCTIONS[function]
        if init is None:
            x0, x1, y0, y1 = self.function.box
            low, high = torch.tensor([x0, y0]), torch.tensor([x1, y1])
            start = low + (high - low) * torch.rand(2)
        else:
            start = torch.tensor(init, dtype=torch.float32)
        self.point = nn.Parameter(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.f(self.point).expand(x.shape[0], 1)

    def extra_log(self) -> dict[str, float]:
        """The current point, added to each train log row: the optimization path."""
        x, y = self.point.detach().tolist()
        return {"point/x": x, "point/y": y}


def function_start(function: str, init: list[float] | None, seed: int) -> list[float]:
    """The start point a run with model=function used: `init`, or the random start drawn after
    the trainer's torch.manual_seed(seed) (it seeds before building any model). For plots."""
    if init is not None:
        return [float(v) for v in init]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FunctionModel(function).point.tolist()


def forward(model: nn.Module, inputs: Any) -> Any:
    """The model's output for a batch's inputs: keyword arguments for a dict, else one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def build(
    cfg: ModelConfig, in_features: int | None, out_features: int | None, prebuilt: Any = None
) -> nn.Module:
    """The model of `cfg`; sizes None for a user Dataset (the model is built from its own keys).
    `prebuilt` is gddist.fit's model: an nn.Module used as it is, or a factory called with the
    model.* keys."""
    if prebuilt is not None:
        return _call_factory(prebuilt, cfg, f"the model passed to gddist.fit ({cfg.target})", {})
    if cfg.name == "function":
        return FunctionModel(cfg.function, cfg.init)
    if cfg.name == "linear":
        return nn.Linear(in_features, out_features)
    if cfg.name == "mlp":
        return MLP(in_features, out_features, cfg.hidden_sizes, cfg.dropout)
    factory = import_target(
        "model._target_", cfg.target, "an nn.Module class or factory, e.g. my_pkg.models.MyNet"
    )
    sizes = {"in_features": in_features, "out_features": out_features}
    if in_features is None:  # a user Dataset: the model knows its own sizes
        sizes = {}
    return _call_factory(factory, cfg, f"model._target_={cfg.target}", sizes)


def _call_factory(factory: Any, cfg: ModelConfig, key: str, sizes: dict[str, Any]) -> nn.Module:
    """`factory(**sizes, **model.* keys)` (or `factory` itself when it is already a module); a
    factory that raises is one line keeping its message."""
    if isinstance(factory, nn.Module):
        return factory
    try:
        model = factory(**sizes, **cfg.kwargs)
    except Exception as e:  # the user's constructor: its message is the useful part
        message = " ".join(str(e).split())[:300] or type(e).__name__
        wants = "in_features=, out_features= and " if sizes else ""
        raise UserError(
            f"{key} could not be built ({type(e).__name__}: {message}); it is called with "
            f"{wants}the other model.* keys ({', '.join(sorted(cfg.kwargs)) or 'none'})"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{key} returned a {type(model).__name__}, not an nn.Module")
    return model


def weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Parameters the L1/L2 penalties apply to: weight matrices/kernels (ndim >= 2), no biases."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
