"""Multi-process training (torchrun / DDP): the process group, rank info and all-gathers.

`torchrun --nproc_per_node N train.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_from_env` starts the process group from them (NCCL on CUDA, gloo on CPU).
The model's losses call `rank_and_world` and the gathers below, so every rank's pairs serve as
negatives for every other rank's (as X-VLM and open_clip do).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from tpas.errors import TpasError

# Rank 0 alone validates and checks images while the others wait at a barrier; on the full PAB
# release that can take longer than the default 10-minute NCCL timeout.
TIMEOUT = datetime.timedelta(minutes=60)


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TpasError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun.") from None


def init_from_env(device_type: str) -> bool:
    """Start the process group when launched with WORLD_SIZE > 1; True if this call started it
    (the caller then ends it with `dist.destroy_process_group()`)."""
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TpasError(f"WORLD_SIZE is set but {missing} are not; launch with torchrun --nproc_per_node N train.py.")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return True


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def max_over_ranks(*values: int, device: torch.device | str = "cpu") -> list[int]:
    """Element-wise maximum of small integers over all ranks (one all_reduce)."""
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (rank order). Gradients flow back to each rank's
    own rows (summed over ranks) when `t` requires grad: torch's functional all_gather_single,
    which replaced the deprecated torch.distributed.nn.functional.all_gather."""
    if t.requires_grad:
        return funcol.wait_tensor(funcol.all_gather_single(t.contiguous(), 0, dist.group.WORLD))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)
