"""The X-VLM presets and `--init` loading (tpas.models.convert.xvlm).

X-VLM's released checkpoints cannot be had offline, so the checkpoints here are written in their
exact layout (`to_xvlm`, independent of tpas.models.convert.xvlm' mapping): Microsoft's Swin names with
the patch merging at the END of a stage and the relative_position_index / attn_mask buffers
saved; BertForMaskedLM's `text_encoder.bert.*` whose top layers carry the cross-attention;
`itm_head.0/1/3`; the MLM and box heads X-VLM has and we do not use.
"""

import dataclasses
import hashlib
import re

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resize_rel_pos_bias_table

from tpas import models as M
from tpas.errors import TpasError
from tpas.models import backbones
from tpas.models.convert import xvlm as C
from tpas.models.text import TextPipeline

CAPTIONS = [
    "a man in a red jacket lying on the pavement",
    "a woman in a blue coat running across the street",
    "a child with a yellow backpack falling off a bike",
]
TINY_SWIN = {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}  # xvlm-tiny's, without the window


def _cfg(**overrides) -> M.ModelConfig:
    return M.ModelConfig.from_preset("xvlm-tiny", **overrides)


def _model(seed: int, cfg: M.ModelConfig | None = None) -> M.XVLMModel:
    torch.manual_seed(seed)
    return M.build_model(cfg or _cfg()).eval()


def to_xvlm(model: M.XVLMModel) -> dict[str, torch.Tensor]:
    """Our model's weights under X-VLM's checkpoint names (the inverse of the --init mapping)."""
    text_layers = len(model.text_encoder.encoder.layer)
    out = {}
    for name, value in model.state_dict().items():
        if name.startswith("image_encoder."):
            # timm merges patches at the START of stage N, Microsoft's Swin at the end of stage N-1
            rest = re.sub(
                r"^layers\.(\d+)\.downsample",
                lambda m: f"layers.{int(m[1]) - 1}.downsample",
                name[len("image_encoder.") :],
            )
            out[f"vision_encoder.{rest}"] = value.clone()
        elif name.startswith("text_encoder."):
            out[f"text_encoder.bert.{name[len('text_encoder.') :]}"] = value.clone()
        elif name.startswith("fusion."):
            index, rest = name[len("fusion.") :].split(".", 1)
            out[f"text_encoder.bert.encoder.layer.{text_layers + int(index)}.{rest}"] = value.clone()
        else:  # vision_proj, text_proj, itm_head.0/1/3, temp
            out[name] = value.clone()
    for name, buffer in model.image_encoder.named_buffers():  # persistent in Microsoft's Swin
        out[f"vision_encoder.{name}"] = buffer.clone()
    hidden = model.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    out["text_encoder.bert.embeddings.position_ids"] = torch.arange(512)[None]
    out["text_encoder.cls.predictions.bias"] = torch.zeros(30522)
    out["text_encoder.cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden, generator=gen)
    out["text_encoder.cls.predictions.decoder.weight"] = out["text_encoder.bert.embeddings.word_embeddings.weight"]
    out["bbox_head.0.weight"] = torch.randn(2 * hidden, hidden, generator=gen)
    out["bbox_head.3.weight"] = torch.randn(4, 2 * hidden, generator=gen)
    return out


def _save(tmp_path, state: dict, name: str = "xvlm.th") -> str:
    path = tmp_path / name
    torch.save({"model": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return M.build_tokenizer(_cfg())


@pytest.fixture(scope="module")
def source() -> M.XVLMModel:
    return _model(seed=0)


def _inputs(tokenizer, cfg: M.ModelConfig) -> tuple:
    tokens = TextPipeline(tokenizer, max_tokens=cfg.max_tokens)(CAPTIONS)
    images = torch.randn(len(CAPTIONS), 3, *cfg.image_size, generator=torch.Generator().manual_seed(3))
    return images, tokens["input_ids"], tokens["attention_mask"]


def _outputs(model: M.XVLMModel, images, ids, mask) -> list[torch.Tensor]:
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(images)
        text_embeds, text_feat = model.encode_text(ids, mask)
        return [image_embeds, image_feat, text_embeds, text_feat, model.itm_score(image_embeds, text_embeds, mask)]


def test_the_checkpoint_fixture_has_x_vlms_layout(source):
    state = to_xvlm(source)
    # Microsoft's Swin: stage 0 ends with the patch merging, the last stage has none; buffers saved
    assert "vision_encoder.layers.0.downsample.reduction.weight" in state
    assert not any(k.startswith("vision_encoder.layers.1.downsample") for k in state)
    assert "vision_encoder.layers.0.blocks.1.attn_mask" in state
    assert "vision_encoder.layers.1.blocks.0.attn.relative_position_index" in state
    # BERT: 2 text layers, then 2 layers whose cross-attention reads the Swin's 48-wide tokens
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight" not in state
    assert state["text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"].shape == (32, 48)
    assert state["text_encoder.bert.encoder.layer.3.crossattention.self.value.weight"].shape == (32, 48)
    assert state["itm_head.0.weight"].shape == (64, 32) and state["itm_head.1.weight"].shape == (64,)
    assert state["itm_head.3.weight"].shape == (2, 64) and state["vision_proj.weight"].shape == (16, 48)


def test_an_x_vlm_checkpoint_loads_completely_and_reproduces_the_model(source, tokenizer, tmp_path, capsys):
    path = _save(tmp_path, to_xvlm(source))
    target = _model(seed=1)
    before = _outputs(target, *_inputs(tokenizer, target.cfg))
    report = C.load_initial_weights(target, path)

    assert report["schema"] == "xvlm"
    assert report["unmapped"] == [] and report["missing"] == [] and report["interpolated"] == []
    assert report["counts"]["loaded"] == len(target.state_dict())
    buffers = {f"vision_encoder.{n}" for n, _ in source.image_encoder.named_buffers()}
    assert set(report["ignored"]) == buffers | {
        "text_encoder.bert.embeddings.position_ids",
        "text_encoder.cls.predictions.bias",
        "text_encoder.cls.predictions.transform.dense.weight",
        "text_encoder.cls.predictions.decoder.weight",
        "bbox_head.0.weight",
        "bbox_head.3.weight",
    }
    assert "WARNING" not in capsys.readouterr().out

    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in target.state_dict().items())
    after = _outputs(target, *_inputs(tokenizer, target.cfg))
    for got, want, old in zip(after, _outputs(source, *_inputs(tokenizer, source.cfg)), before):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(old, want, atol=1e-3)  # the load changed the model


def test_other_containers_and_our_own_runs(source, tmp_path):
    state = to_xvlm(source)
    # a raw state dict, DDP's module. prefix, and the other usual nesting keys
    torch.save(state, tmp_path / "raw.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.bin")
    for name in ("raw.pth", "ddp.bin"):
        target = _model(seed=2)
        assert C.load_initial_weights(target, tmp_path / name)["counts"]["missing"] == 0
        assert torch.equal(target.itm_head[3].weight, source.itm_head[3].weight)

    # a run dir of ours (model.safetensors in our names)
    run = tmp_path / "runs" / "pab"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(run / "model.safetensors"))
    target = _model(seed=2)
    report = C.load_initial_weights(target, run)
    assert report["schema"] == "tpas" and report["missing"] == [] and report["unmapped"] == []
    assert torch.equal(target.fusion[1].crossattention.self.key.weight, source.fusion[1].crossattention.self.key.weight)
    with pytest.raises(TpasError, match="without model.safetensors"):
        C.load_initial_weights(target, tmp_path / "runs")
    with pytest.raises(TpasError, match="unknown checkpoint type"):
        (tmp_path / "w.npz").write_bytes(b"x")
        C.load_initial_weights(target, tmp_path / "w.npz")


def test_relative_position_tables_are_interpolated_to_the_models_window(tokenizer, tmp_path):
    small = _model(seed=4, cfg=_cfg(image_backbone_kwargs={**TINY_SWIN, "window_size": 2}))
    state = to_xvlm(small)
    key = "vision_encoder.layers.1.blocks.1.attn.relative_position_bias_table"
    assert state[key].shape == (9, 4)  # (2 * 2 - 1) ** 2 positions, 4 heads
    target = _model(seed=5)  # window 4
    report = C.load_initial_weights(target, _save(tmp_path, state))

    tables = [
        f"image_encoder.{n}"
        for n, _ in target.image_encoder.named_parameters()
        if n.endswith("relative_position_bias_table")
    ]
    assert report["interpolated"] == sorted(tables) and len(tables) == 4
    assert report["unmapped"] == [] and report["missing"] == []
    table = target.image_encoder.layers[1].blocks[1].attn.relative_position_bias_table
    assert table.shape == (49, 4)
    assert torch.allclose(table, resize_rel_pos_bias_table(state[key], new_window_size=(4, 4), new_bias_shape=(49, 4)))
    assert not torch.allclose(table[:9], state[key])
    # everything else is copied as it is; the model runs
    assert torch.equal(
        target.image_encoder.layers[1].downsample.reduction.weight,
        small.image_encoder.layers[1].downsample.reduction.weight,
    )
    outputs = _outputs(target, *_inputs(tokenizer, target.cfg))
    assert all(torch.isfinite(t).all() for t in outputs)


def test_unmapped_and_missing_keys_are_reported_loudly(source, tmp_path, capsys):
    state = to_xvlm(source)
    state["vision_encoder.mystery.weight"] = torch.zeros(3)
    state["text_encoder.bert.encoder.layer.4.attention.self.query.weight"] = torch.zeros(32, 32)  # beyond 2 + 2
    del state["itm_head.3.bias"]
    target = _model(seed=6)
    keep = target.itm_head[3].bias.detach().clone()
    report = C.load_initial_weights(target, _save(tmp_path, state))
    assert report["unmapped"] == [
        "text_encoder.bert.encoder.layer.4.attention.self.query.weight",
        "vision_encoder.mystery.weight",
    ]
    assert report["missing"] == ["itm_head.3.bias"]
    assert torch.equal(target.itm_head[3].bias, keep)
    out = capsys.readouterr().out
    assert "WARNING" in out and "vision_encoder.mystery.weight" in out and "itm_head.3.bias" in out


def test_bad_checkpoints_are_refused(source, tmp_path):
    target = _model(seed=7)
    state = to_xvlm(source)
    # a pickle that is not weights only: never unpickled
    torch.save({"model": state, "args": _NotATensor(lr=3e-5)}, tmp_path / "pickle.th")
    with pytest.raises(TpasError, match="arbitrary pickles are never loaded"):
        C.load_initial_weights(target, tmp_path / "pickle.th")
    # a shape that no interpolation fixes names its key
    wrong = {**state, "vision_proj.weight": torch.zeros(16, 40)}
    with pytest.raises(TpasError, match=r"vision_proj\.weight"):
        C.load_initial_weights(target, _save(tmp_path, wrong))
    heads = {**state, "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(49, 3)}
    with pytest.raises(TpasError, match=r"layers\.0\.blocks\.0\.attn\.relative_position_bias_table"):
        C.load_initial_weights(target, _save(tmp_path, heads))
    # X-VLM weights into the lite/tiny layout
    with pytest.raises(TpasError, match="xvlm-base"):
        C.load_initial_weights(M.build_model(M.ModelConfig.from_preset("tiny")), _save(tmp_path, state))
    with pytest.raises(TpasError, match="no such checkpoint"):
        C.load_initial_weights(target, tmp_path / "absent.th")


@dataclasses.dataclass
class _NotATensor:
    lr: float


# ---------------------------------------------------------------- the presets


def test_xvlm_tiny_trains_and_infers(tokenizer):
    cfg = _cfg()
    model = _model(seed=8).train()
    images, ids, mask = _inputs(tokenizer, cfg)
    out = model(images, ids, mask)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    # X-VLM's fine-tuning: only the heads and the temperature are new (lr x new_lr_mult)
    assert set(model.new_parameter_names()) == {
        "temp",
        "vision_proj.weight",
        "vision_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        *(f"itm_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")),
    }

    model.eval()
    image_embeds, image_feat, text_embeds, text_feat, scores = _outputs(model, images, ids, mask)
    assert image_embeds.shape == (3, 1 + 4 * 4, 48)  # 32x32 input, /8 after 2 stages, CLS in front
    # X-VLM's image CLS is the average of the Swin's (final-norm'ed) tokens
    assert torch.allclose(image_embeds[:, 0], image_embeds[:, 1:].mean(1), atol=1e-6)
    assert text_embeds.shape[:2] == ids.shape and len(model.text_encoder.encoder.layer) == 2
    assert image_feat.shape == text_feat.shape == (3, 16) and scores.shape == (3,) and torch.isfinite(scores).all()


def test_fusion_layers_start_from_the_layers_after_the_text_layers():
    cfg = _cfg()
    text, image = backbones.build_text_encoder(cfg), backbones.build_image_encoder(cfg, img_size=cfg.image_size)
    layers = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in text.encoder.layer]
    with pytest.raises(TpasError, match="only 4 layers"):
        M.XVLMModel(_cfg(text_layers=3), image, text)
    model = M.XVLMModel(cfg, image, text)
    assert len(model.text_encoder.encoder.layer) == 2 and model.text_encoder.config.num_hidden_layers == 2
    for index, fusion_layer in enumerate(model.fusion):  # BERT layers 2 and 3, not copies of the text layers
        fusion_state = fusion_layer.state_dict()
        assert all(torch.equal(fusion_state[k], v) for k, v in layers[2 + index].items())
        assert not torch.equal(
            fusion_state["attention.self.query.weight"], layers[index]["attention.self.query.weight"]
        )


def test_xvlm_base_has_x_vlms_geometry_and_says_it_is_random():
    """The full-size preset, built on the meta device (shapes only, no memory or init time)."""
    cfg = M.ModelConfig.from_preset("xvlm-base")
    with pytest.warns(M.RandomWeightsWarning, match="--init"), torch.device("meta"):
        model = M.build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in to_xvlm(model).items()}
    # X-VLM-base: Swin-B (1024 wide, window 7 at 224: 169-entry tables), BERT-base with 6 + 6 layers
    assert shapes["vision_encoder.layers.0.downsample.reduction.weight"] == (256, 512)
    assert shapes["vision_encoder.layers.2.downsample.reduction.weight"] == (1024, 2048)
    assert shapes["vision_encoder.layers.3.blocks.1.attn.relative_position_bias_table"] == (169, 32)
    assert shapes["text_encoder.bert.encoder.layer.6.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["text_encoder.bert.encoder.layer.11.crossattention.output.dense.weight"] == (768, 768)
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" not in shapes
    assert "text_encoder.bert.encoder.layer.12.attention.self.query.weight" not in shapes
    assert shapes["text_encoder.bert.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["vision_proj.weight"] == (256, 1024) and shapes["text_proj.weight"] == (256, 768)
    assert shapes["itm_head.0.weight"] == (1536, 768) and shapes["itm_head.3.weight"] == (2, 1536)
    assert model.image_grid == (7, 7) and cfg.image_mean == M.OPENAI_CLIP_MEAN
    # and every one of those names maps back onto the model
    report = C.load_state(model, to_xvlm(model), "xvlm-base (meta)")
    assert report["unmapped"] == [] and report["missing"] == []


def test_the_packaged_tokenizer_is_bert_base_uncased():
    """xvlm-base tokenises with the packaged MiniLM's vocab, which is bert-base-uncased's file."""
    vocab = (backbones.packaged_text_model_dir() / "vocab.txt").read_bytes()
    assert hashlib.md5(vocab).hexdigest() == "64800d5d8528ce344256daf115d4965e"  # bert-base-uncased vocab.txt
    tokenizer = M.build_tokenizer(M.ModelConfig.from_preset("xvlm-base"))
    assert len(tokenizer) == 30522 and tokenizer("A MAN")["input_ids"] == [101, 1037, 2158, 102]


# ---------------------------------------------------------------- CMP (X-VLM + pooled ITC heads + pose branch)


def _cmp_cfg(**overrides) -> M.ModelConfig:
    """xvlm-tiny with the cmp preset's ITC heads and text pipeline."""
    return _cfg(itc_head="cmp", embed_dim=24, **{**M.CMP_TEXT, **overrides})


def to_cmp(model: M.XVLMModel) -> dict[str, torch.Tensor]:
    """Our cmp-head model's weights under CMP's names (models/cmp.py, model_search.py, pose.py):
    X-VLM's layout without bbox_head, plus the pose branch at Swin width."""
    out = {k: v for k, v in to_xvlm(model).items() if not k.startswith("bbox_head.")}
    width = model.vision_width
    gen = torch.Generator().manual_seed(11)
    out["pose_block.norm.weight"] = torch.ones(width)
    for part in ("q", "k", "v", "proj"):
        out[f"pose_block.attn.{part}.weight"] = torch.randn(width, width, generator=gen)
        out[f"pose_block.attn.{part}.bias"] = torch.zeros(width)
    out["pose_conv.expand.0.weight"] = torch.randn(96, 3, 3, 3, generator=gen)
    out["pose_conv.expand.1.running_mean"] = torch.zeros(96)
    out["pose_conv.reduce.0.weight"] = torch.randn(3, 96, 3, 3, generator=gen)
    return out


def test_cmp_heads_pool_the_tokens_as_cmp_does():
    model = _model(0, _cmp_cfg())
    assert [type(m) for m in model.vision_proj] == [torch.nn.BatchNorm1d, torch.nn.Dropout, torch.nn.Linear]
    assert model.vision_proj[0].num_features == 3 * model.vision_width  # 3 pooled patch groups
    assert model.text_proj[0].num_features == 4 * model.text_encoder.config.hidden_size  # CLS + 3 groups
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, feat = model.encode_image(images)
        patches = embeds[:, 1:]  # models/cmp.py: avgpool(3) over the tokens after CLS, concatenated
        groups = torch.cat(
            [torch.nn.functional.adaptive_avg_pool1d(patches.transpose(1, 2), 3)[..., i] for i in range(3)], dim=1
        )
        expected = torch.nn.functional.normalize(model.vision_proj(groups), dim=-1)
    torch.testing.assert_close(feat, expected)


def test_cmp_text_pipeline_pads_to_56_because_cmp_pools_padding():
    cfg = M.ModelConfig.from_preset("cmp")
    text = M.build_text_pipeline(M.ModelConfig.from_preset("xvlm-tiny", **M.CMP_TEXT))
    assert (cfg.caption_clean, cfg.max_words, cfg.trailing_sep, cfg.max_tokens, cfg.pad_to_max_tokens) == (
        "pre_caption",
        56,
        True,
        56,
        True,
    )
    tokens = text(["A man, lying.", CAPTIONS[1]])
    cleaned = text.tokenizer("a man lying")["input_ids"]  # pre_caption: lower case, no punctuation
    assert tokens["input_ids"].shape == (2, 56) and tokens["input_ids"][0, :5].tolist() == cleaned
    assert cleaned[0] == 101 and cleaned[-1] == 102  # [SEP] kept: CMP uses transformers' BertTokenizer
    # the pooled text feature reads the padded positions: padding to the batch's longest would
    # make a caption's feature depend on the rest of its batch
    model = _model(0, _cmp_cfg())
    with torch.no_grad():
        alone = model.encode_text(**text(["a man"]))[1]
        shorter = model.encode_text(**TextPipeline(text.tokenizer, max_tokens=56)(["a man"]))[1]
    assert not torch.allclose(alone, shorter, atol=1e-4)


def test_a_cmp_checkpoint_loads_with_its_pose_branch_ignored(tokenizer, tmp_path, capsys):
    source = _model(0, _cmp_cfg())
    target = _model(1, _cmp_cfg())
    report = C.load_initial_weights(target, _save(tmp_path, to_cmp(source), "cmp.pth"))
    assert report["schema"] == "cmp" and report["unmapped"] == [] and report["missing"] == []
    pose = {k for k in report["ignored"] if k.startswith("pose_")}
    assert pose == {k for k in to_cmp(source) if k.startswith("pose_")} and len(pose) == 12
    assert all("pose" in report["ignored"][k] for k in pose)
    assert "WARNING" not in capsys.readouterr().out
    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in target.state_dict().items())
    assert any(k.startswith("vision_proj.0.running_") for k in report["loaded"])  # BatchNorm statistics too


def test_a_cmp_checkpoint_is_refused_by_x_vlms_heads_and_x_vlm_loads_into_cmp(tmp_path, capsys):
    cmp_path = _save(tmp_path, to_cmp(_model(0, _cmp_cfg())), "cmp.pth")
    with pytest.raises(TpasError, match="a CMP checkpoint.*use --model cmp"):
        C.load_initial_weights(_model(1), cmp_path)
    # X-VLM -> cmp: everything but the ITC heads, which start fresh (as CMP's own fine-tuning does)
    target = _model(1, _cmp_cfg())
    report = C.load_initial_weights(target, _save(tmp_path, to_xvlm(_model(0))))
    heads = {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}
    assert heads <= set(report["ignored"]) and report["unmapped"] == []
    assert report["missing"] and all(k.startswith(("vision_proj.", "text_proj.")) for k in report["missing"])


def test_the_last_fusion_layer_computes_the_cls_row_alone_with_the_same_result_and_gradients() -> None:
    # the last layer's CLS row attends over every token; skipping the other rows changes nothing the
    # ITM head reads, forward or backward (eval mode: no dropout to draw differently)
    from tpas.models.xvlm import FusionLayer

    model = _model(0)
    torch.manual_seed(1)
    text = torch.randn(3, 7, model.fusion[0].attention.self.query.in_features)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()[:, None, None, :]
    image = torch.randn(3, 5, model.fusion[0].crossattention.self.key.in_features)
    layer = model.fusion[-1]
    assert isinstance(layer, FusionLayer)
    full = layer(text, mask, image)
    alone = layer(text, mask, image, cls_only=True)
    assert alone.shape == (3, 1, text.shape[-1])
    assert torch.allclose(alone[:, 0], full[:, 0], atol=1e-6)

    def grads(cls_only: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        x = text
        for i, fusion_layer in enumerate(model.fusion):
            x = fusion_layer(x, mask, image, cls_only=cls_only and i == len(model.fusion) - 1)
        model.itm_head(x[:, 0]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skipped, every_row = grads(True), grads(False)
    assert skipped.keys() == every_row.keys() and len(skipped) > 10
    assert all(torch.allclose(skipped[n], every_row[n], atol=1e-6) for n in skipped)
