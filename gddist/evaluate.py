"""`python -m gddist.evaluate RUN_DIR`: the metrics of a finished run's weights on a data split.

    python -m gddist.evaluate RUN_DIR [--checkpoint final|best|PATH] [--split test|val]
                              [--out FILE] [key=value ...]
    torchrun --nproc_per_node=N -m gddist.evaluate RUN_DIR ...

Contract:

- Weights: `final` (RUN_DIR/model.pt, the default), `best` (checkpoint.save_best's best.pt), or
  a path (a checkpoint directory RUN_DIR/checkpoints/step_*, or a weights file).
- Data: by default the run's own test split (`data.test_fraction` / `data.test`; `--split val`:
  its validation split), rebuilt from the run's config and seed, so the rows are the ones the
  run held out. With a `data.path=...` override (a CSV file; a directory of .npy files for
  data=npy), every row of that file is evaluated, transformed by the run's SAVED preprocessing
  (RUN_DIR/preprocessing.json: the training rows' means, standard deviations, categories and
  classes; never a refit on the new file); its metrics are named `eval/<metric>`. Other
  `key=value` overrides change the run's config (e.g. `+data.test._target_=my_pkg.Other` for
  data=dataset, `data.eval_batch_size=256`).
- Exact across processes: each rank evaluates a contiguous shard (`shard_bounds`) and the
  Evaluator reduces over all ranks, so 1 and N processes give the same numbers.
- Output: rank 0 writes RUN_DIR/eval.json (or `--out`) atomically and prints it. A user mistake
  (no run dir, a bad checkpoint, a column missing from the new file, an unseen class) is one
  line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gddist.config import Config, UserError
from gddist.data.tensors import Preprocessing

NEW_DATA = "eval"  # the metrics prefix of rows from a data.path override


class _Rows:
    """Every row of a new file, as model inputs and encoded targets: a one-split data source."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, prep: Preprocessing) -> None:
        self.x, self.y, self.preprocessing, self.task = x, y, prep, prep.task

    def num_rows(self, split: str) -> int:
        return len(self.y)

    def read(self, split: str, rows: slice, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[rows], self.y[rows]


def _encode(labels: list, prep: Preprocessing, source: str) -> torch.Tensor:
    """Targets of a new file in training units, with the run's classes or target scaling."""
    if prep.task == "regression":
        y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
        return ((y - prep.target_mean) / prep.target_std).float()
    index = {c: i for i, c in enumerate(prep.classes)}
    for row, v in enumerate(labels):
        if v not in index:
            raise UserError(
                f"{source} row {row + 1}: target {prep.target!r} is {v!r}, not one of the run's "
                f"classes {prep.classes}; the model cannot score an unseen class"
            )
    y = torch.tensor([index[v] for v in labels])
    return y.float() if prep.task == "binary" else y


def new_rows(cfg: Config, prep: Preprocessing) -> _Rows:
    """Every row of cfg.data.path, transformed by the saved `prep`: a directory of .npy files
    for a data=npy run, else a CSV file with the run's columns (data=csv, and the generated
    purchase / regression data, whose raw columns and target preprocessing.json names)."""
    d = cfg.data
    if d.name in ("csv", "purchase", "regression"):
        from gddist.data.csv import read_csv

        features, label = read_csv(d.path, d.target or prep.target)
        columns = {c.name: c for c in features}
        for spec in prep.features:
            col = columns.get(spec["name"])
            if col is None:
                raise UserError(
                    f"{d.path}: no column {spec['name']!r}, which the run was trained on; "
                    f"columns are: {', '.join(columns)}"
                )
            if col.kind != spec["kind"]:
                raise UserError(
                    f"{d.path}: column {spec['name']!r} is {col.kind} but the run trained on it "
                    f"as {spec['kind']}; fix its values"
                )
        x = prep.transform({name: c.values for name, c in columns.items()})
        return _Rows(x, _encode(label.values, prep, d.path), prep)
    if d.name == "npy":
        import numpy as np

        from gddist.data.npy import FEATURES, TARGET, _map

        root = Path(d.path)
        for name in (FEATURES, TARGET):
            if not (root / name).is_file():
                raise UserError(f"data.path={d.path}: no {name} there")
        x, y = np.asarray(_map(root / FEATURES), dtype=np.float64), np.asarray(_map(root / TARGET))
        if x.ndim != 2 or x.shape[1] != len(prep.features):
            raise UserError(
                f"{root / FEATURES}: shape {x.shape}; the run was trained on "
                f"{len(prep.features)} feature columns"
            )
        mean = np.array([f["mean"] for f in prep.features])
        std = np.array([f["std"] for f in prep.features])
        xs = torch.from_numpy((x - mean) / std).float()
        return _Rows(xs, _encode(y.reshape(len(x), -1)[:, 0].tolist(), prep, str(root)), prep)
    raise UserError(
        f"a data.path override applies to tabular runs (this run has data={d.name}); "
        "for data=dataset override +data.test._target_=... instead"
    )


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gddist.evaluate", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="final", help="final | best | PATH")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/eval.json")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config")
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message))  # one line
    return parser.parse_args(argv)


def evaluate(
    run_dir: Path,
    checkpoint: str = "final",
    split: str = "test",
    overrides: Sequence[str] = (),
    out: Path | None = None,
) -> dict[str, Any]:
    """The metrics of `checkpoint`'s weights (see the module docstring); every rank calls it
    (it joins the process group of a torchrun launch). Rank 0 writes `out`."""
    from gddist import data as data_mod
    from gddist import dist as dist_mod
    from gddist import losses, runs
    from gddist.io import atomic_save_json, disk_errors
    from gddist.metrics import Evaluator, shard_bounds

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist; pass the dir of a finished run")
    trained = runs.config(run_dir)
    cfg = Config.from_dict(runs.config(run_dir, overrides))
    new_file = cfg.data.path != trained["data"].get("path")
    if new_file:  # every row of another file, through the run's own preprocessing
        prep_path = run_dir / "preprocessing.json"
        if not prep_path.is_file():
            raise UserError(f"{prep_path} does not exist: the run did not finish; resume it")
        data: Any = new_rows(cfg, Preprocessing.load(prep_path))
        prefix, split_name, source = NEW_DATA, split, f"data.path={cfg.data.path}"
        width = len(data.preprocessing.classes) if data.task == "multiclass" else 1
        n_features = data.x.shape[1]
    else:
        data = data_mod.build(cfg.data, cfg.seed, loss=cfg.loss.name, metrics=cfg.metrics.name)
        prefix, split_name, source = split, split, f"the run's {split} split"
        width, n_features = data.num_outputs, data.num_features
    n = data.num_rows(split_name)
    if n == 0:
        raise UserError(
            f"{run_dir} has no test split (trained with data.test_fraction=0 and no data.test): "
            "pass --split val, or data.path=<a file> to evaluate other data"
        )
    model = runs.build_model(run_dir, cfg, n_features, width, checkpoint)
    env = dist_mod.detect_launch()
    if n < env.world_size:
        raise UserError(f"{n} rows cannot be shared by {env.world_size} processes")
    dist = dist_mod.init(cfg.dist, env)
    try:
        model = model.to(dist.device)
        loss = losses.build(cfg.loss, data.task, dist.device)
        evaluator = Evaluator(data.preprocessing, dist.device, cfg.metrics, width, loss=loss)
        lo, hi = shard_bounds(n, dist.rank, dist.world_size)
        bs = cfg.data.eval_batch_size
        from gddist.data.feeds import to_device

        batches = (
            to_device(data.read(split_name, slice(s, min(s + bs, hi))), dist.device)
            for s in range(lo, hi, bs)
        )
        metrics = evaluator.evaluate(model, batches)
    finally:
        dist.close()
    result = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "data": source,
        "rows": n,
        "processes": dist.world_size,
        **{f"{prefix}/" + k.removeprefix("val/"): v for k, v in metrics.items()},
    }
    if dist.is_main:
        path = out or run_dir / "eval.json"
        with disk_errors(path, "--out"):
            atomic_save_json(result, path)
        print(json.dumps(result, indent=2), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from gddist.cli import fail

    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
        evaluate(args.run_dir, args.checkpoint, args.split, args.overrides, args.out)
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
