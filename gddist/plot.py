"""`python -m gddist.plot RUN_DIR`: (re)draw a run's PNG curves into RUN_DIR/plots/.

Reads RUN_DIR/metrics.jsonl (and RUN_DIR/.hydra/config.yaml for a model=function path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gddist.plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run dir holding metrics.jsonl")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        message = f"error: {args.run_dir}/metrics.jsonl not found; pass a gddist run dir"
        print(message, file=sys.stderr)
        return 2
    from gddist.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
