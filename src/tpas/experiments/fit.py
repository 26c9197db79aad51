"""How much of a run's error is fitting and how much is generalising:

    python -m tpas.experiments.fit --run runs/<name>

train.py's validation protocol (ITC text-to-image R@1 over a set of pairs, the gallery their
distinct images) on the run's held-out validation pairs, and on as many of its *training* pairs
(the first ones of its saved subset, so a re-run measures the same pairs). A model that ranks its
training pairs far better than its held-out ones is overfitting (more pairs or regularisation
should help); one that ranks both alike but low is underfitting (more capacity or steps should).
The pairs come from the run's subset.json, read from --data-root (the data the run trained on).
"""

# ruff: noqa: RUF009

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpas import models as model_lib
from tpas.cli import config_command, field
from tpas.data import load_train_annotations
from tpas.errors import TpasError
from tpas.io import read_json, write_json
from tpas.train.loop import validate


@dataclass
class FitConfig:
    run: Path = field(Path("runs/demo"), "Run directory (train.py's output: config.json, subset.json, weights).")
    data_root: Path = field(Path("data/demo"), "PAB-layout data root the run trained on.")
    threads: int = field(0, "Torch CPU threads (0 = torch's default: all cores).")
    output: Path | None = field(None, "Where the JSON report goes (default: <run>/fit.json).")


def fit(cfg: FitConfig) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    subset_file = cfg.run / "subset.json"
    if not subset_file.is_file():
        raise TpasError(f"{subset_file} not found: --run must be a train.py run directory.")
    subset = read_json(subset_file)
    if not subset.get("val"):
        raise TpasError(f"{subset_file} has no validation pairs: train the run with --val-size above 0.")
    frame = load_train_annotations(cfg.data_root)[0].set_index("image_id", drop=False)
    parts = {"held_out": subset["val"], "train": subset["train"][: len(subset["val"])]}
    missing = [i for ids in parts.values() for i in ids if i not in frame.index]
    if missing:
        raise TpasError(
            f"{subset_file}: {len(missing)} pairs (e.g. {missing[0]}) are not in {cfg.data_root}; "
            "give the --data-root the run trained on."
        )
    model, model_cfg = model_lib.load_run_model(cfg.run)
    transform = model_lib.image_transform(model_cfg, train=False)
    text = model_lib.build_text_pipeline(model_cfg)
    report: dict[str, Any] = {"run": str(cfg.run), "pairs": len(subset["val"])}
    for part, ids in parts.items():
        report[part] = validate(model, frame.loc[ids].reset_index(drop=True), cfg.data_root, transform, text)
    report["gap_R@1"] = report["train"]["R@1"] - report["held_out"]["R@1"]
    write_json(cfg.output or cfg.run / "fit.json", report)
    print(
        f"{cfg.run}: ITC R@1 on {report['pairs']} held-out pairs {report['held_out']['R@1']:.2f}, "
        f"on as many training pairs {report['train']['R@1']:.2f} (gap {report['gap_R@1']:+.2f})"
    )
    return report


@config_command(FitConfig, help="A run's ITC R@1 on its held-out pairs and on as many of its training pairs.")
def main(cfg: FitConfig) -> None:
    fit(cfg)


if __name__ == "__main__":
    main()
