"""The run dir: its name, its lock, and fresh starts that never mix two runs.

Name (used when `hydra.run.dir` is not given): `outputs/<label>-<hash>`, where the hash covers the
run's identity (`gddist.keys.identity`: the resolved config minus the keys that do not change the
optimization) and the launcher's job identity, if there is one. The same command therefore finds
the same run dir on every rank, after a restart, and on a rerun days later (so it resumes), while
another config is another run dir. Under SLURM the job identity is the job id (array job and task
for arrays) AND the job step: a requeued job (same id, same step number) comes back to its run
dir, two `srun`s of one job are two runs. `GDDIST_RUN_NAME` names the dir outright.

Lock: one live run per run dir. Rank 0 holds `RUN_DIR/.lock` (host, pid, start time, job) for the
run's life and refreshes its mtime every `HEARTBEAT_S`. A second launch exits 2 naming the holder.
A lock is stale, and taken over, when its holder is on this host and no longer alive, when it is a
restart of the same job (torchrun's `--max-restarts`, a SLURM requeue on another node), or when it
has not been refreshed for `STALE_S` (a holder on another host that died).

Archive: a fresh start in a used run dir (`checkpoint.resume=never`, a resume from a checkpoint
that is not this dir's newest, or `resume=auto` finding nothing usable) first moves the previous
outputs into `RUN_DIR/archive/<UTC time>/`; nothing is deleted, and the run dir then holds only
the new run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gddist import keys
from gddist.config import UserError

log = logging.getLogger("gddist")

LOCK = ".lock"
HEARTBEAT_S = 15.0
STALE_S = 120.0
# What a run writes into its run dir (besides Hydra's .hydra/ and log, which describe launches).
OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "model.pt",
    "preprocessing.json",
    "config.json",
    "plots",
)
ARCHIVE = "archive"


# ---------------------------------------------------------------------------- name


def job_identity(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher's job this process belongs to, stable across requeues: `slurm-<job>.<step>`
    (`slurm-<array job>_<task>.<step>` for arrays; step `batch` outside srun), else None."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    elif env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
    else:
        return None
    return f"slurm-{job}.{env.get('SLURM_STEP_ID') or 'batch'}"


def run_name(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str:
    """The run dir name for a resolved config (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("GDDIST_RUN_NAME"):
        return env["GDDIST_RUN_NAME"]
    job = job_identity(env)
    blob = json.dumps({"config": keys.identity(config), "job": job}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{job or _label(config)}-{digest}"


def _label(config: Mapping[str, Any]) -> str:
    """A readable prefix: data-model-optimizer (a custom model by its class name)."""
    model = config.get("model") or {}
    model_name = model.get("name") or "model"
    if model.get("_target_"):
        model_name = str(model["_target_"]).rsplit(".", 1)[-1]
    parts = [
        (config.get("data") or {}).get("name") or "data",
        model_name,
        (config.get("optimizer") or {}).get("name") or "optimizer",
    ]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts))


def resume_command(run_dir: Path, signum: int) -> str:
    """What to run to resume a run stopped by signal `signum`: the command of this launch
    (torchrun's own when torchrun started this worker), or how to resubmit a SLURM job."""
    from gddist.dist import detect_launch

    if job_identity() is not None:
        if signum == signal.SIGUSR1:
            return "nothing: the job was requeued and resumes by itself"
        return f"resubmit the job with hydra.run.dir={Path(run_dir).absolute()} among its overrides"
    command = list(sys.orig_argv)
    if detect_launch().launcher == "torchrun":
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            parent = [a.decode() for a in parent if a]
        except OSError:
            parent = []
        if any("torch.distributed.run" in a or a.endswith("torchrun") for a in parent[:3]):
            command = parent
    return shlex.join(command)


def check_creatable(path: Path) -> None:
    """Raise UserError (one line) unless `path` is, or can be made, a writable directory."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(
            f"run dir {path} cannot be created: {probe} is a file, not a directory; "
            "choose another hydra.run.dir (or remove the file)"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(
            f"run dir {path} cannot be created: no write permission in {probe}; "
            "choose a writable hydra.run.dir"
        )


# ---------------------------------------------------------------------------- lock


def _process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def _launch_job(environ: Mapping[str, str]) -> str | None:
    """What a restart of this launch shares: the SLURM job step, else torchrun's run id."""
    job = job_identity(environ)
    if job is None and environ.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        job = f"torchrun-{environ['TORCHELASTIC_RUN_ID']}"
    return job


class RunLock:
    """The lock of one run dir, held by rank 0 (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "job": _launch_job(os.environ),
        }

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, text = self._read()
                if holder is not None and not self._stale(holder):
                    raise UserError(self._busy(holder)) from None
                if holder is None and time.time() - self._mtime() < STALE_S:
                    time.sleep(0.2)  # being written by a launch that just created it
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if self.path.read_text() == text:  # still the stale one: not a new holder's
                        self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
            return
        holder, _ = self._read()
        raise UserError(self._busy(holder or {}))

    def release(self) -> None:
        """Give the lock up (a no-op when not held); only our own lock file is removed."""
        if not self.held:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder, _ = self._read()
        if holder is not None and self._is_me(holder):
            self.path.unlink(missing_ok=True)
        self.held = False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            text = self.path.read_text()
            holder = json.loads(text)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, None
        return (holder if isinstance(holder, dict) else None), text

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _is_me(self, holder: Mapping[str, Any]) -> bool:
        return holder.get("host") == self._me["host"] and holder.get("pid") == self._me["pid"]

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        if self._is_me(holder):  # this process ran a run here before (in-process reruns)
            return True
        if holder.get("host") == self._me["host"]:
            return not _alive(int(holder.get("pid", -1)), holder.get("process_start"))
        if holder.get("job") and holder.get("job") == self._me["job"]:
            return True  # a restart or requeue of the same job, now on another host
        return time.time() - self._mtime() > STALE_S

    def _busy(self, holder: Mapping[str, Any]) -> str:
        who = ", ".join(
            f"{k} {holder[k]}" for k in ("host", "pid", "started", "job") if holder.get(k)
        )
        return (
            f"run dir {self.path.parent} is in use by another run ({who or 'unknown holder'}); "
            "wait for it to end or stop it, or pass another hydra.run.dir. If that process is "
            f"gone, delete {self.path}"
        )


def lock(run_dir: Path, dist: Any) -> RunLock:
    """Rank 0 takes the run dir's lock; every rank raises the same UserError if it is held.
    A collective call (rank 0's outcome is broadcast)."""
    held = RunLock(run_dir)
    error = None
    if dist.is_main:
        try:
            held.acquire()
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    return held


# ---------------------------------------------------------------------------- fresh starts


def used(run_dir: Path, ckpt_dir: Path) -> bool:
    """Whether the run dir (or the checkpoint dir) holds another run's outputs."""
    if any((Path(run_dir) / name).exists() for name in OUTPUTS if name != "checkpoints"):
        return True
    return Path(ckpt_dir).is_dir() and any(Path(ckpt_dir).iterdir())


def archive(run_dir: Path, ckpt_dir: Path) -> Path | None:
    """Move the previous run's outputs (and its checkpoints, wherever checkpoint.dir put them)
    into RUN_DIR/archive/<UTC time>/; return that dir, or None when there was nothing to move.
    Nothing is deleted."""
    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    if not used(run_dir, ckpt_dir):
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = run_dir / ARCHIVE / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / ARCHIVE / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in OUTPUTS:
        src = ckpt_dir if name == "checkpoints" else run_dir / name
        if src.exists():
            shutil.move(str(src), str(dest / name))  # a rename within one filesystem
    log.warning("run dir %s: archived the previous run's outputs to %s", run_dir, dest)
    return dest


def start_clean(
    run_dir: Path, ckpt_dir: Path, resume_mode: str, chosen: Path | None, newest: Path | None
) -> Path | None:
    """Decide (on rank 0) whether this run continues the run dir's history or starts a new one,
    archiving the old one in the second case; return the checkpoint to load (moved along if it
    was archived). `chosen` is the checkpoint resume selected (None: a fresh start); `newest`
    the newest complete checkpoint of ckpt_dir."""
    continues = chosen is not None and (
        resume_mode == "auto" or (newest is not None and _same(chosen, newest))
    )
    if continues:
        return chosen
    moved = archive(run_dir, ckpt_dir)
    if chosen is not None and moved is not None and _inside(chosen, ckpt_dir):
        chosen = moved / "checkpoints" / Path(chosen).resolve().relative_to(ckpt_dir.resolve())
        # The new run continues that part of the old history: its log up to the checkpoint
        # (the loader truncates the rows after the resumed step) comes back with it.
        if (moved / "metrics.jsonl").exists():
            shutil.copy2(moved / "metrics.jsonl", Path(run_dir) / "metrics.jsonl")
    return chosen


def continue_or_archive(
    run_dir: Path, checkpointer: Any, resume_mode: str, dist: Any
) -> Path | None:
    """The checkpoint a run loads (None: a fresh start), after a fresh start in a used run dir
    has archived the old run. A collective call: rank 0 decides, every rank gets its answer."""
    chosen = checkpointer.find_resume()
    if dist.is_main:
        complete = checkpointer.complete()
        newest = complete[-1] if complete else None
        chosen = start_clean(run_dir, checkpointer.dir, resume_mode, chosen, newest)
    return dist.broadcast_object(chosen)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True
