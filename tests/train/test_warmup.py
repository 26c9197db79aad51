"""--tower-warmup (tpas.train.warmup): the locked tower learns the captions' words before it is cached."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fakes import write_coloured_train

from tpas import models as model_lib
from tpas.data import load_rgb
from tpas.errors import TpasError
from tpas.runtime import Runtime
from tpas.train import TrainConfig, train
from tpas.train import warmup as warmup_lib
from tpas.train.config import LITE_TOWER_WARMUP
from tpas.train.warmup import pooled_tower, warm_tower, word_targets

LOCKED = {
    "image_tokens": "pyramid",
    "image_stages": (2, 4, -1),
    "image_grid": (4, 2),
    "image_layers": 1,
    "lock_image": True,
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**overrides) -> model_lib.RetrievalModel:
    torch.manual_seed(0)
    return model_lib.build_model(model_lib.ModelConfig.from_preset("tiny", **{**LOCKED, **overrides}))


def test_word_targets_mark_every_piece_of_any_of_an_images_captions() -> None:
    vocab = torch.tensor([3, 7, 9])
    targets = word_targets([[[1, 3, 3], [9]], [[2, 4]], [[7, 9, 11]]], vocab)
    assert targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 1]]


def _warm(model, root: Path, images: list[str], targets: torch.Tensor, epochs: int = 4):
    return warm_tower(
        model.image_encoder, images, targets, root, model.cfg, Runtime(), epochs=epochs, lr=3e-3, seed=0, batch_size=4
    )


def test_the_warmup_fits_the_words_changes_the_weights_and_keeps_the_batchnorm_statistics(tmp_path: Path) -> None:
    root = write_coloured_train(tmp_path / "pab", n=8)
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))[:8]
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]] * 2)
    model = _model()
    encoder = model.image_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    buffers = {k for k, _ in encoder.named_buffers()}
    report = _warm(model, root, images, targets, epochs=8)
    after = encoder.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and not changed & buffers  # weights trained, BatchNorm statistics are the pretrained ones
    assert report.last_loss < report.first_loss and report.images == 8 and report.words == 2
    assert not any(p.requires_grad for p in encoder.parameters())  # locked again for what follows
    # seeded: the same images, targets and seed give the same tower
    again = _model()
    _warm(again, root, images, targets, epochs=8)
    assert all(torch.equal(v, again.image_encoder.state_dict()[k]) for k, v in after.items())


def test_the_tuned_copy_restarts_from_the_warmed_tower() -> None:
    model = _model(tune_from=2)
    with torch.no_grad():
        for p in model.image_encoder.blocks[2].parameters():
            p.add_(1.0)
    assert not torch.equal(next(model.tuned_blocks[0].parameters()), next(model.image_encoder.blocks[2].parameters()))
    model.reset_tuned_blocks()
    copy, tower = model.tuned_blocks[0].state_dict(), model.image_encoder.blocks[2].state_dict()
    assert all(torch.equal(copy[k], tower[k]) for k in copy)
    assert all(p.requires_grad for p in model.tuned_blocks.parameters())


def test_a_backbone_that_is_not_a_timm_model_is_one_sentence() -> None:
    with pytest.raises(TpasError, match="needs a timm image backbone"):
        pooled_tower(torch.nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tower_warmup": -1}, "--tower-warmup must be 0"),
        ({"tower_warmup": 1, "tower_warmup_lr": 0.0}, "--tower-warmup-lr positive"),
    ],
)
def test_bad_warmup_settings_are_one_sentence(overrides: dict, message: str) -> None:
    with pytest.raises(TpasError, match=message):
        TrainConfig(**overrides)


def test_a_model_that_trains_its_tower_refuses_the_warmup(tmp_path: Path) -> None:
    root = write_coloured_train(tmp_path / "pab")
    cfg = TrainConfig(
        model="tiny", data_root=root, runs_dir=tmp_path, subset=24, val_size=8, batch_size=8, epochs=1,
        workers=0, progress=False, threads=1, tower_warmup=1,
    )  # fmt: skip
    with pytest.raises(TpasError, match="drop --tower-warmup"):
        train(cfg)


def test_the_warmup_defaults_to_lites_locked_tower_only() -> None:
    lite = model_lib.ModelConfig.from_preset("lite")
    assert lite.lock_image
    assert TrainConfig().resolved_tower_warmup(lite) == LITE_TOWER_WARMUP > 0
    assert TrainConfig(tower_warmup=0).resolved_tower_warmup(lite) == 0  # a given flag wins
    assert TrainConfig().resolved_tower_warmup(model_lib.ModelConfig.from_preset("lite", lock_image=False)) == 0
    for preset in ("tiny", "xvlm-tiny"):
        assert TrainConfig(model=preset).resolved_tower_warmup(model_lib.ModelConfig.from_preset(preset)) == 0


def test_a_run_saved_before_the_warmup_resumes_without_one(tmp_path: Path, capsys, monkeypatch) -> None:
    # as if this tiny model were lite, whose default is a warm-up
    monkeypatch.setattr(
        TrainConfig, "resolved_tower_warmup", lambda self, model: 1 if self.tower_warmup is None else self.tower_warmup
    )
    root = write_coloured_train(tmp_path / "pab")
    cfg = TrainConfig(
        model="tiny", data_root=root, runs_dir=tmp_path, subset=24, val_size=8, batch_size=8, epochs=2,
        workers=0, progress=False, threads=1, lock_image=True, image_tokens="pyramid", image_stages=[2, 4, -1],
        image_grid_rows=4, image_grid_cols=2, save_every=2, name="old",
    )  # fmt: skip
    train(dataclasses.replace(cfg, max_steps=2, tower_warmup=0))  # an old run: no warm-up
    capsys.readouterr()
    config = tmp_path / "old" / "config.json"
    saved = json.loads(config.read_text())
    del saved["train"]["tower_warmup"]  # as written before the flag existed
    config.write_text(json.dumps(saved))
    train(dataclasses.replace(cfg, resume=True, tower_warmup=None))
    assert "tower warm-up" not in capsys.readouterr().out
    assert json.loads(config.read_text())["train"]["tower_warmup"] == 0


def test_the_warmup_pixels_are_the_eval_transforms(tmp_path: Path) -> None:
    root = write_coloured_train(tmp_path / "pab", n=4)
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    cfg = model_lib.ModelConfig.from_preset("lite")
    transform = model_lib.image_transform(cfg, train=False)
    pixels = warmup_lib._load_pixels(root, images, cfg.image_size)
    assert pixels.dtype == torch.uint8
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    expected = torch.stack([transform(load_rgb(root / p)) for p in images])
    assert torch.equal(pixels.float().div(255).sub(mean).div(std), expected)


def test_images_that_would_not_fit_in_memory_are_one_sentence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(warmup_lib, "machine_memory", lambda: 1000)
    with pytest.raises(TpasError, match="use a smaller --subset or --tower-warmup 0"):
        warmup_lib._load_pixels(tmp_path, ["a.jpg"] * 4, (128, 64))


def test_on_a_cpu_the_warmup_runs_in_fp32_under_a_bf16_run(tmp_path: Path) -> None:
    root = write_coloured_train(tmp_path / "pab", n=4)
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))[:4]
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    towers = []
    for amp in (None, torch.bfloat16):
        model = _model()
        runtime = Runtime(amp_dtype=amp)
        warm_tower(
            model.image_encoder, images, targets, root, model.cfg, runtime, epochs=1, lr=3e-3, seed=0, batch_size=2
        )
        towers.append(model.image_encoder.state_dict())
    assert all(torch.equal(v, towers[1][k]) for k, v in towers[0].items())
