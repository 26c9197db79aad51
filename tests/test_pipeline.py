"""End to end on a tiny demo set: the four scripts, their files and schemas, and learning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tpas.errors import TpasError
from tpas.retrieval import InferConfig, infer
from tpas.schema import CANDIDATE_COLUMNS, QUERY_COLUMNS
from tpas.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tiny_demo: Path) -> Path:
    return tiny_demo


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_four_scripts_end_to_end(demo: Path, tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    _run(
        "train.py",
        "--data-root",
        str(demo),
        "--model",
        "tiny",
        "--subset",
        "96",
        "--val-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--runs-dir",
        str(runs),
        "--name",
        "t",
        "--no-progress",
    )
    run = runs / "t"
    assert {"config.json", "subset.json", "model.safetensors", "history.json"} <= {p.name for p in run.iterdir()}
    assert len(json.loads((run / "subset.json").read_text())["train"]) == 96

    printed = _run(
        "infer.py",
        "--data-root",
        str(demo),
        "--run",
        str(run),
        "--output-dir",
        str(out / "infer"),
        "--k",
        "16",
        "--cache-dir",
        str(out / "cache"),
        "--no-progress",
    ).stdout
    assert "R@1" in printed
    candidates = pd.read_parquet(out / "infer" / "candidates.parquet")
    queries = pd.read_parquet(out / "infer" / "queries.parquet")
    assert list(candidates.columns) == CANDIDATE_COLUMNS and list(queries.columns) == QUERY_COLUMNS
    assert len(queries) == 24 and len(candidates) == 24 * 16
    assert (candidates.groupby("query_index")["rank"].apply(list) == [list(range(1, 17))] * 24).all()
    # within a query the rows are sorted by the final score
    assert (candidates.groupby("query_index")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    order = (demo / "challenge" / "query_index.txt").read_text().split()
    assert queries["query_index"].tolist() == order
    assert json.loads((out / "infer" / "infer_config.json").read_text())["k"] == 16
    metrics = json.loads((out / "infer" / "metrics.json").read_text())
    assert {"itc", "final"} <= set(metrics) and metrics["score"] == "tpas"  # the tiny preset's default rule
    # the same candidates scored under every rule; the one written is --score's
    assert set(metrics["by_score"]) == {"xvlm", "cmp", "blip", "log-odds", "tpas", "itc"}
    assert metrics["by_score"]["tpas"] == metrics["final"] and metrics["by_score"]["itc"] == metrics["itc"]

    printed = _run(
        "sca.py", "--input-dir", str(out / "infer"), "--output-dir", str(out / "sca"), "--cache-dir", str(out / "cache")
    ).stdout
    assert "R@1" in printed
    changes = pd.read_parquet(out / "sca" / "changes.parquet")
    assert list(changes.columns) == [
        "method",
        "query_index",
        "old_image",
        "new_image",
        "old_score",
        "new_score",
        "delta",
        "round",
        "group",
    ]
    assert set(json.loads((out / "sca" / "metrics.json").read_text())) == {"before", "after"}
    assert list(pd.read_parquet(out / "sca" / "candidates.parquet").columns) == CANDIDATE_COLUMNS

    query_index = demo / "challenge" / "query_index.txt"
    _run(
        "submit.py",
        "--input-dir",
        str(out / "sca"),
        "--output-dir",
        str(out / "sub"),
        "--query-index",
        str(query_index),
    )
    lines = (out / "sub" / "answer.txt").read_bytes().split(b"\r\n")
    assert lines[-1] == b"" and len(lines) - 1 == 24
    gallery = {p.stem for p in (demo / "challenge" / "gallery").glob("*.jpg")}
    assert all(len(line.split(b" ")) == 10 and {n.decode() for n in line.split(b" ")} <= gallery for line in lines[:-1])
    checked = _run("submit.py", "--check", str(out / "sub" / "answer.txt"), "--query-index", str(query_index)).stdout
    assert "valid" in checked
    # A second infer re-uses the cached gallery features and ranks identically.
    _run(
        "infer.py",
        "--data-root",
        str(demo),
        "--run",
        str(run),
        "--output-dir",
        str(out / "again"),
        "--k",
        "16",
        "--cache-dir",
        str(out / "cache"),
        "--no-progress",
    )
    assert pd.read_parquet(out / "again" / "candidates.parquet").equals(candidates)


@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "infer.py", "--data-root", str(tmp_path), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fine_tuning_beats_zero_shot(demo: Path, tmp_path: Path) -> None:
    """The real preset (packaged weights), a few dozen steps: far above the untrained heads."""
    train(
        TrainConfig(
            data_root=demo,
            subset=0,
            val_size=0,
            batch_size=16,
            epochs=4,
            runs_dir=tmp_path,
            name="lite",
            workers=0,
            progress=False,
            save_every=0,
        )
    )
    common = {"data_root": demo, "k": 16, "itm": False, "cache_dir": tmp_path / "cache", "progress": False}
    tuned = infer(InferConfig(run=tmp_path / "lite", output_dir=tmp_path / "tuned", **common))
    zero = infer(InferConfig(zero_shot=True, output_dir=tmp_path / "zero", **common))
    tuned_map, zero_map = tuned["metrics"]["itc"]["mAP"], zero["metrics"]["itc"]["mAP"]
    # 36 gallery images: a random ranking has mAP ≈ 11.7 (mean of 1/rank).
    assert zero_map < 25 and tuned_map > zero_map + 15, (tuned_map, zero_map)


def test_a_query_the_text_pipeline_empties_is_named(demo: Path, tmp_path: Path) -> None:
    challenge = demo / "challenge"
    lines = (challenge / "query.json").read_text().splitlines()
    first = json.loads(lines[1])
    bad = [lines[0], json.dumps({**first, "caption": "?!"}), *lines[2:]]
    (challenge / "query_bad.json").write_text("\n".join(bad) + "\n")
    cfg = InferConfig(
        data_root=demo,
        zero_shot=True,
        model="xvlm-tiny",
        query_file="query_bad.json",
        k=10,
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    with pytest.raises(TpasError, match=f"query {first['query_index']}: caption '\\?!' is empty once cleaned"):
        infer(cfg)
    assert not (tmp_path / "out").exists()


def test_nan_scores_are_refused_not_written(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpas import retrieval

    real_rank = retrieval.rank

    def damaged(*args, **kwargs):
        ranked = real_rank(*args, **kwargs)
        ranked["score"][3] = np.nan  # what damaged or diverged weights give
        return ranked

    monkeypatch.setattr(retrieval, "rank", damaged)
    cfg = InferConfig(
        data_root=demo,
        zero_shot=True,
        model="tiny",
        k=10,
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    with pytest.raises(TpasError, match=r"scored 1 of 24 queries with NaN or infinity \(first: query"):
        infer(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_config_replays_a_saved_config_and_given_flags_win(demo: Path, tmp_path: Path) -> None:
    """--config FILE: every flag not given takes the file's value; a given one wins."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    _run(
        "train.py",
        "--data-root",
        str(demo),
        "--model",
        "tiny",
        "--subset",
        "48",
        "--val-size",
        "0",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--runs-dir",
        str(runs),
        "--name",
        "a",
        "--no-progress",
    )
    # the same run again under another name, from its saved config alone
    _run("train.py", "--config", str(runs / "a" / "config.json"), "--name", "b", "--no-progress")
    a, b = (json.loads((runs / n / "config.json").read_text())["train"] for n in ("a", "b"))
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    _run(
        "infer.py",
        "--data-root",
        str(demo),
        "--run",
        str(runs / "a"),
        "--output-dir",
        str(out / "i1"),
        "--k",
        "12",
        "--cache-dir",
        str(out / "cache"),
        "--no-progress",
    )
    _run("infer.py", "--config", str(out / "i1" / "infer_config.json"), "--output-dir", str(out / "i2"))
    replayed = json.loads((out / "i2" / "infer_config.json").read_text())
    assert replayed["k"] == 12 and replayed["output_dir"] == str(out / "i2")
    assert pd.read_parquet(out / "i2" / "candidates.parquet").equals(pd.read_parquet(out / "i1" / "candidates.parquet"))
    bad = subprocess.run(
        [sys.executable, "infer.py", "--config", str(demo / "challenge" / "query_index.txt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")
