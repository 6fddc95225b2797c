"""data=dataset: a user's own map-style Dataset, model, loss and metrics (gddist/data/dataset.py).

In-process runs (tests/helpers.train, one process) for the paths and every bad input; the CLI
for the one-line-and-exit-2 contract. 1 == N processes and SIGKILL resume with workers:
tests/test_dataset_distributed.py; the worked example of docs/own-data.md:
tests/test_docs_own_data.py.
"""

import random

import numpy as np
import pytest
import torch
from datasets_for_tests import Digits, RandomDraws
from helpers import check, cli, rows, train

from gddist.config import UserError
from gddist.data.dataset import DatasetData, sample_seed

DIGITS = [
    "data=dataset", "data.train._target_=datasets_for_tests.Digits", "+data.train.limit=256",
    "data.val._target_=datasets_for_tests.Digits", "+data.val.split=val", "+data.val.limit=128",
    "model=custom", "model._target_=datasets_for_tests.CNN", "+model.channels=4",
    "data.batch_size=32", "trainer.max_steps=6", "trainer.log_every=1", "logger.progress=none",
    "data.num_workers=0",
]  # fmt: skip


def digits(*overrides: str) -> list[str]:
    return [*DIGITS, "loss=cross_entropy", *overrides]


def test_a_cnn_trains_on_a_user_dataset_with_classification_metrics(tmp_path):
    summary = train(tmp_path, *digits("metrics=classification", "optimizer=adam"))
    assert summary["step"] == 6
    assert {"val/accuracy", "val/f1", "val/roc_auc", "val/loss"} <= set(summary)
    losses = [r["train/loss"] for r in rows(tmp_path) if "train/loss" in r]
    assert losses[-1] < losses[0]


def test_dict_batches_reach_the_model_as_keywords_and_loss_model_reads_its_loss(tmp_path):
    a = train(tmp_path / "a", *digits("metrics=classification", "optimizer=adam"))
    b = train(
        tmp_path / "b",
        *[o.replace("Digits", "DictDigits").replace("CNN", "DictCNN") for o in DIGITS],
        "loss=model", "metrics=classification", "optimizer=adam",
    )  # fmt: skip
    # The same samples, model and loss, as dicts with labels kept in: the same training.
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert b[key] == pytest.approx(a[key], abs=1e-6)


def test_a_custom_loss_function_with_arguments(tmp_path):
    s = train(
        tmp_path, *DIGITS, "loss=custom", "loss._target_=datasets_for_tests.smooth_ce",
        "+loss.smoothing=0.2", "metrics=classification",
    )  # fmt: skip
    assert s["step"] == 6 and "val/accuracy" in s


def test_without_data_val_the_seeded_split_holds_out_val_fraction(tmp_path):
    keep = [o for o in DIGITS if "data.val" not in o]
    s = train(tmp_path, *keep, "loss=cross_entropy", "data.val_fraction=0.25")
    assert s["step"] == 6


def test_samples_are_seeded_by_index_and_epoch_not_by_reader():
    data = DatasetData(
        RandomDraws(), None, val_fraction=0.25, seed=3, task="generic", target_key="labels",
        keep_target=False, seed_per_sample=True,
    )  # fmt: skip
    rows_ = torch.tensor([5, 0, 7, 2])
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    x, _ = data.read("train", rows_, epoch=1)
    # The reading process's streams are untouched (dropout keeps its sequence).
    assert torch.equal(before[0], torch.get_rng_state())
    assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()
    # A sample read alone, in another batch, or again gets the same draws: keyed by index.
    for pos, row in enumerate(rows_.tolist()):
        alone, _ = data.read("train", torch.tensor([row]), epoch=1)
        assert torch.equal(alone[0], x[pos])
    assert not torch.equal(data.read("train", rows_, epoch=2)[0], x)  # a new epoch: new draws
    assert len({tuple(r.tolist()) for r in x}) == 4  # samples differ from each other
    assert sample_seed(3, 1, 5) != sample_seed(3, 5, 1)


BAD_BASE = [
    "data=dataset", "model=custom", "model._target_=datasets_for_tests.CNN", "+model.channels=4",
    "data.batch_size=8", "trainer.max_steps=2", "logger.progress=none", "data.num_workers=0",
    "data.val._target_=datasets_for_tests.Digits", "+data.val.split=val", "+data.val.limit=16",
]  # fmt: skip
TRAIN = "data.train._target_=datasets_for_tests."


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([TRAIN + "Nope", "loss=mse"], "data.train._target_=datasets_for_tests.Nope cannot be imported"),
        ([TRAIN + "Digits", "+data.train.split=test", "loss=mse"],
         "data.train._target_=datasets_for_tests.Digits could not be built: ValueError: no split 'test'"),
        ([TRAIN + "Stream", "loss=mse"], "data.train is a Stream, not a map-style Dataset"),
        ([TRAIN + "Empty", "loss=mse"], "data.train (Empty) is empty"),
        ([TRAIN + "Ragged", "+data.train.limit=8", "+data.train.bad=5", "loss=cross_entropy"],
         "data.train: sample 5 cannot be collated with sample"),
        ([TRAIN + "Digits", "loss=bce"], "loss=bce: output float32[8, 10] and target int64[8] do not fit"),
        ([TRAIN + "Digits", "loss=model"], "loss=model: the model's output (float32[8, 10]) is not a scalar loss"),
        ([TRAIN + "NanDigits", "loss=cross_entropy"], "loss=cross_entropy: the first loss is nan"),
        ([TRAIN + "Digits", "loss=cross_entropy", "model=mlp"], "model=mlp needs tabular data"),
        ([TRAIN + "Digits", "loss=cross_entropy", "+model.colour=1"],
         "model._target_=datasets_for_tests.CNN could not be built (TypeError"),
        ([TRAIN + "DictDigits", "loss=cross_entropy", "data.target_key=label"],
         "without the target key 'label' (data.target_key)"),
        ([TRAIN + "Digits"], "data=dataset needs a loss"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_checkpoint(tmp_path, overrides, expected):
    base = BAD_BASE
    if "model=mlp" in overrides:  # another model group: the custom model's keys do not apply
        base = [o for o in BAD_BASE if not o.lstrip("+").startswith("model")]
    with pytest.raises(UserError) as err:
        train(tmp_path, *base, *overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "model.pt").exists()


def test_the_command_line_says_it_in_one_line_with_exit_2(tmp_path):
    proc = cli(*digits("data.train._target_=datasets_for_tests.Ragged", "+data.train.bad=1"),
               f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample 1 cannot be collated" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "float32[1, 9, 8]" in errors[0] and "float32[1, 8, 8]" in errors[0]
    assert not (tmp_path / "model.pt").exists()


def test_a_bad_sample_read_by_a_worker_mid_run_is_one_line_too(tmp_path):
    proc = cli(*digits("data.train._target_=datasets_for_tests.Ragged", "+data.train.bad=200",
                       "data.num_workers=2", "trainer.max_steps=40"),
               f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "sample 200 cannot be collated" in proc.stderr and "Traceback" not in proc.stderr


def test_a_user_dataset_runs_from_the_command_line_with_workers(tmp_path):
    proc = check(cli(*digits("data.num_workers=2", "metrics=classification"),
                     f"hydra.run.dir={tmp_path}"))  # fmt: skip
    assert "fresh start" in proc.stdout + proc.stderr
    assert (tmp_path / "model.pt").exists()


def test_gddist_fit_trains_python_objects_and_a_rerun_resumes(tmp_path):
    from datasets_for_tests import CNN

    import gddist
    from gddist.api import fit

    assert gddist.fit is fit
    common = dict(
        train=Digits("train", limit=256), val=Digits("val", limit=128), loss="cross_entropy",
        overrides=["data.batch_size=32", "trainer.max_steps=6", "data.num_workers=0",
                   "logger.progress=none", "logger.plots=false", "+model.channels=4"],
        run_dir=tmp_path / "fit",
    )  # fmt: skip
    s = fit(model=CNN, metrics="classification", **common)
    cli_run = train(tmp_path / "cli", *digits("metrics=classification"))
    assert s["val/accuracy"] == cli_run["val/accuracy"] and s["val/loss"] == cli_run["val/loss"]
    again = fit(model=CNN, metrics="classification", **common)  # complete: nothing to train
    assert again["step"] == 6
    # A different dataset length under the same run dir is refused like any data change.
    with pytest.raises(UserError, match="data.train"):
        fit(model=CNN, **{**common, "train": Digits("train", limit=128)})
