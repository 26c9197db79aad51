"""Post-processing of a candidates table: SCA, global assignment, dual/inverted softmax, k-reciprocal re-ranking.

Every method reads the candidates table as [Q, K] arrays (queries in answer order, each row its
list in rank order; no Q×Q or Q×G matrix), writes the same schema back, and logs each query
whose top-1 it changed. `--method a,b,...` applies them in order, each on the previous one's
output; a method that re-scores replaces `score` and re-sorts, one that moves images keeps each
(query, image) pair's scores. Change log: one row per query whose top-1 the method changed
(`sca`: one row per move, with its round and group); `old_score`/`new_score` are the `score`
values the method received (so `delta` is the score given up), `method` names the method.

Methods (`REGISTRY`: name → `Method(apply, grid, fields)`; `run_chain` and `tune` only look them
up there, so a new method is one `apply` function and one entry)
- `sca`: the paper's Similarity Coverage Analysis (`tpas.post.sca`, whose docstring defines the
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

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.special import logsumexp

from tpas.cli import field
from tpas.errors import TpasError
from tpas.io import read_json
from tpas.metrics import array_metrics
from tpas.post.lists import (
    CHANGE_COLUMNS,
    Lists,
    change_log,
    from_lists,
    gt_codes_for,
    move_to_front,
    query_captions,
    query_order,
    sort_by,
    to_lists,
)
from tpas.post.sca import (
    CaptionGraph,
    Encoder,
    SCAConfig,
    caption_graph,
    graph_groups,
    sca_permutation,
    top1_conflicts_arrays,
)

LOG_COLUMNS = ["method", *CHANGE_COLUMNS]
SCA_FIELDS = tuple(f.name for f in dataclasses.fields(SCAConfig))


@dataclass
class PostprocessConfig(SCAConfig):
    """Parameters of every method (each method reads only its own: `REGISTRY[name].fields`)."""

    assign_margin: float = field(
        1.0,
        help="assign: most score a query gives up (top-1 score minus the new one) "
        "to resolve a shared top-1; also the cost of leaving one unresolved.",
    )
    temperature: float = field(1.0, help="dual-softmax, inverted-softmax: softmax temperature, in score units.")
    rerank_k: int = field(10, help="rerank: list depth of the k-reciprocal test and of the re-scored head.")
    rerank_lambda: float = field(1.0, help="rerank: weight of the Jaccard bonus (score units; J is in 0..1).")

    def __post_init__(self) -> None:
        super().__post_init__()  # the SCA fields first, as the CLI lists them
        if not self.assign_margin > 0:
            raise TpasError(f"--assign-margin must be > 0; got {self.assign_margin}.")
        if not self.temperature > 0:
            raise TpasError(f"--temperature must be > 0; got {self.temperature}.")
        if self.rerank_k < 1 or self.rerank_lambda < 0:
            raise TpasError(
                f"--rerank-k must be ≥ 1 and --rerank-lambda ≥ 0; got {self.rerank_k}, {self.rerank_lambda}."
            )

    def replace(self, **changes: Any) -> PostprocessConfig:
        """A PostprocessConfig (also from a subclass such as the stage's config) with `changes` applied."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PostprocessConfig)}
        return PostprocessConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------------------
# What a method receives and returns


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

    def query_groups(self, cfg: SCAConfig) -> np.ndarray:
        # The graph depends on the neighbour search only; thresholds just re-cut it (a tune's grid).
        if self.graph is None or self.graph_key != (cfg.neighbours, cfg.knn, cfg.nprobe):
            self.graph = caption_graph(self.captions, cfg, self.encoder, self.embeddings, self.cache_dir)
            self.graph_key = (cfg.neighbours, cfg.knn, cfg.nprobe)
        key = (cfg.cos_threshold, cfg.fuzzy_threshold, cfg.combine, cfg.grouping, cfg.neighbours, cfg.knn, cfg.nprobe)
        if key != self.groups_key:
            self.groups, self.groups_key = graph_groups(self.graph, cfg), key
        assert self.groups is not None
        return self.groups


def _context(
    queries: pd.DataFrame, encoder: Encoder | None, embeddings: np.ndarray | None, cache_dir: str | Path | None
) -> Context:
    """The captions (answer order) and, when given, `embeddings` (one row per row of `queries`) re-ordered alike."""
    if embeddings is not None:
        if len(embeddings) != len(queries):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(queries)} queries")
        if "position" in queries.columns:
            embeddings = np.asarray(embeddings)[np.argsort(queries["position"].to_numpy(), kind="stable")]
    return Context(query_captions(queries), encoder, embeddings, cache_dir)


@dataclass
class Step:
    """A method's result on a `Lists`: `run_chain` applies it and writes the change log."""

    perm: np.ndarray  # [Q, K] new slot → old slot
    score: np.ndarray | None = None  # new scores in the new order; None: scores stay with their pairs
    moves: dict[str, np.ndarray] | None = None  # its own move log (`sca_permutation`'s form); None: top-1 changes
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    after: Callable[[Lists], dict[str, Any]] | None = None  # more info, measured on the permuted lists


Apply = Callable[[Lists, PostprocessConfig, Context], Step]
Scales = dict[str, float]  # `_scales`: typical score differences of the lists entering a method


def _changed_line(step: dict[str, Any], n_queries: int) -> str:
    return f"{step['method']}: {step['queries_changed']} queries changed top-1 ({step['seconds']:.1f} s)"


@dataclass(frozen=True)
class Method:
    """One post-processing method: how it runs, how `tune` searches it, which config fields it reads."""

    apply: Apply
    grid: Callable[[Scales], list[dict[str, Any]]]  # the settings `tune` tries (the keys are among `fields`)
    fields: tuple[str, ...]  # the PostprocessConfig fields `apply` reads
    summary: tuple[str, ...] = ()  # step-info keys the sca.py stage puts in its summary
    describe: Callable[[dict[str, Any], int], str] = _changed_line  # the stage's line for a step


# ---------------------------------------------------------------------------------------------
# The methods on arrays


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
        perm[moved] = move_to_front(p, width)
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


# ---------------------------------------------------------------------------------------------
# The methods as registry entries: apply (Lists → Step) and grid (scales → settings)

SCA_COS_GRID = [0.8, 0.85, 0.9, 0.95, 0.99]
SCA_FUZZY_GRID = [75.0, 85.0, 95.0]
MARGIN_MULTIPLES = [0.25, 0.5, 1.0, 2.0, 4.0]
TEMPERATURE_MULTIPLES = [0.1, 0.3, 1.0, 3.0, 10.0]
RERANK_K_GRID = [5, 10, 20]
RERANK_LAMBDA_MULTIPLES = [0.5, 1.0, 2.0, 4.0]


def _r(x: float) -> float:
    """Four significant digits: grid values that read well in tuned.json."""
    return float(f"{x:.4g}")


def _apply_sca(lists: Lists, params: PostprocessConfig, ctx: Context) -> Step:
    groups = ctx.query_groups(params)
    info: dict[str, Any] = {"conflicts_before": top1_conflicts_arrays(lists.img, groups)}
    sizes = np.bincount(groups) if len(groups) else np.empty(0, dtype=np.int64)
    info["groups"] = int((sizes >= 2).sum())
    info["grouped_queries"] = int(sizes[sizes >= 2].sum())
    perm, log = sca_permutation(lists.img, lists.score, groups, params.top_k, params.max_rounds)
    info["rounds"] = int(log["round"].max()) if len(log["round"]) else 0
    info["moves"] = len(log["q"])
    return Step(
        perm, moves=log, info=info, after=lambda done: {"conflicts_after": top1_conflicts_arrays(done.img, groups)}
    )


def _sca_grid(scale: Scales) -> list[dict[str, Any]]:
    return [{"cos_threshold": c, "fuzzy_threshold": f} for c in SCA_COS_GRID for f in SCA_FUZZY_GRID]


def _sca_line(step: dict[str, Any], n_queries: int) -> str:
    return (
        f"sca: {step['groups']} groups of similar queries ({step['grouped_queries']} of {n_queries} "
        f"queries); top-1 conflicts {step['conflicts_before']} → {step['conflicts_after']}; "
        f"{step['queries_changed']} queries changed ({step['moves']} moves, {step['rounds']} rounds)"
    )


def _apply_assign(lists: Lists, params: PostprocessConfig, ctx: Context) -> Step:
    return Step(assign_permutation(lists.img, lists.score, params.top_k, params.assign_margin))


def _assign_grid(scale: Scales) -> list[dict[str, Any]]:
    return [{"assign_margin": _r(scale["gap"] * m)} for m in MARGIN_MULTIPLES]


def _apply_softmax(lists: Lists, params: PostprocessConfig, ctx: Context, dual: bool) -> Step:
    new = softmax_scores(lists.img, lists.score, params.temperature, dual)
    perm = sort_by(new, lists.img)
    return Step(perm, np.take_along_axis(new, perm, axis=1))


def _temperature_grid(scale: Scales) -> list[dict[str, Any]]:
    return [{"temperature": _r(scale["spread"] * m)} for m in TEMPERATURE_MULTIPLES]


def _apply_rerank(lists: Lists, params: PostprocessConfig, ctx: Context) -> Step:
    new = rerank_scores(lists.img, lists.score, params.rerank_k, params.rerank_lambda)
    k = int(min(params.rerank_k, new.shape[1]))
    perm = np.tile(np.arange(new.shape[1]), (new.shape[0], 1))
    perm[:, :k] = sort_by(new[:, :k], lists.img[:, :k])  # only the re-scored head is re-sorted
    return Step(perm, np.take_along_axis(new, perm, axis=1))


def _rerank_grid(scale: Scales) -> list[dict[str, Any]]:
    return [
        {"rerank_k": k, "rerank_lambda": _r(scale["head"] * m)} for k in RERANK_K_GRID for m in RERANK_LAMBDA_MULTIPLES
    ]


REGISTRY: dict[str, Method] = {
    "sca": Method(
        _apply_sca,
        _sca_grid,
        SCA_FIELDS,
        summary=("groups", "grouped_queries", "conflicts_before", "conflicts_after", "rounds"),
        describe=_sca_line,
    ),
    "assign": Method(_apply_assign, _assign_grid, ("top_k", "assign_margin")),
    "dual-softmax": Method(partial(_apply_softmax, dual=True), _temperature_grid, ("temperature",)),
    "inverted-softmax": Method(partial(_apply_softmax, dual=False), _temperature_grid, ("temperature",)),
    "rerank": Method(_apply_rerank, _rerank_grid, ("rerank_k", "rerank_lambda")),
}
METHODS = list(REGISTRY)


def get_method(name: str) -> Method:
    """The registry entry of `name`; TpasError for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TpasError(f"unknown post-processing method {name!r}; choose from {', '.join(METHODS)}.") from None


def parse_methods(text: str | list[str]) -> list[str]:
    """'dual-softmax, sca' → ['dual-softmax', 'sca'], checking each name."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in REGISTRY]
    if bad or not names:
        raise TpasError(f"--method takes a comma list of {', '.join(METHODS)}; got {text!r}.")
    return names


# ---------------------------------------------------------------------------------------------
# Applying a chain


def _top1_changes(
    before_img: np.ndarray, before_score: np.ndarray, received: np.ndarray, lists: Lists
) -> dict[str, np.ndarray]:
    """The move log of a method without its own: one row per query whose top-1 changed."""
    q = np.flatnonzero((before_img != lists.img[:, 0]) & (before_img >= 0))
    return {
        "q": q,
        "old_image": before_img[q],
        "new_image": lists.img[q, 0],
        "old_score": before_score[q],
        "new_score": received[q],
        "round": np.ones(len(q), dtype=np.int64),
        "group": np.full(len(q), -1, dtype=np.int64),
    }


def run_chain(
    lists: Lists, methods: list[str], params: PostprocessConfig, ctx: Context, gt_codes: np.ndarray | None = None
) -> tuple[Lists, pd.DataFrame, list[dict[str, Any]]]:
    """Apply `methods` to a copy of `lists`; returns (result, change log, per-method info)."""
    lists = lists.copy()
    logs, infos = [], []
    for name in methods:
        entry = get_method(name)
        start = time.perf_counter()
        before_img, before_score = lists.img[:, 0].copy(), lists.score[:, 0].copy()
        step = entry.apply(lists, params, ctx)
        received = np.take_along_axis(lists.score, step.perm[:, :1], axis=1)[:, 0]  # input score of the new top-1
        lists.permute(step.perm, step.score)
        info = dict(step.info)
        if step.after is not None:
            info.update(step.after(lists))
        log = step.moves if step.moves is not None else _top1_changes(before_img, before_score, received, lists)
        frame = change_log(log, lists.order, lists.names)
        frame.insert(0, "method", pd.Series([name] * len(frame), dtype="string"))
        logs.append(frame)
        info.update(
            method=name, seconds=time.perf_counter() - start, queries_changed=int(frame["query_index"].nunique())
        )
        if gt_codes is not None:
            info["metrics"] = array_metrics(lists.img, gt_codes)
        infos.append(info)
    log_frame = pd.concat(logs, ignore_index=True) if logs else _empty_log()
    return lists, log_frame, infos


def _empty_log() -> pd.DataFrame:
    frame = change_log(
        {k: np.empty(0) for k in ("q", "old_image", "new_image", "old_score", "new_score", "round", "group")},
        [],
        np.empty(0, dtype=object),
    )
    frame.insert(0, "method", pd.Series([], dtype="string"))
    return frame


def apply_methods_with_info(
    candidates: pd.DataFrame,
    queries: pd.DataFrame,
    methods: list[str],
    params: PostprocessConfig,
    encoder: Encoder | None = None,
    embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    context: Context | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
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
    info = {
        "to_arrays_s": to_s,
        "from_arrays_s": time.perf_counter() - start,
        "steps": steps,
        "grouping": dict(ctx.graph.timings) if ctx.graph is not None else {},
        "groups": ctx.groups,
    }
    return frame, log, info


def apply_methods(
    candidates: pd.DataFrame,
    queries: pd.DataFrame,
    methods: list[str],
    params: PostprocessConfig,
    encoder: Encoder | None = None,
    embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def _scales(lists: Lists) -> Scales:
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


def method_grid(name: str, lists: Lists, params: PostprocessConfig) -> list[dict[str, Any]]:
    """The (documented) grid of parameter settings tried for method `name`, given the lists entering it."""
    return get_method(name).grid(_scales(lists))


def tune(
    candidates: pd.DataFrame,
    queries: pd.DataFrame,
    methods: list[str],
    params: PostprocessConfig,
    encoder: Encoder | None = None,
    embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[PostprocessConfig, dict[str, Any]]:
    """Grid-search each method's parameters on a validation set with ground truth (module docstring).

    Returns (the chosen config, a report: methods, chosen values, the grid results per method,
    baseline and final metrics). Raises TpasError when `queries` has no ground truth.
    """
    methods = parse_methods(methods)
    order = query_order(queries)
    lists = to_lists(candidates, order)
    gt_codes = gt_codes_for(lists, queries)
    if gt_codes is None:
        raise TpasError(
            "the validation queries have no gt_image; point --tune at a stage dir whose "
            "queries.parquet carries ground truth."
        )
    ctx = _context(queries, encoder, embeddings, cache_dir)
    baseline = array_metrics(lists.img, gt_codes)
    report: dict[str, Any] = {"methods": methods, "baseline": baseline, "chosen": {}, "grid": {}}
    best_params, current = params, lists
    for name in methods:
        grid = method_grid(name, current, best_params)
        results = []
        for setting in grid:
            trial = best_params.replace(**setting)
            out, _, _ = run_chain(current, [name], trial, ctx)
            results.append({**setting, **array_metrics(out.img, gt_codes)})
        best = max(range(len(results)), key=lambda i: (results[i]["R@1"], results[i]["mAP"], -i))
        chosen = {k: results[best][k] for k in grid[0]}
        best_params = best_params.replace(**chosen)
        current, _, _ = run_chain(current, [name], best_params, ctx)
        report["chosen"][name] = chosen
        report["grid"][name] = results
        if progress:
            progress(
                f"tune {name}: {', '.join(f'{k}={v}' for k, v in chosen.items())} → "
                f"R@1 {results[best]['R@1']:.2f} mAP {results[best]['mAP']:.2f} "
                f"({len(results)} settings)"
            )
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
        raise TpasError(
            f"{path}: not a tuned.json from `sca.py --tune` ({'unknown ' + ', '.join(extra) if extra else 'no params'});"
            " re-run the tuning."
        )
    return PostprocessConfig(**values), parse_methods(data.get("methods", ["sca"]))
