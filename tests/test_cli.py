"""Tier 4: `python train.py` as a user runs it: the default example, outputs, and one-line errors."""

import json
import re

import pytest
import torch
from helpers import check, cli, torchrun

pytestmark = pytest.mark.slow


def test_default_example_trains_and_writes_its_outputs(tmp_path):
    proc = check(cli(cwd=tmp_path))
    assert "val/accuracy" in proc.stdout + proc.stderr
    (summary_path,) = tmp_path.glob("outputs/*/summary.json")  # outputs/<label>-<identity hash>
    run_dir = summary_path.parent
    summary = json.loads(summary_path.read_text())
    assert summary["diverged"] is False and summary["val/accuracy"] > 0.65
    assert (run_dir / ".hydra" / "config.yaml").exists()
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["step"] == 240


def test_torchrun_without_a_run_dir_uses_one_dir_for_all_ranks(tmp_path):
    check(torchrun(2, "trainer.max_steps=10", "trainer.log_every=1", cwd=tmp_path))
    run_dirs = [p.parent for p in tmp_path.glob("outputs/**/summary.json")]
    assert len(run_dirs) == 1, run_dirs
    assert len(list(tmp_path.glob("outputs/**/.hydra"))) == 1
    rows = (run_dirs[0] / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if "train/loss" in r]) == 10  # rank 0 alone writes


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CSV_ERRORS = {
    "missing": (None, "data.path=.*missing.csv: file not found"),
    "empty": ("", "the file is empty"),
    "no_target": (
        "x,y\n1,0\n2,1\n",
        "data.target='label' is not a column of .*; columns are: x, y",
    ),
    "junk": ("x,label\n1,0\n2,1\nabc,0\n", "line 4: column 'x' has non-numeric value 'abc'"),
    "nan": ("x,label\n1,0\nnan,1\n3,0\n", "line 3: missing value 'nan' in column 'x'"),
    "one_class": ("x,label\n1,1\n2,1\n3,1\n", "target 'label' in .* has only one class"),
}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["optimizer=adamm"],
            "unknown optimizer option 'adamm'; choose one of: adagrad, adam, adamw, rmsprop, sgd",
        ),
        (
            ["scheduler=linear"],
            "unknown scheduler option 'linear'; choose one of: constant, cosine, plateau",
        ),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be a positive number"),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be a positive number"),
        (
            ["data.batch_size=30", "trainer.grad_accum_steps=4"],
            r"data.batch_size=30 does not divide by world_size \(1\) x trainer.grad_accum_steps \(4\) = 4",
        ),
        (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
    ]
    + [
        (["data=csv", f"+csv_case={case}", "data.target=label"], msg)
        for case, (_, msg) in CSV_ERRORS.items()
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, args, message):
    case = next((a.split("=")[1] for a in args if a.startswith("+csv_case=")), None)
    if case is not None:
        content, _ = CSV_ERRORS[case]
        path = (
            str(tmp_path / "missing.csv")
            if content is None
            else write(tmp_path, f"{case}.csv", content)
        )
        args = [a for a in args if not a.startswith("+csv_case")] + [f"data.path={path}"]
    proc = cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_divergence_exits_3_with_the_step_loss_and_lr(tmp_path):
    proc = cli(
        "model=mlp",
        "optimizer.lr=100",
        "optimizer.momentum=0.99",
        "trainer.max_steps=100",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 3
    assert "diverged at step" in proc.stdout + proc.stderr and "lr=100" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True
