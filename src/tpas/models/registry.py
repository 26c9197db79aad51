"""Model families behind one registry: `register_family`, `build_model`, `build_tokenizer`.

A family is the code that builds a model from a `ModelConfig` (its `family` field): `xvlm`
(tpas.models.xvlm: the X-VLM-style fusion models, lite/tiny/xvlm-*/cmp presets), `blip` and
`clip` (tpas.models.hf: transformers' models, wrapped). Each family module registers itself
with `@register_family(...)`; `tpas.models` imports every family module, so anything that
imports `tpas.models` finds them all. Nothing outside this module switches on a family's name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpas.errors import TpasError
from tpas.models.config import INIT_ONLY_PRESETS, ModelConfig, RandomWeightsWarning
from tpas.models.text import TextPipeline

if TYPE_CHECKING:
    from tpas.models.base import RetrievalModel


@dataclass(frozen=True)
class Family:
    name: str
    build_model: Callable[[ModelConfig], RetrievalModel]
    build_tokenizer: Callable[[ModelConfig], Any]
    reads_hf_model: bool = False  # takes train.py / infer.py --hf-model (a transformers model dir)


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str, *, build_tokenizer: Callable[[ModelConfig], Any], reads_hf_model: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator for a family's `build_model(cfg)`: registers it under `name`."""

    def decorate(build: Callable[[ModelConfig], RetrievalModel]) -> Callable[[ModelConfig], RetrievalModel]:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        _FAMILIES[name] = Family(name, build, build_tokenizer, reads_hf_model)
        return build

    return decorate


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise TpasError(f"unknown model family {name!r}; choose one of {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def families() -> list[str]:
    return sorted(_FAMILIES)


def build_model(cfg: ModelConfig) -> RetrievalModel:
    """Build the model offline: packaged/local pretrained weights as cfg asks, random otherwise."""
    model = family(cfg.family).build_model(cfg)
    if cfg.preset in INIT_ONLY_PRESETS:
        warnings.warn(
            f"model preset {cfg.preset!r} is built with RANDOM weights: its weights come only from an "
            f"image-text checkpoint (train.py --init PATH, e.g. X-VLM's 16m_base_model_state_step_199999.th) "
            f"or a trained run's model.safetensors.",
            RandomWeightsWarning,
            stacklevel=2,
        )
    return model


def build_tokenizer(cfg: ModelConfig) -> Any:
    return family(cfg.family).build_tokenizer(cfg)


def build_text_pipeline(cfg: ModelConfig, tokenizer: Any = None) -> TextPipeline:
    """The caption cleaning + tokenization this model was (or will be) trained with."""
    return TextPipeline(tokenizer if tokenizer is not None else build_tokenizer(cfg), **cfg.text_settings)
