"""tpas.train.dropout: a CPU dropout mask drawn from 16-bit integers, swapped in for CPU training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakes import TINY_TRAIN, write_coloured_train
from torch import nn

from tpas.train import TrainConfig, train
from tpas.train.dropout import FastDropout, fast_dropout, use_fast_dropout, use_torch_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_p_of_the_elements_and_keeps_the_expectation(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.rand(400_003, dtype=torch.float32).add_(0.5).to(dtype)  # an odd size: not a multiple of 4 draws
    y = fast_dropout(x, p)
    dropped = y == 0
    # 400k Bernoulli draws: the dropped fraction is within 5 standard deviations of p
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    # kept values are scaled by 1 / (1 - p), rounded once in x's dtype
    expected = (x[~dropped].float() / (1 - p)).to(dtype)
    assert torch.allclose(y[~dropped].float(), expected.float(), rtol=1e-3 if dtype == torch.bfloat16 else 1e-4)
    # (that check is what catches a scale rounded to bf16, 1/0.9 -> 1.109, before it multiplies)
    # the same expectation as the input
    assert abs(y.double().mean().item() / x.double().mean().item() - 1) < 5e-3


def test_no_dropout_in_eval_or_at_zero_and_every_element_at_one() -> None:
    x = torch.randn(7, 5)
    assert fast_dropout(x, 0.1, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))


def test_the_mask_follows_the_seed_and_changes_between_calls() -> None:
    x = torch.ones(4, 1000)
    torch.manual_seed(3)
    first, second = fast_dropout(x, 0.2), fast_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.2), first)
    assert not torch.equal(first, second)


def test_gradients_pass_only_the_kept_elements_with_the_same_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.all(x.grad[~kept] == 0)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75))


def test_swapping_keeps_p_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True),
        nn.Dropout(0.3),
        nn.Linear(16, 4),
    ).eval()
    x = torch.randn(3, 5, 16)
    before = model(x)
    plain = [m.p for m in model.modules() if type(m) is nn.Dropout]
    assert use_fast_dropout(model) == len(plain) == 4  # dropout, dropout1, dropout2 and the Sequential's
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert sorted(m.p for m in model.modules() if isinstance(m, FastDropout)) == sorted(plain)
    assert torch.equal(model(x), before)  # eval: the identity, as nn.Dropout
    model.train()
    torch.manual_seed(1)
    trained = model[1](torch.ones(10_000))
    assert 0.25 < (trained == 0).float().mean().item() < 0.35
    # and back (the benchmark times both)
    assert use_torch_dropout(model) == 4 and sorted(m.p for m in model.modules() if type(m) is nn.Dropout) == sorted(
        plain
    )


def test_inplace_dropout_returns_its_input() -> None:
    layer = FastDropout(0.5, inplace=True)
    x = torch.ones(1000)
    assert layer(x) is x and 0.4 < (x == 0).float().mean().item() < 0.6


def test_cpu_training_runs_with_the_fast_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = []  # the module the loop trains, caught where --compile would wrap it
    monkeypatch.setattr(torch, "compile", lambda module, **kw: trained.append(module) or module)
    root = write_coloured_train(tmp_path / "pab")
    train(TrainConfig(**{**TINY_TRAIN, "data_root": root, "runs_dir": tmp_path, "name": "r", "compile": True}))
    dropouts = [type(m) for m in trained[0].modules() if isinstance(m, nn.Dropout)]
    assert dropouts and set(dropouts) == {FastDropout}
