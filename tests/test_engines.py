"""Engines (ddp, accelerate), mixed precision, torch.compile and asynchronous checkpoints."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    check,
    clean_env,
    cli,
    cli_cmd,
    compose,
    load_model,
    max_weight_diff,
    rows,
    spawn,
    start,
    train,
    train_losses,
    wait_until,
)
from test_distributed import _fit_worker

from gddist.checkpoint import verify
from gddist.config import Config, UserError
from gddist.data import build as build_data
from gddist.dist import detect_launch, init, slurm_tasks_on_node
from gddist.engine import check_accelerate_world
from gddist.trainer import Trainer


@pytest.mark.slow
def test_ddp_and_accelerate_engines_give_the_same_losses_on_two_processes(tmp_path):
    args = [
        "model=mlp",
        "optimizer=adam",
        "trainer.max_steps=20",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.grad_accum_steps=2",
        "trainer.grad_clip_norm=0.5",
    ]
    ddp = spawn(_fit_worker, 2, tmp_path, tmp_path / "ddp", [*args, "engine=ddp"])
    acc = spawn(_fit_worker, 2, tmp_path, tmp_path / "acc", [*args, "engine=accelerate"])
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "acc")
    assert list(a) == list(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert max_weight_diff(ddp[0]["state"], acc[0]["state"]) < 1e-5
    assert acc[0]["allreduces"] == 20  # one gradient all-reduce per optimizer step, as with ddp


TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _srun_accelerate_worker(rank, init_method, run_dir, overrides):
    """A process as srun starts it (SLURM_* variables only), training with engine=accelerate."""
    for key in TORCHRUN_VARS:
        os.environ.pop(key, None)
    os.environ.update(
        SLURM_STEP_ID="0",
        SLURM_JOB_ID="7",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_TASKS_PER_NODE="2",
    )
    cfg = Config.from_dict(compose(*overrides))
    cfg.dist.init_method = init_method
    launch = detect_launch()
    dist = init(cfg.dist, launch)
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # What Accelerate makes of this process on its own: a world of one. The guard refuses it.
        AcceleratorState._reset_state(True)
        try:
            check_accelerate_world(Accelerator(cpu=True), dist)
            refused = None
        except UserError as e:
            refused = str(e)
        trainer = Trainer(cfg, build_data(cfg.data, cfg.seed), dist, run_dir)
        acc = trainer.engine.accelerator
        trainer.fit()
        return {
            "launch": launch,
            "seen": (acc.process_index, acc.num_processes, acc.local_process_index),
            "refused": refused,
            "rank_env_after": os.environ.get("RANK"),  # restored: the launcher is still srun
            "state": {k: v.clone() for k, v in trainer.engine.module.state_dict().items()},
        }
    finally:
        dist.close()


@pytest.mark.slow
def test_accelerate_engine_under_srun_variables_sees_both_ranks_and_trains_like_one_process(
    tmp_path,
):
    """With only SLURM_* variables (srun, submitit), Accelerate is shown gddist's launch: it sees
    2 processes and syncs gradients, so the weights are those of one process on the whole batch."""
    args = ["engine=accelerate", "model=mlp", "trainer.max_steps=20", "trainer.eval_every=0"]
    ranks = spawn(_srun_accelerate_worker, 2, tmp_path, tmp_path / "two", args)
    train(tmp_path / "one", *args)
    for rank, out in enumerate(ranks):
        assert out["launch"].launcher == "slurm" and out["launch"].local_world_size == 2
        assert out["seen"] == (rank, 2, rank)
        assert out["rank_env_after"] is None
        assert out["refused"] == (
            f"engine=accelerate: Accelerate sees process 0 of 1, but the launcher (slurm) started "
            f"rank {rank} of 2; unset ACCELERATE_* variables that disagree with the launch, "
            "or use engine=ddp"
        )
    assert max_weight_diff(ranks[0]["state"], load_model(tmp_path / "one")) < 1e-5
    assert max_weight_diff(ranks[0]["state"], ranks[1]["state"]) == 0


@pytest.mark.parametrize(
    "env, tasks",
    [
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
        ({"SLURM_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4),
        ({}, None),  # unknown: not exported to Accelerate
    ],
)
def test_srun_tasks_on_this_node_come_from_slurms_compressed_counts(env, tasks):
    """LOCAL_WORLD_SIZE as Accelerate is shown it under srun."""
    assert slurm_tasks_on_node(env) == tasks


@pytest.mark.slow
def test_accelerate_launch_runs_train_py(tmp_path):
    args = [
        "engine=accelerate",
        "model=mlp",
        "trainer.max_steps=15",
        "trainer.log_every=1",
        "trainer.eval_every=0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        str(ROOT / "train.py"),
        *args,
        f"hydra.run.dir={tmp_path / 'launched'}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240
    )
    check(proc)
    train(tmp_path / "one", *args)  # the same config in one process: the same optimization
    a, b = train_losses(tmp_path / "launched"), train_losses(tmp_path / "one")
    assert max(abs(a[s] - b[s]) for s in b) < 1e-5
    config = (tmp_path / "launched" / ".hydra" / "config.yaml").read_text()
    assert "name: accelerate" in config


def test_bf16_on_cpu_trains_checkpoints_and_resumes_exactly(tmp_path):
    args = [
        "model=mlp",
        "trainer.precision=bf16",
        "trainer.max_steps=40",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "checkpoint.every_steps=20",
    ]
    summary = train(tmp_path / "full", *args)
    losses = [r["train/loss"] for r in rows(tmp_path / "full") if "train/loss" in r]
    assert summary["train/loss"] < losses[0]
    # Resume from the step-20 checkpoint of that run into a new run dir: same final weights.
    ckpt = tmp_path / "full" / "checkpoints" / "step_000000020"
    verify(ckpt)
    train(tmp_path / "resumed", *args, f"checkpoint.resume={ckpt}")
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16 differs from fp32 (autocast really ran) but trains the same problem.
    train(tmp_path / "fp32", *args[:1], *args[2:])
    assert 0 < max_weight_diff(a, load_model(tmp_path / "fp32")) < 0.05


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path):
    proc = cli("trainer.precision=fp16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: trainer.precision=fp16 needs a CUDA device (fp16 autocast with a GradScaler); "
        "use trainer.precision=bf16 on CPU"
    )


def test_compile_trains_and_keeps_plain_checkpoint_keys(tmp_path):
    args = [
        "model=mlp",
        "trainer.max_steps=10",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "checkpoint.every_steps=5",
    ]
    # aot_eager: the full dynamo + autograd tracing path without inductor's C++ build (minutes on CPU)
    train(tmp_path / "compiled", *args, "trainer.compile=true", "trainer.compile_backend=aot_eager")
    train(tmp_path / "eager", *args)
    compiled = load_model(tmp_path / "compiled")
    assert set(compiled) == set(load_model(tmp_path / "eager"))
    assert not any("_orig_mod" in k or k.startswith("module.") for k in compiled)
    state = torch.load(
        tmp_path / "compiled" / "checkpoints" / "step_000000005" / "state.pt", weights_only=True
    )
    assert not any("_orig_mod" in k for k in state["model"])
    assert max_weight_diff(compiled, load_model(tmp_path / "eager")) < 1e-5


ASYNC = [
    "model=mlp",
    "model.hidden_sizes=[1024,1024]",
    "optimizer=adam",
    "trainer.max_steps=100",
    "trainer.eval_every=0",
    "trainer.log_every=10",
    "checkpoint.every_steps=20",
    "checkpoint.async=true",
]


def test_async_checkpoints_are_complete_and_resume_bit_identical(tmp_path):
    train(tmp_path / "a", *ASYNC)
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000000060", "step_000000080", "step_000000100"]
    for path in ckpts:
        verify(path)
    assert not list((tmp_path / "a" / "checkpoints").glob(".tmp-*"))
    train(tmp_path / "b", *ASYNC, f"checkpoint.resume={ckpts[0]}")
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "b"
    ckpts = run_dir / "checkpoints"
    proc = start(cli_cmd(*ASYNC, "trainer.max_steps=400", f"hydra.run.dir={run_dir}"))
    in_write = lambda: any(ckpts.glob("step_*")) and any(ckpts.glob(".tmp-step_*"))  # noqa: E731
    wait_until(in_write, 120, "a background checkpoint write after the first one", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    complete = sorted(ckpts.glob("step_*"))
    assert complete
    for path in complete:
        verify(path)
    check(cli(*ASYNC, "trainer.max_steps=400", f"hydra.run.dir={run_dir}"))
    train(tmp_path / "a", *ASYNC, "trainer.max_steps=400")
    a, b = load_model(tmp_path / "a"), load_model(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
