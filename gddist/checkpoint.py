"""Checkpoints that survive crashes: written whole or not at all, resumed from the newest good one.

Layout: CKPT_DIR/step_000001200/ holds `state.pt` (model, optimizer, scheduler, trainer state,
config, world size, tracker run id: written by rank 0), `rank_00000.pt` ... (each rank's RNG
states) and `manifest.json` (size and sha256 of every file). A save writes everything into a
hidden `.tmp-step_...` directory, waits for all ranks, writes the manifest and renames the
directory into place; a directory named `step_*` is therefore complete unless the disk lied, and the
manifest catches that (truncated or corrupt files are reported and skipped).

Loading uses `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gddist.config import CheckpointConfig, UserError
from gddist.dist import Dist
from gddist.io import atomic_save_json, atomic_torch_save

log = logging.getLogger("gddist")

FORMAT = 1
STATE = "state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{9})$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class CorruptCheckpoint(Exception):
    """A checkpoint directory that is incomplete, truncated, corrupt or unsafe to load."""


class Checkpointer:
    """Saves and finds checkpoints for one run; `save` and `find_resume` are collective calls."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dist: Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write a checkpoint of `step` (every rank passes its own `rank_state`; `state` is
        used from rank 0). Returns the final directory. Nothing named step_* exists until every
        rank's part is on disk."""
        final = self.dir / f"step_{step:09d}"
        tmp = self.dir / f".tmp-step_{step:09d}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
            tmp.mkdir(parents=True)
        self.dist.barrier()
        atomic_torch_save(rank_state, tmp / rank_file(self.dist.rank))
        if self.dist.is_main:
            atomic_torch_save(state, tmp / STATE)
        self.dist.barrier()  # every rank's part is written and fsynced
        if self.dist.is_main:
            files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".pt")
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": self.dist.world_size,
                "files": {name: _describe(tmp / name) for name in files},
            }
            atomic_save_json(manifest, tmp / MANIFEST)
            if final.exists():  # this step was saved already (a final save after a periodic one)
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
                _fsync_dir(self.dir)
            self._prune()
        self.dist.barrier()
        return final

    def _prune(self) -> None:
        """Keep the `keep_last` newest complete checkpoints; never the newest one goes."""
        complete = self.complete()
        for old in complete[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ find and load

    def complete(self) -> list[Path]:
        """Checkpoint directories (renamed into place) in step order, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name))

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, the same on every rank (rank 0 decides).

        resume=never: None. resume=<path>: that checkpoint, or a UserError saying why not.
        resume=auto: the newest checkpoint that verifies; each bad one is reported in one line and
        skipped for the previous one; None when there is none (a fresh start).
        """
        choice: Path | None = None
        if self.dist.is_main:
            choice = self._choose()
        return self.dist.broadcast_object(choice)

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
            try:
                verify(path)
                return path
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %s: %s", path, e)
        return None

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(shared state, this rank's state or None when the checkpoint had fewer ranks)."""
        state = safe_load(path / STATE)
        own = path / rank_file(self.dist.rank)
        return state, (safe_load(own) if own.exists() else None)


def verify(path: Path) -> None:
    """Raise CorruptCheckpoint unless every file in the manifest has its recorded size and hash,
    and the shared state loads with weights_only=True."""
    if not path.is_dir():
        raise CorruptCheckpoint(f"{path} is not a checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"no readable {MANIFEST} ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"format {manifest.get('format')!r}, this gddist reads {FORMAT}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if file.stat().st_size != expected["size"]:
            raise CorruptCheckpoint(
                f"{name} is truncated or changed ({file.stat().st_size} bytes, "
                f"expected {expected['size']})"
            )
        if _sha256(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"{name} is corrupt (checksum mismatch)")
    safe_load(path / STATE)


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True; a file that needs pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpoint(
            f"{path.name} needs pickled code to load and is refused (weights_only=True): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CorruptCheckpoint(f"{path.name} cannot be read ({str(e).splitlines()[0]})") from None


def _describe(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
