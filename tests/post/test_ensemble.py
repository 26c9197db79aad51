"""tpas.post.ensemble: score fusion of several stage dirs into one, on small hand-made candidate tables."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tpas.errors import TpasError
from tpas.io import write_parquet
from tpas.metrics import ranking_metrics
from tpas.post.ensemble import EnsembleConfig, main, normalise, run_ensemble
from tpas.schema import (
    CANDIDATE_COLUMNS,
    candidates_frame,
    queries_frame,
    read_candidates,
    read_queries,
)
from tpas.submission import SubmitConfig, run_submit_stage


def stage(
    root: Path, name: str, lists: dict[str, list[tuple[str, float]]], gt: dict[str, str] | None = None, itm: bool = True
) -> Path:
    """Write a stage dir: per query, (image, score) best first; itc = 2 × score, itm = score - 1 (or NaN)."""
    d = root / name
    q = [qi for qi, rows in lists.items() for _ in rows]
    images = [img for rows in lists.values() for img, _ in rows]
    score = np.array([s for rows in lists.values() for _, s in rows])
    rank = np.concatenate([np.arange(1, len(rows) + 1) for rows in lists.values()])
    itm_values = score - 1 if itm else np.full(len(score), np.nan)
    write_parquet(d / "candidates.parquet", candidates_frame(q, images, 2 * score, itm_values, score, rank))
    ids = list(lists)
    write_parquet(
        d / "queries.parquet", queries_frame(ids, [f"caption {i}" for i in ids], [gt[i] for i in ids] if gt else None)
    )
    return d


def fused_lists(out: Path) -> dict[str, list[str]]:
    cand = read_candidates(out)
    return {q: g.sort_values("rank")["image"].tolist() for q, g in cand.groupby("query_index", sort=False)}


# Each model alone gets one of the two queries wrong (true images: b, x); their equal-weight sum gets both.
MODEL_A = {"q1": [("a", 0.9), ("b", 0.8), ("c", 0.0)], "q2": [("x", 0.6), ("y", 0.5), ("z", 0.0)]}
MODEL_B = {"q1": [("b", 0.9), ("c", 0.5), ("a", 0.1)], "q2": [("y", 0.7), ("x", 0.65), ("z", 0.0)]}
TRUTH = {"q1": "b", "q2": "x"}


def test_fusion_fixes_what_each_model_gets_wrong(tmp_path, capsys):
    a, b = stage(tmp_path, "a", MODEL_A, TRUTH), stage(tmp_path, "b", MODEL_B, TRUTH)
    out = tmp_path / "fused"
    result = CliRunner().invoke(
        main,
        [
            "--input-dir",
            str(a),
            "--input-dir",
            str(b),
            "--weight",
            "1",
            "--weight",
            "1",
            "--normalize",
            "none",
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ensemble: 2 inputs" in result.output
    lists = fused_lists(out)
    assert lists == {"q1": ["b", "a", "c"], "q2": ["x", "y", "z"]}
    cand = read_candidates(out)
    # Hand sums, 0.5 × A + 0.5 × B: q1 b 0.85, a 0.5, c 0.25; q2 x 0.625, y 0.6, z 0.
    assert cand["score"].tolist() == pytest.approx([0.85, 0.5, 0.25, 0.625, 0.6, 0.0])
    assert cand["rank"].tolist() == [1, 2, 3, 1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["R@1"] for m in metrics["inputs"]] == [50.0, 50.0]
    assert metrics["ensemble"]["R@1"] == 100.0
    config = json.loads((out / "ensemble_config.json").read_text())
    assert config["weight"] == [0.5, 0.5] and config["k"] == 3 and config["normalize"] == "none"

    # The weights matter: leaning on A reproduces A's mistake on q1.
    run_ensemble(EnsembleConfig(input_dir=[a, b], weight=[0.95, 0.05], normalize="none", output_dir=tmp_path / "lean"))
    assert fused_lists(tmp_path / "lean")["q1"][0] == "a"
    assert json.loads((tmp_path / "lean" / "metrics.json").read_text())["ensemble"]["R@1"] == 50.0
    assert "R@1 50.00 / 50.00 → 50.00" in capsys.readouterr().out


def test_metrics_json_equals_ranking_metrics_of_inputs_and_output(tmp_path):
    # metrics.json is computed on codes (no string table); it must be ranking_metrics' result exactly.
    rng = np.random.default_rng(5)
    ids = [f"q{i}" for i in range(60)]
    truth = {q: f"g{rng.integers(0, 50)}" for q in ids if rng.random() < 0.7}  # g40..g49 are in no list
    dirs = []
    for name in ("a", "b"):
        lists = {
            q: list(zip((f"g{g}" for g in rng.choice(40, 12, replace=False)), -np.sort(-rng.normal(size=12))))
            for q in ids
        }
        dirs.append(stage(tmp_path, name, lists))
        queries_frame(ids, [f"caption {i}" for i in ids], [truth.get(q) for q in ids]).to_parquet(
            dirs[-1] / "queries.parquet"
        )
    out = tmp_path / "fused"
    run_ensemble(EnsembleConfig(input_dir=dirs, output_dir=out, k=15))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"] == ranking_metrics(read_candidates(out), truth)
    assert [{k: v for k, v in m.items() if k not in ("dir", "weight")} for m in metrics["inputs"]] == [
        ranking_metrics(read_candidates(d), truth) for d in dirs
    ]


def test_normalisation_matches_hand_computation():
    # Query 0 scores 3, 1, 0 (sorted descending); query 1 is a tie 5, 5; query 2 has no rows.
    nan = np.nan
    value, count = np.array([[3.0, 1.0, 0.0], [5.0, 5.0, nan], [nan, nan, nan]]), np.array([3, 2, 0])
    root14 = np.sqrt(14.0)  # mean 4/3, population variance 14/9 → std √14 / 3
    expected = {
        "zscore": [5 / root14, -1 / root14, -4 / root14, 0.0, 0.0],
        "minmax": [1.0, 1 / 3, 0.0, 0.0, 0.0],
        "rank": [1 / 61, 1 / 62, 1 / 63, 1 / 61, 1 / 62],
        "none": [3.0, 1.0, 0.0, 5.0, 5.0],
    }
    for method, want in expected.items():
        norm, fill = normalise(value, count, method, rrf_k=60.0)
        assert norm.ravel()[[0, 1, 2, 3, 4]] == pytest.approx(want), method
        assert np.isnan(norm.ravel()[5:]).all(), method  # padding
        assert fill[:2] == pytest.approx([want[2], want[4]]), method  # each query's minimum
        assert np.isnan(fill[2])


@pytest.mark.parametrize("method", ["zscore", "minmax", "rank"])
def test_single_model_scores_are_its_normalised_scores(tmp_path, method):
    lists = {"q1": [("a", 3.0), ("b", 1.0), ("c", 0.0)]}
    out = tmp_path / "out"
    run_ensemble(EnsembleConfig(input_dir=[stage(tmp_path, "m", lists)], normalize=method, output_dir=out))
    want, _ = normalise(np.array([[3.0, 1.0, 0.0]]), np.array([3]), method)
    assert read_candidates(out)["score"].tolist() == pytest.approx(want[0].tolist())


def test_missing_pair_gets_the_models_minimum(tmp_path):
    # A ranks a, b, c; B ranks d, a (b, c missing from B; d missing from A). Rank normalisation, rrf_k 60.
    a = stage(tmp_path, "a", {"q": [("a", 3.0), ("b", 1.0), ("c", 0.0)]})
    b = stage(tmp_path, "b", {"q": [("d", 2.0), ("a", 1.0)]})
    out = tmp_path / "out"
    run_ensemble(EnsembleConfig(input_dir=[a, b], normalize="rank", output_dir=out))
    cand = read_candidates(out).set_index("image")
    fill_a, fill_b = 1 / 63, 1 / 62  # A's 3rd (last) and B's 2nd (last) reciprocal ranks
    want = {"a": (1 / 61 + 1 / 62) / 2, "d": (fill_a + 1 / 61) / 2, "b": (1 / 62 + fill_b) / 2}
    assert cand.loc[list(want), "score"].tolist() == pytest.approx(list(want.values()), rel=1e-6)
    # c, (1/63 + fill_b) / 2, is 4th of the union and k defaults to the largest input k (3).
    assert cand.sort_values("rank").index.tolist() == ["a", "d", "b"]
    # itc/itm: weighted mean over the models that have the pair (a: both; b: A only; d: B only).
    assert cand.loc["a", "itc"] == pytest.approx((6.0 + 2.0) / 2)
    assert cand.loc["b", "itc"] == pytest.approx(2.0)
    assert cand.loc["d", "itm"] == pytest.approx(1.0)


def test_single_input_weight_one_reproduces_its_ranking(tmp_path):
    rng = np.random.default_rng(0)
    lists = {
        f"q{i}": sorted(((f"img{j}", float(s)) for j, s in enumerate(rng.normal(size=12))), key=lambda t: -t[1])
        for i in range(4)
    }
    src = stage(tmp_path, "m", lists, gt={q: rows[3][0] for q, rows in lists.items()})
    out = tmp_path / "out"
    run_ensemble(EnsembleConfig(input_dir=[src], weight=[1.0], normalize="none", output_dir=out))
    before, after = read_candidates(src), read_candidates(out)
    pd.testing.assert_frame_equal(before, after)
    assert (out / "queries.parquet").read_bytes() == (src / "queries.parquet").read_bytes()
    assert json.loads((out / "metrics.json").read_text())["ensemble"]["R@5"] == 100.0


def test_output_is_a_stage_dir_that_submit_consumes(tmp_path):
    lists_a = {f"q{i}": [(f"g{(i + j) % 15}", 1.0 - j / 12) for j in range(12)] for i in range(3)}
    lists_b = {f"q{i}": [(f"g{(i + 2 * j) % 15}", 5.0 - j) for j in range(12)] for i in range(3)}
    out = tmp_path / "fused"
    run_ensemble(
        EnsembleConfig(
            input_dir=[stage(tmp_path, "a", lists_a), stage(tmp_path, "b", lists_b)],
            weight=[0.7, 0.3],
            k=12,
            output_dir=out,
        )
    )
    cand = read_candidates(out)
    assert list(cand.columns) == CANDIDATE_COLUMNS
    assert cand.dtypes.to_dict() == candidates_frame([], [], [], [], [], []).dtypes.to_dict()
    assert cand.groupby("query_index").size().tolist() == [12, 12, 12]
    assert not cand.duplicated(["query_index", "image"]).any()
    assert (cand.groupby("query_index")["score"].diff().dropna() <= 0).all()  # sorted by score within a query
    assert read_queries(out)["query_index"].tolist() == ["q0", "q1", "q2"]
    summary = run_submit_stage(SubmitConfig(input_dir=out, output_dir=tmp_path / "submission"))
    lines = Path(summary["answer"]).read_bytes().decode().split("\r\n")
    assert len(lines) == 4 and lines[-1] == ""
    assert lines[0].split() == fused_lists(out)["q0"][:10]


@pytest.mark.parametrize(
    "make_config,fragment",
    [
        (lambda a, b, c: EnsembleConfig(input_dir=[a, c]), "query set differs"),
        (lambda a, b, c: EnsembleConfig(input_dir=[a, b], weight=[1.0]), "1 --weight value(s) for 2"),
        (lambda a, b, c: EnsembleConfig(input_dir=[a, b], weight=[0.0, 0.0]), "every --weight is 0"),
        (lambda a, b, c: EnsembleConfig(input_dir=[a, b], column="itm"), "NaN everywhere"),
        (lambda a, b, c: EnsembleConfig(input_dir=[a, b / "nope"]), "file not found"),
    ],
)
def test_bad_inputs_raise_one_clear_error(tmp_path, make_config, fragment):
    a = stage(tmp_path, "a", MODEL_A)
    b = stage(tmp_path, "b", MODEL_B, itm=False)
    c = stage(tmp_path, "c", {"q1": MODEL_A["q1"], "q3": MODEL_A["q2"]})
    cfg = make_config(a, b, c)
    cfg.output_dir = tmp_path / "out"
    with pytest.raises(TpasError, match=re.escape(fragment)):
        run_ensemble(cfg)
    assert not (tmp_path / "out").exists()


def test_row_order_and_uneven_lists_do_not_change_the_fusion(tmp_path):
    # B lists 2 candidates for q2 and its rows are shuffled: the result equals that of B's rows in order.
    short_b = {"q1": MODEL_B["q1"], "q2": MODEL_B["q2"][:2]}
    a, b = stage(tmp_path, "a", MODEL_A), stage(tmp_path, "b", short_b)
    shuffled = stage(tmp_path, "shuffled", short_b)
    frame = read_candidates(shuffled)
    write_parquet(shuffled / "candidates.parquet", frame.iloc[[4, 0, 2, 3, 1]].reset_index(drop=True))
    for method in ("zscore", "none"):
        run_ensemble(EnsembleConfig(input_dir=[a, b], normalize=method, output_dir=tmp_path / "ordered"))
        run_ensemble(EnsembleConfig(input_dir=[a, shuffled], normalize=method, output_dir=tmp_path / "shuffled_out"))
        ordered = read_candidates(tmp_path / "ordered")
        pd.testing.assert_frame_equal(ordered, read_candidates(tmp_path / "shuffled_out"))
    # Raw scores: z, missing from B's q2, gets B's q2 minimum 0.65: (0 + 0.65) / 2.
    assert fused_lists(tmp_path / "ordered")["q2"] == ["x", "y", "z"]
    assert ordered["score"].tolist()[3:] == pytest.approx([0.625, 0.6, 0.325])


def test_repeated_pair_is_refused(tmp_path):
    a = stage(tmp_path, "a", MODEL_A)
    b = stage(tmp_path, "b", {"q1": MODEL_B["q1"] + [("b", -1.0)], "q2": MODEL_B["q2"]})
    message = f"{b / 'candidates.parquet'}: query q1 lists image b more than once"
    with pytest.raises(TpasError, match=re.escape(message)):
        run_ensemble(EnsembleConfig(input_dir=[a, b], output_dir=tmp_path / "out"))


def reference_fusion(frames: list[pd.DataFrame], weights: list[float], method: str, k: int) -> pd.DataFrame:
    """The fusion rule written plainly with pandas merges (slow, obviously right) to check the fast one."""
    union = pd.concat([f[["query_index", "image"]] for f in frames]).drop_duplicates()
    union["score"] = 0.0
    for f, w in zip(frames, weights):
        f = f.sort_values(["query_index", "score"], ascending=[True, False]).copy()
        v, by = f["score"].astype(float), f.groupby("query_index")["score"]
        if method == "zscore":
            std = by.transform(lambda s: s.astype(float).std(ddof=0))
            f["n"] = ((v - by.transform("mean")) / std).where(std > 0, 0.0)
        elif method == "minmax":
            f["n"] = (v - by.transform("min")) / (by.transform("max") - by.transform("min"))
        else:  # rank
            f["n"] = 1.0 / (60.0 + f.groupby("query_index").cumcount() + 1)
        merged = union.merge(f[["query_index", "image", "n"]], on=["query_index", "image"], how="left")
        merged["n"] = merged["n"].fillna(merged["query_index"].map(f.groupby("query_index")["n"].min()))
        union["score"] += w * merged["n"].to_numpy()
    union = union.sort_values(["query_index", "score"], ascending=[True, False])
    return union.groupby("query_index").head(k).reset_index(drop=True)


@pytest.mark.parametrize("method", ["zscore", "minmax", "rank"])
def test_matches_a_plain_pandas_fusion_on_random_inputs(tmp_path, method):
    rng = np.random.default_rng(1)
    dirs, frames = [], []
    for m in range(3):  # 12 queries, 10-12 candidates each from a 40-image gallery, overlapping across models
        lists = {}
        for i in range(12):
            images = rng.choice(40, size=int(rng.integers(10, 13)), replace=False)
            lists[f"q{i:02d}"] = sorted(
                ((f"g{j}", float(s)) for j, s in zip(images, rng.normal(size=len(images)))), key=lambda t: -t[1]
            )
        dirs.append(stage(tmp_path, f"m{m}", lists))
        frames.append(read_candidates(dirs[-1]))
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "out"
    run_ensemble(EnsembleConfig(input_dir=dirs, weight=weights, normalize=method, k=10, output_dir=out))
    got, want = read_candidates(out), reference_fusion(frames, weights, method, 10)
    assert got["query_index"].tolist() == want["query_index"].tolist()
    assert got["image"].tolist() == want["image"].tolist()
    assert got["score"].tolist() == pytest.approx(want["score"].tolist(), rel=1e-5, abs=1e-6)


def test_column_choice_and_zero_weight(tmp_path):
    a = stage(tmp_path, "a", MODEL_A, TRUTH)
    # Fuse itc instead of score: reverse A's itc so that its ranking flips.
    frame = read_candidates(a)
    frame["itc"] = -frame["itc"]
    write_parquet(a / "candidates.parquet", frame)
    run_ensemble(EnsembleConfig(input_dir=[a], column="itc", output_dir=tmp_path / "itc"))
    assert fused_lists(tmp_path / "itc") == {"q1": ["c", "b", "a"], "q2": ["z", "y", "x"]}
    # Weight 0: B adds no candidate (not even its top image d, which A lacks) and no score, but is scored.
    b = stage(tmp_path, "b", {"q1": [("d", 2.0)] + MODEL_B["q1"], "q2": MODEL_B["q2"]}, TRUTH)
    run_ensemble(EnsembleConfig(input_dir=[a, b], weight=[1.0, 0.0], output_dir=tmp_path / "zero"))
    assert fused_lists(tmp_path / "zero") == fused_lists(a)
    metrics = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert [m["weight"] for m in metrics["inputs"]] == [1.0, 0.0] and metrics["inputs"][1]["R@1"] == 0.0
