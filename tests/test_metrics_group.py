"""The `metrics=` config group: presets equal today's metrics and scikit-learn, `none` logs only
val/loss, torchmetrics extras are logged as val/<name> (1 process == 2), bad input is one line."""

import re

import pytest
import torch
from helpers import cli, compose, rows, spawn, train
from test_metrics import make_csvs, reference, trainer_for
from torch import nn
from torchmetrics import classification as C

from gddist import keys
from gddist.config import Config, MetricsConfig, UserError
from gddist.data import build as build_data
from gddist.metrics import Evaluator
from gddist.rundir import run_name

SHORT = ["trainer.max_steps=20", "trainer.eval_every=10", "data.batch_size=32"]
TOP2 = [
    "+metrics.extra.top2._target_=torchmetrics.classification.MulticlassAccuracy",
    "+metrics.extra.top2.num_classes=3",
    "+metrics.extra.top2.top_k=2",
]
# A metric whose states are lists of predictions (gathered across ranks, not summed).
AP = [
    "+metrics.extra.ap._target_=torchmetrics.classification.MulticlassAveragePrecision",
    "+metrics.extra.ap.num_classes=3",
]


def val_keys(run_dir):
    return {k for r in rows(run_dir) for k in r if k.startswith("val/")}


def test_classification_preset_equals_auto_on_purchase_data(tmp_path):
    auto = train(tmp_path / "auto", *SHORT, "model=mlp")
    explicit = train(tmp_path / "cls", *SHORT, "model=mlp", "metrics=classification")
    keys = {k for k in auto if k.startswith("val/")}
    assert keys == {
        f"val/{m}" for m in ("loss", "accuracy", "precision", "recall", "f1", "roc_auc")
    }
    assert {k: explicit[k] for k in keys} == {k: auto[k] for k in keys}  # bit-identical


def test_regression_preset_equals_auto_on_regression_data(tmp_path):
    auto = train(tmp_path / "auto", *SHORT, "data=regression")
    explicit = train(tmp_path / "reg", *SHORT, "data=regression", "metrics=regression")
    keys = {k for k in auto if k.startswith("val/")}
    assert keys == {"val/loss", "val/mse", "val/mae", "val/r2"}
    assert {k: explicit[k] for k in keys} == {k: auto[k] for k in keys}


def test_metrics_keys_are_not_part_of_the_run_identity():
    """Which metrics are measured does not change the weights: the same command with other
    metrics is the same run dir, and a resume with other metrics is not refused."""
    assert keys.kind("metrics") == keys.kind("metrics.extra.top2.top_k") == "speed"
    base = run_name(compose(), {})
    assert (
        run_name(compose("metrics=none", *TOP2[:1], "+metrics.extra.top2.num_classes=3"), {})
        == base
    )
    assert run_name(compose("early_stopping.monitor=val/f1"), {}) != base  # what is watched is


def test_classification_preset_on_three_classes_equals_sklearn_macro(tmp_path):
    overrides = [
        *make_csvs(tmp_path)["multiclass"],
        *SHORT,
        "model=mlp",
        "metrics=classification",
        "metrics.num_classes=3",
    ]
    trainer = trainer_for(tmp_path / "run", overrides)
    summary = trainer.fit()
    with torch.no_grad():
        out = trainer.engine.module.eval()(trainer.data.x_val)
    expected = reference("multiclass", out, trainer.data.y_val, trainer.data.preprocessing)
    assert len(set(trainer.data.y_val.tolist())) == 3
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_none_logs_only_the_validation_loss(tmp_path):
    summary = train(tmp_path / "run", *SHORT, "metrics=none")
    assert val_keys(tmp_path / "run") == {"val/loss"}
    assert {k for k in summary if k.startswith("val/")} == {"val/loss"}
    # The same loss as with the default metrics: the preset changes what is measured only.
    assert summary["val/loss"] == train(tmp_path / "auto", *SHORT)["val/loss"]


def test_torchmetrics_extra_is_logged_and_equals_a_direct_computation(tmp_path):
    overrides = [*make_csvs(tmp_path)["multiclass"], *SHORT, "model=mlp", *TOP2, *AP]
    trainer = trainer_for(tmp_path / "run", overrides)
    summary = trainer.fit()
    with torch.no_grad():
        probs = torch.softmax(trainer.engine.module.eval()(trainer.data.x_val), -1)
    y = trainer.data.y_val
    top2 = C.MulticlassAccuracy(num_classes=3, top_k=2)(probs, y).item()
    ap = C.MulticlassAveragePrecision(num_classes=3)(probs, y).item()
    assert summary["val/top2"] == top2 and summary["val/ap"] == ap
    # top-2 of 3 classes is an easier score than top-1 (micro accuracy): a real top-k count.
    assert summary["val/top2"] >= summary["val/accuracy"]
    evals = [r for r in rows(tmp_path / "run") if "val/loss" in r]
    assert len(evals) == 2 and all("val/top2" in r and "val/accuracy" in r for r in evals)


def test_extra_named_like_a_preset_metric_replaces_it(tmp_path):
    summary = train(
        tmp_path / "run",
        *SHORT,
        "+metrics.extra.accuracy._target_=torchmetrics.classification.BinaryAccuracy",
        "+metrics.extra.accuracy.threshold=0.9",
    )
    default = train(tmp_path / "auto", *SHORT)
    assert summary["val/accuracy"] != default["val/accuracy"]  # threshold 0.9, not 0.5
    assert summary["val/f1"] == default["val/f1"]


def test_early_stopping_may_watch_an_extra_metric(tmp_path):
    extra = "+metrics.extra.ap._target_=torchmetrics.classification.BinaryAveragePrecision"
    # min_delta=1: no evaluation after the first improves on it, so patience 1 stops at the 2nd.
    watch = [
        "early_stopping.monitor=val/ap",
        "early_stopping.mode=max",
        "early_stopping.min_delta=1",
    ]
    summary = train(
        tmp_path / "run", "trainer.max_steps=60", "trainer.eval_every=5",
        "early_stopping.patience=1", extra, *watch,
    )  # fmt: skip
    assert summary["stopped_by"] == "early_stopping" and summary["step"] == 10
    assert 0 < summary["val/ap"] <= 1


def test_model_output_width_is_checked_at_the_first_evaluation():
    """A model that does not output what the metrics were built for (a custom model ignoring
    out_features) fails at its first evaluation, in one line, not in torchmetrics."""
    data = build_data(Config.from_dict(compose()).data, 0)
    evaluator = Evaluator(data.preprocessing, torch.device("cpu"), MetricsConfig("classification"))
    batch = [(data.x_val[:8], data.y_val[:8])]
    with pytest.raises(UserError, match=r"outputs 3 value\(s\) per sample .* expect 1"):
        evaluator.evaluate(nn.Linear(data.num_features, 3), batch)


def _evaluate_worker(rank, init_method, run_dir, overrides):
    trainer = trainer_for(run_dir, overrides, init_method)
    try:
        trainer.evaluate()
        return {"metrics": trainer.last_eval, "shard": trainer.val_shard[1] - trainer.val_shard[0]}
    finally:
        trainer.dist.close()


@pytest.mark.slow
def test_two_processes_equal_one_for_extra_metrics(tmp_path):
    overrides = [*make_csvs(tmp_path)["multiclass"], "model=mlp", "metrics=none", *TOP2, *AP]
    one = trainer_for(tmp_path / "one", overrides)
    one.evaluate()
    assert set(one.last_eval) == {"val/loss", "val/top2", "val/ap"}
    two = spawn(_evaluate_worker, 2, tmp_path, tmp_path / "two", overrides)
    assert sorted(r["shard"] for r in two) == [30, 31]  # 61 rows, no padded duplicates
    for result in two:
        for key, value in one.last_eval.items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


BAD = {
    "unknown_preset": (["metrics=bogus"], "unknown metrics option 'bogus'"),
    "unknown_key": (["+metrics.bogus=1"], "unknown config key 'metrics.bogus'"),
    "missing_target": (["+metrics.extra.x.top_k=2"], r"metrics\.extra\.x\._target_ is missing"),
    "not_importable": (
        ["+metrics.extra.x._target_=torchmetrics.NoSuchMetric"],
        r"metrics\.extra\.x\._target_=torchmetrics\.NoSuchMetric cannot be imported",
    ),
    "not_a_metric": (
        ["+metrics.extra.x._target_=torch.nn.Linear"],
        r"metrics\.extra\.x\._target_=torch\.nn\.Linear is not a torchmetrics\.Metric",
    ),
    "constructor_raises": (
        [
            "+metrics.extra.x._target_=torchmetrics.classification.BinaryAccuracy",
            "+metrics.extra.x.threshold=2",
        ],  # fmt: skip
        r"metrics\.extra\.x \(torchmetrics\.classification\.BinaryAccuracy\) could not be "
        r"built: Expected argument `threshold` to be a float in the \[0,1\] range",
    ),
    "num_classes": (
        ["metrics=classification", "metrics.num_classes=3"],
        r"metrics\.num_classes=3 does not fit the model's 1 output",
    ),
    "wrong_kind": (
        [
            "+metrics.extra.x._target_=torchmetrics.classification.MulticlassAccuracy",
            "+metrics.extra.x.num_classes=2",
        ],  # fmt: skip
        r"metrics\.extra\.x is a MulticlassAccuracy but this run's predictions are binary",
    ),
    "unknown_monitor": (
        [
            "+metrics.extra.ap._target_=torchmetrics.classification.BinaryAveragePrecision",
            "early_stopping.patience=2",
            "early_stopping.monitor=val/apx",
        ],  # fmt: skip
        r"early_stopping\.monitor='val/apx' is not a validation metric .* val/ap, val/f1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metrics_input_is_one_line_and_exit_2_before_training(tmp_path, case):
    args, message = BAD[case]
    run_dir = tmp_path / "run"
    proc = cli("trainer.max_steps=5", f"hydra.run.dir={run_dir}", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, errors[0]), errors[0]
    assert not (run_dir / "metrics.jsonl").exists()  # before training
