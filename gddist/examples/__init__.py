"""Real-world applications of gradient descent, one preset each (`python train.py
experiment=<name>`), every one through the public path a user takes (data=dataset or data=csv,
model=custom, loss=, metrics=): no private shortcut.

Each module `gddist/examples/<name>.py` holds the preset's Dataset(s) and model, and:

- `on_end(run_dir, cfg, model) -> dict`: the preset's `logger.on_end`. Called on rank 0 when the
  run has trained to its end; returns the baselines computed in the same run on the same split
  (`baseline/<name>` keys; they land in summary.json) and writes the preset's own outputs (plots,
  a text sample) into RUN_DIR/plots/.
- `REPORT`: what `python -m gddist.report --examples` puts in its table: `{"task": ...,
  "metric": summary key, "baselines": {summary key: label}}`.

scikit-learn is an optional extra (`pip install gddist[examples]`) imported only by the presets
that use it (`require_sklearn`).
"""

from __future__ import annotations

from typing import Any

from gddist.config import UserError

EXAMPLES = ("image_digits", "text_lm", "recommender", "forecasting", "healthcare")


def require_sklearn(preset: str) -> Any:
    """The sklearn module, or one line saying how to install it (exit 2)."""
    try:
        import sklearn
    except ImportError:
        raise UserError(
            f"experiment={preset} uses scikit-learn (its bundled data or baseline); install it "
            "with pip install 'gddist[examples]' (or pip install scikit-learn)"
        ) from None
    return sklearn
