"""Tier 3: what torchrun reports when a rank fails with an unexpected exception."""

import re

import pytest
from helpers import torchrun

pytestmark = pytest.mark.slow


def test_a_rank_that_raises_has_its_traceback_in_torchruns_failure_report(tmp_path):
    """train.py records the exception before Hydra turns it into SystemExit(1): torchrun's
    report names rank 1's error file (not <N/A>) and shows its exception and traceback."""
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
    report = proc.stderr.split("Root Cause (first observed failure):", 1)
    assert len(report) == 2, proc.stderr[-4000:]
    root = report[1]
    assert re.search(r"local_rank\s*: 1", root), root
    error_file = re.search(r"error_file: (\S+)", root).group(1)
    assert error_file != "<N/A>" and error_file.endswith("error.json"), root
    assert "RuntimeError: FaultyNet: forward pass 3 failed on purpose" in root
    assert "in forward" in root  # the traceback itself, from the error file
