"""Console progress for rank 0: a tqdm bar on a terminal, plain periodic lines elsewhere.

`logger.progress=auto` picks the bar when the stream (stdout) is a terminal and lines when it is
not (CI logs, SLURM output files, pipes), where a bar's carriage returns would be noise. The bar
shows step/total, ETA, train loss, LR and samples/s; evaluation rows are printed above it. A line
shows the same fields as text, once per logged row, with an ETA from the steps done so far.
Non-zero ranks never build a Progress (their tracker is a NullTracker).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import time
from typing import Any, TextIO

log = logging.getLogger("gddist")

_clock = time.monotonic  # the ETA's clock (tests replace it)


class Progress:
    """Shows one logged row at a time. Subclasses: Bar, Lines, and this do-nothing base."""

    def update(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Lines(Progress):
    """One line per logged row, through the `gddist` logger (Hydra sends it to stdout and to
    RUN_DIR/<job>.log), e.g. `step 50/240 (21%) | epoch 4 | train/loss 0.5312 | lr 0.1 | ...
    | eta 0:00:03`."""

    def __init__(self, total_steps: int | None, start_step: int) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.started = _clock()

    def update(self, row: dict[str, Any]) -> None:
        line = format_row(row, self.total)
        eta = self._eta(row["step"])
        log.info(f"{line} | eta {eta}" if eta else line)

    def _eta(self, step: int) -> str | None:
        """Remaining steps at the mean pace of this process so far (evaluations included)."""
        done = step - self.start_step
        if not self.total or done <= 0:
            return None
        seconds = (self.total - step) * (_clock() - self.started) / done
        return str(datetime.timedelta(seconds=round(seconds)))


class Bar(Progress):
    """A tqdm bar on `stream`. While it is open, console log records (Hydra's stdout handler)
    are routed through tqdm.write so they print above the bar instead of through it."""

    def __init__(self, total_steps: int | None, start_step: int, stream: TextIO) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # A terminal that reports no size (some ptys) would get an invisible bar: then take the
        # size from COLUMNS/LINES or 80x24.
        sized = _terminal_width(stream) > 0
        fallback = shutil.get_terminal_size()
        # initial=start_step: a resumed run's rate and ETA count only the steps it runs itself.
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            file=stream,
            unit="step",
            dynamic_ncols=sized,
            ncols=None if sized else fallback.columns,
            nrows=None if sized else fallback.lines,
        )
        self._stream = stream
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def update(self, row: dict[str, Any]) -> None:
        if "train/loss" not in row:  # an evaluation row: one line above the bar
            self._bar.write(format_row(row, self._bar.total), file=self._stream)
            return
        postfix = {"loss": f"{row['train/loss']:.4g}", "lr": f"{row['lr']:.3g}"}
        if "samples/s" in row:
            postfix["samples/s"] = f"{row['samples/s']:.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(row["step"] - self._bar.n)  # redraws, with the new postfix

    def close(self) -> None:
        self._bar.close()
        self._redirect.close()


def make(mode: str, stream: TextIO, total_steps: int | None, start_step: int = 0) -> Progress:
    """The progress display for `mode` (auto: Bar when `stream` is a terminal, else Lines).

    `total_steps` (None: unknown, so no percentage or ETA) and `start_step` (> 0 when resuming)
    place the run; the ETA counts from the moment this is called.
    """
    if mode == "auto":
        mode = "bar" if _isatty(stream) else "lines"
    if mode == "bar":
        return Bar(total_steps, start_step, stream)
    if mode == "lines":
        return Lines(total_steps, start_step)
    return Progress()


def format_row(row: dict[str, Any], total_steps: int | None = None) -> str:
    """`step 50/240 (21%) | epoch 4 | key value | ...` with floats to 4 significant digits."""
    step = row["step"]
    head = f"step {step}"
    if total_steps:
        head += f"/{total_steps} ({100 * step / total_steps:.0f}%)"
    parts = [head, f"epoch {row['epoch']}"]
    for key, value in row.items():
        if key in ("step", "epoch"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a file (io.UnsupportedOperation), closed
        return 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or non-file stream
        return False
