"""A default `lite` training step (cached features, 128 pairs with their hard negatives, bf16 where
the CPU has bf16 units) with torch's nn.Dropout against tpas.train.dropout.FastDropout, the mask
train.py uses on a CPU. The inputs have the feature cache's shapes (computed by the model from
random pixels and token ids), so no data or cache is needed. The two alternate round by round in
one process, so a busy machine slows both alike; compare the ratio, not the seconds.

    python -m tpas.bench dropout --output docs/bench/dropout.json
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tpas.bench._common import machine_info, print_table
from tpas.cli import config_command, field
from tpas.errors import TpasError
from tpas.io import write_json
from tpas.runtime import cpu_has_bf16_units, resolve_runtime
from tpas.train.config import TrainConfig, model_config_for
from tpas.train.dropout import use_fast_dropout, use_torch_dropout


@dataclass
class BenchDropoutConfig:
    model: str = field("lite", "Model preset, with train.py's default recipe for it (a locked, cached tower).")
    batch_size: int = field(128, "Pairs per step (the default lite recipe's).")
    tokens: int = field(44, "Caption tokens per row (a default batch's longest caption, padded to).")
    rounds: int = field(6, "Timed rounds; each times both ways once, in alternating order.")
    precision: str = field("auto", "auto (bf16 where the CPU has bf16 units, as train.py), fp32 or bf16.")
    threads: int = field(0, "Torch CPU threads (0 = torch's default: all cores).")
    seed: int = field(0, "Seed for the model's new weights and the inputs.")
    output: Path = field(Path("outputs/bench/dropout.json"), "Where the results go (JSON).")


def bench_dropout(cfg: BenchDropoutConfig) -> dict:
    from tpas import models as model_lib

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runtime = resolve_runtime("cpu", cfg.precision)
    torch.manual_seed(cfg.seed)
    train_cfg = TrainConfig(model=cfg.model)
    model = model_lib.build_model(model_config_for(train_cfg))
    model.itm_pairs = train_cfg.itm_pairs
    b, g = cfg.batch_size, torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # what the feature cache would hold for these inputs
        images = torch.rand(b, 3, *model.cfg.image_size, generator=g) * 2 - 1
        ids = torch.randint(1000, 20000, (b, cfg.tokens), generator=g)
        ids[:, 0] = 101
        mask = torch.ones_like(ids)
        mask[b // 2 :, cfg.tokens * 3 // 4 :] = 0  # half the captions shorter
        features = model.image_features(images)
        states = model.text_states(ids, mask)
    inputs = {
        "images": None,
        "input_ids": ids,
        "attention_mask": mask,
        "image_features": features,
        "text_states": states,
        # PAB's hard negatives: another row's image and caption
        "hard_image_features": features.roll(1, 0),
        "hard_input_ids": ids.roll(1, 0),
        "hard_attention_mask": mask.roll(1, 0),
        "hard_text_states": states.roll(1, 0),
    }
    optimizer = torch.optim.AdamW(model.param_groups(0.01, 1e-4, 5.0), lr=1e-4)
    model.train()
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    if not plain:
        raise TpasError(f"--model {cfg.model} has no nn.Dropout to compare.")

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = model(**inputs)["loss"]
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"nn.Dropout": [], "FastDropout": []}

    def run(way: str) -> None:
        if way == "FastDropout":
            use_fast_dropout(model)
        else:
            use_torch_dropout(model)
        times[way].append(step())

    step()  # warm-up: allocator, oneDNN kernels
    for r in range(cfg.rounds):
        for way in ("nn.Dropout", "FastDropout") if r % 2 == 0 else ("FastDropout", "nn.Dropout"):
            run(way)
    torch_s, fast_s = statistics.median(times["nn.Dropout"]), statistics.median(times["FastDropout"])
    report = {
        "machine": {**machine_info(), "bf16_units": cpu_has_bf16_units(), "threads": torch.get_num_threads()},
        "config": cfg,
        "precision": runtime.precision,
        "dropout_modules": plain,
        "shapes": {"image_features": list(features.shape), "text_states": list(states.shape)},
        "torch_dropout_s": times["nn.Dropout"],
        "fast_dropout_s": times["FastDropout"],
        "median_torch_dropout_s": torch_s,
        "median_fast_dropout_s": fast_s,
        "speedup": torch_s / fast_s,
    }
    write_json(cfg.output, report)
    print_table(
        f"lite training step, {b} pairs + hard negatives, {runtime.precision}, {plain} dropout modules "
        f"({report['machine']['cpu']}, {torch.get_num_threads()} threads)",
        ["dropout", "median s", "min s", "max s"],
        [[name, statistics.median(v), min(v), max(v)] for name, v in times.items()],
    )
    print(f"FastDropout: the step {torch_s / fast_s:.2f}x faster -> {cfg.output}")
    return report


@config_command(BenchDropoutConfig, help="A lite training step with torch's dropout against the fast CPU mask.")
def main(cfg: BenchDropoutConfig) -> None:
    bench_dropout(cfg)


if __name__ == "__main__":
    main()
