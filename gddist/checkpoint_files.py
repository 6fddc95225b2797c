"""Checkpoint directories on disk: names, verification, replacing one in place, what to prune.

CKPT_DIR/step_000001200/ holds `state.pt`, `rank_00000.pt` ... and `manifest.json` (size and
sha256 of every file); see gddist/checkpoint.py for who writes what.

Names in CKPT_DIR:
- `step_NNNNNNNNN`: a checkpoint renamed into place (complete unless the disk lied: `verify`).
- `.tmp-step_NNNNNNNNN-TOKEN`: a save in progress, or the remains of one that crashed.
- `.old-step_NNNNNNNNN-TOKEN`: a complete checkpoint moved aside by `replace_dir` while a new one
  of the same step takes its name. A crash between the two renames leaves the old one only
  here: `candidates` lists it as a checkpoint of its step, so resume still finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
STATE = "state.pt"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-step_"
_NAME = re.compile(r"^step_(\d{9})$")
_ASIDE = re.compile(r"^\.old-step_(\d{9})-[0-9a-f]+$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_name(step: int) -> str:
    return f"step_{step:09d}"


class CorruptCheckpoint(Exception):
    """A checkpoint directory that is incomplete, truncated, corrupt or unsafe to load."""


def step_of(path: Path) -> int:
    """The step of a `step_*` or `.old-step_*` directory."""
    match = _NAME.match(path.name) or _ASIDE.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint")
    return int(match.group(1))


def candidates(directory: Path) -> list[Path]:
    """The checkpoints in `directory`, oldest first: every `step_*` dir and every `.old-step_*`
    one (moved aside by a replace that may have crashed half-way); at one step, the `step_*` dir
    comes last, i.e. it is preferred by a newest-first search."""
    if not directory.is_dir():
        return []
    found = [
        (step_of(p), bool(_NAME.match(p.name)), p.name, p)
        for p in directory.iterdir()
        if p.is_dir() and (_NAME.match(p.name) or _ASIDE.match(p.name))
    ]
    return [p for *_, p in sorted(found)]


def replace_dir(tmp: Path, final: Path, token: str) -> None:
    """Rename the complete checkpoint `tmp` to `final`. An existing `final` (this step was saved
    before) is moved aside first and deleted only once the new one is in place and the directory
    entry is on disk: at every instant one complete checkpoint of this step is on disk, under
    `final` or under the aside name that `candidates` lists."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    aside = final.with_name(f".old-{final.name}-{token}")
    os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def prune_plan(
    found: list[Path],
    keep_last: int,
    verified: Callable[[Path], bool],
    keep: Collection[Path] = (),
    resumed: Path | None = None,
) -> list[Path]:
    """Which of the checkpoints `found` (oldest first, as `candidates` lists them) to delete.

    Kept: the `keep_last` newest VERIFIED checkpoints, one per step (a corrupt one counts for
    nothing), every path in `keep` (the one just written), and `resumed` (the checkpoint this
    run started from) while no other kept verified checkpoint is as new. Deleted: everything
    older than the oldest kept one, corrupt or not, and the other copies of a kept step (an
    aside left by a crashed replace). Corrupt checkpoints newer than that are left alone:
    nothing counts on them, and a later save at their step replaces them. So at least one good
    checkpoint always stays. `verified` is called newest first, only until `keep_last` good
    ones are found.
    """
    newest: list[Path] = []
    for path in reversed(found):
        if len(newest) == keep_last:
            break
        if any(step_of(p) == step_of(path) for p in newest):
            continue
        if path in keep or verified(path):
            newest.append(path)
    kept = set(newest) | {p for p in keep if p in found}
    if resumed in found and not any(
        p != resumed and step_of(p) >= step_of(resumed) for p in newest
    ):
        kept.add(resumed)
    if not kept:
        return []
    cutoff = min(step_of(p) for p in kept)
    kept_steps = {step_of(p) for p in kept}
    return [p for p in found if p not in kept and (step_of(p) < cutoff or step_of(p) in kept_steps)]


class VerifiedCache:
    """`verify` results per directory, reused while none of its files changed (same names,
    sizes, mtimes and inodes): pruning after every save must not re-hash every kept checkpoint.
    A checkpoint this process wrote itself is `trust`ed: its files were hashed while written."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[Any, str | None]] = {}

    def problem(self, path: Path) -> str | None:
        """None when `path` verifies, else why not (CorruptCheckpoint's message)."""
        signature = _signature(path)
        known = self._known.get(path)
        if signature is not None and known is not None and known[0] == signature:
            return known[1]
        try:
            verify(path)
            problem = None
        except CorruptCheckpoint as e:
            problem = str(e)
        if signature is not None:
            self._known[path] = (signature, problem)
        return problem

    def trust(self, path: Path) -> None:
        signature = _signature(path)
        if signature is not None:
            self._known[path] = (signature, None)


def _signature(path: Path) -> Any:
    try:
        with os.scandir(path) as entries:
            stats = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    except OSError:
        return None
    return tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats))


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
        try:
            digest = sha256(file)
        except OSError as e:
            raise CorruptCheckpoint(f"{name} cannot be read ({e.strerror})") from None
        if digest != expected["sha256"]:
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


def describe(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": sha256(file)}


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
