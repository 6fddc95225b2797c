"""Validation metrics equal a reference computation (sklearn), on 1 rank and on 2 ranks."""

import numpy as np
import pytest
import torch
from helpers import compose, spawn
from sklearn import metrics as skm
from test_data import write_csv

from gddist.config import Config
from gddist.data import build as build_data
from gddist.dist import detect_launch, init
from gddist.trainer import Trainer


def make_csvs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(305, 3))  # 61 validation rows: odd
    multi = [[*r, ["a", "b", "c"][int(abs(r[0] + r[1] * 2)) % 3]] for r in x]
    reg = [[*r, 50 + 10 * r[0] - 5 * r[2] + rng.normal()] for r in x]
    header = ["f1", "f2", "f3", "label"]
    return {
        "binary": [],
        "multiclass": [
            "data=csv",
            f"data.path={write_csv(tmp_path / 'm.csv', header, multi)}",
            "data.target=label",
        ],
        "regression": [
            "data=csv",
            f"data.path={write_csv(tmp_path / 'r.csv', header, reg)}",
            "data.target=label",
        ],
    }


def trainer_for(tmp_path, overrides, init_method=None):
    cfg = Config.from_dict(compose(*overrides))
    if init_method:
        cfg.dist.init_method = init_method
    data = build_data(cfg.data, cfg.seed)
    return Trainer(cfg, data, init(cfg.dist, detect_launch()), tmp_path)


def reference(task, out, y, prep):
    if task == "binary":
        p = torch.sigmoid(out.squeeze(-1)).numpy()
        yh, yt = (p >= 0.5).astype(int), y.numpy().astype(int)
        return {
            "val/accuracy": skm.accuracy_score(yt, yh),
            "val/precision": skm.precision_score(yt, yh),
            "val/recall": skm.recall_score(yt, yh),
            "val/f1": skm.f1_score(yt, yh),
            "val/roc_auc": skm.roc_auc_score(yt, p),
        }
    if task == "multiclass":
        p = torch.softmax(out, -1).numpy()
        yh, yt = p.argmax(1), y.numpy()
        kw = {"average": "macro", "zero_division": 0}
        return {
            "val/accuracy": skm.accuracy_score(yt, yh),
            "val/precision": skm.precision_score(yt, yh, **kw),
            "val/recall": skm.recall_score(yt, yh, **kw),
            "val/f1": skm.f1_score(yt, yh, **kw),
            "val/roc_auc": skm.roc_auc_score(yt, p, multi_class="ovr", average="macro"),
        }
    pred = out.squeeze(-1).numpy() * prep.target_std + prep.target_mean
    yt = y.numpy() * prep.target_std + prep.target_mean
    return {
        "val/mse": skm.mean_squared_error(yt, pred),
        "val/mae": skm.mean_absolute_error(yt, pred),
        "val/r2": skm.r2_score(yt, pred),
    }


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_metrics_equal_sklearn(tmp_path, task):
    overrides = make_csvs(tmp_path)[task] + [
        "model=mlp",
        "trainer.max_steps=30",
        "data.batch_size=32",
    ]
    trainer = trainer_for(tmp_path / "run", overrides)
    summary = trainer.fit()
    model = trainer.engine.module.eval()
    with torch.no_grad():
        out = model(trainer.data.x_val)
    expected = reference(task, out, trainer.data.y_val, trainer.data.preprocessing)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert summary["val/loss"] > 0


def _evaluate_worker(rank, init_method, run_dir, overrides):
    trainer = trainer_for(run_dir, overrides, init_method)
    try:
        trainer.evaluate()
        return {"metrics": trainer.last_eval, "shard": trainer.val_shard[1] - trainer.val_shard[0]}
    finally:
        trainer.dist.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_two_rank_metrics_equal_one_rank_on_an_odd_validation_set(tmp_path, task):
    overrides = {
        "binary": ["data.num_samples=1005"],
        "multiclass": make_csvs(tmp_path)["multiclass"],
    }[task]
    overrides = [*overrides, "model=mlp"]
    one = trainer_for(tmp_path / "one", overrides)
    one.evaluate()
    n_val = one.val_shard[1] - one.val_shard[0]
    assert n_val % 2 == 1
    two = spawn(_evaluate_worker, 2, tmp_path, tmp_path / "two", overrides)
    assert sorted(r["shard"] for r in two) == [n_val // 2, n_val // 2 + 1]  # no padded duplicates
    for result in two:
        for key, value in one.last_eval.items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
