"""`python -m gddist.explain RUN_DIR [--split val|test] [--repeats 5] [--seed 0] [--scoring S]`:
permutation importance of a finished tabular run's input columns.

Semantics are scikit-learn's `permutation_importance`: the score of the model on the split
(`baseline`), then for each ORIGINAL column and each of `repeats` seeded shuffles of that column's
rows, importance = baseline - score with the column shuffled; reported as the mean and the
(population, ddof=0) std over the repeats. A text column's one-hot block is shuffled together
(whole rows of the block move), so a category column counts once, as the user wrote it.

Scoring (`--scoring`, scikit-learn's scorer names and semantics): binary `roc_auc` (the default:
threshold-free, so a shuffle that moves probabilities without flipping a 0.5 decision still
counts; with accuracy on the purchase example's 200 val rows and 5 repeats, the top column ties
or swaps between seeds) or `accuracy`; multiclass `accuracy`; regression `r2` (default) or
`neg_mean_squared_error` (in the target's original units). The split is the run's held-out
split: `test` when the data serves one, else `val` (`--split test` without one is an error).

Outputs: RUN_DIR/importance.csv (feature, importance_mean, importance_std, sorted by mean,
largest first), RUN_DIR/plots/importance.png (horizontal bars with std error bars); for
model=linear also RUN_DIR/coefficients.csv, the weights on the standardized inputs (one row per
model input: a numeric column, or `column=category` of a one-hot block; one column per class
for multiclass, and for regression in standardized target units).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gddist.config import UserError

SCORINGS = {
    "binary": ("roc_auc", "accuracy"),  # the first of each task is its default
    "multiclass": ("accuracy",),
    "regression": ("r2", "neg_mean_squared_error"),
}


def blocks(prep: Any) -> list[tuple[str, list[int]]]:
    """(original column name, its model-input column indices) for each feature of `prep`."""
    out, j = [], 0
    for spec in prep.features:
        width = 1 if spec["kind"] == "numeric" else len(spec["categories"])
        out.append((spec["name"], list(range(j, j + width))))
        j += width
    return out


def input_names(prep: Any) -> list[str]:
    """One name per model input: the column, or `column=category` inside a one-hot block."""
    names = []
    for spec in prep.features:
        if spec["kind"] == "numeric":
            names.append(spec["name"])
        else:
            names.extend(f"{spec['name']}={c}" for c in spec["categories"])
    return names


def scorer(task: str, scoring: str, prep: Any) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """score(model outputs, targets in training units) -> float, larger is better."""
    if scoring not in SCORINGS.get(task, ()):
        raise UserError(
            f"--scoring={scoring} does not apply to a {task} run; use one of "
            f"{', '.join(SCORINGS.get(task, ()))}"
        )

    def score(out: torch.Tensor, y: torch.Tensor) -> float:
        out, y = out.double(), y.double()
        if task == "binary":
            logit = out.reshape(-1)
            if scoring == "roc_auc":
                return roc_auc(logit, y)
            return float(((torch.sigmoid(logit) > 0.5).double() == y).double().mean())
        if task == "multiclass":
            return float((out.argmax(1) == y.long()).double().mean())
        pred, true = out.reshape(-1), y.reshape(-1)
        if scoring == "neg_mean_squared_error":  # in original units: std^2 * standardized MSE
            return -float(((pred - true) ** 2).mean()) * prep.target_std**2
        return 1.0 - float(((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())

    return score


def roc_auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC in float64 (Mann-Whitney: the chance a positive outscores a negative, ties half),
    exact as scikit-learn's roc_auc_score; the logit ranks rows as the probability does."""
    order = torch.argsort(score, stable=True)
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=score.dtype)
    values, inverse = torch.unique(score, return_inverse=True)  # tied scores: their mean rank
    mean_rank = torch.zeros_like(values).index_add_(0, inverse, ranks)
    mean_rank /= torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(ranks))
    pos = y > 0.5
    p, n = int(pos.sum()), int((~pos).sum())
    if p == 0 or n == 0:
        raise UserError("roc_auc needs both classes in the split; use --scoring accuracy")
    return float((mean_rank[inverse][pos].sum() - p * (p + 1) / 2) / (p * n))


def permutation_importance(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], float],
    groups: list[tuple[str, list[int]]],
    repeats: int,
    seed: int,
) -> tuple[float, dict[str, list[float]]]:
    """(baseline score, {column: [baseline - permuted score per repeat]}).

    The shuffles come from one torch generator seeded by `seed`, drawn column by column, repeat by
    repeat, so the result is a function of (model, data, seed, repeats)."""
    with torch.no_grad():
        baseline = score(predict(x), y)
        g = torch.Generator().manual_seed(seed)
        drops: dict[str, list[float]] = {}
        for name, cols in groups:
            drops[name] = []
            idx = torch.tensor(cols)
            for _ in range(repeats):
                perm = torch.randperm(len(x), generator=g)
                shuffled = x.clone()
                shuffled[:, idx] = x[perm][:, idx]
                drops[name].append(baseline - score(predict(shuffled), y))
    return baseline, drops


def split_tensors(data: Any, split: str | None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(split name, features, targets) of the run's held-out split: `test` when the data has
    one (x_test / y_test), else `val`."""
    has_test = getattr(data, "x_test", None) is not None
    if split is None:
        split = "test" if has_test else "val"
    if split == "test":
        if not has_test:
            raise UserError("--split test: this run's data has no test split; use --split val")
        return split, data.x_test, data.y_test
    return split, data.x_val, data.y_val


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    sink = io.StringIO()
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return sink.getvalue()


def plot(path: Path, table: list[tuple[str, float, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t[0] for t in table][::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.4 * len(table)))
    ax.barh(names, [t[1] for t in table][::-1], xerr=[t[2] for t in table][::-1], capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("drop in score with the column shuffled (mean ± std over repeats)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def explain(
    run_dir: Path,
    split: str | None = None,
    repeats: int = 5,
    seed: int = 0,
    scoring: str | None = None,
    checkpoint: str = "final",
) -> dict[str, Any]:
    """Compute and write the run's permutation importance (see the module docstring); returns
    {split, scoring, baseline, rows, importance: [(column, mean, std)], coefficients}."""
    from gddist import runs
    from gddist.data.tensors import TensorData
    from gddist.io import atomic_write

    if repeats < 1:
        raise UserError(f"--repeats={repeats} must be at least 1")
    loaded = runs.load(run_dir, checkpoint)
    data, model = loaded.data, loaded.model
    if not isinstance(data, TensorData) or data.task not in SCORINGS:
        raise UserError(
            f"{run_dir} is not a tabular classification or regression run (data="
            f"{loaded.cfg.data.name}); gddist.explain reads tabular runs' columns"
        )
    prep = data.preprocessing
    scoring = scoring or SCORINGS[data.task][0]
    score = scorer(data.task, scoring, prep)
    split, x, y = split_tensors(data, split)
    baseline, drops = permutation_importance(
        model, x.float(), y, score, blocks(prep), repeats, seed
    )
    table = []
    for name, d in drops.items():
        t = torch.tensor(d, dtype=torch.float64)
        table.append((name, float(t.mean()), float(t.std(unbiased=False))))
    table.sort(key=lambda t: -t[1])
    run_dir = Path(run_dir)
    text = _csv_text(
        ["feature", "importance_mean", "importance_std"],
        [[n, repr(m), repr(s)] for n, m, s in table],
    )
    atomic_write(run_dir / "importance.csv", lambda f: f.write(text.encode()))
    title = f"permutation importance: {scoring} on {split} ({len(y)} rows, {repeats} repeats)"
    plot(run_dir / "plots" / "importance.png", table, title)
    coefficients = None
    if loaded.cfg.model.name == "linear":
        w = model.weight.detach().double()  # (outputs, inputs): weights on standardized inputs
        names = input_names(prep)
        heads = [f"coef_{c}" for c in prep.classes] if data.task == "multiclass" else ["coef"]
        coefficients = {n: w[:, j].tolist() for j, n in enumerate(names)}
        ctext = _csv_text(
            ["feature", *heads], [[n, *(repr(v) for v in c)] for n, c in coefficients.items()]
        )
        atomic_write(run_dir / "coefficients.csv", lambda f: f.write(ctext.encode()))
    return {
        "split": split,
        "scoring": scoring,
        "baseline": baseline,
        "rows": len(y),
        "importance": table,
        "coefficients": coefficients,
    }


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gddist.explain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="a finished tabular run dir")
    parser.add_argument("--split", choices=("val", "test"), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring", choices=sorted({s for v in SCORINGS.values() for s in v}))
    parser.add_argument("--checkpoint", default="final")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from gddist.cli import fail

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        r = explain(
            Path(args.run_dir), args.split, args.repeats, args.seed, args.scoring, args.checkpoint
        )
    except UserError as e:
        fail(str(e))
    print(
        f"baseline {r['scoring']} on {r['split']} ({r['rows']} rows): {r['baseline']:.4f}; "
        f"{args.repeats} repeats, seed {args.seed}"
    )
    width = max(len(n) for n, _, _ in r["importance"])
    for name, mean, std in r["importance"]:
        print(f"  {name:<{width}}  {mean:+.4f} ± {std:.4f}")
    if r["coefficients"] is not None:
        print("standardized coefficients (weights on standardized inputs):")
        for name, c in r["coefficients"].items():
            print(f"  {name:<{width}}  " + "  ".join(f"{v:+.4f}" for v in c))
    run_dir = Path(args.run_dir)
    print(f"wrote {run_dir / 'importance.csv'}, {run_dir / 'plots' / 'importance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
