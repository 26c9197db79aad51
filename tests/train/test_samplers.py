"""Batches of look-alike pairs (--batch-clusters): tpas.train.data.caption_clusters and ClusteredSampler."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import TINY_TRAIN

from tpas.errors import TpasError
from tpas.train.config import TrainConfig
from tpas.train.data import ClusteredSampler, ResumableSampler, caption_clusters


def test_look_alike_captions_share_a_cluster() -> None:
    running = [f"a man in a {c} jacket running fast" for c in ("red", "blue", "green", "black")]
    lying = [f"a woman in a {c} coat lying on the ground" for c in ("red", "blue", "green", "black")]
    labels = caption_clusters(running + lying, 2, seed=0)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]


def _labels() -> np.ndarray:
    # 7 clusters of uneven sizes (3 to 40), shuffled over 150 pairs
    sizes = [40, 33, 25, 21, 17, 11, 3]
    return np.random.default_rng(1).permutation(np.repeat(np.arange(len(sizes)), sizes))


def test_each_epoch_is_every_pair_once_in_whole_groups_of_one_cluster() -> None:
    labels, group, batch = _labels(), 8, 32
    sampler = ClusteredSampler(labels, group, seed=0, batch_size=batch)
    order = sampler.order()
    assert sorted(order) == list(range(len(labels)))
    groups = [order[i : i + group] for i in range(0, sampler.batches_per_epoch() * batch, group)]
    pure = [len(set(labels[g])) == 1 for g in groups]
    # every group is one cluster's but those cut from the clusters' pooled remainders (14 pairs: one)
    pooled = sum(n % group for n in np.bincount(labels)) // group
    assert pooled == 1 and sum(pure) >= len(groups) - pooled
    # batches of uniformly random pairs are almost never pure groups
    random_order = ResumableSampler(len(labels), 0, batch).order()
    assert sum(len(set(labels[random_order[i : i + group]])) == 1 for i in range(0, 128, group)) <= 1


def test_the_groups_follow_seed_and_epoch_and_resume_part_way() -> None:
    labels = _labels()
    sampler = ClusteredSampler(labels, 8, seed=0, batch_size=32)
    first = sampler.order()
    assert ClusteredSampler(labels, 8, seed=0, batch_size=32).order() == first
    assert ClusteredSampler(labels, 8, seed=1, batch_size=32).order() != first
    sampler.epoch = 1
    assert sampler.order() != first
    full = [i for _, i in sampler]
    sampler.skip_batches = 2
    assert [i for _, i in sampler] == full[64:] and len(sampler) == len(full) - 64


@pytest.mark.parametrize(
    "kw", [{"batch_clusters": -1}, {"batch_clusters": 4, "cluster_group": 3}, {"batch_clusters": 4, "cluster_group": 0}]
)
def test_bad_cluster_settings_are_one_sentence(kw: dict) -> None:
    with pytest.raises(TpasError, match="--batch-clusters must be 0 .off. or more and --cluster-group 1 or more"):
        TrainConfig(**{**TINY_TRAIN, **kw})


def test_more_clusters_than_pairs_is_one_sentence(tmp_path) -> None:
    from fakes import write_coloured_train

    from tpas.train.loop import train

    root = write_coloured_train(tmp_path / "pab")
    cfg = TrainConfig(
        **{**TINY_TRAIN, "data_root": root, "runs_dir": tmp_path, "batch_clusters": 30, "cluster_group": 4}
    )
    with pytest.raises(TpasError, match="--batch-clusters 30 is more than the 24 training pairs"):
        train(cfg)
