"""Generated tabular problems: purchase prediction, sparse linear regression, and the dummy rows
of model=function. Each is a pure function of (seed, num_samples)."""

from __future__ import annotations

import math

import torch

from gddist.config import DataConfig, UserError
from gddist.data.order import _STREAM_DATA, generator
from gddist.data.tensors import Preprocessing, TensorData

# The purchase problem's true logistic model on RAW features:
# logit = PURCHASE_BIAS + 0.05 * age + 0.04 * income_k + 0.8 * education_level
PURCHASE_FEATURES = ("age", "income_k", "education_level")
PURCHASE_COEF = (0.05, 0.04, 0.8)
PURCHASE_BIAS = -6.0

# The regression problem (data=regression): REGRESSION_FEATURES independent standard normal
# features, of which only the first len(REGRESSION_COEF) matter (the rest are pure noise, which
# L1 regularization should zero out); y = REGRESSION_BIAS + x . REGRESSION_COEF + noise.
REGRESSION_FEATURES = 8
REGRESSION_COEF = (2.0, -1.0, 0.5)
REGRESSION_BIAS = 3.0
REGRESSION_NOISE = 0.5


def make_purchase(num_samples: int, seed: int) -> tuple[dict[str, list], list[float]]:
    """Raw purchase data: age in years, income in k$, education level 1-4, label purchased 0/1."""
    g = generator(seed, _STREAM_DATA)
    n = num_samples
    age = torch.randint(18, 71, (n,), generator=g).double()
    income = torch.exp(math.log(50.0) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    income = torch.round(income * 10) / 10
    education = torch.multinomial(torch.tensor([0.3, 0.4, 0.2, 0.1]), n, True, generator=g) + 1.0
    raw = torch.stack([age, income, education.double()], dim=1)
    logit = PURCHASE_BIAS + raw @ torch.tensor(PURCHASE_COEF, dtype=torch.float64)
    label = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)).double()
    columns = {name: raw[:, j].tolist() for j, name in enumerate(PURCHASE_FEATURES)}
    return columns, label.tolist()


def make_regression(num_samples: int, seed: int) -> tuple[dict[str, list], list[float]]:
    """Raw regression data: features x0..x7 ~ N(0, 1), y = 3 + 2 x0 - x1 + 0.5 x2 + N(0, 0.5^2)."""
    g = generator(seed, _STREAM_DATA)
    x = torch.randn(num_samples, REGRESSION_FEATURES, generator=g, dtype=torch.float64)
    coef = torch.zeros(REGRESSION_FEATURES, dtype=torch.float64)
    coef[: len(REGRESSION_COEF)] = torch.tensor(REGRESSION_COEF, dtype=torch.float64)
    noise = REGRESSION_NOISE * torch.randn(num_samples, generator=g, dtype=torch.float64)
    y = REGRESSION_BIAS + x @ coef + noise
    columns = {f"x{j}": x[:, j].tolist() for j in range(REGRESSION_FEATURES)}
    return columns, y.tolist()


def function_data(cfg: DataConfig) -> TensorData:
    """Dummy rows for model=function (which sets data.name=function): the "model" is the point
    being optimized and its output is the function value there (task "objective": the loss is
    the model output). Every row is the same zero feature, so any batch size and any world size
    compute the same gradient; the validation set is the same rows, so val/loss is the function
    value at the current point."""
    if cfg.task != "auto":
        raise UserError(f"model=function is an objective; data.task={cfg.task} does not apply")
    rows = torch.zeros(cfg.num_samples, 1)
    prep = Preprocessing(task="objective", target="f")
    return TensorData(
        x_train=rows,
        y_train=torch.zeros(cfg.num_samples),
        x_val=rows.clone(),
        y_val=torch.zeros(cfg.num_samples),
        task="objective",
        num_outputs=1,
        preprocessing=prep,
    )
