"""docs/own-data.md as a user follows it: its files written as shown, its commands run as written
(from a folder holding train.py and conf/ like the repository root), its numbers checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, assert_bit_identical, clean_env, load_model, max_weight_diff

DOC = ROOT / "docs" / "own-data.md"
pytestmark = pytest.mark.slow


def doc_files() -> dict[str, str]:
    text = DOC.read_text()
    return dict(re.findall(r"`([\w/.]+)`:\n\n```(?:python|yaml)\n(.*?)```", text, re.S))


def doc_commands() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's checkout: train.py and conf/ as in the repository, plus the doc's files."""
    root = tmp_path_factory.mktemp("user")
    (root / "train.py").symlink_to(ROOT / "train.py")
    (root / "conf").symlink_to(ROOT / "conf")
    (root / "my_project").mkdir()
    (root / "my_project" / "__init__.py").write_text("")  # "an empty my_project/__init__.py"
    for path, text in doc_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = clean_env()
    env.pop("PYTHONPATH")  # the doc's commands set it themselves
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, torchrun
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def only_run_dir(root: Path, exclude: tuple[str, ...] = ()) -> Path:
    dirs = [d for d in (root / "outputs").iterdir() if d.name not in exclude]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_the_doc_shows_every_file_and_four_commands():
    files = doc_files()
    assert set(files) == {
        "my_project/digits.py",
        "my_project/nets.py",
        "my_project/fit_digits.py",
        "my_project/conf/data/digits.yaml",
        "my_project/conf/model/cnn.yaml",
    }
    assert len(doc_commands()) == 4


def test_the_doc_commands_train_as_it_says(project):
    one, two, inline, fit = doc_commands()
    run(one, project)
    first = only_run_dir(project)
    result = summary(first)
    assert result["step"] == 105  # "after 105 steps"
    assert result["val/accuracy"] == pytest.approx(0.89, abs=0.01)  # "val/accuracy 0.89"

    run(two, project)  # 2 processes under torchrun: the same weights within 1e-5
    second = project / "outputs" / "digits-2proc"
    assert max_weight_diff(load_model(first), load_model(second)) < 1e-5
    assert summary(second)["val/accuracy"] == pytest.approx(result["val/accuracy"], abs=1e-3)

    run(inline, project)  # the same nodes on the command line, val held out by the split
    third = only_run_dir(project, exclude=(first.name, "digits-2proc"))
    assert summary(third)["step"] == 50 and summary(third)["val/loss"] < 2.3

    out = run(fit, project).stdout  # gddist.fit: the first command's run, bit for bit
    assert f"val accuracy {result['val/accuracy']:.3f}" in out
    assert_bit_identical(load_model(first), load_model(project / "runs" / "cnn"))
    again = run(fit, project)  # a rerun finds the run complete
    assert "complete at step 105" in again.stderr
