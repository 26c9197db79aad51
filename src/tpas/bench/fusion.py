"""The fusion encoder's forward and backward at the default `lite` recipe's training shapes: every
row of the last fusion layer computed (the code before 2026-12-02) against its CLS row alone, the
only row the ITM head reads (`tpas.models.xvlm.XVLMModel.fuse` now). The two alternate round by
round in one process, so a busy machine slows both alike; compare the ratio, not the seconds.

    python -m tpas.bench fusion --output docs/bench/fusion.json
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tpas.bench._common import machine_info, print_table
from tpas.cli import config_command, field
from tpas.io import write_json
from tpas.runtime import cpu_has_bf16_units
from tpas.train.config import TrainConfig, model_config_for


@dataclass
class BenchFusionConfig:
    model: str = field("lite", "Model preset, with train.py's default recipe for it.")
    rows: int = field(
        160, "Sequences through the fusion encoder per step (160 in a default lite step: the ITM pairs and negatives)."
    )
    tokens: int = field(37, "Text tokens per sequence (the longest caption of a default batch, padded to).")
    rounds: int = field(6, "Timed rounds; each times both ways once, in alternating order.")
    threads: int = field(0, "Torch CPU threads (0 = torch's default: all cores).")
    seed: int = field(0, "Seed for the model's new weights and the inputs.")
    output: Path = field(Path("outputs/bench/fusion.json"), "Where the results go (JSON).")


def _step(model: torch.nn.Module, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, cls_only: bool):
    """One forward and backward through the fusion layers and the ITM head; the ITM logits."""
    x, last = text, len(model.fusion) - 1
    for i, layer in enumerate(model.fusion):
        x = layer(x, mask, image, cls_only=cls_only and i == last)
    logits = model.itm_head(x[:, 0])
    logits.sum().backward()
    return logits.detach()


def bench_fusion(cfg: BenchFusionConfig) -> dict:
    from tpas import models as model_lib

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model_lib.build_model(model_config_for(TrainConfig(model=cfg.model)))
    width = model.fusion[0].attention.self.query.in_features
    image_width = model.fusion[0].crossattention.self.key.in_features
    image_tokens = 1 + model.cfg.image_grid[0] * model.cfg.image_grid[1]
    generator = torch.Generator().manual_seed(cfg.seed)
    text = torch.randn(cfg.rows, cfg.tokens, width, generator=generator, requires_grad=True)
    image = torch.randn(cfg.rows, image_tokens, image_width, generator=generator, requires_grad=True)
    lengths = torch.randint(cfg.tokens // 2, cfg.tokens + 1, (cfg.rows,), generator=generator)
    mask = (torch.arange(cfg.tokens)[None] < lengths[:, None])[:, None, None, :]
    # eval mode (no dropout): both ways must give the same logits
    model.eval()
    gap = (_step(model, text, mask, image, True) - _step(model, text, mask, image, False)).abs().max().item()
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    for way in (False, True):
        _step(model, text, mask, image, way)  # warm-up
    for r in range(cfg.rounds):
        for way in (False, True) if r % 2 == 0 else (True, False):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _step(model, text, mask, image, way)
            times[way].append(time.perf_counter() - start)
    every, alone = statistics.median(times[False]), statistics.median(times[True])
    report = {
        "machine": {**machine_info(), "bf16_units": cpu_has_bf16_units(), "threads": torch.get_num_threads()},
        "config": cfg,
        "shapes": {
            "rows": cfg.rows,
            "tokens": cfg.tokens,
            "image_tokens": image_tokens,
            "fusion_layers": len(model.fusion),
        },
        "every_row_s": times[False],
        "cls_only_s": times[True],
        "median_every_row_s": every,
        "median_cls_only_s": alone,
        "speedup": every / alone,
        "max_logit_gap_eval": gap,
    }
    write_json(cfg.output, report)
    print_table(
        f"fusion forward+backward, {cfg.rows} x {cfg.tokens} tokens, {len(model.fusion)} layers "
        f"({report['machine']['cpu']}, {torch.get_num_threads()} threads)",
        ["last layer", "median s", "min s", "max s"],
        [
            [name, statistics.median(v), min(v), max(v)]
            for name, v in (("every row", times[False]), ("CLS row", times[True]))
        ],
    )
    print(f"CLS row alone: {every / alone:.2f}x faster; largest ITM logit gap in eval mode {gap:.1e} -> {cfg.output}")
    return report


@config_command(BenchFusionConfig, help="Fusion encoder forward+backward: every row of the last layer vs its CLS row.")
def main(cfg: BenchFusionConfig) -> None:
    bench_fusion(cfg)


if __name__ == "__main__":
    main()
