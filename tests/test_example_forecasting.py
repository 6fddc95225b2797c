"""experiment=forecasting: the preset composes and trains through data=dataset / model=custom,
its split is chronological with no window across the boundary, the metrics are in price units,
and the full run reproduces the numbers of docs/examples/forecasting.md and draws its plot."""

import numpy as np
import pytest
import torch
from helpers import compose, train

from gddist.config import Config
from gddist.examples import forecasting
from gddist.examples.forecasting import Forecaster, PriceWindows, price_series

# docs/examples/forecasting.md: val MAE of the full preset (seed 0), and the baselines.
DOC_MAE = 0.826
DOC_BASELINES = {
    "baseline/naive_mae": 1.234,
    "baseline/moving_average_mae": 1.658,
    "baseline/true_model_mae": 0.788,
}


def test_the_preset_composes_through_the_public_path():
    cfg = Config.from_dict(compose("experiment=forecasting"))
    assert (cfg.data.name, cfg.model.name, cfg.loss.name) == ("dataset", "custom", "mse")
    assert cfg.data.val["window"] == cfg.data.train["window"] == 48
    assert cfg.logger.on_end == "gddist.examples.forecasting.on_end"
    assert set(forecasting.REPORT["baselines"]) == set(DOC_BASELINES)


def test_a_short_run_trains_and_reports_its_baselines(tmp_path):
    summary = train(tmp_path / "run", "experiment=forecasting", "trainer.max_steps=20")
    assert summary["step"] == 20
    assert summary["baseline/naive_mae"] == pytest.approx(
        DOC_BASELINES["baseline/naive_mae"], abs=1e-3
    )
    assert (tmp_path / "run" / "plots" / "forecast.png").read_bytes()[:4] == b"\x89PNG"


def test_the_split_is_chronological_and_no_window_straddles_it():
    prices = price_series(0)
    train, val = PriceWindows("train"), PriceWindows("val")
    boundary = round(len(prices) * 0.8)
    assert train.targets.max() < boundary  # every train target before the boundary ...
    assert val.targets.min() - val.window >= boundary  # ... every val input after it
    assert len(train) == boundary - 48 and len(val) == len(prices) - boundary - 48
    # The scale is the train part's (both splits): val prices never shape the inputs.
    assert val.scale == train.scale == pytest.approx(np.std(np.diff(prices[:boundary])))
    s = val[5]
    t = val.targets[5]
    assert float(s["labels"]) == pytest.approx(prices[t], rel=1e-6)  # the target in price units
    window = s["window"].astype(np.float64) * val.scale + float(s["last"])
    assert np.allclose(window, prices[t - 48 : t], atol=1e-3)


def test_the_untrained_model_is_the_naive_forecast_in_price_units():
    val = PriceWindows("val")
    batch = torch.utils.data.default_collate([val[i] for i in range(8)])
    labels = batch.pop("labels")
    out = Forecaster(window=48)(**batch)
    assert out.shape == labels.shape
    assert torch.equal(out, batch["last"])


@pytest.mark.slow
def test_the_full_preset_reproduces_the_documented_mae_and_plots_it(tmp_path):
    summary = train(tmp_path / "full", "experiment=forecasting")
    # Float reduction order differs between machines and torch builds: 0.01 is ~1% of the MAE,
    # far less than the gap to the naive forecast.
    assert summary["val/mae"] == pytest.approx(DOC_MAE, abs=0.01)
    for key, value in DOC_BASELINES.items():  # numpy on the seeded series: machine-independent
        assert summary[key] == pytest.approx(value, abs=1e-3), key
    assert summary["baseline/moving_average_k"] == 2
    assert summary["val/mae"] < 0.75 * summary["baseline/naive_mae"]
    assert summary["val/mae"] < summary["baseline/moving_average_mae"]
    assert (tmp_path / "full" / "plots" / "forecast.png").read_bytes()[:4] == b"\x89PNG"
