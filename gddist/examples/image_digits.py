"""experiment=image_digits: handwritten digit recognition, a small CNN on scikit-learn's bundled
8x8 digits (1,797 images, 10 classes; `load_digits`, no download).

- `Digits(split, seed, val_fraction, shift)`: the map-style Dataset that data=dataset builds on
  every rank. The train/val split is gddist's seeded row split (`split_rows(1797, val_fraction,
  seed)`), so both nodes of the preset, and `on_end`, see the same rows. Train images are shifted
  by up to `shift` pixels (zero padded, a torch draw in `__getitem__`: gddist seeds it per sample,
  so augmentation is the same on 1 or N processes and after a resume); val images never are.
- `CNN(channels, dropout)`: conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> 2x2 max-pool -> dropout ->
  linear(10) logits.
- `on_end`: scikit-learn's LogisticRegression on the same train rows (flattened pixels, no
  augmentation), its val accuracy as `baseline/logreg_accuracy`; plots/misclassified.png shows
  the val images the CNN gets wrong.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from gddist.data.tensors import split_rows
from gddist.examples import require_sklearn

REPORT = {
    "task": "digit images (8x8, 10 classes): CNN",
    "metric": "val/accuracy",
    "baselines": {"baseline/logreg_accuracy": "scikit-learn LogisticRegression (pixels)"},
}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All images as float32 [N, 1, 8, 8] in [0, 1], and their labels int64 [N]."""
    require_sklearn("image_digits")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(d.target, dtype=torch.int64)


def split_digits(name: str, seed: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of split `name` ("train" or "val"): gddist's seeded row split."""
    if name not in ("train", "val"):
        raise ValueError(f"no split {name!r}; choose train or val")
    images, labels = _digits()
    val_rows, train_rows = split_rows(len(labels), val_fraction, seed)
    rows = train_rows if name == "train" else val_rows
    return images[rows], labels[rows]


class Digits(Dataset):
    """(image float32 [1, 8, 8], label int64 []) pairs of split `split`. With `split="train"`
    and `shift > 0`, each read shifts the image by a random (dx, dy) in [-shift, shift]^2,
    filling with background (zeros); val reads are the images as they are."""

    def __init__(
        self, split: str = "train", seed: int = 0, val_fraction: float = 0.2, shift: int = 1
    ) -> None:
        self.images, self.labels = split_digits(split, seed, val_fraction)
        self.shift = shift if split == "train" else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.shift:
            s = self.shift
            dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
            padded = F.pad(image, (s, s, s, s))
            image = padded[:, s + dy : s + dy + 8, s + dx : s + dx + 8]
        return image, self.labels[i]


class CNN(nn.Module):
    """Logits [B, 10] of images [B, 1, 8, 8]: two 3x3 convolutions (`channels`, then
    2 * `channels`), a 2x2 max-pool to 4x4, dropout `dropout`, a linear head."""

    def __init__(self, channels: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(self.drop(x.flatten(1)))


def _split_of(cfg: dict[str, Any], node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the run trained (node "train") or validated (node "val") on, from its config."""
    kwargs = {k: v for k, v in cfg["data"][node].items() if k in ("seed", "val_fraction")}
    return split_digits(cfg["data"][node].get("split", node), **kwargs)


def on_end(run_dir: Path, cfg: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """The baseline on the run's own split: LogisticRegression on the flattened train pixels,
    accuracy on the val images. With logger.plots, plots/misclassified.png: the val images the
    model (in eval mode) gets wrong, with its prediction and the true label."""
    require_sklearn("image_digits")
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = _split_of(cfg, "train")
    x_val, y_val = _split_of(cfg, "val")
    logreg = LogisticRegression(max_iter=2000)
    logreg.fit(x_train.flatten(1).numpy(), y_train.numpy())
    baseline = float(logreg.score(x_val.flatten(1).numpy(), y_val.numpy()))
    if cfg["logger"].get("plots", True):
        device = next(model.parameters()).device
        predicted = model(x_val.to(device)).argmax(1).cpu()
        _plot_misclassified(Path(run_dir) / "plots", x_val, y_val, predicted)
    return {"baseline/logreg_accuracy": baseline}


def _plot_misclassified(
    folder: Path, images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_wrong = np.flatnonzero((predicted != labels).numpy())
    wrong = all_wrong[:32]
    cols = 8
    nrows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 1.2, nrows * 1.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{int(predicted[i])} (true {int(labels[i])})", fontsize=8)
    fig.suptitle(f"val images the CNN misclassifies: {len(all_wrong)} of {len(labels)}", fontsize=9)
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "misclassified.png", dpi=80)
    plt.close(fig)
