"""BLIP / CLIP wrappers (tpas.models.hf) on tiny random transformers models: encoders, agreement
with transformers' own forward, a training step, retrieval, local dirs, run reload, offline hub."""

import copy
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tpas import models as M
from tpas import retrieval
from tpas.errors import TpasError
from tpas.io import write_json
from tpas.models import hf as H
from tpas.models.run import load_run_model, save_weights
from tpas.models.text import TextPipeline

FAMILIES = {"blip": ("blip-itm", H.TINY_BLIP_CONFIG), "clip": ("clip", H.TINY_CLIP_CONFIG)}
CAPTIONS = [
    "a man in a red jacket lying on the pavement",
    "a woman in a blue coat running across the street",
    "a child falling off a bike",
    "an old man walking",
]


def _config(family: str, **overrides) -> M.ModelConfig:
    preset, tiny = FAMILIES[family]
    values = {"hf_model": None, "hf_config": copy.deepcopy(tiny), "image_size": (32, 32), "max_tokens": 32, **overrides}
    return M.ModelConfig.from_preset(preset, **values)


def _build(family: str, seed: int = 0, **overrides) -> tuple[M.RetrievalModel, M.ModelConfig]:
    torch.manual_seed(seed)
    cfg = _config(family, **overrides)
    return M.build_model(cfg), cfg


def _inputs(cfg: M.ModelConfig, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.randn(n, 3, *cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return images, TextPipeline(M.build_tokenizer(cfg), max_tokens=cfg.max_tokens)(CAPTIONS[:n])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_encoders_shapes_and_unit_norm(family, size):
    model, cfg = _build(family, image_size=size)
    model.eval()
    images, tokens = _inputs(cfg)
    with torch.no_grad():
        image_state, image_feat = model.encode_image(images)
        text_state, text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert cfg.embed_dim == 16  # recorded from the transformers config
    assert image_feat.shape == text_feat.shape == (4, 16)
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(4))
    if family == "blip":
        patches = (size[0] // 8) * (size[1] // 8)  # a tall input interpolates the position embeddings
        assert image_state.shape == (4, 1 + patches, 32)
        assert torch.equal(text_state, tokens["input_ids"])  # the ITM pass re-reads the caption
        assert model.has_itm
    else:
        assert image_state.shape == (4, 1, 16) and not model.has_itm
        assert text_state.shape[:2] == tokens["input_ids"].shape
    # the features depend on the input: different images and captions give different features
    assert (image_feat[0] - image_feat[1]).abs().max() > 1e-4
    assert (text_feat[0] - text_feat[1]).abs().max() > 1e-4


def test_blip_matches_transformers_forward():
    model, cfg = _build("blip")
    model.eval()
    images, tokens = _inputs(cfg)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert (mask == 0).any()  # captions of different lengths: padding must be masked
    with torch.no_grad():
        image_state, image_feat = model.encode_image(images)
        text_state, text_feat = model.encode_text(ids, mask)
        ours = model.itm_score(image_state, text_state, mask)
        logits = model.model(input_ids=ids, pixel_values=images, use_itm_head=True, attention_mask=mask).itm_score
        itc = model.model(input_ids=ids, pixel_values=images, use_itm_head=False, attention_mask=mask).itm_score
        shuffled = model.itm_score(image_state.roll(1, 0), text_state, mask)
    torch.testing.assert_close(ours, logits[:, 1] - logits[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_feat @ text_feat.T, itc, rtol=1e-5, atol=1e-5)
    assert (ours - shuffled).abs().max() > 1e-4  # the score depends on which image a caption meets


def test_clip_matches_transformers_forward():
    model, cfg = _build("clip")
    model.eval()
    images, tokens = _inputs(cfg)
    with torch.no_grad():
        image_feat = model.encode_image(images)[1]
        text_feat = model.encode_text(tokens["input_ids"], tokens["attention_mask"])[1]
        out = model.model(input_ids=tokens["input_ids"], pixel_values=images, attention_mask=tokens["attention_mask"])
    torch.testing.assert_close(
        text_feat @ image_feat.T, out.logits_per_text / model.model.logit_scale.exp(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(model.temp.detach(), 1 / model.model.logit_scale.detach().exp())
    with pytest.raises(TpasError, match="no ITM head"):
        model.itm_logits(image_feat[:, None], image_feat[:, None], tokens["attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_changes_weights(family):
    model, cfg = _build(family)
    model.train()
    images, tokens = _inputs(cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.param_groups(0.01, 1e-3, 2.0), lr=1e-3)
    out = model(images, tokens["input_ids"], tokens["attention_mask"])
    assert torch.isfinite(out["loss"])
    if family == "blip":
        assert out["loss_itm"] > 0
    else:
        assert out["loss_itm"] == 0 and torch.equal(out["loss"], out["loss_itc"])
    out["loss"].backward()
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert "temp" in changed
    assert any(n.startswith("model.vision_model.") for n in changed)
    assert any(n.startswith("model.text_model." if family == "clip" else "model.text_encoder.") for n in changed)
    if family == "blip":
        assert {"model.itm_head.weight", "model.vision_proj.weight", "model.text_proj.weight"} <= changed
        assert model.new_parameter_names() == ["temp"]
    else:
        assert "model.logit_scale" not in changed  # replaced by temp
        assert model.new_parameter_names() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpointing_gives_the_same_gradients(family):
    model, cfg = _build(family)
    model.train()
    images, tokens = _inputs(cfg)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(3)  # the ITM negatives are sampled
        model(images, tokens["input_ids"], tokens["attention_mask"])["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.model.is_activation_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_end_to_end(family):
    model, cfg = _build(family)
    model.eval()
    images, _ = _inputs(cfg, n=4)
    tokenizer = M.build_tokenizer(cfg)
    with torch.no_grad():
        image_state, image_feat = model.encode_image(images)
    use_itm = model.has_itm
    ranked = retrieval.rank(
        model,
        TextPipeline(tokenizer, max_tokens=cfg.max_tokens),
        CAPTIONS,
        image_feat,
        image_state,
        k=3,
        use_itm=use_itm,
        itc_weight=2.0,
        text_batch=2,
        itm_batch=4,
        progress=False,
    )
    assert ranked["index"].shape == (4, 3)
    assert all(len(set(row)) == 3 for row in ranked["index"])
    if use_itm:
        assert np.isfinite(ranked["itm"]).all()
        np.testing.assert_allclose(ranked["score"], ranked["itm"] + 2.0 * ranked["itc"], rtol=1e-5, atol=1e-5)
        # the ITM column is the model's score for that (caption, image) pair
        tokens = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(CAPTIONS[:1])
        with torch.no_grad():
            direct = model.itm_score(
                image_state[ranked["index"][0]], tokens["input_ids"].repeat(3, 1), tokens["attention_mask"].repeat(3, 1)
            )
        np.testing.assert_allclose(ranked["itm"][0], direct.numpy(), rtol=1e-4, atol=1e-5)
    else:
        assert np.isnan(ranked["itm"]).all()
        assert (np.diff(ranked["itc"], axis=1) <= 0).all()
    text_feat = model.encode_text(**TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(CAPTIONS))[1].detach()
    np.testing.assert_allclose(
        ranked["itc"],
        np.take_along_axis((text_feat @ image_feat.T).numpy(), ranked["index"], axis=1),
        rtol=1e-5,
        atol=1e-6,
    )


def _save_hf_dir(model: M.RetrievalModel, cfg: M.ModelConfig, folder: Path) -> Path:
    model.model.save_pretrained(folder)
    M.build_tokenizer(cfg).save_pretrained(folder)  # the packaged MiniLM one the random model reads
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_build_from_local_dir(family, tmp_path):
    model, cfg = _build(family)
    folder = _save_hf_dir(model, cfg, tmp_path / "hf")
    loaded_cfg = _config(family, hf_model=str(folder), hf_config=None, embed_dim=999)
    torch.manual_seed(123)  # a different seed: every weight must come from the dir
    loaded = M.build_model(loaded_cfg).eval()
    model.eval()
    assert loaded_cfg.hf_config is not None and loaded_cfg.embed_dim == 16
    assert loaded.new_parameter_names() == (["temp"] if family == "blip" else [])
    images, tokens = _inputs(loaded_cfg)  # the tokenizer now comes from the dir
    with torch.no_grad():
        for a, b in zip(model.encode_image(images), loaded.encode_image(images)):
            torch.testing.assert_close(a, b)
        for a, b in zip(model.encode_text(**tokens), loaded.encode_text(**tokens)):
            torch.testing.assert_close(a, b)
    if family == "clip":
        torch.testing.assert_close(loaded.temp, model.temp)


def test_missing_checkpoint_weights_are_new(tmp_path):
    model, cfg = _build("blip")
    folder = _save_hf_dir(model, cfg, tmp_path / "hf")
    weights = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("itm_head.")},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    loaded = M.build_model(_config("blip", hf_model=str(folder), hf_config=None))
    assert loaded.new_parameter_names() == ["temp", "model.itm_head.weight", "model.itm_head.bias"]
    names = {g["name"] for g in loaded.param_groups(0.01, 1e-4, 5.0)}
    assert {"new", "new_no_decay", "pretrained"} <= names


def test_zero_shot_reranks_only_with_a_pretrained_itm_head(tmp_path):
    model, cfg = _build("blip")
    folder = _save_hf_dir(model, cfg, tmp_path / "hf")
    zero_shot = retrieval.InferConfig(zero_shot=True, model="blip-itm", hf_model=str(folder))
    loaded, loaded_cfg, _ = retrieval._load_model(zero_shot)  # --hf-model reaches the preset
    assert loaded_cfg.hf_model == str(folder) and loaded.itm_pretrained
    assert retrieval.uses_itm(zero_shot, loaded, loaded_cfg)
    assert not retrieval.uses_itm(dataclasses.replace(zero_shot, itm=False), loaded, loaded_cfg)
    assert not model.itm_pretrained and not retrieval.uses_itm(zero_shot, model, cfg)  # random weights
    assert retrieval.uses_itm(dataclasses.replace(zero_shot, zero_shot=False), model, cfg)  # a trained run's head
    weights = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("itm_head.")},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    headless = M.build_model(_config("blip", hf_model=str(folder), hf_config=None))
    assert not headless.itm_pretrained and not retrieval.uses_itm(zero_shot, headless, cfg)
    clip, clip_cfg = _build("clip")
    assert not retrieval.uses_itm(dataclasses.replace(zero_shot, zero_shot=False), clip, clip_cfg)


def test_wrong_checkpoint_type_is_a_clear_error(tmp_path):
    model, cfg = _build("clip")
    folder = _save_hf_dir(model, cfg, tmp_path / "clip")
    with pytest.raises(TpasError, match="a 'clip' model, but family 'blip'"):
        M.build_model(_config("blip", hf_model=str(folder), hf_config=None))


def test_max_tokens_beyond_positions_is_a_clear_error():
    with pytest.raises(TpasError, match="max_tokens 78 exceeds"):
        _build("clip", max_tokens=78)


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_run_reloads_without_the_hf_dir(family, tmp_path):
    model, cfg = _build(family)
    folder = _save_hf_dir(model, cfg, tmp_path / "hf")
    # a "run": built from the local dir (as training does), one step, weights + config.json saved
    run_cfg = _config(family, hf_model=str(folder), hf_config=None)
    trained = M.build_model(run_cfg)
    images, tokens = _inputs(run_cfg)
    optimizer = torch.optim.AdamW(trained.param_groups(0.0, 1e-2), lr=1e-2)
    trained(images, tokens["input_ids"], tokens["attention_mask"])["loss"].backward()
    optimizer.step()
    run = tmp_path / "run"
    write_json(run / "config.json", {"train": {}, "model": dataclasses.asdict(run_cfg)})
    save_weights(trained, run / "model.safetensors")
    shutil.rmtree(folder)  # the rebuild must need neither the weights nor the config of the hf dir

    reloaded, reloaded_cfg = load_run_model(run)
    trained.eval()
    assert reloaded_cfg.hf_model == str(folder) and reloaded_cfg.hf_config == run_cfg.hf_config
    torch.testing.assert_close(reloaded.temp, trained.temp)
    with torch.no_grad():
        for a, b in zip(trained.encode_image(images), reloaded.encode_image(images)):
            torch.testing.assert_close(a, b)
        for a, b in zip(trained.encode_text(**tokens), reloaded.encode_text(**tokens)):
            torch.testing.assert_close(a, b)
        if family == "blip":
            state, _ = trained.encode_image(images)
            torch.testing.assert_close(
                trained.itm_score(state, tokens["input_ids"], tokens["attention_mask"]),
                reloaded.itm_score(state, tokens["input_ids"], tokens["attention_mask"]),
            )


@pytest.mark.parametrize("preset", ["blip-itm", "clip"])
def test_offline_hub_name_fails_fast(preset, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    cfg = M.ModelConfig.from_preset(preset)
    if isinstance(try_to_load_from_cache(cfg.hf_model, "config.json"), str):
        pytest.skip(f"{cfg.hf_model} is in this machine's hub cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(TpasError, match="--hf-model"):
        M.build_model(cfg)
    with pytest.raises(TpasError, match="--hf-model"):
        M.build_tokenizer(cfg)
    assert time.monotonic() - started < 10


def test_missing_local_dir_and_no_source_are_clear_errors(tmp_path):
    with pytest.raises(TpasError, match="no-such-dir"):
        M.build_model(_config("blip", hf_model=str(tmp_path / "no-such-dir"), hf_config=None))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TpasError, match="no config.json"):
        M.build_model(_config("clip", hf_model=str(empty), hf_config=None))
    with pytest.raises(TpasError, match="needs hf_model"):
        M.build_model(_config("clip", hf_config=None))


def test_incomplete_local_dir_is_a_clear_error(tmp_path):
    model, cfg = _build("clip")
    folder = _save_hf_dir(model, cfg, tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    with pytest.raises(TpasError, match="complete save_pretrained"):
        M.build_model(_config("clip", hf_model=str(folder), hf_config=None))
