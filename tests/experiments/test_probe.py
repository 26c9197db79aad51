"""tpas.experiments.probe: an attention probe on frozen image features, scored per attribute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tpas.errors import TpasError
from tpas.experiments import probe as probe_lib

TINY = {"model": "tiny", "image_stages": [], "epochs": 3, "threads": 1}


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_probe_reads_what_is_rendered_and_reports_the_majority_rate(
    tiny_demo: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "probe.json"
    report = probe_lib.probe(probe_lib.ProbeConfig(data_root=tiny_demo, output=out, **TINY))
    assert set(report["accuracy"]) == set(probe_lib.ATTRIBUTES)
    assert report["test_images"] == 24 and report["train_images"] == 240
    for acc in report["accuracy"].values():
        assert 0 <= acc["probe"] <= 100 and 0 < acc["majority"] <= 100
    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]
    assert "| top_type |" in capsys.readouterr().out
    # the same seed gives the same probe
    again = probe_lib.probe(probe_lib.ProbeConfig(data_root=tiny_demo, **TINY))
    assert again["accuracy"] == report["accuracy"]


def test_the_probe_reads_the_pyramid_as_configured(tiny_demo: Path) -> None:
    cfg = probe_lib.ProbeConfig(data_root=tiny_demo, model="lite", image_grid_rows=4, image_grid_cols=2, train_images=8)
    mcfg = probe_lib._model_config(cfg)
    assert mcfg.image_grid == (4, 2) and mcfg.image_tokens == "pyramid" and mcfg.pixel_stem == 0


def test_a_folder_without_attributes_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TpasError, match="needs a demo set built by"):
        probe_lib.probe(probe_lib.ProbeConfig(data_root=tmp_path, **TINY))


def test_a_trained_tower_changes_with_the_labels_and_a_frozen_one_does_not(tiny_demo: Path, monkeypatch) -> None:
    built = []
    real_build = probe_lib.model_lib.build_model

    def build(mcfg):
        built.append(real_build(mcfg))
        return built[-1]

    monkeypatch.setattr(probe_lib.model_lib, "build_model", build)
    reports = []
    for tower_lr in (0.0, 1e-2):
        torch.manual_seed(0)
        before = {
            k: v.clone()
            for k, v in real_build(probe_lib._model_config(probe_lib.ProbeConfig(data_root=tiny_demo, **TINY)))
            .image_encoder.state_dict()
            .items()
        }
        reports.append(probe_lib.probe(probe_lib.ProbeConfig(data_root=tiny_demo, tower_lr=tower_lr, **TINY)))
        after = built[-1].image_encoder.state_dict()
        changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
        buffers = {k for k, _ in built[-1].image_encoder.named_buffers()}
        if tower_lr:
            assert changed and not set(changed) & buffers  # weights trained, BatchNorm statistics kept
        else:
            assert not changed
    assert [r["tower_lr"] for r in reports] == [0.0, 1e-2]


def test_a_negative_tower_lr_is_one_sentence(tiny_demo: Path) -> None:
    with pytest.raises(TpasError, match="--tower-lr must be >= 0"):
        probe_lib.probe(probe_lib.ProbeConfig(data_root=tiny_demo, tower_lr=-1.0, **TINY))
