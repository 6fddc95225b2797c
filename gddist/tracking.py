"""Where metrics go, from rank 0 only: RUN_DIR/metrics.jsonl (always), the console (a progress bar
or plain lines, gddist/progress.py) and, with `logger=wandb`, a Weights & Biases run.

Other ranks get a tracker that drops everything, so call sites never ask "am I rank 0?".

wandb contract (`logger=wandb`):
- rank 0 only; the resolved run config is the wandb config; every logged row is logged at its
  optimizer step; the final summary goes to the run summary.
- the run's files live in RUN_DIR/wandb/ (one dir holds everything of a run).
- `run_id` is saved in checkpoints and handed back to `build` on resume, so a resumed or requeued
  run continues the same wandb run (offline: a new offline-run-* dir with the same id, which
  `wandb sync` appends to that run).
- the API key comes from WANDB_API_KEY or wandb's login file and is never read, logged or stored
  by gddist; `WANDB_MODE=offline` (or `logger.mode=offline`) works with no account.
- wandb is imported only when `logger=wandb` (it costs about a second at startup).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from gddist import progress
from gddist.config import LoggerConfig
from gddist.io import disk_errors, repair_jsonl_tail


class Tracker:
    """Rank 0's tracker: one JSON object per row in metrics.jsonl (appended), the console, wandb."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        config: dict[str, Any],
        run_id: str | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        repair_jsonl_tail(self.path)  # a row torn by a crash must not swallow the next one
        with disk_errors(self.path):
            # Unbuffered: each row is one write, and nothing is left in a buffer to be flushed
            # (and fail again) at exit after a refused write.
            self._file = self.path.open("ab", buffering=0)
        if total_steps is None and "trainer" in config:  # the resolved run config
            total_steps = config["trainer"]["max_steps"]
        # Progress before wandb: wandb wraps sys.stdout, and the bar/lines choice looks at it.
        self.progress = progress.make(cfg.progress, stream or sys.stdout, total_steps, start_step)
        self._wandb = WandbRun(Path(run_dir), cfg, config, run_id) if cfg.name == "wandb" else None

    @property
    def run_id(self) -> str | None:
        """The external run's id (wandb), None for JSONL alone: saved in checkpoints."""
        return self._wandb.id if self._wandb else None

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (a single write of a whole line: a crash can tear only the last one).
        A write the OS refuses (full disk...) is a DiskError naming metrics.jsonl."""
        text = json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"
        with disk_errors(self.path):
            line = memoryview(text.encode())
            while line:
                line = line[self._file.write(line) :]
        self.progress.update(row)
        if self._wandb:
            self._wandb.log(row)

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's final summary (the trainer also writes it to summary.json)."""
        if self._wandb:
            self._wandb.finish(summary)

    def close(self) -> None:
        self.progress.close()
        self._file.close()
        if self._wandb:
            self._wandb.close()


class NullTracker:
    """A non-zero rank's tracker: writes and prints nothing."""

    run_id: str | None = None

    def log(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class WandbRun:
    """One wandb run in RUN_DIR/wandb/, created or (given `run_id`) resumed."""

    def __init__(
        self, run_dir: Path, cfg: LoggerConfig, config: dict[str, Any], run_id: str | None
    ) -> None:
        import wandb  # lazy: only logger=wandb pays for the import

        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,  # None: WANDB_MODE, else online
            tags=cfg.tags or None,
            name="/".join(run_dir.parts[-2:]),  # e.g. 2025-01-31/12-00-00, or SWEEP_TIME/3
            dir=str(run_dir),
            config=config,
            id=run_id,
            # "allow": continue run_id when it exists (resume, requeue), else start it.
            resume="allow" if run_id else None,
        )
        self.id: str = self._run.id
        self._exit_code = 0

    def log(self, row: dict[str, Any]) -> None:
        # Train and eval rows of one step share the wandb step; wandb merges them.
        self._run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self._run.summary.update({k: v for k, v in summary.items() if v is not None})
        if summary.get("signal"):  # stopped to be requeued: it will resume this same run
            self._run.mark_preempting()
        # A diverged run is marked failed in the wandb UI (the CLI exits 3 for it too).
        self._exit_code = 3 if summary.get("diverged") else 0

    def close(self) -> None:
        self._run.finish(exit_code=self._exit_code)


def build(
    run_dir: Path,
    is_main: bool,
    cfg: LoggerConfig,
    config: dict[str, Any],
    run_id: str | None = None,
    total_steps: int | None = None,
    start_step: int = 0,
) -> Tracker | NullTracker:
    """The tracker for this rank. `config` is the resolved run config (logged by wandb); `run_id`
    is the id saved in the checkpoint being resumed, if any; `total_steps` (default: the config's
    trainer.max_steps) and `start_step` (the resumed step) place the progress bar and its ETA."""
    if not is_main:
        return NullTracker()
    return Tracker(run_dir, cfg, config, run_id, total_steps, start_step)


def _jsonable(v: Any) -> Any:
    # JSON has no inf/nan; a diverged loss is written as the string "inf" / "nan".
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
