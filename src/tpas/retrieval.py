"""Retrieval: ITC over every query × gallery pair, then ITM re-ranking of each query's top-k.

Writes a stage directory (see tpas.schema): candidates.parquet, queries.parquet,
gallery.parquet (image, path), metrics.json (with ground truth) and infer_config.json.
Gallery features are cached on disk, keyed by the model weights, the gallery files and the precision.
ITM re-ranking of an XVLMModel goes through its itm_scorer (tpas.models.fast_itm (exact, ~3x less work than scoring each
pair with model.itm_score); other model families use their itm_logits).
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tpas import models as model_lib
from tpas import scores as scores_lib
from tpas.cli import field
from tpas.data import TestSet, ensure_data, load_rgb, load_test_set
from tpas.errors import TpasError
from tpas.io import atomic_path, staged_dir, write_json, write_parquet
from tpas.metrics import format_metrics, ranking_metrics
from tpas.models.text import TextPipeline
from tpas.runtime import autocast, resolve_runtime
from tpas.schema import (
    CANDIDATES_FILE,
    QUERIES_FILE,
    candidates_frame,
    ground_truth,
    queries_frame,
)


@dataclass
class InferConfig:
    data_root: Path = field(
        Path("data/demo"),
        "Data root: a challenge folder (query.json, gallery/) or a PAB release (annotation/test/pair.json).",
    )
    source: str = field(
        "auto",
        "Which test set to read: a challenge folder if one exists, else PAB's test split.",
        choices=["auto", "challenge", "pab"],
    )
    query_file: str = field(
        "query.json", "Query file inside the challenge folder (e.g. query_heldout.json on the demo set)."
    )
    run: Path = field(Path("runs/demo"), "Trained run directory (config.json + model.safetensors).")
    zero_shot: bool = field(
        False, "Use the pretrained-only model instead of --run (backbones pretrained; ITC/ITM heads untrained)."
    )
    model: str = field(
        "lite", "Model preset for --zero-shot (a trained run uses its own).", choices=list(model_lib.PRESETS)
    )
    hf_model: str | None = field(
        None,
        "--zero-shot with blip-itm / clip: a local transformers model dir "
        "(default: the preset's hub name, which loads only from the HF cache or online).",
    )
    output_dir: Path = field(Path("outputs/infer"), "Where the candidates and metrics are written.")
    k: int = field(128, "Candidates per query kept from ITC and re-ranked by ITM.")
    itm: bool = field(True, "Re-rank the top-k with the ITM head (off: rank by ITC alone).")
    score: str | None = field(
        None,
        "How ITC and ITM combine into the ranking score (tpas.scores; l1/l0 = ITM match/no-match "
        "logit): xvlm = l1 (X-VLM Retrieval.py), cmp = minmax(l1) + 0.002 minmax(ITC) (CMP eval.py), "
        "blip = l1 + ITC (BLIP train_retrieval.py), log-odds = l1 - l0, tpas = l1 - l0 + "
        "--itc-weight x ITC, itc = ITC alone. Default: the run's preset's (xvlm for xvlm-*, cmp for cmp, "
        "blip for blip-itm, tpas for lite/tiny: measured on the demo validation set, README; itc for "
        "clip). metrics.json scores every rule.",
        choices=list(scores_lib.SCORE_RULES),
    )
    itc_weight: float | None = field(
        None, "--score tpas: the weight w of the ITC similarity; default 1/temperature, i.e. ITM log-odds + ITC logit."
    )
    image_batch: int = field(64, "Images per encoder batch.")
    text_batch: int = field(128, "Captions per encoder batch.")
    itm_batch: int = field(512, "Query-candidate pairs per ITM batch (whole queries: at least one query's k).")
    fast_itm: bool = field(
        True,
        "Exact fast ITM for tpas models: caption-only work once per query, image keys/values "
        "once per image, the last fusion layer for CLS only (off: model.itm_score per pair).",
    )
    device: str = field("auto", "Where to run: auto = cuda when available, else cpu.", choices=["auto", "cpu", "cuda"])
    precision: str = field(
        "auto",
        "Autocast precision: auto = fp16 on cuda, fp32 on cpu (bf16 also runs on a cpu, "
        "slowly unless it has bf16 units).",
        choices=["auto", "fp32", "fp16", "bf16"],
    )
    gallery_index: str = field(
        "exact",
        "ITC top-k search: exact (every similarity), or faiss-ivf (approximate FAISS "
        "inverted-file index on the CPU, for galleries of millions; see python -m tpas.bench "
        "gallery).",
        choices=["exact", "faiss-ivf"],
    )
    nprobe: int = field(32, "faiss-ivf: inverted lists searched per query (more: slower, closer to exact).")
    cache_dir: Path = field(Path("outputs/cache"), "Gallery feature cache (keyed by model weights and gallery files).")
    seed: int = field(0, "Seed (initialises the untrained heads of --zero-shot).")
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    progress: bool = field(True, "Show progress bars.")


INFER_OUTPUTS = (CANDIDATES_FILE, QUERIES_FILE, "gallery.parquet", "infer_config.json", "metrics.json")


class IvfGallery:
    """Approximate ITC top-k with a FAISS inverted-file index (inner product) over unit gallery features.

    About 4 sqrt(G) lists (each trained from >= 39 points, faiss's minimum), k-means on at most 256
    points per list. A query whose `nprobe` lists hold fewer than k images is searched again with
    twice the lists, up to all of them (= exact), so every row has k real candidates.
    """

    def __init__(self, image_feat: torch.Tensor, nprobe: int = 32, nlist: int | None = None):
        import faiss

        feats = np.ascontiguousarray(image_feat.detach().float().cpu().numpy())
        count, dim = feats.shape
        self.nlist = nlist or max(1, min(int(4 * count**0.5), count // 39))
        self._quantizer = faiss.IndexFlatIP(dim)  # the index keeps a pointer to it: keep it alive
        self.index = faiss.IndexIVFFlat(self._quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        sample = feats
        if count > 256 * self.nlist:
            sample = feats[np.random.default_rng(0).choice(count, 256 * self.nlist, replace=False)]
        self.index.train(sample)
        self.index.add(feats)
        self.nprobe = max(1, min(nprobe, self.nlist))

    def search(self, text_feat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, gallery indices) [Q, k], best first, on text_feat's device."""
        queries = np.ascontiguousarray(text_feat.detach().float().cpu().numpy())
        self.index.nprobe = self.nprobe
        sims, index = self.index.search(queries, k)
        while (index < 0).any() and self.index.nprobe < self.nlist:
            short = np.flatnonzero((index < 0).any(axis=1))
            self.index.nprobe = min(self.nlist, 2 * self.index.nprobe)
            sims[short], index[short] = self.index.search(queries[short], k)
        return torch.from_numpy(sims).to(text_feat.device), torch.from_numpy(index).to(text_feat.device)


def _fingerprint(paths: list[str], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.inference_mode()
def encode_gallery(
    model: model_lib.RetrievalModel,
    paths: list[str],
    transform: Any,
    batch_size: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_feat [G, E], image_embeds [G, N, D]) for every gallery image, float32 on the CPU."""
    device = torch.device(device)
    feats, embeds = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="gallery", disable=not progress, leave=False):
        batch = torch.stack([transform(load_rgb(p)) for p in paths[start : start + batch_size]]).to(device)
        with autocast(device, precision):
            image_embeds, image_feat = model.encode_image(batch)
        feats.append(image_feat.float().cpu())
        embeds.append(image_embeds.float().cpu())
    return torch.cat(feats), torch.cat(embeds)


def cached_gallery(
    model: model_lib.RetrievalModel,
    paths: list[str],
    transform: Any,
    cfg: InferConfig,
    model_key: str,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Gallery features from the cache, or encoded and cached (CPU float32 tensors; bool = cache hit)."""
    # fp32 keeps the key it always had, so existing caches stay valid; fp16/bf16 features differ
    key = model_key if precision == "fp32" else f"{model_key}:{precision}"
    cache = Path(cfg.cache_dir) / f"gallery-{_fingerprint(paths, key)}.safetensors"
    if cache.is_file():
        try:
            saved = load_file(str(cache))
            return saved["image_feat"], saved["image_embeds"], True
        except (OSError, KeyError, SafetensorError):  # a damaged cache is rebuilt, never trusted
            cache.unlink()
    feat, embeds = encode_gallery(model, paths, transform, cfg.image_batch, cfg.progress, device, precision)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"image_feat": feat.contiguous(), "image_embeds": embeds.contiguous()}, str(tmp))
    return feat, embeds, False


@torch.inference_mode()
def rank(
    model: model_lib.RetrievalModel,
    text: TextPipeline,
    captions: list[str],
    image_feat: torch.Tensor,
    image_embeds: torch.Tensor,
    k: int,
    use_itm: bool = True,
    score_rule: str = "tpas",
    itc_weight: float = 0.0,
    text_batch: int = 128,
    itm_batch: int = 512,
    progress: bool = True,
    fast_itm: bool = True,
    precision: str = "fp32",
    gallery_index: str = "exact",
    nprobe: int = 32,
) -> dict[str, Any]:
    """Top-k gallery indices per query by ITC, re-scored by ITM under `score_rule` (tpas.scores).

    Runs where image_feat / image_embeds are (the model must be there too), under autocast for
    precision fp16/bf16. Captions are processed in order of token length, so a batch pads little;
    the ITM batches hold whole queries. A model with an itm_scorer (the xvlm family: tpas.models.fast_itm, exact) is
    scored by it (off with fast_itm=False), any other by its itm_logits. gallery_index="faiss-ivf" finds the ITC top-k
    approximately (IvfGallery), for galleries of millions.

    Returns arrays of shape [Q, k] in caption order, each row sorted by score: index, itc, itm
    (log-odds l1 - l0; NaN without ITM), score, and itm_logits [Q, k, 2] (None without ITM);
    plus itc_range, the (min, max) ITC over every query x gallery pair (over the listed pairs
    with faiss-ivf), which the cmp rule normalises by.
    """
    device = image_feat.device
    k = min(k, image_feat.shape[0])
    n = len(captions)
    top_index = np.zeros((n, k), dtype=np.int64)
    top_itc = np.zeros((n, k), dtype=np.float32)
    top_logits = np.full((n, k, 2), np.nan, dtype=np.float32)
    itc_low, itc_high = np.inf, -np.inf
    lengths = text.lengths(list(captions))
    order = np.argsort(lengths, kind="stable")
    per_itm = max(1, itm_batch // k)  # queries per ITM batch
    if gallery_index not in ("exact", "faiss-ivf"):
        raise TpasError(f"--gallery-index {gallery_index!r}: choose exact or faiss-ivf.")
    ivf = IvfGallery(image_feat, nprobe) if gallery_index == "faiss-ivf" else None
    with autocast(device, precision):
        scorer = model.itm_scorer(image_embeds) if use_itm and fast_itm else None
        bar = tqdm(total=n, desc="ranking", disable=not progress, leave=False)
        for start in range(0, n, text_batch):
            rows = order[start : start + text_batch]
            tokens = text([captions[i] for i in rows])
            input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            text_embeds, text_feat = model.encode_text(input_ids, mask)
            if ivf is not None:
                itc, index = ivf.search(text_feat, k)
            else:
                with torch.autocast(device.type, enabled=False):  # similarities in fp32: fp16 would tie near-equal ones
                    sims = text_feat.float() @ image_feat.float().T
                    itc, index = sims.topk(k, dim=1)
                    itc_low, itc_high = min(itc_low, float(sims.min())), max(itc_high, float(sims.max()))
            top_index[rows], top_itc[rows] = index.cpu().numpy(), itc.cpu().numpy()
            if use_itm:
                scores = []
                for s in range(0, len(rows), per_itm):
                    # cut the padding all of these captions share (lengths are sorted: nearly all of it)
                    length = int(mask[s : s + per_itm].sum(1).max())
                    state, state_mask, cand = (
                        text_embeds[s : s + per_itm, :length],
                        mask[s : s + per_itm, :length],
                        index[s : s + per_itm],
                    )
                    if scorer is not None:
                        scores.append(scorer.logits(state, state_mask, cand).float())
                    else:
                        pairs = model.itm_logits(
                            image_embeds[cand.reshape(-1)],
                            state.repeat_interleave(k, 0),
                            state_mask.repeat_interleave(k, 0),
                        )
                        scores.append(pairs.float().reshape(len(cand), k, 2))
                top_logits[rows] = torch.cat(scores).cpu().numpy()
            bar.update(len(rows))
        bar.close()
    if ivf is not None or not np.isfinite(itc_low):
        itc_low, itc_high = float(top_itc.min()), float(top_itc.max())
    logits = top_logits if use_itm else None
    score = scores_lib.combine(score_rule if use_itm else "itc", top_itc, logits, itc_weight, (itc_low, itc_high))
    best = np.argsort(-score, axis=1, kind="stable")
    out: dict[str, Any] = {
        name: np.take_along_axis(a, best, axis=1)
        for name, a in (("index", top_index), ("itc", top_itc), ("score", score))
    }
    out["itm_logits"] = np.take_along_axis(top_logits, best[..., None], axis=1) if use_itm else None
    out["itm"] = (
        (out["itm_logits"][..., 1] - out["itm_logits"][..., 0]) if use_itm else np.full((n, k), np.nan, np.float32)
    )
    out["itc_range"] = (itc_low, itc_high)
    out["fast_itm"] = scorer is not None
    return out


def _load_model(cfg: InferConfig) -> tuple[model_lib.RetrievalModel, model_lib.ModelConfig, str]:
    if cfg.zero_shot:
        torch.manual_seed(cfg.seed)
        overrides = {"hf_model": cfg.hf_model} if cfg.hf_model else {}
        model_cfg = model_lib.ModelConfig.from_preset(cfg.model, **overrides)
        return (
            model_lib.build_model(model_cfg).eval(),
            model_cfg,
            f"zero-shot:{cfg.seed}:{dataclasses.asdict(model_cfg)}",
        )
    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise TpasError(f"{run}: no trained run here; run `python train.py` first, pass --run, or use --zero-shot.")
    model, model_cfg = model_lib.load_run_model(run)
    return model, model_cfg, _file_digest(run / "model.safetensors")


def to_frames(test: TestSet, ranked: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    q, k = ranked["index"].shape
    names = test.gallery["image"].to_numpy()
    candidates = candidates_frame(
        query_index=np.repeat(test.queries["query_index"].to_numpy(), k).tolist(),
        image=names[ranked["index"].reshape(-1)].tolist(),
        itc=ranked["itc"].reshape(-1),
        itm=ranked["itm"].reshape(-1),
        score=ranked["score"].reshape(-1),
        rank=np.tile(np.arange(1, k + 1), q),
    )
    queries = queries_frame(
        test.queries["query_index"].tolist(), test.queries["caption"].tolist(), test.queries["gt_image"].tolist()
    )
    return candidates, queries


def uses_itm(cfg: InferConfig, model: model_lib.RetrievalModel, model_cfg: model_lib.ModelConfig) -> bool:
    """Re-rank with ITM? Asked for, the model has an ITM head, and that head is trained: a run's,
    or for --zero-shot one that came pretrained with the checkpoint (BLIP's ITM)."""
    if not cfg.itm:
        return False
    if not model.has_itm:
        print(f"{model_cfg.preset}: a dual encoder with no ITM head, so ranking is by ITC alone")
        return False
    if cfg.zero_shot and not model.itm_pretrained:
        print("zero-shot: the ITM head of this preset is untrained, so ranking is by ITC alone")
        return False
    return True


def infer(cfg: InferConfig) -> dict:
    """Rank the gallery for every query and write the stage directory; returns a summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.k < 10:
        raise TpasError(f"--k {cfg.k} is below 10, the length of an answer line; use --k 10 or more.")
    started = time.time()
    ensure_data(cfg.data_root, cfg.seed)
    test = load_test_set(cfg.data_root, cfg.source, cfg.query_file)
    runtime = resolve_runtime(cfg.device, cfg.precision, inference=True)
    device, precision = runtime.device, runtime.precision
    model, model_cfg, model_key = _load_model(cfg)
    model.to(device)
    text = model_lib.build_text_pipeline(model_cfg)
    captions = test.queries["caption"].tolist()
    text.check(captions, [f"query {q}" for q in test.queries["query_index"]], f"{test.root} ({test.source} queries)")
    transform = model_lib.image_transform(model_cfg, train=False)
    use_itm = uses_itm(cfg, model, model_cfg)
    image_feat, image_embeds, from_cache = cached_gallery(
        model, test.gallery["path"].tolist(), transform, cfg, model_key, device, precision
    )
    image_feat, image_embeds = image_feat.to(device), image_embeds.to(device)
    # Both heads give logits: the ITC one is similarity / temperature, so by default they add up.
    itc_weight = cfg.itc_weight if cfg.itc_weight is not None else 1.0 / float(model.temp.detach())
    rule = resolve_score_rule(cfg, model_cfg, use_itm)
    ranked = rank(
        model,
        text,
        captions,
        image_feat,
        image_embeds,
        cfg.k,
        use_itm,
        rule,
        itc_weight,
        cfg.text_batch,
        cfg.itm_batch,
        cfg.progress,
        cfg.fast_itm,
        precision,
        cfg.gallery_index,
        cfg.nprobe,
    )
    broken = ~np.isfinite(ranked["score"]).all(axis=1)
    if broken.any():
        first = test.queries["query_index"].iloc[int(np.flatnonzero(broken)[0])]
        raise TpasError(
            f"{'the --zero-shot model' if cfg.zero_shot else cfg.run}: the model scored {int(broken.sum())} of "
            f"{len(broken)} queries with NaN or infinity (first: query {first}); its weights are damaged or "
            f"diverged: restore them or re-train."
        )
    candidates, queries = to_frames(test, ranked)
    summary: dict[str, Any] = {
        "queries": len(queries),
        "gallery": len(test.gallery),
        "k": int(ranked["index"].shape[1]),
        "source": test.source,
        "gallery_cache_hit": from_cache,
        "device": str(device),
        "precision": precision,
        "fast_itm": ranked["fast_itm"],
        "score": rule,
        "itc_weight": itc_weight if use_itm else None,
        "text": text.describe(),
    }
    gt = ground_truth(queries)  # as sca.py and submit.py: score the queries that have ground truth
    if gt is not None:
        by_rule = score_rule_metrics(test, ranked, gt, itc_weight, use_itm)
        summary["metrics"] = {"itc": by_rule["itc"], "final": ranking_metrics(candidates, gt), "by_score": by_rule}
    # the whole stage dir at once: a kill leaves the previous stage complete, never a mix of the two
    with staged_dir(cfg.output_dir, INFER_OUTPUTS, "infer") as out:
        write_parquet(out / CANDIDATES_FILE, candidates)
        write_parquet(out / QUERIES_FILE, queries)
        write_parquet(out / "gallery.parquet", test.gallery)
        write_json(out / "infer_config.json", cfg)
        if "metrics" in summary:
            write_json(
                out / "metrics.json",
                {
                    **summary["metrics"],
                    "score": rule,
                    "itc_weight": summary["itc_weight"],
                    "queries_scored": len(gt),
                    "queries_total": len(queries),
                },
            )
    summary["seconds"] = round(time.time() - started, 1)
    if "metrics" in summary:
        if len(gt) < len(queries):
            print(f"metrics over the {len(gt)} of {len(queries)} queries that have ground truth")
        print(f"ITC          {format_metrics(summary['metrics']['itc'])}")
        if use_itm:
            print(f"{rule} top{summary['k']} {format_metrics(summary['metrics']['final'])}")
    return summary


def resolve_score_rule(cfg: InferConfig, model_cfg: model_lib.ModelConfig, use_itm: bool) -> str:
    """--score, else the preset's default; ITC alone when the model is not re-ranked by ITM."""
    if not use_itm:
        if cfg.score not in (None, "itc"):
            print(f"--score {cfg.score}: this model is ranked without ITM, so by ITC alone")
        return "itc"
    return cfg.score or model_cfg.score_rule


def score_rule_metrics(
    test: TestSet, ranked: dict[str, Any], gt: dict[str, str], itc_weight: float, use_itm: bool
) -> dict[str, dict]:
    """R@k etc. of the same candidates under every score rule (the ranking written is --score's)."""
    out = {}
    for rule in scores_lib.rules_for(use_itm):
        score = scores_lib.combine(rule, ranked["itc"], ranked["itm_logits"], itc_weight, ranked["itc_range"])
        order = np.argsort(-score, axis=1, kind="stable")
        rescored = {
            **ranked,
            **{name: np.take_along_axis(ranked[name], order, axis=1) for name in ("index", "itc", "itm")},
            "score": np.take_along_axis(score, order, axis=1),
        }
        out[rule] = ranking_metrics(to_frames(test, rescored)[0], gt)
    return out
