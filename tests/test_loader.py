"""The DataLoader path (data.loader=dataloader, data=npy): memory-mapped data read by worker
processes trains exactly like in-memory data, keeps the exact-resume position, survives stop
signals sent to the whole process group, and rejects bad files in one line."""

import json
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    check,
    children,
    cli,
    cli_cmd,
    compose,
    last_step,
    load_model,
    max_weight_diff,
    rows,
    spawn,
    start,
    train,
    train_losses,
    wait_until,
)

from gddist.config import Config, DataConfig, UserError
from gddist.data import build as build_data
from gddist.data import make_purchase
from gddist.data.npy import NpyData
from gddist.dist import detect_launch, init
from gddist.trainer import Trainer


def write_npy(root, n=1000, seed=0, features=None, target=None):
    """The purchase problem's raw rows as DIR/features.npy + DIR/target.npy."""
    columns, labels = make_purchase(n, seed)
    root.mkdir(parents=True, exist_ok=True)
    x = (
        np.stack([np.asarray(v) for v in columns.values()], axis=1)
        if features is None
        else features
    )
    y = np.asarray(labels, dtype=np.int64) if target is None else target
    np.save(root / "features.npy", x)
    np.save(root / "target.npy", y)
    return root


@pytest.fixture(scope="module")
def npy_dir(tmp_path_factory):
    return write_npy(tmp_path_factory.mktemp("npy") / "purchase")


# ----------------------------------------------------------------------------- reading


def test_npy_serves_the_purchase_rows_standardized_like_in_memory_data(npy_dir):
    disk = NpyData.open(str(npy_dir), "auto", 0.2, seed=0)
    mem = build_data(DataConfig(), seed=0)  # the same rows, generated in memory
    assert (disk.task, disk.num_outputs, disk.num_features) == ("binary", 1, 3)
    assert (disk.num_rows("train"), disk.num_rows("val")) == (800, 200)
    full = disk.materialize()
    assert torch.allclose(full.x_train, mem.x_train, atol=1e-6)
    assert torch.equal(full.y_train, mem.y_train) and torch.equal(full.y_val, mem.y_val)
    # Batched reads of any rows equal the same rows of the materialized tensors, bit for bit.
    rows = torch.tensor([5, 799, 0, 17, 17])
    x, y = disk.read("train", rows)
    assert torch.equal(x, full.x_train[rows]) and torch.equal(y, full.y_train[rows])
    x, y = disk.read("val", slice(190, 200))
    assert torch.equal(x, full.x_val[190:]) and torch.equal(y, full.y_val[190:])
    # The preprocessing saved with a model maps raw columns to the same inputs.
    raw = np.load(npy_dir / "features.npy")[disk.val_rows[:4]]
    cols = {f"x{j}": raw[:, j].tolist() for j in range(3)}
    assert torch.allclose(disk.preprocessing.transform(cols), full.x_val[:4], atol=1e-6)


def test_npy_statistics_are_exact_over_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("gddist.data.npy.CHUNK_ROWS", 7)  # 143 chunks, most of them mixed
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 3.0, size=(1000, 4))
    write_npy(tmp_path / "d", features=x, target=rng.normal(size=1000))
    disk = NpyData.open(str(tmp_path / "d"), "auto", 0.2, seed=1)
    train = x[disk.train_rows]
    assert np.allclose(disk.mean, train.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(disk.std, train.std(0), rtol=1e-12)
    assert disk.task == "regression"
    # Integer targets: few distinct values are classes, many (as for counts) are regression.
    write_npy(tmp_path / "k", features=x, target=np.arange(1000) % 3)
    assert NpyData.open(str(tmp_path / "k"), "auto", 0.2, seed=1).task == "multiclass"
    write_npy(tmp_path / "c", features=np.zeros((1200, 1)), target=np.arange(1200) * 7)
    assert NpyData.open(str(tmp_path / "c"), "auto", 0.2, seed=1).task == "regression"
    with pytest.raises(UserError, match="has 1001 classes"):  # capped: the first 1001 count
        NpyData.open(str(tmp_path / "c"), "multiclass", 0.2, seed=1)


def test_npy_pickles_without_its_memory_maps(npy_dir):
    disk = NpyData.open(str(npy_dir), "auto", 0.2, seed=0)
    rows = torch.arange(10)
    before = disk.read("train", rows)  # maps the files
    blob = pickle.dumps(disk)
    # The index arrays (8 bytes a row) travel, the 24 kB of features do not.
    assert len(blob) < 1000 * 8 + 4000
    again = pickle.loads(blob)
    assert all(torch.equal(a, b) for a, b in zip(before, again.read("train", rows), strict=True))


def bad(tmp_path, features, target=None):
    write_npy(tmp_path / "d", features=features, target=target)
    return str(tmp_path / "d")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"data.path=\S+: no features.npy there; data=npy needs a directory"),
        ("3d", r"features.npy: shape \(10, 2, 2\); it must be 2-D"),
        ("short", r"target.npy: shape \(9,\); it must hold one value per row of features.npy"),
        ("nan", r"features.npy row 7 column 1: non-finite value nan; fix or drop that row"),
        ("text", r"features.npy: dtype <U1 is not numeric"),
        ("pickled", r"features.npy: not a readable .npy array .*write it with numpy.save"),
        ("one_class", r"has only one class"),
    ],
)
def test_bad_npy_input_is_one_line_naming_file_and_fix(tmp_path, case, message):
    x = np.arange(20.0).reshape(10, 2)
    y = np.arange(10) % 2
    if case == "missing":
        path = str(tmp_path / "nowhere")
    elif case == "3d":
        path = bad(tmp_path, np.zeros((10, 2, 2)), y)
    elif case == "short":
        path = bad(tmp_path, x, y[:9])
    elif case == "nan":
        x[7, 1] = np.nan
        path = bad(tmp_path, x, y)
    elif case == "text":
        path = bad(tmp_path, np.array([["a", "b"]] * 10), y)
    elif case == "pickled":
        path = bad(tmp_path, np.array([[{}, 1]] * 10, dtype=object), y)
    else:
        path = bad(tmp_path, x, np.zeros(10, dtype=np.int64))
    with pytest.raises(UserError, match=message) as e:
        NpyData.open(path, "auto", 0.2, seed=0)
    assert "\n" not in str(e.value)
    # The CLI says the same in one line, exit 2, before training.
    if case == "nan":
        proc = cli("data=npy", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
        assert proc.returncode == 2 and "row 7 column 1" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- training

MLP = ["model=mlp", "model.dropout=0.1", "optimizer=adam", "trainer.max_steps=30",
       "trainer.log_every=1", "trainer.eval_every=10", "trainer.grad_accum_steps=2"]  # fmt: skip


@pytest.mark.parametrize("data", [[], "npy"])
def test_worker_processes_train_bit_identically_to_in_memory_batches(tmp_path, npy_dir, data):
    data = ["data=npy", f"data.path={npy_dir}"] if data == "npy" else []
    train(tmp_path / "mem", *MLP, *data, "data.loader=memory")
    summary = train(tmp_path / "dl", *MLP, *data, "data.loader=dataloader", "data.num_workers=2")
    assert train_losses(tmp_path / "mem") == train_losses(tmp_path / "dl")
    assert max_weight_diff(load_model(tmp_path / "mem"), load_model(tmp_path / "dl")) == 0.0
    evals = lambda d: [r for r in rows(d) if "val/loss" in r]  # noqa: E731
    assert evals(tmp_path / "mem") == evals(tmp_path / "dl")
    assert summary["val/accuracy"] > 0.6


def test_in_process_feed_without_workers_matches_too(tmp_path, npy_dir):
    """num_workers=0: the DataLoader reads in the training process (no fork), same batches."""
    data = ["data=npy", f"data.path={npy_dir}"]
    train(tmp_path / "mem", *MLP, *data, "data.loader=memory", "trainer.max_steps=10")
    train(tmp_path / "w0", *MLP, *data, "data.num_workers=0", "trainer.max_steps=10")
    assert max_weight_diff(load_model(tmp_path / "mem"), load_model(tmp_path / "w0")) == 0.0


def _two_ranks(rank, init_method, run_dir, overrides):
    cfg = Config.from_dict(compose(*overrides))
    cfg.dist.init_method = init_method
    cfg.logger.plots = False
    data = build_data(cfg.data, cfg.seed)
    dist = init(cfg.dist, detect_launch())
    try:
        trainer = Trainer(cfg, data, dist, run_dir)
        summary = trainer.fit()
        return {"summary": summary, "state": dict(trainer.engine.module.state_dict())}
    finally:
        dist.close()


@pytest.mark.slow
def test_two_ranks_with_workers_equal_one_process_in_memory(tmp_path, npy_dir):
    args = [*MLP, "model.dropout=0.0", "data=npy", f"data.path={npy_dir}"]
    one = train(tmp_path / "one", *args, "data.loader=memory")
    two = spawn(_two_ranks, 2, tmp_path, tmp_path / "two", [*args, "data.num_workers=1"])
    assert abs(one["train/loss"] - two[0]["summary"]["train/loss"]) < 1e-5
    assert abs(one["val/loss"] - two[0]["summary"]["val/loss"]) < 1e-5
    assert max_weight_diff(load_model(tmp_path / "one"), two[1]["state"]) < 1e-5


@pytest.mark.slow
def test_stop_signals_to_the_process_group_and_kills_resume_bit_identical(tmp_path, npy_dir):
    """Ctrl-C reaches the workers too (one process group): they ignore it and the trainer stops
    gracefully (exit 130, a checkpoint at the stop step). SIGKILL of the trainer: its workers
    exit with it. Each rerun resumes at the saved step; the result equals an uninterrupted run."""
    args = ["data=npy", f"data.path={npy_dir}", "model=mlp", "model.dropout=0.1",
            "trainer.max_steps=200", "trainer.log_every=1", "trainer.eval_every=50",
            "checkpoint.every_steps=35", "data.num_workers=2"]  # fmt: skip
    train(tmp_path / "a", *args)
    run = [*args, f"hydra.run.dir={tmp_path / 'b'}"]

    proc = start(cli_cmd(*run))
    wait_until(lambda: last_step(tmp_path / "b") >= 20, 120, "step 20", proc)
    assert len(children(proc.pid)) == 2
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    stopped = json.loads((tmp_path / "b" / "summary.json").read_text())["step"]
    assert (tmp_path / "b" / "checkpoints" / f"step_{stopped:09d}").is_dir()

    proc = start(cli_cmd(*run))
    wait_until(lambda: last_step(tmp_path / "b") >= 120, 120, "step 120", proc)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20  # a worker notices its parent is gone within seconds
    while any(os.path.exists(f"/proc/{w}") and _alive(w) for w in workers):
        assert time.monotonic() < deadline, "DataLoader workers outlived their killed trainer"
        time.sleep(0.1)

    again = check(cli(*run))
    assert "resumed from" in again.stdout + again.stderr
    assert max_weight_diff(load_model(tmp_path / "a"), load_model(tmp_path / "b")) == 0.0
    losses = lambda d: [(r["step"], r["train/loss"]) for r in rows(d) if "train/loss" in r]  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert stopped < 120


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
