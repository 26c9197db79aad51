"""Fault injection: kill train.py, infer.py and sca.py at random points (SIGKILL, several seeds).

Every surviving stage dir must be the old complete one or the new complete one (its manifest
checks out, its candidates and queries belong together), the next run must clean up what the
killed one left, and a training run killed any number of times and resumed with a plain
--resume must end bit for bit where the uninterrupted run ends. Tiny data and models: each
case is a few seconds; the kill delays are drawn from the measured duration of a clean run.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpas.io import check_manifest
from tpas.schema import read_candidates, read_queries

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
pytestmark = pytest.mark.slow


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


def _finish(*args: str) -> float:
    started = time.perf_counter()
    proc = _start(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return time.perf_counter() - started


def _kill_after(delay: float, *args: str) -> bool:
    """Run the command and SIGKILL it after `delay` s; True when it was killed (not finished)."""
    proc = _start(*args)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


def _stage_is_whole(stage: Path, allowed_k: set[int]) -> int:
    """The stage's k, after checking its files belong together."""
    assert check_manifest(stage) is not None
    candidates, queries = read_candidates(stage), read_queries(stage)
    assert set(candidates["query_index"]) == set(queries["query_index"])
    per_query = candidates.groupby("query_index").size()
    assert per_query.nunique() == 1
    k = int(per_query.iloc[0])
    assert k in allowed_k
    return k


def _no_temps(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if ".part-" in p.name or ".tmp-" in p.name] == []


def test_killed_infer_and_sca_leave_the_old_or_the_new_stage(tiny_demo: Path, tmp_path: Path) -> None:
    runs, out, cache = tmp_path / "runs", tmp_path / "out", tmp_path / "cache"
    _finish(
        "train.py",
        "--data-root",
        str(tiny_demo),
        "--model",
        "tiny",
        "--subset",
        "96",
        "--val-size",
        "0",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--runs-dir",
        str(runs),
        "--name",
        "t",
        "--no-progress",
        "--threads",
        "1",
    )
    infer = [
        "infer.py",
        "--data-root",
        str(tiny_demo),
        "--run",
        str(runs / "t"),
        "--output-dir",
        str(out / "infer"),
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--threads",
        "1",
    ]
    clean = _finish(*infer, "--k", "16")  # the old, complete stage
    sca = ["sca.py", "--input-dir", str(out / "infer"), "--output-dir", str(out / "sca"), "--cache-dir", str(cache)]
    clean_sca = _finish(*sca)
    seen_infer, seen_sca = set(), set()
    for seed in SEEDS:
        rng = random.Random(seed)
        k = (12, 20, 24)[seed]  # each new run writes another k, so old and new are told apart
        _kill_after(rng.uniform(0.3, 1.1) * clean, *infer, "--k", str(k))
        seen_infer.add(_stage_is_whole(out / "infer", {16, 12, 20, 24}))
        _kill_after(rng.uniform(0.3, 1.1) * clean_sca, *sca, "--method", ("dual-softmax", "sca", "assign")[seed])
        seen_sca.add(_stage_is_whole(out / "sca", {16, 12, 20, 24}))
    _finish(*infer, "--k", "16")
    _finish(*sca)  # the next runs clean up after the killed ones
    _no_temps(out)
    assert _stage_is_whole(out / "infer", {16}) == 16 and _stage_is_whole(out / "sca", {16}) == 16


def test_training_killed_at_random_points_resumes_bit_for_bit(tiny_demo: Path, tmp_path: Path) -> None:
    base = [
        "train.py",
        "--data-root",
        str(tiny_demo),
        "--model",
        "tiny",
        "--subset",
        "96",
        "--val-size",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--save-every",
        "2",
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
        "--threads",
        "1",
    ]
    clean = _finish(*base, "--name", "straight")
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    for seed in SEEDS:
        rng = random.Random(seed)
        name = f"killed{seed}"
        resume = [
            "train.py",
            "--resume",
            "--name",
            name,
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
            "--threads",
            "1",
        ]

        def again(name: str = name, resume: list[str] = resume) -> list[str]:
            # killed before it wrote config.json (still importing): no run exists, so the first command again
            return resume if (tmp_path / name / "config.json").is_file() else [*base, "--name", name]

        killed = _kill_after(rng.uniform(0.2, 0.9) * clean, *base, "--name", name)
        kills = int(killed)
        while killed and kills < 4:  # a plain --resume, killed again now and then
            killed = _kill_after(rng.uniform(0.3, 1.2) * clean, *again())
            kills += int(killed)
        if killed:
            _finish(*again())
        resumed = load_file(str(tmp_path / name / "model.safetensors"))
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), f"seed {seed}: {kills} kill(s)"
        _no_temps(tmp_path / name)
