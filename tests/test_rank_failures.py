"""How a failing rank is reported: its traceback in torchrun's failure report (tier 3), and which
collective errors count as another rank's failure (exit code 4) and which NCCL settings make an
NCCL failure one (tier 1; the NCCL runs themselves are in tests/test_gpu.py)."""

import re

import pytest
import torch.distributed as tdist
from helpers import torchrun

from gddist.dist import is_peer_failure, nccl_error_handling


@pytest.mark.slow
def test_a_rank_that_raises_has_its_traceback_in_torchruns_failure_report(tmp_path):
    """train.py records the exception before Hydra turns it into SystemExit(1): torchrun's
    failure report names rank 1's error file (not <N/A>) and shows its exception and traceback."""
    proc = torchrun(
        2,
        "model=custom",
        "model._target_=models_for_tests.FaultyNet",
        "+model.fault=raise",
        "+model.at_call=3",
        "trainer.max_steps=20",
        "trainer.eval_every=0",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode != 0
    assert "train.py FAILED" in proc.stderr, proc.stderr[-4000:]
    # One entry per failed rank ("[i]:" ... up to the next rule). Rank 1 is usually the root
    # cause, but torchrun orders failures by whole seconds (rank 0, stopped next, may tie): find
    # rank 1's entry wherever it is.
    entries = re.split(r"\n\[\d+\]:\n", proc.stderr.split("train.py FAILED", 1)[1])
    (rank1,) = [e for e in entries if re.search(r"\(local_rank: 1\)", e)]
    error_file = re.search(r"error_file: (\S+)", rank1).group(1)
    assert error_file != "<N/A>" and error_file.endswith("error.json"), rank1
    assert "RuntimeError: FaultyNet: forward pass 3 failed on purpose" in rank1
    assert "in forward" in rank1  # the traceback itself, read from the error file


@pytest.mark.parametrize(
    "error, peer",
    [
        (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
        (tdist.DistBackendError("[Rank 0] Watchdog caught collective operation timeout"), True),
        # After the watchdog aborted the communicators (TORCH_NCCL_ASYNC_ERROR_HANDLING=2), the
        # next collective raises this; through DDP's reducer it may arrive as a RuntimeError.
        (RuntimeError("NCCL communicator was aborted on rank 0. Original reason: timeout"), True),
        (RuntimeError("NCCL error: remote process exited (ncclRemoteError)"), True),
        # This process's own NCCL misuse is no peer's fault: it keeps its traceback.
        (
            tdist.DistBackendError(
                "ncclInvalidUsage: Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 0"
            ),
            False,
        ),
        (RuntimeError("CUDA out of memory"), False),
    ],
)
def test_which_collective_errors_are_peer_failures(error, peer):
    assert is_peer_failure(error) is peer


@pytest.mark.parametrize(
    "env, mode",
    [
        ({}, "2"),
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "2"),  # torchrun's default: tear down -> raise
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}, "2"),
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}, "0"),  # explicitly off: the user's choice
        ({"TORCH_NCCL_BLOCKING_WAIT": "1"}, None),  # blocking wait raises by itself
    ],
)
def test_nccl_watchdog_aborts_communicators_instead_of_killing_the_process(env, mode):
    nccl_error_handling(env)
    assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == mode
