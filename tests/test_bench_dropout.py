"""`python -m tpas.bench dropout` on a tiny preset: both dropouts time a real training step."""

from __future__ import annotations

import json

from tpas.bench.dropout import BenchDropoutConfig, bench_dropout


def test_the_dropout_bench_times_both_masks_on_the_cached_shapes(tmp_path) -> None:
    out = tmp_path / "dropout.json"
    report = bench_dropout(BenchDropoutConfig(model="tiny", batch_size=8, tokens=6, rounds=2, output=out))
    assert len(report["torch_dropout_s"]) == len(report["fast_dropout_s"]) == 2
    assert report["dropout_modules"] > 0 and report["speedup"] > 0
    saved = json.loads(out.read_text())
    assert saved["shapes"]["text_states"][:2] == [8, 6] and saved["speedup"] == report["speedup"]
