"""User models for `model=custom model._target_=models_for_tests.X` in tests."""

import os
import time

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features)
        )

    def forward(self, x):
        return self.body(x)


class SpikyNet(nn.Module):
    """A linear model whose training forward pass number `bad_call` (1-based) returns inf."""

    def __init__(self, in_features: int, out_features: int, bad_call: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.bad_call = bad_call
        self.calls = 0

    def forward(self, x):
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                return out + float("inf")
        return out


class FaultyNet(nn.Module):
    """A linear model whose process of rank `rank` hangs, dies or raises at its `at_call`-th
    training forward pass: for tests of what the other ranks and the launcher do."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fault: str = "hang",
        rank: int = 1,
        at_call: int = 5,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.fault, self.at_call, self.calls = fault, at_call, 0
        self.faulty = int(os.environ.get("RANK", "0")) == rank

    def forward(self, x):
        if self.training and self.faulty:
            self.calls += 1
            if self.calls == self.at_call:
                if self.fault == "die":
                    os._exit(1)
                if self.fault == "raise":
                    raise RuntimeError(f"FaultyNet: forward pass {self.calls} failed on purpose")
                time.sleep(600)
        return self.linear(x)


class SlowNet(nn.Module):
    """A linear model that sleeps `train_sleep_s` in each training forward pass and
    `eval_sleep_s` in each evaluation forward pass: slow steps or slow evaluations on purpose."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        train_sleep_s: float = 0.0,
        eval_sleep_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.train_sleep_s, self.eval_sleep_s = train_sleep_s, eval_sleep_s

    def forward(self, x):
        time.sleep(self.train_sleep_s if self.training else self.eval_sleep_s)
        return self.linear(x)


def huber(output, target, delta: float = 1.0):
    """A custom loss function (loss=custom loss._target_=models_for_tests.huber +loss.delta=..)."""
    import torch

    err = (output - target).abs()
    return torch.where(err < delta, 0.5 * err**2, delta * (err - 0.5 * delta)).mean()


def square_mean(output, target):
    """mean(output^2): the loss LossInOutput computes itself, written as a custom loss."""
    return (output**2).mean()


class LossInOutput(nn.Module):
    """A linear model that computes its own loss from its input (loss=model): mean(logits^2),
    returned with the logits as a dict {"loss", "logits"} or as an object with .loss and
    .logits (the Hugging Face convention); `with_loss=false`: a dict without "loss"."""

    def __init__(
        self, in_features: int, out_features: int, as_object: bool = False, with_loss: bool = True
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.as_object, self.with_loss = as_object, with_loss

    def forward(self, x):
        logits = self.linear(x)
        out = {"loss": (logits**2).mean(), "logits": logits}
        if not self.with_loss:
            del out["loss"]
        if self.as_object:
            import types

            return types.SimpleNamespace(**out)
        return out


def nan_loss(output, target):
    """A custom loss whose value is nan: for the first-step check."""
    return (output * float("nan")).mean()


class BatchNormNet(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: its training forward depends on the statistics
    of the batch it sees (this rank's slice, or the global batch with model.sync_batchnorm)."""

    def __init__(self, in_features: int, out_features: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, out_features),
        )

    def forward(self, x):
        return self.body(x)


class UnusedBranchNet(nn.Module):
    """A linear head plus a branch whose parameters never get a gradient (forward skips it):
    DDP needs engine.find_unused_parameters=true for it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, out_features)
        self.spare = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.head(x)
