"""Agreeing on a stop signal across ranks: every rank stops on the same step, soon, cheaply.

A signal reaches one process (SIGTERM to one worker, SLURM's SIGUSR1 to the batch step, Ctrl-C);
all ranks must still stop on the same step and save one checkpoint. So the ranks vote: an async
all-reduce MAX of each rank's received signal. The design:

- A vote is POSTED at a step every rank agrees on, and WAITED for on the NEXT step by every rank
  (`work.wait()`), which then acts on its result: stop at that step when any rank had a signal.
  Every branch is taken on a step number the ranks computed alike, never on a local clock or on
  whether the all-reduce happens to be complete locally (`is_completed()` differs by rank), so
  (a) every rank acts on the same step. The wait is cheap: the vote had a whole step to
  complete, and that step's gradient all-reduce, queued after it on the same group, already
  synchronized the ranks.
- The vote also carries each rank's proposal for the number of steps to the next vote:
  floor(trainer.stop_check_s / its measured step time), between 1 and trainer.stop_check_every.
  The MIN of the proposals is the agreed interval k; the next vote is posted at the first step
  s with (s + 1) % k == 0 (stop steps fall on multiples of k, e.g. of 10 with fast steps). The
  first vote is posted at the loop's first step (an early signal acts at step start + 2).
- So (b) a signal is acted on one step after the vote that carries it completes, and at most
  about k + 1 steps after it arrives: within stop_check_every steps and within stop_check_s
  seconds (at the step time measured at the previous vote) plus one to two steps, however slow
  a step is (slow steps vote every step). (c) Fast steps vote only every stop_check_every steps:
  one small all-reduce and one wait per interval.

A world of one needs no vote: the local signal is acted on at the step it arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gddist.dist import Dist


class StopVote:
    """The stop-signal vote of one training loop; `poll` after every optimizer step."""

    def __init__(self, dist: Dist, every: int, seconds: float, step: int) -> None:
        """`every`/`seconds`: trainer.stop_check_every / stop_check_s; `step`: the step the loop
        starts from (the same on every rank)."""
        self.dist, self.every, self.seconds = dist, every, seconds
        self._post_at = step + 1
        self._posted_step, self._posted_time = step, time.perf_counter()
        self._pending: Callable[[], list[int]] | None = None

    def poll(self, step: int, received: int) -> int:
        """The agreed stop signal after optimizer step `step` (0: go on), the same on every rank.
        Every rank must call it after every step, with the signal it received (0: none)."""
        if not self.dist.distributed:
            return received
        if self._pending is not None and step == self._posted_step + 1:
            signum, minus_interval = self._pending()
            self._pending = None
            if signum:
                return signum
            interval = -minus_interval
            self._post_at = step + (-(step + 1)) % interval
        if self._pending is None and step == self._post_at:
            now = time.perf_counter()
            step_s = (now - self._posted_time) / max(1, step - self._posted_step)
            fit = int(self.seconds // step_s) if step_s > 0 else self.every
            self._pending = self.dist.max_async([received, -min(self.every, max(1, fit))])
            self._posted_step, self._posted_time = step, now
        return 0

    def close(self) -> None:
        """Complete the vote in flight (every rank posted it, so every rank must wait for it)."""
        if self._pending is not None:
            self._pending()
            self._pending = None
