"""How well a locked image tower's features read each rendered attribute of the demo:

    python -m tpas.experiments.probe                       # lite's frozen pyramid at 128x64
    python -m tpas.experiments.probe --image-height 256 --image-width 128

The model's frozen part (`image_features`: what training caches with --lock-image) encodes
--train-images training images and every test image once; a small attention probe (a projection,
a CLS token, one self-attention layer, one linear head per attribute) is then trained on the
training images' rendered attributes (annotation/demo_attributes.json) and scored on the test
images. A probe that cannot read an attribute with these labels says the features do not carry
it, whatever the contrastive loss does; the majority-class rate is printed beside each accuracy.
Demo only (PAB has no attribute labels). The pixel stem (--pixel-stem) trains with the model, so
it is not part of what this measures.

With --tower-lr > 0 the image tower trains too, with the labels (BatchNorm statistics frozen, as
--tune-from keeps them): an upper bound on what fine-tuning the tower could make it read, which
says whether a garment's type is out of reach of these pixels or only of the frozen features.

    python -m tpas.experiments.probe --tower-lr 3e-4 --epochs 10
"""

# ruff: noqa: RUF009

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpas import models as model_lib
from tpas.cli import config_command, field
from tpas.data import load_rgb
from tpas.errors import TpasError
from tpas.experiments.attributes import DEMO_ATTRIBUTES, read_demo_attributes
from tpas.io import write_json

ATTRIBUTES = (
    "action",
    "gender",
    "top_colour",
    "top_type",
    "bottom_colour",
    "bottom_type",
    "hair_colour",
    "hair_length",
    "hat",
    "bag",
)


@dataclass
class ProbeConfig:
    data_root: Path = field(Path("data/demo"), "A demo set (python -m tpas.demo) with annotation/demo_attributes.json.")
    model: str = field("lite", "Model preset whose frozen image features are probed.")
    image_height: int | None = field(None, "Input height (default: the preset's).")
    image_width: int | None = field(None, "Input width (default: the preset's).")
    image_stages: list[int] = field([], "Pyramid stages read (repeat the flag; default: the preset's).")
    image_grid_rows: int | None = field(None, "Pyramid grid rows (default: the preset's).")
    image_grid_cols: int | None = field(None, "Pyramid grid columns (default: the preset's).")
    train_images: int = field(6000, "Training images the probe learns from (the first N of the train split).")
    epochs: int = field(10, "Probe training epochs.")
    seed: int = field(0, "Seed of the probe's initialisation and batch order.")
    tower_lr: float = field(
        0.0,
        "Learning rate of the image tower, trained with the probe on the labels (BatchNorm statistics frozen); "
        "0 = the tower stays frozen and its features are encoded once.",
    )
    threads: int | None = field(None, "torch threads (default: torch's).")
    output: Path | None = field(None, "Also write the report here (JSON).")


class _Probe(nn.Module):
    def __init__(self, channels: int, tokens: int, classes: list[int], width: int = 256):
        super().__init__()
        self.proj = nn.Linear(channels, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, 0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], dim=1) + self.pos
        cls = self.norm(self.layer(x))[:, 0]
        return [head(cls) for head in self.heads]


def _model_config(cfg: ProbeConfig) -> model_lib.ModelConfig:
    base = model_lib.ModelConfig.from_preset(cfg.model)
    overrides: dict[str, Any] = {}
    if cfg.image_height or cfg.image_width:
        overrides["image_size"] = (cfg.image_height or base.image_size[0], cfg.image_width or base.image_size[1])
    if cfg.image_stages:
        overrides["image_stages"] = tuple(cfg.image_stages)
    if cfg.image_grid_rows or cfg.image_grid_cols:
        overrides["image_grid"] = (cfg.image_grid_rows or base.image_grid[0], cfg.image_grid_cols or base.image_grid[1])
    return model_lib.ModelConfig.from_preset(cfg.model, **overrides, pixel_stem=0, tune_from=0)


def _tokens(model: Any, images: torch.Tensor) -> torch.Tensor:
    """[B, tokens, channels] image features (a CNN's [B, C, h, w] map becomes one token per cell)."""
    features = model.image_features(images)
    if features.ndim == 4:
        channels_last = getattr(model.image_adapter, "channels_last", False)
        features = features.flatten(1, 2) if channels_last else features.flatten(2).transpose(1, 2)
    return features


def _load(transform: Any, paths: list[Path]) -> torch.Tensor:
    return torch.stack([transform(load_rgb(p)) for p in paths])


def _encode(model: Any, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """[N, tokens, channels] features of every image, without gradients."""
    with torch.inference_mode():
        return torch.cat([_tokens(model, images[i : i + batch]) for i in range(0, len(images), batch)])


def probe(cfg: ProbeConfig) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records_path = cfg.data_root / DEMO_ATTRIBUTES
    records = read_demo_attributes(cfg.data_root, ("image", "split", *ATTRIBUTES))
    train_rows = [r for r in records if r["split"] == "train"][: cfg.train_images]
    test_rows = [r for r in records if r["split"] == "test"]
    if not train_rows or not test_rows:
        raise TpasError(f"{records_path} needs train and test records; rebuild the demo.")
    values = {a: sorted({str(r[a]) for r in records}) for a in ATTRIBUTES}

    def labels(rows: list[dict]) -> torch.Tensor:
        return torch.tensor([[values[a].index(str(r[a])) for a in ATTRIBUTES] for r in rows])

    if cfg.tower_lr < 0:
        raise TpasError(f"--tower-lr must be >= 0 (0 keeps the tower frozen); got {cfg.tower_lr}.")
    mcfg = _model_config(cfg)
    torch.manual_seed(cfg.seed)
    model = model_lib.build_model(mcfg).eval()  # eval throughout: BatchNorm statistics stay the pretrained ones
    transform = model_lib.image_transform(mcfg, train=False)
    start = time.perf_counter()
    images_train = _load(transform, [cfg.data_root / r["image"] for r in train_rows])
    images_test = _load(transform, [cfg.data_root / r["image"] for r in test_rows])
    x_train = _encode(model, images_train)
    encode_s = time.perf_counter() - start
    y_train, y_test = labels(train_rows), labels(test_rows)

    generator = torch.Generator().manual_seed(cfg.seed)
    net = _Probe(x_train.shape[2], x_train.shape[1], [len(values[a]) for a in ATTRIBUTES])
    groups: list[dict[str, Any]] = [{"params": list(net.parameters()), "lr": 1e-3}]
    tower = model.image_encoder
    if cfg.tower_lr:
        tower.requires_grad_(True)
        groups.append({"params": [p for p in tower.parameters()], "lr": cfg.tower_lr})
    else:
        model.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), 128):
            rows = order[i : i + 128]
            logits = net(_tokens(model, images_train[rows]) if cfg.tower_lr else x_train[rows])
            loss = sum(nn.functional.cross_entropy(lg, y_train[rows, j]) for j, lg in enumerate(logits))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.inference_mode():
        logits = net(_encode(model, images_test))
    report: dict[str, Any] = {
        "model": mcfg.preset,
        "image_size": list(mcfg.image_size),
        "image_stages": list(mcfg.image_stages),
        "image_grid": list(mcfg.image_grid),
        "features": list(x_train.shape[1:]),
        "tower_lr": cfg.tower_lr,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "encode_s": round(encode_s, 1),
        "probe_s": round(time.perf_counter() - start, 1),
        "accuracy": {},
    }
    for j, attr in enumerate(ATTRIBUTES):
        majority = torch.bincount(y_train[:, j], minlength=len(values[attr])).argmax()
        report["accuracy"][attr] = {
            "probe": round(100 * (logits[j].argmax(1) == y_test[:, j]).float().mean().item(), 1),
            "majority": round(100 * (y_test[:, j] == majority).float().mean().item(), 1),
        }
    if cfg.output is not None:
        write_json(cfg.output, report)
    what = f"image features, tower trained at lr {cfg.tower_lr:g}" if cfg.tower_lr else "frozen image features"
    print(
        f"probe of {mcfg.preset}'s {what} ({mcfg.image_size[0]}x{mcfg.image_size[1]} input, "
        f"tokens {report['features'][0]} x {report['features'][1]}): {len(train_rows)} training images, "
        f"{len(test_rows)} test images, encode {encode_s:.0f} s, probe {report['probe_s']:.0f} s"
    )
    print("| attribute | probe accuracy | majority class |")
    print("|---|---|---|")
    for attr, acc in report["accuracy"].items():
        print(f"| {attr} | {acc['probe']:.1f} | {acc['majority']:.1f} |")
    return report


@config_command(ProbeConfig, help="Demo only: how well a locked image tower's features read each attribute.")
def main(cfg: ProbeConfig) -> None:
    probe(cfg)


if __name__ == "__main__":
    main()
