"""Image preprocessing: a bicubic resize of the PIL image to the model's input size, then its mean/std.

X-VLM, CMP and BLIP resize the PIL image bicubically (aspect ratio not kept), ToTensor, and
normalise with CLIP's mean/std (their presets carry it; tests/test_reference.py checks X-VLM's
pixels to 1e-5). Training adds a mild crop and a horizontal flip, never colour jitter.
"""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

from tpas.models.config import ModelConfig


def image_transform(cfg: ModelConfig, train: bool) -> T.Compose:
    """RGB PIL image -> normalised float tensor [3, H, W]. No colour jitter: colours carry meaning."""
    height, width = cfg.image_size
    steps: list[Any] = [T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        aspect = width / height
        steps += [
            T.RandomResizedCrop(
                (height, width),
                scale=(0.8, 1.0),
                ratio=(0.9 * aspect, 1.1 * aspect),
                interpolation=T.InterpolationMode.BICUBIC,
            ),
            T.RandomHorizontalFlip(),
        ]
    steps += [T.ToTensor(), T.Normalize(cfg.image_mean, cfg.image_std)]
    return T.Compose(steps)
