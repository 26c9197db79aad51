"""Retrieval metrics as the text-based person search code (CMP, IRRA) defines them.

For each query the gallery is ranked; the CMC curve gives R@k (percentage of queries with a
true image within the top k), AP is the mean precision at the rank of each true image, and
INP = #true images / rank of the last (hardest) true image. All values are percentages 0-100.

Entry points, all summarised by one function (`_summarise_matrix`), so they agree exactly:
- `ranking_metrics` scores a candidates table (top-k lists). A true image that is not in a
  query's list counts as not retrieved, so R@k is exact for k up to the list length while mAP
  and mINP are lower bounds (a true image just below the cut-off would add a little).
- `rank_metrics` / `array_metrics`: the same for one true image per query, from its rank
  (`rank_metrics`) or from [Q, K] image-code lists (`array_metrics`, tpas.post's arrays): no
  string table, for a tune's hundreds of evaluations and an ensemble's millions of rows.
- `matrix_metrics` scores a full [Q, G] score matrix and is exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

Metrics = dict[str, float]


def _as_set(value: str | Collection[str]) -> list[str]:
    # A bare string is one image name, not a collection of characters.
    return [value] if isinstance(value, str) else list(dict.fromkeys(value))


def _summarise_matrix(ranks: np.ndarray, num_rel: np.ndarray, ks: Sequence[int]) -> Metrics:
    """ranks: [Q, M] ascending 1-based ranks of the true images, inf where missing or padding."""
    ranks = np.sort(ranks, axis=1)
    found = np.isfinite(ranks)
    ordinal = np.arange(1, ranks.shape[1] + 1)
    # Precision at the i-th true image is i / rank_i; a missing true image adds 0 (CMP's AP).
    precision = np.where(found, ordinal / np.where(found, ranks, 1.0), 0.0)
    safe_rel = np.maximum(num_rel, 1)
    ap = np.where(num_rel > 0, precision.sum(axis=1) / safe_rel, 0.0)
    # INP needs the hardest true image; if any true image is missing its rank is unknown → 0.
    all_found = (found.sum(axis=1) == num_rel) & (num_rel > 0)
    last = np.where(all_found, np.where(found, ranks, 0).max(axis=1), 1.0)
    inp = np.where(all_found, num_rel / last, 0.0)
    best = ranks[:, 0]
    out: Metrics = {f"R@{k}": float(np.mean(best <= k) * 100) for k in ks}
    out["mAP"] = float(ap.mean() * 100)
    out["mINP"] = float(inp.mean() * 100)
    out["queries"] = len(num_rel)
    return out


def ranking_metrics(
    candidates: pd.DataFrame, gt: Mapping[str, str | Collection[str]], ks: Sequence[int] = (1, 5, 10)
) -> Metrics:
    """R@k, mAP and mINP of a candidates table against `gt` (query_index → true image(s)).

    Every query in `gt` is scored; one absent from `candidates`, or whose true image is not in
    its list, counts as a miss. Queries without ground truth are ignored. The `rank` column
    gives the order. Exact for R@k with k ≤ list length; mAP/mINP are lower bounds.
    """
    pairs = pd.DataFrame(
        [(str(q), str(img)) for q, images in gt.items() for img in _as_set(images)],
        columns=["query_index", "image"],
    )
    if pairs.empty:
        raise ValueError("no queries with ground truth to score")
    cand = candidates[["query_index", "image", "rank"]].astype({"query_index": str, "image": str})
    # A repeated (query, image) pair counts once, at its best rank.
    cand = cand.groupby(["query_index", "image"], as_index=False, sort=False)["rank"].min()
    hits = pairs.merge(cand, on=["query_index", "image"], how="left")
    hits["rank"] = hits["rank"].astype(float).fillna(np.inf)
    queries = list(dict.fromkeys(str(q) for q in gt))
    hits["q"] = hits["query_index"].map({q: i for i, q in enumerate(queries)})
    hits = hits.sort_values(["q", "rank"], kind="stable")
    slot = hits.groupby("q", sort=False).cumcount().to_numpy()
    ranks = np.full((len(queries), int(slot.max()) + 1), np.inf)
    ranks[hits["q"].to_numpy(), slot] = hits["rank"].to_numpy()
    return _summarise_matrix(ranks, np.bincount(hits["q"].to_numpy(), minlength=len(queries)), ks)


def rank_metrics(true_rank: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> Metrics:
    """`ranking_metrics` with one true image per query, from its 1-based rank (inf: not in the list).

    One entry per query with ground truth, in the order `ranking_metrics` would take them (the
    ground truth's); with one true image, mINP equals mAP.
    """
    ranks = np.asarray(true_rank, dtype=float)[:, None]
    return _summarise_matrix(ranks, np.ones(len(ranks), dtype=np.int64), ks)


def array_metrics(img: np.ndarray, gt_codes: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> Metrics:
    """R@k and mAP (%) of [Q, K] image-code lists (-1: padding), over the queries with ground truth.

    `gt_codes[q]`: the code of q's true image, -1 when it is in no list, -2 when q has no ground
    truth (`tpas.post.lists.gt_codes_for`). Equals `ranking_metrics` for one true image per
    query; mINP (equal to mAP then) is left out.
    """
    known = gt_codes != -2
    hits = (img[known] == gt_codes[known, None]) & (gt_codes[known, None] >= 0)
    found = hits.any(axis=1)
    rank = np.where(found, hits.argmax(axis=1) + 1, np.inf)
    out = rank_metrics(rank, ks)
    del out["mINP"]
    return out


def matrix_metrics(
    scores: np.ndarray,
    gt_index: Sequence[int | Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_elements: int = 1 << 25,
) -> Metrics:
    """Exact metrics from a [Q, G] score matrix (higher = better) and each query's true column(s).

    Ties are broken pessimistically: a wrong image with the same score as a true image is
    ranked above it, so a constant scorer gets no credit. A query with no true column is a miss.
    Vectorised: the rank of each true image is the number of gallery scores ≥ its score,
    counted in query chunks of about `chunk_elements` comparisons, with no per-query loop over G.
    """
    scores = np.asarray(scores, dtype=float)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a NaN score must not outrank anything
    if scores.ndim != 2 or scores.shape[0] != len(gt_index):
        raise ValueError(f"scores must be [Q, G] with Q = len(gt_index); got {scores.shape} and {len(gt_index)}")
    n_query, n_gallery = scores.shape
    true_cols = [sorted(set([g] if isinstance(g, (int, np.integer)) else [int(x) for x in g])) for g in gt_index]
    num_rel = np.array([len(c) for c in true_cols])
    width = max(int(num_rel.max(initial=0)), 1)
    cols = np.zeros((n_query, width), dtype=np.int64)
    valid = np.zeros((n_query, width), dtype=bool)
    for row, c in enumerate(true_cols):
        cols[row, : len(c)] = c
        valid[row, : len(c)] = True
    if cols.size and (cols.max() >= n_gallery or cols.min() < 0):
        raise ValueError(f"gt_index holds a column outside 0..{n_gallery - 1}")

    true_scores = np.take_along_axis(scores, cols, axis=1)
    ranks = np.full((n_query, width), np.inf)
    step = max(1, chunk_elements // max(1, n_gallery * width))
    for start in range(0, n_query, step):
        sl = slice(start, start + step)
        s, t, v = scores[sl], true_scores[sl], valid[sl]
        at_least = (s[:, None, :] >= t[:, :, None]).sum(axis=2)  # [chunk, M]: images scoring ≥ each true one
        # Of those, the true ones scoring ≥ t_i: they are not negatives, so remove them ...
        true_at_least = ((t[:, None, :] >= t[:, :, None]) & v[:, None, :]).sum(axis=2)
        negatives_above = at_least - true_at_least
        # ... and place the true images among themselves by score: the i-th best has i-1 before it.
        order = np.argsort(np.where(v, -t, np.inf), axis=1, kind="stable")
        ordinal = np.empty_like(order)
        np.put_along_axis(ordinal, order, np.arange(1, width + 1)[None, :].repeat(len(order), 0), axis=1)
        ranks[sl] = np.where(v, negatives_above + ordinal, np.inf)
    return _summarise_matrix(ranks, num_rel, ks)


def format_metrics(m: Mapping[str, float]) -> str:
    """One line, e.g. 'R@1 85.49  R@5 95.10  R@10 97.02  mAP 88.70  mINP 88.70  (n=1978)'."""
    parts = [f"{k} {m[k]:.2f}" for k in m if k.startswith("R@")]
    parts += [f"{k} {m[k]:.2f}" for k in ("mAP", "mINP") if k in m]
    return "  ".join(parts) + (f"  (n={int(m['queries'])})" if "queries" in m else "")
