"""Test split, checkpoint.save_best and `python -m gddist.evaluate` (issue 14).

Numbers are checked against scikit-learn on the probabilities of the saved model.pt; 1 process
against 2 (torchrun, slow); best.pt against the val metrics logged in metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, check, clean_env, compose, rows, train
from sklearn.metrics import accuracy_score, roc_auc_score

from gddist import data as data_mod
from gddist.config import Config, UserError
from gddist.data.tensors import split_rows3
from gddist.evaluate import evaluate as evaluate_here
from gddist.evaluate import main
from gddist.runs import build_model

TRAIN = (
    "data.test_fraction=0.2",
    "checkpoint.save_best=val/roc_auc",
    "checkpoint.best_mode=max",
    "checkpoint.keep_last=1",
    "checkpoint.every_steps=10",
    "trainer.eval_every=10",
    "logger.progress=none",
    "logger.plots=false",
)


def evaluate(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python [LAUNCHER] -m gddist.evaluate ARGS` as a user runs it (a few seconds of imports:
    most checks call gddist.evaluate.evaluate in this process instead)."""
    cmd = [sys.executable, *launcher, "-m", "gddist.evaluate", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """purchase with a test split, trained 40 steps, best by val/roc_auc."""
    run_dir = tmp_path_factory.mktemp("ev") / "run"
    train(run_dir, *TRAIN, "trainer.max_steps=40")
    return run_dir


def _sklearn_test_metrics(run_dir: Path, which: str) -> tuple[float, float]:
    """(roc_auc, accuracy) of `which`'s weights on the test rows, computed with scikit-learn."""
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    data = data_mod.build(cfg.data, cfg.seed)
    model = build_model(run_dir, cfg, data.num_features, data.num_outputs, which)
    with torch.no_grad():
        p = torch.sigmoid(model(data.x_test).squeeze(-1)).double().numpy()
    y = data.y_test.numpy()
    return roc_auc_score(y, p), accuracy_score(y, p > 0.5)


def test_test_split_rows():
    """The test rows come first out of the seeded permutation; none is trained or validated
    on; test_fraction=0 keeps today's split."""
    test, val, train = split_rows3(1000, 0.2, 0, 0.2)
    assert (len(test), len(val), len(train)) == (200, 200, 600)
    assert not set(test.tolist()) & (set(val.tolist()) | set(train.tolist()))
    no_test, val0, train0 = split_rows3(1000, 0.2, 0)
    assert len(no_test) == 0 and len(val0) == 200
    assert torch.equal(torch.cat([test, val, train]), torch.cat([val0, train0]))
    cfg = Config.from_dict(compose("data.test_fraction=0.2"))
    d = data_mod.build(cfg.data, cfg.seed)
    assert (d.num_rows("train"), d.num_rows("val"), d.num_rows("test")) == (600, 200, 200)


def test_default_run_dir_unchanged():
    """The new keys at their defaults leave the identity (the run dir name) as it was."""
    from gddist.keys import identity

    ident = identity(compose())
    assert not any("test" in k or "best" in k for k in ident)
    assert "data.test_fraction" in identity(compose("data.test_fraction=0.2"))


def test_summary_and_evaluate_match_sklearn(run: Path, tmp_path: Path):
    summary = json.loads((run / "summary.json").read_text())
    auc, acc = _sklearn_test_metrics(run, "final")
    assert summary["test/roc_auc"] == pytest.approx(auc, abs=1e-6)
    assert summary["test/accuracy"] == pytest.approx(acc, abs=1e-6)
    best_auc, _ = _sklearn_test_metrics(run, "best")
    assert summary["test_best/roc_auc"] == pytest.approx(best_auc, abs=1e-6)

    out = check(evaluate(str(run)))
    ev = json.loads(out.stdout)
    assert ev == json.loads((run / "eval.json").read_text())
    assert ev["rows"] == 200
    for key in ("test/loss", "test/roc_auc", "test/accuracy", "test/f1"):
        assert ev[key] == summary[key]  # the same Evaluator on the same rows: exact
    ev_best = evaluate_here(run, "best", out=tmp_path / "best.json")
    assert ev_best["test/roc_auc"] == summary["test_best/roc_auc"]
    ev_val = evaluate_here(run, "final", "val", out=tmp_path / "val.json")
    assert ev_val["val/roc_auc"] == summary["val/roc_auc"]


def test_new_csv_uses_saved_preprocessing(run: Path, tmp_path: Path):
    """The test rows written as a raw CSV: transformed by preprocessing.json (not refit on the
    200 rows, which would change the means), they score what the test split scores."""
    columns, labels = data_mod.make_purchase(1000, 0)
    test, _, _ = split_rows3(1000, 0.2, 0, 0.2)
    path = tmp_path / "new.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "purchased"])
        for i in test.tolist():
            w.writerow([repr(columns[c][i]) for c in columns] + [repr(labels[i])])
    ev = evaluate_here(run, overrides=[f"data.path={path}"], out=tmp_path / "e.json")
    summary = json.loads((run / "summary.json").read_text())
    assert ev["rows"] == 200
    assert ev["eval/roc_auc"] == summary["test/roc_auc"]
    assert ev["eval/loss"] == summary["test/loss"]


def test_best_kept_under_keep_last_and_across_resume(run: Path, tmp_path: Path):
    """best.pt holds the weights of the best val/roc_auc evaluation; keep_last=1 pruning leaves
    it; a resumed run (here 20 steps, then continued to 40) keeps a better earlier best instead
    of overwriting it with a worse later one, so it ends where the straight run ended."""
    evals = [r for r in rows(run) if "val/roc_auc" in r]
    top = max(evals, key=lambda r: r["val/roc_auc"])
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["value"]) == (top["step"], top["val/roc_auc"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.json",
        "best.pt",
        "step_000000040",
    ]
    resumed = tmp_path / "resumed"
    train(resumed, *TRAIN, "trainer.max_steps=20")
    first = json.loads((resumed / "checkpoints" / "best.json").read_text())
    train(resumed, *TRAIN, "trainer.max_steps=40")
    again = json.loads((resumed / "checkpoints" / "best.json").read_text())
    assert again == best
    # The later evaluations were worse than the first run's best (else this checks nothing).
    assert all(r["val/roc_auc"] < first["value"] for r in evals if r["step"] > 20)
    a = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_one_line(run: Path, tmp_path: Path, capsys):
    with pytest.raises(UserError, match=r"checkpoint.save_best='val/r2' is not a validation"):
        train(tmp_path / "x", "checkpoint.save_best=val/r2", "trainer.max_steps=2")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    for args, says in [
        ((str(tmp_path / "missing"),), "does not exist"),
        ((str(run), "--checkpoint", str(tmp_path / "nope")), "does not exist"),
        ((str(run), "--checkpoint", str(run / "config.json")), "cannot be used"),
        ((str(run), "data.nope=1"), "no key 'data.nope'"),
        ((str(run), "--split", "train"), "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


@pytest.mark.slow
def test_two_process_evaluate_equals_one(run: Path, tmp_path: Path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    two = check(evaluate(str(run), "--out", str(tmp_path / "two.json"), launcher=launcher))
    one = json.loads((run / "summary.json").read_text())
    got = json.loads((tmp_path / "two.json").read_text())
    assert got["processes"] == 2 and '"processes": 2' in two.stdout
    for key in ("test/loss", "test/roc_auc", "test/accuracy", "test/precision"):
        assert got[key] == pytest.approx(one[key], abs=1e-6)


@pytest.mark.slow
def test_docs_evaluate_commands_as_written(tmp_path: Path):
    """docs/evaluate.md's ```bash blocks, run as written from a folder holding train.py and
    conf/; its printed numbers are the ones they produce."""
    import os
    import re

    doc = (ROOT / "docs" / "evaluate.md").read_text()
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    env = clean_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, torchrun
    for command in re.findall(r"```bash\n(.*?)```", doc, re.S):
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    run_dir = tmp_path / "runs" / "purchase"
    summary = json.loads((run_dir / "summary.json").read_text())
    one = json.loads((run_dir / "eval.json").read_text())
    two = json.loads((run_dir / "eval_2proc.json").read_text())
    best = json.loads((run_dir / "eval_best.json").read_text())
    new = json.loads((run_dir / "eval_new.json").read_text())
    for key in ("test/roc_auc", "test/accuracy", "test/loss"):
        assert one[key] == summary[key] and two[key] == pytest.approx(one[key], abs=1e-6)
        assert best[key] == summary[key.replace("test/", "test_best/")]
    assert f'"test/roc_auc": {one["test/roc_auc"]}' in doc  # the doc shows this run's numbers
    assert f'"eval/roc_auc": {new["eval/roc_auc"]}' in doc and new["rows"] == 500
    best_json = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert json.dumps(best_json) in doc
