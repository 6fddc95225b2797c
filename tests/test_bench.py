"""`python -m gddist.bench` runs end to end and reports consistent numbers (never its speed:
speed targets are read from the benchmark's report, not asserted in tests)."""

from __future__ import annotations

import json
import statistics

import pytest

from gddist import bench
from gddist.bench.system import parse_importtime


@pytest.mark.slow
def test_quick_benchmark_reports_every_part_consistently(tmp_path, capsys):
    # In this process (as `python -m gddist.bench --quick` runs it): a second interpreter would
    # only add seconds of imports; the 2-process part spawns its own workers either way.
    out = tmp_path / "bench" / "result.json"
    returned = bench.main(["--quick", "--json", str(out)])
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
