"""ITM re-ranking benchmark: the field's per-query loop vs tpas.retrieval.rank (exact fast ITM).

Reference = CMP / X-VLM `evaluation_itm` (Retrieval.py): captions encoded in batches (padded to the
batch's longest caption), ITC similarity to every gallery image, then one query at a time its k
candidates through the cross encoder as one batch of k:
`model.itm_score(image_embeds[topk], text_embeds[i].repeat(k, 1, 1), mask[i].repeat(k, 1))`.
Same model, captions, gallery features and final score (ITM + ITC / temperature) as ours.

Also timed: the same loop with each caption cut to its own length (the strongest per-query
baseline: it isolates the gain of the algebra from that of less padding), rank() with
--no-fast-itm (ITM batches spanning queries, model.itm_score per pair), cost versus k, and the
ITC stage versus gallery size (synthetic unit embeddings up to 100k).

    python -m tpas.bench itm                        # 1,978 queries x 3,000 gallery, k=128
    python -m tpas.bench itm --queries 64 --reference-queries 16 --k-sweep 16 --k-sweep 32
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tpas import models as model_lib
from tpas.bench._common import machine_info, measure, print_table
from tpas.cli import config_command, field
from tpas.errors import TpasError
from tpas.io import write_json
from tpas.models import fast_itm as fast_itm_lib

# ---------------------------------------------------------------- this benchmark


@dataclass
class ItmBenchConfig:
    run: Path = field(
        Path("runs/demo"), "Trained run to benchmark; when it does not exist, a lite model with random heads."
    )
    data_root: Path = field(Path("data/demo"), "Captions and gallery images from this test set (demo or PAB layout).")
    data: str = field(
        "auto",
        "auto: the data root when it exists, else synthetic captions and image states.",
        choices=["auto", "demo", "synthetic"],
    )
    queries: int = field(1978, "Queries ranked by ours (PAB's test set has 1,978).")
    gallery: int = field(3000, "Gallery images (PAB's test set has 3,000).")
    k: int = field(128, "Candidates re-ranked by ITM per query.")
    reference_queries: int = field(
        256,
        "Queries timed with the reference loop (0 = all); its cost for all queries "
        "is extrapolated from the per-query time, and the output says so.",
    )
    trimmed_queries: int = field(
        64, "Queries timed with the reference loop on captions cut to their own length (0: skip)."
    )
    generic_queries: int = field(64, "Queries timed with rank(--no-fast-itm), batches spanning queries (0: skip).")
    k_sweep: list[int] = field([16, 32, 64, 128], "k values for the cost-versus-k table.")
    sweep_queries: int = field(128, "Queries per k for ours in the k sweep.")
    sweep_reference_queries: int = field(16, "Queries per k for the reference in the k sweep (0: skip).")
    itc_galleries: list[int] = field([1000, 3000, 10000, 100000], "Gallery sizes for the ITC-stage table (synthetic).")
    text_batch: int = field(128, "Captions per text-encoder batch (both methods).")
    itm_batch: int = field(512, "Pairs per ITM batch for ours (whole queries).")
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    seed: int = field(0, "Seed for the synthetic data and a random model.")
    output: Path = field(Path("docs/bench/itm.json"), "JSON results file.")
    progress: bool = field(True, "Show progress bars.")


def _load_model(cfg: ItmBenchConfig) -> tuple[model_lib.RetrievalModel, model_lib.ModelConfig, str, str]:
    """(model, config, description, cache key)."""
    from tpas.models import load_run_model
    from tpas.retrieval import _file_digest

    if (Path(cfg.run) / "config.json").is_file():
        model, model_cfg = load_run_model(cfg.run)
        return (
            model,
            model_cfg,
            f"trained run {cfg.run} ({model_cfg.preset})",
            _file_digest(Path(cfg.run) / "model.safetensors"),
        )
    torch.manual_seed(cfg.seed)
    model_cfg = model_lib.ModelConfig.from_preset("lite")
    return (
        model_lib.build_model(model_cfg).eval(),
        model_cfg,
        "lite preset, pretrained backbones, random fusion cross-attention and heads (no trained run found)",
        f"bench-random:{cfg.seed}",
    )


_WORDS = [
    "a",
    "man",
    "woman",
    "person",
    "child",
    "wearing",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "grey",
    "yellow",
    "jacket",
    "coat",
    "shirt",
    "trousers",
    "jeans",
    "skirt",
    "dress",
    "hat",
    "cap",
    "backpack",
    "bag",
    "shoes",
    "is",
    "lying",
    "falling",
    "running",
    "walking",
    "standing",
    "waving",
    "fighting",
    "on",
    "the",
    "ground",
    "street",
    "pavement",
    "near",
    "grass",
    "park",
    "holding",
    "his",
    "her",
    "hands",
    "arm",
    "leg",
    "short",
    "long",
    "hair",
    "with",
    "and",
    "in",
]


def _synthetic(cfg: ItmBenchConfig, model: model_lib.RetrievalModel) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions of 15-30 words and random image states / unit features shaped like the model's."""
    rng = np.random.default_rng(cfg.seed)
    captions = [" ".join(rng.choice(_WORDS, size=rng.integers(15, 31))) for _ in range(cfg.queries)]
    with torch.inference_mode():
        probe_embeds, probe_feat = model.encode_image(torch.zeros(1, 3, *model.cfg.image_size))
    gen = torch.Generator().manual_seed(cfg.seed)
    embeds = F.layer_norm(torch.randn(cfg.gallery, *probe_embeds.shape[1:], generator=gen), probe_embeds.shape[-1:])
    feat = F.normalize(torch.randn(cfg.gallery, probe_feat.shape[1], generator=gen), dim=-1)
    return captions, feat, embeds


def _data(
    cfg: ItmBenchConfig, model: model_lib.RetrievalModel, model_key: str, model_cfg: model_lib.ModelConfig
) -> tuple[list[str], torch.Tensor, torch.Tensor, str]:
    from tpas.data import load_test_set
    from tpas.retrieval import InferConfig, cached_gallery

    use_demo = cfg.data == "demo" or (cfg.data == "auto" and Path(cfg.data_root).is_dir())
    if not use_demo:
        captions, feat, embeds = _synthetic(cfg, model)
        return (
            captions,
            feat,
            embeds,
            f"synthetic (seed {cfg.seed}): random captions of 15-30 words, random image states",
        )
    test = load_test_set(cfg.data_root)
    if len(test.queries) < cfg.queries or len(test.gallery) < cfg.gallery:
        raise TpasError(
            f"{cfg.data_root}: has {len(test.queries)} queries and {len(test.gallery)} gallery images, fewer "
            f"than --queries {cfg.queries} / --gallery {cfg.gallery}; lower them or use --data synthetic."
        )
    captions = test.queries["caption"].tolist()[: cfg.queries]
    paths = test.gallery["path"].tolist()[: cfg.gallery]
    infer_cfg = InferConfig(data_root=cfg.data_root, progress=cfg.progress)
    feat, embeds, hit = cached_gallery(
        model, paths, model_lib.image_transform(model_cfg, train=False), infer_cfg, model_key
    )
    return (
        captions,
        feat,
        embeds,
        (
            f"{cfg.data_root} ({test.source}): first {cfg.queries} captions, first {cfg.gallery} "
            f"gallery images (features {'from the cache' if hit else 'encoded'}, not timed)"
        ),
    )


@torch.inference_mode()
def reference_rank(
    model: model_lib.RetrievalModel,
    text: Any,
    captions: list[str],
    image_feat: torch.Tensor,
    image_embeds: torch.Tensor,
    k: int,
    itc_weight: float,
    text_batch: int = 128,
    trim: bool = False,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """CMP / X-VLM evaluation_itm: per query, its top-k candidates through the cross encoder as one
    batch of k. trim: cut each caption's states to its own length (no padding) first."""
    k = min(k, len(image_feat))
    index, itc_out, itm_out = [], [], []
    bar = tqdm(
        total=len(captions), desc="reference" + (" (trimmed)" if trim else ""), disable=not progress, leave=False
    )
    for start in range(0, len(captions), text_batch):
        tokens = text(captions[start : start + text_batch])
        text_embeds, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        sims = text_feat @ image_feat.T
        for i in range(len(sims)):
            itc, top = sims[i].topk(k)
            state, mask = text_embeds[i], tokens["attention_mask"][i]
            if trim:
                length = int(mask.sum())
                state, mask = state[:length], mask[:length]
            itm = model.itm_score(image_embeds[top], state.repeat(k, 1, 1), mask.repeat(k, 1))
            index.append(top.numpy())
            itc_out.append(itc.numpy())
            itm_out.append(itm.float().numpy())
            bar.update(1)
    bar.close()
    top_index, top_itc, top_itm = np.stack(index), np.stack(itc_out), np.stack(itm_out)
    score = top_itm + itc_weight * top_itc
    best = np.argsort(-score, axis=1, kind="stable")
    return {
        name: np.take_along_axis(a, best, axis=1)
        for name, a in (("index", top_index), ("itc", top_itc), ("itm", top_itm), ("score", score))
    }


def compare_rankings(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Are the final rankings identical (row by row)? Plus the largest ITM score difference on the
    pairs both scored, and for any row that differs, how close the swapped candidates' scores were."""
    rows = len(reference["index"])
    ours = {name: a[:rows] for name, a in ours.items()}
    same_rows = (ours["index"] == reference["index"]).all(axis=1)
    same_sets = np.array([set(a) == set(b) for a, b in zip(ours["index"], reference["index"])])
    itm_diff = 0.0
    for q in np.flatnonzero(same_sets):
        mine = ours["itm"][q][np.argsort(ours["index"][q])]
        theirs = reference["itm"][q][np.argsort(reference["index"][q])]
        itm_diff = max(itm_diff, float(np.abs(mine - theirs).max()))
    differing = []
    for q in np.flatnonzero(~same_rows)[:10]:
        position = int(np.argmax(ours["index"][q] != reference["index"][q]))
        differing.append(
            {
                "query": int(q),
                "first_position": position + 1,
                "same_candidates": bool(same_sets[q]),
                "score_gap_there": float(
                    abs(
                        reference["score"][q][position]
                        - reference["score"][q][min(position + 1, len(reference["score"][q]) - 1)]
                    )
                ),
            }
        )
    return {
        "queries_compared": rows,
        "identical": bool(same_rows.all()),
        "identical_rows": int(same_rows.sum()),
        "same_candidate_sets": int(same_sets.sum()),
        "max_abs_itm_diff": itm_diff,
        "differing_rows": differing,
    }


def _per_query(stats: dict[str, float], queries: int) -> dict[str, float]:
    return {
        **stats,
        "queries": queries,
        "s_per_query": round(stats["wall_s"] / queries, 4),
        "queries_per_s": round(queries / stats["wall_s"], 3),
        "cpu_s_per_query": round(stats["cpu_s"] / queries, 4),
    }


@torch.inference_mode()
def _itc_stage(text_feat: torch.Tensor, gallery: int, k: int, text_batch: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(gallery, text_feat.shape[1], generator=gen), dim=-1)

    def run() -> None:
        for start in range(0, len(text_feat), text_batch):
            (text_feat[start : start + text_batch] @ feats.T).topk(min(k, gallery), dim=1)

    _, stats = measure(run)
    return {
        "gallery": gallery,
        **_per_query(stats, len(text_feat)),
        "gallery_feat_mb": round(feats.numel() * 4 / 2**20, 1),
    }


def run_benchmark(cfg: ItmBenchConfig) -> dict[str, Any]:
    from tpas.retrieval import rank

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    model, model_cfg, model_desc, model_key = _load_model(cfg)
    if not fast_itm_lib.supports(model):
        raise TpasError(f"{cfg.run}: the fast ITM path needs an xvlm-family model; this run is {model_cfg.family}.")
    text = model_lib.build_text_pipeline(model_cfg)
    captions, image_feat, image_embeds, data_desc = _data(cfg, model, model_key, model_cfg)
    itc_weight = 1.0 / float(model.temp.detach())
    lengths = text.lengths(captions)
    print(
        f"model: {model_desc}\ndata: {data_desc}\n{len(captions)} queries x {len(image_feat)} images, k={cfg.k}, "
        f"{torch.get_num_threads()} threads, load average {info['load_avg_at_start']}"
    )

    def ours(n: int, k: int) -> Callable[[], dict[str, np.ndarray]]:
        return lambda: rank(
            model,
            text,
            captions[:n],
            image_feat,
            image_embeds,
            k,
            True,
            "tpas",
            itc_weight,
            cfg.text_batch,
            cfg.itm_batch,
            cfg.progress,
            fast_itm=True,
        )

    def reference(n: int, k: int, trim: bool = False) -> Callable[[], dict[str, np.ndarray]]:
        return lambda: reference_rank(
            model, text, captions[:n], image_feat, image_embeds, k, itc_weight, cfg.text_batch, trim, cfg.progress
        )

    results: dict[str, Any] = {
        "benchmark": "itm",
        "machine": info,
        "model": model_desc,
        "data": data_desc,
        "sizes": {
            "queries": len(captions),
            "gallery": len(image_feat),
            "k": cfg.k,
            "image_tokens": int(image_embeds.shape[1]),
            "width": int(image_embeds.shape[2]),
            "fusion_layers": len(model.fusion),
            "caption_tokens": {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
        },
        "config": dataclasses.asdict(cfg),
    }

    # ours on every query
    ranked, stats = measure(ours(len(captions), cfg.k))  # includes projecting the gallery's image keys/values
    methods = {"ours": _per_query(stats, len(captions))}
    # the reference on a subset (all when reference_queries is 0)
    n_ref = min(cfg.reference_queries or len(captions), len(captions))
    ref_ranked, stats = measure(reference(n_ref, cfg.k))
    methods["reference"] = _per_query(stats, n_ref)
    methods["reference"]["extrapolated"] = n_ref < len(captions)
    if cfg.trimmed_queries:
        n = min(cfg.trimmed_queries, len(captions))
        trimmed, stats = measure(reference(n, cfg.k, trim=True))
        methods["reference_trimmed"] = _per_query(stats, n)
        methods["reference_trimmed"]["ranking_vs_ours"] = compare_rankings(ranked, trimmed)
    if cfg.generic_queries:
        n = min(cfg.generic_queries, len(captions))
        _, stats = measure(
            lambda: rank(
                model,
                text,
                captions[:n],
                image_feat,
                image_embeds,
                cfg.k,
                True,
                "tpas",
                itc_weight,
                cfg.text_batch,
                cfg.itm_batch,
                cfg.progress,
                fast_itm=False,
            )
        )
        methods["rank_no_fast_itm"] = _per_query(stats, n)
    for m in methods.values():
        m["seconds_all_queries"] = round(m["s_per_query"] * len(captions), 1)
        m["speedup_of_ours"] = round(m["s_per_query"] / methods["ours"]["s_per_query"], 2)
        m["cpu_speedup_of_ours"] = round(m["cpu_s_per_query"] / methods["ours"]["cpu_s_per_query"], 2)
    results["methods"] = methods
    results["ranking"] = compare_rankings(ranked, ref_ranked)

    # cost versus k
    sweep = []
    for k in cfg.k_sweep:
        n = min(cfg.sweep_queries, len(captions))
        _, stats = measure(ours(n, k))
        row: dict[str, Any] = {
            "k": k,
            "ours_s_per_query": round(stats["wall_s"] / n, 4),
            "ours_cpu_s_per_query": round(stats["cpu_s"] / n, 4),
            "ours_queries": n,
        }
        if cfg.sweep_reference_queries:
            m = min(cfg.sweep_reference_queries, len(captions))
            _, ref_stats = measure(reference(m, k))
            row.update(
                {
                    "reference_s_per_query": round(ref_stats["wall_s"] / m, 4),
                    "reference_queries": m,
                    "speedup": round(ref_stats["wall_s"] / m / (stats["wall_s"] / n), 2),
                }
            )
        sweep.append(row)
    results["k_sweep"] = sweep

    # the ITC stage versus gallery size, and the image key/value projections of the fast path
    with torch.inference_mode():
        tokens = text(captions)
        text_feat = torch.cat(
            [
                model.encode_text(
                    tokens["input_ids"][s : s + cfg.text_batch], tokens["attention_mask"][s : s + cfg.text_batch]
                )[1]
                for s in range(0, len(captions), cfg.text_batch)
            ]
        )
    itc_rows = [_itc_stage(text_feat, g, cfg.k, cfg.text_batch, cfg.seed) for g in cfg.itc_galleries]
    per_image = (
        sum(2 * layer.crossattention.self.key.out_features for layer in model.fusion) * image_embeds.shape[1] * 4
    )
    for row in itc_rows:
        row["fast_itm_kv_cache_mb"] = round(row["gallery"] * per_image / 2**20, 1)
        row["fast_itm_kv_mode"] = (
            "whole gallery, once" if row["gallery"] * per_image <= 1 << 30 else "per ITM batch (over 1 GiB)"
        )
    with torch.inference_mode():
        _, stats = measure(lambda: fast_itm_lib.FastItmScorer(model, image_embeds))
    results["itc_sweep"] = itc_rows
    results["kv_projection"] = {
        "gallery": len(image_embeds),
        "wall_s": stats["wall_s"],
        "s_per_1000_images": round(stats["wall_s"] / len(image_embeds) * 1000, 4),
    }
    results["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


def report(results: dict[str, Any]) -> None:
    s, m = results["sizes"], results["methods"]
    rows = []
    labels = {
        "reference": "reference loop (CMP/X-VLM evaluation_itm)",
        "reference_trimmed": "reference loop, captions trimmed to own length",
        "rank_no_fast_itm": "rank --no-fast-itm (batches span queries)",
        "ours": "ours: rank (fast ITM)",
    }
    for name in ("reference", "reference_trimmed", "rank_no_fast_itm", "ours"):
        if name in m:
            r = m[name]
            note = f"{r['queries']} queries" + (", extrapolated" if r["queries"] < s["queries"] else "")
            rows.append(
                [
                    labels[name],
                    note,
                    r["queries_per_s"],
                    r["s_per_query"],
                    r["seconds_all_queries"],
                    r["peak_rss_mb"],
                    r["speedup_of_ours"],
                    r["cpu_speedup_of_ours"],
                ]
            )
    print_table(
        f"ITM re-ranking, {s['queries']} queries x {s['gallery']} gallery, k={s['k']} "
        f"(load average at start {results['machine']['load_avg_at_start']})",
        [
            "method",
            "timed on",
            "queries/s",
            "s/query",
            f"s for {s['queries']}",
            "peak RSS MB",
            "ours faster (wall)",
            "(CPU time)",
        ],
        rows,
    )
    r = results["ranking"]
    print(
        f"\nranking identical to the reference on the {r['queries_compared']} queries compared: "
        f"{'yes' if r['identical'] else 'no'} ({r['identical_rows']} rows identical, max |ITM diff| {r['max_abs_itm_diff']:.2e})"
    )
    print_table(
        "cost versus k",
        ["k", "ours s/query", "reference s/query", "speed-up"],
        [
            [row["k"], row["ours_s_per_query"], row.get("reference_s_per_query", "-"), row.get("speedup", "-")]
            for row in results["k_sweep"]
        ],
    )
    print_table(
        f"ITC stage versus gallery size ({s['queries']} queries, synthetic unit embeddings)",
        ["gallery", "seconds", "ms/query", "peak RSS MB", "fast-ITM K/V MB", "K/V mode"],
        [
            [
                row["gallery"],
                row["wall_s"],
                row["s_per_query"] * 1000,
                row["peak_rss_mb"],
                row["fast_itm_kv_cache_mb"],
                row["fast_itm_kv_mode"],
            ]
            for row in results["itc_sweep"]
        ],
    )
    print(
        f"\nfast-ITM image key/value projection: {results['kv_projection']['s_per_1000_images']:.3f} s per 1,000 images"
    )


@config_command(ItmBenchConfig, help="Benchmark ITM re-ranking: the field's per-query loop vs tpas's exact fast path.")
def main(cfg: ItmBenchConfig) -> None:
    results = run_benchmark(cfg)
    write_json(cfg.output, results)
    report(results)
    print(f"\nwrote {cfg.output}")
