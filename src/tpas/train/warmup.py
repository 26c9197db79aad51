"""--tower-warmup: teach a locked image tower the caption's words before it is locked and cached.

A locked ImageNet tower (LiT) is fast to train on, but what it does not read at the start it never
reads: on the demo its frozen features tell a garment's type at 36% (chance 20%), and the type
decides three wrong top-1s in four (docs/demo-quality.md). This stage fine-tunes the tower alone,
for a few epochs over the run's training images, to name each image's caption words: one binary
classifier per word piece (those in at least `min_captions` captions) on the tower's pooled
features, binary cross-entropy against the pieces the image's captions hold (a bag of words, as in
Joulin et al. 2016, "Learning Visual Features from Large Weakly Supervised Data"). Captions are the
only labels it uses, so it is the same on PAB as on the demo. BatchNorm statistics stay the
pretrained ones (the tower runs in eval mode, as it does when locked), the classifier is thrown
away, and the tower is then locked and cached as before, with these weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T
from tqdm import tqdm

from tpas.data import load_rgb, resolve_image, stable_seed
from tpas.errors import TpasError
from tpas.models.config import ModelConfig
from tpas.runtime import Runtime
from tpas.train.features import machine_memory


@dataclass
class WarmupReport:
    epochs: int
    images: int
    words: int
    seconds: float
    first_loss: float
    last_loss: float


def pooled_tower(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> [B, C]: the mean of a timm CNN's final feature map, or one sentence why not."""
    if not hasattr(encoder, "forward_features"):
        raise TpasError(
            f"--tower-warmup needs a timm image backbone (forward_features); {type(encoder).__name__} has none; "
            "train without it."
        )

    def pooled(images: torch.Tensor) -> torch.Tensor:
        if images.device.type == "cpu":  # oneDNN's depthwise convolutions are faster channels-last
            images = images.contiguous(memory_format=torch.channels_last)
        features = encoder.forward_features(images)
        return features.mean(dim=(2, 3)) if features.ndim == 4 else features.mean(dim=1)

    return pooled


def word_targets(captions_per_image: Sequence[Sequence[list[int]]], vocab: torch.Tensor) -> torch.Tensor:
    """[N, K] multi-hot: which of `vocab`'s word pieces any of each image's captions holds."""
    index = {int(piece): k for k, piece in enumerate(vocab.tolist())}
    targets = torch.zeros(len(captions_per_image), len(index))
    for i, captions in enumerate(captions_per_image):
        for ids in captions:
            for piece in ids:
                k = index.get(piece)
                if k is not None:
                    targets[i, k] = 1.0
    return targets


def _load_pixels(root: Path, images: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
    """[N, 3, H, W] uint8: each image resized as the eval transform resizes it (a quarter of float32's
    memory: 0.25 GB for 10k images at 128x64), or one sentence when even that would not fit."""
    needed = len(images) * 3 * size[0] * size[1]
    memory = machine_memory()
    if memory is not None and needed > memory // 2:
        raise TpasError(
            f"--tower-warmup holds its {len(images)} images in memory ({needed / 2**30:.1f} GiB), more than half of "
            f"this machine's; use a smaller --subset or --tower-warmup 0."
        )
    resize = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.PILToTensor()])
    return torch.stack([resize(load_rgb(resolve_image(root, p))) for p in images])


def warm_tower(
    encoder: nn.Module,
    images: Sequence[str],
    targets: torch.Tensor,
    root: Path,
    model_cfg: ModelConfig,
    runtime: Runtime,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    progress: bool = False,
) -> WarmupReport:
    """Fine-tune `encoder` in place to predict `targets` (one row per image) from its pooled features.

    On a CPU it runs in fp32 whatever the run's precision: EfficientNet's depthwise blocks are
    slower under bf16 autocast there (docs/demo-quality.md, "The tuned copy in fp32 on a CPU"); a
    GPU uses the run's autocast.
    The pixels are what the eval transform gives (a resize, then ToTensor's /255 and the model's
    normalisation, in that order), loaded once and flipped at random each epoch; the learning rate
    decays linearly to zero. Seeded: the same images, targets and seed give the same weights. The
    encoder stays in eval mode (BatchNorm statistics and dropout as when locked) and ends with
    requires_grad off."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} target rows")
    started = time.time()
    pooled = pooled_tower(encoder)
    pixels = _load_pixels(root, images, model_cfg.image_size)
    mean = torch.tensor(model_cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model_cfg.image_std).view(1, 3, 1, 1)

    def normalised(batch: torch.Tensor) -> torch.Tensor:
        return batch.to(torch.float32).div(255).sub(mean).div(std)

    device = runtime.device
    encoder.eval().requires_grad_(True)
    with torch.no_grad():
        width = pooled(normalised(pixels[:1]).to(device)).shape[1]
    generator = torch.Generator().manual_seed(stable_seed(seed, 29))
    torch.manual_seed(stable_seed(seed, 31))
    head = nn.Linear(width, targets.shape[1]).to(device)
    optimizer = torch.optim.AdamW(
        [{"params": list(encoder.parameters()), "lr": lr}, {"params": list(head.parameters()), "lr": 10 * lr}],
        weight_decay=0.01,
    )
    steps = epochs * -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    losses: list[float] = []
    bar = tqdm(total=steps, desc="tower warm-up", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        flips = torch.rand(len(images), generator=generator) < 0.5
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = normalised(pixels[rows])
            batch = torch.where(flips[rows, None, None, None], batch.flip(-1), batch).to(device)
            with contextlib.nullcontext() if device.type == "cpu" else runtime.autocast():
                logits = head(pooled(batch))
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    encoder.requires_grad_(False)
    per_epoch = max(1, len(losses) // epochs)
    return WarmupReport(
        epochs=epochs,
        images=len(images),
        words=targets.shape[1],
        seconds=time.time() - started,
        first_loss=sum(losses[:per_epoch]) / per_epoch,
        last_loss=sum(losses[-per_epoch:]) / per_epoch,
    )
