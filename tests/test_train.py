"""Tier 1-2: the training loop in one process: convergence, optimizers, schedules, clipping,
penalties, non-finite handling, and the files a run leaves."""

import json
import math
import re

import pytest
import torch
from helpers import compose, load_model, rows, train

import gddist
from gddist.config import Config, UserError
from gddist.data import build as build_data
from gddist.dist import LaunchEnv, init
from gddist.trainer import Trainer


def make_trainer(tmp_path, *overrides) -> Trainer:
    cfg = Config.from_dict(compose(*overrides))
    data = build_data(cfg.data, cfg.seed)
    return Trainer(cfg, data, init(cfg.dist, LaunchEnv("none")), tmp_path)


def test_default_example_converges_toward_the_true_coefficients(tmp_path):
    summary = train(tmp_path)
    data = build_data(Config().data, 0)
    logit = data.x_val @ data.true_coef + data.true_bias
    oracle_acc = ((logit > 0).float() == data.y_val).float().mean().item()
    assert summary["val/accuracy"] >= oracle_acc - 0.03
    w = load_model(tmp_path)["weight"].squeeze(0)
    torch.manual_seed(0)
    w0 = torch.nn.Linear(3, 1).weight.detach().squeeze(0)  # the initial weights (seeded init)
    assert (w - data.true_coef).norm() < 0.5 * (w0 - data.true_coef).norm()
    assert torch.cosine_similarity(w, data.true_coef, dim=0) > 0.98
    assert summary["val/roc_auc"] > 0.75


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adagrad", "rmsprop"])
@pytest.mark.parametrize("scheduler", ["constant", "step", "cosine", "warmup_cosine", "plateau"])
def test_every_optimizer_and_scheduler_trains(tmp_path, optimizer, scheduler):
    summary = train(
        tmp_path,
        f"optimizer={optimizer}",
        f"scheduler={scheduler}",
        "model=mlp",
        "trainer.max_steps=60",
        "trainer.eval_every=20",
        "scheduler.step_size=20" if scheduler == "step" else "seed=0",
    )
    first = rows(tmp_path)[0]["train/loss"]
    assert not summary["diverged"]
    assert summary["train/loss"] < first
    assert summary["val/accuracy"] > 0.6


def test_schedule_steps_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    lrs = {}
    for accum in (1, 4):
        run = tmp_path / f"a{accum}"
        train(
            run,
            "scheduler=step",
            "scheduler.step_size=5",
            "scheduler.gamma=0.5",
            "trainer.max_steps=20",
            "trainer.log_every=1",
            f"trainer.grad_accum_steps={accum}",
        )
        lrs[accum] = [r["lr"] for r in rows(run) if "lr" in r]
    expected = [0.1 * 0.5 ** (s // 5) for s in range(20)]
    assert lrs[1] == pytest.approx(expected)
    assert lrs[4] == pytest.approx(expected)


def test_warmup_cosine_shape(tmp_path):
    train(
        tmp_path,
        "scheduler=warmup_cosine",
        "scheduler.warmup_steps=10",
        "scheduler.min_lr=0.01",
        "trainer.max_steps=50",
        "trainer.log_every=1",
    )
    lrs = [r["lr"] for r in rows(tmp_path) if "lr" in r]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 40 / 40)), abs=1e-3)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    for accum in (1, 4):
        train(
            tmp_path / f"a{accum}",
            "model=mlp",
            "optimizer=adam",
            "trainer.max_steps=30",
            "trainer.log_every=1",
            f"trainer.grad_accum_steps={accum}",
        )
    a, b = rows(tmp_path / "a1"), rows(tmp_path / "a4")
    la = [r["train/loss"] for r in a if "train/loss" in r]
    lb = [r["train/loss"] for r in b if "train/loss" in r]
    assert la == pytest.approx(lb, abs=1e-5)
    wa, wb = load_model(tmp_path / "a1"), load_model(tmp_path / "a4")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_clipping_sets_the_global_norm_to_the_limit(tmp_path):
    trainer = make_trainer(tmp_path, "model=mlp", "trainer.grad_clip_norm=0.01")
    trainer.train_step()
    grads = [p.grad for p in trainer.engine.module.parameters()]
    unclipped = trainer._pending[-1][2].item()
    assert unclipped > 0.01  # it would exceed the limit ...
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(
        0.01, rel=1e-5
    )  # ... so it is clipped
    trainer = make_trainer(tmp_path, "model=mlp", "trainer.grad_clip_norm=1000")
    trainer.train_step()
    grads = [p.grad for p in trainer.engine.module.parameters()]
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(
        trainer._pending[-1][2].item()
    )


def test_clip_value_bounds_every_gradient_element(tmp_path):
    trainer = make_trainer(tmp_path, "model=mlp", "trainer.grad_clip_value=0.001")
    trainer.train_step()
    grads = torch.cat([p.grad.flatten() for p in trainer.engine.module.parameters()])
    assert grads.abs().max().item() == pytest.approx(0.001)


def test_l1_l2_penalties_add_their_gradients_to_weights_not_biases(tmp_path):
    grads = {}
    for name, reg in [("none", []), ("reg", ["regularization.l1=0.01", "regularization.l2=0.1"])]:
        trainer = make_trainer(tmp_path, "model=mlp", *reg)
        weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        trainer.train_step()
        grads[name] = {n: p.grad.clone() for n, p in trainer.engine.module.named_parameters()}
    for n, w in weights.items():
        diff = grads["reg"][n] - grads["none"][n]
        expected = 0.01 * torch.sign(w) + 0.1 * w if w.ndim >= 2 else torch.zeros_like(w)
        assert torch.allclose(diff, expected, atol=1e-6), n


def test_weight_decay_is_not_the_l2_penalty(tmp_path):
    a = train(
        tmp_path / "a", "optimizer=adamw", "optimizer.weight_decay=0.1", "trainer.max_steps=20"
    )
    b = train(
        tmp_path / "b",
        "optimizer=adamw",
        "optimizer.weight_decay=0",
        "regularization.l2=0.1",
        "trainer.max_steps=20",
    )
    assert a["train/loss"] != b["train/loss"]


def test_nonfinite_loss_stops_with_step_loss_and_lr(tmp_path):
    summary = train(
        tmp_path,
        "model=custom",
        "model._target_=models_for_tests.SpikyNet",
        "+model.bad_call=7",
        "trainer.max_steps=40",
        "trainer.log_every=5",
    )
    assert summary["diverged"] and summary["diverged_at_step"] == 7
    assert re.match(
        r"diverged at step 7: loss=(inf|nan), lr=0.1; lower optimizer.lr", summary["error"]
    )
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True
    assert not (tmp_path / "model.pt").exists()  # no non-finite weights written
    assert all(math.isfinite(r["train/loss"]) for r in rows(tmp_path) if "train/loss" in r)


def test_nonfinite_loss_with_skip_skips_that_update(tmp_path):
    summary = train(
        tmp_path,
        "model=custom",
        "model._target_=models_for_tests.SpikyNet",
        "+model.bad_call=7",
        "trainer.max_steps=40",
        "trainer.on_nonfinite=skip",
    )
    assert not summary["diverged"] and summary["skipped_steps"] == 1 and summary["step"] == 40
    assert all(torch.isfinite(v).all() for v in load_model(tmp_path).values())


def test_real_divergence_of_a_large_learning_rate(tmp_path):
    summary = train(
        tmp_path,
        "model=mlp",
        "optimizer.lr=100",
        "optimizer.momentum=0.99",
        "trainer.max_steps=100",
    )
    assert summary["diverged"] and "lr=100" in summary["error"]


def test_run_outputs(tmp_path):
    summary = train(tmp_path, "model=mlp", "trainer.max_epochs=2", "trainer.eval_every=10")
    assert summary["step"] == 2 * (800 // 64) and summary["epoch"] == 1
    lines = rows(tmp_path)
    train_rows = [r for r in lines if "train/loss" in r]
    eval_rows = [r for r in lines if "val/loss" in r]
    assert set(train_rows[0]) >= {"step", "epoch", "train/loss", "lr", "grad_norm", "samples/s"}
    assert [r["step"] for r in eval_rows] == [10, 20, 24]
    assert set(eval_rows[-1]) >= {
        "val/accuracy",
        "val/precision",
        "val/recall",
        "val/f1",
        "val/roc_auc",
    }
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["val/accuracy"] == eval_rows[-1]["val/accuracy"]
    assert {"step", "epoch", "train/loss", "diverged", "wall_time_s"} <= set(on_disk)
    state = load_model(tmp_path)
    assert not any(k.startswith("module.") for k in state)
    model = gddist.models.MLP(3, 1, [64, 64])
    model.load_state_dict(state)  # a plain state_dict of the model class
    assert (tmp_path / "preprocessing.json").exists()


def test_user_model_by_target(tmp_path):
    summary = train(
        tmp_path,
        "model=custom",
        "model._target_=models_for_tests.TinyNet",
        "+model.width=5",
        "trainer.max_steps=30",
    )
    assert load_model(tmp_path)["body.0.weight"].shape == (5, 3)
    assert not summary["diverged"]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    # val/loss in mode=max (it falls as training goes): stops `patience` evaluations after its peak.
    summary = train(
        tmp_path,
        "model=mlp",
        "trainer.max_steps=200",
        "trainer.eval_every=5",
        "early_stopping.monitor=val/loss",
        "early_stopping.mode=max",
        "early_stopping.patience=2",
    )
    evals = [r["val/loss"] for r in rows(tmp_path) if "val/loss" in r]
    assert summary["stopped_by"] == "early_stopping" and summary["step"] < 200
    best = max(range(len(evals)), key=lambda i: evals[i])
    assert len(evals) == best + 1 + 2  # the best evaluation, then `patience` without improvement
    assert (tmp_path / "model.pt").exists()  # an early-stopped run is a finished run


def test_early_stopping_on_a_metric_the_task_lacks_is_a_clear_error(tmp_path):
    with pytest.raises(
        UserError, match="early_stopping.monitor='val/r2' is not a validation metric of this task"
    ):
        train(
            tmp_path,
            "trainer.max_steps=10",
            "trainer.eval_every=5",
            "early_stopping.monitor=val/r2",
            "early_stopping.patience=1",
        )
