"""Locked towers and cached features: the pyramid image tokens, lock_image / lock_text_layers,
training on a FeatureCache, ITM on part of the batch, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import TINY_TRAIN, write_coloured_train
from safetensors.torch import load_file

from tpas import models as model_lib
from tpas.data import load_rgb, load_train_annotations, resolve_image
from tpas.errors import TpasError
from tpas.models import xvlm
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime
from tpas.train import TrainConfig, train
from tpas.train import features as feature_lib
from tpas.train.data import PairDataset

LOCKED = {
    "image_tokens": "pyramid",
    "image_stages": (2, 4, -1),
    "image_grid": (4, 2),
    "image_layers": 1,
    "lock_image": True,
    "lock_text_layers": 1,
}
CAPTIONS = ["a man in a red jacket is lying", "a woman in blue is walking", "a man in green runs", "a girl falls"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, **overrides) -> model_lib.RetrievalModel:
    torch.manual_seed(seed)
    return model_lib.build_model(model_lib.ModelConfig.from_preset("tiny", **{**LOCKED, **overrides}))


def _tokens(model: model_lib.RetrievalModel, captions: list[str]) -> dict[str, torch.Tensor]:
    return TextPipeline(model_lib.build_tokenizer(model.cfg), max_tokens=70)(captions)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def test_cached_parts_compose_to_the_full_encoders() -> None:
    model = _model().eval()
    images, tokens = _images(3), _tokens(model, CAPTIONS[:3])
    features = model.image_features(images)
    assert features.shape[1] == 4 * 2  # one token per grid cell
    assert torch.equal(model.encode_image(images)[1], model.encode_image_features(features)[1])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    states = model.text_states(ids, mask)
    full, feat = model.encode_text(ids, mask)
    assert torch.equal(model.encode_text_states(states, mask)[0], full)
    # the layer-by-layer path is the BertModel's own: the same weights unlocked give the same states
    unlocked = _model(lock_text_layers=0).eval()
    unlocked.load_state_dict(model.state_dict())
    assert torch.allclose(unlocked.encode_text(ids, mask)[0], full, atol=1e-5)


def test_locked_parts_get_no_gradient_and_keep_their_batchnorm_statistics() -> None:
    model = _model().train()
    assert not model.image_encoder.training and not model.text_encoder.embeddings.training
    assert not model.text_encoder.encoder.layer[0].training and model.text_encoder.encoder.layer[1].training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grouped = {id(p) for group in model.param_groups(0.01, 1e-3) for p in group["params"]}
    assert not grouped & {id(p) for p in model.image_encoder.parameters()}
    assert "image_layers.0.linear1.weight" in model.new_parameter_names()
    tokens = _tokens(model, CAPTIONS)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_images(4), tokens["input_ids"], tokens["attention_mask"])["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    image_keys = [k for k in after if k.startswith("image_encoder.")]
    assert any("running_mean" in k for k in image_keys)
    assert all(torch.equal(after[k], before[k]) for k in image_keys)  # BatchNorm statistics too
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("text_encoder.embeddings."))
    assert not torch.equal(after["image_proj.weight"], before["image_proj.weight"])


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pixel_stem": 2}, {"tune_from": 2}, {"tune_from": 3, "pixel_stem": 2}],
    ids=["pyramid", "pixel-stem", "tune-from", "tune-from-and-pixel-stem"],
)
def test_a_step_on_cached_features_equals_a_step_on_pixels(overrides: dict) -> None:
    model = _model(**overrides)
    images, tokens = _images(4), _tokens(model, CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        features, states = model.image_features(images), model.text_states(ids, mask)
    torch.manual_seed(3)
    from_pixels = model(images, ids, mask)["loss"]
    torch.manual_seed(3)  # the same dropout masks and ITM negative draws
    from_cache = model(None, ids, mask, image_features=features, text_states=states)["loss"]
    assert from_cache.item() == pytest.approx(from_pixels.item(), abs=1e-6)


def test_pixel_stem_trains_on_the_raw_pixels_beside_the_locked_tower() -> None:
    model = _model(pixel_stem=2).train()
    images, tokens = _images(4), _tokens(model, CAPTIONS)
    features = model.image_features(images)
    cell_pixels = 3 * (64 // 4) * (32 // 2)
    # the raw pixels ride beside each cell's features, so a cache of features holds them too
    assert torch.equal(xvlm._from_cells(features[..., -cell_pixels:], (4, 2), (3, 64, 32)), images)
    model(images, tokens["input_ids"], tokens["attention_mask"])["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pixel_stem.parameters())
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert "pixel_stem.0.weight" in model.new_parameter_names()
    # what the stem reads changes the image feature even where the frozen tower's part is the same
    model.eval()
    pixels = features.clone()
    pixels[..., -cell_pixels:] += 0.5 * torch.randn_like(pixels[..., -cell_pixels:])
    assert not torch.allclose(model.encode_image_features(features)[1], model.encode_image_features(pixels)[1])


def test_tune_from_trains_a_copy_of_the_towers_blocks_on_the_cached_prefix() -> None:
    model = _model(tune_from=2).train()
    encoder = model.image_encoder
    images, tokens = _images(4), _tokens(model, CAPTIONS)
    features = model.image_features(images)
    with torch.no_grad():
        prefix = encoder.blocks[1](encoder.blocks[0](encoder.bn1(encoder.conv_stem(images))))
    assert model.tuned_input_shape == tuple(prefix.shape[1:])
    # block 1's output rides beside the frozen stage (-1) cell by cell, so a cache of features holds it
    width = prefix[0].numel() // 8
    assert torch.allclose(xvlm._from_cells(features[..., -width:], (4, 2), model.tuned_input_shape), prefix)
    # the copy starts as the tower's own blocks 2..4 (the deepest stage read below -1), named as there
    copied = model.tuned_blocks.state_dict()
    assert len(model.tuned_blocks) == 3
    assert all(torch.equal(v, encoder.blocks[2:5].state_dict()[k]) for k, v in copied.items())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(images, tokens["input_ids"], tokens["attention_mask"])["loss"].backward()
    assert all(p.grad is not None for p in model.tuned_blocks.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert not any(name.startswith("tuned_blocks.") for name in model.new_parameter_names())  # pretrained: base lr
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    after = model.state_dict()
    stats = [k for k in after if k.startswith("tuned_blocks.") and "running_" in k]
    assert stats and all(torch.equal(after[k], before[k]) for k in stats)  # BatchNorm statistics frozen
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("image_encoder."))
    assert not torch.equal(after["tuned_blocks.2.0.conv_pw.weight"], before["tuned_blocks.2.0.conv_pw.weight"])
    # what the tuned blocks read changes the image feature even where the frozen stage is the same
    model.eval()
    moved = features.clone()
    moved[..., -width:] += 0.5 * torch.randn_like(moved[..., -width:])
    assert not torch.allclose(model.encode_image_features(features)[1], model.encode_image_features(moved)[1])


def test_the_tuned_copy_runs_in_fp32_on_a_cpu_under_bf16_autocast() -> None:
    model = _model(tune_from=2).eval()
    features = model.image_features(_images(2))
    seen = []
    model.tuned_blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image_features(features)
    width = model.tuned_cell_width
    with torch.no_grad():
        exact = model.tuned_blocks(xvlm._from_cells(features[..., -width:].float(), (4, 2), model.tuned_input_shape))
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], exact)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tune_from": 2, "image_tokens": "projected"}, "tune_from needs image_tokens pyramid"),
        ({"tune_from": -1}, "tune_from needs image_tokens pyramid and must be >= 0"),
        ({"tune_from": 5}, "tune_from=5 trains no stage"),
        ({"tune_from": 5, "image_stages": (2, 5), "image_grid": (3, 2)}, "is not a whole number of image_grid"),
    ],
)
def test_tune_from_refuses_what_it_cannot_train(overrides: dict, message: str) -> None:
    with pytest.raises(TpasError, match=message):
        _model(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"pixel_stem": 2, "image_tokens": "projected"}, {"pixel_stem": 2, "image_grid": (3, 2)}, {"pixel_stem": -1}],
)
def test_pixel_stem_refuses_what_it_cannot_read(overrides: dict) -> None:
    with pytest.raises(TpasError, match="pixel_stem"):
        model_lib.ModelConfig.from_preset("tiny", **{**LOCKED, **overrides})


def test_itm_pairs_limits_the_fusion_rows() -> None:
    model = _model()
    tokens = _tokens(model, CAPTIONS)
    seen = []
    original = model.itm_logits

    def spy(image_state, text_state, text_mask):
        seen.append(len(image_state))
        return original(image_state, text_state, text_mask)

    model.itm_logits = spy
    model(_images(4), tokens["input_ids"], tokens["attention_mask"])
    model.itm_pairs = 2
    model(_images(4), tokens["input_ids"], tokens["attention_mask"])
    assert seen == [4 * 3, 2 * 3]  # positives, a negative image and a negative caption per pair


def _data(root: Path) -> Path:
    return write_coloured_train(root)


def _cfg(root: Path, runs: Path, **kw) -> TrainConfig:
    base = {
        **TINY_TRAIN,
        "data_root": root,
        "runs_dir": runs,
        "image_tokens": "pyramid",
        "image_stages": [2, 4, -1],
        "image_grid_rows": 4,
        "image_grid_cols": 2,
        "image_layers": 1,
        "lock_image": True,
        "lock_text_layers": 1,
        "pab_hard_negatives": True,
        "itm_pairs": 4,
        "warmup_steps": 2,
    }
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pixel_stem": 2},
        {"tune_from": 2},
        {"swap_negatives": 1.0},
        {"batch_clusters": 3, "cluster_group": 4},
        {"word_loss": 1.0},
        {"tower_warmup": 1},
        {"tower_warmup": 1, "tune_from": 2},
    ],
    ids=[
        "pyramid",
        "pixel-stem",
        "tune-from",
        "swap-negatives",
        "batch-clusters",
        "word-loss",
        "tower-warmup",
        "tower-warmup-tune-from",
    ],
)
def test_training_on_the_cache_resumes_exactly_and_saves_its_settings(tmp_path: Path, capsys, overrides: dict) -> None:
    root = write_coloured_train(tmp_path / "pab", caption="a man {i} in a red jacket and blue jeans is walking")
    train(_cfg(root, tmp_path, name="straight", **overrides))
    out = capsys.readouterr().out
    assert "cached the locked parts' outputs" in out
    assert ("hard captions are now their caption" in out) == bool(overrides.get("swap_negatives"))
    assert ("batch clusters: 3 clusters" in out) == bool(overrides.get("batch_clusters"))
    assert ("word loss: weight 1.0" in out) == bool(overrides.get("word_loss"))
    assert ("tower warm-up: 1 epoch(s)" in out) == bool(overrides.get("tower_warmup"))
    summary = json.loads((tmp_path / "straight/train_summary.json").read_text())
    assert ("tower_warmup" in summary) == bool(overrides.get("tower_warmup"))
    train(_cfg(root, tmp_path, name="cut", max_steps=3, **overrides))
    train(_cfg(root, tmp_path, name="cut", resume=True))
    straight, resumed = (
        load_file(str(tmp_path / "straight/model.safetensors")),
        load_file(str(tmp_path / "cut/model.safetensors")),
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    saved = json.loads((tmp_path / "straight/config.json").read_text())
    assert saved["model"]["image_stages"] == [2, 4, -1] and saved["model"]["lock_text_layers"] == 1
    assert saved["train"]["itm_pairs"] == 4 and saved["train"]["feature_cache"] == "auto"
    assert saved["model"]["pixel_stem"] == overrides.get("pixel_stem", 0)
    assert saved["model"]["tune_from"] == overrides.get("tune_from", 0)
    assert saved["train"]["swap_negatives"] == overrides.get("swap_negatives", 0.0)
    assert saved["train"]["batch_clusters"] == overrides.get("batch_clusters", 0)
    assert saved["train"]["word_loss"] == overrides.get("word_loss", 0.0)
    # the word head trains (it is in the checkpoint a resume reads) but is not part of the model
    checkpoint = load_file(str(tmp_path / "straight/checkpoint/model.safetensors"))
    assert any(k.startswith("word_head.") for k in checkpoint) == bool(overrides.get("word_loss"))
    assert not any(k.startswith("word_head.") for k in straight)
    # the warmed tower is what the run saved (and infer.py loads); without a warm-up it is the preset's
    torch.manual_seed(saved["train"]["seed"])  # as train.py builds it
    fresh = model_lib.build_model(model_lib.ModelConfig(**saved["model"])).state_dict()
    tower = [k for k in straight if k.startswith("image_encoder.") and straight[k].is_floating_point()]
    assert any(not torch.equal(straight[k], fresh[k]) for k in tower) == bool(overrides.get("tower_warmup"))
    # the run loads and ranks like any other (infer.py's path: pixels through the whole model)
    model = model_lib.load_run_model(tmp_path / "straight")[0]
    assert model.cfg.lock_image and model.encode_image(_images(2))[1].shape == (2, model.cfg.embed_dim)


def test_a_locked_run_without_the_cache_and_a_cache_with_nothing_locked(tmp_path: Path, capsys) -> None:
    root = _data(tmp_path / "pab")
    train(_cfg(root, tmp_path, name="none", feature_cache="none", max_steps=2))
    assert "cached" not in capsys.readouterr().out
    with pytest.raises(TpasError, match="needs a model with a locked part"):
        train(_cfg(root, tmp_path, name="bad", feature_cache="memory", lock_image=False, lock_text_layers=0))


def test_cached_flips_are_seeded_per_sample_and_match_the_model(tmp_path: Path) -> None:
    root = _data(tmp_path / "pab")
    model = _model().eval()
    frame = load_train_annotations(root)[0].head(6)
    transform = model_lib.image_transform(model.cfg, train=False)
    paths = list(frame["image"])
    cache = feature_lib.build_feature_cache(
        model,
        paths,
        list(frame["caption"]),
        root,
        transform,
        model_lib.build_text_pipeline(model.cfg),
        Runtime(),
        progress=False,
    )
    pixels = transform(load_rgb(resolve_image(root, paths[2])))[None]
    with torch.no_grad():
        assert torch.allclose(cache.images[2, 0].float(), model.image_features(pixels)[0], atol=1e-2, rtol=1e-3)
        assert torch.allclose(
            cache.images[2, 1].float(), model.image_features(pixels.flip(-1))[0], atol=1e-2, rtol=1e-3
        )
    pairs = feature_lib.CachedPairs(PairDataset(frame, root, transform, seed=0), cache)
    flips = [[pairs[(epoch, i)]["image_row"][1] for i in range(6)] for epoch in (0, 1)]
    assert flips == [[pairs[(epoch, i)]["image_row"][1] for i in range(6)] for epoch in (0, 1)]
    assert {f for row in flips for f in row} == {0, 1}


def test_auto_runs_the_locked_parts_when_the_cache_would_not_fit(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _data(tmp_path / "pab")
    monkeypatch.setattr(feature_lib, "machine_memory", lambda: 1000)  # bytes
    train(_cfg(root, tmp_path, name="big", max_steps=1))
    out = capsys.readouterr().out
    assert "too much for this machine's memory" in out and "cached the locked" not in out


def test_cached_text_with_images_decoded_each_step(tmp_path: Path, capsys) -> None:
    root = _data(tmp_path / "pab")
    train(_cfg(root, tmp_path, name="text", lock_image=False, max_steps=2))
    train(_cfg(root, tmp_path, name="text", lock_image=False, resume=True))
    train(_cfg(root, tmp_path, name="text-straight", lock_image=False))
    out = capsys.readouterr().out
    assert "cached the locked parts' outputs for 0 images" in out
    cut, straight = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("text", "text-straight"))
    assert all(torch.equal(cut[k], straight[k]) for k in straight)  # the seeded crops and flips replay


def test_cached_text_states_are_each_captions_own_whatever_the_batching(tmp_path: Path) -> None:
    # captions of very different lengths, cached in batches of 2 sorted by length: every row must
    # come back to its own caption, equal (to fp16) to that caption encoded alone
    model = _model(lock_image=False).eval()
    captions = [
        "a man walking",
        "a woman in a long red coat and blue jeans with a black backpack is lying on the pavement",
        "a boy running fast",
        "a tall man in a grey hoodie, black shorts and a white cap is waving at the camera in a park",
        "a girl sitting",
    ]
    text = model_lib.build_text_pipeline(model.cfg)
    cache = feature_lib.build_feature_cache(model, [], captions, tmp_path, None, text, Runtime(), batch_size=2)
    assert torch.equal(cache.input_ids, text(captions)["input_ids"])
    with torch.no_grad():
        for i, caption in enumerate(captions):
            alone = text([caption])
            n = int(alone["attention_mask"].sum())
            want = model.text_states(alone["input_ids"], alone["attention_mask"])[0, :n]
            assert torch.allclose(cache.states[i, :n].float(), want, atol=1e-2, rtol=1e-3)
            assert int(cache.attention_mask[i].sum()) == n
