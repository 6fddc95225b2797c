"""Crash-safe file writes: write a temporary file in the same directory, fsync, rename into place.

A reader sees either the old file or the complete new one, never a half-written file (rename is
atomic within a filesystem).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file_object)` on a temp file next to `path`, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the rows of a JSONL log whose "step" is beyond `max_step` (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))
