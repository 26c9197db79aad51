"""Batches of look-alike pairs (--batch-clusters): tpas.train.data.caption_clusters and ClusteredSampler."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import TINY_TRAIN

from tpas.errors import TpasError
from tpas.train.config import TrainConfig
from tpas.train.data import ClusteredSampler, ResumableSampler, caption_clusters, first_colour_word


def test_look_alike_captions_share_a_cluster() -> None:
    running = [f"a man in a {c} jacket running fast" for c in ("red", "blue", "green", "black")]
    lying = [f"a woman in a {c} coat lying on the ground" for c in ("red", "blue", "green", "black")]
    labels = caption_clusters(running + lying, 2, seed=0)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]


def test_by_colour_splits_each_cluster_by_the_first_colour_word() -> None:
    # one wording, two actions; the first-named (upper garment's) colour varies, the trousers' does not
    running = [f"a man in a {c} jacket and black trousers running fast" for c in ("red", "red", "Blue", "blue")]
    lying = [f"a woman in a {c} coat and grey trousers lying on the ground" for c in ("red", "red", "blue", "blue")]
    plain = caption_clusters(running + lying, 2, seed=0)
    split = caption_clusters(running + lying, 2, seed=0, by_colour=True)
    assert len(set(plain)) == 2 and len(set(split)) == 4
    # a split cluster is one plain cluster's captions that name the same colour first (case aside)
    assert split[0] == split[1] != split[2] == split[3] and split[4] == split[5] != split[6] == split[7]
    assert len({split[0], split[2], split[4], split[6]}) == 4
    assert [first_colour_word(c) for c in ("A man in Navy shorts and a red cap", "a man walking", "redhead")] == [
        "navy",
        "",
        "",
    ]


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


def test_the_default_is_one_cluster_per_100_pairs_in_quarter_batch_groups() -> None:
    cfg = TrainConfig()
    assert [cfg.resolved_batch_clusters(n) for n in (10_000, 19_511, 3_000, 99)] == [100, 100, 30, 0]
    assert cfg.resolved_cluster_group() == 32
    assert [TrainConfig(batch_size=b).resolved_cluster_group() for b in (8, 6)] == [2, 1]
    given = TrainConfig(batch_clusters=7, cluster_group=16)
    assert (given.resolved_batch_clusters(10_000), given.resolved_cluster_group()) == (7, 16)
    assert TrainConfig(batch_clusters=0).resolved_batch_clusters(10_000) == 0


def test_a_default_run_saves_the_clusters_it_resolved(tmp_path, capsys) -> None:
    import json

    from fakes import write_coloured_train

    from tpas.train.loop import train

    root = write_coloured_train(tmp_path / "pab", n=216, caption="a man {i} in a red jacket is walking")
    train(TrainConfig(**{**TINY_TRAIN, "data_root": root, "runs_dir": tmp_path, "subset": 0, "steps": 2}))
    assert "batch clusters: 2 clusters of the training captions" in capsys.readouterr().out
    saved = json.loads((tmp_path / "demo/config.json").read_text())["train"]
    assert (saved["batch_clusters"], saved["cluster_group"]) == (2, 2)  # 208 pairs; a quarter of batch 8


def test_a_run_saved_before_batch_clusters_resumes_on_random_batches(tmp_path) -> None:
    from tpas.io import write_json
    from tpas.train.loop import _resolved_config

    write_json(tmp_path / "config.json", {"train": {"subset": 10000, "seed": 3}})
    merged, _ = _resolved_config(TrainConfig(resume=True), tmp_path, given=set())
    assert merged.batch_clusters == 0 and merged.seed == 3 and merged.cluster_by_colour is False


def test_a_run_keeps_its_colour_split_on_resume(tmp_path) -> None:
    from tpas.io import write_json
    from tpas.train.loop import _resolved_config

    write_json(tmp_path / "config.json", {"train": {"subset": 10000, "batch_clusters": 30, "cluster_by_colour": True}})
    merged, _ = _resolved_config(TrainConfig(resume=True), tmp_path, given=set())
    assert (merged.batch_clusters, merged.cluster_by_colour) == (30, True)
    with pytest.raises(TpasError):
        _resolved_config(TrainConfig(resume=True, cluster_by_colour=False), tmp_path, given={"cluster_by_colour"})
