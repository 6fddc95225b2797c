"""The application presets without a torchrun test of their own (forecasting, healthcare) under
`torchrun --standalone --nproc_per_node=2`, shortened: the weights of 1 process within 1e-5."""

import subprocess

import pytest
from helpers import clean_env, cli_cmd, load_model, max_weight_diff, torchrun_cmd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["forecasting", "healthcare"])
def test_two_processes_train_the_weights_of_one(tmp_path, preset):
    short = [f"experiment={preset}", "trainer.max_steps=40", "logger.plots=false"]
    env = clean_env(GDDIST_CACHE_DIR=str(tmp_path / "cache"))  # healthcare's CSV
    for name, cmd in (("one", cli_cmd), ("two", lambda *a: torchrun_cmd(2, *a))):
        proc = subprocess.run(
            cmd(*short, f"hydra.run.dir={tmp_path / name}"),
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_weight_diff(load_model(tmp_path / "one"), load_model(tmp_path / "two")) < 1e-5
