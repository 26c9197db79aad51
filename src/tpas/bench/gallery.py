"""Gallery-search benchmark: ITC top-k over a huge gallery with FAISS, exact versus approximate.

Synthetic unit embeddings (seeded): `--clusters` Gaussian clusters (embeddings of one person in
many frames sit close together; 0 = unstructured Gaussian, the hardest case for approximate
search), queries = noisy copies of random gallery items. For each index: build time, search time
for all queries, peak memory, and recall@k against the exact top-k (fraction of the exact top-k
found).

    python -m tpas.bench gallery                      # 1M x 256, 1,978 queries, flat + IVF
    python -m tpas.bench gallery --size 100000 --method flat --method ivf --method hnsw
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tpas.bench._common import machine_info, measure, print_table
from tpas.cli import config_command, field
from tpas.errors import TpasError
from tpas.io import write_json


@dataclass
class GalleryBenchConfig:
    size: int = field(1_000_000, "Gallery embeddings.")
    dim: int = field(256, "Embedding size (the ITC projection of the lite preset is 256).")
    queries: int = field(1978, "Queries searched (PAB's test set has 1,978).")
    k: list[int] = field([10, 128], "Recall is reported at these k (the largest is the k searched).")
    clusters: int = field(2000, "Gaussian clusters in the synthetic gallery (0: unstructured Gaussian).")
    spread: float = field(0.6, "Within-cluster noise relative to the cluster centre (before normalising).")
    query_noise: float = field(0.3, "Noise added to the gallery item a query is copied from (before normalising).")
    method: list[str] = field(
        ["flat", "ivf"],
        "Indexes to build: flat (exact IndexFlatIP), ivf (IndexIVFFlat), "
        "hnsw (IndexHNSWFlat; slow to build on few cores).",
    )
    nlist: int = field(1024, "IVF: inverted lists (k-means centroids).")
    train_size: int = field(0, "IVF: training sample (0 = 40 x nlist, faiss's lower bound of 39 per centroid).")
    nprobe: list[int] = field([8, 32, 128], "IVF: lists visited per query (one search each).")
    hnsw_m: int = field(32, "HNSW: neighbours per node.")
    hnsw_ef_construction: int = field(40, "HNSW: candidate list while building.")
    hnsw_ef_search: list[int] = field([128, 256], "HNSW: candidate lists while searching (one search each; >= k).")
    hnsw_size: int = field(0, "HNSW: build over only the first N gallery items, with their own exact top-k (0 = all).")
    threads: int = field(0, "FAISS threads (0 = all cores).")
    seed: int = field(0, "Seed for the synthetic data.")
    output: Path = field(Path("docs/bench/gallery.json"), "JSON results file.")


def synthetic(cfg: GalleryBenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """(gallery [size, dim], queries [queries, dim]) float32 unit vectors, built in 100k-row chunks."""
    rng = np.random.default_rng(cfg.seed)
    gallery = np.empty((cfg.size, cfg.dim), dtype=np.float32)
    centres = rng.standard_normal((cfg.clusters, cfg.dim), dtype=np.float32) if cfg.clusters else None
    for start in range(0, cfg.size, 100_000):
        rows = min(100_000, cfg.size - start)
        noise = rng.standard_normal((rows, cfg.dim), dtype=np.float32)
        if centres is not None:
            noise *= cfg.spread
            noise += centres[rng.integers(0, cfg.clusters, size=rows)]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        gallery[start : start + rows] = noise
    source = rng.integers(0, cfg.size, size=cfg.queries)
    # noise of norm ~query_noise on a unit vector
    queries = gallery[source] + cfg.query_noise / np.sqrt(cfg.dim) * rng.standard_normal(
        (cfg.queries, cfg.dim), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return gallery, queries.astype(np.float32)


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-k that the index returned in its top-k."""
    hits = [len(np.intersect1d(f[:k], e[:k], assume_unique=True)) for f, e in zip(found, exact)]
    return round(float(np.mean(hits)) / k, 4)


def run_benchmark(cfg: GalleryBenchConfig) -> dict[str, Any]:
    import faiss

    unknown = sorted(set(cfg.method) - {"flat", "ivf", "hnsw"})
    if unknown:
        raise TpasError(f"--method {unknown}: choose flat, ivf or hnsw.")
    faiss.omp_set_num_threads(cfg.threads or os.cpu_count() or 1)
    info = machine_info()
    info["faiss"] = faiss.__version__
    info["faiss_threads"] = faiss.omp_get_max_threads()
    k = max(cfg.k)
    (gallery, queries), gen = measure(partial(synthetic, cfg))
    print(
        f"{cfg.size:,} x {cfg.dim} gallery ({gallery.nbytes / 2**30:.2f} GiB, {cfg.clusters} clusters), "
        f"{cfg.queries} queries, made in {gen['wall_s']:.0f}s; load average {info['load_avg_at_start']}"
    )
    results: dict[str, Any] = {
        "benchmark": "gallery",
        "machine": info,
        "config": dataclasses.asdict(cfg),
        "data": {"generate_s": gen["wall_s"], "gallery_gib": round(gallery.nbytes / 2**30, 3)},
        "rows": [],
    }

    def add_row(
        index_name: str, params: str, build: dict | None, search: dict, found: np.ndarray, exact: np.ndarray, n: int
    ) -> None:
        row = {
            "index": index_name,
            "params": params,
            "gallery": n,
            "build_s": build["wall_s"] if build else None,
            "build_cpu_s": build["cpu_s"] if build else None,
            "build_peak_rss_mb": build["peak_rss_mb"] if build else None,
            "build_rss_growth_mb": build["rss_growth_mb"] if build else None,
            "search_s": search["wall_s"],
            "search_cpu_s": search["cpu_s"],
            "ms_per_query": round(search["wall_s"] / len(queries) * 1000, 3),
            "search_peak_rss_mb": search["peak_rss_mb"],
            "load_1min_after": search["load_1min_after"],
        }
        row.update({f"recall@{kk}": recall(found, exact, kk) for kk in sorted(cfg.k)})
        results["rows"].append(row)
        print(
            f"  {index_name:5s} {params:22s} build {row['build_s'] or 0:8.1f}s  search {row['search_s']:8.2f}s  "
            + "  ".join(f"R@{kk} {row[f'recall@{kk}']:.4f}" for kk in sorted(cfg.k)),
            flush=True,
        )

    # exact search: the ground truth of every approximate index
    flat = faiss.IndexFlatIP(cfg.dim)
    _, build = measure(partial(flat.add, gallery))
    (_, exact), search = measure(partial(flat.search, queries, k))
    if "flat" in cfg.method:
        add_row("flat", "exact", build, search, exact, exact, cfg.size)
    del flat

    if "ivf" in cfg.method:
        quantizer = faiss.IndexFlatIP(cfg.dim)
        ivf = faiss.IndexIVFFlat(quantizer, cfg.dim, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
        train = gallery[
            np.random.default_rng(cfg.seed + 1).choice(
                cfg.size, min(cfg.size, cfg.train_size or 40 * cfg.nlist), replace=False
            )
        ]

        def build_ivf() -> None:
            ivf.train(train)
            ivf.add(gallery)

        _, build = measure(build_ivf)
        for nprobe in cfg.nprobe:
            ivf.nprobe = nprobe
            (_, found), search = measure(partial(ivf.search, queries, k))
            add_row("ivf", f"nlist={cfg.nlist} nprobe={nprobe}", build, search, found, exact, cfg.size)
            build = None  # built once, searched per nprobe
        del ivf, quantizer

    if "hnsw" in cfg.method:
        n = min(cfg.hnsw_size or cfg.size, cfg.size)
        sub_exact = exact
        if n < cfg.size:  # its own ground truth over the items it holds
            sub = faiss.IndexFlatIP(cfg.dim)
            sub.add(gallery[:n])
            sub_exact = sub.search(queries, k)[1]
            del sub
        hnsw = faiss.IndexHNSWFlat(cfg.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
        _, build = measure(partial(hnsw.add, gallery[:n]))
        for ef in cfg.hnsw_ef_search:
            hnsw.hnsw.efSearch = max(ef, k)
            (_, found), search = measure(partial(hnsw.search, queries, k))
            add_row("hnsw", f"M={cfg.hnsw_m} efSearch={max(ef, k)}", build, search, found, sub_exact, n)
            build = None
    results["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


def report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    ks = sorted(cfg["k"])
    print_table(
        f"top-{max(ks)} search, {cfg['queries']} queries, d={cfg['dim']} "
        f"(load average {results['machine']['load_avg_at_start']} at start, "
        f"{results['machine']['load_avg_at_end']} at end)",
        ["index", "params", "gallery", "build s", "search s", "ms/query", "peak RSS MB"] + [f"R@{k}" for k in ks],
        [
            [
                r["index"],
                r["params"],
                f"{r['gallery']:,}",
                "-" if r["build_s"] is None else r["build_s"],
                r["search_s"],
                r["ms_per_query"],
                max(r["search_peak_rss_mb"], r["build_peak_rss_mb"] or 0),
            ]
            + [r[f"recall@{k}"] for k in ks]
            for r in results["rows"]
        ],
    )


@config_command(GalleryBenchConfig, help="Benchmark FAISS top-k over a huge synthetic gallery: exact vs IVF (vs HNSW).")
def main(cfg: GalleryBenchConfig) -> None:
    started = time.time()
    results = run_benchmark(cfg)
    results["total_s"] = round(time.time() - started, 1)
    write_json(cfg.output, results)
    report(results)
    print(f"\nwrote {cfg.output}")
