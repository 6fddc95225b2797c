"""GPU checks (marker `gpu`): what the CPU suite cannot prove, on one CUDA machine.

Run them with `bash launch/gpu_checks.sh` (a venv over the machine's CUDA torch, a results table),
or `python -m pytest -o addopts= -m gpu tests/test_gpu.py`. Without CUDA every test here skips
with the reason: these are the only tests of the suite that skip for lack of hardware. The
two-process NCCL checks need two GPUs (NCCL refuses two ranks on one device: "Duplicate GPU
detected") and skip with that reason on a one-GPU machine.

Determinism: gddist has no config key for it. These tests switch on
`torch.use_deterministic_algorithms(True, warn_only=True)` in this process (warn_only: an op
without a deterministic CUDA kernel warns instead of failing the run; the bit-identity asserts
prove the result) and need `CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment before CUDA starts
(launch/gpu_checks.sh exports it; set below when absent). A user does the same: export the
variable and call `torch.use_deterministic_algorithms(True)` before `gddist.run`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import (
    check,
    cli_cmd,
    compose,
    kill_all,
    load_model,
    max_weight_diff,
    start,
    torchrun,
    train,
    train_losses,
)

from gddist.checkpoint import verify
from gddist.config import Config
from gddist.data import build as build_data
from gddist.dist import LaunchEnv, init
from gddist.trainer import Trainer

# Read when the first cuBLAS handle is made (this module's first CUDA matmul); the script exports it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (run launch/gpu_checks.sh on a GPU machine)",
    ),
]
two_gpus = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="needs 2 GPUs: NCCL refuses two ranks on one device",
)

CUDA = ["dist.device=cuda"]
BASE = ["model=mlp", "optimizer=adam", "trainer.max_steps=40", "trainer.log_every=1"]
BASE += ["trainer.eval_every=20", "checkpoint.every_steps=20", *CUDA]


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    """For the whole module, so that module fixtures (the fp32 reference run) train under it too."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def trainer_for(run_dir: Path, *overrides: str) -> Trainer:
    """A single-process Trainer on the real conf/, for checks that look inside the run."""
    raw = compose(*overrides)
    raw["logger"]["plots"] = False
    cfg = Config.from_dict(raw)
    return Trainer(cfg, build_data(cfg.data, cfg.seed), init(cfg.dist, LaunchEnv("none")), run_dir)


def assert_resumes_bit_identical(tmp_path: Path, full: Path, *args: str, step: int = 20) -> None:
    """Resuming `full`'s step-`step` checkpoint into a new run dir ends with its exact weights."""
    ckpt = full / "checkpoints" / f"step_{step:09d}"
    verify(ckpt)
    train(tmp_path / "resumed", *args, f"checkpoint.resume={ckpt}")
    a, b = load_model(full), load_model(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """The fp32 run of BASE: its summary and final weights."""
    run_dir = tmp_path_factory.mktemp("fp32")
    return train(run_dir, *BASE), load_model(run_dir)


@pytest.mark.parametrize(
    "precision, engine",
    [("fp32", "ddp"), ("bf16", "ddp"), ("fp16", "ddp"), ("fp16", "accelerate")],
)
def test_precision_trains_and_resumes_bit_identical(tmp_path, fp32_run, precision, engine):
    args = [*BASE, f"trainer.precision={precision}", f"engine={engine}"]
    summary = train(tmp_path / "full", *args)
    losses = train_losses(tmp_path / "full")
    assert summary["train/loss"] < losses[1] and not summary["diverged"]
    reference, fp32_weights = fp32_run
    diff = max_weight_diff(load_model(tmp_path / "full"), fp32_weights)
    if precision == "fp32":
        assert diff == 0.0  # the same command twice on this GPU: the same weights, bit for bit
    else:  # autocast really ran (other weights), on the same problem (about the same loss)
        assert diff > 0
        assert abs(summary["train/loss"] - reference["train/loss"]) < 0.05 * reference["train/loss"]
    if precision == "fp16":  # the GradScaler's state travels with the checkpoint
        state = torch.load(
            tmp_path / "full" / "checkpoints" / "step_000000020" / "state.pt", weights_only=True
        )
        assert state["engine"]["scaler"]["scale"] > 0
    assert_resumes_bit_identical(tmp_path, tmp_path / "full", *args)


ASYNC = ["model=mlp", "model.hidden_sizes=[1024,1024]", "optimizer=adam"]
ASYNC += ["trainer.max_steps=100", "trainer.eval_every=0", "trainer.log_every=10"]
ASYNC += ["checkpoint.every_steps=20", "checkpoint.async=true", *CUDA]


def test_async_checkpoints_stage_in_pinned_memory_and_resume_bit_identical(tmp_path):
    trainer = trainer_for(tmp_path / "a", *ASYNC)
    trainer.fit()
    staged = list(trainer.checkpointer._staging._buffers.values())
    cuda_buffers = [buf for key, buf in staged if key[-1]]  # staged from CUDA tensors
    assert cuda_buffers and all(buf.is_pinned() for buf in cuda_buffers)
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000000060", "step_000000080", "step_000000100"]
    for path in ckpts:
        verify(path)
    assert_resumes_bit_identical(tmp_path, tmp_path / "a", *ASYNC, step=60)


def test_dataloader_with_pinned_memory_trains_bit_identically_to_in_memory_batches(tmp_path):
    args = ["model=mlp", "optimizer=adam", "trainer.max_steps=30", "trainer.eval_every=10"]
    args += ["trainer.log_every=1", *CUDA]
    trainer = trainer_for(tmp_path / "dl", *args, "data.loader=dataloader", "data.num_workers=2")
    assert type(trainer.feed).__name__ == "WorkerFeed" and trainer.feed._options["pin_memory"]
    trainer.fit()
    train(tmp_path / "mem", *args, "data.loader=memory")
    assert train_losses(tmp_path / "mem") == train_losses(tmp_path / "dl")
    assert max_weight_diff(load_model(tmp_path / "mem"), load_model(tmp_path / "dl")) == 0.0


def test_compile_with_inductor_trains_like_eager_and_keeps_plain_keys(tmp_path):
    args = ["model=mlp", "trainer.max_steps=20", "trainer.eval_every=0", *CUDA]
    train(tmp_path / "compiled", *args, "trainer.compile=true")  # inductor: Triton kernels
    train(tmp_path / "eager", *args)
    compiled, eager = load_model(tmp_path / "compiled"), load_model(tmp_path / "eager")
    assert set(compiled) == set(eager)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in compiled)
    assert max_weight_diff(compiled, eager) < 1e-4  # fused kernels round differently


TORCHRUN = ["model=mlp", "trainer.max_steps=30", "trainer.eval_every=0", "dist.backend=nccl"]
TORCHRUN += CUDA


def test_torchrun_one_process_with_nccl_backend_trains_like_a_plain_run(tmp_path):
    """The user's command on one GPU. A world of one joins no process group (no collective to
    run), so this proves the launch path and the device; NCCL collectives need the 2-GPU tests."""
    check(torchrun(1, *TORCHRUN, f"hydra.run.dir={tmp_path / 'torchrun'}"))
    train(tmp_path / "plain", *TORCHRUN)
    assert max_weight_diff(load_model(tmp_path / "torchrun"), load_model(tmp_path / "plain")) < 1e-5


@two_gpus
def test_torchrun_two_gpus_with_nccl_trains_like_one_process(tmp_path):
    check(torchrun(2, *TORCHRUN, f"hydra.run.dir={tmp_path / 'two'}"))
    train(tmp_path / "one", *TORCHRUN)
    assert max_weight_diff(load_model(tmp_path / "two"), load_model(tmp_path / "one")) < 1e-5


@two_gpus
@pytest.mark.parametrize("fault", ["hang", "die"])
def test_nccl_peer_that_hangs_or_dies_ends_the_other_with_exit_code_4(tmp_path, fault):
    """NCCL's watchdog would kill rank 0 (SIGABRT, no message); gddist has it abort the
    communicators instead, so rank 0 reports the peer in one line and exits 4. Recent torch
    waits 4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC (15 s) for a flight-recorder dump before the
    abort; 1 s here keeps the test short (a user's run just exits a minute later)."""
    args = ["model=custom", "model._target_=models_for_tests.FaultyNet", f"+model.fault={fault}"]
    args += ["trainer.max_steps=50", "dist.timeout_s=10", "dist.backend=nccl", *CUDA]
    args += [f"dist.init_method=file://{tmp_path}/store", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"WORLD_SIZE": "2", "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000"}
    procs = [start(cli_cmd(*args), RANK=str(r), LOCAL_RANK=str(r), **env) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=150)  # NCCL init, 10 s timeout, 4 s dump wait
        assert procs[0].returncode == 4, out[-4000:]
        assert "error: rank 0: rank(s) 1 died or did not answer within dist.timeout_s=10s" in out
        assert "Traceback" not in out
    finally:
        kill_all(procs)
