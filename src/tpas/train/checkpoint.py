"""Checkpoints of a run: weights + optimizer, schedule, RNG state and position (`checkpoint/`,
swapped in as a whole), found again on --resume; `--init` weights from elsewhere."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tpas.errors import TpasError
from tpas.models.run import save_weights
from tpas.runtime import Runtime


def _rng_state(runtime: Runtime | None = None) -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    if runtime is not None and runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict, runtime: Runtime | None = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and runtime is not None and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: dict,
    scaler: torch.amp.GradScaler | None = None,
    runtime: Runtime | None = None,
) -> None:
    """Write weights + training state into a fresh folder, then swap it in as a whole.

    Under DDP every rank must call it (each rank's RNG state is gathered); rank 0 writes."""
    runtime = runtime or Runtime()
    rng = _rng_state(runtime)
    rng_ranks = [rng]
    if runtime.world_size > 1:
        rng_ranks = [None] * runtime.world_size
        dist.all_gather_object(rng_ranks, rng)
    if not runtime.is_main:
        return
    staging, final, old = run_dir / ".checkpoint.tmp", run_dir / "checkpoint", run_dir / ".checkpoint.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(model, staging / "model.safetensors", {"global_step": str(position["global_step"])})
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, "position": position}
    if runtime.world_size > 1:
        state["rng_ranks"] = rng_ranks
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, staging / "train_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_train_state(path: Path) -> dict:
    """train_state.pt, read with weights_only=True: a file holding other objects is refused, never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TpasError(
            f"{path}: not a tpas checkpoint (it holds objects other than tensors and plain values, which "
            f"are never loaded); restore the run's checkpoint or start the run again."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # torch's zip reader, truncated files
        raise TpasError(
            f"{path}: unreadable ({str(exc).splitlines()[0]}); the checkpoint is damaged: restore it "
            f"or start the run again."
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "position"} <= set(state):
        raise TpasError(
            f"{path}: not a tpas checkpoint (no optimizer/scheduler/position); restore the run's checkpoint."
        )
    return state


def find_checkpoint(run_dir: Path) -> Path | None:
    for folder in (run_dir / "checkpoint", run_dir / ".checkpoint.old"):  # .old survives a crash mid-swap
        if (folder / "train_state.pt").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def load_init(model: torch.nn.Module, path: Path) -> dict:
    """--init: start from the weights at `path` (tpas.models.convert.xvlm maps X-VLM/BLIP/... layouts)."""
    try:
        # imported here: only --init needs it (and it may pull in heavier dependencies)
        from tpas.models.convert.xvlm import load_initial_weights
    except ImportError as exc:
        raise TpasError(f"--init {path}: tpas.models.convert.xvlm is not available ({exc}); reinstall tpas.") from None
    return load_initial_weights(model, path)


def _describe_report(report: Any) -> str:
    """One line from load_initial_weights' report (its "counts", else whatever it holds)."""
    if not isinstance(report, dict):
        return str(report)
    if "summary" in report:
        return str(report["summary"])
    if isinstance(report.get("counts"), dict):
        counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
        return f"{report.get('schema', '?')} names; tensors: {counts}"
    return ", ".join(f"{k} {len(v) if isinstance(v, (list, tuple, set, dict)) else v}" for k, v in report.items())
