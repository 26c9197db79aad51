"""How alike a batch's pairs are, by the demo's rendered attributes, for each way of drawing batches:

    python -m tpas.experiments.batches --batch-clusters 100 --batch-clusters 300
    python -m tpas.experiments.batches --batch-clusters 30 --cluster-by-colour

For train.py's subset (the same split_train_val draw: --subset, --val-size, --seed) it builds an
epoch of batches with uniformly random order and with look-alike groups (--batch-clusters K,
--cluster-group G, --cluster-by-colour; tpas.train.data.ClusteredSampler), and reports, per attribute, the share of
in-batch pairs (i, j), i != j, whose images agree on it. The higher the share, the more often an
in-batch negative differs from the positive only in the other attributes, so the more the ITC
loss asks the model to read those. Demo only (it needs annotation/demo_attributes.json); it
trains nothing and takes seconds.
"""

# ruff: noqa: RUF009

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpas.cli import config_command, field
from tpas.data import load_train_annotations, split_train_val
from tpas.errors import TpasError
from tpas.experiments.attributes import read_demo_attributes
from tpas.io import write_json
from tpas.train.data import ClusteredSampler, ResumableSampler, caption_clusters

ATTRIBUTES = ("action", "gender", "top_colour", "top_type", "bottom_colour", "bottom_type")
BOTH = "action+top_colour"  # a negative that shares both: the model reads these two already (its errors do)


@dataclass
class BatchesConfig:
    data_root: Path = field(Path("data/demo"), "A demo set (with annotation/demo_attributes.json).")
    subset: int = field(10000, "Training pairs, drawn as train.py draws them (0 = all).")
    val_size: int = field(500, "Held-out pairs, as train.py's --val-size (they are not in the batches).")
    seed: int = field(0, "train.py's --seed: the subset, the clusters and the batch order.")
    batch_size: int = field(128, "Pairs per batch.")
    batch_clusters: list[int] = field([100], "Cluster counts to measure (repeat the flag for several).")
    cluster_group: int = field(32, "Pairs drawn together from one cluster.")
    cluster_by_colour: bool = field(
        False, "Also measure each cluster count split by the first colour word (train.py's --cluster-by-colour)."
    )
    output: Path = field(Path("outputs/batches.json"), "Where the JSON report goes.")


def agreement(order: list[int], values: np.ndarray, batch_size: int) -> float:
    """Share of ordered in-batch pairs (i != j) with equal values, over the whole batches of `order`."""
    same = total = 0
    for start in range(0, len(order) // batch_size * batch_size, batch_size):
        v = values[order[start : start + batch_size]]
        same += int((v[:, None] == v[None, :]).sum()) - len(v)
        total += len(v) * (len(v) - 1)
    return same / total


def batches(cfg: BatchesConfig) -> dict[str, Any]:
    rows = {r["image"]: r for r in read_demo_attributes(cfg.data_root)}
    train = split_train_val(load_train_annotations(cfg.data_root)[0], cfg.subset or None, cfg.val_size, cfg.seed)[0]
    missing = [image for image in train["image"] if image not in rows]
    if missing:
        raise TpasError(
            f"{len(missing)} training images (e.g. {missing[0]}) have no rendered attributes; rebuild the demo."
        )
    values = {a: np.array([str(rows[image][a]) for image in train["image"]]) for a in ATTRIBUTES}
    values[BOTH] = np.char.add(np.char.add(values["action"], "|"), values["top_colour"])
    columns = (*ATTRIBUTES, BOTH)
    orders = {"random": ResumableSampler(len(train), cfg.seed, cfg.batch_size).order()}
    for k in cfg.batch_clusters:
        for by_colour in (False, True) if cfg.cluster_by_colour else (False,):
            labels = caption_clusters(train["caption"].tolist(), k, cfg.seed, by_colour)
            name = f"clusters={k}{', by colour' if by_colour else ''}, group={cfg.cluster_group}"
            orders[name] = ClusteredSampler(labels, cfg.cluster_group, cfg.seed, cfg.batch_size).order()
    report = {
        name: {a: 100 * agreement(order, values[a], cfg.batch_size) for a in columns} for name, order in orders.items()
    }
    write_json(cfg.output, {"pairs": len(train), "batch_size": cfg.batch_size, "shares": report})
    print(f"in-batch pairs that agree (%), {len(train)} training pairs, batches of {cfg.batch_size}")
    print("| batches | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, shares in report.items():
        print(f"| {name} | " + " | ".join(f"{shares[a]:.1f}" for a in columns) + " |")
    return report


@config_command(
    BatchesConfig, help="How alike in-batch pairs are (demo attributes), random against look-alike batches."
)
def main(cfg: BatchesConfig) -> None:
    batches(cfg)


if __name__ == "__main__":
    main()
