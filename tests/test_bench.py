"""`python -m gddist.bench` runs end to end and reports consistent numbers (never its speed:
speed targets are read from the benchmark's report, not asserted in tests)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch

from gddist import bench
from gddist.bench.dataset import DATASET_QUICK, ShiftedPatterns
from gddist.bench.system import parse_importtime
from gddist.data.dataset import DatasetData, sample_seed, sample_seeds


@pytest.mark.slow
def test_quick_benchmark_reports_every_part_consistently(tmp_path, capsys):
    # In this process (as `python -m gddist.bench --quick` runs it): a second interpreter would
    # only add seconds of imports; the 2-process part spawns its own workers either way.
    out = tmp_path / "bench" / "result.json"
    # The dataset part has its own test below.
    returned = bench.main(["--quick", "--skip", "dataset", "--json", str(out)])
    report = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))  # the JSON is the whole result

    # 1. Step time: every (size, processes) pair, positive times, medians and ratios that follow
    # from the per-repetition numbers, and the same final weights on both sides.
    rows = {(r["size"], r["nproc"]): r for r in result["step_time"]}
    assert set(rows) == {(s, n) for s in ("small", "large") for n in (1, 2)}
    for r in rows.values():
        assert r["reps"] == len(r["gddist_ms_all"]) == len(r["plain_ms_all"]) == 2
        assert min(r["gddist_ms_all"] + r["plain_ms_all"]) > 0
        assert r["gddist_ms"] == statistics.median(r["gddist_ms_all"])
        assert r["plain_ms"] == statistics.median(r["plain_ms_all"])
        assert r["ratio"] == pytest.approx(r["gddist_ms"] / r["plain_ms"])
        assert r["params"] > 0 and r["steps"] > 0
        assert r["max_weight_diff"] <= 1e-5, "gddist and the plain loop did different work"
        assert f"| {r['nproc']} | {r['params']:,} | {r['batch']} |" in report
        assert f"| {r['ratio']:.3f} |" in report

    # 2. Memory (--quick: the first size only), positive peaks, ratio of the peaks.
    assert [m["size"] for m in result["memory"]] == ["small"]
    for m in result["memory"]:
        assert m["gddist_peak_mib"] > 0 and m["plain_peak_mib"] > 0
        assert m["gddist_growth_mib"] >= 0 and m["plain_growth_mib"] >= 0
        assert m["ratio"] == pytest.approx(m["gddist_peak_mib"] / m["plain_peak_mib"])
        assert f"| {m['size']} | {m['gddist_peak_mib']:.1f} |" in report

    # 3. Startup: positive times; step 1 comes before the exit; overhead = step 1 - import torch.
    s = result["startup"]
    assert s["import_torch_s"] > 0 and s["plain_step_s"] > 0
    assert 0 < s["first_step_s"] <= s["exit_s"]
    assert s["overhead_s"] == pytest.approx(s["first_step_s"] - s["import_torch_s"])
    assert f"{s['overhead_s']:.2f} |" in report

    # 4. Checkpoint stall: every save blocks for a positive time; each async ratio is stall over
    # the synchronous stall, and the report prints both.
    c = result["checkpoint"]
    assert c["params"] > 0 and c["sync"]["blocked_ms"] > 0
    for mode in ("async", "async_steady"):
        assert c[mode]["blocked_ms"] > 0
        assert c[f"{mode}_over_sync"] == pytest.approx(c[mode]["stall_ms"] / c["sync"]["stall_ms"])
    assert "| synchronous |" in report and "| asynchronous, every later save |" in report
    assert f"{c['async_over_sync']:.2f}, {c['async_steady_over_sync']:.2f} |" in report


def test_importtime_breakdown_charges_only_what_import_torch_does_not_load():
    text = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:    900000 |     900000 |   torch",  # pulled in by the next one: baseline
            "import time:      3000 |       3000 |     torch.distributed.elastic.timer",
            "import time:      1000 |     904000 | torch.distributed.elastic.multiprocessing.errors",
            "import time:    200000 |     200000 |   hydra._internal",
            "import time:     50000 |     250000 | hydra",
            "import time:     20000 |      20000 | gddist.trainer",
            "[..][gddist][INFO] - step 1/1 (100%) | epoch 0 | train/loss 0.83 | lr 0.1",
            "import time:    300000 |     300000 |   matplotlib",
            "import time:    900000 |    1200000 | torchmetrics",
            "import time:     30000 |      30000 | gddist.metrics",
        ]
    )
    found = parse_importtime(text, known={"torch"})
    assert found == {
        "before_first_step": [
            {"module": "hydra", "ms": 250.0},
            {"module": "gddist.trainer", "ms": 20.0},
            {"module": "torch.distributed.elastic.multiprocessing.errors", "ms": 4.0},
        ],
        "after_first_step": [
            {"module": "torchmetrics", "ms": 1200.0},
            {"module": "gddist.metrics", "ms": 30.0},
        ],
    }


def test_dataset_workload_reports_ratios_and_seeding_cost_and_both_loops_train(tmp_path, capsys):
    out = tmp_path / "dataset.json"
    bench.main(["--only", "dataset", "--quick", "--reps", "1", "--json", str(out)])
    report = capsys.readouterr().out
    d = json.loads(out.read_text())["dataset"]
    assert set(json.loads(out.read_text())) >= {"machine", "args", "dataset"}
    for key in ("ratio", "unseeded_ratio", "seeding_ratio"):
        assert math.isfinite(d[key]) and d[key] > 0, key
    assert math.isfinite(d["seeding_us_per_sample"])
    assert all(math.isfinite(v) and v > 0 for v in d["read_us_per_sample"].values())
    for side in ("gddist", "plain", "gddist_unseeded"):
        assert d[f"{side}_samples_s"] > 0
        assert d["trained"][side]["steps"] == DATASET_QUICK.total  # every step ran and was timed
    assert d["ratio"] == pytest.approx(d["gddist_samples_s"] / d["plain_samples_s"])
    # Unseeded, gddist's workers read what the hand-written loop's workers read: same training.
    assert d["unseeded_vs_plain_max_loss_diff"] <= 1e-6
    assert f"| gddist/hand-written (target >= 1.00) | | {d['ratio']:.3f} | |" in report
    assert f"{d['seeding_ratio']:.3f}, {d['seeding_us_per_sample']:.1f} |" in report


def test_batched_sample_seeds_equal_the_per_sample_hash():
    rng = random.Random(0)
    for seed, epoch in ((0, 0), (7, -1), (2**40 + 3, 12), (1, 10**6)):
        rows = [rng.randrange(10**7) for _ in range(40)] + [0, 1]
        assert sample_seeds(seed, epoch, rows) == [sample_seed(seed, epoch, i) for i in rows]


def _data(seed_per_sample: bool) -> DatasetData:
    return DatasetData(
        ShiftedPatterns(64),
        ShiftedPatterns(16, "val"),
        val_fraction=0.2,
        seed=0,
        task="multiclass",
        target_key="labels",
        keep_target=False,
        seed_per_sample=seed_per_sample,
    )


def test_reading_in_the_training_process_keeps_its_rng_and_unseeded_batches_do_not_repeat():
    rows = torch.arange(32)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seeded, unseeded = _data(True), _data(False)
    a, b = seeded.read("train", rows, 0)[0], seeded.read("train", rows, 0)[0]
    c, d = unseeded.read("train", rows, 0)[0], unseeded.read("train", rows, 0)[0]
    assert torch.equal(torch.rand(3), expected)  # the dropout stream is left alone
    assert torch.equal(a, b)  # seeded: a pure function of (epoch, index)
    assert not torch.equal(a, seeded.read("train", rows, 1)[0])  # another epoch, other shifts
    assert not torch.equal(c, d)  # unseeded: the reader's stream runs on between batches
