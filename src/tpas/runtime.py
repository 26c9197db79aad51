"""Where and how tensors run, for training and inference alike: device, autocast precision, rank."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpas import distributed
from tpas.errors import TpasError


@dataclass
class Runtime:
    """Where and how steps run: the device, the autocast dtype (None = fp32) and this process's rank."""

    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for fp16/bf16; nothing for fp32."""
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: Intel AMX tiles, or AVX-512 BF16
    dot products (AMD Zen 4, Intel Cooper Lake). There bf16 autocast runs the lite training loop
    1.4-1.5x faster (docs/demo-quality.md); elsewhere bf16 is emulated, slower."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)  # private, so guarded
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def resolve_runtime(device: str = "auto", precision: str = "auto", inference: bool = False) -> Runtime:
    """Pick the device and autocast dtype; join the process group's rank when one is running.

    device auto = the GPU when torch sees one (under torchrun, GPU LOCAL_RANK). precision auto =
    for training, bf16 on a GPU that supports it or a CPU with bf16 units (AMX or AVX-512 BF16), else fp32; for
    inference, fp16 on a GPU, fp32 on a CPU. fp16 needs a GPU (training scales its loss, CUDA-only here); bf16 runs on a CPU too."""
    if device not in ("auto", "cpu", "cuda"):
        raise TpasError(f"--device {device!r}: choose auto, cpu or cuda.")
    if precision != "auto" and precision not in AMP_DTYPES:
        raise TpasError(f"--precision {precision!r}: choose auto, fp32, fp16 or bf16.")
    if device == "cuda" and not torch.cuda.is_available():
        raise TpasError("--device cuda: torch sees no CUDA GPU (CPU-only torch build or no driver); use --device cpu.")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = distributed.rank_and_world()
    target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if precision == "auto":
        if inference:
            amp = torch.float16 if use_cuda else None
        else:
            fast = torch.cuda.is_bf16_supported() if use_cuda else cpu_has_bf16_units()
            amp = torch.bfloat16 if fast else None
    elif precision == "fp16" and not use_cuda:
        raise TpasError("--precision fp16 needs a GPU; on a CPU use --precision bf16 or fp32.")
    else:
        amp = AMP_DTYPES[precision]
    if use_cuda and not inference:
        # TF32 matmuls/convolutions: ~fp32 accuracy at tensor-core speed on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed image size: pick the fastest convolution once
    return Runtime(target, amp, rank, world)
