"""Stop requests from outside: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's preemption warning).

A handler only records the signal; the training loop decides when to act on it, together with
every other rank (docs/architecture.md, invariant 4: a stop is all-reduced so all ranks stop on
the same step, save one checkpoint and exit). A second Ctrl-C does not wait: it raises
KeyboardInterrupt at once (the last complete checkpoint stays intact, since checkpoints are
renamed into place only when complete).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from types import FrameType

log = logging.getLogger("gddist")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# A SIGUSR1 received before the training loop took over (see `record_early_sigusr1`).
_early: int | None = None


def record_early_sigusr1() -> None:
    """Record a SIGUSR1 that arrives while the process is still starting (imports, data loading)
    instead of dying of it (its default action): SLURM's preemption warning can come at any
    time, and the requeue it asks for needs a process that lives to checkpoint. `StopSignals`
    acts on a recorded one at the first step every rank agrees on. Call it first thing, in the
    main thread (train.py does). SIGTERM and Ctrl-C keep their defaults during startup: there is
    nothing to save yet."""

    def record(signum: int, frame: FrameType | None) -> None:
        global _early
        if _early is None:
            _early = signum

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, record)


class StopSignals:
    """Records the first stop signal this process receives; use as a context manager."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        global _early
        if _early is not None:  # arrived during startup: act on it like one arriving now
            early, _early = _early, None
            self._handle(early, None)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            log.warning(
                "received %s: stopping at the next agreed step after saving a checkpoint "
                "(Ctrl-C again to exit at once)",
                signal.Signals(signum).name,
            )


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Ask SLURM to requeue this job (after a preemption warning); False outside SLURM.

    The requeued job keeps its job id, so it finds the same run dir and resumes from the
    checkpoint just written.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s: %s", job, e)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from the checkpoint just saved", job)
    return True
