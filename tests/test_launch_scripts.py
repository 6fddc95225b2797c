"""Launching without SLURM: how many processes a node starts (launch/common.sh); launch/torchrun.sh
end to end (2 processes, extra arguments passed through, a crashed worker restarted by default
and resumed from its checkpoint to the single-process weights); the early override check and the
Hydra launcher groups (conf/hydra/launcher/slurm.yaml needs hydra-submitit-launcher)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from helpers import CONF, ROOT, clean_env, load_model, max_weight_diff, train

from gddist.cli import check_overrides
from gddist.config import UserError

LAUNCH = ROOT / "launch"


def nproc_per_node(tmp_path, gpus: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """`nproc_per_node` of launch/common.sh, with a fake nvidia-smi listing `gpus` GPUs (None:
    no nvidia-smi on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpus is not None:
        smi = bin_dir / "nvidia-smi"
        lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
        smi.write_text("#!/bin/sh\n" + lines)
        smi.chmod(0o755)
    drop = ("NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES")
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    base["PATH"] = f"{bin_dir}:/usr/bin:/bin"  # no real nvidia-smi
    return subprocess.run(
        ["bash", "-c", f"source {LAUNCH / 'common.sh'} && nproc_per_node"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "gpus, env, expected",
    [
        (None, {}, "1"),  # a CPU machine: one process
        (0, {}, "1"),  # nvidia-smi without GPUs
        (4, {}, "4"),  # all GPUs of the machine
        (4, {"CUDA_VISIBLE_DEVICES": "2,3"}, "2"),  # only the visible ones
        (4, {"CUDA_VISIBLE_DEVICES": ""}, "1"),  # none visible: CPU
        (8, {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, "2"),  # SLURM's count
        (4, {"NPROC_PER_NODE": "3"}, "3"),  # the user's choice wins
        (None, {"NPROC_PER_NODE": "2"}, "2"),  # several gloo processes on a CPU machine
    ],
)
def test_processes_per_node(tmp_path, gpus, env, expected):
    proc = nproc_per_node(tmp_path, gpus, **env)
    assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr


def test_bad_nproc_per_node_is_one_clear_line(tmp_path):
    proc = nproc_per_node(tmp_path, None, NPROC_PER_NODE="all")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: NPROC_PER_NODE=all is not a number of processes; set e.g. NPROC_PER_NODE=2"
    )


CRASH = [
    "model=custom",
    "model._target_=launch_models.CrashOnceNet",
    "trainer.max_steps=30",
    "trainer.eval_every=0",
    "checkpoint.every_steps=5",
]


@pytest.mark.slow
def test_torchrun_sh_restarts_a_crashed_worker_and_resumes_to_the_same_weights(tmp_path):
    """NPROC_PER_NODE=2 launch/torchrun.sh train.py ARGS: rank 0 dies at step 12; torchrun (with
    its default --max-restarts) restarts both workers, they resume from the step-10 checkpoint in
    the same run dir and end with the single-process weights."""
    marker = tmp_path / "crashed"
    train(tmp_path / "one", *CRASH)  # no marker: never crashes
    crash = [f"+model.marker={marker}", "+model.at_call=12"]
    proc = subprocess.run(
        [str(LAUNCH / "torchrun.sh"), str(ROOT / "train.py"), *CRASH, *crash],
        cwd=tmp_path,
        env=clean_env(PYTHON=sys.executable, NPROC_PER_NODE="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert marker.exists()  # the crash happened
    # The restarted workers found the same run dir (derived from the config) and resumed.
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000000010'}" in proc.stdout
    assert max_weight_diff(load_model(run_dir), load_model(tmp_path / "one")) < 1e-5


def test_hydra_groups_take_plugin_options_the_early_check_does_not_know():
    # conf/hydra/launcher/ holds only slurm.yaml; Hydra's own and plugins' launchers stay valid.
    check_overrides(["hydra/launcher=basic", "experiment=smoke"], CONF)


def test_slurm_launcher_without_its_plugin_is_one_clear_line(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if "submitit" in name else real_find_spec(name, *a),
    )
    with pytest.raises(UserError) as error:
        check_overrides(["-m", "hydra/launcher=slurm", "optimizer.lr=0.1,0.01"], CONF)
    assert str(error.value) == (
        "hydra/launcher=slurm needs the Hydra submitit launcher; "
        "pip install 'gddist[slurm]' (or hydra-submitit-launcher)"
    )
