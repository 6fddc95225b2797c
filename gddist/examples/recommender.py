"""experiment=recommender: matrix factorization of a ratings matrix (collaborative filtering).

The data is drawn from a known low-rank model, so the best any model can do is known too:

    rating(u, i) = mu + b_u + c_i + p_u . q_i + noise,   noise ~ N(0, noise_std^2)

with `rank`-dimensional user factors p_u and item factors q_i (entries N(0, rank^-1/2), so
p_u . q_i has unit variance), user and item biases N(0, 0.5^2) and mu = 3.5. `ratings` distinct
(user, item) pairs of the users x items matrix are observed; a seeded permutation of them holds
out `val_fraction` as the validation split. Everything is a pure function of `seed`
(numpy's PCG64), so every rank builds the same data itself.

A sample is {"user": id, "item": id, "labels": rating}; the model is called as
model(user=..., item=...) and returns one predicted rating per sample (loss=mse, metrics=regression:
val/mse, val/mae in rating units; the preset adds val/rmse).

`on_end` adds, on the same validation split: the noise floor (the RMSE of the true model, which
knows mu, the biases and the factors: only the noise is left, about noise_std), the global-mean
baseline (the train ratings' mean predicted for everyone) and a biases-only baseline
(mu + b_u + c_i fitted to the train ratings by alternating least squares: what factors add).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

REPORT = {
    "task": "recommender: matrix factorization, 500 users x 300 items, 40k ratings",
    "metric": "val/rmse",
    "baselines": {
        "baseline/global_mean_rmse": "global mean",
        "baseline/biases_rmse": "user + item biases",
        "baseline/noise_floor_rmse": "true model (noise floor)",
    },
}

MU = 3.5  # the ratings' global mean in the true model
BIAS_STD = 0.5


@functools.lru_cache(maxsize=4)
def _ratings(
    seed: int,
    users: int,
    items: int,
    rank: int,
    ratings: int,
    noise_std: float,
    val_fraction: float,
) -> dict[str, np.ndarray]:
    """The observed ratings of the true model and their split (cached: the train and the val
    Dataset of a process, and on_end, draw the same ones)."""
    if ratings > users * items:
        raise ValueError(f"ratings={ratings} exceeds the {users} x {items} matrix's entries")
    rng = np.random.default_rng(seed)
    scale = rank**-0.25  # p.q is a sum of `rank` products of two N(0, scale^2): variance 1
    p = rng.normal(0.0, scale, (users, rank))
    q = rng.normal(0.0, scale, (items, rank))
    b_user = rng.normal(0.0, BIAS_STD, users)
    b_item = rng.normal(0.0, BIAS_STD, items)
    cells = rng.choice(users * items, size=ratings, replace=False)
    user, item = cells // items, cells % items
    clean = MU + b_user[user] + b_item[item] + (p[user] * q[item]).sum(1)
    rating = clean + rng.normal(0.0, noise_std, ratings)
    order = rng.permutation(ratings)
    n_val = round(ratings * val_fraction)
    return {
        "user": user,
        "item": item,
        "rating": rating,
        "clean": clean,  # the true model's prediction: the noise floor's reference
        "train": np.sort(order[n_val:]),
        "val": np.sort(order[:n_val]),
    }


class Ratings(Dataset):
    """One split ("train" or "val") of the observed ratings: {"user", "item", "labels"}."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        users: int = 500,
        items: int = 300,
        rank: int = 8,
        ratings: int = 40000,
        noise_std: float = 0.5,
        val_fraction: float = 0.1,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        self.split = split
        self.users, self.items = users, items
        data = _ratings(seed, users, items, rank, ratings, noise_std, val_fraction)
        rows = data[split]
        # numpy arrays, indexed by __getitem__ (once per sample per epoch): numpy scalars
        # collate into a batch several times faster than 0-d tensors (default_collate).
        self.user = data["user"][rows]
        self.item = data["item"][rows]
        self.rating = data["rating"][rows].astype(np.float32)
        self.clean = data["clean"][rows]

    def __len__(self) -> int:
        return len(self.rating)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"user": self.user[i], "item": self.item[i], "labels": self.rating[i]}


class MatrixFactorization(nn.Module):
    """rating(u, i) = mu + b_u + c_i + p_u . q_i, with `dim`-dimensional factors.

    The factors are nn.Embedding weights (2-D: regularization.l2 penalizes them); the biases are
    1-D parameters (left unpenalized: each has dozens to hundreds of ratings to fit it). mu starts
    at the true model's scale so that the first steps fit structure, not the offset."""

    def __init__(
        self, users: int = 500, items: int = 300, dim: int = 8, init_std: float = 0.1
    ) -> None:
        super().__init__()
        self.user_factors = nn.Embedding(users, dim)
        self.item_factors = nn.Embedding(items, dim)
        # Small random factors: zero ones would have zero gradients (p.q is bilinear).
        nn.init.normal_(self.user_factors.weight, 0.0, init_std)
        nn.init.normal_(self.item_factors.weight, 0.0, init_std)
        self.user_bias = nn.Parameter(torch.zeros(users))
        self.item_bias = nn.Parameter(torch.zeros(items))
        self.mu = nn.Parameter(torch.tensor(MU))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        dot = (self.user_factors(user) * self.item_factors(item)).sum(-1)
        return self.mu + self.user_bias[user] + self.item_bias[item] + dot


def _rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return math.sqrt(float(np.mean((pred - target) ** 2)))


def _biases(
    train: Ratings, sweeps: int = 20, reg: float = 5.0
) -> tuple[float, np.ndarray, np.ndarray]:
    """mu, b_u, c_i fitted to the train ratings by alternating (ridge-shrunk) least squares."""
    u, i, r = train.user, train.item, train.rating.astype(np.float64)
    mu = float(r.mean())
    bu, bi = np.zeros(train.users), np.zeros(train.items)
    n_u = np.bincount(u, minlength=train.users) + reg
    n_i = np.bincount(i, minlength=train.items) + reg
    for _ in range(sweeps):
        bu = np.bincount(u, weights=r - mu - bi[i], minlength=train.users) / n_u
        bi = np.bincount(i, weights=r - mu - bu[u], minlength=train.items) / n_i
    return mu, bu, bi


def on_end(run_dir: Path, cfg: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """The baselines on the run's own validation split (data.val's node, built again here):
    global mean, user + item biases, the true model (the noise floor). RMSE, like val/rmse."""
    data = cfg["data"]
    train = Ratings(**{k: v for k, v in data["train"].items() if k != "_target_"})
    val = Ratings(**{k: v for k, v in data["val"].items() if k != "_target_"})
    target = val.rating.astype(np.float64)
    mu, bu, bi = _biases(train)
    return {
        "baseline/global_mean_rmse": _rmse(np.full_like(target, mu), target),
        "baseline/biases_rmse": _rmse(mu + bu[val.user] + bi[val.item], target),
        "baseline/noise_floor_rmse": _rmse(val.clean, target),
    }
