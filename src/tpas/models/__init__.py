"""The model library: every model family behind one interface, and nothing about training.

- `config`: `ModelConfig` and `PRESETS`, the one table of named presets;
- `registry`: `register_family`, `build_model`, `build_tokenizer`, `build_text_pipeline`;
- `base`: `RetrievalModel`, the interface families implement; `losses`: the shared ITC/ITM losses;
- `xvlm`: the X-VLM family (lite, tiny, xvlm-*, cmp); `hf`: transformers' BLIP and CLIP;
- `text`: caption pipelines (X-VLM's pre_caption, no [SEP]); `transforms`: image preprocessing;
- `backbones`: packaged/local pretrained encoders; `convert/`: other code bases' checkpoints;
- `fast_itm`: exact fast ITM re-ranking for the xvlm family; `run`: a trained run's weights.
May import tpas.errors, tpas.io, tpas.distributed; never training, retrieval or the stages.
"""

# Importing the family modules registers them (tpas.models.registry); a new family is one new
# module with @register_family plus its line here.
from tpas.models import hf, xvlm  # noqa: F401
from tpas.models.base import RetrievalModel
from tpas.models.config import (
    CMP_TEXT,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGE_TOKEN_MODES,
    INIT_ONLY_PRESETS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PRESETS,
    TEXT_FIELDS,
    XVLM_TEXT,
    ModelConfig,
    RandomWeightsWarning,
)
from tpas.models.registry import (
    build_model,
    build_text_pipeline,
    build_tokenizer,
    families,
    family,
)
from tpas.models.run import load_run_model, load_weights, save_weights
from tpas.models.text import TextPipeline, pre_caption
from tpas.models.transforms import image_transform
from tpas.models.xvlm import XVLMModel

__all__ = [
    "CMP_TEXT",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "INIT_ONLY_PRESETS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PRESETS",
    "IMAGE_TOKEN_MODES",
    "TEXT_FIELDS",
    "XVLM_TEXT",
    "ModelConfig",
    "RandomWeightsWarning",
    "RetrievalModel",
    "TextPipeline",
    "XVLMModel",
    "build_model",
    "build_text_pipeline",
    "build_tokenizer",
    "families",
    "family",
    "image_transform",
    "load_run_model",
    "load_weights",
    "pre_caption",
    "save_weights",
]
