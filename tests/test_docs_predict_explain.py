"""docs/predict-and-explain.md as a user follows it: its commands run as written (from a folder
holding train.py and conf/, like the repository root), the outputs it shows checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, clean_env

DOC = ROOT / "docs" / "predict-and-explain.md"
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")
pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    fences = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M)
    return [body.strip() for kind, body in fences if kind == lang]


def run(command: str, cwd: Path) -> str:
    env = clean_env()
    env.pop("PYTHONPATH")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, torchrun
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-5000:]}"
    return proc.stdout


def assert_same_text(shown: str, got: str, tol: float) -> None:
    """The same text with every decimal number within `tol` (the shown ones were measured on
    one CPU; another's float reductions may differ in the last digits)."""
    assert NUMBER.sub("#", shown) == NUMBER.sub("#", got), f"shown:\n{shown}\ngot:\n{got}"
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(got), strict=True):
        assert abs(float(a) - float(b)) <= tol, (a, b)


def test_the_doc_commands_give_the_outputs_it_shows(tmp_path):
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    iris, short, many, purchase = blocks("bash")
    head, error, same, explained = blocks("")
    run(iris, tmp_path)
    predictions = (tmp_path / "iris_predictions.csv").read_text().splitlines()
    assert len(predictions) == 151
    assert_same_text(head, "\n".join(predictions[:4]), 1e-5)
    summary = json.loads((tmp_path / "outputs" / "iris" / "summary.json").read_text())
    assert summary["val/accuracy"] == pytest.approx(0.9667, abs=1e-4)  # "29 of its 30"
    out = run(short, tmp_path)
    assert [line for line in out.splitlines() if line] == error.splitlines()
    assert run(many, tmp_path).strip().endswith(same)
    got = [line for line in run(purchase, tmp_path).splitlines() if not line.startswith("[")]
    assert_same_text(explained, "\n".join(got), 2e-3)
    assert (tmp_path / "outputs" / "purchase" / "plots" / "importance.png").is_file()
