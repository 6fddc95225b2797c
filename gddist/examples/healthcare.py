"""experiment=healthcare: breast-cancer diagnosis from a CSV, through the public data=csv path.

scikit-learn's bundled Wisconsin diagnostic breast-cancer data (569 patients, 30 numeric features
of a fine-needle aspirate's cell nuclei; no download) is written as an ordinary CSV, which
data=csv then reads like any user's file: numeric columns standardized with train-split
statistics, the text target `diagnosis` (benign / malignant; classes sorted, so malignant is the
positive class 1), gddist's seeded 80 / 20 row split.

How the CSV path reaches data.path on every rank before data=csv reads it: the preset sets
`data.path: ${gddist_call:gddist.examples.healthcare.csv_path}`. Every process resolves its config
(Hydra compose, then the resolved dict that gddist.run gets) before building any data, so each
rank calls `csv_path()`, which writes the file if it is not there yet (deterministic content,
written under a temporary name and renamed: ranks racing on it write the same bytes) and
returns its absolute path.

- `MLP(in_features, out_features, hidden, dropout)`: model=custom on tabular data is built with
  the data's widths; hidden=0 is logistic regression.
- `on_end`: scikit-learn's LogisticRegression on the same train rows, standardized the same way,
  its val ROC AUC as `baseline/logreg_roc_auc`; plots/roc.png: both ROC curves on the val rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gddist.data.tensors import split_rows
from gddist.examples import require_sklearn

REPORT = {
    "task": "breast-cancer diagnosis (CSV, 30 features): MLP",
    "metric": "val/roc_auc",
    "baselines": {"baseline/logreg_roc_auc": "scikit-learn LogisticRegression"},
}

TARGET = "diagnosis"
FILE_NAME = "breast_cancer.csv"


def cache_dir() -> Path:
    """Where the example CSV is written: $GDDIST_CACHE_DIR if set, else
    $XDG_CACHE_HOME/gddist (default ~/.cache/gddist)."""
    if os.environ.get("GDDIST_CACHE_DIR"):
        return Path(os.environ["GDDIST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gddist"


def csv_text() -> str:
    """The CSV: a header of the 30 feature names and `diagnosis`, one row per patient in
    scikit-learn's order, floats as their shortest round-trip repr (the same bytes every time)."""
    require_sklearn("healthcare")
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    names = [str(n) for n in d.target_names]  # index = scikit-learn's label: malignant, benign
    lines = [",".join([*map(str, d.feature_names), TARGET])]
    for row, label in zip(d.data.tolist(), d.target.tolist(), strict=True):
        lines.append(",".join([*map(repr, row), names[label]]))
    return "\n".join(lines) + "\n"


def csv_path() -> str:
    """The absolute path of the example CSV, written first if missing or different. Safe on
    several ranks at once: each writes the same bytes under its own temporary name and renames
    it into place (atomic), so a reader sees the whole file or none."""
    path = cache_dir() / FILE_NAME
    text = csv_text()
    if not (path.is_file() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path.resolve())


class MLP(nn.Module):
    """Logits [B, out_features] of standardized features [B, in_features]: one hidden layer of
    `hidden` tanh units (dropout `dropout`), or a linear model (logistic regression) when
    hidden is 0."""

    def __init__(
        self, in_features: int, out_features: int = 1, hidden: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden),
                nn.Tanh(),
                nn.Dropout(dropout),
                nn.Linear(hidden, out_features),
            )
        else:
            self.net = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def split_arrays(cfg: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_val, y_val) as data=csv makes them from the run's CSV: gddist's
    seeded split, features standardized with train-split mean and (population) std, label 1 for
    malignant."""
    from gddist.data.csv import read_csv

    features, label = read_csv(cfg["data"]["path"], cfg["data"]["target"])
    x = np.array([c.values for c in features], dtype=np.float64).T
    y = np.array([v == "malignant" for v in label.values], dtype=np.int64)
    val_rows, train_rows = split_rows(len(y), cfg["data"]["val_fraction"], cfg["seed"])
    val_rows, train_rows = val_rows.numpy(), train_rows.numpy()
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    return x[train_rows], y[train_rows], x[val_rows], y[val_rows]


def on_end(run_dir: Path, cfg: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """The baseline on the run's own split: LogisticRegression (scikit-learn defaults, L2 C=1)
    on the standardized train rows, its ROC AUC on the val rows; with logger.plots,
    plots/roc.png (the model's ROC curve, scored by scikit-learn, next to the baseline's)."""
    require_sklearn("healthcare")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve

    x_train, y_train, x_val, y_val = split_arrays(cfg)
    logreg = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    baseline_scores = logreg.decision_function(x_val)
    device = next(model.parameters()).device
    x = torch.tensor(x_val, dtype=torch.float32, device=device)
    scores = model(x).reshape(-1).double().cpu().numpy()
    out = {"baseline/logreg_roc_auc": float(roc_auc_score(y_val, baseline_scores))}
    if cfg["logger"].get("plots", True):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for name, s, auc in (
            ("gddist MLP", scores, float(roc_auc_score(y_val, scores))),
            ("LogisticRegression", baseline_scores, out["baseline/logreg_roc_auc"]),
        ):
            fpr, tpr, _ = roc_curve(y_val, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.4f})")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate (malignant)")
        ax.set_title(f"ROC on the {len(y_val)} validation patients", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        folder = Path(run_dir) / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "roc.png", dpi=80, bbox_inches="tight")
        plt.close(fig)
    return out
