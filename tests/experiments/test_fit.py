"""python -m tpas.experiments.fit: a run's validation protocol on its held-out and its training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import TINY_TRAIN, write_coloured_train

from tpas.errors import TpasError
from tpas.experiments.fit import FitConfig, fit
from tpas.train import TrainConfig, train


def test_fit_repeats_the_runs_own_validation_and_measures_as_many_training_pairs(tmp_path: Path) -> None:
    root = write_coloured_train(tmp_path / "pab", caption="a person {i} in a red coat walking")
    train(TrainConfig(**{**TINY_TRAIN, "data_root": root, "runs_dir": tmp_path / "runs", "name": "r"}))
    run = tmp_path / "runs/r"
    report = fit(FitConfig(run=run, data_root=root, threads=1))
    history = json.loads((run / "history.json").read_text())
    # the held-out figure is train.py's own last validation of the same weights
    assert report["held_out"]["R@1"] == pytest.approx(history[-1]["val_itc"]["R@1"])
    assert report["train"]["queries"] == report["held_out"]["queries"] == report["pairs"] == 8
    assert report["gap_R@1"] == pytest.approx(report["train"]["R@1"] - report["held_out"]["R@1"])
    assert json.loads((run / "fit.json").read_text())["pairs"] == 8


def test_a_folder_that_is_not_a_run_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TpasError, match="subset.json not found: --run must be a train.py run directory"):
        fit(FitConfig(run=tmp_path, data_root=tmp_path))
