"""Same command, same run (docs/architecture.md, invariant 8), as a user meets it: the default run
dir of `python train.py` and `torchrun` (no hydra.run.dir), a rerun after SIGTERM, a rerun of a
finished run, a second launch into a live run dir, a fresh start in a used one, user config dirs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    CONF,
    EXACT,
    assert_bit_identical,
    check,
    children,
    clean_env,
    cli,
    cli_cmd,
    environ_of,
    last_step,
    load_model,
    max_weight_diff,
    rows,
    start,
    torchrun_cmd,
    train,
    wait_until,
)

from gddist import keys
from gddist.checkpoint import verify
from gddist.cli import check_overrides
from gddist.config import UserError
from gddist.rundir import LOCK, RunLock


def run_dirs(cwd: Path) -> list[Path]:
    outputs = cwd / "outputs"
    return sorted(p for p in outputs.iterdir() if p.is_dir()) if outputs.exists() else []


def the_run_dir(cwd: Path) -> Path:
    (run_dir,) = run_dirs(cwd)
    return run_dir


def logged_step(cwd: Path) -> int:
    dirs = run_dirs(cwd)
    return last_step(dirs[0]) if dirs else 0


def resume_command(output: str) -> list[str]:
    match = re.search(r"to resume, run: (.+)", output)
    assert match, output[-3000:]
    return shlex.split(match.group(1))


# ----------------------------------------------------------------------------- identity


def test_speed_and_length_keys_are_not_part_of_the_identity():
    base = {"seed": 0, "data": {"name": "purchase", "num_workers": 2, "batch_size": 64},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "trainer": {"max_steps": 100, "log_every": 10, "grad_clip_norm": None},
            "checkpoint": {"every_steps": 10}, "logger": {"progress": "auto"},
            "hydra": {"run": {"dir": "x"}}}  # fmt: skip
    same = json.loads(json.dumps(base))
    same["data"]["num_workers"] = 0
    same["trainer"].update(max_steps=1000, log_every=1)
    same["checkpoint"]["every_steps"] = 50
    same["logger"]["progress"] = "none"
    same["hydra"]["run"]["dir"] = "y"
    assert keys.identity(same) == keys.identity(base)
    for section, key, value in [("optimizer", "lr", 0.01), ("data", "batch_size", 32),
                                ("trainer", "grad_clip_norm", 1.0)]:  # fmt: skip
        other = json.loads(json.dumps(base))
        other[section][key] = value
        assert keys.identity(other) != keys.identity(base), key
    assert keys.kind("data.num_workers") == "speed" and keys.kind("data.batch_size") == "refused"
    assert keys.kind("trainer.max_steps") == "length" and keys.kind("optimizer.lr") == "applied"


# ----------------------------------------------------------------------------- lock (tier 2)


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    holder = {"host": socket.gethostname(), "pid": proc.pid, "started": "earlier", "job": None}
    (tmp_path / LOCK).write_text(json.dumps(holder))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_live_holder_is_named_in_one_line(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "t0", "job": None}
        (tmp_path / LOCK).write_text(json.dumps(holder))
        with pytest.raises(UserError) as error:
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    message = str(error.value)
    assert "\n" not in message and f"pid {sleeper.pid}" in message
    assert f"host {socket.gethostname()}" in message and "hydra.run.dir" in message


# ----------------------------------------------------------------------------- fresh starts


def test_resume_never_archives_the_old_run_and_the_next_auto_continues_the_new_one(tmp_path):
    common = ["model=mlp", "optimizer=adam", "trainer.log_every=1", "trainer.eval_every=0",
              "checkpoint.every_steps=10"]  # fmt: skip
    used = tmp_path / "used"
    train(used, *common, "optimizer.lr=0.01", "trainer.max_steps=40")
    old_model = load_model(used)
    # A fresh start with another lr, in the used dir:
    train(used, *common, "optimizer.lr=0.003", "trainer.max_steps=40", "checkpoint.resume=never")
    clean = tmp_path / "clean"
    train(clean, *common, "optimizer.lr=0.003", "trainer.max_steps=40")
    assert_bit_identical(load_model(used), load_model(clean))
    (archived,) = (used / "archive").iterdir()
    assert_bit_identical(torch.load(archived / "model.pt", weights_only=True), old_model)
    assert sorted(p.name for p in (archived / "checkpoints").iterdir())[-1] == "step_000000040"
    assert [r["step"] for r in rows(used) if "train/loss" in r] == list(range(1, 41))  # once each
    for path in (used / "checkpoints").glob("step_*"):  # only the new run's checkpoints
        verify(path)
        state = torch.load(path / "state.pt", weights_only=True)
        assert state["config"]["optimizer"]["lr"] == 0.003
    # resume=auto with more steps continues the NEW run, as if it had never stopped.
    train(used, *common, "optimizer.lr=0.003", "trainer.max_steps=60")
    longer = tmp_path / "longer"
    train(longer, *common, "optimizer.lr=0.003", "trainer.max_steps=60")
    assert_bit_identical(load_model(used), load_model(longer))
    assert [r["step"] for r in rows(used) if "train/loss" in r] == list(range(1, 61))


def test_resume_from_an_older_checkpoint_archives_the_later_history(tmp_path):
    common = ["model=mlp", "optimizer=adam", "trainer.log_every=1", "trainer.eval_every=0",
              "checkpoint.every_steps=10", "checkpoint.keep_last=5", "trainer.max_steps=40"]  # fmt: skip
    run_dir = tmp_path / "r"
    train(run_dir, *common)
    reference = load_model(run_dir)
    older = run_dir / "checkpoints" / "step_000000020"
    train(run_dir, *common, f"checkpoint.resume={older}")
    assert_bit_identical(load_model(run_dir), reference)  # steps 21-40 again, the same way
    (archived,) = (run_dir / "archive").iterdir()
    assert (archived / "checkpoints" / "step_000000040").is_dir()  # the later history, kept
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, 41))


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir, *EXACT)
    return load_model(run_dir)


@pytest.mark.slow
def test_same_command_without_a_run_dir_resumes_after_sigterm(tmp_path, uninterrupted):
    proc = start(cli_cmd(*EXACT), cwd=tmp_path)
    wait_until(lambda: logged_step(tmp_path) >= 100, 120, "step 100", proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    run_dir = the_run_dir(tmp_path)
    assert re.search(rf"run dir {re.escape(str(run_dir))}: fresh start", out)
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["step"]
    assert 100 <= stopped < 400
    # The exact command it prints is the user's own; running it resumes where the run stopped.
    command = resume_command(out)
    assert command[-len(EXACT) :] == EXACT
    again = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    check(again)
    first = (again.stdout + again.stderr).strip().splitlines()[0]
    assert f"run dir {run_dir}: resumed from" in first and f"at step {stopped}" in first
    assert the_run_dir(tmp_path) == run_dir  # the same run dir, not a new one
    assert_bit_identical(load_model(run_dir), uninterrupted)
    # A rerun of the finished run trains nothing and says how to start afresh.
    done = check(cli(*EXACT, cwd=tmp_path))
    assert f"run dir {run_dir}: complete at step 400" in done.stderr + done.stdout
    assert "checkpoint.resume=never" in done.stderr + done.stdout
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, 401))
    # Another config is another run: a new run dir, the first one untouched.
    check(cli(*EXACT[:-4], "trainer.max_steps=5", "optimizer.lr=0.01", cwd=tmp_path))
    assert len(run_dirs(tmp_path)) == 2
    assert_bit_identical(load_model(run_dir), uninterrupted)


NO_DROPOUT = ["model=mlp", "optimizer=adam", "trainer.max_steps=300", "trainer.log_every=1",
              "trainer.eval_every=0", "checkpoint.every_steps=40"]  # fmt: skip


@pytest.mark.slow
def test_same_torchrun_command_without_a_run_dir_resumes_after_sigterm(tmp_path):
    reference = tmp_path / "one"
    train(reference, *NO_DROPOUT)
    work = tmp_path / "work"
    work.mkdir()
    proc = start(torchrun_cmd(2, *NO_DROPOUT), cwd=work)
    wait_until(
        lambda: logged_step(work) >= 60 and len(children(proc.pid)) == 2, 120, "step 60", proc
    )
    rank1 = next(p for p in children(proc.pid) if environ_of(p).get("RANK") == "1")
    os.kill(rank1, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    run_dir = the_run_dir(work)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] < 300
    command = resume_command(out)
    assert "torch.distributed.run" in " ".join(command)  # torchrun's command, not a worker's
    again = subprocess.run(command, cwd=work, env=clean_env(), capture_output=True, text=True)
    check(again)
    assert f"at step {summary['step']}" in again.stdout + again.stderr
    assert the_run_dir(work) == run_dir
    assert max_weight_diff(load_model(run_dir), load_model(reference)) < 1e-5


SLEEPY = ["model=custom", "model._target_=models_for_tests.SlowNet", "+model.train_sleep_s=0.02",
          "trainer.max_steps=600", "trainer.eval_every=0", "checkpoint.every_steps=50"]  # fmt: skip


@pytest.mark.slow
def test_a_second_launch_into_a_live_run_dir_exits_2_naming_the_first(tmp_path):
    args = [*SLEEPY, f"hydra.run.dir={tmp_path / 'run'}"]
    first = start(cli_cmd(*args))
    wait_until(lambda: last_step(tmp_path / "run") >= 10, 120, "step 10", first)
    second = cli(*args)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: run dir ") and f"pid {first.pid}" in line
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the first run goes on, untouched
    # Killed hard, the first run leaves its lock behind; the same command takes it over (its
    # holder is gone) and resumes.
    wait_until(lambda: last_step(tmp_path / "run") >= 60, 120, "step 60", first)
    first.kill()
    first.communicate(timeout=60)
    assert (tmp_path / "run" / LOCK).exists()
    again = check(cli(*args))
    assert "resumed from" in again.stdout + again.stderr
    assert not (tmp_path / "run" / LOCK).exists()  # released at exit
    train(tmp_path / "ref", *SLEEPY[:2], *SLEEPY[3:])  # without the sleep
    assert_bit_identical(load_model(tmp_path / "run"), load_model(tmp_path / "ref"))


@pytest.mark.slow
def test_user_config_dirs_are_searched_for_group_options(tmp_path):
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "tiny.yaml").write_text("name: mlp\nhidden_sizes: [4]\n")
    check_overrides(["--config-dir", str(conf), "model=tiny"], CONF)
    check_overrides([f"hydra.searchpath=[file://{conf}]", "model=tiny"], CONF)
    with pytest.raises(UserError, match="unknown model option 'tinyy'"):
        check_overrides(["--config-dir", str(conf), "model=tinyy"], CONF)
    proc = check(cli("--config-dir", str(conf), "model=tiny", "trainer.max_steps=5", cwd=tmp_path))
    assert "resumed" not in proc.stderr
    state = load_model(the_run_dir(tmp_path))
    hidden = [v.shape for v in state.values() if v.dim() == 2]
    assert hidden[0][0] == 4, hidden  # the user's model: one hidden layer of 4


@pytest.mark.slow
def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = cli(f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run dir {tmp_path / 'a_file' / 'run'} cannot be created: "
        f"{tmp_path / 'a_file'} is a file, not a directory; choose another hydra.run.dir "
        "(or remove the file)"
    ]
