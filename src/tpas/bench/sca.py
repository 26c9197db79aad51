"""Post-processing benchmark: caption grouping and each method at 2k / 20k / 100k queries (synthetic, seeded).

Data: templated pedestrian captions with near-duplicates (`synthetic_captions`) and a synthetic
candidates table (k = 128 per query, as infer.py writes; the gallery has 1.5 images per query,
and the images of a caption's family — its paraphrases and near-twins — score close to the true
one, so the methods have conflicts to resolve). For each size it measures, with wall/CPU seconds
and peak RSS growth:
- embedding: the packaged MiniLM on a sample of `--embed-sample` distinct captions, extrapolated
  linearly to all distinct captions when the sample is smaller (the row says so);
- grouping, excluding the embedding: faiss kNN + fuzzy ratio + components (and agglomerative);
  its input embeddings come from `--encoder`: `hashed` (default; a seeded bag-of-words encoder,
  so 100k captions embed in seconds; near-duplicates land near cosine 0.9 as with MiniLM),
  `static` (MiniLM's word-piece table, mean-pooled) or `minilm` (the real one, cached on disk);
- each method (`apply_methods` on the candidates table: array conversion included, reported apart);
- the IVF neighbour recall against exact search at `--recall-size` captions for several nprobe
  (on the real MiniLM embeddings when `--recall-encoder minilm`, cached under `--cache-dir`).

    python -m tpas.bench sca                                  # 2k, 20k, 100k
    python -m tpas.bench sca --sizes 2000 --recall-size 2000  # quick
"""
# ruff: noqa: RUF009  (tpas.cli.field() defaults carry the --help text, as in every config)

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tpas.bench._common import machine_info, measure, print_table
from tpas.cli import config_command, field
from tpas.io import write_json
from tpas.metrics import array_metrics
from tpas.post.lists import gt_codes_for, to_lists
from tpas.post.methods import (
    METHODS,
    Context,
    PostprocessConfig,
    apply_methods_with_info,
    parse_methods,
)
from tpas.post.sca import (
    EXACT_KNN_LIMIT,
    SCAConfig,
    cached_embeddings,
    caption_graph,
    graph_groups,
    knn_pairs,
    load_sentence_encoder,
)
from tpas.schema import CANDIDATE_COLUMNS, queries_frame

GENDERS = ["man", "woman", "boy", "girl", "old man", "old woman", "young man", "young woman"]
HAIR = ["short black", "long black", "short brown", "long blond", "grey", "curly", "bald", "ponytail"]
COLOURS = ["red", "blue", "black", "white", "green", "yellow", "grey", "brown", "pink", "orange", "purple", "dark"]
TOPS = ["jacket", "coat", "t-shirt", "shirt", "hoodie", "sweater", "dress", "vest", "blouse", "uniform"]
BOTTOMS = ["jeans", "trousers", "shorts", "skirt", "pants", "leggings"]
EXTRAS = ["", "carrying a backpack", "holding a phone", "with a hat", "with glasses", "carrying a bag"]
ACTIONS = [
    "walking",
    "standing",
    "running",
    "waving",
    "playing football",
    "lying on the ground",
    "falling down",
    "being hit",
    "fighting with another person",
    "crouching in pain",
]
PLACES = [
    "on the street",
    "in a park",
    "near a bus stop",
    "inside a mall",
    "on the sidewalk",
    "in a parking lot",
    "at a crossroads",
    "in a corridor",
]
TEMPLATES = [
    "a {g} with {h} hair wearing a {c1} {t} and {c2} {b} {x} is {a} {p}",
    "{a} {p}, a {g} in a {c1} {t} and {c2} {b} {x}",
    "the {g} has {h} hair, a {c1} {t}, {c2} {b}, {x} and is {a} {p}",
    "a {g} dressed in {c1} {t} with {c2} {b} {x} {a} {p}",
]
SYNONYMS = [
    ("wearing", "in"),
    ("is ", ""),
    ("trousers", "pants"),
    ("on the ground", "on the floor"),
    ("a ", "one "),
    ("street", "road"),
    ("jacket", "coat"),
]


def synthetic_captions(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """`n` templated pedestrian captions with near-duplicates, and each one's family (person) id.

    About 40% describe a new person; the rest derive from an earlier caption: an exact copy
    (3%), a paraphrase (another template plus a synonym swap: a near-duplicate, 32%) or the same
    person in another action and place (a near-twin, 25%).
    """
    rng = np.random.default_rng(seed)
    people: list[dict[str, str]] = []
    captions: list[str] = []
    family = np.empty(n, dtype=np.int64)
    kinds = rng.random(n)
    pools = {
        "g": GENDERS,
        "h": HAIR,
        "c1": COLOURS,
        "t": TOPS,
        "c2": COLOURS,
        "b": BOTTOMS,
        "x": EXTRAS,
        "a": ACTIONS,
        "p": PLACES,
    }
    for i in range(n):  # caption generation only; the code under test is vectorised
        if i == 0 or kinds[i] < 0.4:
            person = {key: pool[rng.integers(len(pool))] for key, pool in pools.items()}
            people.append(person)
            family[i] = len(people) - 1
            text = TEMPLATES[rng.integers(len(TEMPLATES))].format(**person)
        else:
            j = int(rng.integers(i))
            family[i] = family[j]
            person = dict(people[family[j]])
            if kinds[i] < 0.43:
                text = captions[j]
            elif kinds[i] < 0.75:
                text = TEMPLATES[rng.integers(len(TEMPLATES))].format(**person)
                old, new = SYNONYMS[rng.integers(len(SYNONYMS))]
                text = text.replace(old, new, 1)
            else:
                person["a"], person["p"] = ACTIONS[rng.integers(len(ACTIONS))], PLACES[rng.integers(len(PLACES))]
                text = TEMPLATES[rng.integers(len(TEMPLATES))].format(**person)
        captions.append(" ".join(text.split()))
    return captions, family


class HashedBagOfWords:
    """A cheap, seeded stand-in sentence encoder: the mean of one fixed random vector per word, plus noise.

    Cosine ≈ the share of words two captions have in common; a per-caption random component
    (`noise`, relative) keeps distinct captions apart. On the 20k synthetic set it gives a cosine
    distribution near MiniLM's (kNN-pair median 0.81 vs 0.79; 2% vs 4% of pairs ≥ 0.9) but longer
    chains (largest component at cosine 0.9: 377 vs 37 captions): a slightly harder case for grouping.
    """

    cache_key = None

    def __init__(self, dim: int = 384, noise: float = 0.15, seed: int = 0) -> None:
        self.dim, self.noise, self.seed = dim, noise, seed

    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray:
        words = [s.lower().replace(",", " ").split() or [""] for s in sentences]
        vocab = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
        table = np.stack(
            [np.random.default_rng([self.seed, zlib.crc32(w.encode())]).standard_normal(self.dim) for w in vocab]
        ).astype(np.float32)
        ids = np.fromiter((vocab[w] for ws in words for w in ws), dtype=np.int64)
        lengths = np.fromiter((len(ws) for ws in words), dtype=np.int64, count=len(words))
        emb = np.add.reduceat(table[ids], np.r_[0, np.cumsum(lengths)[:-1]], axis=0)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        noise = np.stack(
            [
                np.random.default_rng([self.seed + 1, zlib.crc32(s.encode())]).standard_normal(self.dim)
                for s in sentences
            ]
        ).astype(np.float32)
        emb += self.noise * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class StaticMiniLM:
    """The packaged MiniLM's word-piece input embeddings (centred), mean-pooled: no transformer layers."""

    cache_key = None

    def __init__(self, model: Any) -> None:
        self.tokenizer = model.tokenizer
        table = model[0].auto_model.embeddings.word_embeddings.weight.detach().numpy().astype(np.float32)
        self.table = table - table.mean(axis=0)

    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray:
        ids = self.tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
        lengths = np.array([max(len(x), 1) for x in ids])
        flat = np.concatenate([x if x else [0] for x in ids])
        emb = np.add.reduceat(self.table[flat], np.r_[0, np.cumsum(lengths)[:-1]], axis=0) / lengths[:, None]
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _strings(codes: np.ndarray, names: list[str]) -> pd.Series:
    """A pyarrow-backed string Series from codes into names, without a Python string per row."""
    array = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names)).cast(pa.large_string())
    return pd.Series(array.to_pandas(types_mapper=pd.ArrowDtype)).astype("string")


def synthetic_candidates(family: np.ndarray, k: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(candidates, queries) for len(family) queries: query i's true image is g{i}; 0.5·Q distractors.

    Each list: the true image, up to 8 images of the caption's family (paraphrases and near-twins
    look alike), then random images; logit-like scores (true ~ N(3, 1.2), family ~ N(2.6, 1.2),
    others ~ N(0, 1.5)), sorted.
    """
    rng = np.random.default_rng(seed)
    n = len(family)
    n_img = n + n // 2
    order = np.argsort(family, kind="stable")
    starts = np.searchsorted(family[order], family)
    sizes = np.bincount(family)[family]
    slots = np.empty((n, k), dtype=np.int64)
    slots[:, 0] = np.arange(n)
    # Family images: other members of the family (offsets within its block of the sorted order).
    width = min(8, k - 1)
    offs = rng.integers(0, np.maximum(sizes, 1)[:, None], size=(n, width))
    fam_imgs = order[starts[:, None] + offs]
    slots[:, 1 : 1 + width] = fam_imgs
    # The rest: distinct random images, by strides that never revisit an image within a row.
    step = rng.integers(1, max(2, n_img // k), size=(n, k - 1 - width))
    slots[:, 1 + width :] = (np.arange(n)[:, None] + 7 + np.cumsum(step, axis=1)) % n_img
    scores = rng.normal(0.0, 1.5, size=(n, k))
    scores[:, 0] = rng.normal(3.0, 1.2, size=n)
    scores[:, 1 : 1 + width] = rng.normal(2.6, 1.2, size=(n, width))
    # A family image repeated in a row (or equal to the true one) would duplicate a pair: redraw the
    # repeats (stable sort keeps each first occurrence) as random distractors until none is left.
    for _ in range(100):
        idx = np.argsort(slots, axis=1, kind="stable")
        srt = np.take_along_axis(slots, idx, axis=1)
        dup = np.zeros_like(slots, dtype=bool)
        np.put_along_axis(
            dup, idx, np.concatenate([np.zeros((n, 1), dtype=bool), srt[:, 1:] == srt[:, :-1]], axis=1), axis=1
        )
        if not dup.any():
            break
        slots[dup] = rng.integers(0, n_img, size=int(dup.sum()))
        scores[dup] = rng.normal(0.0, 1.5, size=int(dup.sum()))
    order_in_row = np.argsort(-scores, axis=1, kind="stable")
    slots = np.take_along_axis(slots, order_in_row, axis=1)
    scores = np.take_along_axis(scores, order_in_row, axis=1).astype(np.float32)
    qnames = [f"q{i:06d}" for i in range(n)]
    inames = [f"g{i:06d}" for i in range(n_img)]
    frame = pd.DataFrame(
        {
            "query_index": _strings(np.repeat(np.arange(n), k), qnames),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
            "image": _strings(slots.ravel(), inames),
            "itc": scores.ravel(),
            "itm": np.full(n * k, np.nan, dtype=np.float32),
            "score": scores.ravel(),
        }
    )[CANDIDATE_COLUMNS]
    queries = queries_frame(qnames, [""] * n, [f"g{i:06d}" for i in range(n)])
    return frame, queries


@dataclass
class ScaBenchConfig:
    sizes: str = field("2000,20000,100000", "Query counts, comma-separated.")
    k: int = field(128, "Candidates per query (infer.py's default k).")
    methods: str = field(",".join(METHODS), "Methods timed one by one (each on the raw candidates).")
    encoder: str = field("hashed", "Embeddings the grouping is timed on.", choices=["hashed", "static", "minilm"])
    embed_sample: int = field(
        1000, "Distinct captions the real MiniLM embeds per size to time it (extrapolated linearly beyond)."
    )
    recall_size: int = field(20000, "Captions for the IVF-versus-exact neighbour recall (0: skip).")
    recall_encoder: str = field(
        "minilm",
        "Embeddings for the recall measurement (minilm: real, cached).",
        choices=["hashed", "static", "minilm"],
    )
    nprobe: str = field("4,8,12,16,32", "IVF nprobe values for the recall measurement.")
    minilm_sizes: str = field(
        "2000,20000",
        "Sizes at which grouping is also timed on the real MiniLM embeddings "
        "(computed once, then cached under --cache-dir).",
    )
    agglomerative: bool = field(True, "Also time --grouping agglomerative.")
    cache_dir: Path = field(Path("outputs/cache"), "Sentence-embedding cache (MiniLM embeddings are reused).")
    seed: int = field(0, "Seed for captions and candidates.")
    output: Path = field(Path("docs/bench/sca.json"), "JSON results file.")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _warm_up() -> None:
    """Import what the timed steps use, so that no step pays a first import (seconds on a busy disk)."""
    import faiss  # noqa: F401
    import rapidfuzz.process  # noqa: F401
    import sklearn.cluster
    import sklearn.metrics  # noqa: F401


def _encoder(name: str, cache: dict[str, Any]) -> Any:
    if name == "hashed":
        return HashedBagOfWords()
    if "minilm" not in cache:
        cache["minilm"] = load_sentence_encoder()
    return cache["minilm"] if name == "minilm" else StaticMiniLM(cache["minilm"])


def _embed(texts: list[str], name: str, cache: dict[str, Any], cache_dir: Path) -> np.ndarray:
    if name == "minilm":
        return cached_embeddings(texts, None, cache_dir)  # loads MiniLM only on a cache miss
    return _encoder(name, cache).encode(texts)


def recall_rows(cfg: ScaBenchConfig, cache: dict[str, Any]) -> list[dict[str, Any]]:
    """IVF vs exact kNN on `recall_size` synthetic captions: neighbour recall, edge recall, same groups."""
    from sklearn.metrics import adjusted_rand_score

    captions, _ = synthetic_captions(cfg.recall_size, cfg.seed)
    texts = list(pd.unique(pd.Series(captions)))
    emb = _embed(texts, cfg.recall_encoder, cache, cfg.cache_dir)
    sca = SCAConfig()
    (ea, eb, cos), exact = measure(partial(knn_pairs, emb, sca.neighbours, "exact"))
    exact_keys = ea * len(texts) + eb
    strong = exact_keys[cos >= sca.cos_threshold]
    groups_exact = graph_groups(caption_graph(texts, dataclasses.replace(sca, knn="exact"), embeddings=emb), sca)
    rows = [
        {
            "index": "exact (IndexFlatL2)",
            "nprobe": "-",
            "seconds": exact["wall_s"],
            "cpu_s": exact["cpu_s"],
            "pair_recall": 1.0,
            "edge_recall": 1.0,
            "groups_ari": 1.0,
            "captions": len(texts),
            "encoder": cfg.recall_encoder,
        }
    ]
    for nprobe in _ints(cfg.nprobe):
        (a, b, _), took = measure(partial(knn_pairs, emb, sca.neighbours, "ivf", nprobe))
        keys = a * len(texts) + b
        ivf_cfg = dataclasses.replace(sca, knn="ivf", nprobe=nprobe)
        groups = graph_groups(caption_graph(texts, ivf_cfg, embeddings=emb), ivf_cfg)
        rows.append(
            {
                "index": "IVFFlat nlist=4·sqrt(n)",
                "nprobe": nprobe,
                "seconds": took["wall_s"],
                "cpu_s": took["cpu_s"],
                "pair_recall": round(float(np.isin(exact_keys, keys).mean()), 4),
                "edge_recall": round(float(np.isin(strong, keys).mean()), 4) if len(strong) else 1.0,
                "groups_ari": round(float(adjusted_rand_score(groups_exact, groups)), 4),
                "captions": len(texts),
                "encoder": cfg.recall_encoder,
            }
        )
    return rows


def size_rows(n: int, cfg: ScaBenchConfig, cache: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(step: str, stats: dict[str, float], **extra: Any) -> None:
        rows.append(
            {
                "queries": n,
                "step": step,
                "wall_s": stats["wall_s"],
                "cpu_s": stats["cpu_s"],
                "rss_growth_mb": stats["rss_growth_mb"],
                "load": round(stats["load_1min_after"], 1),
                **extra,
            }
        )

    captions, family = synthetic_captions(n, cfg.seed)
    texts = list(pd.unique(pd.Series(captions)))
    sample = texts[:: max(1, len(texts) // max(1, cfg.embed_sample))][: cfg.embed_sample]
    model = _encoder("minilm", cache)
    _, stats = measure(lambda: model.encode(sample, batch_size=128))
    factor = len(texts) / len(sample)
    add(
        "embed MiniLM" + (f" (sample {len(sample)}, ×{factor:.1f} extrapolated)" if factor > 1 else ""),
        {**stats, "wall_s": round(stats["wall_s"] * factor, 1), "cpu_s": round(stats["cpu_s"] * factor, 1)},
        distinct_captions=len(texts),
    )
    codes = pd.Index(texts).get_indexer(captions)
    sca = SCAConfig()
    encoders = [cfg.encoder] + (["minilm"] if n in _ints(cfg.minilm_sizes) and cfg.encoder != "minilm" else [])
    graph = emb = None
    for name in encoders:
        emb_n = _embed(texts, name, cache, cfg.cache_dir)[codes]
        graph_n, stats = measure(lambda: caption_graph(captions, sca, embeddings=emb_n))  # noqa: B023
        groups, g_stats = measure(lambda: graph_groups(graph_n, sca))  # noqa: B023
        total = {
            **stats,
            "wall_s": round(stats["wall_s"] + g_stats["wall_s"], 3),
            "cpu_s": round(stats["cpu_s"] + g_stats["cpu_s"], 3),
            "rss_growth_mb": max(stats["rss_growth_mb"], g_stats["rss_growth_mb"]),
        }
        knn = "exact" if len(texts) <= EXACT_KNN_LIMIT else f"IVF nprobe {sca.nprobe}"
        sizes = np.bincount(groups)
        add(
            f"grouping [{name} emb.]: {knn} kNN {graph_n.timings['knn_s']:.1f} s, fuzzy "
            f"{graph_n.timings.get('fuzzy_s', 0):.1f} s, components",
            total,
            groups=int((sizes >= 2).sum()),
            grouped_queries=int(sizes[sizes >= 2].sum()),
            largest=int(sizes.max()),
        )
        if cfg.agglomerative:
            agg = dataclasses.replace(sca, grouping="agglomerative")
            agg_groups, stats = measure(lambda: graph_groups(graph_n, agg))  # noqa: B023
            sizes = np.bincount(agg_groups)
            add(
                f"  agglomerative split [{name} emb.] (graph given)",
                stats,
                groups=int((sizes >= 2).sum()),
                grouped_queries=int(sizes[sizes >= 2].sum()),
                largest=int(sizes.max()),
            )
        if graph is None:
            graph, emb = graph_n, emb_n  # the methods below use the first encoder's groups

    (cands, queries), stats = measure(lambda: synthetic_candidates(family, cfg.k, cfg.seed))
    queries["caption"] = pd.Series(captions, dtype="string")
    params = PostprocessConfig()
    lists = to_lists(cands, queries["query_index"].astype(str).tolist())
    baseline = array_metrics(lists.img, gt_codes_for(lists, queries))
    add("candidates (synthetic)", stats, rows=len(cands), r1=round(baseline["R@1"], 2))
    for method in parse_methods(cfg.methods):
        ctx = Context(captions, embeddings=emb, graph=graph, graph_key=(sca.neighbours, sca.knn, sca.nprobe))
        (_, _, info), stats = measure(partial(apply_methods_with_info, cands, queries, [method], params, context=ctx))
        step = info["steps"][0]
        add(
            f"method {method}",
            stats,
            method_core_s=round(step["seconds"], 3),
            table_conversion_s=round(info["to_arrays_s"] + info["from_arrays_s"], 3),
            queries_changed=step["queries_changed"],
            r1=round(step["metrics"]["R@1"], 2),
        )
    return rows


def report(results: dict[str, Any]) -> None:
    print_table(
        f"grouping and post-processing (k = {results['config']['k']}; machine load average "
        f"{results['machine']['load_avg_at_start']} at start, {results['machine']['load_avg_at_end']} at end)",
        ["queries", "step", "wall s", "CPU s", "RSS +MB", "core s", "notes"],
        [
            [
                f"{r['queries']:,}",
                r["step"],
                r["wall_s"],
                r["cpu_s"],
                r["rss_growth_mb"],
                r.get("method_core_s", "-"),
                ", ".join(
                    f"{k}={r[k]}"
                    for k in (
                        "distinct_captions",
                        "groups",
                        "grouped_queries",
                        "largest",
                        "queries_changed",
                        "r1",
                        "rows",
                    )
                    if r.get(k) is not None
                ),
            ]
            for r in results["rows"]
        ],
    )
    if results["recall"]:
        r0 = results["recall"][0]
        print_table(
            f"neighbour search on {r0['captions']:,} distinct captions ({r0['encoder']} embeddings), "
            "recall against exact",
            ["index", "nprobe", "wall s", "CPU s", "kNN pair recall", "edge recall (cos ≥ 0.9)", "groups ARI"],
            [
                [r["index"], r["nprobe"], r["seconds"], r["cpu_s"], r["pair_recall"], r["edge_recall"], r["groups_ari"]]
                for r in results["recall"]
            ],
        )


@config_command(
    ScaBenchConfig,
    help="Benchmark caption grouping (faiss kNN, fuzzy, components/agglomerative) and "
    "each post-processing method at several query counts, on synthetic data.",
)
def main(cfg: ScaBenchConfig) -> None:
    started = time.time()
    cache: dict[str, Any] = {}
    _warm_up()
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": machine_info(), "rows": [], "recall": []}
    for n in _ints(cfg.sizes):
        results["rows"] += size_rows(n, cfg, cache)
        write_json(cfg.output, results)  # partial results survive an interrupted run
    if cfg.recall_size:
        results["recall"] = recall_rows(cfg, cache)
    results["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["total_s"] = round(time.time() - started, 1)
    write_json(cfg.output, results)
    report(results)
    print(f"\nwrote {cfg.output}")
