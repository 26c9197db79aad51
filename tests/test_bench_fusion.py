"""`python -m tpas.bench fusion` on a tiny preset: both ways run, agree in eval mode, and are reported."""

from __future__ import annotations

import json

from tpas.bench.fusion import BenchFusionConfig, bench_fusion


def test_the_fusion_bench_times_both_ways_and_checks_they_agree(tmp_path) -> None:
    out = tmp_path / "fusion.json"
    report = bench_fusion(BenchFusionConfig(model="tiny", rows=4, tokens=6, rounds=2, output=out))
    assert len(report["every_row_s"]) == len(report["cls_only_s"]) == 2
    assert report["max_logit_gap_eval"] < 1e-5 and report["speedup"] > 0
    saved = json.loads(out.read_text())
    assert saved["shapes"]["rows"] == 4 and saved["speedup"] == report["speedup"]
