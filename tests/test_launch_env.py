"""Tier 2: launch detection and run-dir naming from launcher environments, in one process."""

import re

import pytest

from gddist.dist import detect_launch, expand_nodelist, slurm_port
from gddist.rundir import run_name


def test_no_launcher_is_a_world_of_one():
    env = detect_launch({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("none", 0, 1, 0)


def test_torchrun_environment():
    env = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 1)


def test_srun_task_environment_finds_head_node_and_job_port():
    env = detect_launch(
        {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08,11]",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.master_addr == "gpu07"
    assert env.master_port == slurm_port(4242)


def test_batch_script_shell_without_srun_is_one_process():
    env = detect_launch(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}
    )
    assert env.world_size == 1


def test_torchrun_wins_over_slurm_variables():
    env = detect_launch(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_PROCID": "3",
            "SLURM_JOB_NODELIST": "n1",
            "SLURM_JOB_ID": "7",
        }
    )
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("a[1-2],b[9-10]", ["a1", "a2", "b9", "b10"]),
        ("rack1-n[008-010]", ["rack1-n008", "rack1-n009", "rack1-n010"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_run_name_is_the_config_identity_plus_the_slurm_job_step():
    config = {"seed": 0, "data": {"name": "purchase"}, "model": {"name": "linear"},
              "optimizer": {"name": "sgd", "lr": 0.1}}  # fmt: skip
    plain = run_name(config, {})
    assert re.fullmatch(r"purchase-linear-sgd-[0-9a-f]{10}", plain)
    assert run_name(config, {"GDDIST_RUN_NAME": "mine", "SLURM_JOB_ID": "9"}) == "mine"
    # torchrun's random rendezvous id is not part of it: a rerun of the command finds the dir.
    assert run_name(config, {"RANK": "1", "TORCHELASTIC_RUN_ID": "abc"}) == plain
    step0 = run_name(config, {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0"})
    assert step0.startswith("slurm-9.0-")
    assert run_name(config, {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "1"}).startswith("slurm-9.1-")
    assert run_name(config, {"SLURM_JOB_ID": "9"}).startswith("slurm-9.batch-")
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "2"}
    assert run_name(config, array).startswith("slurm-8_2.batch-")
