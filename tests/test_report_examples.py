"""`python -m gddist.report --examples`: the application presets' table (gddist/examples/table.py),
and the README's copy of it."""

import importlib
import re

from helpers import ROOT

from gddist.examples import EXAMPLES, table


def test_a_preset_run_becomes_its_table_row_and_a_rerun_reuses_it(tmp_path):
    short = ["trainer.max_steps=20", "logger.plots=false"]
    first = table.run_preset("recommender", tmp_path, overrides=short)
    assert first["step"] == 20 and "baseline/global_mean_rmse" in first
    again = table.run_preset("recommender", tmp_path, overrides=short)  # complete: not retrained
    assert again["wall_time_s"] == first["wall_time_s"]
    row = table.row("recommender", first)
    assert "| `recommender` | val/rmse |" in row and "global mean 1.3" in row
    assert f"{first['val/rmse']:.4g}" in row


def test_the_readme_shows_the_table_with_one_row_per_preset():
    readme = (ROOT / "README.md").read_text()
    assert "python -m gddist.report --examples" in readme
    for name in EXAMPLES:
        spec = importlib.import_module(f"gddist.examples.{name}").REPORT
        line = re.search(rf"^\| [^|]+ \| `{name}` \| ([^|]+) \| ([^|]+) \|", readme, re.M)
        assert line, name
        assert line.group(1).strip() == spec["metric"]
        assert float(line.group(2))  # a measured number
        assert (ROOT / "docs" / "examples" / f"{name}.md").is_file()
