"""Where metrics go: console lines and RUN_DIR/metrics.jsonl, written by rank 0 only.

Other ranks get a tracker that drops everything, so call sites never ask "am I rank 0?".
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from gddist.config import LoggerConfig

log = logging.getLogger("gddist")


class Tracker:
    """Rank 0's tracker: one JSON object per row in metrics.jsonl (appended), a console line.

    `run_id` identifies the run for external trackers (None for JSONL alone); it is saved in
    checkpoints and handed back to `build` on resume so the same external run continues.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict[str, Any]) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self.run_id: str | None = None

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        log.info(format_row(row))

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's final summary (also written to summary.json by the trainer)."""

    def close(self) -> None:
        self._file.close()


class NullTracker:
    """A non-zero rank's tracker: writes nothing."""

    run_id: str | None = None

    def log(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def build(
    run_dir: Path,
    is_main: bool,
    cfg: LoggerConfig,
    config: dict[str, Any],
    run_id: str | None = None,
) -> Tracker | NullTracker:
    """The tracker for this rank. `config` is the resolved run config (logged by external
    trackers); `run_id` is the id saved in the checkpoint being resumed, if any."""
    return Tracker(run_dir, cfg, config) if is_main else NullTracker()


def format_row(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']}", f"epoch {row['epoch']}"]
    for key, value in row.items():
        if key in ("step", "epoch"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def _jsonable(v: Any) -> Any:
    # JSON has no inf/nan; a diverged loss is written as the string "inf" / "nan".
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
