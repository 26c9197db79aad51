"""Retrieval: ITC over every query × gallery pair, then ITM re-ranking of each query's top-k.

Writes a stage directory (see tpas.schema): candidates.parquet, queries.parquet,
gallery.parquet (image, path), metrics.json (with ground truth) and infer_config.json.
Gallery features are cached on disk, keyed by the model weights and the gallery files.
"""

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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tpas import model as model_lib
from tpas.cli import field
from tpas.data import TestSet, ensure_data, load_rgb, load_test_set
from tpas.errors import TpasError
from tpas.io import atomic_path, write_json, write_parquet
from tpas.metrics import format_metrics, ranking_metrics
from tpas.schema import CANDIDATES_FILE, QUERIES_FILE, candidates_frame, queries_frame
from tpas.training import load_run_model


@dataclass
class InferConfig:
    data_root: Path = field(Path("data/demo"), "Data root: a challenge folder (query.json, gallery/) or a PAB release (annotation/test/pair.json).")
    source: str = field("auto", "Which test set to read: a challenge folder if one exists, else PAB's test split.", choices=["auto", "challenge", "pab"])
    query_file: str = field("query.json", "Query file inside the challenge folder (e.g. query_heldout.json on the demo set).")
    run: Path = field(Path("runs/demo"), "Trained run directory (config.json + model.safetensors).")
    zero_shot: bool = field(False, "Use the pretrained-only model instead of --run (backbones pretrained; ITC/ITM heads untrained).")
    model: str = field("lite", "Model preset for --zero-shot (a trained run uses its own).", choices=list(model_lib.PRESETS))
    output_dir: Path = field(Path("outputs/infer"), "Where the candidates and metrics are written.")
    k: int = field(128, "Candidates per query kept from ITC and re-ranked by ITM.")
    itm: bool = field(True, "Re-rank the top-k with the ITM head (off: rank by ITC alone).")
    itc_weight: float | None = field(None, "Final score = ITM score + this × ITC similarity; default 1/temperature, i.e. ITM logit + ITC logit (0: ITM alone, as X-VLM).")
    image_batch: int = field(64, "Images per encoder batch.")
    text_batch: int = field(128, "Captions per encoder batch.")
    itm_batch: int = field(512, "Query-candidate pairs per ITM batch.")
    cache_dir: Path = field(Path("outputs/cache"), "Gallery feature cache (keyed by model weights and gallery files).")
    seed: int = field(0, "Seed (initialises the untrained heads of --zero-shot).")
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    progress: bool = field(True, "Show progress bars.")


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
def encode_gallery(model: model_lib.RetrievalModel, paths: list[str], transform: Any, batch_size: int,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_feat [G, E], image_embeds [G, N, D]) for every gallery image."""
    feats, embeds = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="gallery", disable=not progress, leave=False):
        batch = torch.stack([transform(load_rgb(p)) for p in paths[start:start + batch_size]])
        image_embeds, image_feat = model.encode_image(batch)
        feats.append(image_feat.float())
        embeds.append(image_embeds.float())
    return torch.cat(feats), torch.cat(embeds)


def cached_gallery(model: model_lib.RetrievalModel, paths: list[str], transform: Any, cfg: InferConfig,
                   model_key: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    cache = Path(cfg.cache_dir) / f"gallery-{_fingerprint(paths, model_key)}.safetensors"
    if cache.is_file():
        try:
            saved = load_file(str(cache))
            return saved["image_feat"], saved["image_embeds"], True
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache.unlink()
    feat, embeds = encode_gallery(model, paths, transform, cfg.image_batch, cfg.progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"image_feat": feat.contiguous(), "image_embeds": embeds.contiguous()}, str(tmp))
    return feat, embeds, False


@torch.inference_mode()
def rank(model: model_lib.RetrievalModel, tokenizer: Any, captions: list[str], image_feat: torch.Tensor,
         image_embeds: torch.Tensor, k: int, max_tokens: int, use_itm: bool = True, itc_weight: float = 0.0,
         text_batch: int = 128, itm_batch: int = 512, progress: bool = True) -> dict[str, np.ndarray]:
    """Top-k gallery indices per query by ITC, re-scored by ITM in batches that span queries.

    Returns arrays of shape [Q, k]: index, itc, itm (NaN without ITM), score, sorted by score.
    """
    k = min(k, image_feat.shape[0])
    n = len(captions)
    top_index = np.zeros((n, k), dtype=np.int64)
    top_itc = np.zeros((n, k), dtype=np.float32)
    top_itm = np.full((n, k), np.nan, dtype=np.float32)
    # Enough queries per chunk that one ITM batch holds whole queries' candidate lists.
    chunk = max(1, min(text_batch, itm_batch // k if use_itm else text_batch))
    for start in tqdm(range(0, n, chunk), desc="ranking", disable=not progress, leave=False):
        tokens = model_lib.tokenize(tokenizer, captions[start:start + chunk], max_tokens)
        text_embeds, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        sims = text_feat.float() @ image_feat.T
        itc, index = sims.topk(k, dim=1)
        rows = slice(start, start + len(index))
        top_index[rows], top_itc[rows] = index.numpy(), itc.numpy()
        if use_itm:
            q = torch.arange(len(index)).repeat_interleave(k)
            scores = []
            for s in range(0, len(q), itm_batch):
                pair_q, pair_g = q[s:s + itm_batch], index.reshape(-1)[s:s + itm_batch]
                scores.append(model.itm_score(image_embeds[pair_g], text_embeds[pair_q], tokens["attention_mask"][pair_q]).float())
            top_itm[rows] = torch.cat(scores).reshape(len(index), k).numpy()
    score = (top_itm + itc_weight * top_itc) if use_itm else top_itc.copy()
    order = np.argsort(-score, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return {"index": take(top_index), "itc": take(top_itc), "itm": take(top_itm), "score": take(score)}


def _load_model(cfg: InferConfig) -> tuple[model_lib.RetrievalModel, model_lib.ModelConfig, str]:
    if cfg.zero_shot:
        torch.manual_seed(cfg.seed)
        model_cfg = model_lib.ModelConfig.from_preset(cfg.model)
        return model_lib.build_model(model_cfg).eval(), model_cfg, f"zero-shot:{cfg.seed}:{dataclasses.asdict(model_cfg)}"
    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise TpasError(f"{run}: no trained run here; run `python train.py` first, pass --run, or use --zero-shot.")
    model, model_cfg = load_run_model(run)
    return model, model_cfg, _file_digest(run / "model.safetensors")


def to_frames(test: TestSet, ranked: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    q, k = ranked["index"].shape
    names = test.gallery["image"].to_numpy()
    candidates = candidates_frame(
        query_index=np.repeat(test.queries["query_index"].to_numpy(), k).tolist(),
        image=names[ranked["index"].reshape(-1)].tolist(),
        itc=ranked["itc"].reshape(-1), itm=ranked["itm"].reshape(-1), score=ranked["score"].reshape(-1),
        rank=np.tile(np.arange(1, k + 1), q))
    queries = queries_frame(test.queries["query_index"].tolist(), test.queries["caption"].tolist(),
                            test.queries["gt_image"].tolist())
    return candidates, queries


def infer(cfg: InferConfig) -> dict:
    """Rank the gallery for every query and write the stage directory; returns a summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.k < 10:
        raise TpasError(f"--k {cfg.k} is below 10, the length of an answer line; use --k 10 or more.")
    started = time.time()
    ensure_data(cfg.data_root, cfg.seed)
    test = load_test_set(cfg.data_root, cfg.source, cfg.query_file)
    model, model_cfg, model_key = _load_model(cfg)
    tokenizer = model_lib.build_tokenizer(model_cfg)
    transform = model_lib.image_transform(model_cfg, train=False)
    use_itm = cfg.itm and not cfg.zero_shot
    if cfg.itm and cfg.zero_shot:
        print("zero-shot: the ITM head of this preset is untrained, so ranking is by ITC alone")
    image_feat, image_embeds, from_cache = cached_gallery(model, test.gallery["path"].tolist(), transform, cfg, model_key)
    # Both heads give logits: the ITC one is similarity / temperature, so by default they add up.
    itc_weight = cfg.itc_weight if cfg.itc_weight is not None else 1.0 / float(model.temp.detach())
    ranked = rank(model, tokenizer, test.queries["caption"].tolist(), image_feat, image_embeds, cfg.k,
                  model_cfg.max_tokens, use_itm, itc_weight, cfg.text_batch, cfg.itm_batch, cfg.progress)
    candidates, queries = to_frames(test, ranked)
    out = Path(cfg.output_dir)
    write_parquet(out / CANDIDATES_FILE, candidates)
    write_parquet(out / QUERIES_FILE, queries)
    write_parquet(out / "gallery.parquet", test.gallery)
    write_json(out / "infer_config.json", cfg)
    summary: dict[str, Any] = {"queries": len(queries), "gallery": len(test.gallery), "k": int(ranked["index"].shape[1]),
                               "source": test.source, "gallery_cache_hit": from_cache,
                               "itc_weight": itc_weight if use_itm else None,
                               "seconds": round(time.time() - started, 1)}
    gt = dict(zip(queries["query_index"], queries["gt_image"])) if queries["gt_image"].notna().all() else None
    if gt is not None:
        itc_order = candidates.sort_values(["query_index", "itc"], ascending=[True, False], kind="stable")
        itc_order["rank"] = itc_order.groupby("query_index").cumcount().astype(np.int32) + 1
        summary["metrics"] = {"itc": ranking_metrics(itc_order, gt), "final": ranking_metrics(candidates, gt)}
        write_json(out / "metrics.json", {**summary["metrics"], "itc_weight": summary["itc_weight"]})
        print(f"ITC          {format_metrics(summary['metrics']['itc'])}")
        if use_itm:
            print(f"ITM+{itc_weight:.1f}*ITC top{summary['k']} {format_metrics(summary['metrics']['final'])}")
    return summary
