"""Retrieval: batched ITC + ITM ranking equals the field's one-query-at-a-time loop."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tpas import models as model_lib
from tpas.errors import TpasError
from tpas.models import fast_itm as fast_itm_lib
from tpas.models.fast_itm import FastItmScorer
from tpas.models.text import TextPipeline
from tpas.retrieval import IvfGallery, rank
from tpas.runtime import resolve_runtime


def _tiny():
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig.from_preset("tiny")
    return model_lib.build_model(cfg).eval(), model_lib.build_tokenizer(cfg), cfg


CAPTIONS = [
    "a man in a red jacket lying on the ground",
    "a woman waving",
    "a child running in a park",
    "two men fighting on the street",
    "a person in blue jeans is falling down",
]


@torch.inference_mode()
def _reference(model, tokenizer, captions, images, k):
    """CMP/X-VLM evaluation: per query, its top-k candidates through the cross encoder."""
    image_embeds, image_feat = model.encode_image(images)
    out = []
    for caption in captions:
        tokens = TextPipeline(tokenizer, max_tokens=70)([caption])
        text_embeds, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        index = (text_feat @ image_feat.T)[0].topk(k).indices
        scores = [float(model.itm_score(image_embeds[g : g + 1], text_embeds, tokens["attention_mask"])) for g in index]
        order = np.argsort(-np.array(scores), kind="stable")
        out.append((index.numpy()[order], np.array(scores, dtype=np.float32)[order]))
    return image_feat, image_embeds, out


def test_batched_ranking_matches_per_query_loop() -> None:
    model, tokenizer, cfg = _tiny()
    images = torch.randn(12, 3, *cfg.image_size)
    image_feat, image_embeds, reference = _reference(model, tokenizer, CAPTIONS, images, k=6)
    # itm_batch 8 splits one query's candidates across batches and mixes queries in one batch
    ranked = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=6,
        text_batch=2,
        itm_batch=8,
        progress=False,
    )
    for q, (index, scores) in enumerate(reference):
        assert ranked["index"][q].tolist() == index.tolist()
        np.testing.assert_allclose(ranked["itm"][q], scores, rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(ranked["score"][q]) <= 0)


def test_itc_only_ranking_is_sorted_similarity() -> None:
    model, tokenizer, cfg = _tiny()
    images = torch.randn(9, 3, *cfg.image_size)
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(images)
        tokens = TextPipeline(tokenizer, max_tokens=70)(CAPTIONS)
        sims = (model.encode_text(tokens["input_ids"], tokens["attention_mask"])[1] @ image_feat.T).numpy()
    ranked = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=20,
        use_itm=False,
        progress=False,
    )
    assert ranked["index"].shape == (5, 9)  # k is capped at the gallery size
    assert np.isnan(ranked["itm"]).all()
    np.testing.assert_array_equal(ranked["index"], np.argsort(-sims, axis=1, kind="stable"))
    np.testing.assert_allclose(ranked["score"], np.sort(sims, axis=1)[:, ::-1], rtol=1e-5)


# ---------------------------------------------------------------- fast ITM (tpas.models.fast_itm)

_MODELS: dict[int, tuple] = {}


def _tiny_layers(layers: int):
    """A tiny model with `layers` fusion layers (text model of 3 layers), built once per test module."""
    if layers not in _MODELS:
        torch.manual_seed(layers)
        text_config = {**model_lib.PRESETS["tiny"]["text_config"], "num_hidden_layers": 3}
        cfg = model_lib.ModelConfig.from_preset("tiny", text_config=text_config, fusion_layers=layers)
        _MODELS[layers] = (model_lib.build_model(cfg).eval(), model_lib.build_tokenizer(cfg), cfg)
    return _MODELS[layers]


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # whole-gallery keys/values, or per call
@torch.inference_mode()
def test_fast_itm_equals_itm_score_per_pair(layers: int, cache_bytes: int) -> None:
    model, tokenizer, cfg = _tiny_layers(layers)
    image_embeds, _ = model.encode_image(torch.randn(7, 3, *cfg.image_size))
    tokens = TextPipeline(tokenizer, max_tokens=70)(CAPTIONS + ["a", "a woman"])  # ragged: padded batch
    mask = tokens["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1]  # some captions really are padded
    text_embeds, _ = model.encode_text(tokens["input_ids"], mask)
    candidates = torch.randint(0, 7, (len(mask), 5), generator=torch.Generator().manual_seed(0))
    # ffn_rows=16 splits the FFN rows into many blocks
    fast = FastItmScorer(model, image_embeds, cache_bytes=cache_bytes, ffn_rows=16).scores(
        text_embeds, mask, candidates
    )
    pairs = model.itm_score(
        image_embeds[candidates.reshape(-1)], text_embeds.repeat_interleave(5, 0), mask.repeat_interleave(5, 0)
    ).reshape(candidates.shape)
    assert pairs.std() > 0.01  # the scores differ between pairs, so a mix-up would show
    torch.testing.assert_close(fast, pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_fast_ranking_matches_per_query_loop(layers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, cfg = _tiny_layers(layers)
    images = torch.randn(12, 3, *cfg.image_size)
    image_feat, image_embeds, reference = _reference(model, tokenizer, CAPTIONS, images, k=6)
    generic = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=6,
        itc_weight=0.5,
        text_batch=3,
        itm_batch=12,
        progress=False,
        fast_itm=False,
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path must not score pairs with model.itm_score")

    monkeypatch.setattr(model, "itm_score", refuse)
    fast = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=6,
        itc_weight=0.5,
        text_batch=3,
        itm_batch=12,
        progress=False,
    )
    for q, (index, scores) in enumerate(reference):
        # by ITM alone: the reference's order; with ITC added: the generic path's
        by_itm = fast["index"][q][np.argsort(-fast["itm"][q], kind="stable")]
        assert by_itm.tolist() == index.tolist()
        np.testing.assert_allclose(np.sort(fast["itm"][q])[::-1], scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fast["index"], generic["index"])
    np.testing.assert_allclose(fast["score"], generic["score"], rtol=1e-5, atol=1e-5)


class _Wrapped(model_lib.RetrievalModel):
    """Another model family: not a XVLMModel, so rank() must fall back to its itm_score."""

    def __init__(self, inner: model_lib.XVLMModel):
        super().__init__()
        self.inner, self.temp, self.calls = inner, inner.temp, 0

    def encode_text(self, input_ids, attention_mask):
        return self.inner.encode_text(input_ids, attention_mask)

    def itm_logits(self, image_state, text_state, text_mask):
        self.calls += 1
        return self.inner.itm_logits(image_state, text_state, text_mask)


def test_other_model_families_fall_back_to_itm_score() -> None:
    model, tokenizer, cfg = _tiny_layers(2)
    wrapped = _Wrapped(model).eval()
    assert not fast_itm_lib.supports(wrapped) and fast_itm_lib.supports(model)
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(torch.randn(10, 3, *cfg.image_size))
    ours = rank(model, TextPipeline(tokenizer, max_tokens=70), CAPTIONS, image_feat, image_embeds, k=4, progress=False)
    theirs = rank(
        wrapped,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=4,
        itm_batch=8,
        progress=False,
    )
    assert wrapped.calls == 3  # 5 queries, 2 per ITM batch
    np.testing.assert_array_equal(ours["index"], theirs["index"])
    np.testing.assert_allclose(ours["itm"], theirs["itm"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_the_fast_path_under_autocast(precision: str) -> None:
    """CPU autocast stands in for CUDA's here: the fast path's dtypes must mix without error."""
    model, tokenizer, cfg = _tiny_layers(2)
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(torch.randn(10, 3, *cfg.image_size))
    # k = the whole gallery: the same candidates whatever the precision of the ITC stage
    full = rank(model, TextPipeline(tokenizer, max_tokens=70), CAPTIONS, image_feat, image_embeds, k=10, progress=False)
    half = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=10,
        progress=False,
        precision=precision,
    )
    generic = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=10,
        progress=False,
        precision=precision,
        fast_itm=False,
    )
    assert np.isfinite(half["itm"]).all()

    def order(r: dict) -> np.ndarray:  # ITM scores in gallery-index order
        return np.take_along_axis(r["itm"], np.argsort(r["index"], axis=1), axis=1)

    spread = float(np.ptp(full["itm"]))
    assert np.abs(order(half) - order(full)).max() < 0.05 * spread + 0.05
    assert np.abs(order(half) - order(generic)).max() < 0.05 * spread + 0.05


def test_one_runtime_resolves_device_and_precision_for_training_and_inference(monkeypatch) -> None:
    cpu = resolve_runtime("cpu", "auto", inference=True)
    assert cpu.device == torch.device("cpu") and cpu.precision == "fp32"
    assert resolve_runtime("cpu", "bf16", inference=True).precision == "bf16"
    with pytest.raises(TpasError, match="fp16 needs a GPU"):
        resolve_runtime("cpu", "fp16", inference=True)
    if not torch.cuda.is_available():
        with pytest.raises(TpasError, match="torch sees no CUDA GPU"):
            resolve_runtime("cuda", "auto", inference=True)
    # the auto rules on a GPU: fp16 for inference, bf16 for training where the GPU has it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_runtime("auto", "auto", inference=True).precision == "fp16"
    assert resolve_runtime("auto", "auto").precision == "bf16"
    assert resolve_runtime("cuda", "auto", inference=True).device.type == "cuda"


def test_ivf_gallery_finds_k_real_candidates_and_is_exact_with_every_list() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(800, 16, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    exact_sims, exact = (queries @ feats.T).topk(300, dim=1)
    ivf = IvfGallery(feats, nprobe=1)
    assert ivf.nlist == 20  # 800 // 39
    sims, index = ivf.search(queries, 300)  # one list holds ~40 images: it must widen the search
    assert (index >= 0).all() and all(len(set(row.tolist())) == 300 for row in index)
    np.testing.assert_allclose(sims.numpy(), (queries[:, None] * feats[index]).sum(-1).numpy(), atol=1e-5)
    ivf.nprobe = ivf.nlist
    sims, index = ivf.search(queries, 300)
    assert (index == exact).float().mean() > 0.99  # only float ties may swap
    np.testing.assert_allclose(sims.numpy(), exact_sims.numpy(), atol=1e-5)


def test_rank_with_faiss_ivf_matches_exact_on_a_small_gallery() -> None:
    model, tokenizer, cfg = _tiny_layers(1)
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(torch.randn(12, 3, *cfg.image_size))
    exact = rank(model, TextPipeline(tokenizer, max_tokens=70), CAPTIONS, image_feat, image_embeds, k=5, progress=False)
    approx = rank(
        model,
        TextPipeline(tokenizer, max_tokens=70),
        CAPTIONS,
        image_feat,
        image_embeds,
        k=5,
        progress=False,
        gallery_index="faiss-ivf",
    )  # 12 images: a single list, so the search is exhaustive
    np.testing.assert_array_equal(approx["index"], exact["index"])
    np.testing.assert_allclose(approx["score"], exact["score"], rtol=1e-5, atol=1e-5)


def _challenge_with_partial_truth(root) -> None:
    """12 gallery images, 3 queries; query_gt.json knows the true image of 2 of them."""
    import json

    from PIL import Image

    for i in range(12):
        path = root / "gallery" / f"G{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 32), (20 * i, 255 - 20 * i, 90)).save(path)
    ids = ["q0", "q1", "q2"]
    (root / "query.json").write_text(
        "".join(json.dumps({"query_index": q, "caption": f"a person number {i}"}) + "\n" for i, q in enumerate(ids))
    )
    (root / "query_index.txt").write_text("\r\n".join(ids) + "\r\n")
    (root / "query_gt.json").write_text(
        '{"query_index": "q0", "image": "G00"}\n{"query_index": "q2", "image": "G05"}\n'
    )


def test_infer_scores_the_queries_that_have_ground_truth(tmp_path, capsys) -> None:
    import json

    from tpas.retrieval import InferConfig, infer

    _challenge_with_partial_truth(tmp_path / "challenge")
    cfg = InferConfig(
        data_root=tmp_path / "challenge",
        zero_shot=True,
        model="tiny",
        k=10,
        threads=1,
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    summary = infer(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["queries_scored"], metrics["queries_total"]) == (2, 3)
    assert metrics["itc"]["queries"] == 2 and summary["metrics"]["final"]["queries"] == 2
    assert "metrics over the 2 of 3 queries that have ground truth" in capsys.readouterr().out

    # An unreadable gallery image is named, not an OSError from deep inside PIL.
    bad = tmp_path / "challenge" / "gallery" / "G03.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(TpasError, match=re.escape(f"{bad}: image is unreadable")):
        infer(cfg)
