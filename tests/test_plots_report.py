"""Run plots (at the end of a run and `python -m gddist.plot`) and sweep reports
(`python -m gddist.report`): valid PNGs, one report row per job with each job's own values."""

import json
import re

import pytest
import torch
from helpers import train
from PIL import Image

from gddist import plot, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(300, 200)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_a_run_ends_with_its_plots_and_the_cli_redraws_them(tmp_path, capsys):
    train(tmp_path, "trainer.max_steps=20", "trainer.log_every=5", "trainer.eval_every=10",
          "logger.plots=true")  # fmt: skip
    names = {"loss.png", "val_metrics.png", "lr.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    for name in names:
        assert_png(tmp_path / "plots" / name)
        (tmp_path / "plots" / name).unlink()
    assert plot.main([str(tmp_path)]) == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    assert "loss.png" in capsys.readouterr().out


def test_logger_plots_false_draws_nothing(tmp_path):
    train(tmp_path, "trainer.max_steps=5", "logger.plots=false")
    assert not (tmp_path / "plots").exists()


def test_plot_cli_rejects_a_dir_without_metrics(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_a_function_run_plots_its_path_on_the_contours(tmp_path):
    train(
        tmp_path,
        "model=function",
        "logger.plots=true",
        "optimizer=adam",
        "optimizer.lr=0.05",
        "trainer.max_steps=50",
        "trainer.log_every=1",
    )
    assert_png(tmp_path / "plots" / "path.png")


# ---------------------------------------------------------------------------- report


def write_job(root, num, overrides, summary, losses, batch_size=64, weights=None):
    """A Hydra multirun job dir as train.py leaves it (overrides, config, summary, metrics)."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text(
        f"seed: 0\ndata:\n  batch_size: {batch_size}\nmodel:\n  name: linear\n"
    )
    (job / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": s, "epoch": 0, "train/loss": v, "lr": 0.1} for s, v in losses]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if weights is not None:
        torch.save({"weight": torch.tensor([weights]), "bias": torch.zeros(1)}, job / "model.pt")


@pytest.fixture
def sweep(tmp_path):
    common = "experiment=demo"
    write_job(
        tmp_path, 0, ["optimizer.lr=0.01", common],
        {"step": 30, "train/loss": 0.40, "val/loss": 0.45, "val/accuracy": 0.70,
         "diverged": False, "wall_time_s": 1.25},
        [(10, 0.9), (20, 0.6), (30, 0.40)], weights=[0.5, 0.0005, -0.2, 0.0],
    )  # fmt: skip
    write_job(
        tmp_path, 1, ["optimizer.lr=0.1", common],
        {"step": 30, "train/loss": 0.31, "val/loss": 0.35, "val/accuracy": 0.80,
         "diverged": False, "wall_time_s": 1.5},
        [(10, 0.5), (20, 0.305), (30, 0.31)], weights=[0.5, 0.3, -0.2, 0.1],
    )  # fmt: skip
    write_job(
        tmp_path, 2, ["optimizer.lr=10", common],
        {"step": 10, "train/loss": 7.5, "diverged": True, "diverged_at_step": 16,
         "error": "diverged at step 16: loss=inf, lr=10", "wall_time_s": 0.2},
        [(10, 7.5)],
    )  # fmt: skip
    return tmp_path


def cells(markdown_text):
    """The table of a report as a list of {column: cell} dicts."""
    lines = [ln for ln in markdown_text.splitlines() if ln.startswith("|")]

    def split(line):  # on the pipes that are not escaped
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]

    header = split(lines[0])
    return [dict(zip(header, split(ln), strict=True)) for ln in lines[2:]]


def test_report_has_one_row_per_job_with_its_own_values(sweep):
    spec = report.ReportSpec(tolerance=0.01, sparsity_threshold=0.001, best=True)
    text = report.write_report(sweep, spec)
    table = cells(text)
    assert [row["optimizer.lr"] for row in table] == ["0.01", "0.1", "10"]  # the swept column
    assert "experiment" not in table[0]  # common to every job: listed above the table instead
    assert "Common overrides: `experiment=demo`" in text
    assert [row["train/loss"] for row in table] == ["0.4", "0.31", "7.5"]
    assert [row["val/accuracy"] for row in table] == ["0.7", "0.8", "-"]
    assert [row["steps"] for row in table] == ["30", "30", "10"]
    assert [row["samples"] for row in table] == ["1920", "1920", "640"]
    assert [row["diverged"] for row in table] == ["no", "no", "yes (step 16)"]
    assert [row["wall time (s)"] for row in table] == ["1.25", "1.5", "0.2"]
    # Target = best logged train/loss (0.305, job 1 at step 20) + 0.01 = 0.315.
    assert "optimum + 0.01 = 0.315" in text
    assert [row["steps to target"] for row in table] == ["-", "20", "-"]
    assert [row["samples to target"] for row in table] == ["-", "1280", "-"]
    assert [row["sparsity (abs(w) < 0.001)"] for row in table] == ["0.5", "0", "-"]
    assert [row["best"] for row in table] == ["", "✓", ""]  # lowest final loss, not diverged
    assert (sweep / "report.md").read_text() == text
    assert_png(sweep / "report.png")


def test_report_with_a_known_optimum_and_the_cli(sweep, capsys):
    assert report.main([str(sweep), "--optimum", "0.3", "--tolerance", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "optimum + 0.2 = 0.5; optimum: 0.3 (known minimum)" in out
    assert [row["steps to target"] for row in cells(out)] == ["30", "10", "-"]
    assert_png(sweep / "report.png")


def test_report_reads_its_options_from_the_sweeps_callback(sweep, capsys):
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  callbacks:\n    report:\n"
        "      _target_: gddist.hydra_callbacks.SweepReport\n"
        "      tolerance: 0.45\n      optimum: 0.0\n      labels: {optimizer.lr: lr}\n"
    )
    assert report.main([str(sweep)]) == 0
    table = cells(capsys.readouterr().out)
    assert [row["lr"] for row in table] == ["0.01", "0.1", "10"]
    assert [row["steps to target"] for row in table] == ["30", "20", "-"]


def test_report_of_a_dir_without_jobs_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no Hydra job dirs" in capsys.readouterr().err
