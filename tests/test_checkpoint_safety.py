"""On-disk safety: a corrupt newest checkpoint, a full disk, a torn metrics.jsonl, file modes,
and replacing a checkpoint of the same step.

Disk-full runs use a real tmpfs mounted small (root only; skipped elsewhere, but under CI=true
a missing mount fails, like tests/slurm_cluster.py's prerequisites).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import check, cli, cli_cmd, compose, load_model, rows, spawn, start, train
from slurm_cluster import require_or_skip

from gddist import checkpoint
from gddist.checkpoint import Checkpointer, verify
from gddist.config import Config, UserError
from gddist.dist import LaunchEnv, detect_launch, init
from gddist.io import atomic_save_json, atomic_write, truncate_jsonl
from gddist.tracking import Tracker

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size): a fresh tmpfs of `size` (e.g. "240k") at tmp_path/name, unmounted
    after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            require_or_skip("mounting a tmpfs needs root and mount(8)")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            require_or_skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def leftovers(directory: Path) -> list[str]:
    """Temporary files or dirs of writes: .tmp-step_* dirs and .NAME.*.tmp files."""
    return [p.name for p in directory.rglob(".*") if ".tmp" in p.name]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- corrupt newest


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_replaced_and_progress_is_kept(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=20", "checkpoint.every_steps=10", f"hydra.run.dir={run}",
            "logger.plots=false"]  # fmt: skip
    check(cli(*args, "checkpoint.keep_last=2"))
    uninterrupted = load_model(run)
    ckpts = run / "checkpoints"
    state = ckpts / "step_000000020" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the disk lied

    proc = check(cli(*args, "checkpoint.keep_last=1"))
    assert "resumed from" in proc.stdout + proc.stderr and "at step 10" in proc.stdout + proc.stderr
    # The fresh save of step 20 replaced the corrupt one; step 10 went only once it was there.
    assert [p.name for p in ckpts.iterdir()] == ["step_000000020"]
    verify(ckpts / "step_000000020")
    resumed = load_model(run)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


# ----------------------------------------------------------------------------- same step


def checkpointer(tmp_path, *overrides):
    cfg = Config.from_dict(compose(*overrides))
    return Checkpointer(cfg.checkpoint, tmp_path, init(cfg.dist, LaunchEnv("none")))


def test_a_save_at_a_saved_step_replaces_it_and_a_crash_half_way_keeps_the_old_one(tmp_path):
    ck = checkpointer(tmp_path)
    ck.save(3, {"x": torch.ones(2)}, {"rng": {}})
    ck.save(3, {"x": torch.zeros(2)}, {"rng": {}})
    assert [p.name for p in ck.complete()] == ["step_000000003"]
    verify(ck.complete()[0])
    assert torch.equal(ck.load(ck.complete()[0])[0]["x"], torch.zeros(2))  # the NEW content
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step_000000003"]  # nothing aside

    # What a crash between the two renames of a replace leaves: the old checkpoint moved aside,
    # no step_000000003. Resume finds the old one there.
    aside = ck.dir / ".old-step_000000003-0123abcd"
    os.replace(ck.dir / "step_000000003", aside)
    again = checkpointer(tmp_path)
    assert again.find_resume() == aside
    assert torch.equal(again.load(aside)[0]["x"], torch.zeros(2))
    again.save(3, {"x": torch.full((2,), 5.0)}, {"rng": {}})  # the resumed run saves that step
    assert sorted(p.name for p in again.dir.iterdir()) == ["step_000000003"]
    assert torch.equal(again.load(again.dir / "step_000000003")[0]["x"], torch.full((2,), 5.0))


def test_pruning_counts_only_verified_checkpoints(tmp_path):
    ck = checkpointer(tmp_path, "checkpoint.keep_last=2")
    for step in (1, 2, 3):
        ck.save(step, {"x": torch.full((2,), float(step))}, {"rng": {}})
    (ck.dir / "step_000000003" / "state.pt").write_bytes(b"torn")
    resumed = checkpointer(tmp_path, "checkpoint.keep_last=2")
    assert resumed.find_resume() == ck.dir / "step_000000002"
    resumed.save(4, {"x": torch.ones(2)}, {"rng": {}})
    # keep_last=2 verified ones: 4 and 2 (the corrupt 3 does not count, and is left alone).
    assert [p.name for p in resumed.complete()] == [
        "step_000000002",
        "step_000000003",
        "step_000000004",
    ]


# ----------------------------------------------------------------------------- full disk


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_complete_ones(
    tmp_path, tmpfs, async_save
):
    # A checkpoint of model=linear takes 24 pages of tmpfs (96 KiB): two fit in 240k, not three.
    ckpts = tmpfs("disk", "240k") / "checkpoints"
    proc = cli("model=linear", "trainer.max_steps=30", "checkpoint.every_steps=5",
               "checkpoint.keep_last=10", f"checkpoint.dir={ckpts}", f"checkpoint.async={async_save}",
               f"hydra.run.dir={tmp_path / 'run'}", "logger.plots=false")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        f"error: cannot write {ckpts}/step_000000015: {NO_SPACE}; free space (or quota) on the "
        f"filesystem of {ckpts}, or set checkpoint.dir=<a writable directory with room>"
    ]
    assert leftovers(ckpts) == []
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step_000000005", "step_000000010"]
    for path in ckpts.iterdir():
        verify(path)


@pytest.mark.slow
def test_two_processes_on_a_full_disk_both_exit_2_and_say_it_once(tmp_path, tmpfs):
    # Two ranks' files make a checkpoint 36 pages (144 KiB): two fit in 360k, not three.
    ckpts = tmpfs("disk", "360k") / "checkpoints"
    args = ["model=linear", "trainer.max_steps=30", "checkpoint.every_steps=5",
            "checkpoint.keep_last=10", f"checkpoint.dir={ckpts}", "logger.plots=false",
            f"dist.init_method=file://{tmp_path}/store", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    procs = [start(cli_cmd(*args), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]  # no rank is left waiting
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [2, 2], outs[0][-3000:] + outs[1][-3000:]
    assert "Traceback" not in outs[0] + outs[1]
    assert error_lines(outs[0]) == [
        f"error: cannot write {ckpts}/step_000000015: {NO_SPACE}; free space (or quota) on the "
        f"filesystem of {ckpts}, or set checkpoint.dir=<a writable directory with room>"
    ]
    assert error_lines(outs[1]) == []  # said once, by rank 0
    assert leftovers(ckpts) == []
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step_000000005", "step_000000010"]
    for path in ckpts.iterdir():
        verify(path)


def test_a_full_disk_under_the_run_dir_names_the_file(tmp_path, tmpfs):
    # metrics.jsonl rows (~200 bytes each) fill one page of tmpfs within 40 steps.
    run = tmpfs("run", "4k")
    with pytest.raises(UserError) as e:
        train(run, "trainer.max_steps=40", "trainer.log_every=1", f"checkpoint.dir={tmp_path}/c")
    assert str(e.value) == (
        f"cannot write {run}/metrics.jsonl: {NO_SPACE}; free space (or quota) on the filesystem "
        f"of {run}, or set hydra.run.dir=<a writable directory with room>"
    )


def test_a_refused_atomic_write_leaves_no_temporary_file(tmpfs):
    disk = tmpfs("disk", "8k")
    (disk / "filler").write_bytes(b"x" * 8192)  # the disk is full
    with pytest.raises(UserError) as e:
        atomic_save_json({"step": 1}, disk / "summary.json")
    assert str(e.value).startswith(f"cannot write {disk}/summary.json: {NO_SPACE}; free space")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_read_only_checkpoint_dir_is_one_line(tmp_path, tmpfs):
    ro = tmpfs("ro", "64k")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    with pytest.raises(UserError) as e:
        train(tmp_path, "trainer.max_steps=5", f"checkpoint.dir={ro}/ckpt")
    assert str(e.value) == (
        f"cannot write {ro}/ckpt/step_000000005: {os.strerror(errno.EROFS)}; {ro}/ckpt is on a "
        "read-only filesystem: remount it read-write, or set checkpoint.dir=<a writable "
        "directory with room>"
    )


def _refused_save(rank, init_method, ckpt_dir, failing_rank, async_save):
    """Two ranks save step 1, then step 2 where `failing_rank`'s disk is full."""
    cfg = Config.from_dict(compose(f"checkpoint.dir={ckpt_dir}", f"checkpoint.async={async_save}"))
    cfg.dist.init_method = init_method
    dist = init(cfg.dist, detect_launch())
    try:
        ck = Checkpointer(cfg.checkpoint, Path(ckpt_dir), dist, timeout_s=60)
        ck.save(1, {"x": torch.ones(2)}, {"rng": rank})
        ck.wait()
        if rank == failing_rank:  # what a full disk makes os.write raise, on this rank alone

            def full(obj, path):
                raise OSError(errno.ENOSPC, NO_SPACE)

            checkpoint.atomic_torch_save_hashed = full
        try:
            ck.save(2, {"x": torch.zeros(2)}, {"rng": rank})
            ck.wait()  # an async save's error comes out here
        except UserError as e:
            return str(e)
        return None
    finally:
        dist.close()


@pytest.mark.parametrize(("failing_rank", "async_save"), [(1, False), (0, False), (1, True)])
def test_a_write_refused_on_one_rank_is_raised_alike_on_every_rank(
    tmp_path, failing_rank, async_save
):
    ckpts = tmp_path / "ckpt"
    errors = spawn(_refused_save, 2, tmp_path, str(ckpts), failing_rank, async_save, timeout=120)
    assert (
        errors[0]
        == errors[1]
        == (
            f"cannot write {ckpts}/step_000000002: {NO_SPACE}; free space (or quota) on the "
            f"filesystem of {ckpts}, or set checkpoint.dir=<a writable directory with room>"
        )
    )
    assert [p.name for p in ckpts.iterdir()] == ["step_000000001"]  # no .tmp-step_ left
    verify(ckpts / "step_000000001")


# ----------------------------------------------------------------------------- metrics.jsonl


def test_a_torn_metrics_tail_is_dropped_on_resume(tmp_path, caplog):
    args = ["trainer.log_every=1", "checkpoint.every_steps=5"]
    train(tmp_path, "trainer.max_steps=10", *args)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "train/lo')  # a row cut short by a crash of the node
    with caplog.at_level(logging.WARNING, logger="gddist"):
        train(tmp_path, "trainer.max_steps=20", *args)
    assert any("dropping its torn last line" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in rows(tmp_path) if "train/loss" in r] == list(range(1, 21))


def test_an_undecodable_middle_row_is_one_line_naming_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(UserError, match=rf"^{path} line 2 is not a JSON row: fix or delete"):
        truncate_jsonl(path, max_step=1)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "x\n{"step": 3}\n'  # left as it was


@pytest.mark.parametrize("tail", ['{"step": 2, "tr', '{"step": 2}'])
def test_the_tracker_never_glues_a_row_to_a_torn_one(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n' + tail)  # no newline at the end
    cfg = Config.from_dict(compose("logger.progress=none"))
    tracker = Tracker(tmp_path, cfg.logger, cfg.to_dict(), stream=io.StringIO())
    tracker.log({"step": 3})
    tracker.close()
    kept = [1, 2, 3] if tail.endswith("}") else [1, 3]  # a complete row keeps its place
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == kept


# ----------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    before = os.umask(0o022)
    yield set_umask
    os.umask(before)


def test_outputs_get_the_mode_of_a_plain_open(tmp_path, umask):
    umask(0o022)
    train(tmp_path, "trainer.max_steps=5", "checkpoint.every_steps=5")
    files = [tmp_path / n for n in ("model.pt", "summary.json", "preprocessing.json")]
    files += list((tmp_path / "checkpoints" / "step_000000005").iterdir())
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
        f.name: "0o644" for f in files
    }
    umask(0o027)
    atomic_write(tmp_path / "other", lambda f: f.write(b"x"))
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o640
