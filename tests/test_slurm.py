"""Tier 4 on a real SLURM: the launch scripts end to end, on a single-node cluster this module
starts (tests/slurm_cluster.py). Each job runs 2 gloo processes and must end with the weights of a
plain single-process run (within 1e-5): launch/slurm.sbatch (torchrun per node, c10d rendezvous),
launch/slurm_srun.sbatch (one task per process; engine=ddp and engine=accelerate); a job sent
SIGUSR1 must checkpoint, requeue itself, resume and end with those weights too (and the signal
must reach every training process, whichever script and whichever way SLURM delivers it); a
multirun sweep with hydra/launcher=slurm must go out as SLURM jobs.

Skipped (with the reason) where SLURM is not installed or we are not root; under CI=true that is a
failure instead, since CI installs the packages (.ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, clean_env, last_step, load_model, max_weight_diff, train
from slurm_cluster import SlurmCluster, prerequisites_missing, require_or_skip

from gddist.dist import slurm_port

pytestmark = pytest.mark.slow

MAX_STEPS = 30
ARGS = ["model=mlp", f"trainer.max_steps={MAX_STEPS}", "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_or_skip(prerequisites_missing())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of the plain single-process run of ARGS."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(run_dir, *ARGS)
    return load_model(run_dir)


def job_env(slurm: SlurmCluster, **extra: str) -> dict[str, str]:
    """What sbatch exports to the job: the venv's python, tests/ on PYTHONPATH, no launcher vars."""
    return slurm.env(clean_env(PYTHON=sys.executable, **extra))


def submit(slurm, tmp_path, script: str, *args: str, sbatch_args=(), **env: str) -> int:
    """sbatch from the checkout (as a user does), running in tmp_path (--chdir)."""
    return slurm.sbatch(
        f"--chdir={tmp_path}",
        *sbatch_args,
        str(ROOT / "launch" / script),
        *args,
        env=job_env(slurm, **env),
        cwd=ROOT,
    )


def run_dir_of(tmp_path: Path, job: int, step: str = "0") -> Path:
    """outputs/slurm-<job>.<step>-<config hash>: the run dir gddist derives in job step `step`
    (a job's first srun is step 0, also after a requeue); a path that does not exist (yet) when
    there is none."""
    found = sorted((tmp_path / "outputs").glob(f"slurm-{job}.{step}-*"))
    assert len(found) <= 1, found
    return found[0] if found else tmp_path / "outputs" / f"slurm-{job}.{step}-none"


def world_size_of_last_checkpoint(run_dir: Path) -> int:
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return json.loads((newest / "manifest.json").read_text())["world_size"]


def test_sbatch_torchrun_per_node_trains_like_one_process(slurm, reference, tmp_path):
    job = submit(slurm, tmp_path, "slurm.sbatch", *ARGS, NPROC_PER_NODE="2")
    slurm.wait_done(job)
    run_dir = run_dir_of(tmp_path, job)  # derived from the config and the job step
    assert world_size_of_last_checkpoint(run_dir) == 2
    assert max_weight_diff(load_model(run_dir), reference) < 1e-5
    log = (tmp_path / f"slurm-{job}.out").read_text()
    # The script's port is gddist's (srun-mode) port for the job: head node and port agree.
    assert f"rendezvous localhost:{slurm_port(job)}" in log


def test_sbatch_srun_task_per_process_trains_like_one_process(slurm, reference, tmp_path):
    job = submit(slurm, tmp_path, "slurm_srun.sbatch", *ARGS, sbatch_args=["--ntasks=2"])
    slurm.wait_done(job)
    run_dir = run_dir_of(tmp_path, job)
    assert world_size_of_last_checkpoint(run_dir) == 2
    assert max_weight_diff(load_model(run_dir), reference) < 1e-5


def test_two_sruns_of_one_job_are_two_runs(slurm, reference, tmp_path):
    """The same command twice in one job (two job steps): each step is its own run, trained to
    the end, not a "resume" of the other's finished checkpoint."""
    script = tmp_path / "twice.sbatch"
    train_cmd = shlex.join([sys.executable, str(ROOT / "train.py"), *ARGS])
    script.write_text(f"#!/bin/bash\nsrun --ntasks=1 {train_cmd}\nsrun --ntasks=1 {train_cmd}\n")
    job = slurm.sbatch(f"--chdir={tmp_path}", str(script), env=job_env(slurm), cwd=tmp_path)
    slurm.wait_done(job)
    for step in ("0", "1"):
        run_dir = run_dir_of(tmp_path, job, step)
        assert last_step(run_dir) == MAX_STEPS, step
        assert max_weight_diff(load_model(run_dir), reference) < 1e-5
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "complete at step" not in log and log.count(": fresh start") == 2, log[-3000:]


def test_sbatch_srun_accelerate_engine_trains_like_one_process(slurm, reference, tmp_path):
    """engine=accelerate under srun (SLURM_* variables only): Accelerate sees the 2 tasks as one
    world and syncs their gradients, instead of each task training alone on its shard."""
    job = submit(
        slurm, tmp_path, "slurm_srun.sbatch", *ARGS, "engine=accelerate", sbatch_args=["--ntasks=2"]
    )
    slurm.wait_done(job)
    run_dir = run_dir_of(tmp_path, job)
    assert world_size_of_last_checkpoint(run_dir) == 2
    assert max_weight_diff(load_model(run_dir), reference) < 1e-5


PREEMPT_STEPS = 60
SLOW = [
    "model=custom",
    "model._target_=launch_models.SlowNet",
    f"trainer.max_steps={PREEMPT_STEPS}",
]
SLOW += ["trainer.log_every=1", "trainer.eval_every=0", "trainer.stop_check_every=2"]


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    """Final weights of an uninterrupted single-process run of SLOW (without the slow-down)."""
    run_dir = tmp_path_factory.mktemp("slow_reference")
    train(run_dir, *SLOW, "+model.delay_s=0")
    return load_model(run_dir)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, slow_reference, tmp_path):
    """SIGUSR1 (SLURM's preemption warning) through srun -> torchrun agent -> workers: every rank
    stops at one step and checkpoints, rank 0 requeues the job, the requeued job resumes in the
    same run dir and ends with the weights of an uninterrupted single-process run."""
    job = submit(slurm, tmp_path, "slurm.sbatch", *SLOW, "+model.delay_s=0.05", NPROC_PER_NODE="2")
    slurm.wait_job(
        job, lambda f: last_step(run_dir_of(tmp_path, job)) >= 5, 120, "training progress"
    )
    run_dir = run_dir_of(tmp_path, job)
    # What --signal=USR1@90 does 90 s before the time limit: every process of the job step.
    slurm.run("scancel", "--signal=USR1", str(job))

    slurm.wait_job(
        job, lambda f: int(f["Restarts"]) >= 1 and f["JobState"] == "PENDING", 120, "requeue"
    )
    stopped_at = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert stopped_at and max(stopped_at) < PREEMPT_STEPS, stopped_at
    assert not (run_dir / "model.pt").exists()  # the final model comes from the resumed run
    # A requeued job may start again only after ~2 minutes; release it now.
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    done = slurm.wait_done(job)

    assert done["Restarts"] == "1"
    log = (tmp_path / f"slurm-{job}.out").read_text()  # appended across the requeue
    first_run, resumed_run = log.split("(restart 1)")
    assert first_run.count("received SIGUSR1") == 2, first_run[-3000:]  # both ranks got it
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{max(stopped_at):09d}'}" in resumed_run
    assert last_step(run_dir) == PREEMPT_STEPS
    assert list((tmp_path / "outputs").iterdir()) == [run_dir]  # the requeued job came back
    assert world_size_of_last_checkpoint(run_dir) == 2
    assert max_weight_diff(load_model(run_dir), slow_reference) < 1e-5


# A stand-in for train.py (no torch: starts in a blink): each process records the SIGUSR1s it gets.
SIGNAL_PROBE = """\
import os, pathlib, signal, sys, time
rank = os.environ.get("RANK") or os.environ["SLURM_PROCID"]
out = pathlib.Path(os.environ["PROBE_DIR"])
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
(out / f"ready-{rank}").touch()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(out / f"usr1-{rank}").write_text(str(len(got)))
sys.exit(0 if got else 1)
"""


@pytest.mark.parametrize("scancel_args", [[], ["--batch"]], ids=["step-signal", "batch-signal"])
@pytest.mark.parametrize(
    "script, sbatch_args, env",
    [
        ("slurm.sbatch", [], {"NPROC_PER_NODE": "2"}),
        ("slurm_srun.sbatch", ["--ntasks=2"], {}),
    ],
    ids=["torchrun", "srun"],
)
def test_usr1_reaches_every_training_process(
    slurm, tmp_path, script, sbatch_args, env, scancel_args
):
    """Both scripts, both ways SLURM delivers the warning: to every process of the job step
    (--signal=USR1@90, scancel --signal=USR1) or only to the batch shell (--signal=B:USR1@90,
    scancel --batch), whose trap hands it to srun. Every training process gets it, and under
    torchrun the agent survives it (else the job would fail, not complete)."""
    root = tmp_path / "checkout"  # GDDIST_ROOT: the real launch/ with the probe as train.py
    root.mkdir()
    (root / "launch").symlink_to(ROOT / "launch")
    (root / "train.py").write_text(SIGNAL_PROBE)
    job = slurm.sbatch(
        f"--chdir={tmp_path}",
        *sbatch_args,
        str(ROOT / "launch" / script),
        env=job_env(slurm, GDDIST_ROOT=str(root), PROBE_DIR=str(tmp_path), **env),
        cwd=ROOT,
    )
    slurm.wait_job(job, lambda f: len(list(tmp_path.glob("ready-*"))) == 2, 60, "2 processes")
    slurm.run("scancel", "--signal=USR1", *scancel_args, str(job))
    slurm.wait_done(job, timeout=60)
    assert sorted(p.name for p in tmp_path.glob("usr1-*")) == ["usr1-0", "usr1-1"]
    assert all(int(p.read_text()) >= 1 for p in tmp_path.glob("usr1-*"))


def test_multirun_sweep_goes_out_as_slurm_jobs(slurm, reference, tmp_path):
    """python train.py -m hydra/launcher=slurm ... : one SLURM job per run (submitit), each run in
    its own sweep subdir with its own overrides; the launching command waits for all of them."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        require_or_skip("hydra-submitit-launcher is not installed; pip install 'gddist[slurm]'")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm"]
        + [f"hydra.sweep.dir={sweep}", *ARGS, "optimizer.lr=0.1,0.01"],
        cwd=tmp_path,
        env=job_env(slurm),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    # One array job, one task per run: .submitit/<array id>_<task id>/ holds each task's log.
    tasks = sorted(
        p.name for p in (sweep / ".submitit").iterdir() if re.match(r"^\d+_\d+$", p.name)
    )
    assert len(tasks) == 2, tasks
    for task in tasks:  # results are in; the jobs themselves end a moment later
        slurm.wait_done(task, timeout=60)
    # Run 0 has the default lr (0.1): the reference run. Run 1 got its own override.
    assert max_weight_diff(load_model(sweep / "0"), reference) < 1e-5
    assert "optimizer.lr=0.01" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert max_weight_diff(load_model(sweep / "1"), reference) > 1e-3
