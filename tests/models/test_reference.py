"""tpas against X-VLM's own outputs (tests/data/xvlm-reference, made by X-VLM's code at commit cb4fff1).

The fixture holds a tiny random X-VLM checkpoint in the release format, three images, six
captions and what X-VLM computed from them: the cleaned captions and token ids, the pixel
tensors, the features, ITC, the ITM logits and Retrieval.py's t2i scores; pre_caption.json
holds 40 tricky captions through X-VLM's pre_caption and tokenizer. Run with `pytest -k reference`.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tpas import models as M
from tpas import scores
from tpas.data import load_rgb
from tpas.models.convert.xvlm import load_initial_weights
from tpas.models.text import pre_caption
from tpas.retrieval import rank

REF = Path(__file__).parents[1] / "data" / "xvlm-reference"
ATOL = 1e-5  # benign differences inside X-VLM are <= 9.5e-7; any broken convention moves values by >= 0.019


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((REF / "reference.json").read_text())


def fixture_config(**overrides) -> M.ModelConfig:
    """xvlm-tiny at the fixture's sizes (swin_config.json, bert_config.json, the checkpoint's config)."""
    bert = json.loads((REF / "bert_config.json").read_text())
    swin = json.loads((REF / "swin_config.json").read_text())
    text_config = {
        k: bert[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "hidden_act",
            "layer_norm_eps",
            "max_position_embeddings",
            "type_vocab_size",
            "pad_token_id",
        )
    }
    values = {
        "text_config": text_config,
        "text_layers": bert["fusion_layer"],
        "fusion_layers": bert["num_hidden_layers"] - bert["fusion_layer"],
        "embed_dim": 16,
        "image_size": (swin["image_res"], swin["image_res"]),
        "image_backbone_kwargs": {k: swin[k] for k in ("embed_dim", "depths", "num_heads", "window_size")},
        **overrides,
    }
    return M.ModelConfig.from_preset("xvlm-tiny", **values)


@pytest.fixture(scope="module")
def loaded() -> tuple[M.XVLMModel, M.ModelConfig]:
    cfg = fixture_config()
    model = M.build_model(cfg)
    report = load_initial_weights(model, REF / "tiny_xvlm.th")  # train.py --init's loader
    assert report["schema"] == "xvlm" and not report["missing"] and not report["unmapped"]
    return model.eval(), cfg


def _close(ours: torch.Tensor | np.ndarray, theirs: list, what: str) -> None:
    ours = torch.as_tensor(np.asarray(ours, dtype=np.float32))
    theirs = torch.tensor(theirs, dtype=torch.float32)
    assert ours.shape == theirs.shape, what
    gap = float((ours - theirs).abs().max())
    assert gap <= ATOL, f"{what}: max |difference| {gap:.3g} from X-VLM's output"


def _pixels(cfg: M.ModelConfig, names: list[str]) -> torch.Tensor:
    transform = M.image_transform(cfg, train=False)
    return torch.stack([transform(load_rgb(REF / name)) for name in names])


def _text(cfg: M.ModelConfig, captions: list[str]) -> dict[str, torch.Tensor]:
    return M.build_text_pipeline(cfg)(captions)


def _run(model: M.XVLMModel, cfg: M.ModelConfig, reference: dict) -> dict[str, torch.Tensor]:
    """Every recorded output, computed the way tpas computes it (pipeline, transform, model)."""
    images = _pixels(cfg, [image["file"] for image in reference["images"]])
    tokens = _text(cfg, reference["captions"])
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(images)
        text_hidden, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        n_text, n_image = len(text_feat), len(image_feat)
        rows = torch.arange(n_text).repeat_interleave(n_image)
        cols = torch.arange(n_image).repeat(n_text)
        fused = model.fuse(text_hidden[rows], tokens["attention_mask"][rows], image_embeds[cols])
        logits = model.itm_head(fused)
        itc = text_feat @ image_feat.T
        itc_over_temp = itc / model.temp
    return {
        "pixels": images,
        "tokens": tokens,
        "image_embeds": image_embeds,
        "image_feat": image_feat,
        "text_hidden": text_hidden,
        "text_feat": text_feat,
        "itc_sim": itc,
        "itc_over_temp": itc_over_temp,
        "itm_logits": logits.reshape(n_text, n_image, 2),
        "fused_cls": fused.reshape(n_text, n_image, -1),
    }


# ---------------------------------------------------------------- the text pipeline


def test_reference_pre_caption_reproduces_every_tricky_case():
    cases = json.loads((REF / "pre_caption.json").read_text())["cases"]
    cfg = fixture_config()
    pipeline = M.build_text_pipeline(cfg)
    assert (pipeline.caption_clean, pipeline.max_words, pipeline.trailing_sep, pipeline.max_tokens) == (
        "pre_caption",
        30,
        False,
        40,
    )  # X-VLM's retrieval config, from the xvlm-* presets
    errors = 0
    for case in cases:
        if case["error"] is not None:
            errors += 1
            with pytest.raises(ValueError, match="pre_caption yields invalid text"):
                pre_caption(case["raw"], 30)
            continue
        assert pre_caption(case["raw"], 30) == case["pre_caption"], case["raw"]
        assert pipeline([case["raw"]])["input_ids"][0].tolist() == case["input_ids"], case["raw"]
        assert pipeline.lengths([case["raw"]]) == [len(case["input_ids"])]
    assert errors == 5 and len(cases) == 40


def test_reference_token_ids_of_the_fixture_captions(reference):
    tok = reference["tokenization"]
    cleaned = [pre_caption(c, 30) for c in reference["captions"]]
    assert cleaned == reference["pre_caption"]
    tokens = _text(fixture_config(), reference["captions"])
    width = tokens["input_ids"].shape[1]
    assert width == max(tok["lengths"]) == 40  # padded to the longest, which here is max_tokens
    assert tokens["input_ids"].tolist() == [row[:width] for row in tok["input_ids"]]
    assert tokens["attention_mask"].tolist() == [row[:width] for row in tok["attention_mask"]]
    assert 102 not in tokens["input_ids"].tolist()[0]  # no [SEP] anywhere


def test_reference_text_pipeline_is_recorded_in_the_run_config_and_old_runs_keep_theirs():
    cfg = fixture_config()
    saved = dataclasses.asdict(cfg)
    assert M.ModelConfig.from_dict(saved).text_settings == cfg.text_settings
    # a run written before pipelines were recorded: its config has no text keys but max_tokens
    legacy = {k: v for k, v in saved.items() if k not in ("caption_clean", "max_words", "trailing_sep")}
    legacy["max_tokens"] = 70
    old = M.build_text_pipeline(M.ModelConfig.from_dict(legacy))
    assert (old.caption_clean, old.trailing_sep, old.max_tokens) == ("strip", True, 70)
    assert old(["A man, lying."])["input_ids"][0].tolist()[-1] == 102  # [SEP] kept, as it was trained


# ---------------------------------------------------------------- images


def test_reference_pixel_tensors(reference):
    cfg = fixture_config()
    _close(
        _pixels(cfg, [image["file"] for image in reference["images"]]),
        reference["preprocess"]["pixel_values"],
        "pixel_values",
    )
    for name, check in reference["preprocess"]["resize_check"].items():
        _close(_pixels(cfg, [name])[0], check["pixel_values"], f"bicubic resize of {name}")
    assert cfg.image_mean == tuple(reference["preprocess"]["mean"]) and cfg.image_std == tuple(
        reference["preprocess"]["std"]
    )


# ---------------------------------------------------------------- the model


def test_reference_checkpoint_reproduces_every_recorded_output(loaded, reference):
    model, cfg = loaded
    out, want = _run(model, cfg, reference), reference["outputs"]
    assert abs(float(model.temp.detach()) - want["temp"]) <= ATOL
    for name in ("image_embeds", "image_feat", "text_feat", "itc_sim", "itc_over_temp", "itm_logits", "fused_cls"):
        _close(out[name], want[name], name)
    mask = torch.tensor(reference["tokenization"]["attention_mask"], dtype=torch.bool)
    hidden_ref = torch.tensor(want["text_hidden"])
    _close(out["text_hidden"][mask], hidden_ref[mask].tolist(), "text_hidden (real tokens)")


def test_reference_xvlm_score_rule_reproduces_retrievals_t2i_scores(loaded, reference):
    model, cfg = loaded
    images = _pixels(cfg, [image["file"] for image in reference["images"]])
    with torch.inference_mode():
        image_embeds, image_feat = model.encode_image(images)
    ranked = rank(
        model,
        M.build_text_pipeline(cfg),
        reference["captions"],
        image_feat,
        image_embeds,
        k=3,
        score_rule=scores.default_rule(cfg.preset),
        progress=False,
    )
    assert scores.default_rule(cfg.preset) == "xvlm"
    t2i = np.zeros_like(ranked["score"])
    np.put_along_axis(t2i, ranked["index"], ranked["score"], axis=1)
    _close(t2i, reference["outputs"]["itm_score_t2i"], "Retrieval.py score_matrix_t2i")
    assert ranked["index"].tolist() == reference["checks"]["t2i_ranking_itm_index1"]
    # the logit difference orders these images otherwise: the rule is not a detail
    log_odds = rank(
        model,
        M.build_text_pipeline(cfg),
        reference["captions"],
        image_feat,
        image_embeds,
        k=3,
        score_rule="log-odds",
        progress=False,
    )
    assert log_odds["index"].tolist() == reference["checks"]["t2i_ranking_logit_difference"]
    assert log_odds["index"].tolist() != ranked["index"].tolist()


@pytest.mark.parametrize("broken", ["trailing_sep", "no_cleaning", "imagenet_mean_std", "logit_difference"])
def test_reference_checks_catch_each_broken_convention(loaded, reference, broken):
    """Each convention moves some recorded output far beyond the tolerance: the checks above
    would fail if tpas broke it."""
    model, cfg = loaded
    if broken == "logit_difference":
        logits = reference["outputs"]["itm_logits"]
        diff = np.asarray(logits)[..., 1] - np.asarray(logits)[..., 0]
        gap = np.abs(diff - np.asarray(reference["outputs"]["itm_score_t2i"])).max()
    elif broken == "imagenet_mean_std":
        bad = dataclasses.replace(cfg, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
        gap = float(
            (_pixels(bad, ["img0.png"])[0] - torch.tensor(reference["preprocess"]["pixel_values"][0])).abs().max()
        )
    else:
        bad = (
            dataclasses.replace(cfg, trailing_sep=True)
            if broken == "trailing_sep"
            else dataclasses.replace(cfg, caption_clean="strip")
        )
        gap = float(
            (_run(model, bad, reference)["text_feat"] - torch.tensor(reference["outputs"]["text_feat"])).abs().max()
        )
    assert gap > 100 * ATOL, f"{broken}: only {gap:.3g} from the reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run `pytest -k reference_on_cuda -s` on one")
def test_reference_on_cuda_in_fp32_and_bf16(loaded, reference):
    """The fixture on a GPU: fp32 must stay within the CPU tolerance's order; bf16 autocast's max
    differences are printed (a record, not a gate: CPU CI is the gate)."""
    model, cfg = loaded
    want = reference["outputs"]
    model = model.to("cuda")
    gaps = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        images = _pixels(cfg, [image["file"] for image in reference["images"]]).cuda()
        tokens = {k: v.cuda() for k, v in _text(cfg, reference["captions"]).items()}
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            image_embeds, image_feat = model.encode_image(images)
            _, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
            n_text, n_image = len(text_feat), len(image_feat)
            rows, cols = torch.arange(n_text).repeat_interleave(n_image), torch.arange(n_image).repeat(n_text)
            hidden = model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
            logits = model.itm_head(model.fuse(hidden[rows], tokens["attention_mask"][rows], image_embeds[cols]))
        ours = {
            "image_feat": image_feat,
            "text_feat": text_feat,
            "itc_over_temp": text_feat @ image_feat.T / model.temp,
            "itm_logits": logits.reshape(n_text, n_image, 2),
        }
        gaps[precision] = {k: float((v.float().cpu() - torch.tensor(want[k])).abs().max()) for k, v in ours.items()}
    print(json.dumps({"device": torch.cuda.get_device_name(0), "max_abs_difference": gaps}, indent=2))
    assert max(gaps["fp32"].values()) <= 1e-4  # TF32 off by default for inference; cuBLAS rounding only
