"""Tier 1: datasets, preprocessing, CSV errors, and the global-batch order."""

import csv

import pytest
import torch

from gddist.config import DataConfig, UserError
from gddist.data import GlobalBatches, Preprocessing, build, make_purchase


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def csv_cfg(path, target="label", **kw):
    return DataConfig(name="csv", path=path, target=target, num_samples=None, **kw)


def test_purchase_is_deterministic_from_the_seed():
    a, b, c = make_purchase(200, 1), make_purchase(200, 1), make_purchase(200, 2)
    assert a == b
    assert a != c
    columns, labels = a
    assert set(columns) == {"age", "income_k", "education_level"}
    assert all(18 <= x <= 70 for x in columns["age"])
    assert set(columns["education_level"]) <= {1.0, 2.0, 3.0, 4.0}
    assert 0.3 < sum(labels) / len(labels) < 0.7  # both classes well represented


def test_purchase_split_is_standardized_with_train_statistics():
    data = build(DataConfig(), seed=0)
    assert len(data.y_train) == 800 and len(data.y_val) == 200
    assert torch.allclose(data.x_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert data.task == "binary" and data.num_outputs == 1
    # The true coefficients, mapped to standardized units, predict well above chance.
    logit = data.x_val @ data.true_coef + data.true_bias
    assert ((logit > 0).float() == data.y_val).float().mean() > 0.65


def test_csv_numeric_and_text_columns(tmp_path):
    rows = [[i, ["red", "green", "blue"][i % 3], i % 2] for i in range(40)]
    path = write_csv(tmp_path / "d.csv", ["x", "color", "label"], rows)
    data = build(csv_cfg(path), seed=0)
    assert data.task == "binary"
    assert data.num_features == 1 + 3  # x standardized, color one-hot over 3 categories
    prep = data.preprocessing
    assert prep.features[1]["categories"] == ["blue", "green", "red"]
    # The saved preprocessing reproduces the model inputs from raw values.
    prep.save(tmp_path / "prep.json")
    again = Preprocessing.load(tmp_path / "prep.json")
    raw = {"x": [r[0] for r in rows], "color": [r[1] for r in rows]}
    x_all = again.transform(raw)
    assert torch.allclose(
        torch.cat([data.x_train, data.x_val]).sort(0).values, x_all.sort(0).values
    )
    onehot = data.x_train[:, 1:]
    assert torch.equal(onehot.sum(1), torch.ones(len(onehot)))


def test_csv_task_inference_and_explicit_task(tmp_path):
    multi = write_csv(
        tmp_path / "m.csv", ["x", "label"], [[i, ["a", "b", "c"][i % 3]] for i in range(30)]
    )
    data = build(csv_cfg(multi), seed=0)
    assert (data.task, data.num_outputs, data.y_train.dtype) == ("multiclass", 3, torch.long)
    reg = write_csv(tmp_path / "r.csv", ["x", "label"], [[i, 100 + 2.5 * i] for i in range(30)])
    data = build(csv_cfg(reg), seed=0)
    assert data.task == "regression"
    prep = data.preprocessing
    y = torch.cat([data.y_train, data.y_val]) * prep.target_std + prep.target_mean
    assert torch.allclose(
        y.sort().values, torch.tensor([100 + 2.5 * i for i in range(30)]), atol=1e-3
    )
    assert abs(data.y_train.mean().item()) < 1e-5  # standardized for training
    ints = write_csv(tmp_path / "i.csv", ["x", "label"], [[i, i % 4] for i in range(30)])
    assert build(csv_cfg(ints), seed=0).task == "multiclass"
    assert build(csv_cfg(ints, task="regression"), seed=0).task == "regression"


def test_split_is_deterministic_from_the_seed(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "label"], [[i, i % 2] for i in range(50)])
    a, b, c = build(csv_cfg(path), 0), build(csv_cfg(path), 0), build(csv_cfg(path), 1)
    assert torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_val, c.x_val)


@pytest.mark.parametrize(
    "content, target, message",
    [
        (None, "label", "file not found"),
        ("", "label", "the file is empty"),
        ("x,label\n", "label", "no data rows"),
        ("x,y\n1,0\n2,1\n", "label", "data.target='label' is not a column of .*columns are: x, y"),
        ("x,label\n1,0\nabc,1\n3,0\n", "label", "line 3: column 'x' has non-numeric value 'abc'"),
        ("x,label\n1,0\n,1\n", "label", "line 3: missing value '' in column 'x'"),
        ("x,label\n1,0\nNaN,1\n", "label", "line 3: missing value 'NaN' in column 'x'"),
        ("x,label\n1,0\ninf,1\n", "label", "non-finite value 'inf'"),
        ("x,label\n1,1\n2,1\n3,1\n", "label", "has only one class"),
        ("x,label\n1,0\n2\n", "label", "line 3: 1 fields but the header has 2"),
        ("x,label\n1,a\n2,b\n", "label", None),
    ],
)
def test_bad_csv_is_rejected_with_file_line_and_column(tmp_path, content, target, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    if message is None:  # the control case: valid
        build(csv_cfg(str(path), target, val_fraction=0.5), seed=0)
        return
    with pytest.raises(UserError, match=message):
        build(csv_cfg(str(path), target), seed=0)


def test_explicit_binary_with_three_classes_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "label"], [[i, i % 3] for i in range(30)])
    with pytest.raises(UserError, match="data.task=binary but target 'label' .* has 3 classes"):
        build(csv_cfg(path, task="binary"), seed=0)


def test_global_batches_cover_each_row_once_per_epoch_and_split_over_ranks():
    gb = GlobalBatches(num_rows=103, batch_size=12, seed=5, device=torch.device("cpu"))
    assert gb.steps_per_epoch == 8
    for epoch in range(2):
        steps = range(epoch * 8, (epoch + 1) * 8)
        seen = torch.cat([gb.rows(s, 0, 1, 0, 1) for s in steps])
        assert len(set(seen.tolist())) == 96  # no row twice; the last partial batch is dropped
    assert not torch.equal(gb.order(0), gb.order(1))  # reshuffled every epoch
    # Any (world, accum) split of step s reads exactly the rows of the world-1 global batch.
    for world, accum in [(2, 1), (3, 2), (2, 3), (4, 3)]:
        for step in (0, 5, 9):
            parts = [gb.rows(step, m, accum, r, world) for m in range(accum) for r in range(world)]
            assert torch.equal(torch.cat(parts), gb.rows(step, 0, 1, 0, 1))


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(UserError, match="data.batch_size=500 is larger than the 400 training rows"):
        GlobalBatches(400, 500, 0, torch.device("cpu"))
