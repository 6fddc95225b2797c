"""Hydra callbacks. `SweepReport` writes the sweep report when a multirun ends:

    hydra:
      callbacks:
        report:
          _target_: gddist.hydra_callbacks.SweepReport
          metric: train/loss     # any gddist.report.ReportSpec field
          tolerance: 0.01

Every conf/experiment/* preset sets it, so `python train.py -m experiment=NAME` ends with
MULTIRUN_DIR/report.md and report.png and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class SweepReport(Callback):
    def __init__(self, **options: Any) -> None:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        from gddist.report import spec_from_dict

        plain = {
            k: OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v
            for k, v in options.items()
        }
        self.spec = spec_from_dict(plain)  # a bad option fails before the sweep starts

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Jobs run one after another in this process: import torchmetrics (used at the first
        # evaluation) now, so the first job's wall time does not carry the one-time import.
        import torchmetrics  # noqa: F401

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from gddist.dist import detect_launch
        from gddist.report import write_report

        # Under a launcher with several processes per job, rank 0 alone writes shared files.
        if detect_launch().rank != 0:
            return
        print(write_report(Path(config.hydra.sweep.dir), self.spec), flush=True)
