"""Checkpoints that survive crashes and full disks: written whole or not at all, resumed from the
newest good one.

Layout: CKPT_DIR/step_000001200/ holds `state.pt` (model, optimizer, scheduler, grad scaler,
trainer state, config, world size, tracker run id: written by rank 0), `rank_00000.pt` ... (each
rank's RNG states) and `manifest.json` (size and sha256 of every file). A save writes everything
into a hidden `.tmp-step_...` directory; rank 0 waits until every rank's part is there, writes the
manifest and renames the directory into place (replacing a checkpoint of the same step only once
the new one is complete: gddist/checkpoint_files.py). A directory named `step_*` is therefore
complete unless the disk lied, and the manifest catches that (truncated or corrupt files are
reported and skipped). With checkpoint.async=true the same writing runs in a background thread on
a snapshot: CPU copies of the state in staging buffers that are allocated by the first save and
reused by the next ones (pinned memory for CUDA tensors), so a save blocks training only for one
memory copy.

A write the OS refuses (full disk, quota, permissions, read-only filesystem) on ANY rank makes
every rank raise the same `DiskError` (one line naming the checkpoint, the cause and the fix; exit
code 2): the ranks agree on the outcome of each save with one all-reduce, so none is left waiting.
The temporary directory is removed and every complete checkpoint is kept.

Loading uses `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gddist.checkpoint_files import (
    FORMAT,
    MANIFEST,
    STATE,
    TMP_PREFIX,
    CorruptCheckpoint,
    VerifiedCache,
    candidates,
    describe,
    prune_plan,
    rank_file,
    replace_dir,
    safe_load,
    step_name,
    verify,
)
from gddist.config import CheckpointConfig, UserError
from gddist.dist import Dist
from gddist.io import (
    DiskError,
    atomic_save_json,
    atomic_torch_save_hashed,
    is_disk_error,
)
from gddist.staging import Staging, lower_this_threads_priority

log = logging.getLogger("gddist")

__all__ = ["Checkpointer", "CorruptCheckpoint", "SaveFailed", "Staging", "safe_load", "verify"]
_FAILED = ".failed_"  # + rank_file(r): rank r could not write its part (ends rank 0's wait)


class SaveFailed(Exception):
    """A save failed on another rank for a reason that is not the user's to fix (that rank
    raises its own error)."""


class Checkpointer:
    """Saves and finds checkpoints for one run; `save`, `wait` and `find_resume` are collective
    calls (every rank makes them at the same points)."""

    def __init__(
        self, cfg: CheckpointConfig, run_dir: Path, dist: Dist, timeout_s: float = 1800.0
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.timeout_s = timeout_s  # how long rank 0 waits for the other ranks' parts
        self.resumed_from: Path | None = None  # never pruned before a newer good one exists
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._in_flight_step = -1
        self._staging = Staging()
        self._verified = VerifiedCache()  # rank 0's: pruning does not re-hash known checkpoints

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Checkpoint `step`: every rank calls this at the same step with its own `rank_state`;
        `state` is used from rank 0. Nothing named step_* exists until every rank's part is on
        disk; an existing checkpoint of `step` is replaced by the new one.

        Synchronous (default): returns once the checkpoint is complete on every rank, or raises
        on every rank (DiskError when a rank's write was refused by the OS).
        checkpoint.async=true: returns once the state is snapshotted (copied off the live
        tensors into staging buffers); a background thread writes it while training goes on,
        and its failure is raised (on every rank) by the next `save` or `wait`.
        At most one save is in flight: the next save (or `wait`) first waits for the previous
        one, which is what makes reusing the staging buffers safe (the background writer never
        reads a buffer that is being refilled).
        """
        self.wait()
        # A name unique to this save (agreed with a collective here, in the main thread): parts of
        # an earlier, crashed attempt at the same step can never be mistaken for this one's.
        token = self.dist.broadcast_object(os.urandom(6).hex() if self.dist.is_main else None)
        tmp = self.dir / f"{TMP_PREFIX}{step:09d}-{token}"
        if not self.cfg.async_save:
            described: dict[str, Any] = {}
            error = _attempt(lambda: described.update(self._write_part(tmp, state, rank_state)))
            self._agree(error, step)  # every part is on disk, or every rank raises
            if self.dist.is_main:
                error = _attempt(lambda: self._commit(step, tmp, token, described))
            self._agree(error if self.dist.is_main else None, step)
            return
        staged = self._staging.snapshot(self._to_stage(state, rank_state))
        state, rank_state = staged["state"], staged["rank"]
        self._in_flight_step = step
        self._thread = threading.Thread(
            target=self._write_in_background,
            args=(step, tmp, token, state, rank_state),
            daemon=True,
        )
        self._thread.start()

    def reserve(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """checkpoint.async=true: allocate the staging buffers for states shaped like these in
        the background now (e.g. after the first optimizer step, once the optimizer state
        exists), so that the first save is a copy into ready memory. A no-op for synchronous
        checkpoints; not a collective."""
        if self.cfg.async_save:
            self._staging.reserve(self._to_stage(state, rank_state))

    def _to_stage(self, state: dict[str, Any], rank_state: dict[str, Any]) -> dict[str, Any]:
        # Only rank 0 writes the shared state: other ranks stage their own part alone.
        return {"state": state if self.dist.is_main else None, "rank": rank_state}

    def wait(self) -> None:
        """Block until the in-flight background save is complete; if it failed on any rank,
        raise on every rank (a collective when a background save was in flight: every rank
        started one at the same step)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        self._agree(error, self._in_flight_step)

    def _write_in_background(
        self, step: int, tmp: Path, token: str, state: Any, rank_state: Any
    ) -> None:
        """Part and (rank 0) commit, with no collectives: training uses the group meanwhile."""
        try:
            lower_this_threads_priority()
            described = self._write_part(tmp, state, rank_state)
            if self.dist.is_main:
                self._commit(step, tmp, token, described)
        except BaseException as e:  # agreed on and raised by the next wait(), in the main thread
            self._error = e
            if not self.dist.is_main:  # tell rank 0, which may be waiting for this part
                _attempt(lambda: (tmp / (_FAILED + rank_file(self.dist.rank))).touch())

    def _write_part(self, tmp: Path, state: Any, rank_state: Any) -> dict[str, Any]:
        """This rank's file (rank 0: also the shared state) in `tmp`; their size and sha256."""
        tmp.mkdir(parents=True, exist_ok=True)
        own = rank_file(self.dist.rank)
        described = {own: atomic_torch_save_hashed(rank_state, tmp / own)}
        if self.dist.is_main:
            described[STATE] = atomic_torch_save_hashed(state, tmp / STATE)
        return described

    def _commit(self, step: int, tmp: Path, token: str, described: dict[str, Any]) -> None:
        """Rank 0: wait for every rank's part (files appear only when complete), write the
        manifest, rename into place (replacing a checkpoint of this step), prune."""
        expected = [rank_file(r) for r in range(self.dist.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not all((tmp / name).exists() for name in expected):
            failed = sorted(p.name[len(_FAILED) :] for p in tmp.glob(_FAILED + "*"))
            if failed:
                raise SaveFailed(f"checkpoint {tmp.name}: {', '.join(failed)} not written")
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {tmp.name}: not every rank wrote its part")
            time.sleep(0.01)
        files = [STATE, *expected]
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": self.dist.world_size,
            # Rank 0's files were hashed while being written; the other ranks' (small) are read.
            "files": {name: described.get(name) or describe(tmp / name) for name in files},
        }
        atomic_save_json(manifest, tmp / MANIFEST)
        final = self.dir / step_name(step)
        replace_dir(tmp, final, token)
        self._verified.trust(final)
        self._prune(final)

    def _agree(self, error: BaseException | None, step: int) -> None:
        """Every rank learns whether the save failed anywhere (one all-reduce of each rank's
        errno) and raises alike: a DiskError naming the checkpoint when some rank's write was
        refused by the OS (the lowest such rank's cause), else the rank's own error, else
        SaveFailed. Rank 0 then removes the temporary directory (every rank is done with it)."""
        code = _errno_of(error)
        codes = [code]
        if self.dist.distributed:
            t = torch.zeros(self.dist.world_size, dtype=torch.int64, device=self.dist.device)
            t[self.dist.rank] = code
            codes = self.dist.all_reduce_sum(t).tolist()
        if not any(codes):
            return
        if self.dist.is_main:
            for stale in self.dir.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        disk = [c for c in codes if c > 0]
        if disk:
            final = self.dir / step_name(step)
            raise DiskError(final, disk[0], "checkpoint.dir", where=self.dir) from None
        if error is not None:
            raise error
        failed = ", ".join(str(r) for r, c in enumerate(codes) if c)
        raise SaveFailed(f"the checkpoint of step {step} failed on rank(s) {failed}")

    def _prune(self, written: Path) -> None:
        """Keep the `keep_last` newest VERIFIED checkpoints, the one just written and the one
        this run resumed from (see `prune_plan`), and drop temporary dirs of saves that crashed
        (none is in flight: this save was the only one). Verification results are cached, so a
        kept checkpoint is hashed at most once by this process."""
        found = candidates(self.dir)
        doomed = prune_plan(
            found,
            self.cfg.keep_last,
            lambda p: self._verified.problem(p) is None,
            keep={written},
            resumed=self.resumed_from,
        )
        for old in doomed:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ find and load

    def complete(self) -> list[Path]:
        """Checkpoint directories (renamed into place, or moved aside by a replace that did not
        finish) in step order, oldest first."""
        return candidates(self.dir)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, the same on every rank (rank 0 decides).

        resume=never: None. resume=<path>: that checkpoint, or a UserError saying why not.
        resume=auto: the newest checkpoint that verifies; each bad one is reported in one line and
        skipped for the previous one; None when there is none (a fresh start).
        """
        choice: Path | None = None
        if self.dist.is_main:
            choice = self._choose()
        self.resumed_from = self.dist.broadcast_object(choice)
        return self.resumed_from

    def _choose(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            try:
                verify(path)
            except CorruptCheckpoint as e:
                raise UserError(f"checkpoint.resume={resume}: {e}") from None
            return path
        for path in reversed(self.complete()):
            problem = self._verified.problem(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(shared state, this rank's state or None when the checkpoint had fewer ranks)."""
        state = safe_load(path / STATE)
        own = path / rank_file(self.dist.rank)
        return state, (safe_load(own) if own.exists() else None)


def _attempt(action: Any) -> BaseException | None:
    """Run `action()`; the exception it raised, or None."""
    try:
        action()
    except Exception as e:
        return e
    return None


def _errno_of(error: BaseException | None) -> int:
    """0: no error; the errno of a write the OS refused (DISK_ERRNOS); -1: any other error."""
    if error is None:
        return 0
    if isinstance(error, DiskError):
        return error.errno
    return error.errno if is_disk_error(error) else -1
