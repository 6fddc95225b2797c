"""Models for launch tests (`model=custom model._target_=launch_models.X`; tests/ is on PYTHONPATH).

Both have the same parameters and initialisation as `models_for_tests.TinyNet`, so a run with
the slow-down or the fault switched off is the reference run.
"""

import os
import time
from pathlib import Path

from models_for_tests import TinyNet


class SlowNet(TinyNet):
    """TinyNet that sleeps `delay_s` in each training forward pass: a job that is still running
    when the test signals it, whatever the machine's speed."""

    def __init__(self, in_features: int, out_features: int, delay_s: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.delay_s = delay_s

    def forward(self, x):
        if self.training and self.delay_s:
            time.sleep(self.delay_s)
        return super().forward(x)


class CrashOnceNet(TinyNet):
    """TinyNet whose rank-0 process dies (exit 1) at its `at_call`-th training forward pass, once
    per `marker` file: the restarted worker finds the marker and trains on."""

    def __init__(
        self, in_features: int, out_features: int, marker: str = "", at_call: int = 0
    ) -> None:
        super().__init__(in_features, out_features)
        self.marker, self.at_call, self.calls = Path(marker), at_call, 0
        self.armed = bool(marker) and os.environ.get("RANK", "0") == "0"

    def forward(self, x):
        if self.training and self.armed:
            self.calls += 1
            if self.calls == self.at_call and not self.marker.exists():
                self.marker.touch()
                os._exit(1)
        return super().forward(x)
