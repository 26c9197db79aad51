"""Score rules (tpas.scores) against the reference formulas written out on full matrices."""

import numpy as np
import pytest

from tpas import scores
from tpas.errors import TpasError


def _case(seed: int = 0, queries: int = 7, gallery: int = 30, k: int = 5):
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-0.3, 0.9, (queries, gallery)).astype(np.float32)
    top = np.argsort(-sims, axis=1)[:, :k]
    itc = np.take_along_axis(sims, top, axis=1)
    logits = rng.normal(0, 2, (queries, k, 2)).astype(np.float32)
    return sims, top, itc, logits


def _cmp_eval(sims: np.ndarray, top: np.ndarray, match: np.ndarray) -> np.ndarray:
    """CMP_Baseline_Code/eval.py evaluation_itm, written out: the ITM match logit at each query's
    top-k, the rest filled with that query's lowest one; min-max over the whole matrix; plus
    0.002 x the min-max of the whole ITC matrix."""
    itm = np.full(sims.shape, 1000.0)
    np.put_along_axis(itm, top, match, axis=1)
    row_min = itm.min(axis=1, keepdims=True)
    itm = np.where(itm == 1000.0, row_min, itm)
    itm = (itm - itm.min()) / (itm.max() - itm.min())
    return itm + 0.002 * (sims - sims.min()) / (sims.max() - sims.min())


def test_cmp_rule_equals_cmps_evaluation_on_the_full_matrix():
    sims, top, itc, logits = _case()
    full = _cmp_eval(sims, top, logits[..., 1])
    ours = scores.combine("cmp", itc, logits, itc_range=(float(sims.min()), float(sims.max())))
    np.testing.assert_allclose(ours, np.take_along_axis(full, top, axis=1), atol=1e-6)
    # every pair CMP fills in ranks below the listed ones, so the top-k order is CMP's full order
    assert (
        np.argsort(-full, axis=1, kind="stable")[:, :5]
        == np.take_along_axis(top, np.argsort(-ours, axis=1, kind="stable"), axis=1)
    ).all()
    # the range matters: over the listed pairs alone the ITC part is scaled differently
    listed = scores.combine("cmp", itc, logits)
    assert not np.allclose(listed, ours)


def test_the_other_rules_follow_their_formulas():
    _, _, itc, logits = _case(1)
    l0, l1 = logits[..., 0], logits[..., 1]
    np.testing.assert_allclose(scores.combine("xvlm", itc, logits), l1)
    np.testing.assert_allclose(scores.combine("log-odds", itc, logits), l1 - l0, rtol=1e-6)
    np.testing.assert_allclose(scores.combine("blip", itc, logits), l1 + itc, rtol=1e-6)
    np.testing.assert_allclose(scores.combine("tpas", itc, logits, itc_weight=14.0), l1 - l0 + 14.0 * itc, rtol=1e-6)
    np.testing.assert_allclose(scores.combine("itc", itc, None), itc)
    orders = {
        rule: np.argsort(-scores.combine(rule, itc, logits, 14.0), axis=1).tolist()
        for rule in ("xvlm", "log-odds", "tpas", "itc")
    }
    assert len({str(v) for v in orders.values()}) == 4  # four different rankings of the same candidates


def test_rules_need_what_they_read():
    _, _, itc, _ = _case()
    with pytest.raises(TpasError, match="needs ITM logits"):
        scores.combine("xvlm", itc, None)
    with pytest.raises(TpasError, match="choose one of"):
        scores.combine("sum", itc, None)
    assert scores.rules_for(False) == ("itc",)
    assert scores.default_rule("xvlm-base") == "xvlm" and scores.default_rule("cmp") == "cmp"
    assert scores.default_rule("blip-itm") == "blip" and scores.default_rule("clip") == "itc"
