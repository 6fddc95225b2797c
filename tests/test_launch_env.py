"""Tier 2: launch detection and run-dir naming from launcher environments, in one process."""

import pytest

from gddist.cli import run_name
from gddist.dist import detect_launch, expand_nodelist, slurm_port


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


def test_run_name_is_stable_per_job():
    assert run_name({"GDDIST_RUN_NAME": "mine", "SLURM_JOB_ID": "9"}) == "mine"
    assert run_name({"SLURM_JOB_ID": "9"}) == "slurm-9"
    assert run_name(
        {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "2"}
    ) == ("slurm-8_2")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}
    assert run_name(torchrun) == "torchrun-abc"
    # Without a rendezvous id, all workers of one torchrun share its (their parent's) start time.
    no_id = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}
    assert run_name(no_id) == run_name(no_id)
