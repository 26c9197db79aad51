"""post_gain: tune on the validation lists, measure unchanged on the test lists, McNemar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "post"))
from test_postprocess import tune_case  # noqa: E402

from tpas.experiments import post_gain as gain_lib  # noqa: E402


class _Embedder:
    """The case's caption embeddings instead of MiniLM's."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table, self.encoder = table, None

    def __call__(self, folder: Path, captions: list[str]) -> np.ndarray:
        return np.stack([self.table[c] for c in captions])


def test_tuned_sca_is_measured_on_the_test_lists_with_mcnemar(tmp_path: Path, monkeypatch, capsys) -> None:
    cands, qs, emb = tune_case()
    for name in ("val", "test"):
        (tmp_path / name).mkdir()
        cands.to_parquet(tmp_path / name / "candidates.parquet")
        qs.to_parquet(tmp_path / name / "queries.parquet")
    monkeypatch.setattr(gain_lib, "CaptionEmbedder", lambda: _Embedder(dict(zip(qs["caption"], emb))))
    out = tmp_path / "gain.json"
    report = gain_lib.post_gain(
        gain_lib.PostGainConfig(val=tmp_path / "val", test=tmp_path / "test", methods="sca", output=out)
    )
    tuned = report["sca"]["tuned"]
    # the three pairs where SCA helps are fixed and the three where it hurts are left alone
    assert (tuned["fixed"], tuned["broken"]) == (3, 0)
    assert tuned["R@1"] == report["before"]["R@1"] + 3 / 12 * 100
    assert tuned["p_value"] == 0.25  # 3 of 3 at p = 0.5, two-sided
    assert json.loads(out.read_text())["sca"]["tuned"]["fixed"] == 3
    assert "| sca | tuned |" in capsys.readouterr().out
