"""`python -m gddist.predict RUN_DIR [INPUT] [key=value ...] [--out F] [--checkpoint final|PATH]`:
a finished run's model applied to new data, one output row per input row, in input order.

- Tabular runs (data=csv, purchase, regression, npy): INPUT is a CSV with a header row and the
  run's feature columns (any order; extra columns, the target among them, are ignored). Each row
  is transformed with the run's saved RUN_DIR/preprocessing.json (train-split means and stds,
  one-hot categories), so the training data need not exist any more.
- data=dataset runs: no INPUT; the run's own validation split is predicted (or the Dataset named
  by an override such as `data.val._target_=my_pkg.NewData`, with `+data.val.split=...` etc.).

Output CSV columns (`--out`, default RUN_DIR/predictions.csv):

    row            the input's 1-based data row (line number - 1 for a CSV without blank lines)
    prediction     the class in the run's ORIGINAL labels (Preprocessing.classes; class index for a
                   Dataset), or the regression value in original units (target_mean/std undone)
    prob_<class>   classification: binary, the positive class's probability only; multiclass,
                   one column per class
    output_<j>     data=dataset runs of no known task: the raw model outputs

Bad input is one line (`error: ...`, exit 2) naming the column and the CSV LINE number (the
header is line 1, so the first data row is line 2, as in every gddist CSV error): a missing
column, a missing / non-numeric / non-finite value in a numeric column, and a category the run
never saw. An unknown category is refused rather than encoded as all zeros: the model never saw
an all-zeros block, so its prediction there would be silent extrapolation.

Under torchrun each rank predicts its contiguous shard of the rows (gddist.metrics.shard_bounds),
writes it next to the output, and rank 0 concatenates the shards in rank order, so the file is
the same for any world size.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gddist.config import UserError
from gddist.data.csv import MISSING


def read_input(path: str, prep: Any) -> tuple[dict[str, list], list[int]]:
    """The run's feature columns of CSV `path` as raw values by name, and each row's line number.

    Numeric columns become floats and text columns stay strings, checked against `prep` (the
    run's Preprocessing); raises UserError naming the column and line for any value the model
    cannot take."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"INPUT {path}: file not found; pass the path of a CSV with the columns "
                        f"{', '.join(s['name'] for s in prep.features)}")  # fmt: skip
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            lines = [(reader.line_num, row) for row in reader if row]
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not lines:
        raise UserError(f"{path}: the file is empty; it needs a header row and data rows")
    header = [h.strip() for h in lines[0][1]]
    body = lines[1:]
    if not body:
        raise UserError(f"{path}: no data rows under the header")
    wanted = [s["name"] for s in prep.features]
    missing = [n for n in wanted if n not in header]
    if missing:
        raise UserError(
            f"{path}: column {missing[0]!r} is missing (the run was trained on columns "
            f"{', '.join(wanted)}); add it, with the same meaning and units as in training"
        )
    for line, row in body:
        if len(row) != len(header):
            raise UserError(
                f"{path} line {line}: {len(row)} fields but the header has {len(header)}"
            )
    columns: dict[str, list] = {}
    for spec in prep.features:
        j = header.index(spec["name"])
        columns[spec["name"]] = [_value(path, line, spec, row[j].strip()) for line, row in body]
    return columns, [line for line, _ in body]


def _value(path: str, line: int, spec: dict, v: str) -> float | str:
    name = spec["name"]
    if spec["kind"] == "numeric":
        if v.lower() in MISSING:
            raise UserError(
                f"{path} line {line}: missing value {v!r} in numeric column {name!r}; "
                "fill it in or drop the row"
            )
        try:
            x = float(v)
        except ValueError:
            raise UserError(
                f"{path} line {line}: column {name!r} has non-numeric value {v!r}; the run "
                "trained on it as a number: fix the value"
            ) from None
        if not math.isfinite(x):
            raise UserError(f"{path} line {line}: column {name!r} has non-finite value {v!r}")
        return x
    if v not in spec["categories"]:
        known = ", ".join(repr(c) for c in spec["categories"][:10])
        more = ", ..." if len(spec["categories"]) > 10 else ""
        raise UserError(
            f"{path} line {line}: column {name!r} has category {v!r}, which the run never saw "
            f"(known: {known}{more}); use one of those, or retrain with it in the data"
        )
    return v


def feature_width(prep: Any) -> int:
    """Model input width of a Preprocessing: one per numeric column, one per category."""
    return sum(1 if s["kind"] == "numeric" else len(s["categories"]) for s in prep.features)


def label(value: Any) -> str:
    """An original label as the CSV wrote it: numeric labels were read as floats (1.0 -> "1")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def columns_for(task: str, classes: Sequence[Any], width: int) -> list[str]:
    """Output columns after `row` and `prediction` for a task (see the module docstring)."""
    if task == "binary":
        return [f"prob_{label(classes[1])}"]
    if task == "multiclass":
        return [f"prob_{label(c)}" for c in classes]
    if task == "regression":
        return []
    return [f"output_{j}" for j in range(width)]


def decode(
    out: torch.Tensor, task: str, prep: Any, classes: Sequence[Any]
) -> tuple[list[str], list[list[float]]]:
    """Model outputs of a batch -> (prediction strings, extra column values per row)."""
    out = out.detach().double().cpu()
    if task == "binary":
        p = torch.sigmoid(out.reshape(-1))
        # Class 1 when p > 0.5, as torchmetrics' binary metrics threshold a probability.
        return [label(classes[int(v > 0.5)]) for v in p.tolist()], [[v] for v in p.tolist()]
    if task == "multiclass":
        p = torch.softmax(out.reshape(out.shape[0], -1), dim=1)
        return [label(classes[i]) for i in p.argmax(1).tolist()], p.tolist()
    if task == "regression":
        y = out.reshape(-1) * prep.target_std + prep.target_mean
        return [repr(v) for v in y.tolist()], [[] for _ in range(len(y))]
    flat = out.reshape(out.shape[0], -1)
    return ["" for _ in range(len(flat))], flat.tolist()


def predict_shard(
    n: int, rank: int, world: int, batch: int, outputs: Callable[[int, int], torch.Tensor]
) -> tuple[int, list[torch.Tensor]]:
    """(lo, outputs) of this rank's [lo, hi) shard of n rows, `batch` rows per `outputs(a, b)`."""
    from gddist.metrics import shard_bounds

    lo, hi = shard_bounds(n, rank, world)
    parts = []
    with torch.no_grad():
        for start in range(lo, hi, batch):
            parts.append(outputs(start, min(start + batch, hi)))
    return lo, parts


def write_shards(
    out: Path,
    header: list[str],
    rows: list[list[str]],
    dist: Any,
) -> None:
    """Write this rank's rows; rank 0 merges every rank's shard, in rank order, into `out`.

    One process writes `out` directly. Under torchrun each rank writes `out`.part<rank> (atomic
    rename), all ranks meet at a barrier, and rank 0 concatenates the parts and removes them."""
    from gddist.io import atomic_write

    def text(body: list[list[str]], with_header: bool) -> str:
        sink = io.StringIO()
        writer = csv.writer(sink, lineterminator="\n")
        if with_header:
            writer.writerow(header)
        writer.writerows(body)
        return sink.getvalue()

    def save(path: Path, content: str) -> None:
        atomic_write(path, lambda f: f.write(content.encode()))

    rank, world = dist.env.rank, dist.env.world_size
    if world == 1:
        save(out, text(rows, True))
        return
    part = out.with_name(f"{out.name}.part{rank}")
    save(part, text(rows, False))
    dist.barrier()
    if rank == 0:
        merged = text([], True) + "".join(
            out.with_name(f"{out.name}.part{r}").read_text() for r in range(world)
        )
        save(out, merged)
        for r in range(world):
            out.with_name(f"{out.name}.part{r}").unlink()
    dist.barrier()  # nobody reports done before the merged file exists


def _run(args: argparse.Namespace) -> Path:
    from gddist import dist as dist_mod
    from gddist import models, runs
    from gddist.config import Config
    from gddist.data.tensors import Preprocessing

    run_dir = Path(args.run_dir)
    cfg_dict = runs.config(run_dir, args.overrides)
    cfg = Config.from_dict(cfg_dict)
    out = Path(args.out) if args.out else run_dir / "predictions.csv"
    if cfg.data.name == "dataset":
        if args.input is not None:
            raise UserError(
                f"{run_dir} is a data=dataset run: it predicts a Dataset, not a CSV; drop INPUT "
                "(the run's val split is used) or name another with data.val._target_=..."
            )
        loaded = runs.load(run_dir, args.checkpoint, args.overrides)
        data, model = loaded.data, loaded.model
        task, classes, prep = data.task, None, data.preprocessing
        n, lines = data.num_rows("val"), None

        def outputs(lo: int, hi: int) -> torch.Tensor:
            inputs, _ = data.read("val", slice(lo, hi))
            return models.forward(model, _to(inputs, device))
    else:
        if args.input is None:
            raise UserError(f"{run_dir} is a tabular run: pass INPUT, a CSV of its feature columns")
        if args.overrides:
            raise UserError(f"overrides {args.overrides} apply to data=dataset runs only")
        prep_path = run_dir / "preprocessing.json"
        if not prep_path.is_file():
            raise UserError(f"{prep_path} does not exist: train the run to completion first")
        prep = Preprocessing.load(prep_path)
        if prep.task not in ("binary", "multiclass", "regression"):
            raise UserError(f"{run_dir} is a task={prep.task} run: it has nothing to predict")
        task, classes = prep.task, prep.classes
        columns, lines = read_input(args.input, prep)
        x = prep.transform(columns)
        n = len(lines)
        num_outputs = len(classes) if task == "multiclass" else 1
        model = runs.build_model(run_dir, cfg, feature_width(prep), num_outputs, args.checkpoint)

        def outputs(lo: int, hi: int) -> torch.Tensor:
            return model(x[lo:hi].to(device))

    env = dist_mod.detect_launch()
    dist = dist_mod.init(cfg.dist, env)
    try:
        device = dist.device
        model.to(device)
        lo, parts = predict_shard(n, env.rank, env.world_size, cfg.data.eval_batch_size, outputs)
        out_all = torch.cat(parts) if parts else torch.empty(0)
        if classes is None:  # a Dataset: classes are the output indices
            width = out_all.reshape(len(out_all), -1).shape[1] if len(out_all) else 1
            classes = [0, 1] if task == "binary" else list(range(width))
        else:
            width = 1
        preds, extra = decode(out_all, task, prep, classes) if len(out_all) else ([], [])
        header = ["row", "prediction", *columns_for(task, classes, width)]
        rows = [
            [str(lo + i + 1), p, *(repr(float(v)) for v in e)]
            for i, (p, e) in enumerate(zip(preds, extra, strict=True))
        ]
        write_shards(out, header, rows, dist)
    finally:
        dist.close()
    return out


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gddist.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="a finished run dir (with config.json and model.pt)")
    parser.add_argument(
        "rest",
        nargs="*",
        metavar="INPUT | key=value",
        help="tabular runs: the CSV to predict; dataset runs: config overrides",
    )
    parser.add_argument("--out", help="output CSV (default RUN_DIR/predictions.csv)")
    parser.add_argument(
        "--checkpoint", default="final", help="final (model.pt) or a checkpoint directory"
    )
    args = parser.parse_args(argv)
    inputs = [a for a in args.rest if "=" not in a]
    args.overrides = [a for a in args.rest if "=" in a]
    if len(inputs) > 1:
        parser.error(f"one INPUT at most, got {inputs}")
    args.input = inputs[0] if inputs else None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from gddist.cli import fail

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = _run(args)
    except UserError as e:
        fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
