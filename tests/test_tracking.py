"""Console progress (bar on a terminal, lines elsewhere, silence on other ranks) and the wandb
logger (offline): rank 0 only, one run dir, metrics and config in the run, same run after resume,
no API key anywhere."""

import io
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, check, clean_env, rows

from gddist import progress, tracking
from gddist.config import LoggerConfig

API_KEY = "gddist-test-key-" + "0123456789abcdef" * 2  # must never reach a file

TRAIN_ROWS = [
    {"step": s, "epoch": 0, "train/loss": 1.0 / s, "lr": 0.1, "grad_norm": 0.5, "samples/s": 640.0}
    for s in (5, 10, 15, 20)
]
EVAL_ROW = {"step": 20, "epoch": 0, "val/loss": 0.3, "val/accuracy": 0.9}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def log_rows(tracker) -> None:
    for row in [*TRAIN_ROWS, EVAL_ROW]:
        tracker.log(row)
    tracker.close()


# ---------------------------------------------------------------------------- progress


def test_auto_progress_is_a_bar_on_a_terminal(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gddist")
    stream = FakeTerminal()
    tracker = tracking.Tracker(tmp_path, LoggerConfig(), {}, total_steps=20, stream=stream)
    log_rows(tracker)
    out = stream.getvalue()
    assert "\r" in out  # redrawn in place
    assert "20/20" in out and "step/s" in out and "<00:00" in out  # position, rate, ETA
    assert "loss=0.05" in out and "lr=0.1" in out and "samples/s=640" in out
    assert "val/accuracy 0.9" in out  # evaluation rows are printed above the bar
    assert not [r for r in caplog.records if "train/loss" in r.getMessage()]  # no lines too
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        5, 10, 15, 20, 20
    ]  # fmt: skip


def test_auto_progress_is_plain_lines_when_not_a_terminal(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="gddist")
    clock = iter([100.0, 102.0, 104.0, 106.0, 108.0, 108.5])  # 5 steps take 2 s
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    stream = io.StringIO()  # a pipe, a CI log, a SLURM output file
    tracker = tracking.Tracker(tmp_path, LoggerConfig(), {}, total_steps=20, stream=stream)
    log_rows(tracker)
    assert stream.getvalue() == ""  # no bar, no carriage returns
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "step 5/20 (25%) | epoch 0 | train/loss 0.2 | lr 0.1 | grad_norm 0.5 | samples/s 640"
        " | eta 0:00:06"  # 15 steps to go at 2 s per 5 steps
    )
    assert lines[3].endswith("| eta 0:00:00")
    assert len(lines) == 5 and "val/accuracy 0.9" in lines[-1]


def test_a_resumed_runs_eta_counts_only_its_own_steps(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="gddist")
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    tracker = tracking.build(tmp_path, True, LoggerConfig(progress="lines"), {}, None, 100, 50)
    tracker.log({"step": 60, "epoch": 3, "train/loss": 0.5})  # 10 steps in 10 s, 40 to go
    (record,) = caplog.records
    assert record.getMessage() == "step 60/100 (60%) | epoch 3 | train/loss 0.5 | eta 0:00:40"


def test_progress_none_prints_nothing_but_still_writes_metrics(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gddist")
    stream = FakeTerminal()
    log_rows(tracking.Tracker(tmp_path, LoggerConfig(progress="none"), {}, stream=stream))
    assert stream.getvalue() == "" and not caplog.records
    assert len(rows(tmp_path)) == 5


def test_non_zero_ranks_print_and_write_nothing(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    tracker = tracking.build(tmp_path, False, LoggerConfig(name="wandb", progress="bar"), {})
    log_rows(tracker)
    tracker.finish({"diverged": False})
    assert tracker.run_id is None
    assert capsys.readouterr() == ("", "") and not caplog.records
    assert list(tmp_path.iterdir()) == []


def run_in_terminal(cmd: list[str], cwd: Path, timeout: float = 180) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a pseudo-terminal; return (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=clean_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"timed out after {timeout}s")
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_train_py_shows_a_bar_in_a_terminal(tmp_path):
    """(In a pipe or a file it prints lines: see the torchrun test below, whose rank 0 writes to a
    file.) The pseudo-terminal reports no size, the case where tqdm alone would draw nothing."""
    args = ["trainer.max_steps=20", "trainer.log_every=5", "trainer.eval_every=0"]
    code, out = run_in_terminal(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert code == 0, out[-3000:]
    assert "20/20" in out and "step/s" in out and "\r" in out and "loss=" in out
    assert "step 5/20" not in out  # the bar replaces the per-row lines
    assert "step 20/20 (100%) | epoch 1 | val/loss" in out  # evaluations print above the bar


# ---------------------------------------------------------------------------- wandb


def wandb_records(path: Path) -> list:
    """The records of an offline run file (`run-ID.wandb`): wandb's protobuf `Record`s in the
    LevelDB log format (32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the end of the block
            pos += left - 7 - length
            continue
        pending = payload if kind in (1, 2) else pending + payload  # FULL/FIRST, MIDDLE/LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_run(run_dir: Path, index: int = 0) -> tuple[str, dict]:
    """(run id, {"config": {...}, "history": {step: {key: value}}, "summary": {...}}) of the
    index-th offline run (by start time) in RUN_DIR/wandb/."""
    (path,) = sorted(run_dir.glob("wandb/offline-run-*"))[index].glob("run-*.wandb")
    out = {"config": {}, "history": {}, "summary": {}}
    run_id = None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            out["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            items = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            out["history"][record.history.step.num] = items
        elif kind == "summary":
            for u in record.summary.update:
                out["summary"]["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
    return run_id, out


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with a key set, and wandb's own cache and config (its service logs) in tmp_path:
    the key scan below then covers every file wandb writes, and nothing lands in $HOME."""
    return clean_env(
        WANDB_MODE="offline",
        WANDB_API_KEY=API_KEY,
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )


def files_containing(root: Path, text: str) -> list[Path]:
    needle = text.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def torchrun_with_rank_logs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """2-process torchrun whose workers' stdout/stderr land in tmp_path/logs/*/attempt_0/RANK/."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--log-dir={tmp_path / 'logs'}", "--redirects=3", str(ROOT / "train.py"), *args]  # fmt: skip
    env = wandb_env(tmp_path)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wandb_offline_two_processes_log_once_into_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    args = ["logger=wandb", "optimizer.lr=0.05", "trainer.max_steps=20", "trainer.log_every=5",
            "trainer.eval_every=10", f"hydra.run.dir={run_dir}"]  # fmt: skip
    check(torchrun_with_rank_logs(tmp_path, *args))

    # One wandb run, inside the run dir; nothing in the working directory.
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert not (tmp_path / "wandb").exists()
    run_id, run = offline_run(run_dir)
    assert run_id and run_id in str(next(run_dir.glob("wandb/offline-run-*")))

    # The resolved config, and every logged row at its step, equal to metrics.jsonl.
    assert run["config"]["optimizer"]["lr"] == 0.05
    assert run["config"]["trainer"]["max_steps"] == 20
    assert run["config"]["logger"]["name"] == "wandb"
    jsonl = rows(run_dir)
    assert sorted(run["history"]) == sorted({r["step"] for r in jsonl}) == [5, 10, 15, 20]
    for row in jsonl:
        for key, value in row.items():
            if key not in ("step", "epoch"):
                assert run["history"][row["step"]][key] == pytest.approx(value), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run["summary"]["val/accuracy"] == pytest.approx(summary["val/accuracy"])
    assert run["summary"]["diverged"] is False

    # Rank 1 printed nothing; rank 0 printed plain lines (its stdout is a file, not a terminal).
    (rank0,) = tmp_path.glob("logs/*/attempt_0/0")
    (rank1,) = tmp_path.glob("logs/*/attempt_0/1")
    assert (rank1 / "stdout.log").read_text() == "" and (rank1 / "stderr.log").read_text() == ""
    assert "step 10/20 (50%) | epoch 0 | train/loss" in (rank0 / "stdout.log").read_text()

    assert list(tmp_path.glob("wandb-cache/**/core-debug-*.log"))  # the scan saw wandb's logs
    assert files_containing(tmp_path, API_KEY) == []


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    pytest.importorskip("gddist.checkpoint")  # the resume contract: checkpoint.every_steps + auto
    run_dir = tmp_path / "run"
    common = ["logger=wandb", "trainer.log_every=5", "trainer.eval_every=0",
              "checkpoint.every_steps=5", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = wandb_env(tmp_path)

    def train_py(*args):
        cmd = [sys.executable, str(ROOT / "train.py"), *common, *args]
        return check(subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True))

    train_py("trainer.max_steps=10")
    first_id, first = offline_run(run_dir, 0)
    (ckpt,) = run_dir.glob("checkpoints/step_000000010/state.pt")
    assert torch.load(ckpt, weights_only=True)["tracker_run_id"] == first_id

    train_py("trainer.max_steps=20")  # resume=auto: continues from step 10
    second_id, second = offline_run(run_dir, 1)
    assert second_id == first_id
    assert sorted(first["history"]) == [5, 10] and sorted(second["history"]) == [15, 20]
    assert list(tmp_path.glob("wandb-cache/**/core-debug-*.log"))  # the scan saw wandb's logs
    assert files_containing(tmp_path, API_KEY) == []
