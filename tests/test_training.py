"""Training: seeded subsets, exact resume, bad-sample handling, checkpoints that load safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fakes import _image, _record, write_train
from tpas import model as model_lib
from tpas.errors import TpasError
from tpas.training import TrainConfig, find_checkpoint, load_run_model, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pab")
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 40)]
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(40)]
    write_train(root, records)
    for i, r in enumerate(records):  # distinct images, so ranking is not a tie everywhere
        _image(root / r["image"], colours[i % 4])
    return root


def _cfg(root: Path, runs: Path, **kw) -> TrainConfig:
    base = dict(data_root=root, model="tiny", subset=24, val_size=8, batch_size=8, epochs=2, runs_dir=runs,
                workers=0, progress=False, save_every=2)
    return TrainConfig(**{**base, **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_resume_continues_exactly(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="straight"))
    partial = train(_cfg(data_root, tmp_path, name="cut", max_steps=4))
    assert partial["steps"] == 4 and find_checkpoint(tmp_path / "cut") is not None
    # Resume with another worker count: batches are seeded per sample, so nothing changes.
    train(_cfg(data_root, tmp_path, name="cut", resume=True, workers=1))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    h1 = json.loads((tmp_path / "straight" / "history.json").read_text())
    h2 = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert h1 == h2


def test_same_seed_same_subset_other_seed_differs(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="s0", max_steps=1))
    train(_cfg(data_root, tmp_path, name="s0b", max_steps=1))
    train(_cfg(data_root, tmp_path, name="s1", max_steps=1, seed=1))
    subset = lambda n: json.loads((tmp_path / n / "subset.json").read_text())  # noqa: E731
    assert subset("s0")["train"] == subset("s0b")["train"]
    assert subset("s0")["train"] != subset("s1")["train"]
    assert len(subset("s0")["train"]) == 24 and not set(subset("s0")["train"]) & set(subset("s0")["val"])
    a, b = _weights(tmp_path / "s0"), _weights(tmp_path / "s0b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_changes_weights_and_saves_config(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="run", max_steps=3))
    model, model_cfg = load_run_model(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["subset"] == 24 and saved["model"]["preset"] == "tiny"
    # Training moved the weights away from the seeded initialisation.
    torch.manual_seed(0)
    init = model_lib.build_model(model_cfg).state_dict()
    trained = _weights(tmp_path / "run")
    assert any(not torch.equal(init[k], trained[k]) for k in trained)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_existing_run_is_not_overwritten(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="once", max_steps=1))
    with pytest.raises(TpasError, match="exists; pass --resume"):
        train(_cfg(data_root, tmp_path, name="once", max_steps=1))
    with pytest.raises(TpasError, match="no checkpoint to resume"):
        train(_cfg(data_root, tmp_path, name="never", resume=True))


def test_bad_image_fails_or_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(30)]
    write_train(root, records)
    broken = root / records[4]["image"]
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(TpasError, match=r"attr_0.json, line 5: image .*unreadable.*--on-bad-sample skip"):
        train(_cfg(root, tmp_path, name="fail", subset=0, val_size=0, max_steps=1))
    summary = train(_cfg(root, tmp_path, name="skip", subset=0, val_size=0, max_steps=1, on_bad_sample="skip"))
    assert summary["skipped"] == 1 and summary["train_pairs"] == 29
