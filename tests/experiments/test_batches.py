"""python -m tpas.experiments.batches: how alike in-batch pairs are, by the demo's rendered attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tpas.errors import TpasError
from tpas.experiments.batches import BatchesConfig, agreement, batches


def test_agreement_counts_equal_pairs_within_whole_batches_only() -> None:
    values = np.array(["a", "a", "b", "b", "c", "d", "e"])
    # batches [a a b] and [b c d]; the trailing e is not a whole batch
    assert agreement([0, 1, 2, 3, 4, 5, 6], values, 3) == pytest.approx(2 / 12)
    assert agreement([0, 1, 4, 2, 3, 5], values, 3) == pytest.approx(4 / 12)


def test_look_alike_batches_share_more_than_random_ones(tiny_demo: Path, tmp_path: Path) -> None:
    cfg = BatchesConfig(
        data_root=tiny_demo,
        subset=0,
        val_size=0,
        batch_size=32,
        batch_clusters=[8],
        cluster_group=16,
        output=tmp_path / "b.json",
    )
    report = batches(cfg)
    random, clustered = report["random"], report["clusters=8, group=16"]
    assert 0 < random["action"] < clustered["action"]
    assert (tmp_path / "b.json").is_file()


def test_a_set_without_attributes_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TpasError, match="this measure needs a demo set built by"):
        batches(BatchesConfig(data_root=tmp_path))
