"""python -m gddist.predict: tabular CSVs through the saved preprocessing (original labels, exact
probabilities), one-line errors, data=dataset runs, and the torchrun shard/merge path."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, check, clean_env, train

from gddist import predict, runs
from gddist.config import UserError
from gddist.data import split_rows

SPECIES = ("setosa", "versicolor", "virginica")


def write_csv(path: Path, n: int, seed: int = 0, binary: bool = False) -> Path:
    """Features: two numbers and a text column `soil`; the label (species, or yes/no) depends
    on all three, so the model has something to learn."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g) * 3 + 10
    soil = torch.randint(0, 3, (n,), generator=g)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["petal", "label", "sepal", "soil"])  # the target in the middle: order-free
        for i in range(n):
            z = a[i] + (b[i] - 10) / 3 + (soil[i] - 1)
            y = ("yes" if z > 0 else "no") if binary else SPECIES[int(z > -0.7) + int(z > 0.7)]
            w.writerow([f"{a[i]:.3f}", y, f"{b[i]:.2f}", ("clay", "loam", "sand")[soil[i]]])
    return path


def read_out(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


FAST = ["trainer.max_steps=40", "trainer.eval_every=40", "logger.progress=none", "model=mlp"]


@pytest.fixture(scope="module")
def species_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("species")
    data = write_csv(d / "species.csv", 300)
    train(d / "run", "data=csv", f"data.path={data}", "data.target=label", *FAST)
    return d / "run", data


def val_outputs(run_dir: Path) -> tuple[torch.Tensor, list[int], list]:
    """The model's outputs on the run's own val rows (from model.pt), the rows' CSV indices, and
    the run's classes."""
    loaded = runs.load(run_dir)
    with torch.no_grad():
        out = loaded.model(loaded.data.x_val).double()
    n = len(loaded.data.y_val) + len(loaded.data.y_train)
    val_rows, _ = split_rows(n, loaded.cfg.data.val_fraction, loaded.cfg.seed)
    return out, val_rows.tolist(), loaded.data.preprocessing.classes


def test_multiclass_csv_reproduces_val_predictions_in_original_labels(species_run, tmp_path):
    run_dir, data = species_run
    out_path = tmp_path / "pred.csv"
    assert predict.main([str(run_dir), str(data), "--out", str(out_path)]) == 0
    got = read_out(out_path)
    assert len(got) == 300 and [r["row"] for r in got] == [str(i + 1) for i in range(300)]
    out, val_rows, classes = val_outputs(run_dir)
    assert classes == list(SPECIES)
    probs = torch.softmax(out, dim=1)
    mine = torch.tensor([[float(got[i][f"prob_{c}"]) for c in SPECIES] for i in val_rows])
    assert (mine - probs).abs().max().item() <= 1e-6
    assert [got[i]["prediction"] for i in val_rows] == [SPECIES[k] for k in probs.argmax(1)]
    # The run learned something: the predictions carry the labels, not just their names.
    truth = [r["label"] for r in csv.DictReader(data.open())]
    accuracy = sum(got[i]["prediction"] == truth[i] for i in val_rows) / len(val_rows)
    assert accuracy > 0.6, accuracy


def test_binary_yes_no_labels_and_positive_probability(tmp_path):
    data = write_csv(tmp_path / "yn.csv", 200, seed=1, binary=True)
    train(tmp_path / "run", "data=csv", f"data.path={data}", "data.target=label", *FAST)
    assert predict.main([str(tmp_path / "run"), str(data)]) == 0
    got = read_out(tmp_path / "run" / "predictions.csv")
    assert list(got[0]) == ["row", "prediction", "prob_yes"]  # classes sorted: no, yes
    out, val_rows, classes = val_outputs(tmp_path / "run")
    assert classes == ["no", "yes"]
    p = torch.sigmoid(out.reshape(-1))
    mine = torch.tensor([float(got[i]["prob_yes"]) for i in val_rows], dtype=torch.float64)
    assert (mine - p).abs().max().item() <= 1e-6
    assert [got[i]["prediction"] for i in val_rows] == ["yes" if v > 0.5 else "no" for v in p]
    # --checkpoint: the final step's checkpoint holds model.pt's weights, so the same file.
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    out = tmp_path / "from_ckpt.csv"
    assert predict.main([str(tmp_path / "run"), str(data), "--checkpoint", str(ckpt), "--out", str(out)]) == 0  # fmt: skip
    assert out.read_text() == (tmp_path / "run" / "predictions.csv").read_text()


def test_regression_in_original_units(tmp_path):
    from gddist.data import make_regression

    train(tmp_path / "run", "data=regression", "data.num_samples=300", *FAST)
    columns, y = make_regression(300, 0)  # the run's data: seed 0
    path = tmp_path / "reg.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "y"])
        w.writerows([[repr(columns[c][i]) for c in columns] + [y[i]] for i in range(300)])
    assert predict.main([str(tmp_path / "run"), str(path)]) == 0
    got = read_out(tmp_path / "run" / "predictions.csv")
    assert list(got[0]) == ["row", "prediction"]
    out, val_rows, _ = val_outputs(tmp_path / "run")
    prep = runs.load(tmp_path / "run").data.preprocessing
    want = out.reshape(-1) * prep.target_std + prep.target_mean
    mine = torch.tensor([float(got[i]["prediction"]) for i in val_rows], dtype=torch.float64)
    assert (mine - want).abs().max().item() <= 1e-5  # original units (std ~2.3): float32 outputs
    rmse = ((mine - torch.tensor([y[i] for i in val_rows])) ** 2).mean().sqrt().item()
    assert rmse < 1.5, rmse  # raw-unit predictions, not standardized ones


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        predict._run(predict.parse(argv))
    return str(e.value)


def test_bad_inputs_one_line_naming_column_and_line(species_run, tmp_path):
    run_dir, _ = species_run
    bad = tmp_path / "bad.csv"
    bad.write_text("petal,soil\n0.1,clay\n")
    msg = error_of([str(run_dir), str(bad)])
    assert "column 'sepal' is missing" in msg and "petal, sepal, soil" in msg
    bad.write_text("sepal,petal,soil\n10,0.1,clay\n11,abc,loam\n")
    msg = error_of([str(run_dir), str(bad)])
    assert "line 3: column 'petal' has non-numeric value 'abc'" in msg
    bad.write_text("sepal,petal,soil\n10,0.1,clay\n\n11,0.2,peat\n")  # a blank line: line 4
    msg = error_of([str(run_dir), str(bad)])
    assert "line 4: column 'soil' has category 'peat', which the run never saw" in msg
    assert "'clay', 'loam', 'sand'" in msg
    bad.write_text("sepal,petal,soil\n10,NA,clay\n")
    assert "line 2: missing value 'NA' in numeric column 'petal'" in error_of(
        [str(run_dir), str(bad)]
    )
    # The CLI: one line on stderr, exit 2.
    bad.write_text("sepal,petal,soil\n10,0.1,peat\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gddist.predict", str(run_dir), str(bad)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'peat'" in lines[0], lines


DIGITS = ["data=dataset", "data.train._target_=datasets_for_tests.Digits",
          "data.val._target_=datasets_for_tests.Digits", "+data.val.split=val",
          "+data.val.limit=90", "data.eval_batch_size=32", "model=custom",
          "model._target_=datasets_for_tests.CNN", "loss=cross_entropy",
          "metrics=classification", "trainer.max_steps=10", "trainer.eval_every=10",
          "logger.progress=none"]  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(run_dir, *DIGITS)
    return run_dir


def test_dataset_run_predicts_its_val_split(digits_run, tmp_path):
    assert predict.main([str(digits_run), "--out", str(tmp_path / "p.csv")]) == 0
    got = read_out(tmp_path / "p.csv")
    loaded = runs.load(digits_run)
    inputs, target = loaded.data.read("val", slice(0, 90))
    with torch.no_grad():
        probs = torch.softmax(loaded.model(inputs).double(), dim=1)
    mine = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in got])
    assert len(got) == 90 and (mine - probs).abs().max().item() <= 1e-6
    assert [int(r["prediction"]) for r in got] == probs.argmax(1).tolist()
    # Another Dataset through an override: the first 30 training images.
    argv = [str(digits_run), "+data.val.limit=30", "data.val.split=train", "--out", str(tmp_path / "t.csv")]  # fmt: skip
    assert predict.main(argv) == 0
    assert len(read_out(tmp_path / "t.csv")) == 30
    assert "drop INPUT" in error_of([str(digits_run), "x.csv"])


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_one_process_file(digits_run, species_run, tmp_path):
    """3 ranks (shards of 30 rows, uneven batches of 32) write the same file as 1 process."""
    assert predict.main([str(digits_run), "--out", str(tmp_path / "one.csv")]) == 0
    run_dir, data = species_run
    assert predict.main([str(run_dir), str(data), "--out", str(tmp_path / "one_csv.csv")]) == 0
    for args, name in (
        ([str(digits_run)], "many.csv"),
        ([str(run_dir), str(data)], "many_csv.csv"),
    ):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=3", "-m", "gddist.predict", *args, "--out", str(tmp_path / name)]  # fmt: skip
        check(
            subprocess.run(
                cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240
            )
        )
    for one, many in (("one.csv", "many.csv"), ("one_csv.csv", "many_csv.csv")):
        a, b = read_out(tmp_path / one), read_out(tmp_path / many)
        assert [r["row"] for r in b] == [r["row"] for r in a]
        assert [r["prediction"] for r in b] == [r["prediction"] for r in a]
        for ra, rb in zip(a, b, strict=True):
            for k in ra:
                if k.startswith("prob_"):
                    assert abs(float(ra[k]) - float(rb[k])) <= 1e-6
    assert not list(tmp_path.glob("*.part*"))
