"""Read a user's CSV into typed columns, with one-line errors that name the file, line and column.

Contract: the first row is a header; every other row has as many fields. A column whose values all
parse as finite numbers is numeric; a column with no number at all is text (one-hot encoded later);
a column that mixes the two, a missing value (empty, NA, NaN, null, none) or an infinite number is
an error before any training starts.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from gddist.config import UserError

MISSING = {"", "na", "n/a", "nan", "null", "none"}
# Integer targets with at most this many distinct values are class labels under data.task=auto.
MAX_AUTO_CLASSES = 20


@dataclass
class Column:
    name: str
    kind: str  # "numeric" | "text"
    values: list  # floats for numeric, str for text


def read_csv(path: str, target: str) -> tuple[list[Column], Column]:
    """Return (feature columns, target column) of `path`; raises UserError on any bad input."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.path={path}: file not found; pass the path of an existing CSV file")
    with p.open(newline="", encoding="utf-8") as f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable CSV file ({e})") from None
    rows = [r for r in rows if r]  # csv yields [] for blank lines
    if not rows:
        raise UserError(f"{path}: the file is empty; it needs a header row and data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if not body:
        raise UserError(f"{path}: no data rows under the header")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"{path}: duplicate column name(s) {dupes}; rename them")
    if target not in header:
        raise UserError(
            f"data.target={target!r} is not a column of {path}; columns are: {', '.join(header)}"
        )
    if len(header) < 2:
        raise UserError(f"{path}: no feature columns besides the target {target!r}")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise UserError(
                f"{path} line {i + 2}: {len(row)} fields but the header has {len(header)}"
            )
    columns = [_parse_column(path, name, [row[j] for row in body]) for j, name in enumerate(header)]
    features = [c for c in columns if c.name != target]
    (label,) = [c for c in columns if c.name == target]
    return features, label


def _parse_column(path: str, name: str, raw: list[str]) -> Column:
    values = [v.strip() for v in raw]
    for i, v in enumerate(values):
        if v.lower() in MISSING:
            raise UserError(
                f"{path} line {i + 2}: missing value {v!r} in column {name!r}; "
                "fill it in or drop the row"
            )
    numbers = [_to_float(v) for v in values]
    if all(x is None for x in numbers):
        return Column(name, "text", values)
    for i, (v, x) in enumerate(zip(values, numbers, strict=True)):
        if x is None:
            raise UserError(
                f"{path} line {i + 2}: column {name!r} has non-numeric value {v!r} among numbers; "
                "fix the value (or make the whole column text)"
            )
        if not math.isfinite(x):
            raise UserError(f"{path} line {i + 2}: column {name!r} has non-finite value {v!r}")
    return Column(name, "numeric", numbers)


def _to_float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def infer_task(label: Column, task: str, path: str) -> tuple[str, list]:
    """Decide the task for a CSV target column; see `decide_task`."""
    return decide_task(sorted(set(label.values)), label.kind == "text", label.name, task, path)


def decide_task(distinct: list, text: bool, name: str, task: str, source: str) -> tuple[str, list]:
    """Decide the task for target `name` of `source` (`task` wins unless 'auto') from its sorted
    distinct values, and return (task, classes).

    auto: a text target, or an integer target with at most MAX_AUTO_CLASSES distinct values, is
    classification (binary for two classes, multiclass above); any other numeric target is
    regression. `classes` is the sorted list of labels (empty for regression).
    """
    integral = not text and all(float(v).is_integer() for v in distinct)
    if task == "auto":
        if text or (integral and len(distinct) <= MAX_AUTO_CLASSES):
            task = "binary" if len(distinct) <= 2 else "multiclass"
        else:
            task = "regression"
    if task == "regression":
        if text:
            raise UserError(
                f"data.task=regression but target {name!r} in {source} is text; "
                "use data.task=auto or a numeric target"
            )
        return task, []
    if len(distinct) < 2:
        raise UserError(
            f"target {name!r} in {source} has only one class ({distinct[0]!r}); "
            "a classifier needs at least two"
        )
    if task == "binary" and len(distinct) != 2:
        raise UserError(
            f"data.task=binary but target {name!r} in {source} has {len(distinct)} classes; "
            "use data.task=multiclass"
        )
    if task == "multiclass" and len(distinct) > 1000:
        raise UserError(
            f"target {name!r} in {source} has {len(distinct)} classes; "
            "is it continuous? use data.task=regression"
        )
    return task, distinct
