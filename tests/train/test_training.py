"""Training: seeded subsets, exact resume, bad-sample handling, checkpoints that load safely."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TINY_TRAIN, _image, _record, write_coloured_train, write_train
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

from tpas import models as model_lib
from tpas import runtime as runtime_lib
from tpas.cli import with_given
from tpas.errors import TpasError
from tpas.models.run import load_run_model, save_weights
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime, resolve_runtime
from tpas.train import TrainConfig, train
from tpas.train import data as train_data
from tpas.train.checkpoint import find_checkpoint
from tpas.train.config import model_config_for
from tpas.train.data import ResumableSampler, auto_workers, build_image_cache
from tpas.train.loop import training_step


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coloured_train(tmp_path_factory.mktemp("pab"))


def _cfg(root: Path, runs: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_TRAIN, "data_root": root, "runs_dir": runs, **kw})


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


def _plain(cfg: TrainConfig, *flags: str) -> TrainConfig:
    """cfg as the command line would give it when only `flags` are typed (the rest are defaults)."""
    return with_given(cfg, set(flags))


def test_a_plain_resume_keeps_the_saved_epochs_and_schedule(data_root: Path, tmp_path: Path, capsys) -> None:
    train(_cfg(data_root, tmp_path, name="straight", epochs=3))
    train(_cfg(data_root, tmp_path, name="cut", epochs=3, max_steps=4))
    # `train.py --resume --name cut ...`: --epochs not typed, so its default (3 here too, but see
    # below) must not replace the saved value
    resumed = _plain(
        _cfg(data_root, tmp_path, name="cut", epochs=TrainConfig().epochs + 4, resume=True),
        "data_root",
        "runs_dir",
        "name",
        "resume",
        "model",
        "subset",
        "val_size",
        "batch_size",
    )
    summary = train(resumed)
    straight, cut = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert summary["steps"] == 9 and all(torch.equal(straight[k], cut[k]) for k in straight)
    assert "note:" not in capsys.readouterr().out


def test_resume_refuses_a_flag_that_changes_the_run_and_notes_a_longer_one(
    data_root: Path, tmp_path: Path, capsys
) -> None:
    train(_cfg(data_root, tmp_path, name="r", epochs=1, max_steps=2))
    with pytest.raises(TpasError, match=r"--lr 0.5 \(saved: 0.0001\) would change it; drop that flag"):
        train(_plain(_cfg(data_root, tmp_path, name="r", resume=True, lr=0.5), "resume", "lr"))
    summary = train(_plain(_cfg(data_root, tmp_path, name="r", resume=True, epochs=2), "resume", "epochs"))
    assert "note: --epochs 2 given: the run was started with 1" in capsys.readouterr().out
    assert summary["steps"] == 6  # 2 epochs x 3 steps
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["epochs"] == 2  # the next plain --resume keeps the longer run


def test_a_run_stopped_before_its_first_checkpoint_starts_again(data_root: Path, tmp_path: Path, capsys) -> None:
    train(_cfg(data_root, tmp_path, name="straight", max_steps=1, save_every=0))
    run = tmp_path / "early"
    train(_cfg(data_root, tmp_path, name="early", max_steps=1, save_every=0))
    shutil.rmtree(run / "checkpoint")  # as if killed before the first save
    (run / "model.safetensors").unlink()
    (run / "stray.tmp").write_text("half")
    with pytest.raises(TpasError, match="exists; pass --resume"):
        train(_cfg(data_root, tmp_path, name="early", max_steps=1, save_every=0))
    train(_plain(_cfg(data_root, tmp_path, name="early", max_steps=1, save_every=0, resume=True), "resume"))
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert not (run / "stray.tmp").exists()
    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_json_records_the_epochs_a_step_budget_resolved_to(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="budget", steps=5))  # 3 steps per epoch
    saved = json.loads((tmp_path / "budget" / "config.json").read_text())["train"]
    assert saved["steps"] == 5 and saved["epochs"] == 2


def test_damaged_weights_are_refused_not_ranked(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="w", max_steps=1))
    path = tmp_path / "w" / "model.safetensors"
    good = path.read_bytes()
    data = bytearray(good)
    for i in range(len(data) - 4000, len(data) - 3000):  # tensor bytes, not the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TpasError, match="weights are corrupted .*checksum"):
        load_run_model(tmp_path / "w")
    # a file saved before checksums: NaN weights are refused at least
    state = load_file(str(tmp_path / "w" / "checkpoint" / "model.safetensors"))
    state[next(k for k, v in state.items() if v.is_floating_point())].fill_(float("nan"))
    save_file(state, str(path))
    with pytest.raises(TpasError, match="holds NaN or infinite values"):
        load_run_model(tmp_path / "w")
    path.write_bytes(good)
    load_run_model(tmp_path / "w")


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_refused_pickle_on_resume_is_one_sentence(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    train(_cfg(data_root, tmp_path, name="p", max_steps=2))
    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer": _Evil()}, tmp_path / "p" / "checkpoint" / "train_state.pt")
    with pytest.raises(TpasError, match="train_state.pt: not a tpas checkpoint"):
        train(_cfg(data_root, tmp_path, name="p", resume=True))
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "p" / "checkpoint" / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TpasError, match="train_state.pt: unreadable"):
        train(_cfg(data_root, tmp_path, name="p", resume=True))


def test_same_seed_same_subset_other_seed_differs(data_root: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, tmp_path, name="s0", max_steps=1))
    train(_cfg(data_root, tmp_path, name="s0b", max_steps=1))
    train(_cfg(data_root, tmp_path, name="s1", max_steps=1, seed=1))

    def subset(name: str) -> dict:
        return json.loads((tmp_path / name / "subset.json").read_text())

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
    with pytest.raises(TpasError, match="no run to resume here"):
        train(_cfg(data_root, tmp_path, name="never", resume=True))


def test_bad_image_fails_or_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(30)]
    write_train(root, records)
    broken = root / records[4]["image"]
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(TpasError, match=r"attr_0.json, line 5: image .*unreadable.*--on-bad-sample skip"):
        train(_cfg(root, tmp_path, name="fail", subset=0, val_size=0, max_steps=1, pab_hard_negatives=False))
    summary = train(
        _cfg(
            root,
            tmp_path,
            name="skip",
            subset=0,
            val_size=0,
            max_steps=1,
            on_bad_sample="skip",
            pab_hard_negatives=False,
        )
    )
    assert summary["skipped"] == 1 and summary["train_pairs"] == 29


def test_a_caption_the_text_pipeline_empties_fails_or_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(30)]
    records[6]["caption"] = "..."  # nothing left once X-VLM's pre_caption deletes the punctuation
    write_train(root, records)
    for r in records:
        _image(root / r["image"], (200, 40, 40))
    tiny = {"model": "xvlm-tiny", "subset": 0, "val_size": 0, "max_steps": 1}
    with pytest.raises(
        TpasError, match=r"attr_0.json line 7: caption '...' is empty once cleaned.*--caption-clean strip"
    ):
        train(_cfg(root, tmp_path, name="fail", **tiny))
    summary = train(_cfg(root, tmp_path, name="skip", on_bad_sample="skip", **tiny))
    assert summary["skipped"] == 1 and summary["train_pairs"] == 29
    # the lite/tiny pipeline only strips: "..." is a caption there
    assert train(_cfg(root, tmp_path, name="tiny", subset=0, val_size=0, max_steps=1))["skipped"] == 0


def test_model_flags_override_the_preset_only_when_given(data_root: Path, tmp_path: Path) -> None:
    for preset, tokens in (("lite", 70), ("xvlm-tiny", 40), ("cmp", 56), ("blip-itm", 35), ("clip", 77)):
        resolved = model_config_for(TrainConfig(model=preset))
        assert resolved.max_tokens == tokens == model_lib.ModelConfig.from_preset(preset).max_tokens
    given = model_config_for(
        TrainConfig(
            model="xvlm-tiny",
            max_tokens=20,
            trailing_sep=True,
            caption_clean="strip",
            max_words=5,
            pad_to_max_tokens=True,
        )
    )
    assert given.text_settings == {
        "caption_clean": "strip",
        "max_words": 5,
        "trailing_sep": True,
        "max_tokens": 20,
        "pad_to_max_tokens": True,
    }
    # the pipeline the run trained with is the one saved, and the one infer.py rebuilds
    train(_cfg(data_root, tmp_path, name="x", model="xvlm-tiny", max_steps=1))
    saved = json.loads((tmp_path / "x" / "config.json").read_text())["model"]
    assert {k: saved[k] for k in model_lib.TEXT_FIELDS} == model_lib.ModelConfig.from_preset("xvlm-tiny").text_settings
    assert (
        load_run_model(tmp_path / "x")[1].text_settings == model_lib.ModelConfig.from_preset("xvlm-tiny").text_settings
    )


# ---------------------------------------------------------------- device, precision, loader, flags


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared, loaded 2-core machine it is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(seed: int = 0) -> tuple[model_lib.RetrievalModel, object]:
    torch.manual_seed(seed)
    cfg = model_lib.ModelConfig.from_preset("tiny")
    return model_lib.build_model(cfg), model_lib.build_tokenizer(cfg)


def _batch(tokenizer: object, captions: list[str], seed: int) -> dict[str, torch.Tensor]:
    images = torch.randn(len(captions), 3, 64, 32, generator=torch.Generator().manual_seed(seed))
    return {"images": images, **TextPipeline(tokenizer, max_tokens=70)(captions)}


CAPTIONS = [
    f"a person {i} in a {c} jacket is {a}"
    for i, (c, a) in enumerate(
        zip(["red", "blue", "green", "black"] * 2, ["walking", "lying", "running", "falling"] * 2)
    )
]


def test_grad_accum_averages_the_micro_batch_gradients() -> None:
    model, tokenizer = _tiny()
    model.eval()  # no dropout, BatchNorm on running statistics: the same function in both runs
    by_hand = copy.deepcopy(model)
    first, second = _batch(tokenizer, CAPTIONS[:4], 1), _batch(tokenizer, CAPTIONS[4:], 2)
    torch.manual_seed(5)
    out = training_step(
        model,
        [first, second],
        torch.optim.SGD(model.parameters(), lr=1.0),
        torch.amp.GradScaler("cpu", enabled=False),
        Runtime(),
    )
    torch.manual_seed(5)  # the same ITM negative draws, in the same order
    loss_a = by_hand(**first)["loss"]
    (loss_a / 2).backward()  # one backward per forward: forward clamps temp in place
    loss_b = by_hand(**second)["loss"]
    (loss_b / 2).backward()
    torch.optim.SGD(by_hand.parameters(), lr=1.0).step()
    assert out["loss"] == pytest.approx(float(loss_a.detach() + loss_b.detach()) / 2, abs=1e-6)
    after, expected = model.state_dict(), by_hand.state_dict()
    assert all(torch.allclose(after[k], expected[k], atol=1e-6) for k in after)
    torch.manual_seed(0)
    untouched = model_lib.build_model(model_lib.ModelConfig.from_preset("tiny")).state_dict()
    assert any(not torch.allclose(after[k], untouched[k]) for k in after)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_bf16_units_are_amx_tiles_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected) -> None:
    # AMD Zen 4 has AVX-512 BF16 dot products but no AMX; bf16 autocast is 1.5x faster there too
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert runtime_lib.cpu_has_bf16_units() is expected


def test_device_and_precision_choices(monkeypatch) -> None:
    # auto trains in bf16 on a CPU with bf16 matrix units (AMX, AVX-512 BF16) and in fp32 on one without
    assert isinstance(runtime_lib.cpu_has_bf16_units(), bool)  # the real probe answers on any CPU
    monkeypatch.setattr(runtime_lib, "cpu_has_bf16_units", lambda: False)
    assert resolve_runtime("cpu", "auto").precision == "fp32"
    monkeypatch.setattr(runtime_lib, "cpu_has_bf16_units", lambda: True)
    assert resolve_runtime("cpu", "auto").precision == "bf16"
    assert resolve_runtime("cpu", "auto", inference=True).precision == "fp32"  # rankings stay fp32
    assert resolve_runtime("cpu", "bf16").amp_dtype == torch.bfloat16
    with pytest.raises(TpasError, match="fp16 needs a GPU"):
        resolve_runtime("cpu", "fp16")
    if not torch.cuda.is_available():
        assert resolve_runtime("auto", "auto").device.type == "cpu"
        with pytest.raises(TpasError, match="no CUDA GPU"):
            resolve_runtime("cuda", "auto")
    # bf16 autocast on the CPU: the same step runs and learns
    model, tokenizer = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = resolve_runtime("cpu", "bf16")
    out = training_step(
        model,
        [_batch(tokenizer, CAPTIONS, 3)],
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        torch.amp.GradScaler("cpu", enabled=False),
        runtime,
    )
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_workers_follow_the_device_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the 16 cores
    assert auto_workers(-1, cuda) == 3
    assert auto_workers(-1, cpu, cpus=2) == 0  # a worker would take a core from the model
    assert auto_workers(-1, cpu, cpus=16) == 1
    assert auto_workers(-1, cuda, cpus=16) == 8
    assert auto_workers(-1, cuda, cpus=2) == 1
    assert auto_workers(3, cpu, cpus=2) == 3  # an explicit count is kept


def test_sampler_ranks_split_each_global_batch() -> None:
    single = [i for _, i in ResumableSampler(50, seed=3, batch_size=8)]
    ranks = [ResumableSampler(50, seed=3, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    parts = [[i for _, i in s] for s in ranks]
    assert len(single) == 48 and len(parts[0]) == len(parts[1]) == 24
    for step in range(6):  # rank 0 then rank 1 = the single process's batch, in order
        assert (
            parts[0][step * 4 : (step + 1) * 4] + parts[1][step * 4 : (step + 1) * 4]
            == single[step * 8 : (step + 1) * 8]
        )
    assert not set(parts[0]) & set(parts[1])
    ranks[1].skip_batches = 2  # a resume mid-epoch continues with the same slice
    assert [i for _, i in ranks[1]] == parts[1][8:]
    ranks[1].epoch = 1
    assert [i for _, i in ranks[1]] != parts[1][8:]
    accum = ResumableSampler(50, seed=3, batch_size=4, rank=0, world_size=2, grad_accum=4)
    assert accum.batches_per_epoch() == 4 and len(list(accum)) == 16  # whole optimizer steps of 32 pairs only


def test_image_cache_keeps_training_identical(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("none", "memory", "disk"):
        train(_cfg(data_root, tmp_path, name=mode, image_cache=mode, max_steps=2, workers=1 if mode == "disk" else 0))
    plain = _weights(tmp_path / "none")
    for mode in ("memory", "disk"):
        cached = _weights(tmp_path / mode)
        assert all(torch.equal(plain[k], cached[k]) for k in plain)
    assert (tmp_path / "disk" / "image_cache.npy").is_file()
    # a resume maps the saved array instead of decoding again
    monkeypatch.setattr(train_data, "load_rgb", lambda path: (_ for _ in ()).throw(AssertionError(f"decoded {path}")))
    dataset_images = json.loads((tmp_path / "disk" / "image_cache.json").read_text())["images"]
    cache = build_image_cache(
        dataset_images,
        data_root,
        T.Resize((64, 32), interpolation=T.InterpolationMode.BICUBIC),
        "disk",
        tmp_path / "disk",
        progress=False,
    )
    assert isinstance(cache.array, np.memmap) and cache.array.shape == (len(dataset_images), 64, 32, 3)


def test_runtime_flags_reach_the_loop(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, checkpointing = [], []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    original = model_lib.XVLMModel.set_grad_checkpointing
    monkeypatch.setattr(
        model_lib.XVLMModel,
        "set_grad_checkpointing",
        lambda self, enable=True: checkpointing.append(enable) or original(self, enable),
    )
    summary = train(
        _cfg(
            data_root,
            tmp_path,
            name="flags",
            epochs=1,
            batch_size=4,
            grad_accum=2,
            compile=True,
            grad_checkpointing=True,
        )
    )
    assert len(compiled) == 1 and checkpointing == [True]
    # 24 pairs, 4 per micro-batch, 2 micro-batches per optimizer step: 3 steps
    assert summary["steps"] == 3 and summary["pairs_per_step"] == 8
    assert summary["precision"] == ("bf16" if runtime_lib.cpu_has_bf16_units() else "fp32")  # auto, per CPU
    history = json.loads((tmp_path / "flags" / "history.json").read_text())
    assert math.isfinite(history[0]["loss"])
    saved = json.loads((tmp_path / "flags" / "config.json").read_text())["train"]
    assert saved["grad_accum"] == 2 and saved["compile"] and saved["grad_checkpointing"]


def test_init_weights_are_loaded_and_a_resume_keeps_the_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = []

    def load_initial_weights(model: torch.nn.Module, path: Path) -> dict:
        calls.append(Path(path))
        with torch.no_grad():
            model.itm_head.bias.fill_(0.25)
        return {"summary": "12 tensors loaded, 0 missing"}

    fake = types.ModuleType("tpas.models.convert.xvlm")
    fake.load_initial_weights = load_initial_weights
    monkeypatch.setitem(sys.modules, "tpas.models.convert.xvlm", fake)
    start = tmp_path / "xvlm.pth"
    # lr 0: the weights stay what --init loaded
    train(_cfg(data_root, tmp_path, name="init", init=start, lr=0.0, max_steps=1))
    assert calls == [start] and "12 tensors loaded" in capsys.readouterr().out
    assert torch.equal(_weights(tmp_path / "init")["itm_head.bias"], torch.full((2,), 0.25))
    assert json.loads((tmp_path / "init" / "config.json").read_text())["train"]["init"] == str(start)
    train(_cfg(data_root, tmp_path, name="init", resume=True))
    assert calls == [start]  # the checkpoint wins on resume


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("epochs", 0, "--epochs must be at least 1; got 0."),
        ("val_size", -3, "--val-size must be 0 (no validation) or more; got -3."),
        ("subset", -5, "--subset must be 0 (all pairs) or more; got -5."),
        ("steps", 0, "--steps must be at least 1 (or left out to train for --epochs); got 0."),
        ("save_every", -1, "--save-every must be 0 (only at epoch ends) or more; got -1."),
        ("word_loss", -0.5, "--word-loss must be 0 (off) or more; got -0.5."),
    ],
)
def test_out_of_range_counts_are_one_sentence(flag: str, value: int, expected: str) -> None:
    with pytest.raises(TpasError) as err:
        TrainConfig(**{flag: value})
    assert str(err.value) == expected
    TrainConfig(subset=0, val_size=0, save_every=0, steps=1)  # the documented meanings of 0 stay allowed


def test_saved_weights_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o002)  # not the 0600 that safetensors gives its own files
    try:
        save_weights(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
