from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from tpas.errors import TpasError
from tpas.metrics import ranking_metrics
from tpas.post.lists import to_lists
from tpas.post.sca import (
    SCAConfig,
    apply_sca,
    load_sentence_encoder,
    query_groups,
    top1_conflicts,
    top1_conflicts_arrays,
)
from tpas.schema import CANDIDATE_COLUMNS, candidates_frame

RED = "a man in a red jacket lying on the ground"
RED2 = "a man in a red jacket is lying on the ground"


def make(lists: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
    """Candidates table from {query: [(image, score), ...]} in rank order."""
    rows = [(q, r, img, s) for q, items in lists.items() for r, (img, s) in enumerate(items, start=1)]
    q, rank, img, score = (list(col) for col in zip(*rows))
    return candidates_frame(q, img, np.array(score), np.full(len(rows), np.nan), np.array(score), np.array(rank))


def as_lists(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {q: g.sort_values("rank")["image"].tolist() for q, g in frame.groupby("query_index", sort=False)}


def partition(groups: np.ndarray) -> set[frozenset[int]]:
    members = defaultdict(set)
    for i, g in enumerate(groups):
        members[g].add(i)
    return {frozenset(m) for m in members.values()}


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


def test_paper_example_less_confident_query_moves(encoder):
    captions = [RED, RED2]
    groups = query_groups(captions, SCAConfig(), encoder=encoder)
    assert groups[0] == groups[1]
    cands = make({"q1": [("A", 0.9), ("C", 0.5), ("D", 0.4)], "q2": [("A", 0.8), ("B", 0.7), ("E", 0.3)]})
    new, changes = apply_sca(cands, groups, ["q1", "q2"], SCAConfig())
    assert as_lists(new) == {"q1": ["A", "C", "D"], "q2": ["B", "A", "E"]}  # A re-inserted at rank 2
    assert len(changes) == 1
    row = changes.iloc[0]
    assert (row.query_index, row.old_image, row.new_image, row["round"]) == ("q2", "A", "B", 1)
    assert row.old_score == pytest.approx(0.8) and row.new_score == pytest.approx(0.7)
    assert row.delta == pytest.approx(-0.1)
    assert row.group == groups[1]


def test_query_groups_with_packaged_encoder(encoder):
    captions = [
        RED,
        RED2,
        "a woman in a blue dress walking a dog in the park",
        "a woman wearing a blue dress walks her dog in the park",
        "an elderly man sitting on a bench reading a newspaper",
        RED,
        "a man in a black coat lying on the ground",
    ]
    groups = query_groups(captions, SCAConfig(combine="cos"), encoder=encoder)
    assert partition(groups) == {frozenset({0, 1, 5}), frozenset({2, 3}), frozenset({4}), frozenset({6})}
    assert list(groups[:3]) == [0, 0, 1]  # numbered by first appearance


def test_dissimilar_queries_sharing_top1_are_untouched():
    cands = make({"q1": [("A", 0.9), ("B", 0.1)], "q2": [("A", 0.8), ("C", 0.7)]})
    new, changes = apply_sca(cands, np.array([0, 1]), ["q1", "q2"], SCAConfig())
    assert changes.empty and list(changes.columns) == [
        "query_index",
        "old_image",
        "new_image",
        "old_score",
        "new_score",
        "delta",
        "round",
        "group",
    ]
    pd.testing.assert_frame_equal(new, cands)


def test_three_way_conflict():
    cands = make({"q1": [("A", 0.7), ("B", 0.6)], "q2": [("A", 0.9), ("C", 0.5)], "q3": [("A", 0.8), ("D", 0.2)]})
    new, changes = apply_sca(cands, np.zeros(3, dtype=int), ["q1", "q2", "q3"], SCAConfig())
    assert as_lists(new) == {"q1": ["B", "A"], "q2": ["A", "C"], "q3": ["D", "A"]}
    assert sorted(changes["query_index"]) == ["q1", "q3"] and set(changes["round"]) == {1}


def test_equal_confidence_goes_to_earlier_query():
    cands = make({"q1": [("A", 0.5), ("B", 0.4)], "q2": [("A", 0.5), ("C", 0.4)]})
    new, _ = apply_sca(cands, np.zeros(2, dtype=int), ["q2", "q1"], SCAConfig())  # q2 comes first
    assert as_lists(new) == {"q2": ["A", "C"], "q1": ["B", "A"]}


def test_chain_reaction_resolved_across_rounds():
    # Round 1: q2 and q3 lose A to q1 and both move to B. Round 2: q3 is surer of B; q2 skips the
    # held A and C (q4's top-1) and lands on D; B, given up, becomes its rank 2.
    cands = make(
        {
            "q1": [("A", 0.9)],
            "q2": [("A", 0.8), ("B", 0.6), ("C", 0.5), ("D", 0.4)],
            "q3": [("A", 0.7), ("B", 0.65), ("E", 0.1)],
            "q4": [("C", 0.9), ("F", 0.1)],
        }
    )
    new, changes = apply_sca(cands, np.zeros(4, dtype=int), ["q1", "q2", "q3", "q4"], SCAConfig())
    assert as_lists(new) == {"q1": ["A"], "q2": ["D", "B", "A", "C"], "q3": ["B", "A", "E"], "q4": ["C", "F"]}
    log = changes.sort_values(["round", "query_index"])[["query_index", "old_image", "new_image", "round"]]
    assert log.values.tolist() == [["q2", "A", "B", 1], ["q3", "A", "B", 1], ["q2", "B", "D", 2]]
    assert top1_conflicts(new, np.zeros(4, dtype=int), ["q1", "q2", "q3", "q4"]) == 0


def test_moves_only_within_top_k_and_stays_when_nothing_is_free():
    cands = make(
        {
            "q1": [("A", 0.9), ("B", 0.8), ("C", 0.1)],
            "q2": [("A", 0.5), ("B", 0.4), ("C", 0.3)],
            "q3": [("B", 0.9), ("C", 0.2)],
        }
    )
    new, changes = apply_sca(cands, np.zeros(3, dtype=int), ["q1", "q2", "q3"], SCAConfig(top_k=2))
    assert changes.empty  # q2's only top-2 alternative, B, is q3's top-1; C lies beyond top_k
    new, _ = apply_sca(cands, np.zeros(3, dtype=int), ["q1", "q2", "q3"], SCAConfig(top_k=3))
    assert as_lists(new)["q2"] == ["C", "A", "B"]


def test_output_keeps_schema_order_and_pair_scores():
    rng = np.random.default_rng(3)
    order = [f"q{i}" for i in rng.permutation(40)]
    lists = {
        q: [(f"img{g}", float(s)) for g, s in zip(rng.choice(8, 6, replace=False), np.sort(rng.random(6))[::-1])]
        for q in order
    }
    cands = make(lists).sample(frac=1, random_state=0)  # rows shuffled on input
    groups = rng.integers(0, 5, size=len(order))
    new, changes = apply_sca(cands, groups, order, SCAConfig())
    assert len(changes) > 0
    assert list(new.columns) == CANDIDATE_COLUMNS and (new.dtypes == cands.dtypes).all()
    assert new["query_index"].tolist() == [q for q in order for _ in range(6)]  # query order, then rank
    assert new["rank"].tolist() == list(range(1, 7)) * len(order)
    key = ["query_index", "image"]
    merged = cands.merge(new, on=key, suffixes=("_in", "_out"))
    assert len(merged) == len(cands)
    assert (merged["score_in"] == merged["score_out"]).all() and (merged["itc_in"] == merged["itc_out"]).all()


def test_sca_raises_r1_with_ground_truth():
    cands = make({"q1": [("A", 0.9), ("C", 0.3)], "q2": [("A", 0.8), ("B", 0.7)]})
    gt = {"q1": "A", "q2": "B"}
    new, _ = apply_sca(cands, np.zeros(2, dtype=int), ["q1", "q2"], SCAConfig())
    before, after = ranking_metrics(cands, gt), ranking_metrics(new, gt)
    assert (before["R@1"], after["R@1"]) == (50.0, 100.0)
    assert after["R@5"] == before["R@5"] == 100.0


def test_combine_picks_which_similarity_makes_an_edge():
    captions = [
        RED,
        "lying on the ground, a man in a red jacket",  # same words as 0 (fuzzy 100); embedding far
        "a woman walking her dog in a sunny park",  # different words; embedding close to 0
        RED2,
    ]  # close to 0 both ways
    emb = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0.3], [1, 0.1, 0]], dtype=np.float32)

    def groups(combine: str) -> set[frozenset[int]]:
        return partition(query_groups(captions, SCAConfig(combine=combine, neighbours=3), embeddings=emb))

    def single(*ids: int) -> frozenset[int]:
        return frozenset(ids)

    assert groups("cos") == {single(0, 2, 3), single(1)}
    assert groups("fuzzy") == {single(0, 1, 3), single(2)}
    assert groups("and") == {single(0, 3), single(1), single(2)}
    assert groups("or") == {single(0, 1, 2, 3)}
    strict = SCAConfig(combine="or", cos_threshold=0.999, fuzzy_threshold=100)
    assert partition(query_groups(captions, strict, embeddings=emb)) == {single(0, 1, 3), single(2)}


def test_neighbour_limit_bounds_the_pairs_examined():
    # Ten identical-direction embeddings, distinct words: with 1 neighbour each caption only
    # meets its nearest one, yet the chain still joins; fuzzy-only on unrelated words joins none.
    captions = [f"caption number {w}" for w in "abcdefghij"]
    emb = np.stack([np.array([1.0, 0.01 * i]) for i in range(10)]).astype(np.float32)
    groups = query_groups(captions, SCAConfig(combine="cos", neighbours=1), embeddings=emb)
    assert len(set(groups)) == 1
    words = ["apple pie", "blue whale", "cold rain", "dark night", "eager fox"]
    alone = query_groups(words, SCAConfig(combine="fuzzy"), embeddings=np.eye(5, dtype=np.float32))
    assert len(set(alone)) == 5


def reference_sca(lists, scores, groups, order, top_k):
    """Plain-Python SCA as specified, to check the vectorised one against."""
    cur = {q: list(lists[q]) for q in order}
    log = []
    for rnd in range(1, 51):
        holders = defaultdict(list)
        for i, q in enumerate(order):
            holders[(groups[i], cur[q][0])].append(i)
        moves = []
        for (g, img), members in holders.items():
            keeper = min(members, key=lambda i: (-scores[(order[i], img)], i))
            for i in members:
                if i != keeper:
                    lst = cur[order[i]]
                    nxt = next((p for p in range(1, min(top_k, len(lst))) if (g, lst[p]) not in holders), None)
                    if nxt is not None:
                        moves.append((i, nxt))
        if not moves:
            break
        for i, p in moves:
            lst = cur[order[i]]
            log.append((order[i], lst[0], lst[p], rnd))
            cur[order[i]] = [lst[p]] + lst[:p] + lst[p + 1 :]
    return cur, sorted(log)


@pytest.mark.parametrize("seed,top_k", [(0, 10), (1, 4), (2, 12)])
def test_vectorised_sca_matches_reference(seed, top_k):
    rng = np.random.default_rng(seed)
    order = [f"q{i:03d}" for i in range(300)]
    popularity = 0.6 ** np.arange(40)  # a few images are everyone's favourite: many conflicts
    lists, scores = {}, {}
    for q in order:
        images = [f"img{g}" for g in rng.choice(40, size=12, replace=False, p=popularity / popularity.sum())]
        values = np.sort(rng.random(12).astype(np.float32))[::-1]
        lists[q] = images
        scores.update({(q, img): float(s) for img, s in zip(images, values)})
    groups = rng.integers(0, 60, size=len(order))
    cands = make({q: [(img, scores[(q, img)]) for img in lists[q]] for q in order})
    new, changes = apply_sca(cands, groups, order, SCAConfig(top_k=top_k))
    expected, expected_log = reference_sca(lists, scores, groups, order, top_k)
    assert as_lists(new) == expected
    got_log = sorted(changes[["query_index", "old_image", "new_image", "round"]].itertuples(index=False, name=None))
    assert got_log == expected_log and len(got_log) > 20


def test_config_rejects_bad_values():
    with pytest.raises(TpasError, match="--combine"):
        SCAConfig(combine="xor")
    with pytest.raises(TpasError, match="--cos-threshold"):
        SCAConfig(cos_threshold=1.5)


def test_array_conflict_count_matches_frame_version_and_config_checks_new_flags():
    rng = np.random.default_rng(5)
    order = [f"q{i}" for i in range(60)]
    cands = make(
        {q: [(f"img{g}", 1.0 - 0.1 * r) for r, g in enumerate(rng.choice(6, 3, replace=False))] for q in order}
    )
    groups = rng.integers(0, 8, size=60)
    lists = to_lists(cands, order)
    assert top1_conflicts_arrays(lists.img, groups) == top1_conflicts(cands, groups, order) > 0
    with pytest.raises(TpasError, match="--grouping"):
        SCAConfig(grouping="kmeans")
    with pytest.raises(TpasError, match="--knn"):
        SCAConfig(knn="annoy")


OFFLINE_LOAD = """
import os, socket
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("no network in this test")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
from tpas.post.sca import embed_captions, load_sentence_encoder
emb = embed_captions(["a man lying on the ground", "a man is lying on the ground"], load_sentence_encoder())
assert float(emb[0] @ emb[1]) > 0.9
print(attempts, os.environ.get("HF_HUB_OFFLINE"))
"""


def test_encoder_loads_with_no_network_and_leaves_hub_settings_alone():
    import subprocess
    import sys

    # A fresh process: in this one conftest has already made huggingface_hub offline for good.
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "[] None"  # no connection tried; HF_HUB_OFFLINE still unset
