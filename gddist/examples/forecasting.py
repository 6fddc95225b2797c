"""experiment=forecasting: next-step forecasting of a price series from its last `window` values.

The series is synthetic and a pure function of `seed` (numpy's PCG64), an hourly price:

    price(t) = 100 + trend * t + daily * sin(2 pi t / 24) + weekly * sin(2 pi t / 168) + ar(t)
    ar(t) = phi * ar(t - 1) + eps(t),   eps ~ N(0, noise_std^2)

so the best possible one-step forecast errs by eps alone (MAE noise_std * sqrt(2 / pi), ~0.80).

Chronological split: the first `1 - val_fraction` of the series is "train", the rest "val".
A sample is the window of `window` consecutive prices and the price that follows it, and a
window lies wholly inside its split, target included (no window straddles the boundary, and the
val windows' inputs are val prices only). Within train, gddist shuffles windows; the splits
never mix.

Units: the target (`labels`) is the next price in price units, so loss=mse and the regression
metrics (val/mae, val/mse) are in price units too. The normalization lives in the Dataset and is
undone by the model: each window is given as (prices - its last price) / scale, with `scale`
the standard deviation of the train part's one-step changes (train data only: no look at val),
together with `last` and `scale`; the model predicts last + scale * net(window). The network
thus sees level-free, unit-size inputs (the trend moves the level out of the train range), and
predicts the change from the last price, so an untrained net starts as the naive forecast.

`on_end` adds on the same val windows the naive forecast (the last price), the moving average of
the last k prices, k chosen on the train windows (the k with the least train MAE, among 2 to
`window`), and the true model's forecast (it knows the trend, the seasons and phi: only eps is
left, the noise floor); and draws RUN_DIR/plots/forecast.png: forecast vs truth on val.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

REPORT = {
    "task": "forecasting: next hourly price from the last 48 (trend + seasonality + AR(1))",
    "metric": "val/mae",
    "baselines": {
        "baseline/naive_mae": "last value (naive)",
        "baseline/moving_average_mae": "moving average (k tuned on train)",
        "baseline/true_model_mae": "true model (noise floor)",
    },
}

MA_WINDOWS = (2, 3, 4, 6, 8, 12, 24, 48, 96, 168)  # moving-average lengths tried (<= window)


SERIES_DEFAULTS = {
    "length": 6000,
    "trend": 0.01,
    "daily": 6.0,
    "weekly": 3.0,
    "phi": 0.9,
    "noise_std": 1.0,
}


@functools.lru_cache(maxsize=4)
def _series(
    seed: int, length: int, trend: float, daily: float, weekly: float, phi: float, noise_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """(prices, their deterministic part: 100 + trend + seasonality), float64, cached: the two
    Datasets of a process and on_end draw the same series."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    eps = rng.normal(0.0, noise_std, length)
    ar = np.empty(length)
    ar[0] = eps[0] / np.sqrt(1 - phi**2)  # the stationary distribution: no burn-in transient
    for k in range(1, length):
        ar[k] = phi * ar[k - 1] + eps[k]
    deterministic = (
        100.0
        + trend * t
        + daily * np.sin(2 * np.pi * t / 24)
        + weekly * np.sin(2 * np.pi * t / 168)
    )
    return deterministic + ar, deterministic


def price_series(seed: int, **series: Any) -> np.ndarray:
    """The synthetic hourly price series of `seed` (float64); `series` overrides
    SERIES_DEFAULTS (length, trend, daily, weekly, phi, noise_std)."""
    return _series(seed, **_series_keys(series))[0]


def _series_keys(series: dict[str, Any]) -> dict[str, Any]:
    unknown = set(series) - set(SERIES_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown series keys {sorted(unknown)}; known: {sorted(SERIES_DEFAULTS)}")
    return {**SERIES_DEFAULTS, **series}


class PriceWindows(Dataset):
    """The windows of one split ("train" or "val") of the series:
    {"window": float32[window] normalized, "last": price, "scale": scale, "labels": next price}.
    The series keys (length, trend, ...) are `price_series`'s."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        window: int = 48,
        val_fraction: float = 0.2,
        **series: Any,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        self.series = _series_keys(series)
        prices, deterministic = _series(seed, **self.series)
        boundary = round(len(prices) * (1 - val_fraction))
        lo, hi = (0, boundary) if split == "train" else (boundary, len(prices))
        if hi - lo <= window:
            raise ValueError(f"the {split} part has {hi - lo} prices: none left after a window")
        self.split, self.window = split, window
        # Both splits normalize with the train part's scale (the only one a forecaster knows).
        self.scale = float(np.std(np.diff(prices[:boundary])))
        self.targets = np.arange(lo + window, hi)  # index of the price each window predicts
        self.prices = prices
        # The true model's forecast, E[price(t) | the past]: the noise floor's reference.
        phi = self.series["phi"]
        t = self.targets
        self.oracle = deterministic[t] + phi * (prices[t - 1] - deterministic[t - 1])
        inputs = np.stack([prices[t - window : t] for t in self.targets])
        last = inputs[:, -1:]
        # Normalized once here; numpy, indexed by __getitem__ (once per sample per epoch):
        # numpy values collate into a batch several times faster than 0-d tensors.
        self._window = ((inputs - last) / self.scale).astype(np.float32)
        self._last = last[:, 0].astype(np.float32)
        self._labels = prices[self.targets].astype(np.float32)
        self._scale = np.float32(self.scale)
        self.inputs = inputs  # float64 prices, for the baselines

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "window": self._window[i],
            "last": self._last[i],
            "scale": self._scale,
            "labels": self._labels[i],
        }


class Forecaster(nn.Module):
    """An MLP on the normalized window predicting the next price as last + scale * net(window).

    The output layer starts at zero, so the untrained model is the naive forecast and training
    learns the correction (the seasonal swing and the AR(1) pull back to the mean)."""

    def __init__(self, window: int = 48, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = window
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.net = nn.Sequential(*blocks, self.out)

    def forward(self, window: torch.Tensor, last: torch.Tensor, scale: torch.Tensor):
        return last + scale * self.net(window).squeeze(-1)


def _mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - target)))


def _moving_average(inputs: np.ndarray, k: int) -> np.ndarray:
    return inputs[:, -k:].mean(axis=1)


def _build(node: dict[str, Any]) -> PriceWindows:
    return PriceWindows(**{k: v for k, v in node.items() if k != "_target_"})


def on_end(run_dir: Path, cfg: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """The naive, moving-average and true-model MAE on the run's val windows (data.val's node,
    built again), the moving average's k (chosen on the train windows), plots/forecast.png."""
    train, val = _build(cfg["data"]["train"]), _build(cfg["data"]["val"])
    target = val.prices[val.targets]
    train_target = train.prices[train.targets]
    ks = [k for k in MA_WINDOWS if k <= train.window]
    best_k = min(ks, key=lambda k: _mae(_moving_average(train.inputs, k), train_target))

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in _batch(val).items()}
    forecast = model(**batch).double().cpu().numpy()
    _plot(run_dir / "plots" / "forecast.png", val, forecast)
    return {
        "baseline/naive_mae": _mae(val.inputs[:, -1], target),
        "baseline/moving_average_mae": _mae(_moving_average(val.inputs, best_k), target),
        "baseline/moving_average_k": best_k,
        "baseline/true_model_mae": _mae(val.oracle, target),
    }


def _batch(ds: PriceWindows) -> dict[str, torch.Tensor]:
    """All of `ds` as one batch of model inputs (what default_collate makes of its samples)."""
    n = len(ds)
    scale = torch.full((n,), float(ds._scale))
    return {
        "window": torch.from_numpy(ds._window),
        "last": torch.from_numpy(ds._last),
        "scale": scale,
    }


def _plot(path: Path, val: PriceWindows, forecast: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    t, truth = val.targets, val.prices[val.targets]
    fig, (whole, week) = plt.subplots(2, 1, figsize=(10, 6.5))
    whole.plot(t, truth, lw=0.6, color="black", label="truth")
    whole.plot(t, forecast, lw=0.6, color="tab:orange", label="forecast")
    whole.set_title(f"validation part: hours {t[0]} to {t[-1]} (MAE {_mae(forecast, truth):.3f})")
    first = slice(0, 168)
    naive = val.inputs[first, -1]
    week.plot(t[first], truth[first], "k.-", lw=0.8, ms=3, label="truth")
    week.plot(t[first], forecast[first], "-", color="tab:orange", label="forecast")
    week.plot(t[first], naive, "--", color="tab:blue", lw=0.8, label="naive (last value)")
    week.set_title("its first week")
    for ax in (whole, week):
        ax.set_xlabel("hour")
        ax.set_ylabel("price")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
