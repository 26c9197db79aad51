"""The model module: pretrained weight mapping (proven on a real photo), fusion init, losses,
optimisation groups, config round-trip, padding masks, and the real default preset offline."""

import dataclasses
import json
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_sample_image
from torchvision import transforms as T

from tpas import models as M
from tpas.errors import TpasError
from tpas.models import backbones, losses
from tpas.models.convert import efficientnet as E
from tpas.models.text import TextPipeline

# ImageNet classes of palace/temple-like buildings. The mapped model's top-5 for china.jpg (a
# Chinese temple) is [698 palace, 442 bell cote, 663 monastery, 975 lakeside, 449 boathouse].
PALACE_LIKE = {
    698: "palace",
    663: "monastery",
    442: "bell cote",
    497: "church",
    538: "dome",
    483: "castle",
    832: "stupa",
}

CAPTIONS = [
    "a man in a red jacket lying on the pavement",
    "a woman in a blue coat running across the street",
    "a child with a yellow backpack falling off a bike",
    "an old man in a grey suit walking with a cane",
]
HARD_CAPTIONS = [
    "a man in a red jacket walking on the pavement",
    "a woman in a blue coat standing on the street",
    "a child with a yellow backpack riding a bike",
    "an old man in a grey suit lying on the ground",
]


def _imagenet_input() -> torch.Tensor:
    photo = Image.fromarray(load_sample_image("china.jpg"))
    prep = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(M.IMAGE_MEAN, M.IMAGE_STD),
        ]
    )
    return prep(photo)[None]


def _top5(net: torch.nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return net.eval()(x).topk(5, dim=1).indices[0].tolist()


# ---------------------------------------------------------------- EfficientNet weights


def test_mapped_efficientnet_classifies_a_real_photo():
    x = _imagenet_input()
    net = timm.create_model(M.ModelConfig().image_backbone, pretrained=False)
    torch.manual_seed(0)
    random_net = timm.create_model(M.ModelConfig().image_backbone, pretrained=False)
    E.load_efficientnet_lite0_weights(net)

    top5 = _top5(net, x)
    print("mapped top-5:", top5, [PALACE_LIKE.get(i, "?") for i in top5])
    assert top5[0] in PALACE_LIKE
    assert len(PALACE_LIKE.keys() & set(top5)) >= 2

    random_top5 = _top5(random_net, x)
    print("random top-5:", random_top5)
    assert not PALACE_LIKE.keys() & set(random_top5)


def test_image_normalisation_fits_the_weights():
    """The stem BatchNorm's running variance matches real-photo statistics under IMAGE_MEAN/STD,
    not under the usual ImageNet mean/std (which these TF-ported weights do not expect)."""
    net = timm.create_model(M.ModelConfig().image_backbone, pretrained=False)
    E.load_efficientnet_lite0_weights(net)
    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]

    def mismatch(mean, std) -> float:
        prep = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
        with torch.no_grad():
            stem = net.conv_stem(torch.stack([prep(p) for p in photos]))
        var, running = stem.var((0, 2, 3)), net.bn1.running_var
        live = (running > 1e-2) & (var > 1e-6)
        return (var[live] / running[live]).log().abs().mean().item()

    ours = mismatch(M.IMAGE_MEAN, M.IMAGE_STD)
    imagenet = mismatch((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert ours < 0.6
    assert imagenet > 1.2


@pytest.mark.parametrize("backbone", E.PRETRAINED_BACKBONES)
def test_efficientnet_key_map_is_complete(backbone):
    source = torch.load(E.packaged_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    net = timm.create_model(backbone, pretrained=False)
    mapping = E.efficientnet_lite0_key_map(list(source), net)
    assert set(mapping) == set(source)
    assert set(mapping.values()) == set(net.state_dict())
    assert len(set(mapping.values())) == len(mapping) == 296
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"
    assert mapping["_blocks.3._expand_conv.weight"] == "blocks.2.0.conv_pw.weight"

    with pytest.raises(TpasError, match="_blocks.0._se_reduce.weight"):
        E.efficientnet_lite0_key_map([*source, "_blocks.0._se_reduce.weight"], net)


def test_pretrained_needs_a_matching_backbone():
    with pytest.raises(TpasError, match="packaged weights"):
        backbones.build_image_encoder(M.ModelConfig(image_backbone="resnet18"))


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_cfg() -> M.ModelConfig:
    return M.ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    return M.build_tokenizer(tiny_cfg)


def _tiny(cfg: M.ModelConfig, seed: int = 0) -> M.XVLMModel:
    torch.manual_seed(seed)
    return M.build_model(cfg)


def _batch(cfg, tokenizer, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(CAPTIONS)
    hard = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(HARD_CAPTIONS)
    return {
        "images": torch.randn(4, 3, *cfg.image_size, generator=gen),
        **tokens,
        "hard_images": torch.randn(4, 3, *cfg.image_size, generator=gen),
        "hard_input_ids": hard["input_ids"],
        "hard_attention_mask": hard["attention_mask"],
    }


def _plain(batch: dict) -> tuple:
    return batch["images"], batch["input_ids"], batch["attention_mask"]


def test_forward_and_backward_reach_every_parameter(tiny_cfg, tokenizer):
    model = _tiny(tiny_cfg).train()
    out = model(*_plain(_batch(tiny_cfg, tokenizer)))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_word"}
    assert all(torch.isfinite(v) for v in out.values()) and out["loss_word"] == 0  # no word head attached
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert any(".crossattention." in n for n, _ in model.named_parameters())


def test_training_steps_reduce_the_loss(tiny_cfg, tokenizer):
    model = _tiny(tiny_cfg).train()
    batch = _plain(_batch(tiny_cfg, tokenizer))

    def loss_now() -> float:
        # train mode (batch-statistics BatchNorm), with the same dropout masks and ITM negatives each time
        torch.manual_seed(5)
        with torch.no_grad():
            return model(*batch)["loss"].item()

    before = loss_now()
    optimizer = torch.optim.AdamW(model.param_groups(0.01, 1e-3), lr=1e-3)
    for _ in range(8):
        optimizer.zero_grad()
        model(*batch)["loss"].backward()
        optimizer.step()
    after = loss_now()
    assert after < before * 0.6, (before, after)


def test_hard_negatives(tiny_cfg, tokenizer):
    model = _tiny(tiny_cfg).eval()
    batch = _batch(tiny_cfg, tokenizer)
    torch.manual_seed(3)
    plain = model(*_plain(batch))
    torch.manual_seed(3)
    hard = model(
        *_plain(batch),
        hard_images=batch["hard_images"],
        hard_input_ids=batch["hard_input_ids"],
        hard_attention_mask=batch["hard_attention_mask"],
    )
    assert all(torch.isfinite(v) for v in hard.values())
    assert hard["loss_itc"] > plain["loss_itc"]  # extra negative columns only add probability mass
    assert hard["loss_itm"] != plain["loss_itm"]
    hard["loss"].backward()
    with pytest.raises(ValueError, match="go together"):
        model(*_plain(batch), hard_input_ids=batch["hard_input_ids"])


def test_duplicates_are_never_negatives(tiny_cfg, tokenizer):
    tokens = TextPipeline(tokenizer, max_tokens=70)([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[2]])
    positive = losses.positive_pairs(tokens["input_ids"], tokens["attention_mask"], None)
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True
    assert torch.equal(positive, expected)
    positive = losses.positive_pairs(tokens["input_ids"], tokens["attention_mask"], torch.tensor([7, 8, 9, 8]))
    assert positive[1, 3] and positive[3, 1] and positive[0, 2]

    # a batch of one (nothing to sample) and a batch of identical captions still train
    model = _tiny(tiny_cfg)
    images = torch.randn(2, 3, *tiny_cfg.image_size)
    same = TextPipeline(tokenizer, max_tokens=70)([CAPTIONS[0]] * 2)
    for out in (
        model(images[:1], same["input_ids"][:1], same["attention_mask"][:1]),
        model(images, same["input_ids"], same["attention_mask"]),
    ):
        assert torch.isfinite(out["loss"])


def test_encoders_and_itm_score(tiny_cfg, tokenizer):
    model = _tiny(tiny_cfg).eval()
    batch = _batch(tiny_cfg, tokenizer)
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(batch["images"])
        text_embeds, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        h, w = tiny_cfg.image_size[0] // 32, tiny_cfg.image_size[1] // 32
        assert image_embeds.shape == (4, 1 + h * w, 32)
        assert text_embeds.shape == (4, batch["input_ids"].shape[1], 32)
        for feat in (image_feat, text_feat):
            assert feat.shape == (4, tiny_cfg.embed_dim)
            assert torch.allclose(feat.norm(dim=-1), torch.ones(4), atol=1e-5)
        # re-ranking: one caption against every image, pairs row-aligned
        q = torch.zeros(4, dtype=torch.long)
        scores = model.itm_score(image_embeds, text_embeds[q], batch["attention_mask"][q])
        assert scores.shape == (4,) and torch.isfinite(scores).all()
        with pytest.raises(ValueError, match="built for"):
            model.encode_image(torch.randn(1, 3, 128, 64))


def test_padding_mask_hides_padded_tokens(tiny_cfg, tokenizer):
    model = _tiny(tiny_cfg).eval()
    batch = _batch(tiny_cfg, tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    scribbled = ids.masked_fill(mask == 0, 2023)  # a real word where the padding was
    with torch.no_grad():
        image_embeds, _ = model.encode_image(batch["images"])
        ref_embeds, ref_feat = model.encode_text(ids, mask)
        new_embeds, new_feat = model.encode_text(scribbled, mask)
        assert torch.allclose(ref_feat, new_feat, atol=1e-6)
        assert torch.allclose(ref_embeds[mask.bool()], new_embeds[mask.bool()], atol=1e-5)
        ref_score = model.itm_score(image_embeds, ref_embeds, mask)
        assert torch.allclose(ref_score, model.itm_score(image_embeds, new_embeds, mask), atol=1e-5)
        # and the mask matters: unmasking the scribbled tokens changes the result
        _, unmasked_feat = model.encode_text(scribbled, torch.ones_like(mask))
        assert not torch.allclose(ref_feat, unmasked_feat, atol=1e-4)
        assert not torch.allclose(
            ref_score, model.itm_score(image_embeds, new_embeds, torch.ones_like(mask)), atol=1e-4
        )


def test_param_groups(tiny_cfg):
    model = _tiny(tiny_cfg)
    groups = model.param_groups(weight_decay=0.05, lr=1e-4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert len(seen) == len(set(seen))
    names = {id(p): n for n, p in model.named_parameters()}
    new = set(model.new_parameter_names())
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == pytest.approx(2e-4 if name in new else 1e-4), name
            no_decay = p.ndim <= 1 or name == "image_pos_embed"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert "temp" in new and "itm_head.weight" in new and "fusion.0.crossattention.self.query.weight" in new
    assert "fusion.0.attention.self.query.weight" not in new and "image_encoder.conv_stem.weight" not in new
    assert model.new_parameter_names() == _tiny(tiny_cfg, seed=9).new_parameter_names()


def test_config_round_trip_and_determinism(tiny_cfg, tmp_path):
    text = json.dumps(dataclasses.asdict(tiny_cfg))
    restored = M.ModelConfig.from_dict(json.loads(text))
    assert restored == tiny_cfg and isinstance(restored.image_size, tuple)
    a, b = _tiny(tiny_cfg), _tiny(restored)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert M.ModelConfig.from_dict(dataclasses.asdict(M.ModelConfig())) == M.ModelConfig()
    # a run dir stores the state dict as safetensors and rebuilds without pretrained weights
    save_file(a.state_dict(), str(tmp_path / "model.safetensors"))
    c = _tiny(restored, seed=3)
    c.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(TpasError, match="unknown keys"):
        M.ModelConfig.from_dict({**json.loads(text), "vision_width": 3})
    with pytest.raises(TpasError, match="preset"):
        M.ModelConfig(preset="huge")


def test_fusion_layers_start_as_the_text_models_top_layers(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, fusion_layers=2)
    model = _tiny(cfg)
    for fusion_layer, bert_layer in zip(model.fusion, model.text_encoder.encoder.layer[-2:]):
        fusion_state = fusion_layer.state_dict()
        for key, value in bert_layer.state_dict().items():
            assert torch.equal(fusion_state[key], value), key
        assert not torch.equal(
            fusion_state["crossattention.self.query.weight"], fusion_state["attention.self.query.weight"]
        )
    with pytest.raises(TpasError, match="only 2 layers"):
        M.build_model(dataclasses.replace(tiny_cfg, fusion_layers=3))


def test_tokenize_and_image_transform(tiny_cfg, tokenizer):
    tokens = TextPipeline(tokenizer, max_tokens=6)(["a man", "a man in a red jacket lying on the pavement"])
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].shape == (2, 6) and tokens["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert TextPipeline(tokenizer, max_tokens=70)(["a man", "a woman"])["input_ids"].shape == (2, 4)  # longest, not max

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 120, 3), dtype=np.uint8))
    for train in (False, True):
        x = M.image_transform(tiny_cfg, train=train)(photo)
        assert x.shape == (3, *tiny_cfg.image_size) and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    eval_tf = M.image_transform(tiny_cfg, train=False)
    assert torch.equal(eval_tf(photo), eval_tf(photo))


# ---------------------------------------------------------------- the real default preset


def test_default_preset_builds_offline_and_trains():
    cfg = M.ModelConfig()
    torch.manual_seed(0)
    model = M.build_model(cfg)
    tokenizer = M.build_tokenizer(cfg)
    # pretrained on both sides: the image weights are the package's, the text ones MiniLM's
    source = torch.load(E.packaged_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.image_encoder.conv_stem.weight, source["_conv_stem.weight"])
    assert model.text_encoder.config.hidden_size == 384 and len(model.fusion) == 2
    # what a trained run rebuilds before loading its own weights has the very same tensors
    bare = M.build_model(dataclasses.replace(cfg, image_pretrained=False, text_pretrained=False))
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    model.train()
    tokens = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(CAPTIONS[:2])
    out = model(torch.randn(2, 3, *cfg.image_size), tokens["input_ids"], tokens["attention_mask"])
    assert torch.isfinite(out["loss"])

    tokens = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)((CAPTIONS * 4)[:16])
    images = torch.randn(16, 3, *cfg.image_size)
    image_ids = torch.arange(16) % 4  # the repeated captions belong to the repeated images
    start = time.perf_counter()
    out = model(images, tokens["input_ids"], tokens["attention_mask"], image_ids=image_ids)
    out["loss"].backward()
    print(
        f"default preset fwd+bwd, batch 16 at {cfg.image_size}: {time.perf_counter() - start:.2f}s "
        f"on {torch.get_num_threads()} threads"
    )
    assert torch.isfinite(out["loss"])


def test_image_stage_takes_an_earlier_feature_map_with_more_tokens():
    cfg = M.ModelConfig.from_preset("tiny")
    final = M.build_model(cfg)
    earlier = M.build_model(dataclasses.replace(cfg, image_stage=4))  # Lite0 stage 4: stride 16, 112 channels
    assert final.image_grid == (2, 1) and earlier.image_grid == (4, 2)
    assert earlier.image_proj.in_features == 112 and not isinstance(
        earlier.image_encoder.conv_head, type(final.image_encoder.conv_head)
    )
    embeds, feat = earlier.encode_image(torch.randn(2, 3, *cfg.image_size))
    assert embeds.shape[1] == 1 + 4 * 2 and feat.shape == (2, cfg.embed_dim)
    with pytest.raises(TpasError, match="image_stage must be 0..6"):
        M.build_model(dataclasses.replace(cfg, image_stage=7))
    with pytest.raises(TpasError, match="needs a timm EfficientNet-style backbone"):
        M.build_model(dataclasses.replace(M.ModelConfig.from_preset("xvlm-tiny"), image_stage=1))


def test_word_vocab_counts_each_caption_once_and_drops_special_and_rare_pieces():
    ids = [[101, 7, 7, 9, 102], [101, 7, 8, 102], [101, 8, 9, 102], [101, 5, 102]]
    assert losses.word_vocab(ids, {101, 102}, min_count=2).tolist() == [7, 8, 9]
    assert losses.word_vocab(ids, {101, 102}, min_count=1).tolist() == [5, 7, 8, 9]
    assert losses.word_vocab(ids, {101, 102}, min_count=3).tolist() == []


def test_word_head_targets_and_loss():
    head = losses.WordHead(4, torch.tensor([7, 8, 9]))
    input_ids = torch.tensor([[101, 7, 7, 9, 0], [101, 8, 102, 9, 0], [101, 5, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    target = head.targets(input_ids, mask)
    # distinct in-vocabulary pieces, uniform; padding (the 9 of row 1) and unknown ids (5) ignored
    assert torch.equal(target, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    feat = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    log_p = torch.log_softmax(head.proj(feat), dim=1)
    expected = torch.stack([-(log_p[0, 0] + log_p[0, 2]) / 2, -log_p[1, 1]]).mean()  # row 2 has no words
    assert torch.allclose(head(feat, input_ids, mask), expected)


def test_an_attached_word_head_adds_its_weighted_loss_and_trains_as_new(tiny_cfg, tokenizer):
    batch = _plain(_batch(tiny_cfg, tokenizer))
    model = _tiny(tiny_cfg).eval()
    torch.manual_seed(3)
    plain = model(*batch)
    model.attach_word_head(losses.WordHead(tiny_cfg.embed_dim, torch.arange(1000, 1100)), 0.5)
    torch.manual_seed(3)
    out = model(*batch)
    assert out["loss_word"] > 0 and torch.allclose(out["loss_itc"], plain["loss_itc"])
    assert torch.allclose(out["loss"], plain["loss"] + 0.5 * out["loss_word"])
    # its gradient reaches the image side: the word loss alone moves the image projection
    model.zero_grad()
    out["loss_word"].backward()
    assert model.word_head.proj.weight.grad.abs().sum() > 0
    assert model.vision_proj.weight.grad.abs().sum() > 0
    assert {"word_head.proj.weight", "word_head.proj.bias"} <= set(model.new_parameter_names())
