"""Model configuration: `ModelConfig` and the one table of named presets (`PRESETS`).

A ModelConfig says everything needed to rebuild a model offline: the family that builds it
(tpas.models.registry), backbones, sizes, heads, the text pipeline (tpas.models.text) and the
default score rule. It is saved in every run's config.json (`dataclasses.asdict`) and read back
with `ModelConfig.from_dict`, which keeps what older runs were trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tpas.errors import TpasError
from tpas.models.text import CAPTION_CLEANERS

# The packaged EfficientNet-Lite0 weights were converted from the TensorFlow checkpoint, which
# expects about (x - 127) / 128. Their stem BatchNorm statistics confirm it: on real photos, with
# mean=std=0.5 the stem activations' variance fits the running variance (mean |log ratio| 0.43);
# with the ImageNet mean/std it is ~5x too large (1.6).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Backbones whose parameter layout fits the packaged weights. `tf_efficientnet_lite0` is the
# faithful one (TF "same" padding and BatchNorm eps 1e-3, as in the TF original the weights come
# from); `efficientnet_lite0` (symmetric padding, eps 1e-5) also classifies correctly, but the
# activations after its stride-2 convolutions fit the BatchNorm statistics worse.
PRETRAINED_BACKBONES = ("tf_efficientnet_lite0", "efficientnet_lite0")

# OpenAI CLIP's normalisation, which BLIP also uses
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# X-VLM's (and CMP's) text pipeline (tpas.models.text): pre_caption(caption, 30), [CLS] + word pieces with
# no [SEP], at most 40 ids (Retrieval_flickr/coco.yaml and CMP's configs: max_words 30, max_tokens 40)
XVLM_TEXT: dict[str, Any] = {"caption_clean": "pre_caption", "max_words": 30, "trailing_sep": False, "max_tokens": 40}
# CMP's (CMP_Baseline_Code: configs/cmp.yaml, dataset/utils.py, eval.py): X-VLM's pre_caption with
# max_words 56, then transformers' BertTokenizer, which keeps the trailing [SEP], padded to max_length 56
CMP_TEXT: dict[str, Any] = {
    "caption_clean": "pre_caption",
    "max_words": 56,
    "trailing_sep": True,
    "max_tokens": 56,
    "pad_to_max_tokens": True,
}

# The one table of named starting points; `ModelConfig.from_preset` applies them over the defaults.
# A family (the "family" key, default xvlm) is the code that builds the model: tpas.models.registry.
# score_rule: how infer.py ranks by default (tpas.scores): the reference's own where there is one
# (X-VLM, CMP, BLIP), the one measured best on the demo validation set for lite/tiny, ITC for CLIP.
PRESETS: dict[str, dict[str, Any]] = {
    # EfficientNet-Lite0 (ImageNet) + MiniLM-L6, both from installed packages, trained as measured best
    # on the demo (docs/demo-quality.md): the image tower locked (LiT) and read as a pyramid of three
    # stages on an 8x4 grid with 2 new self-attention layers; the text embeddings and bottom 4 of 6
    # layers locked; ITC ranks (demo-val R@1 39.7 against 39.0 for tpas, whose ITM is weak here).
    "lite": {
        "image_tokens": "pyramid",
        "image_stages": (2, 4, -1),
        "image_grid": (8, 4),
        "image_layers": 2,
        "lock_image": True,
        "lock_text_layers": 4,
        "score_rule": "itc",
    },
    # Random and tiny: for tests and smoke runs of the other stages (seconds on a CPU).
    "tiny": {
        # initializer_range ~ 1/sqrt(hidden): BERT's 0.02 suits 768-d; at 32-d it leaves the
        # CLS state nearly blind to the other tokens and the model barely learns
        "text_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 30522,
            "initializer_range": 0.2,
        },
        "image_pretrained": False,
        "text_pretrained": False,
        "image_size": (64, 32),
        "fusion_layers": 1,
        "embed_dim": 16,
        "score_rule": "tpas",
    },
    # X-VLM-base (Swin-B + BERT-base, 6 text + 6 fusion layers) as CMP fine-tunes it on PAB: 224x224
    # input and window 7, the resolution X-VLM's 16M/4M checkpoints were pre-trained at (CMP's
    # configs/cmp.yaml + config_swinB.json). RANDOM unless train.py --init loads X-VLM's weights.
    # The tokenizer is the packaged MiniLM's, whose vocab.txt is bert-base-uncased's (text_model
    # may name a local bert-base-uncased dir instead).
    "xvlm-base": {
        "image_backbone": "swin_base_patch4_window7_224",
        "image_pretrained": False,
        "image_size": (224, 224),
        "image_tokens": "direct",
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "text_config": {},
        "text_pretrained": False,  # {} = BertConfig's defaults = bert-base-uncased
        "text_layers": 6,
        "fusion_layers": 6,
        "embed_dim": 256,
        "itm_head": "mlp",
        **XVLM_TEXT,
        "score_rule": "xvlm",
    },
    # CMP (the PAB baseline, CMP_Baseline_Code/models/cmp.py): X-VLM-base with CMP's ITC heads (pooled
    # tokens -> BatchNorm, dropout 0.5, Linear to 2048) and text pipeline. RANDOM unless train.py --init
    # loads CMP's released cmp.pth (or X-VLM's checkpoint, whose ITC heads then start fresh, as in CMP).
    "cmp": {
        "image_backbone": "swin_base_patch4_window7_224",
        "image_pretrained": False,
        "image_size": (224, 224),
        "image_tokens": "direct",
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "text_config": {},
        "text_pretrained": False,
        "text_layers": 6,
        "fusion_layers": 6,
        "embed_dim": 2048,
        "itm_head": "mlp",
        "itc_head": "cmp",
        **CMP_TEXT,
        "score_rule": "cmp",
    },
    # The same code path at toy size, random: tests and smoke runs.
    "xvlm-tiny": {
        "image_backbone": "swin_tiny_patch4_window7_224",
        "image_pretrained": False,
        "image_size": (32, 32),
        "image_backbone_kwargs": {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4},
        "image_tokens": "direct",
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "text_config": {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 30522,
            "initializer_range": 0.2,
        },
        "text_pretrained": False,
        "text_layers": 2,
        "fusion_layers": 2,
        "embed_dim": 16,
        "itm_head": "mlp",
        **XVLM_TEXT,
        "score_rule": "xvlm",
    },
    # transformers' BlipForImageTextRetrieval (tpas.models.hf): pretrained ITC + ITM; --hf-model takes a
    # local dir saved from the hub (the hub name loads only from the cache or online)
    "blip-itm": {
        "family": "blip",
        "hf_model": "Salesforce/blip-itm-base-coco",
        "image_size": (384, 384),
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "max_tokens": 35,
        "embed_dim": 256,
        "score_rule": "blip",
    },
    # transformers' CLIPModel (also EVA-CLIP-style checkpoints that load as one): ITC only, no ITM
    "clip": {
        "family": "clip",
        "hf_model": "openai/clip-vit-base-patch16",
        "image_size": (224, 224),
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "max_tokens": 77,
        "embed_dim": 512,
        "score_rule": "itc",
    },
}


TEXT_FIELDS = (
    "caption_clean",
    "max_words",
    "trailing_sep",
    "max_tokens",
    "pad_to_max_tokens",
)  # ModelConfig's text pipeline
IMAGE_TOKEN_MODES = ("projected", "direct", "pyramid")
ITM_HEADS = ("linear", "mlp")
ITC_HEADS = ("cls", "cmp")

# Presets whose weights come only from an image-text checkpoint passed to train.py --init: built
# alone they are random, which build_model says in a warning.
INIT_ONLY_PRESETS = ("xvlm-base", "cmp")


class RandomWeightsWarning(UserWarning):
    """A model meant to start from a checkpoint was built with random weights."""


TEMP_RANGE = (0.001, 0.5)  # X-VLM's clamp for the learnable temperature


@dataclass
class ModelConfig:
    preset: str = "lite"  # the preset this config started from (see PRESETS)
    family: str = "xvlm"  # which builder (tpas.models.registry): xvlm, blip, clip
    image_backbone: str = "tf_efficientnet_lite0"  # timm name
    image_size: tuple[int, int] = (128, 64)  # (H, W); pedestrian crops
    image_pretrained: bool = True  # load the packaged ImageNet weights
    image_stage: int | None = None  # a CNN's feature map from this stage (None: its final one)
    text_model: str | None = None  # dir of a BERT-like model; None = packaged MiniLM-L6
    text_config: dict | None = None  # build a RANDOM BertModel from this config (tests, tiny)
    text_pretrained: bool = True
    fusion_layers: int = 2  # initialised from the text model's top layers
    # X-VLM-style models (see the xvlm-* presets); the defaults keep lite/tiny as they were
    image_backbone_kwargs: dict | None = None  # extra timm.create_model arguments (e.g. a tiny Swin's dims)
    image_tokens: str = "projected"  # projected: CNN map -> text width (+ pos embed, norm); direct: X-VLM;
    # pyramid: several CNN stages resized to image_grid and concatenated per cell (see image_stages)
    image_stages: tuple[int, ...] = ()  # pyramid: blocks whose outputs are read; -1 = the final (head) map
    image_grid: tuple[int, int] = (8, 4)  # pyramid: (rows, cols) of image tokens
    image_layers: int = 0  # new self-attention layers over the image tokens, before the ITC feature
    # pyramid: a small CNN of this base width, trained from scratch on the raw pixels, whose stride-16
    # map joins each cell's features (0 = none); it reads the few-pixel details a frozen tower misses
    pixel_stem: int = 0
    # pyramid: the stages read from blocks >= this index come from a trained copy of those blocks, run
    # on block (tune_from - 1)'s output, which a cache keeps beside the frozen features (0 = none)
    tune_from: int = 0
    lock_image: bool = False  # freeze the image backbone (LiT): BatchNorm in eval mode, no gradients
    lock_text_layers: int = 0  # freeze the text embeddings and this many bottom text layers
    text_layers: int | None = None  # keep only the first N text layers; fusion starts from layer N
    itm_head: str = "linear"  # linear | mlp (X-VLM's Linear, LayerNorm, GELU, Linear)
    itc_head: str = "cls"  # cls: Linear on the CLS (X-VLM); cmp: CMP's pooled BatchNorm head
    itc_dropout: float = 0.5  # itc_head cmp: dropout before its Linear (CMP's itc_dp)
    embed_dim: int = 256  # ITC projection size
    # the text pipeline (tpas.models.text); these defaults are MiniLM's/BERT's own: whitespace stripped,
    # [CLS] ... [SEP], 70 ids (the lite preset, and every run trained before pipelines were recorded)
    caption_clean: str = "strip"  # strip | pre_caption (X-VLM's cleaning)
    max_words: int = 30  # words kept by pre_caption
    trailing_sep: bool = True  # False: X-VLM's tokenizer, no [SEP]
    max_tokens: int = 70  # ids per caption, special tokens included
    pad_to_max_tokens: bool = False  # pad to max_tokens, not the longest (CMP pools padding too)
    temp: float = 0.07  # learnable, clamped to TEMP_RANGE
    score_rule: str = "tpas"  # infer.py's default --score (tpas.scores)
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD
    hf_model: str | None = None  # blip/clip: a local transformers model dir (or a hub name online)
    hf_config: dict | None = None  # blip/clip: build a RANDOM model from this config (tests)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TpasError(f"unknown model preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        self.image_size = tuple(int(v) for v in self.image_size)  # JSON gives lists
        self.image_stages = tuple(int(v) for v in self.image_stages)
        self.image_grid = tuple(int(v) for v in self.image_grid)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise TpasError(f"image_size must be (height, width), each >= 32; got {self.image_size}.")
        if self.fusion_layers < 1:
            raise TpasError(f"fusion_layers must be >= 1; got {self.fusion_layers}.")
        self._check_image_tokens()
        if self.image_layers < 0 or self.lock_text_layers < 0:
            raise TpasError(
                f"image_layers and lock_text_layers must be >= 0; got {self.image_layers} and {self.lock_text_layers}."
            )
        if self.itm_head not in ITM_HEADS:
            raise TpasError(f"itm_head must be one of {ITM_HEADS}; got {self.itm_head!r}.")
        if self.itc_head not in ITC_HEADS:
            raise TpasError(f"itc_head must be one of {ITC_HEADS}; got {self.itc_head!r}.")
        if self.text_layers is not None and self.text_layers < 1:
            raise TpasError(f"text_layers must be >= 1 (or null for all); got {self.text_layers}.")
        if self.caption_clean not in CAPTION_CLEANERS:
            raise TpasError(f"caption_clean must be one of {CAPTION_CLEANERS}; got {self.caption_clean!r}.")
        if self.max_words < 1 or self.max_tokens < 2:
            raise TpasError(f"max_words must be >= 1 and max_tokens >= 2; got {self.max_words} and {self.max_tokens}.")

    def _check_image_tokens(self) -> None:
        """The image-token settings (the adapter, the pyramid and what reads beside it)."""
        if self.image_tokens not in IMAGE_TOKEN_MODES:
            raise TpasError(f"image_tokens must be one of {IMAGE_TOKEN_MODES}; got {self.image_tokens!r}.")
        if self.image_tokens == "pyramid" and not self.image_stages:
            raise TpasError("image_tokens pyramid needs image_stages (e.g. [2, 4, -1]).")
        if len(self.image_grid) != 2 or min(self.image_grid) < 1:
            raise TpasError(f"image_grid must be (rows, cols), each >= 1; got {self.image_grid}.")
        if self.pixel_stem < 0 or (self.pixel_stem and self.image_tokens != "pyramid"):
            raise TpasError(f"pixel_stem needs image_tokens pyramid and must be >= 0; got {self.pixel_stem}.")
        if self.pixel_stem and any(n % g for n, g in zip(self.image_size, self.image_grid)):
            # the pixels travel (and are cached) cell by cell, beside each cell's features
            raise TpasError(
                f"pixel_stem needs image_size {self.image_size} to be a whole number of image_grid {self.image_grid} "
                "cells; change the grid or the size."
            )
        if self.tune_from < 0 or (self.tune_from and self.image_tokens != "pyramid"):
            raise TpasError(f"tune_from needs image_tokens pyramid and must be >= 0; got {self.tune_from}.")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise TpasError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `dataclasses.asdict` output (e.g. a run dir's config.json)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TpasError(f"model config has unknown keys {unknown}; it was written by another tpas version.")
        data = dict(data)
        # A run saved before the text pipeline was recorded (no caption_clean key) was trained on
        # stripped captions with the tokenizer's own [CLS] ... [SEP] and its saved max_tokens: the
        # dataclass defaults, whatever its preset says today, so it keeps reading what it learnt on.
        if data.get("family") == "tpas":  # the X-VLM-style family's name before it was called xvlm
            data["family"] = "xvlm"
        if "score_rule" not in data:  # how it is ranked does not change what it learnt: today's preset rule
            data["score_rule"] = PRESETS.get(data.get("preset", "lite"), {}).get("score_rule", "tpas")
        return cls(**data)

    @property
    def text_settings(self) -> dict[str, Any]:
        """The text pipeline's knobs (tpas.models.text.TextPipeline's fields)."""
        return {name: getattr(self, name) for name in TEXT_FIELDS}
