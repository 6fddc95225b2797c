"""Tier 4: gddist's promises for a user's own Dataset (data=dataset), through the user's launchers.

A map-style Dataset whose __getitem__ augments (a torch random shift plus numpy noise,
tests/datasets_for_tests.py: Digits) is read sample by sample, each sample seeded from
(seed, epoch, index). The promises checked here, with `python train.py` / `torchrun` / a user
script calling `gddist.fit` as subprocesses:

- global batch semantics: 1 process == 2 processes (per-step losses and final weights within
  1e-5), whatever data.num_workers reads the samples;
- exact resume: SIGKILLed mid-epoch from outside and rerun with the same command (the default run
  dir, so the rerun finds the run by itself), the final weights equal an uninterrupted run's bit
  for bit, with dropout and DataLoader workers; data.num_workers is a speed key, so a rerun with
  another value resumes the same run and still ends bit-identical;
- model.sync_batchnorm: BatchNorm statistics of the global batch, so 1 process == 2 processes
  for the weights and the running stats;
- gddist.fit under torchrun trains what it trains under plain python.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    assert_bit_identical,
    assert_same_optimization,
    check,
    clean_env,
    cli,
    cli_cmd,
    load_model,
    start,
    torchrun,
    train_losses,
    wait_until,
)

pytestmark = pytest.mark.slow

STEPS = 96
LIMIT = 512  # training images
BATCH = 32
STEPS_PER_EPOCH = LIMIT // BATCH  # 16: checkpoints every 10 steps land mid-epoch until step 80

# The user's command: digits through a CNN, augmented in __getitem__, every step logged,
# evaluated at the end only.
BASE = [
    "data=dataset",
    "data.train._target_=datasets_for_tests.Digits",
    f"+data.train.limit={LIMIT}",
    "data.val._target_=datasets_for_tests.Digits",
    "+data.val.split=val",
    f"data.batch_size={BATCH}",
    "model=custom",
    "model._target_=datasets_for_tests.CNN",
    "loss=cross_entropy",
    "metrics=classification",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "logger.progress=none",
    "logger.plots=false",
]
DIGITS = [*BASE, "optimizer=adam", "optimizer.lr=0.01"]
# Exact resume must survive dropout (the training RNG stream) and workers reading ahead.
EXACT = [*DIGITS, "+model.dropout=0.1", "data.num_workers=2", "checkpoint.every_steps=10"]
# SGD: under Adam (lr 0.01) this BatchNorm CNN amplifies the 1e-7 rounding differences of 1 vs 2
# processes past 1e-5 within ~60 steps (Adam rescales tiny gradients to lr-sized steps).
BN_STEPS = 32  # 2 epochs: enough for the running stats to move; the 96-step runs cost twice
SYNC_BN = [*BASE, "optimizer=sgd", "optimizer.lr=0.05", "+model.batchnorm=true",
           "model.sync_batchnorm=true", "data.num_workers=0", f"trainer.max_steps={BN_STEPS}"]  # fmt: skip


def resumed_step(output: str) -> int:
    match = re.search(r"resumed from \S+ at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1))


def only_run_dir(cwd: Path) -> Path:
    """The one run dir a command run in `cwd` without hydra.run.dir made: outputs/<name>."""
    dirs = [p for p in (cwd / "outputs").iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def checkpoints(run_dir: Path) -> list[int]:
    """The steps of the complete checkpoints (a write in progress is a .tmp-step_* dir)."""
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


def kill_after_checkpoint(proc: subprocess.Popen, cwd: Path, past: int) -> str:
    """Wait for a checkpoint after step `past`, SIGKILL the whole process group (the trainer
    and its DataLoader workers), and return what the run printed."""
    outputs = cwd / "outputs"

    def saved_past() -> bool:
        runs = list(outputs.glob("*/checkpoints/step_*")) if outputs.exists() else []
        return any(int(p.name[5:]) > past for p in runs)

    wait_until(saved_past, 120, f"a checkpoint after step {past}", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # start() made the run its own process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out


# ----------------------------------------------------------------- shared reference runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_workers_2(runs) -> Path:
    check(cli(*DIGITS, "data.num_workers=2", f"hydra.run.dir={runs / 'one_w2'}"))
    return runs / "one_w2"


@pytest.fixture(scope="module")
def one_workers_0(runs) -> Path:
    check(cli(*DIGITS, "data.num_workers=0", f"hydra.run.dir={runs / 'one_w0'}"))
    return runs / "one_w0"


@pytest.fixture(scope="module")
def two_workers_2(runs) -> Path:
    check(torchrun(2, *DIGITS, "data.num_workers=2", f"hydra.run.dir={runs / 'two_w2'}"))
    return runs / "two_w2"


@pytest.fixture(scope="module")
def uninterrupted(runs) -> Path:
    """The exact-resume reference, run in its own directory with the default run dir."""
    cwd = runs / "uninterrupted"
    cwd.mkdir()
    check(cli(*EXACT, cwd=cwd))
    return only_run_dir(cwd)


# ----------------------------------------------------------------------- 1 == 2 processes


def test_augmented_dataset_one_process_equals_two_with_workers(one_workers_2, two_workers_2):
    assert_same_optimization(one_workers_2, two_workers_2, STEPS)


def test_augmented_dataset_one_process_without_workers_equals_two(
    one_workers_0, one_workers_2, two_workers_2
):
    assert_same_optimization(one_workers_0, two_workers_2, STEPS)
    # Who reads a sample (the trainer itself or a worker) changes nothing at all.
    assert_bit_identical(load_model(one_workers_0), load_model(one_workers_2))


def test_sync_batchnorm_one_process_equals_two(runs):
    check(cli(*SYNC_BN, f"hydra.run.dir={runs / 'bn_one'}"))
    check(torchrun(2, *SYNC_BN, f"hydra.run.dir={runs / 'bn_two'}"))
    one, two = load_model(runs / "bn_one"), load_model(runs / "bn_two")
    assert {"bn.running_mean", "bn.running_var"} <= one.keys()
    assert one["bn.num_batches_tracked"].item() == two["bn.num_batches_tracked"].item() == BN_STEPS
    assert_same_optimization(runs / "bn_one", runs / "bn_two", BN_STEPS)
    # The running stats moved from their init (zeros, ones): they saw the (global) batches.
    assert one["bn.running_mean"].abs().max() > 1e-3


# --------------------------------------------------------------------------- exact resume


def test_sigkill_mid_epoch_then_same_command_resumes_bit_identical(tmp_path, uninterrupted):
    """Killed twice from outside, rerun each time with no run dir given: the first rerun is the
    very same command, the last one reads with data.num_workers=0 (a speed key: same run dir)."""
    proc = start(cli_cmd(*EXACT), cwd=tmp_path)
    kill_after_checkpoint(proc, tmp_path, past=25)
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name == uninterrupted.name  # the same command names the same run
    assert not (run_dir / "model.pt").exists()  # really killed before the end

    # The same command again: it finds its run dir and resumes by itself; killed again.
    proc = start(cli_cmd(*EXACT), cwd=tmp_path)
    out = kill_after_checkpoint(proc, tmp_path, past=55)
    first = resumed_step(out)
    assert first > 25 and first % STEPS_PER_EPOCH != 0  # mid-epoch
    assert only_run_dir(tmp_path) == run_dir and not (run_dir / "model.pt").exists()

    # Resumed with another num_workers: the same run, read by the training process itself.
    again = check(cli(*EXACT, "data.num_workers=0", cwd=tmp_path))
    second = resumed_step(again.stdout + again.stderr)
    assert second > max(first, 55) and second % STEPS_PER_EPOCH != 0
    assert only_run_dir(tmp_path) == run_dir
    assert_bit_identical(load_model(uninterrupted), load_model(run_dir))
    # The log replays the same losses: one row per step, none doubled by the killed runs.
    assert train_losses(run_dir) == train_losses(uninterrupted)


# ------------------------------------------------------------------------------ gddist.fit

FIT_SCRIPT = """\
import sys

import gddist
from datasets_for_tests import CNN, Digits

if __name__ == "__main__":
    gddist.fit(
        model=CNN,
        train=Digits(limit={limit}),
        val=Digits(split="val"),
        loss="cross_entropy",
        overrides={overrides!r},
        run_dir=sys.argv[1],
    )
"""


def test_fit_from_a_user_script_under_torchrun_equals_plain_python(tmp_path, one_workers_0):
    # The command line's config minus what the script passes as objects (datasets, model, loss).
    objects = ("data=", "data.train", "+data.train", "data.val", "+data.val", "model", "loss=")
    overrides = [o for o in DIGITS if not o.startswith(objects)]
    assert f"data.batch_size={BATCH}" in overrides
    script = tmp_path / "fit_digits.py"
    script.write_text(FIT_SCRIPT.format(limit=LIMIT, overrides=[*overrides, "data.num_workers=0"]))
    run = lambda *cmd: check(  # noqa: E731
        subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    )
    run(sys.executable, str(script), str(tmp_path / "one"))
    torchrun_ = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run(*torchrun_, "--nproc_per_node=2", str(script), str(tmp_path / "two"))
    assert_same_optimization(tmp_path / "one", tmp_path / "two", STEPS)
    # The script's objects train what `python train.py` trains from the same config's nodes.
    assert_bit_identical(load_model(tmp_path / "one"), load_model(one_workers_0))
