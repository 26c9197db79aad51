import numpy as np
import pandas as pd
import pytest

from tpas.metrics import (
    array_metrics,
    format_metrics,
    matrix_metrics,
    rank_metrics,
    ranking_metrics,
)


def candidates(lists: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(q, r, img) for q, images in lists.items() for r, img in enumerate(images, start=1)]
    frame = pd.DataFrame(rows, columns=["query_index", "rank", "image"])
    frame["itc"] = frame["itm"] = np.nan
    frame["score"] = -frame["rank"].astype(float)
    return frame


def cmp_reference(scores: np.ndarray, gt_index: list[list[int]], max_rank: int = 10) -> dict[str, float]:
    """CMP's `rank` function (utils/metrics), ported to numpy line by line."""
    indices = np.argsort(-scores, axis=1, kind="stable")
    truth = np.zeros_like(scores, dtype=bool)
    for q, cols in enumerate(gt_index):
        truth[q, cols] = True
    matches = np.take_along_axis(truth, indices, axis=1)
    all_cmc = np.minimum(matches[:, :max_rank].cumsum(1), 1).mean(0) * 100
    num_rel = matches.sum(1)
    tmp_cmc = matches.cumsum(1)
    inp = [tmp_cmc[i][np.flatnonzero(row)[-1]] / (np.flatnonzero(row)[-1] + 1.0) for i, row in enumerate(matches)]
    tmp_cmc = tmp_cmc / np.arange(1, scores.shape[1] + 1) * matches
    ap = tmp_cmc.sum(1) / num_rel
    return {
        "R@1": all_cmc[0],
        "R@5": all_cmc[4],
        "R@10": all_cmc[9],
        "mAP": ap.mean() * 100,
        "mINP": np.mean(inp) * 100,
    }


def test_hand_computed_ranking_metrics():
    cands = candidates(
        {
            "q1": ["a", "X", "b", "c"],  # true X at rank 2: AP 1/2, INP 1/2
            "q2": ["X", "a", "Y", "b"],  # true X, Y at ranks 1, 3: AP (1/1 + 2/3)/2, INP 2/3
            "q3": ["a", "b", "c", "d", "e", "f"],  # true Z not listed: miss
            "q9": ["X"],  # no ground truth: ignored
        }
    )
    gt = {"q1": "X", "q2": ["X", "Y"], "q3": "Z", "q4": "X"}  # q4 has no candidates: miss
    m = ranking_metrics(cands, gt)
    assert m["queries"] == 4
    assert m["R@1"] == pytest.approx(25.0)
    assert m["R@5"] == pytest.approx(50.0)
    assert m["R@10"] == pytest.approx(50.0)
    assert m["mAP"] == pytest.approx((0.5 + 5 / 6) / 4 * 100)
    assert m["mINP"] == pytest.approx((0.5 + 2 / 3) / 4 * 100)


def test_partially_retrieved_multi_match_is_a_lower_bound():
    m = ranking_metrics(candidates({"q": ["X", "a", "b"]}), {"q": {"X", "Y"}})
    assert m["R@1"] == 100.0
    assert m["mAP"] == pytest.approx(50.0)  # (1/1 + 0) / 2: the unlisted Y adds nothing
    assert m["mINP"] == 0.0  # the hardest match's rank is unknown


def test_missing_ground_truth_query_counts_as_miss():
    cands = candidates({"q1": ["X"]})
    assert ranking_metrics(cands, {"q1": "X"})["R@1"] == 100.0
    m = ranking_metrics(cands, {"q1": "X", "q2": "X"})
    assert (m["R@1"], m["mAP"], m["mINP"], m["queries"]) == (50.0, 50.0, 50.0, 2)


def test_matrix_ties_are_pessimistic():
    scores = np.array([[0.1, 0.9, 0.5, 0.5, 0.3]])
    m = matrix_metrics(scores, [2])
    assert (m["R@1"], m["R@5"]) == (0.0, 100.0)
    assert m["mAP"] == pytest.approx(100 / 3)  # the tied wrong image (col 3) goes first
    two = matrix_metrics(scores, [[2, 3]])  # tied true images: ranks 2 and 3
    assert two["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    assert two["mINP"] == pytest.approx(2 / 3 * 100)
    assert matrix_metrics(np.zeros((1, 5)), [0])["R@1"] == 0.0  # a constant scorer earns nothing


def test_matrix_matches_cmp_reference_and_candidates_path():
    rng = np.random.default_rng(0)
    n_query, n_gallery = 60, 25
    scores = rng.standard_normal((n_query, n_gallery))
    gt_index = [sorted(rng.choice(n_gallery, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(n_query)]
    exact = matrix_metrics(scores, gt_index)
    reference = cmp_reference(scores, gt_index)
    for key in reference:
        assert exact[key] == pytest.approx(reference[key]), key
    # A top-k list holding the whole gallery gives the same numbers through the candidates path.
    order = np.argsort(-scores, axis=1)
    lists = {f"q{q}": [f"img{g}" for g in order[q]] for q in range(n_query)}
    gt = {f"q{q}": [f"img{g}" for g in cols] for q, cols in enumerate(gt_index)}
    from_lists = ranking_metrics(candidates(lists), gt)
    for key in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        assert from_lists[key] == pytest.approx(exact[key]), key
    # Cut to top-5: R@1/R@5 stay exact, mAP can only drop.
    top5 = ranking_metrics(candidates({q: v[:5] for q, v in lists.items()}), gt)
    assert (top5["R@1"], top5["R@5"]) == pytest.approx((exact["R@1"], exact["R@5"]))
    assert top5["mAP"] <= exact["mAP"] + 1e-9


def test_matrix_metrics_at_challenge_scale_single_match():
    rng = np.random.default_rng(1)
    scores = rng.random((2000, 3000), dtype=np.float32)
    gt_index = rng.integers(0, 3000, size=2000)
    scores[np.arange(1000), gt_index[:1000]] += 0.5  # make half the queries easy
    m = matrix_metrics(scores, list(gt_index))
    true_rank = (scores > scores[np.arange(2000), gt_index][:, None]).sum(1) + 1
    assert m["R@1"] == pytest.approx(np.mean(true_rank == 1) * 100)
    assert m["mAP"] == pytest.approx(np.mean(1 / true_rank) * 100)
    assert m["mINP"] == pytest.approx(m["mAP"])  # one match: INP = AP


def test_rank_and_array_forms_equal_ranking_metrics_exactly():
    # One metrics path: the array forms (tpas.post's arrays, the ensemble) give ranking_metrics' numbers bit for bit,
    # with a partial ground truth, true images outside the lists and ragged lists.
    rng = np.random.default_rng(3)
    ids = [f"q{i}" for i in range(200)]
    lists = {q: [f"g{g}" for g in rng.choice(80, int(rng.integers(1, 12)), replace=False)] for q in ids}
    gt = {q: f"g{rng.integers(0, 90)}" for q in ids if rng.random() < 0.8}  # g80..g89 are in no list
    want = ranking_metrics(candidates(lists), gt)
    true_rank = np.array([lists[q].index(gt[q]) + 1.0 if gt[q] in lists[q] else np.inf for q in gt])
    assert rank_metrics(true_rank) == want
    names = sorted({g for images in lists.values() for g in images})
    code = {g: i for i, g in enumerate(names)}
    img = np.full((len(ids), 11), -1)
    for row, q in enumerate(ids):
        img[row, : len(lists[q])] = [code[g] for g in lists[q]]
    gt_codes = np.array([code.get(gt[q], -1) if q in gt else -2 for q in ids])
    assert array_metrics(img, gt_codes) == {k: v for k, v in want.items() if k != "mINP"}
    assert want["mINP"] == want["mAP"]  # one true image per query


def test_format_metrics_one_line():
    line = format_metrics({"R@1": 85.4912, "R@5": 95.1, "R@10": 97.0, "mAP": 88.7, "mINP": 80.25, "queries": 1978})
    assert line == "R@1 85.49  R@5 95.10  R@10 97.00  mAP 88.70  mINP 80.25  (n=1978)"
