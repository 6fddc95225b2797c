"""experiment=healthcare: breast-cancer diagnosis through data=csv, the CSV written by the
`${gddist_call:...}` resolver on every rank before data is read; against LogisticRegression."""

import json

import numpy as np
import pytest
import torch
from helpers import compose, train

from gddist.config import Config
from gddist.examples import healthcare

PRESET = "experiment=healthcare"
# README numbers (docs/examples/healthcare.md), 1 process on CPU, torch 2.13 / sklearn 1.9.
README_ROC_AUC, README_BASELINE = 1.0, 1.0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDDIST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_preset_composes_writes_the_csv_and_a_short_run_trains(tmp_path, cache):
    cfg = Config.from_dict(compose(PRESET))
    path = cache / "breast_cancer.csv"
    assert cfg.data.name == "csv" and cfg.data.path == str(path.resolve())
    lines = path.read_text().splitlines()
    assert len(lines) == 570 and lines[0].endswith(",diagnosis")
    assert {ln.rsplit(",", 1)[1] for ln in lines[1:]} == {"malignant", "benign"}
    first = path.read_bytes()
    assert healthcare.csv_path() == str(path.resolve()) and path.read_bytes() == first
    summary = train(tmp_path / "run", PRESET, "trainer.max_steps=10", "trainer.eval_every=0")
    assert summary["step"] == 10 and 0.5 < summary["val/roc_auc"] <= 1
    assert 0.95 < summary["baseline/logreg_roc_auc"] <= 1


@pytest.mark.slow
def test_full_preset_reproduces_the_readme_numbers(tmp_path, cache):
    from sklearn.metrics import roc_auc_score

    run_dir = tmp_path / "run"
    summary = train(run_dir, PRESET, "logger.plots=true")
    assert summary["step"] == 400 and not summary["diverged"]
    assert summary["val/roc_auc"] == pytest.approx(README_ROC_AUC, abs=1e-3)
    assert summary["baseline/logreg_roc_auc"] == pytest.approx(README_BASELINE, abs=1e-3)
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert (run_dir / "plots" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # on_end's split is the run's: the saved model scores its val rows as gddist did.
    cfg = compose(PRESET)
    _, _, x_val, y_val = healthcare.split_arrays(cfg)
    assert len(y_val) == 114 and 0 < y_val.mean() < 1
    model = healthcare.MLP(30, 1, hidden=0)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        scores = model(torch.tensor(x_val, dtype=torch.float32)).reshape(-1).numpy()
    assert roc_auc_score(y_val, scores) == pytest.approx(summary["val/roc_auc"], abs=1e-6)
    accuracy = np.mean((scores > 0) == y_val)
    assert accuracy == pytest.approx(summary["val/accuracy"], abs=1e-6)
