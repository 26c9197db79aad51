import dataclasses
import json
from itertools import permutations

import numpy as np
import pandas as pd
import pytest
from scipy.special import log_softmax

from tpas.errors import TpasError
from tpas.metrics import array_metrics, ranking_metrics
from tpas.post.lists import gt_codes_for, to_lists
from tpas.post.methods import (
    LOG_COLUMNS,
    METHODS,
    REGISTRY,
    Method,
    PostprocessConfig,
    Step,
    apply_methods,
    load_params,
    method_grid,
    parse_methods,
    tune,
)
from tpas.post.sca import SCAConfig, cached_embeddings, query_groups
from tpas.post.stage import SCAStageConfig, run_sca_stage
from tpas.schema import CANDIDATE_COLUMNS, candidates_frame, queries_frame


def make(lists: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
    """Candidates table from {query: [(image, score), ...]} in rank order."""
    rows = [(q, r, img, s) for q, items in lists.items() for r, (img, s) in enumerate(items, start=1)]
    q, rank, img, score = (list(col) for col in zip(*rows))
    return candidates_frame(q, img, np.array(score), np.full(len(rows), np.nan), np.array(score), np.array(rank))


def queries(ids: list[str], captions: list[str] | None = None, gt: list[str] | None = None) -> pd.DataFrame:
    return queries_frame(ids, captions or [f"caption {q}" for q in ids], gt)


def as_lists(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {q: g.sort_values("rank")["image"].tolist() for q, g in frame.groupby("query_index", sort=False)}


def new_scores(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(q, i): float(s) for q, i, s in frame[["query_index", "image", "score"]].itertuples(index=False)}


def pair_embeddings(cosines: list[float]) -> np.ndarray:
    """Two rows per entry, with that cosine between them; rows of different pairs are orthogonal."""
    emb = np.zeros((2 * len(cosines), 2 * len(cosines)), dtype=np.float32)
    for i, c in enumerate(cosines):
        emb[2 * i, 2 * i] = 1.0
        emb[2 * i + 1, 2 * i], emb[2 * i + 1, 2 * i + 1] = c, np.sqrt(1 - c * c)
    return emb


def test_paper_example_two_similar_queries():
    # Two near-identical captions share top-1 A; the less confident one (q2) moves to its 2nd choice.
    cands = make({"q1": [("A", 0.9), ("C", 0.5), ("D", 0.4)], "q2": [("A", 0.8), ("B", 0.7), ("E", 0.3)]})
    qs = queries(
        ["q1", "q2"], ["a man in a red jacket lying on the ground", "a man in a red jacket is lying on the ground"]
    )
    new, log = apply_methods(cands, qs, ["sca"], PostprocessConfig(), embeddings=pair_embeddings([0.97]))
    assert as_lists(new) == {"q1": ["A", "C", "D"], "q2": ["B", "A", "E"]}
    assert log[["method", "query_index", "old_image", "new_image"]].values.tolist() == [["sca", "q2", "A", "B"]]
    assert log["delta"].iloc[0] == pytest.approx(-0.1)
    # Unlike captions (cosine 0.2, no shared words) are not grouped: nothing moves.
    far = queries(["q1", "q2"], ["red jacket lying", "blue dress walking"])
    new, log = apply_methods(cands, far, ["sca"], PostprocessConfig(), embeddings=pair_embeddings([0.2]))
    assert log.empty and as_lists(new) == as_lists(cands)


def test_assign_resolves_cyclic_conflict_to_the_optimum():
    # All three want A. Score given up: q1→B 0.1; q2→B 1.0 or C 1.5; q3→C 0.2 or B 0.15.
    # Keeper q1: 1.2 (q2→B, q3→C); keeper q3: 1.6; keeper q2: 0.3 (q1→B, q3→C), the optimum.
    # Confidence alone (SCA's rule) cannot tell them apart: all score A at 5.0.
    cands = make(
        {
            "q1": [("A", 5.0), ("B", 4.9), ("D", 1.0)],
            "q2": [("A", 5.0), ("B", 4.0), ("C", 3.5)],
            "q3": [("A", 5.0), ("B", 4.85), ("C", 4.8)],
        }
    )
    qs = queries(["q1", "q2", "q3"])
    new, log = apply_methods(cands, qs, ["assign"], PostprocessConfig(assign_margin=2.0))
    assert as_lists(new) == {"q1": ["B", "A", "D"], "q2": ["A", "B", "C"], "q3": ["C", "A", "B"]}
    assert sorted(log["query_index"]) == ["q1", "q3"] and set(log["method"]) == {"assign"}
    assert log.set_index("query_index")["delta"].round(6).to_dict() == {"q1": -0.1, "q3": -0.2}
    # Scores stay with their pairs.
    assert new_scores(new) == new_scores(cands)
    # Brute force over every way to give the three queries distinct images agrees.
    options = {
        q: dict(items)
        for q, items in {
            "q1": [("A", 5.0), ("B", 4.9), ("D", 1.0)],
            "q2": [("A", 5.0), ("B", 4.0), ("C", 3.5)],
            "q3": [("A", 5.0), ("B", 4.85), ("C", 4.8)],
        }.items()
    }
    best = min(
        (sum(5.0 - options[q][img] for q, img in zip(options, pick)), pick)
        for pick in permutations(["A", "B", "C", "D"], 3)
        if all(i in options[q] for q, i in zip(options, pick))
    )
    assert list(best[1]) == [as_lists(new)[q][0] for q in ("q1", "q2", "q3")]


def test_assign_margin_keeps_first_choice_when_alternatives_are_far():
    cands = make({"q1": [("A", 5.0), ("B", 4.9)], "q2": [("A", 4.0), ("C", 3.0)]})
    qs = queries(["q1", "q2"])
    _, log = apply_methods(cands, qs, ["assign"], PostprocessConfig(assign_margin=0.05))
    assert log.empty  # q1 would give up 0.1 and q2 1.0: both above the margin
    new, _ = apply_methods(cands, qs, ["assign"], PostprocessConfig(assign_margin=0.5))
    assert as_lists(new) == {"q1": ["B", "A"], "q2": ["A", "C"]}  # the cheaper move: q1 gives up 0.1


def dense(scores: np.ndarray) -> pd.DataFrame:
    """Full lists: every query lists every image, in score order."""
    images = [f"g{j}" for j in range(scores.shape[1])]
    return make({f"q{i}": sorted(zip(images, map(float, row)), key=lambda t: -t[1]) for i, row in enumerate(scores)})


def test_dual_softmax_gives_the_hub_to_its_owner_and_matches_dense_reference():
    # g0 is everyone's top-1, but q0 scores it far higher than anyone: it is q0's.
    scores = np.array([[6.0, 1.0, 0.5, 0.0], [4.0, 3.8, 1.0, 0.2], [4.0, 0.5, 3.7, 1.0], [3.9, 1.0, 0.3, 3.6]])
    ids = [f"q{i}" for i in range(4)]
    cands = dense(scores)
    assert {q: lst[0] for q, lst in as_lists(cands).items()} == dict.fromkeys(ids, "g0")
    for t in (0.5, 1.0, 2.0):
        new, log = apply_methods(cands, queries(ids), ["dual-softmax"], PostprocessConfig(temperature=t))
        reference = log_softmax(scores / t, axis=1) + log_softmax(scores / t, axis=0)
        got = new_scores(new)
        for i in range(4):
            for j in range(4):
                assert got[(f"q{i}", f"g{j}")] == pytest.approx(reference[i, j], abs=1e-4)
            expected_order = [f"g{j}" for j in np.argsort(-reference[i], kind="stable")]
            assert as_lists(new)[f"q{i}"] == expected_order
    new, log = apply_methods(cands, queries(ids), ["dual-softmax"], PostprocessConfig(temperature=1.0))
    assert {q: lst[0] for q, lst in as_lists(new).items()} == {"q0": "g0", "q1": "g1", "q2": "g2", "q3": "g3"}
    assert sorted(log["query_index"]) == ["q1", "q2", "q3"] and (log["method"] == "dual-softmax").all()
    assert (new.groupby("query_index")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()


def test_inverted_softmax_matches_dense_reference_and_normalises_over_holders_only():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 6)) * 2
    ids = [f"q{i}" for i in range(5)]
    new, _ = apply_methods(dense(scores), queries(ids), ["inverted-softmax"], PostprocessConfig(temperature=0.7))
    reference = log_softmax(scores / 0.7, axis=0)
    got = new_scores(new)
    assert all(got[(f"q{i}", f"g{j}")] == pytest.approx(reference[i, j], abs=1e-4) for i in range(5) for j in range(6))
    # Partial lists: X is held by q1 only, so log p(q1|X) = 0; A's normaliser covers q1 and q2 only.
    cands = make({"q1": [("A", 2.0), ("X", 1.0)], "q2": [("A", 1.0), ("B", 0.5)], "q3": [("B", 3.0)]})
    got = new_scores(apply_methods(cands, queries(["q1", "q2", "q3"]), ["inverted-softmax"], PostprocessConfig())[0])
    assert got[("q1", "X")] == pytest.approx(0.0, abs=1e-6)
    assert got[("q1", "A")] == pytest.approx(2.0 - np.logaddexp(2.0, 1.0), abs=1e-6)
    assert got[("q2", "B")] == pytest.approx(0.5 - np.logaddexp(0.5, 3.0), abs=1e-6)


def test_rerank_prefers_the_reciprocal_neighbour():
    # k = 2. A's two strongest holders are q3 and q2, so q1–A is not reciprocal; q1–B is.
    # R(q1)={B}, R(q2)={A,C}, R(q3)={A,B}; w_A={A:.5,B:.25,C:.25}, w_B={A:.25,B:.75}, w_C={A:.5,C:.5}.
    # J = m/(2-m) with m = Σ min(u_q, w_g): J(q1,A)=1/7, J(q1,B)=.6, J(q2,A)=.6, J(q2,C)=1, J(q3,·)=.6.
    cands = make({"q1": [("A", 0.9), ("B", 0.8)], "q2": [("A", 0.95), ("C", 0.7)], "q3": [("A", 0.99), ("B", 0.85)]})
    new, log = apply_methods(
        cands, queries(["q1", "q2", "q3"]), ["rerank"], PostprocessConfig(rerank_k=2, rerank_lambda=1.0)
    )
    got = new_scores(new)
    expected = {
        ("q1", "A"): 0.9 + 1 / 7,
        ("q1", "B"): 0.8 + 0.6,
        ("q2", "A"): 0.95 + 0.6,
        ("q2", "C"): 0.7 + 1.0,
        ("q3", "A"): 0.99 + 0.6,
        ("q3", "B"): 0.85 + 0.6,
    }
    assert got == pytest.approx(expected, abs=1e-6)
    assert as_lists(new) == {"q1": ["B", "A"], "q2": ["C", "A"], "q3": ["A", "B"]}
    assert sorted(log["query_index"]) == ["q1", "q2"]
    # λ = 0 changes nothing.
    same, log = apply_methods(cands, queries(["q1", "q2", "q3"]), ["rerank"], PostprocessConfig(rerank_lambda=0.0))
    assert log.empty and as_lists(same) == as_lists(cands)


def test_composition_writes_valid_schema_and_logs_each_method():
    rng = np.random.default_rng(1)
    ids = [f"q{i:02d}" for i in rng.permutation(30)]
    lists = {
        q: [(f"img{g}", float(s)) for g, s in zip(rng.choice(12, 8, replace=False), np.sort(rng.random(8) * 5)[::-1])]
        for q in ids
    }
    cands = make(lists).sample(frac=1, random_state=0)  # rows shuffled on input
    emb = np.repeat(np.eye(6, dtype=np.float32), 5, axis=0) + rng.normal(scale=0.01, size=(30, 6)).astype(np.float32)
    qs = queries(ids)
    new, log = apply_methods(cands, qs, parse_methods("dual-softmax,sca"), PostprocessConfig(), embeddings=emb)
    assert list(new.columns) == CANDIDATE_COLUMNS and (new.dtypes == cands.dtypes).all()
    assert new["query_index"].tolist() == [q for q in ids for _ in range(8)]
    assert new["rank"].tolist() == list(range(1, 9)) * 30
    assert list(log.columns) == LOG_COLUMNS and set(log["method"]) <= {"dual-softmax", "sca"} and len(log)
    assert (log[log["method"] == "sca"]["group"] >= 0).all()
    # By hand: q1 and q2 (similar captions) still share S after dual-softmax; sca then moves q2,
    # the less confident by the dual-softmax scores it receives, log p(S|q) + log p(q|S).
    small = make({"q1": [("S", 5.0), ("V", 1.0)], "q2": [("S", 4.9), ("T", 4.0)], "q3": [("T", 6.0), ("U", 1.0)]})
    out, log = apply_methods(
        small,
        queries(["q1", "q2", "q3"]),
        ["dual-softmax", "sca"],
        PostprocessConfig(combine="cos"),
        embeddings=np.array([[1, 0], [1, 0.01], [0, 1]], dtype=np.float32),
    )
    assert as_lists(out) == {"q1": ["S", "V"], "q2": ["T", "S"], "q3": ["T", "U"]}
    assert log[["method", "query_index", "old_image", "new_image"]].values.tolist() == [["sca", "q2", "S", "T"]]
    dual_q2_s = (4.9 - np.logaddexp(4.9, 4.0)) + (4.9 - np.logaddexp(5.0, 4.9))
    assert dual_q2_s < (5.0 - np.logaddexp(5.0, 1.0)) + (5.0 - np.logaddexp(5.0, 4.9))  # q1's: q1 keeps S
    assert log["old_score"].iloc[0] == pytest.approx(dual_q2_s, abs=1e-5)
    # Every method on its own and all chained keep the (query, image) pairs.
    for methods in (["assign"], ["inverted-softmax"], ["rerank"], ["sca", "assign", "rerank", "dual-softmax"]):
        out, log = apply_methods(cands, qs, methods, PostprocessConfig(), embeddings=emb)
        assert len(out) == len(cands) and set(map(tuple, out[["query_index", "image"]].values)) == set(
            map(tuple, cands[["query_index", "image"]].values)
        )
        assert out.groupby("query_index")["rank"].apply(list).tolist() == [list(range(1, 9))] * 30
        assert set(log["method"]) <= set(methods)
    with pytest.raises(TpasError, match="--method"):
        parse_methods("sca,magic")


def test_registry_fields_are_the_ones_the_help_text_names():
    # Each config field's help starts with the methods that read it ("sca, assign: ..."), which the
    # results report parses: it must agree with the registry's `fields`; a grid only sets its method's fields.
    assert METHODS == list(REGISTRY)
    lists = to_lists(make({"q1": [("A", 3.0), ("B", 1.0)], "q2": [("B", 2.0), ("A", 0.5)]}), ["q1", "q2"])
    for f in dataclasses.fields(PostprocessConfig):
        named = {m.strip() for m in f.metadata["help"].split(":", 1)[0].split(",")}
        assert named == {name for name, m in REGISTRY.items() if f.name in m.fields}, f.name
    for name, entry in REGISTRY.items():
        grid = method_grid(name, lists, PostprocessConfig())
        assert grid and all(set(setting) <= set(entry.fields) for setting in grid), name
    with pytest.raises(TpasError, match="unknown post-processing method 'magic'"):
        method_grid("magic", lists, PostprocessConfig())


def test_a_new_method_is_one_function_and_one_registry_entry(monkeypatch):
    # "swap": each query's first top_k candidates in reverse order (scores stay with their pairs).
    def swap(lists, params, ctx):
        perm = np.tile(np.arange(lists.img.shape[1]), (len(lists.img), 1))
        perm[:, : params.top_k] = perm[:, : params.top_k][:, ::-1]
        return Step(perm)

    monkeypatch.setitem(REGISTRY, "swap", Method(swap, lambda scale: [{"top_k": 2}, {"top_k": 3}], ("top_k",)))
    cands = make({"q1": [("A", 3.0), ("B", 2.0), ("C", 1.0)], "q2": [("D", 3.0), ("E", 2.0), ("F", 1.0)]})
    new, log = apply_methods(cands, queries(["q1", "q2"]), ["swap"], PostprocessConfig(top_k=3))
    assert as_lists(new) == {"q1": ["C", "B", "A"], "q2": ["F", "E", "D"]} and new_scores(new) == new_scores(cands)
    assert log["method"].tolist() == ["swap", "swap"] and log["new_image"].tolist() == ["C", "F"]
    # In a chain with a built-in method (dual softmax keeps these lists' order: no image is shared).
    new, log = apply_methods(cands, queries(["q1", "q2"]), "dual-softmax,swap", PostprocessConfig(top_k=2))
    assert as_lists(new) == {"q1": ["B", "A", "C"], "q2": ["E", "D", "F"]} and set(log["method"]) == {"swap"}
    best, report = tune(cands, queries(["q1", "q2"], gt=["B", "E"]), ["swap"], PostprocessConfig())
    assert best.top_k == 2 and report["chosen"] == {"swap": {"top_k": 2}} and report["final"]["R@1"] == 100.0


def test_array_metrics_equal_ranking_metrics():
    rng = np.random.default_rng(2)
    ids = [f"q{i}" for i in range(50)]
    cands = make({q: [(f"g{g}", 1.0) for g in rng.choice(30, 10, replace=False)] for q in ids})
    gt = [f"g{g}" for g in rng.integers(0, 30, 50)]
    qs = queries(ids, gt=gt)
    lists = to_lists(cands, ids)
    got = array_metrics(lists.img, gt_codes_for(lists, qs))
    want = ranking_metrics(cands, dict(zip(ids, gt)))
    assert got["R@1"] == want["R@1"] and got["R@5"] == want["R@5"] and got["mAP"] == pytest.approx(want["mAP"])


def tune_case() -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Pairs of queries sharing a top-1. At cosine 0.87 the less confident one belongs to its 2nd
    choice (SCA helps); at cosine 0.82 it owns the shared image (SCA hurts). Best: cos_threshold 0.85."""
    lists, captions, gt, cosines = {}, [], [], []
    for i in range(6):
        helps = i % 2 == 0
        a, b = f"p{i}a", f"p{i}b"
        lists[a] = [(f"S{i}", 0.9), (f"X{i}", 0.2)]
        lists[b] = [(f"S{i}", 0.8), (f"T{i}", 0.7)]
        gt += [f"S{i}", f"T{i}"] if helps else [f"X{i}", f"S{i}"]
        captions += [f"pair {i} first wording", f"pair {i} second"]
        cosines.append(0.87 if helps else 0.82)
    ids = list(lists)
    return make(lists), queries(ids, captions, gt), pair_embeddings(cosines)


def test_tune_picks_the_known_best_threshold_and_params_reload(tmp_path):
    cands, qs, emb = tune_case()
    params = PostprocessConfig(combine="cos")
    best, report = tune(cands, qs, ["sca"], params, embeddings=emb)
    assert best.cos_threshold == 0.85 and report["chosen"]["sca"]["cos_threshold"] == 0.85
    by_cos = {r["cos_threshold"]: r["R@1"] for r in report["grid"]["sca"] if r["fuzzy_threshold"] == 75.0}
    assert by_cos[0.85] > by_cos[0.8] and by_cos[0.85] > by_cos[0.9]
    assert report["final"]["R@1"] > report["baseline"]["R@1"]
    with pytest.raises(TpasError, match="gt_image"):
        tune(cands, queries(list(qs["query_index"])), ["sca"], params, embeddings=emb)

    # The stage: --tune writes tuned.json, --params applies it (methods included).
    class Lookup:
        def encode(self, sentences, **kwargs):
            table = dict(zip(qs["caption"], emb))
            return np.stack([table[s] for s in sentences])

    val = tmp_path / "val"
    val.mkdir()
    cands.to_parquet(val / "candidates.parquet")
    qs.to_parquet(val / "queries.parquet")
    run_sca_stage(
        SCAStageConfig(
            input_dir=val, output_dir=tmp_path / "sca", tune=val, combine="cos", method="sca,assign", cache_dir=None
        ),
        encoder=Lookup(),
    )
    data = json.loads((tmp_path / "sca" / "tuned.json").read_text())
    assert data["methods"] == ["sca", "assign"] and data["params"]["cos_threshold"] == 0.85
    assert set(data["grid"]) == {"sca", "assign"} and len(data["grid"]["sca"]) == 15
    loaded, methods = load_params(tmp_path / "sca" / "tuned.json")
    assert loaded.cos_threshold == 0.85 and methods == ["sca", "assign"]
    summary = run_sca_stage(
        SCAStageConfig(
            input_dir=val, output_dir=tmp_path / "test", params=tmp_path / "sca" / "tuned.json", cache_dir=None
        ),
        encoder=Lookup(),
    )
    assert summary["methods"] == ["sca", "assign"]
    assert summary["metrics"]["after"]["R@1"] == pytest.approx(data["final"]["R@1"])
    changes = pd.read_csv(tmp_path / "test" / "changes.csv")
    assert list(changes.columns) == LOG_COLUMNS and set(changes["method"]) <= {"sca", "assign"}


def test_ivf_grouping_equals_exact_on_well_separated_clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(200, 32))
    emb = np.repeat(centres, 10, axis=0) + rng.normal(scale=0.02, size=(2000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    captions = [f"caption {i}" for i in range(2000)]
    exact = query_groups(captions, SCAConfig(combine="cos", knn="exact", neighbours=12), embeddings=emb)
    ivf = query_groups(captions, SCAConfig(combine="cos", knn="ivf", neighbours=12, nprobe=8), embeddings=emb)
    assert (exact == ivf).all() and len(set(exact)) == 200


def test_agglomerative_splits_a_chain_that_components_join():
    # Angles 0, .3, .6, .9 rad: neighbours have cosine .955 (edges at 0.9), the ends only .62.
    angles = np.array([0.0, 0.3, 0.6, 0.9])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    captions = ["w", "x", "y", "z"]
    comps = query_groups(captions, SCAConfig(combine="cos", neighbours=3), embeddings=emb)
    agglo = query_groups(captions, SCAConfig(combine="cos", neighbours=3, grouping="agglomerative"), embeddings=emb)
    assert len(set(comps)) == 1
    assert list(agglo) == [0, 0, 1, 1]


def test_embedding_cache_is_reused(tmp_path):
    calls = []

    class Counting:
        cache_key = "counting-v1"

        def encode(self, sentences, **kwargs):
            calls.append(list(sentences))
            return np.ones((len(sentences), 3))

    first = cached_embeddings(["a", "b"], Counting(), tmp_path)
    again = cached_embeddings(["a", "b"], Counting(), tmp_path)
    other = cached_embeddings(["a", "c"], Counting(), tmp_path)
    assert len(calls) == 2 and np.array_equal(first, again) and other.shape == (2, 3)
    assert len(list(tmp_path.glob("captions-*.npy"))) == 2
