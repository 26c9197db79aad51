"""Retrieval: batched ITC + ITM ranking equals the field's one-query-at-a-time loop."""

from __future__ import annotations

import numpy as np
import torch

from tpas import model as model_lib
from tpas.retrieval import rank


def _tiny():
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig.from_preset("tiny")
    return model_lib.build_model(cfg).eval(), model_lib.build_tokenizer(cfg), cfg


CAPTIONS = ["a man in a red jacket lying on the ground", "a woman waving", "a child running in a park",
            "two men fighting on the street", "a person in blue jeans is falling down"]


@torch.inference_mode()
def _reference(model, tokenizer, captions, images, k):
    """CMP/X-VLM evaluation: per query, its top-k candidates through the cross encoder."""
    image_embeds, image_feat = model.encode_image(images)
    out = []
    for caption in captions:
        tokens = model_lib.tokenize(tokenizer, [caption], 70)
        text_embeds, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        itc, index = (text_feat @ image_feat.T)[0].topk(k)
        scores = [float(model.itm_score(image_embeds[g:g + 1], text_embeds, tokens["attention_mask"])) for g in index]
        order = np.argsort(-np.array(scores), kind="stable")
        out.append((index.numpy()[order], np.array(scores, dtype=np.float32)[order]))
    return image_feat, image_embeds, out


def test_batched_ranking_matches_per_query_loop() -> None:
    model, tokenizer, cfg = _tiny()
    images = torch.randn(12, 3, *cfg.image_size)
    image_feat, image_embeds, reference = _reference(model, tokenizer, CAPTIONS, images, k=6)
    # itm_batch 8 splits one query's candidates across batches and mixes queries in one batch
    ranked = rank(model, tokenizer, CAPTIONS, image_feat, image_embeds, k=6, max_tokens=70,
                  text_batch=2, itm_batch=8, progress=False)
    for q, (index, scores) in enumerate(reference):
        assert ranked["index"][q].tolist() == index.tolist()
        np.testing.assert_allclose(ranked["itm"][q], scores, rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(ranked["score"][q]) <= 0)


def test_itc_only_ranking_is_sorted_similarity() -> None:
    model, tokenizer, cfg = _tiny()
    images = torch.randn(9, 3, *cfg.image_size)
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(images)
        tokens = model_lib.tokenize(tokenizer, CAPTIONS, 70)
        sims = (model.encode_text(tokens["input_ids"], tokens["attention_mask"])[1] @ image_feat.T).numpy()
    ranked = rank(model, tokenizer, CAPTIONS, image_feat, image_embeds, k=20, max_tokens=70, use_itm=False,
                  progress=False)
    assert ranked["index"].shape == (5, 9)  # k is capped at the gallery size
    assert np.isnan(ranked["itm"]).all()
    np.testing.assert_array_equal(ranked["index"], np.argsort(-sims, axis=1, kind="stable"))
    np.testing.assert_allclose(ranked["score"], np.sort(sims, axis=1)[:, ::-1], rtol=1e-5)
