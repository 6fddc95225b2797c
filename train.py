"""gddist entry point: one command for a laptop, one machine with N GPUs, and SLURM.

    python train.py                                          # default example on CPU, seconds
    python train.py optimizer=adam optimizer.lr=0.01 trainer.max_steps=500
    python train.py data=csv data.path=my.csv data.target=label model=mlp
    torchrun --standalone --nproc_per_node=2 train.py        # same math on 2 processes
    python train.py -m optimizer=sgd,adam optimizer.lr=0.001,0.01,0.1   # a local sweep

Everything configurable is in conf/ (one group per component); see README.md.
"""

import atexit
import gc
import sys
from pathlib import Path

from gddist.signals import record_early_sigusr1

if __name__ == "__main__":
    # Before the seconds of imports below: a SIGUSR1 (SLURM's preemption warning) sent while this
    # process starts must not kill it (see record_early_sigusr1).
    record_early_sigusr1()

import hydra  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from gddist.cli import check_overrides, fail, register_resolvers, task  # noqa: E402
from gddist.config import UserError  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    # `record` goes on the task body, inside Hydra: Hydra turns any exception into a report and
    # SystemExit(1), which `record` lets pass unrecorded. Here it sees the exception itself and,
    # under torchrun, writes it to the worker's error file, so the launcher's failure report
    # carries the failing rank's traceback. One-line errors (exit 2, 4) are SystemExits: unchanged.
    # The return value (the objective, when optimized_metric is set) is what a sweeper reads.
    return record(task)(cfg)


if __name__ == "__main__":
    # Exit without the interpreter's final garbage collection: it walks every object the imports
    # created (torch and its compiler stack, ~400k) for about a second, to free memory the OS
    # frees anyway. Registered first, so it runs after every other exit handler.
    atexit.register(gc.freeze)
    register_resolvers()
    try:
        check_overrides(sys.argv[1:], CONF_DIR)
    except UserError as e:
        fail(str(e))
    main()
