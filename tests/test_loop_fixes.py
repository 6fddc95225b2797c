"""Training-loop contracts: evaluations leave the train log alone, stop votes act quickly on the
same step everywhere, early_stopping.monitor is checked before training, validation shards are
exact at any size."""

import json
import os
import signal
import time

import pytest
import torch
from helpers import (
    children,
    cli,
    environ_of,
    last_step,
    rows,
    spawn,
    start,
    torchrun_cmd,
    train,
    wait_until,
)

from gddist.data import Preprocessing
from gddist.dist import LaunchEnv, init
from gddist.metrics import Evaluator, metric_names, shard_bounds
from gddist.stopvote import StopVote

# ----------------------------------------------------------------------------- evaluation


def train_rows(run_dir):
    return {r["step"]: r for r in rows(run_dir) if "train/loss" in r}


def test_an_evaluation_keeps_the_pending_train_losses(tmp_path):
    base = ["trainer.max_steps=30", "trainer.log_every=10"]
    train(tmp_path / "plain", *base, "trainer.eval_every=0")
    train(tmp_path / "eval15", *base, "trainer.eval_every=15")
    plain, eval15 = train_rows(tmp_path / "plain"), train_rows(tmp_path / "eval15")
    assert sorted(eval15) == [10, 20, 30]
    for step in (10, 20, 30):  # 20: the mean over steps 11..20, not only 16..20
        assert eval15[step]["train/loss"] == plain[step]["train/loss"], step
    assert [r["step"] for r in rows(tmp_path / "eval15") if "val/loss" in r] == [15, 30]


def test_samples_per_s_leaves_out_the_evaluation_time(tmp_path):
    sleepy = ["model=custom", "model._target_=models_for_tests.SlowNet", "+model.eval_sleep_s=1.0",
              "trainer.max_steps=10", "trainer.log_every=10", "trainer.eval_every=5"]  # fmt: skip
    train(tmp_path, *sleepy)
    (row,) = train_rows(tmp_path).values()
    # 10 steps of 64 samples with a 1 s evaluation inside the interval: at most 640 samples/s
    # if the evaluation were counted; a linear model's 10 steps take far less than 0.5 s.
    assert row["samples/s"] > 2 * 640, row


# ----------------------------------------------------------------------------- stop votes


def _vote_until_stopped(rank, init_method, signal_rank, signal_at, step_s, seconds, every):
    from gddist.config import DistConfig

    dist = init(DistConfig(device="cpu", init_method=init_method), LaunchEnv("torchrun", rank, 2))
    vote = StopVote(dist, every, seconds, step=0)
    try:
        for step in range(1, 200):
            time.sleep(step_s)
            received = signal.SIGTERM if rank == signal_rank and step >= signal_at else 0
            agreed = vote.poll(step, received)
            if agreed:
                return step, agreed
        return None
    finally:
        vote.close()
        dist.close()


@pytest.mark.slow
def test_stop_votes_act_on_the_same_step_within_the_time_bound(tmp_path):
    # Steps of 50 ms, stop_check_s=0.2: votes every 4 steps although stop_check_every=50.
    results = spawn(_vote_until_stopped, 2, tmp_path, 1, 9, 0.05, 0.2, 50, timeout=120)
    (step, signum), other = results
    assert other == (step, signum) and signum == signal.SIGTERM
    assert 9 < step <= 9 + 4 + 1, step  # the next vote after step 9, acted on one step later
    # Fast steps: stop_check_every bounds the interval, and stops land on its multiples.
    results = spawn(_vote_until_stopped, 2, tmp_path, 0, 23, 0.0, 5.0, 10, timeout=120)
    assert results[0] == results[1] == (30, signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_with_slow_steps_stops_both_within_a_few_steps(tmp_path):
    run_dir = tmp_path / "run"
    slow = ["model=custom", "model._target_=models_for_tests.SlowNet", "+model.train_sleep_s=0.5",
            "trainer.max_steps=200", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.stop_check_every=50", "trainer.stop_check_s=1.0", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = start(torchrun_cmd(2, *slow))
    try:
        wait_until(lambda: last_step(run_dir) >= 4 and len(children(proc.pid)) == 2, 120,
                   "step 4", proc)  # fmt: skip
        rank1 = next(p for p in children(proc.pid) if environ_of(p).get("RANK") == "1")
        os.kill(rank1, signal.SIGTERM)
        signalled_at = last_step(run_dir)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM", out[-3000:]
    # 0.5 s steps and stop_check_s=1: a vote every 2 steps, acted on one step later (the old
    # vote every stop_check_every=50 steps, acted on at the next one, stopped at step 100).
    assert signalled_at <= summary["step"] <= signalled_at + 4, (signalled_at, summary["step"])
    saved = run_dir / "checkpoints" / f"step_{summary['step']:09d}"
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    # Both workers exit 128 + SIGTERM; torchrun reports them and exits non-zero itself.
    assert proc.returncode != 0 and "exitcode  : 143" in out, out[-3000:]


# ----------------------------------------------------------------------------- early stopping


@pytest.mark.slow
def test_an_unknown_early_stopping_monitor_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    began = time.monotonic()
    proc = cli("early_stopping.patience=2", "early_stopping.monitor=val/r2",
               "trainer.max_steps=1000", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: early_stopping.monitor='val/r2' is not a validation metric of this task "
        "(binary); choose one of: val/accuracy, val/f1, val/loss, val/precision, val/recall, "
        "val/roc_auc"
    )
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() or not rows(run_dir)  # no step was logged
    assert time.monotonic() - began < 60


def test_metric_names_are_the_keys_the_evaluator_returns():
    for task, prep, y in [
        ("binary", Preprocessing(task="binary", classes=[0.0, 1.0]), torch.tensor([0.0, 1.0] * 4)),
        ("multiclass", Preprocessing(task="multiclass", classes=[0, 1, 2]), torch.arange(8) % 3),
        ("regression", Preprocessing(task="regression"), torch.randn(8)),
        ("objective", Preprocessing(task="objective"), torch.zeros(8)),
    ]:
        outputs = 3 if task == "multiclass" else 1
        model = torch.nn.Linear(2, outputs)
        metrics = Evaluator(prep, torch.device("cpu")).evaluate(model, [(torch.randn(8, 2), y)])
        assert sorted(metrics) == metric_names(task), task


# ----------------------------------------------------------------------------- val shards


@pytest.mark.parametrize("world", [1, 2, 3, 7, 8, 64, 1000])
def test_val_shards_cover_every_row_exactly(world):
    n = 2**24 + 3  # above 2**24 a float32 cannot count rows one by one
    shards = [shard_bounds(n, r, world) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))  # contiguous
    sizes = {hi - lo for lo, hi in shards}
    assert max(sizes) - min(sizes) <= 1
