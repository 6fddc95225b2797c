"""experiment=image_digits: a CNN on scikit-learn's 8x8 digits through data=dataset, against
LogisticRegression on the same split; 1 process == 2 processes, exact resume after SIGKILL."""

import json
import signal

import pytest
from helpers import (
    assert_bit_identical,
    assert_same_optimization,
    check,
    cli,
    cli_cmd,
    compose,
    last_step,
    load_model,
    start,
    torchrun,
    train,
    train_losses,
    wait_until,
)

from gddist.config import Config
from gddist.examples.image_digits import Digits, split_digits

PRESET = "experiment=image_digits"
# README numbers (docs/examples/image_digits.md), 1 process on CPU, torch 2.13 / sklearn 1.9.
README_ACCURACY, README_BASELINE = 0.9916, 0.9777


def test_preset_composes_and_a_short_run_trains(tmp_path):
    cfg = Config.from_dict(compose(PRESET))
    assert cfg.data.name == "dataset" and cfg.logger.on_end.endswith("image_digits.on_end")
    train_rows, val_rows = Digits("train"), Digits("val")
    assert (len(train_rows), len(val_rows)) == (1438, 359)  # gddist's seeded 80 / 20 split
    assert split_digits("val", 0, 0.2)[0].shape == (359, 1, 8, 8)
    summary = train(tmp_path, PRESET, "trainer.max_steps=6", "trainer.eval_every=0")
    assert summary["step"] == 6 and 0 < summary["val/accuracy"] <= 1
    assert 0.9 < summary["baseline/logreg_accuracy"] < 1


def test_train_reads_are_shifted_and_val_reads_are_not():
    train_ds, val_ds = Digits("train"), Digits("val", shift=1)
    assert all(val_ds[i][0].equal(val_ds.images[i]) for i in range(20))
    moved = sum(not train_ds[i][0].equal(train_ds.images[i]) for i in range(50))
    assert moved > 25  # 8 of the 9 shifts move the image
    image, label = train_ds[0]
    assert image.shape == (1, 8, 8) and image.sum() <= train_ds.images[0].sum() + 1e-6


@pytest.mark.slow
def test_full_preset_reproduces_the_readme_numbers(tmp_path):
    run_dir = tmp_path / "run"
    summary = train(run_dir, PRESET, "logger.progress=none", "logger.plots=true")
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["step"] == 900 and not summary["diverged"]
    assert summary["val/accuracy"] == pytest.approx(README_ACCURACY, abs=0.006)  # 2 of 359 images
    assert summary["baseline/logreg_accuracy"] == pytest.approx(README_BASELINE, abs=1e-3)
    assert summary["val/accuracy"] > summary["baseline/logreg_accuracy"]
    assert (run_dir / "plots" / "misclassified.png").read_bytes()[:4] == b"\x89PNG"


SHORT = [PRESET, "model.dropout=0", "trainer.max_steps=30", "trainer.log_every=1",
         "trainer.eval_every=0", "logger.progress=none", "logger.plots=false"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *SHORT)
    check(torchrun(2, *SHORT, f"hydra.run.dir={two}", cwd=tmp_path))
    assert_same_optimization(one, two, 30)


# Dropout on: resume must restore the RNG state too; checkpoints every 20 steps land mid-epoch
# (1438 rows make 23 steps of 64 an epoch).
RESUME = [PRESET, "trainer.max_steps=100", "trainer.log_every=1", "trainer.eval_every=50",
          "checkpoint.every_steps=20", "logger.progress=none", "logger.plots=false"]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_same_command_finishes_bit_identical(tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    train(reference, *RESUME)
    args = [*RESUME, f"hydra.run.dir={run_dir}"]
    proc = start(cli_cmd(*args), cwd=tmp_path)
    wait_until(lambda: last_step(run_dir) >= 50, 120, "step 50", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and last_step(run_dir) < 100
    again = check(cli(*args, cwd=tmp_path))
    assert "resumed from" in again.stdout + again.stderr
    assert_bit_identical(load_model(reference), load_model(run_dir))
    assert train_losses(run_dir) == train_losses(reference)
