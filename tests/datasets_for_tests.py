"""User Datasets and models for `data=dataset` / `model=custom` in tests: scikit-learn's bundled
8x8 digits (no download) through a small CNN, with augmentation drawn in __getitem__."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    return images, torch.tensor(d.target)


class Digits(Dataset):
    """(image [1, 8, 8], label) pairs; `split` train: the first 1400 images, val: the rest.
    `shift`: a random shift of up to `shift` pixels (torch RNG) plus numpy noise: augmentation
    from two generators, both seeded per sample by gddist."""

    def __init__(self, split: str = "train", shift: int = 1, noise: float = 0.05, limit: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"no split {split!r}; choose train or val")
        images, labels = _digits()
        part = slice(0, 1400) if split == "train" else slice(1400, None)
        self.images, self.labels = images[part], labels[part]
        if limit:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.shift, self.noise = shift, noise

    def __len__(self) -> int:
        return len(self.labels)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        if self.shift:
            dx, dy = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        if self.noise:
            image = image + torch.from_numpy(
                np.random.normal(0, self.noise, image.shape).astype(np.float32)
            )
        return image

    def __getitem__(self, i: int):
        return self.augment(self.images[i]), self.labels[i]


class DictDigits(Digits):
    """The same samples as dicts: {"pixels": image, "labels": label}."""

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return {"pixels": image, "labels": label}


class CNN(nn.Module):
    """conv(1 -> channels) -> [BatchNorm] -> ReLU -> conv -> ReLU -> pool -> [dropout] -> linear(10)."""

    def __init__(self, channels: int = 8, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        # No conv1 bias before BatchNorm (the usual layout): BatchNorm subtracts it again, so its
        # true gradient is 0 and Adam would scale the rounding noise left in it into lr-sized
        # steps, a random walk that 1 and N processes (other rounding) walk differently.
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(self.drop(x.flatten(1)))


class DictCNN(CNN):
    """model(pixels=..., labels=...) -> an object with .loss and .logits (Hugging Face style)."""

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None):
        logits = super().forward(pixels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def smooth_ce(output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """A custom loss function: label-smoothed cross-entropy."""
    return F.cross_entropy(output, target, label_smoothing=smoothing)


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int):
        raise IndexError(i)


class Stream(torch.utils.data.IterableDataset):
    """An iterable-style dataset: refused (gddist reads samples by index)."""

    def __iter__(self):
        yield from Digits("train")


class Ragged(Digits):
    """Sample `bad` is 9x8 instead of 8x8: it cannot be collated with the others."""

    def __init__(self, bad: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        if i == self.bad:
            image = torch.cat([image, image[:, :1]], dim=1)
        return image, label


class NanDigits(Digits):
    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return image * float("nan"), label


class RandomDraws(Dataset):
    """Sample i = (draws from torch, numpy and random, i): augmentation randomness made visible."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        import random

        draws = [torch.rand(()).item(), float(np.random.rand()), random.random()]
        return torch.tensor(draws), torch.tensor(i)
