"""DDP on the CPU: 2 processes (gloo) against one process on the same global batch.

One training step is `tpas.train.loop.training_step`, used by both sides. The model runs in eval
mode there (BatchNorm on running statistics, no dropout), so a sample's features do not depend
on which batch it sits in, and with SGD the gradient's scale shows in the weights: equal weights
mean the all-gathered ITC/ITM (tpas.models.losses) and DDP's averaging give the global batch's gradient.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakes import _record, write_train
from torch.nn.parallel import DistributedDataParallel

from tpas import models as model_lib
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime, resolve_runtime
from tpas.train import TrainConfig, train
from tpas.train.loop import training_step

WORLD = 2
# Rank 1's captions are longer (the ranks pad to different lengths); caption 5 repeats caption 1,
# so a positive pair spans the two ranks.
CAPTIONS = [
    "a man in red is walking",
    "a woman in blue lying down",
    "a boy in green runs",
    "a girl in black falls over",
    "an old man in a long grey coat and a hat is crouching in pain by the road",
    "a woman in blue lying down",
    "a tall young woman in a yellow dress and white shoes is waving at someone",
    "a child in an orange jacket and blue jeans is playing football on the grass",
]


def _tiny() -> tuple[model_lib.RetrievalModel, object]:
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig.from_preset("tiny")
    return model_lib.build_model(cfg), model_lib.build_tokenizer(cfg)


def _batch(tokenizer: object, rows: slice) -> dict[str, torch.Tensor]:
    """Rows of the global batch, tokenized on their own (as each rank's loader does)."""
    images = torch.randn(len(CAPTIONS), 3, 64, 32, generator=torch.Generator().manual_seed(1))
    return {"images": images[rows], **TextPipeline(tokenizer, max_tokens=70)(CAPTIONS[rows])}


def one_step(net: torch.nn.Module, model: model_lib.RetrievalModel, batch: dict, runtime: Runtime) -> dict[str, float]:
    model.eval()
    torch.manual_seed(123)  # the ITM negatives' uniforms: one per global row, the same in every process
    return training_step(
        net, [batch], torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False), runtime
    )


def _worker(rank: int, port: int, out: Path, data_root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, tokenizer = _tiny()
        per_rank = len(CAPTIONS) // WORLD
        runtime = resolve_runtime("cpu", "fp32")
        assert (runtime.rank, runtime.world_size) == (rank, WORLD)
        losses = one_step(
            DistributedDataParallel(model),
            model,
            _batch(tokenizer, slice(rank * per_rank, (rank + 1) * per_rank)),
            runtime,
        )
        torch.save({"losses": losses, "state": model.state_dict()}, out / f"rank{rank}.pt")
        # the whole loop under a process group: sharded sampler, DDP, rank-0 validation and files
        summary = train(
            TrainConfig(
                data_root=data_root,
                model="tiny",
                subset=24,
                val_size=8,
                batch_size=4,
                epochs=1,
                runs_dir=out / "runs",
                name="ddp",
                workers=0,
                progress=False,
                threads=1,
            )
        )
        (out / f"summary{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "pab"
    write_train(root, [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(40)])
    return root


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path: Path, data_root: Path) -> None:
    # fork (where there is one) skips re-importing torch and transformers in each process: ~2x less CPU
    mp.start_processes(
        _worker,
        args=(_free_port(), tmp_path, data_root),
        nprocs=WORLD,
        join=True,
        start_method="fork" if sys.platform == "linux" else "spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = _tiny()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        single = one_step(model, model, _batch(tokenizer, slice(None)), Runtime())
    finally:
        torch.set_num_threads(before)
    expected = model.state_dict()
    for state in (r["state"] for r in ranks):
        assert all(torch.equal(state[k], ranks[0]["state"][k]) for k in expected)  # DDP: identical ranks
        assert all(torch.allclose(state[k], expected[k], atol=1e-5) for k in expected), max(
            (state[k] - expected[k]).abs().max().item() for k in expected
        )
    assert any(not torch.allclose(initial[k], expected[k], atol=1e-3) for k in expected)  # the step did move them
    for name in ("loss", "loss_itc", "loss_itm"):
        for r in ranks:
            assert r["losses"][name] == pytest.approx(single[name], abs=1e-5)

    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(WORLD)]
    # 24 pairs, 4 per rank x 2 ranks per step: 3 steps; rank 0 validated and wrote the run
    assert [s["steps"] for s in summaries] == [3, 3] and summaries[0]["pairs_per_step"] == 8
    assert summaries[0]["processes"] == 2 and summaries[0]["val_itc"] is not None
    run = tmp_path / "runs" / "ddp"
    assert (run / "model.safetensors").is_file() and len(json.loads((run / "history.json").read_text())) == 1
