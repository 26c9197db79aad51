"""BLIP and CLIP from transformers, wrapped behind tpas's `RetrievalModel` interface.

- `blip` (`BlipRetrievalModel`): transformers' `BlipForImageTextRetrieval` (ViT image encoder,
  BERT-like text encoder whose layers also hold cross-attention, ITC projections, ITM head).
  ITC: unimodal [CLS] features; ITM: the text encoder re-reads the caption with cross-attention
  to the image tokens, so a caption's `text_state` is its token ids. Like transformers'
  `BlipForImageTextRetrieval.forward`, the ITM pass gets the caption's ids unchanged (starting
  with [CLS]); the original BLIP code puts its [ENC] token in that place.
- `clip` (`ClipRetrievalModel`): transformers' `CLIPModel` (also EVA-CLIP-style checkpoints that
  load as one); a dual encoder, ITC only (`has_itm = False`).

Weights: `cfg.hf_model` is a local dir saved with `save_pretrained` (e.g. `huggingface-cli download
Salesforce/blip-itm-base-coco --local-dir /ckpt/blip`) or a hub name, read from the local cache
and fetched only when online. `cfg.hf_config` builds a random model offline (tests). Building
records the transformers config in `cfg.hf_config` (and its ITC size in `cfg.embed_dim`), so a run
directory's config.json rebuilds the architecture without the hub; the weights then come from the
run's model.safetensors (tpas.models.run.load_run_model passes image_pretrained=text_pretrained=False).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
    PretrainedConfig,
    PreTrainedModel,
)

from tpas.errors import TpasError
from tpas.models.backbones import quiet_hf_loading, text_model_dir
from tpas.models.base import RetrievalModel
from tpas.models.config import ModelConfig
from tpas.models.registry import register_family

# Tiny random architectures (a few seconds on a CPU) for tests and smoke runs; text vocabularies fit
# the packaged MiniLM (bert-base-uncased) tokenizer that random hf_config models use.
TINY_BLIP_CONFIG: dict[str, Any] = {
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 128,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "initializer_range": 0.2,
    },
    "image_text_hidden_size": 16,
    "initializer_range": 0.2,  # ~1/sqrt(32): BLIP's 0.02 (and 1e-10 for the ViT) leave a 32-d model nearly constant
}
# eos = [SEP] (102): CLIP pools the text at the first eos token
TINY_CLIP_CONFIG: dict[str, Any] = {
    "text_config": {
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 16,
}

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline() -> bool:
    """Offline mode as huggingface_hub reads it at import, or as set since."""
    return hub_constants.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for var in _OFFLINE_VARS
    )


def _load(loader: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """loader(name_or_dir, ...) from a local dir, else the hub cache, else the hub (only when online).

    Any failure is a TpasError naming `name` and the fix; offline it fails at once, never waits.
    """
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            if not (local / "config.json").is_file() and what != "tokenizer":
                raise TpasError(
                    f"{local}: not a transformers model dir (no config.json); save one with "
                    f"save_pretrained or `huggingface-cli download <repo> --local-dir {local}`."
                )
            return loader(str(local), **kwargs)
        try:  # the hub cache first: no network needed
            return loader(name, local_files_only=True, **kwargs)
        except OSError:
            if _offline():
                raise
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local.is_dir():
            raise TpasError(
                f"{local}: cannot load the {what} ({first_line}); the dir must hold a complete "
                f"save_pretrained / `huggingface-cli download` output."
            ) from None
        raise TpasError(
            f"{name}: cannot load the {what} (not a local dir, not in the hub cache"
            f"{', and HF_HUB_OFFLINE is set' if _offline() else ''}: {first_line}); pass a local dir "
            f"saved from the hub via --hf-model/--init, or go online."
        ) from None


def build_hf_tokenizer(hf_model: str) -> Any:
    """The tokenizer saved with a transformers model (local dir or hub name)."""
    return _load(AutoTokenizer.from_pretrained, hf_model, "tokenizer")


def _config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A JSON-safe dict that rebuilds `config` (stored in ModelConfig.hf_config)."""
    return json.loads(config.to_json_string(use_diff=False))


# ---------------------------------------------------------------- the wrappers


class _HfRetrievalModel(RetrievalModel):
    """Shared by the wrappers: `self.model` is the transformers model, `temp` the ITC temperature."""

    model: PreTrainedModel

    def __init__(self, cfg: ModelConfig, model: PreTrainedModel, new_names: set[str]):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self._new_names = frozenset(new_names)
        # zero-shot ITM only from a checkpoint that held the head (a captioning one starts it random)
        pretrained = bool(cfg.hf_model) and (cfg.image_pretrained or cfg.text_pretrained)
        self.itm_pretrained = self.has_itm and pretrained and not any("itm_head" in n for n in new_names)
        native = model.config.vision_config.image_size
        native = tuple(native) if isinstance(native, (list, tuple)) else (native, native)
        # other input sizes (e.g. tall pedestrian crops) interpolate the position embeddings
        self.interpolate_pos_encoding = tuple(cfg.image_size) != native

    def is_new_parameter(self, name: str) -> bool:
        """temp (BLIP) and any weight the loaded checkpoint lacked; the rest is pretrained."""
        return name in self._new_names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """transformers' activation checkpointing of every encoder layer (vision and text)."""
        self.grad_checkpointing = enable
        if enable:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()


class BlipRetrievalModel(_HfRetrievalModel):
    """BlipForImageTextRetrieval: image_state = ViT tokens, text_state = the caption's token ids."""

    model: BlipForImageTextRetrieval

    def __init__(self, cfg: ModelConfig, model: BlipForImageTextRetrieval, missing: set[str]):
        # transformers' BLIP keeps no ITC temperature (BLIP learns one): start from cfg.temp
        super().__init__(cfg, model, {"temp", *(f"model.{k}" for k in missing)})
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (ViT last hidden states [B, 1+N, Dv], unit-norm image_feat [B, E])."""
        state = self.model.vision_model(
            pixel_values=images, interpolate_pos_encoding=self.interpolate_pos_encoding
        ).last_hidden_state
        return state, F.normalize(self.model.vision_proj(state[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids [B, L]: the ITM pass re-reads the caption, unit-norm text_feat [B, E])."""
        hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return input_ids, F.normalize(self.model.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """As BlipForImageTextRetrieval.forward(use_itm_head=True): [CLS] of the text encoder with
        cross-attention to every image token -> itm_head."""
        image_mask = torch.ones(image_state.shape[:-1], dtype=torch.long, device=image_state.device)
        hidden = self.model.text_encoder(
            input_ids=text_state,
            attention_mask=text_mask,
            encoder_hidden_states=image_state,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.model.itm_head(hidden[:, 0])


class ClipRetrievalModel(_HfRetrievalModel):
    """CLIPModel as a dual encoder: ITC only, no ITM head."""

    model: CLIPModel
    has_itm = False

    def __init__(self, cfg: ModelConfig, model: CLIPModel, missing: set[str]):
        # temp = 1 / exp(logit_scale) starts from the checkpoint's scale and replaces it (frozen, unused)
        names = {f"model.{k}" for k in missing} | ({"temp"} if "logit_scale" in missing else set())
        super().__init__(cfg, model, names)
        model.logit_scale.requires_grad_(False)
        self.temp = nn.Parameter((-model.logit_scale.detach().float()).exp().clone())

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_feat [B, 1, E] as the state, unit-norm image_feat [B, E]); with no cross encoder
        nothing else is needed, and the gallery cache stays small."""
        pooled = self.model.vision_model(
            pixel_values=images, interpolate_pos_encoding=self.interpolate_pos_encoding
        ).pooler_output
        feat = F.normalize(self.model.visual_projection(pooled), dim=-1)
        return feat[:, None], feat

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token states [B, L, D], unit-norm text_feat [B, E]) (pooled at the first eos token)."""
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def itm_logits(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        raise TpasError("a CLIP model has no ITM head; rank by ITC alone (infer.py --no-itm).")


# ---------------------------------------------------------------- building


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer saved with cfg.hf_model; a random hf_config model reads the packaged MiniLM's."""
    if cfg.hf_model:
        return build_hf_tokenizer(cfg.hf_model)
    return AutoTokenizer.from_pretrained(str(text_model_dir(cfg)))


@register_family("blip", build_tokenizer=build_tokenizer, reads_hf_model=True)
def build_blip(cfg: ModelConfig) -> RetrievalModel:
    """transformers' BlipForImageTextRetrieval, wrapped (see build_hf_model)."""
    return build_hf_model(
        cfg,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipRetrievalModel,
        ("blip",),
        lambda config: config.image_text_hidden_size,
    )


@register_family("clip", build_tokenizer=build_tokenizer, reads_hf_model=True)
def build_clip(cfg: ModelConfig) -> RetrievalModel:
    """transformers' CLIPModel (and EVA-CLIP-style checkpoints that load as one), wrapped."""
    return build_hf_model(
        cfg, CLIPConfig, CLIPModel, ClipRetrievalModel, ("clip",), lambda config: config.projection_dim
    )


def build_hf_model(
    cfg: ModelConfig,
    config_cls: type[PretrainedConfig],
    model_cls: type[PreTrainedModel],
    wrapper: type[_HfRetrievalModel],
    model_types: tuple[str, ...],
    projection_dim: Callable[[PretrainedConfig], int],
) -> RetrievalModel:
    """A transformers model for cfg: pretrained from cfg.hf_model when cfg asks for pretrained
    weights, else random with the architecture of cfg.hf_config (or of cfg.hf_model's config.json).

    Records the architecture in cfg.hf_config and its ITC size in cfg.embed_dim (see module doc).
    """
    pretrained = cfg.image_pretrained or cfg.text_pretrained
    if cfg.hf_model and pretrained and cfg.image_pretrained != cfg.text_pretrained:
        raise TpasError(
            f"{cfg.family} models load their weights as a whole; set image_pretrained and "
            f"text_pretrained alike (got {cfg.image_pretrained}, {cfg.text_pretrained})."
        )
    missing: set[str] = set()
    if cfg.hf_model and pretrained:
        config = _load(AutoConfig.from_pretrained, cfg.hf_model, "model config")
        _check_model_type(config, model_types, cfg)
        with quiet_hf_loading():
            model, info = _load(
                model_cls.from_pretrained,
                cfg.hf_model,
                "model",
                config=config,
                dtype=torch.float32,
                output_loading_info=True,
            )
        missing = set(info.get("missing_keys", ()))
        if missing:  # e.g. a captioning checkpoint has no ITM head: it starts random and trains as new
            print(
                f"{cfg.hf_model}: {len(missing)} weight(s) not in the checkpoint start random "
                f"(e.g. {sorted(missing)[:3]})"
            )
    else:
        if cfg.hf_config is not None:
            config = config_cls.from_dict(dict(cfg.hf_config))
        elif cfg.hf_model:  # architecture only; the weights come from elsewhere (a run's checkpoint)
            config = _load(AutoConfig.from_pretrained, cfg.hf_model, "model config")
        else:
            raise TpasError(
                f"family {cfg.family!r} needs hf_model (a local transformers dir, e.g. --hf-model "
                f"/ckpt/model) or hf_config (a random model's architecture)."
            )
        _check_model_type(config, model_types, cfg)
        model = model_cls(config)
    _check_fit(cfg, model.config)
    cfg.hf_config = _config_dict(model.config)
    cfg.embed_dim = projection_dim(model.config)
    return wrapper(cfg, model, missing)


def _check_model_type(config: PretrainedConfig, model_types: tuple[str, ...], cfg: ModelConfig) -> None:
    if config.model_type not in model_types:
        raise TpasError(
            f"{cfg.hf_model or 'hf_config'}: a {config.model_type!r} model, but family {cfg.family!r} "
            f"needs one of {model_types}; pick the preset that fits the checkpoint."
        )


def _check_fit(cfg: ModelConfig, config: PretrainedConfig) -> None:
    """Captions and the tokenizer must fit the text model."""
    text = config.text_config
    if cfg.max_tokens > text.max_position_embeddings:
        raise TpasError(
            f"max_tokens {cfg.max_tokens} exceeds the {cfg.family} text model's "
            f"{text.max_position_embeddings} positions; pass --max-tokens {text.max_position_embeddings} "
            f"or less."
        )
    if not cfg.hf_model:  # a random model reads the packaged MiniLM tokenizer's ids
        vocab = len(build_tokenizer(cfg))
        if text.vocab_size < vocab:
            raise TpasError(f"hf_config text vocab_size {text.vocab_size} is smaller than the tokenizer's {vocab}.")
