"""Dropout whose mask is cheap to draw on a CPU.

On a CPU, `torch.nn.Dropout` draws its mask with `bernoulli_`, about 6 ns an element on the 2-core
machines: profiling the lite preset's training step (128 pairs, bf16) put a fifth of the step in it,
most of it the image layers' 1536-wide feed-forward activations. Drawing 16 random bits an element
from 64-bit integers (each a quarter of one `random_` draw) and comparing them against a threshold
gives the same kind of mask; dropout's forward and backward then take about a quarter of the time in
bf16 and half in fp32 (a drop probability rounded to a multiple of 1/65536; the kept values are
scaled by 1/(1 - that probability), as nn.Dropout's are).

`use_fast_dropout(model)` swaps each `nn.Dropout` of a model for `FastDropout`, which keeps the
same `p` and falls back to `nn.functional.dropout` off the CPU (where bernoulli is fast) and is
the identity in eval mode, as nn.Dropout is: only CPU training changes. Attention-probability
dropout inside fused attention kernels is left as it is (a small part of the step).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_LEVELS = 1 << 16  # the mask compares 16-bit draws


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """nn.functional.dropout(x, p, training), with the mask drawn from 16-bit integers on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    cut = round(p * _LEVELS)  # draws below it drop (the drop probability is cut / 2**16)
    if cut == 0:
        return x
    # every bit of a full-range int64 is uniform; its four int16 views are four draws
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    bits.random_(-(1 << 63), (1 << 63) - 1)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= cut - _LEVELS // 2
    # bool -> float conversion is slow on a CPU, its uint8 view multiplies at memory speed; the
    # scale is a Python float so that bf16 rounds each product, not the scale itself (1/0.9 ->
    # 1.109 in bf16 would shrink every kept value by 0.2%)
    return (x * keep.view(torch.uint8)).mul_(_LEVELS / (_LEVELS - cut))


class FastDropout(nn.Dropout):
    """nn.Dropout with fast_dropout's CPU mask (same `p`, same eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nn.Dropout(inplace=True) callers expect x itself back
            return x.copy_(fast_dropout(x, self.p, self.training)) if self.training else x
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout in `model` (in place) for a FastDropout of the same p; returns how many."""
    return _swap(model, nn.Dropout, FastDropout)


def use_torch_dropout(model: nn.Module) -> int:
    """Undo use_fast_dropout: every FastDropout back to an nn.Dropout (the benchmark compares both)."""
    return _swap(model, FastDropout, nn.Dropout)


def _swap(model: nn.Module, old: type[nn.Dropout], new: type[nn.Dropout]) -> int:
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is old:  # exactly: subclasses may draw their masks their own way
                setattr(parent, name, new(child.p, child.inplace).train(child.training))
                swapped += 1
    return swapped
