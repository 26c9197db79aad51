"""Score rules: how ITC similarities and ITM logits combine into the score a query's candidates
are ranked by (`infer.py --score`).

Every rule ranks the same candidates, each query's ITC top-k; they differ in the final order
and in the score values, which matter downstream (SCA compares confidences across queries, an
ensemble fuses scores). With `l0`, `l1` the ITM head's "no match" and "match" logits and `itc`
the cosine similarity of the unit ITC features:

| rule | score | reference |
|---|---|---|
| `xvlm` | `l1` | X-VLM `Retrieval.py` `evaluation`: `score_matrix_t2i[i, topk] = itm_head(cls)[:, 1]` |
| `cmp` | `minmax(l1) + 0.002 · minmax(itc)` | CMP `CMP_Baseline_Code/eval.py` (WWW2025Workshop): min-max over the whole query × gallery matrix, pairs outside a query's top-k filled with its lowest ITM score |
| `blip` | `l1 + itc` | BLIP `train_retrieval.py` `evaluation`: `itm_head(...)[:, 1] + topk_sim` |
| `log-odds` | `l1 − l0` | the log-odds of "match" under the head's softmax |
| `tpas` | `l1 − l0 + w · itc` | tpas: `w` = `--itc-weight`, default 1/temperature, so both heads add as logits |
| `itc` | `itc` | ITC alone (a dual encoder such as CLIP, or `--no-itm`) |

`cmp`: min-max over the whole matrix needs the ITC minimum and maximum over all query × gallery
pairs (`itc_range`); its ITM minimum and maximum are those of the listed pairs, since CMP fills
the other pairs with a query's lowest listed ITM score. Pairs outside the top-k then rank below
every listed one, as here.
"""

from __future__ import annotations

import numpy as np

from tpas.errors import TpasError
from tpas.models.config import PRESETS

SCORE_RULES = ("xvlm", "cmp", "blip", "log-odds", "tpas", "itc")
FORMULAS = {
    "xvlm": "l1",
    "cmp": "minmax(l1) + 0.002 minmax(ITC)",
    "blip": "l1 + ITC",
    "log-odds": "l1 - l0",
    "tpas": "l1 - l0 + ITC / temp",
    "itc": "ITC",
}
CMP_ITC_WEIGHT = 0.002  # CMP eval.py: ITM + 0.002 * ITC, both min-max normalised


def default_rule(preset: str) -> str:
    """The rule a preset ranks by unless --score says otherwise (its score_rule in the presets table)."""
    return PRESETS.get(preset, {}).get("score_rule", "tpas")


def _minmax(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    return (values - low) / span if span > 0 else np.zeros_like(values)


def combine(
    rule: str,
    itc: np.ndarray,
    itm_logits: np.ndarray | None,
    itc_weight: float = 1.0,
    itc_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The score of each listed pair under `rule`.

    itc [Q, k] cosine similarities; itm_logits [Q, k, 2] (no match, match) or None without ITM;
    itc_weight: the `tpas` rule's w; itc_range: (min, max) ITC over the whole query × gallery
    matrix for `cmp` (default: over the listed pairs)."""
    if rule not in SCORE_RULES:
        raise TpasError(f"--score {rule!r}: choose one of {', '.join(SCORE_RULES)}.")
    itc = np.asarray(itc, dtype=np.float64)
    if rule == "itc":
        return itc.astype(np.float32)
    if itm_logits is None:
        raise TpasError(f"--score {rule} needs ITM logits; this model has no trained ITM head, use --score itc.")
    l0, l1 = (np.asarray(itm_logits[..., i], dtype=np.float64) for i in (0, 1))
    if rule == "xvlm":
        score = l1
    elif rule == "log-odds":
        score = l1 - l0
    elif rule == "tpas":
        score = l1 - l0 + itc_weight * itc
    elif rule == "blip":
        score = l1 + itc
    else:  # cmp
        low, high = itc_range if itc_range is not None else (float(itc.min()), float(itc.max()))
        score = _minmax(l1, float(l1.min()), float(l1.max())) + CMP_ITC_WEIGHT * _minmax(itc, low, high)
    return score.astype(np.float32)


def rules_for(has_itm: bool) -> tuple[str, ...]:
    """The rules a model can be scored by."""
    return SCORE_RULES if has_itm else ("itc",)
