"""Post-processing of a candidates table: SCA, global assignment, dual/inverted softmax, k-reciprocal re-ranking.

Every method reads the candidates table as [Q, K] arrays (queries in answer order, each row its
list in rank order; no Q×Q or Q×G matrix), writes the same schema back, and logs each query
whose top-1 it changed. `--method a,b,...` applies them in order, each on the previous one's
output; a method that re-scores replaces `score` and re-sorts, one that moves images keeps each
(query, image) pair's scores. Change log: one row per query whose top-1 the method changed
(`sca`: one row per move, with its round and group); `old_score`/`new_score` are the `score`
values the method received (so `delta` is the score given up), `method` names the method.

Methods
- `sca`: the paper's Similarity Coverage Analysis (`tpas.sca`, whose docstring defines the
  groups precisely): inside a group of similar captions, queries sharing a top-1 image keep it
  only for the most confident one; the others move on within their first `top_k`.
- `assign`: one gallery image per query, globally. A query may take any candidate among its
  first `top_k` whose score is within `assign_margin` of its top-1, at cost 1 + (top-1 score −
  its score); or stay "unassigned" (its own dummy column) at cost 1 + `assign_margin`, which
  leaves its list untouched. The minimum-cost full matching (scipy's sparse LAPJVsp,
  `min_weight_full_bipartite_matching`; the dummies make a full matching always exist) thus
  lets a query give up its first choice only for a close alternative, and resolves a shared
  top-1 only when the score given up is below the margin per conflict resolved. The assigned
  image goes to rank 1, the rest keeps its order below it (the given-up image is rank 2).
  Raw score margins are used because the scores are logits: the per-query softmax log-prob
  margin is the same number divided by a temperature, so a temperature would add nothing.
- `dual-softmax` / `inverted-softmax`: query-bank normalisation. With z = score / temperature,
  log p(q|g) = z − logsumexp over the queries whose list holds g (the column softmax, over
  those queries only: no Q×G matrix) and log p(g|q) = z − logsumexp over q's list. Inverted
  softmax scores log p(q|g) (Smith et al. 2017; QB-Norm, Bogolin et al. 2022, with the test
  queries as the bank); dual softmax scores log p(g|q) + log p(q|g) (DSL, Cheng et al. 2021),
  which keeps the query's own preference in. Scores are log-probabilities (no underflow);
  ties keep the previous order. Caveat: an image in few lists has a small normaliser, so the
  column softmax favours rarely retrieved images; keep lists long (k = 128) or the
  temperature moderate (`--tune` picks it).
- `rerank`: k-reciprocal re-ranking (Zhong et al. 2017) adapted to the bipartite text→image
  case, where only the top-k lists are known. With k = `rerank_k`: the holders of image g are
  the queries with g in their first k; q and g are reciprocal when g is in q's first k and q is
  among g's k highest-scoring holders. R(q) = q's reciprocal images, R'(g) = g's reciprocal
  queries. q is described by u_q, uniform over R(q); g by w_g, the mean of u_q' over q' in
  R'(g) (the images that the queries which reciprocally want g want: the bipartite stand-in
  for the original's neighbour expansion). J(q, g) = Σ min(u_q, w_g) / Σ max(u_q, w_g), the
  original's weighted Jaccard (0 when either set is empty). New score = score + `rerank_lambda`
  · J on q's first k candidates, which are re-sorted; the rest stays below, unchanged.

`tune` grid-searches each method's parameters on a validation stage with ground truth, method
by method in order (greedy: each method is tuned with the earlier ones at their chosen values),
maximising R@1 (ties: mAP, then the earlier grid point). Grids, kept small:
sca cos_threshold {0.8, 0.85, 0.9, 0.95, 0.99} × fuzzy_threshold {75, 85, 95} (the caption
graph is built once); the score-unit parameters are multiples of scales measured on the
validation candidates entering the method, so they fit any model's score units: assign_margin
= gap × {0.25, 0.5, 1, 2, 4} (gap: median top-1 − top-2 score), temperature = spread × {0.1,
0.3, 1, 3, 10} (spread: median per-query score std), rerank_k {5, 10, 20} × rerank_lambda =
head × {0.5, 1, 2, 4} (head: median top-1 − top-10 score).
"""
# ruff: noqa: RUF009  (tpas.cli.field() defaults carry the --help text, as in every config)

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.special import logsumexp

from tpas.cli import field
from tpas.errors import TpasError
from tpas.io import (
    read_json,
    staged_dir,
    write_bytes,
    write_json,
    write_parquet,
    write_text,
)
from tpas.metrics import ranking_metrics
from tpas.post.sca import (
    CHANGE_COLUMNS,
    COMBINE_CHOICES,
    GROUPING_CHOICES,
    KNN_CHOICES,
    CaptionGraph,
    Encoder,
    SCAConfig,
    caption_graph,
    change_log,
    graph_groups,
    sca_permutation,
    top1_conflicts_arrays,
)
from tpas.schema import (
    CANDIDATES_FILE,
    QUERIES_FILE,
    ground_truth,
    read_candidates,
    read_queries,
)

METHODS = ["sca", "assign", "dual-softmax", "inverted-softmax", "rerank"]
LOG_COLUMNS = ["method", *CHANGE_COLUMNS]
TUNED_FILE = "tuned.json"
SCA_OUTPUTS = (CANDIDATES_FILE, QUERIES_FILE, "changes.parquet", "changes.csv", "sca_config.json", "postprocess.json",
               "metrics.json")


@dataclass
class PostprocessConfig:
    """Parameters of every method (each method reads only its own)."""

    cos_threshold: float = field(0.9, help="sca: sentence-embedding cosine at or above which two captions are similar.")
    fuzzy_threshold: float = field(85.0, help="sca: rapidfuzz token_set_ratio (0-100) at or above which two captions "
                                              "are similar.")
    combine: str = field("or", help="sca: which similarity links two queries: either (or), both (and), cosine "
                                    "only, fuzzy only.", choices=COMBINE_CHOICES)
    neighbours: int = field(20, help="sca: nearest captions examined per query when building groups.")
    grouping: str = field("components", help="sca: groups are the connected components of the similarity graph, "
                                             "or those split by average-linkage agglomerative clustering.",
                          choices=GROUPING_CHOICES)
    knn: str = field("auto", help="sca: neighbour search: faiss exact (auto: up to 20k distinct captions) or IVF.",
                     choices=KNN_CHOICES)
    nprobe: int = field(12, help="sca: IVF cells searched per caption (knn ivf, or auto above 20k captions).")
    max_rounds: int = field(50, help="sca: stop resolving conflicts after this many rounds.")
    top_k: int = field(10, help="sca, assign: a query moves only within its first top-k candidates; all are kept.")
    assign_margin: float = field(1.0, help="assign: most score a query gives up (top-1 score minus the new one) "
                                           "to resolve a shared top-1; also the cost of leaving one unresolved.")
    temperature: float = field(1.0, help="dual-softmax, inverted-softmax: softmax temperature, in score units.")
    rerank_k: int = field(10, help="rerank: list depth of the k-reciprocal test and of the re-scored head.")
    rerank_lambda: float = field(1.0, help="rerank: weight of the Jaccard bonus (score units; J is in 0..1).")

    def __post_init__(self) -> None:
        self.sca()  # validates the SCA fields
        if not self.assign_margin > 0:
            raise TpasError(f"--assign-margin must be > 0; got {self.assign_margin}.")
        if not self.temperature > 0:
            raise TpasError(f"--temperature must be > 0; got {self.temperature}.")
        if self.rerank_k < 1 or self.rerank_lambda < 0:
            raise TpasError(f"--rerank-k must be ≥ 1 and --rerank-lambda ≥ 0; got {self.rerank_k}, "
                            f"{self.rerank_lambda}.")

    def sca(self) -> SCAConfig:
        return SCAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SCAConfig)})

    def replace(self, **changes: Any) -> PostprocessConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PostprocessConfig)}
        return PostprocessConfig(**{**values, **changes})


def parse_methods(text: str | list[str]) -> list[str]:
    """'dual-softmax, sca' → ['dual-softmax', 'sca'], checking each name."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise TpasError(f"--method takes a comma list of {', '.join(METHODS)}; got {text!r}.")
    return names


# ---------------------------------------------------------------------------------------------
# The table as arrays


@dataclass
class Lists:
    """A candidates table as [Q, K] arrays in answer order; padding: image -1, score NaN, row -1."""

    order: np.ndarray        # [Q] query ids (object)
    img: np.ndarray          # [Q, K] image codes into `names`
    score: np.ndarray        # [Q, K] float64
    row: np.ndarray          # [Q, K] row of `source`
    names: np.ndarray        # [G'] image names (object)
    source: pd.DataFrame

    def copy(self) -> Lists:
        return dataclasses.replace(self, img=self.img.copy(), score=self.score.copy(), row=self.row.copy())

    def permute(self, perm: np.ndarray, new_score: np.ndarray | None = None) -> None:
        """Reorder each row by `perm` (new slot → old slot); scores move along unless `new_score` is given."""
        self.img = np.take_along_axis(self.img, perm, axis=1)
        self.row = np.take_along_axis(self.row, perm, axis=1)
        self.score = np.take_along_axis(self.score, perm, axis=1) if new_score is None else new_score


def _answer_order(queries: pd.DataFrame) -> pd.DataFrame:
    return queries.sort_values("position", kind="stable") if "position" in queries.columns else queries


def query_order(queries: pd.DataFrame) -> list[str]:
    """Query ids in answer order (`position`)."""
    return _answer_order(queries)["query_index"].astype(str).tolist()


def query_captions(queries: pd.DataFrame) -> list[str]:
    """Captions in answer order (`position`); a missing caption is ''."""
    return _answer_order(queries)["caption"].fillna("").astype(str).tolist()


def _context(queries: pd.DataFrame, encoder: Encoder | None, embeddings: np.ndarray | None,
             cache_dir: str | Path | None) -> Context:
    """The captions (answer order) and, when given, `embeddings` (one row per row of `queries`) re-ordered alike."""
    if embeddings is not None:
        if len(embeddings) != len(queries):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(queries)} queries")
        if "position" in queries.columns:
            embeddings = np.asarray(embeddings)[np.argsort(queries["position"].to_numpy(), kind="stable")]
    return Context(query_captions(queries), encoder, embeddings, cache_dir)


def to_lists(candidates: pd.DataFrame, order: list[str]) -> Lists:
    """Arrays from a candidates table (any row order); raises ValueError for a query not in `order`."""
    qcodes, quniq = pd.factorize(candidates["query_index"])
    pos_of = pd.Index(order).get_indexer(pd.Index(quniq).astype(str))
    if (pos_of < 0).any():
        raise ValueError(f"candidates hold query {quniq[np.flatnonzero(pos_of < 0)[0]]!r}, which is absent from "
                         "the queries")
    q = pos_of[qcodes].astype(np.int64)
    rank = candidates["rank"].to_numpy(dtype=np.int64)
    key = q * (int(rank.max(initial=0)) + 2) + rank
    sort = np.arange(len(key)) if np.all(key[1:] >= key[:-1]) else np.argsort(key, kind="stable")
    q = q[sort]
    counts = np.bincount(q, minlength=len(order))
    col = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = max(int(counts.max(initial=0)), 1)
    icodes, inames = pd.factorize(candidates["image"])
    img = np.full((len(order), width), -1, dtype=np.int64)
    score = np.full((len(order), width), np.nan)
    row = np.full((len(order), width), -1, dtype=np.int64)
    img[q, col] = icodes[sort]
    score[q, col] = candidates["score"].to_numpy(dtype=float, na_value=np.nan)[sort]
    row[q, col] = sort
    return Lists(np.asarray(order, dtype=object), img, score, row,
                 np.asarray(pd.Index(inames).astype(str), dtype=object), candidates)


def from_lists(lists: Lists) -> pd.DataFrame:
    """The candidates table of `lists`: rows in answer order then new rank, rank 1..n, `score` as held."""
    valid = lists.row >= 0
    slot = np.nonzero(valid)[1]
    out = lists.source.iloc[lists.row[valid]].reset_index(drop=True)
    out["rank"] = (slot + 1).astype(out["rank"].dtype)
    out["score"] = lists.score[valid].astype(out["score"].dtype)
    return out


def _sort_by(new_score: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Per-row permutation sorting by new_score descending; ties and NaN keep order, padding stays last."""
    # NaN scores and padding both sort as +inf; the stable sort keeps padding, which is last, last.
    key = np.where(img >= 0, np.nan_to_num(-new_score, nan=np.inf), np.inf)
    return np.argsort(key, axis=1, kind="stable")


# ---------------------------------------------------------------------------------------------
# Methods on arrays. Each returns (perm, new_score or None, extra log or None).


def softmax_scores(img: np.ndarray, score: np.ndarray, temperature: float, dual: bool) -> np.ndarray:
    """log p(q|g) (inverted) or log p(g|q) + log p(q|g) (dual) for every list entry; NaN at padding.

    The column (per-image) logsumexp runs over the entries holding that image only.
    """
    valid = (img >= 0) & np.isfinite(score)
    z = np.where(valid, score / temperature, np.nan)
    codes, vals = img[valid], z[valid]
    n_img = int(img.max()) + 1 if img.size else 1
    col_max = np.full(n_img, -np.inf)
    np.maximum.at(col_max, codes, vals)
    col_sum = np.bincount(codes, weights=np.exp(vals - col_max[codes]), minlength=n_img)
    col_lse = col_max + np.log(np.where(col_sum > 0, col_sum, 1.0))
    out = np.full(score.shape, np.nan)
    out[valid] = vals - col_lse[codes]
    if dual:
        row_lse = logsumexp(np.where(valid, z, -np.inf), axis=1, keepdims=True)
        out = out + np.where(valid, z - row_lse, np.nan)
    return out


def _softmax_method(lists: Lists, params: PostprocessConfig, dual: bool) -> tuple[np.ndarray, np.ndarray, None]:
    new = softmax_scores(lists.img, lists.score, params.temperature, dual)
    perm = _sort_by(new, lists.img)
    return perm, np.take_along_axis(new, perm, axis=1), None


def assign_permutation(img: np.ndarray, score: np.ndarray, top_k: int, margin: float) -> np.ndarray:
    """`assign` (module docstring) on [Q, K] arrays: per-row permutation putting the assigned image first."""
    n_query, width = img.shape
    depth = int(min(top_k, width))
    sub, s = img[:, :depth], score[:, :depth]
    gap = np.maximum(s[:, :1] - s, 0.0)  # score given up relative to the current top-1
    ok = (sub >= 0) & np.isfinite(gap) & (gap < margin)
    q, slot = np.nonzero(ok)
    n_img = int(img.max()) + 1 if img.size else 1
    # A repeated (query, image) pair is one edge (sparse matrices would add the duplicates up).
    _, first = np.unique(q * n_img + sub[q, slot], return_index=True)
    q, slot = q[first], slot[first]
    rows = np.r_[q, np.arange(n_query)]
    cols = np.r_[sub[q, slot], n_img + np.arange(n_query)]
    cost = np.r_[1.0 + gap[q, slot], np.full(n_query, 1.0 + margin)]  # +1: no edge may weigh 0
    matrix = csr_matrix((cost, (rows, cols)), shape=(n_query, n_img + n_query))
    row_ind, col_ind = min_weight_full_bipartite_matching(matrix)
    chosen = np.full(n_query, -1, dtype=np.int64)
    chosen[row_ind] = col_ind
    perm = np.tile(np.arange(width), (n_query, 1))
    moved = np.flatnonzero((chosen < n_img) & (chosen != sub[:, 0]))
    if moved.size:
        # Slot of the assigned image in each moved row (it is within the first `depth`).
        p = np.argmax(sub[moved] == chosen[moved, None], axis=1)
        j = np.arange(width)[None, :]
        perm[moved] = np.where(j == 0, p[:, None], np.where(j <= p[:, None], j - 1, j))
    return perm


def rerank_scores(img: np.ndarray, score: np.ndarray, k: int, lam: float) -> np.ndarray:
    """`rerank` (module docstring): new scores for each row's first k entries (the rest unchanged)."""
    n_query, width = img.shape
    k = int(min(k, width))
    head, s = img[:, :k], score[:, :k]
    valid = (head >= 0) & np.isfinite(s)
    q, slot = np.nonzero(valid)
    g, sv = head[q, slot], s[q, slot]
    n_img = int(img.max()) + 1 if img.size else 1
    # Rank of q among the holders of g, by score (ties: earlier query first).
    order = np.lexsort((q, -sv, g))
    starts = np.r_[0, np.flatnonzero(np.diff(g[order])) + 1]
    rank_in_g = np.empty(len(order), dtype=np.int64)
    rank_in_g[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    recip = rank_in_g < k
    rq, rg = q[recip], g[recip]
    size_q = np.bincount(rq, minlength=n_query).astype(float)
    size_g = np.bincount(rg, minlength=n_img).astype(float)
    u = csr_matrix((1.0 / size_q[rq], (rq, rg)), shape=(n_query, n_img))
    w = csr_matrix((1.0 / size_g[rg], (rg, rq)), shape=(n_img, n_query)) @ u  # [G', G'], rows sum to 1
    w.sort_indices()
    # R(q) as a padded [Q, k] matrix of image codes.
    reciprocal = np.zeros(head.shape, dtype=bool)
    reciprocal[q[recip], slot[recip]] = True
    r_img = np.where(reciprocal, head, -1)
    share = np.where(size_q > 0, 1.0 / np.maximum(size_q, 1.0), 0.0)[:, None]  # u_q's weight on each of R(q)
    jaccard = np.zeros(head.shape)
    has_r = r_img >= 0
    rr, cc = np.nonzero(has_r)
    for j in range(k):  # one vectorised pass per head slot (k is small), never per query
        gj = head[rr, j]
        ok = (gj >= 0) & (size_g[np.maximum(gj, 0)] > 0)
        overlap = np.zeros(len(rr))
        if ok.any():
            w_vals = np.asarray(w[gj[ok], r_img[rr[ok], cc[ok]]]).ravel()
            overlap[ok] = np.minimum(share[rr[ok], 0], w_vals)
        m = np.bincount(rr, weights=overlap, minlength=n_query)
        jaccard[:, j] = m / (2.0 - m)  # both vectors sum to 1: Σmax = 2 − Σmin
    new = score.copy()
    new[:, :k] = np.where(valid, s + lam * jaccard, s)
    return new


def _rerank_method(lists: Lists, params: PostprocessConfig) -> tuple[np.ndarray, np.ndarray, None]:
    new = rerank_scores(lists.img, lists.score, params.rerank_k, params.rerank_lambda)
    k = int(min(params.rerank_k, new.shape[1]))
    perm = np.tile(np.arange(new.shape[1]), (new.shape[0], 1))
    perm[:, :k] = _sort_by(new[:, :k], lists.img[:, :k])
    return perm, np.take_along_axis(new, perm, axis=1), None


# ---------------------------------------------------------------------------------------------
# Applying a chain


@dataclass
class Context:
    """What the methods share across a chain (and across a tune): the captions' graph, lazily built."""

    captions: list[str]
    encoder: Encoder | None = None
    embeddings: np.ndarray | None = None
    cache_dir: str | Path | None = None
    graph: CaptionGraph | None = None
    graph_key: tuple | None = None
    groups_key: tuple | None = None
    groups: np.ndarray | None = None

    def query_groups(self, params: PostprocessConfig) -> np.ndarray:
        cfg = params.sca()
        if self.graph is None or self.graph_key != (cfg.neighbours, cfg.knn, cfg.nprobe):
            self.graph = caption_graph(self.captions, cfg, self.encoder, self.embeddings, self.cache_dir)
            self.graph_key = (cfg.neighbours, cfg.knn, cfg.nprobe)
        key = (cfg.cos_threshold, cfg.fuzzy_threshold, cfg.combine, cfg.grouping, cfg.neighbours, cfg.knn, cfg.nprobe)
        if key != self.groups_key:
            self.groups, self.groups_key = graph_groups(self.graph, cfg), key
        assert self.groups is not None
        return self.groups


def _step(lists: Lists, method: str, params: PostprocessConfig,
          ctx: Context) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None, dict[str, Any]]:
    info: dict[str, Any] = {}
    if method == "sca":
        groups = ctx.query_groups(params)
        info["conflicts_before"] = top1_conflicts_arrays(lists.img, groups)
        sizes = np.bincount(groups) if len(groups) else np.empty(0, dtype=np.int64)
        info["groups"] = int((sizes >= 2).sum())
        info["grouped_queries"] = int(sizes[sizes >= 2].sum())
        perm, log = sca_permutation(lists.img, lists.score, groups, params.top_k, params.max_rounds)
        info["rounds"] = int(log["round"].max()) if len(log["round"]) else 0
        info["moves"] = len(log["q"])
        return perm, None, log, info
    if method == "assign":
        return assign_permutation(lists.img, lists.score, params.top_k, params.assign_margin), None, None, info
    if method in ("dual-softmax", "inverted-softmax"):
        perm, new, _ = _softmax_method(lists, params, dual=method == "dual-softmax")
        return perm, new, None, info
    if method == "rerank":
        perm, new, _ = _rerank_method(lists, params)
        return perm, new, None, info
    raise TpasError(f"unknown post-processing method {method!r}; choose from {', '.join(METHODS)}.")


def run_chain(lists: Lists, methods: list[str], params: PostprocessConfig, ctx: Context,
              gt_codes: np.ndarray | None = None) -> tuple[Lists, pd.DataFrame, list[dict[str, Any]]]:
    """Apply `methods` to a copy of `lists`; returns (result, change log, per-method info)."""
    lists = lists.copy()
    logs, infos = [], []
    for method in methods:
        start = time.perf_counter()
        before_img, before_score = lists.img[:, 0].copy(), lists.score[:, 0].copy()
        perm, new_score, move_log, info = _step(lists, method, params, ctx)
        received = np.take_along_axis(lists.score, perm[:, :1], axis=1)[:, 0]  # input score of the new top-1
        lists.permute(perm, new_score)
        if method == "sca" and move_log is not None:
            log = move_log
            groups = ctx.groups if ctx.groups is not None else np.zeros(len(lists.order), dtype=np.int64)
            info["conflicts_after"] = top1_conflicts_arrays(lists.img, groups)
        else:
            q = np.flatnonzero((before_img != lists.img[:, 0]) & (before_img >= 0))
            log = {"q": q, "old_image": before_img[q], "new_image": lists.img[q, 0], "old_score": before_score[q],
                   "new_score": received[q], "round": np.ones(len(q), dtype=np.int64),
                   "group": np.full(len(q), -1, dtype=np.int64)}
        frame = change_log(log, lists.order, lists.names)
        frame.insert(0, "method", pd.Series([method] * len(frame), dtype="string"))
        logs.append(frame)
        info.update(method=method, seconds=time.perf_counter() - start,
                    queries_changed=int(frame["query_index"].nunique()))
        if gt_codes is not None:
            info["metrics"] = array_metrics(lists.img, gt_codes)
        infos.append(info)
    log_frame = pd.concat(logs, ignore_index=True) if logs else _empty_log()
    return lists, log_frame, infos


def _empty_log() -> pd.DataFrame:
    frame = change_log({k: np.empty(0) for k in ("q", "old_image", "new_image", "old_score", "new_score", "round",
                                                 "group")}, [], np.empty(0, dtype=object))
    frame.insert(0, "method", pd.Series([], dtype="string"))
    return frame


def array_metrics(img: np.ndarray, gt_codes: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k and mAP (%) with one true image per query (code; -1 = not in the lists), over queries with ground truth.

    Equals `tpas.metrics.ranking_metrics` for one true image per query.
    """
    known = gt_codes != -2  # -2: the query has no ground truth
    hits = (img[known] == gt_codes[known, None]) & (gt_codes[known, None] >= 0)
    found = hits.any(axis=1)
    rank = np.where(found, hits.argmax(axis=1) + 1, np.inf)
    out = {f"R@{k}": float(np.mean(rank <= k) * 100) for k in ks}
    out["mAP"] = float(np.mean(np.where(found, 1.0 / rank, 0.0)) * 100)
    out["queries"] = int(known.sum())
    return out


def gt_codes_for(lists: Lists, queries: pd.DataFrame) -> np.ndarray | None:
    """Per query (answer order): code of its true image, -1 when it is in no list, -2 without ground truth."""
    gt = ground_truth(queries)
    if gt is None:
        return None
    true = pd.Series(lists.order).map(gt)
    out = np.full(len(lists.order), -2, dtype=np.int64)
    has = true.notna().to_numpy()
    out[has] = pd.Index(lists.names).get_indexer(true[has].astype(str))
    return out


def apply_methods_with_info(candidates: pd.DataFrame, queries: pd.DataFrame, methods: list[str],
                            params: PostprocessConfig, encoder: Encoder | None = None,
                            embeddings: np.ndarray | None = None, cache_dir: str | Path | None = None,
                            context: Context | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """`apply_methods`, plus info: per-method timings and counts, grouping timings, conversion times."""
    methods = parse_methods(methods)
    order = query_order(queries)
    start = time.perf_counter()
    lists = to_lists(candidates, order)
    to_s = time.perf_counter() - start
    ctx = context or _context(queries, encoder, embeddings, cache_dir)
    result, log, steps = run_chain(lists, methods, params, ctx, gt_codes_for(lists, queries))
    start = time.perf_counter()
    frame = from_lists(result)
    info = {"to_arrays_s": to_s, "from_arrays_s": time.perf_counter() - start, "steps": steps,
            "grouping": dict(ctx.graph.timings) if ctx.graph is not None else {}, "groups": ctx.groups}
    return frame, log, info


def apply_methods(candidates: pd.DataFrame, queries: pd.DataFrame, methods: list[str], params: PostprocessConfig,
                  encoder: Encoder | None = None, embeddings: np.ndarray | None = None,
                  cache_dir: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply `methods` (names from METHODS) in order; returns (new candidates, change log).

    `queries` gives the answer order (`position`) and, for `sca`, the captions; `embeddings`
    ([Q, d], one row per row of `queries`) replaces the sentence encoder, else `encoder` (default: the
    packaged MiniLM, cached under `cache_dir` when given) embeds the distinct captions. The
    change log has LOG_COLUMNS (module docstring). Output rows: answer order, then rank 1..n.
    """
    frame, log, _ = apply_methods_with_info(candidates, queries, methods, params, encoder, embeddings, cache_dir)
    return frame, log


# ---------------------------------------------------------------------------------------------
# Tuning

SCA_COS_GRID = [0.8, 0.85, 0.9, 0.95, 0.99]
SCA_FUZZY_GRID = [75.0, 85.0, 95.0]
MARGIN_MULTIPLES = [0.25, 0.5, 1.0, 2.0, 4.0]
TEMPERATURE_MULTIPLES = [0.1, 0.3, 1.0, 3.0, 10.0]
RERANK_K_GRID = [5, 10, 20]
RERANK_LAMBDA_MULTIPLES = [0.5, 1.0, 2.0, 4.0]


def _scales(lists: Lists) -> dict[str, float]:
    """Typical score differences of the lists entering a method (medians over queries), for the grids."""
    s = lists.score

    def median(x: np.ndarray, fallback: float) -> float:
        x = x[np.isfinite(x) & (x > 0)]
        return float(np.median(x)) if x.size else fallback

    gap = median(s[:, 0] - s[:, 1], 1.0) if s.shape[1] > 1 else 1.0
    head = median(s[:, 0] - s[:, min(9, s.shape[1] - 1)], gap)
    with np.errstate(invalid="ignore"):
        spread = median(np.nanstd(np.where(np.isfinite(s), s, np.nan), axis=1), 1.0)
    return {"gap": gap, "head": head, "spread": spread}


def method_grid(method: str, lists: Lists, params: PostprocessConfig) -> list[dict[str, Any]]:
    """The (documented) grid of parameter settings tried for `method`, given the lists entering it."""
    scale = _scales(lists)

    def r(x: float) -> float:
        return float(f"{x:.4g}")

    if method == "sca":
        return [{"cos_threshold": c, "fuzzy_threshold": f} for c in SCA_COS_GRID for f in SCA_FUZZY_GRID]
    if method == "assign":
        return [{"assign_margin": r(scale["gap"] * m)} for m in MARGIN_MULTIPLES]
    if method in ("dual-softmax", "inverted-softmax"):
        return [{"temperature": r(scale["spread"] * m)} for m in TEMPERATURE_MULTIPLES]
    if method == "rerank":
        return [{"rerank_k": k, "rerank_lambda": r(scale["head"] * m)}
                for k in RERANK_K_GRID for m in RERANK_LAMBDA_MULTIPLES]
    raise TpasError(f"unknown post-processing method {method!r}; choose from {', '.join(METHODS)}.")


def tune(candidates: pd.DataFrame, queries: pd.DataFrame, methods: list[str], params: PostprocessConfig,
         encoder: Encoder | None = None, embeddings: np.ndarray | None = None,
         cache_dir: str | Path | None = None,
         progress: Callable[[str], None] | None = None) -> tuple[PostprocessConfig, dict[str, Any]]:
    """Grid-search each method's parameters on a validation set with ground truth (module docstring).

    Returns (the chosen config, a report: methods, chosen values, the grid results per method,
    baseline and final metrics). Raises TpasError when `queries` has no ground truth.
    """
    methods = parse_methods(methods)
    order = query_order(queries)
    lists = to_lists(candidates, order)
    gt_codes = gt_codes_for(lists, queries)
    if gt_codes is None:
        raise TpasError("the validation queries have no gt_image; point --tune at a stage dir whose "
                        "queries.parquet carries ground truth.")
    ctx = _context(queries, encoder, embeddings, cache_dir)
    baseline = array_metrics(lists.img, gt_codes)
    report: dict[str, Any] = {"methods": methods, "baseline": baseline, "chosen": {}, "grid": {}}
    best_params, current = params, lists
    for method in methods:
        results = []
        for setting in method_grid(method, current, best_params):
            trial = best_params.replace(**setting)
            out, _, _ = run_chain(current, [method], trial, ctx)
            results.append({**setting, **array_metrics(out.img, gt_codes)})
        best = max(range(len(results)), key=lambda i: (results[i]["R@1"], results[i]["mAP"], -i))
        chosen = {k: results[best][k] for k in method_grid(method, current, best_params)[0]}
        best_params = best_params.replace(**chosen)
        current, _, _ = run_chain(current, [method], best_params, ctx)
        report["chosen"][method] = chosen
        report["grid"][method] = results
        if progress:
            progress(f"tune {method}: {', '.join(f'{k}={v}' for k, v in chosen.items())} → "
                     f"R@1 {results[best]['R@1']:.2f} mAP {results[best]['mAP']:.2f} "
                     f"({len(results)} settings)")
    report["final"] = array_metrics(current.img, gt_codes)
    report["params"] = dataclasses.asdict(best_params)
    return best_params, report


def load_params(path: str | Path) -> tuple[PostprocessConfig, list[str]]:
    """(config, methods) from a tuned.json written by `tune` / `sca.py --tune`."""
    data = read_json(path)
    values = data.get("params") if isinstance(data, dict) else None
    names = {f.name for f in dataclasses.fields(PostprocessConfig)}
    if not isinstance(values, dict) or set(values) - names:
        extra = sorted(set(values) - names) if isinstance(values, dict) else []
        raise TpasError(f"{path}: not a tuned.json from `sca.py --tune` ({'unknown ' + ', '.join(extra) if extra else 'no params'});"
                        " re-run the tuning.")
    return PostprocessConfig(**values), parse_methods(data.get("methods", ["sca"]))


# ---------------------------------------------------------------------------------------------
# The stage (sca.py)


@dataclass
class SCAStageConfig(PostprocessConfig):
    input_dir: Path = field(Path("outputs/infer"), help="Stage dir to read: candidates.parquet + queries.parquet.")
    output_dir: Path = field(Path("outputs/sca"), help="Where to write the re-ranked candidates and the change log "
                                                       "(with --tune: tuned.json only).")
    method: str = field("", help=f"Comma list of methods applied in order, from {', '.join(METHODS)} "
                                 "(default: sca, or the methods in --params).")
    tune: Path | None = field(None, help="Validation stage dir with ground truth: grid-search the methods' "
                                         "parameters on it and write OUTPUT_DIR/tuned.json (nothing else).")
    params: Path | None = field(None, help="tuned.json from --tune: its values (and methods) replace the flags "
                                           "left at their defaults.")
    cache_dir: Path | None = field(Path("outputs/cache"), help="Sentence-embedding cache (keyed by the caption "
                                                               "texts).")

    def postprocess(self) -> PostprocessConfig:
        return PostprocessConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PostprocessConfig)})


def _resolve(cfg: SCAStageConfig) -> tuple[PostprocessConfig, list[str]]:
    params, methods = cfg.postprocess(), parse_methods(cfg.method) if cfg.method else ["sca"]
    if cfg.params is not None:
        tuned, tuned_methods = load_params(cfg.params)
        defaults = PostprocessConfig()
        # A flag left at its default takes the file's value; a flag set explicitly wins.
        changed = {f.name: getattr(params, f.name) for f in dataclasses.fields(PostprocessConfig)
                   if getattr(params, f.name) != getattr(defaults, f.name)}
        params = tuned.replace(**changed)
        methods = parse_methods(cfg.method) if cfg.method else tuned_methods
    return params, methods


def _read_stage(stage_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    candidates, queries = read_candidates(stage_dir), read_queries(stage_dir)
    unknown = set(candidates["query_index"].astype(str)) - set(queries["query_index"].astype(str))
    if unknown:
        raise TpasError(f"{Path(stage_dir) / CANDIDATES_FILE}: {len(unknown)} query id(s) (e.g. {min(unknown)}) "
                        f"are not in {QUERIES_FILE}; re-run the stage that wrote {stage_dir}.")
    return candidates, queries


def run_sca_stage(cfg: SCAStageConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """Read a stage dir, apply the methods, write output_dir; returns the summary. With `tune`: tune only."""
    params, methods = _resolve(cfg)
    out = Path(cfg.output_dir)
    if cfg.tune is not None:
        candidates, queries = _read_stage(Path(cfg.tune))
        _, report = tune(candidates, queries, methods, params, encoder=encoder, cache_dir=cfg.cache_dir,
                         progress=print)
        report["validation"] = str(cfg.tune)
        write_json(out / TUNED_FILE, report)
        print(f"tune: R@1 {report['baseline']['R@1']:.2f} → {report['final']['R@1']:.2f} on {cfg.tune} "
              f"({report['final']['queries']} queries); wrote {out / TUNED_FILE}")
        return report

    candidates, queries = _read_stage(Path(cfg.input_dir))
    new, changes, info = apply_methods_with_info(candidates, queries, methods, params, encoder=encoder,
                                                 cache_dir=cfg.cache_dir)
    steps = info["steps"]
    gt = ground_truth(queries)
    metrics = {"before": ranking_metrics(candidates, gt), "after": ranking_metrics(new, gt)} if gt is not None else None
    # the whole stage dir at once (a kill leaves the previous one complete); a tuned.json there stays
    with staged_dir(out, SCA_OUTPUTS, "sca") as part:
        write_parquet(part / CANDIDATES_FILE, new)
        write_bytes(part / QUERIES_FILE, (Path(cfg.input_dir) / QUERIES_FILE).read_bytes())
        write_parquet(part / "changes.parquet", changes)
        write_text(part / "changes.csv", changes.to_csv(index=False, float_format="%.6g"))
        write_json(part / "sca_config.json", {**dataclasses.asdict(cfg), "methods": methods,
                                              "resolved": dataclasses.asdict(params)})
        write_json(part / "postprocess.json", {"methods": methods, "steps": steps, "grouping": info["grouping"]})
        if metrics is not None:
            write_json(part / "metrics.json", metrics)

    summary: dict[str, Any] = {"queries": len(queries), "methods": methods, "steps": steps,
                               "queries_changed": int(changes["query_index"].nunique()), "moves": len(changes)}
    sca_step = next((s for s in steps if s["method"] == "sca"), None)
    if sca_step is not None:
        summary.update({k: sca_step[k] for k in ("groups", "grouped_queries", "conflicts_before", "conflicts_after",
                                                 "rounds")})
    for step in steps:
        line = f"{step['method']}: {step['queries_changed']} queries changed top-1 ({step['seconds']:.1f} s)"
        if step["method"] == "sca":
            line = (f"sca: {step['groups']} groups of similar queries ({step['grouped_queries']} of {len(queries)} "
                    f"queries); top-1 conflicts {step['conflicts_before']} → {step['conflicts_after']}; "
                    f"{step['queries_changed']} queries changed ({step['moves']} moves, {step['rounds']} rounds)")
        if "metrics" in step:
            line += f"; R@1 {step['metrics']['R@1']:.2f}"
        print(line)
    if metrics is not None:
        summary["metrics"] = metrics
        print("metrics: " + "  ".join(f"{k} {metrics['before'][k]:.2f} → {metrics['after'][k]:.2f}"
                                      for k in ("R@1", "R@5", "R@10")))
    return summary

