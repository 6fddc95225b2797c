"""Resuming with changed settings: no config value is ever silently ignored (gddist/resume.py).

Each key that differs from the checkpoint's config is, by gddist.keys.kind: changed freely
(speed), applied and logged (length, applied: the new value really drives the next step), or
refused in one line naming it (refused). Comparisons are of real losses, learning rates and
weights.
"""

import logging
import math

import pytest
import torch
from helpers import assert_bit_identical, check, cli, compose, load_model, rows, train

from gddist.config import Config, UserError
from gddist.data import build as build_data
from gddist.dist import LaunchEnv, init
from gddist.trainer import Trainer

QUIET = ["trainer.eval_every=0", "logger.progress=none"]


def make_trainer(run_dir, *overrides):
    cfg = Config.from_dict(compose(*overrides, "logger.plots=false"))
    return Trainer(cfg, build_data(cfg.data, cfg.seed), init(cfg.dist, LaunchEnv("none")), run_dir)


def lrs(run_dir):
    return {r["step"]: r["lr"] for r in rows(run_dir) if "lr" in r}


def gddist_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "gddist"]


# ----------------------------------------------------------------------------- applied


@pytest.mark.slow
def test_cli_resume_with_a_new_lr_trains_with_it_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    args = [*QUIET, "optimizer.momentum=0.9", "trainer.log_every=5", f"hydra.run.dir={run_dir}"]
    check(cli(*args, "trainer.max_steps=20"))
    resumed = check(cli(*args, "trainer.max_steps=40", "optimizer.lr=0.01"))
    out = resumed.stdout + resumed.stderr
    assert "optimizer.lr: 0.1 -> 0.01 (applied)" in out, out[-3000:]
    assert "trainer.max_steps: 20 -> 40 (applied)" in out
    assert lrs(run_dir) == {5: 0.1, 10: 0.1, 15: 0.1, 20: 0.1, 25: 0.01, 30: 0.01, 35: 0.01,
                            40: 0.01}  # fmt: skip
    # The same optimization built by hand: 20 steps at lr 0.1, then the lr of every param group
    # set to 0.01 (momentum buffers kept), 20 more steps.
    ref = make_trainer(tmp_path / "ref", *QUIET, "optimizer.momentum=0.9", "trainer.max_steps=40")
    for step in range(40):
        if step == 20:
            for group in ref.optimizer.param_groups:
                group["lr"] = 0.01
        ref.train_step()
        ref.step += 1
    assert_bit_identical(ref.engine.module.state_dict(), load_model(run_dir))


def test_changed_hyperparameters_reach_the_restored_param_groups(tmp_path, caplog):
    base = [*QUIET, "optimizer=rmsprop", "trainer.max_steps=10"]
    train(tmp_path, *base)
    changed = ["optimizer.momentum=0.5", "optimizer.weight_decay=0.01", "optimizer.alpha=0.9",
               "optimizer.eps=1e-06", "trainer.grad_clip_norm=1.0"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="gddist"):
        trainer = make_trainer(tmp_path, *base, *changed, "trainer.max_steps=20")
    (group,) = trainer.optimizer.param_groups
    assert (group["momentum"], group["weight_decay"], group["alpha"], group["eps"]) == (
        0.5, 0.01, 0.9, 1e-06)  # fmt: skip
    lines = gddist_lines(caplog)
    for line in ["optimizer.momentum: 0.0 -> 0.5 (applied)", "optimizer.alpha: 0.99 -> 0.9 (applied)",
                 "trainer.grad_clip_norm: null -> 1.0 (applied)"]:  # fmt: skip
        assert line in lines, lines
    # RMSprop keeps a momentum buffer only when momentum > 0: the restored state had none.
    assert trainer.fit()["step"] == 20


def test_early_stopping_on_another_metric_starts_counting_afresh(tmp_path):
    base = [*QUIET, "trainer.max_steps=20", "trainer.eval_every=5", "early_stopping.patience=50"]
    train(tmp_path, *base)
    same = make_trainer(tmp_path, *base, "trainer.max_steps=30")
    assert same.early_stopping.best_metric is not None  # the val/loss best so far is kept
    other = make_trainer(tmp_path, *base, "trainer.max_steps=30",
                         "early_stopping.monitor=val/accuracy", "early_stopping.mode=max")  # fmt: skip
    assert (other.early_stopping.best_metric, other.early_stopping.evals_without_improvement) == (
        None,
        0,
    )


# ----------------------------------------------------------------------------- speed


@pytest.mark.slow
def test_a_changed_num_workers_resumes_bit_identical(tmp_path):
    # Dropout makes the RNG stream matter; the DataLoader must not draw from it either way.
    base = [*QUIET, "data.loader=dataloader", "model=mlp", "model.dropout=0.1",
            "trainer.max_steps=30", "trainer.log_every=5"]  # fmt: skip
    train(tmp_path / "a", *base, "data.num_workers=0", "checkpoint.every_steps=15")
    ckpt = tmp_path / "a" / "checkpoints" / "step_000000015"
    train(tmp_path / "b", *base, "data.num_workers=1", f"checkpoint.resume={ckpt}")
    assert_bit_identical(load_model(tmp_path / "a"), load_model(tmp_path / "b"))
    losses = lambda d: {r["step"]: r["train/loss"] for r in rows(d) if "train/loss" in r}  # noqa: E731
    assert losses(tmp_path / "b") == {s: losses(tmp_path / "a")[s] for s in (20, 25, 30)}


# ----------------------------------------------------------------------------- length


@pytest.fixture(scope="module")
def cosine_40(tmp_path_factory):
    """An uninterrupted cosine run of 40 steps, checkpointed at step 20."""
    run_dir = tmp_path_factory.mktemp("cosine_40")
    train(run_dir, *COSINE, "trainer.max_steps=40", "checkpoint.every_steps=20")
    return run_dir


COSINE = [*QUIET, "scheduler=cosine", "scheduler.min_lr=0.001", "trainer.log_every=1"]


def test_more_steps_keep_the_cosine_lr_continuous(tmp_path, cosine_40, caplog):
    ckpt = cosine_40 / "checkpoints" / "step_000000020"
    with caplog.at_level(logging.INFO, logger="gddist"):
        train(tmp_path, *COSINE, "trainer.max_steps=80", f"checkpoint.resume={ckpt}")
    assert "trainer.max_steps: 40 -> 80 (applied); the LR schedule keeps its horizon of 40 " \
        "steps (scheduler.total_steps=N sets another)" in gddist_lines(caplog)  # fmt: skip
    before, after = lrs(cosine_40), lrs(tmp_path)
    assert min(after) == 21
    assert {s: after[s] for s in range(21, 41)} == {s: before[s] for s in range(21, 41)}
    assert [after[s] for s in range(42, 81)] == [pytest.approx(0.001)] * 39  # the floor


def test_an_explicit_total_steps_is_the_new_horizon(tmp_path, cosine_40, caplog):
    ckpt = cosine_40 / "checkpoints" / "step_000000020"
    with caplog.at_level(logging.INFO, logger="gddist"):
        train(tmp_path, *COSINE, "trainer.max_steps=80", "scheduler.total_steps=80",
              f"checkpoint.resume={ckpt}")  # fmt: skip
    assert "scheduler.total_steps: null -> 80 (applied)" in gddist_lines(caplog)
    after = lrs(tmp_path)
    floor = 0.001 / 0.1
    for step in (21, 50, 80):  # the row of step s logs the lr step s ran with (index s - 1)
        expected = 0.1 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - 1) / 80)))
        assert after[step] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- refused


def test_a_changed_schedule_type_or_seed_is_refused_in_one_line(tmp_path):
    train(tmp_path, *QUIET, "trainer.max_steps=10")
    with pytest.raises(UserError) as e:
        make_trainer(tmp_path, *QUIET, "scheduler=cosine", "seed=1", "trainer.max_steps=20")
    message = str(e.value)
    assert "other settings (scheduler.name: 'constant' -> 'cosine'; seed: 0 -> 1)" in message
    assert "restore them, or pass checkpoint.allow_changes=true" in message
    assert "\n" not in message


def test_allow_changes_switches_optimizer_and_schedule_type(tmp_path, caplog):
    train(tmp_path, *QUIET, "trainer.max_steps=10", "trainer.log_every=5")
    with caplog.at_level(logging.INFO, logger="gddist"):
        train(tmp_path, *QUIET, "trainer.max_steps=20", "trainer.log_every=5", "optimizer=adam",
              "scheduler=plateau", "checkpoint.allow_changes=true")  # fmt: skip
    lines = gddist_lines(caplog)
    assert "optimizer.name: 'sgd' -> 'adam' (applied: checkpoint.allow_changes=true; fresh " \
        "optimizer state)" in lines, lines  # fmt: skip
    adam_lr = compose("optimizer=adam")["optimizer"]["lr"]
    assert lrs(tmp_path) == {5: 0.1, 10: 0.1, 15: adam_lr, 20: adam_lr}


def test_a_checkpoint_from_before_the_new_keys_resumes_bit_identical(tmp_path, caplog):
    """Checkpoints written before scheduler.total_steps / trainer.stop_check_s existed (and with
    the old "fingerprint" entry) resume as if those keys had their defaults: nothing changes."""
    import hashlib
    import json

    base = [*QUIET, "model=mlp", "model.dropout=0.1", "scheduler=cosine", "trainer.max_steps=30"]
    train(tmp_path / "a", *base, "checkpoint.every_steps=15")
    ckpt = tmp_path / "a" / "checkpoints" / "step_000000015"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["config"]["scheduler"]["total_steps"], state["config"]["trainer"]["stop_check_s"]
    del state["trainer"]["start_max_steps"]
    state["fingerprint"] = {"seed": 0}
    torch.save(state, ckpt / "state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="gddist"):
        train(tmp_path / "b", *base, f"checkpoint.resume={ckpt}")
    assert not [m for m in gddist_lines(caplog) if "->" in m]  # no change to apply or log
    assert_bit_identical(load_model(tmp_path / "a"), load_model(tmp_path / "b"))


def test_total_steps_is_validated():
    with pytest.raises(UserError, match=r"scheduler.total_steps=0 must be > 0"):
        Config.from_dict(compose("scheduler=cosine", "scheduler.total_steps=0"))
    with pytest.raises(UserError, match=r"scheduler.total_steps=20 must exceed scheduler.warmup_"):
        Config.from_dict(compose("scheduler=warmup_cosine", "scheduler.total_steps=20"))
